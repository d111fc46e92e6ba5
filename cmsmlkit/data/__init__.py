"""The data half: NanoAOD sources, skimming, padding and HDF5 writing."""
