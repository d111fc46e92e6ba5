"""The ML half: datasets, models, training, tuning, bundles and prediction."""
