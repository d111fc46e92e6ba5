"""cmsmlkit: from CMS NanoAOD to a trained, tuned and deployed classifier.

The public classes are imported on first use, so ``import cmsmlkit`` stays fast
and loads none of torch, lightning, optuna, mlflow or coffea.

>>> import cmsmlkit
>>> cfg = cmsmlkit.load_config("pipeline.yaml")  # doctest: +SKIP
>>> cmsmlkit.Pipeline(cfg).run()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import load_config
from .errors import CmsmlError

__version__ = "0.1.0"

_LAZY = {
    "NanoAODSource": "cmsmlkit.data.source",
    "Skimmer": "cmsmlkit.data.skim",
    "HDF5Writer": "cmsmlkit.data.hdf5",
    "Trainer": "cmsmlkit.ml.trainer",
    "Tuner": "cmsmlkit.ml.tuner",
    "Predictor": "cmsmlkit.ml.predictor",
    "Pipeline": "cmsmlkit.pipeline",
}

__all__ = [
    "CmsmlError",
    "HDF5Writer",
    "NanoAODSource",
    "Pipeline",
    "Predictor",
    "Skimmer",
    "Trainer",
    "Tuner",
    "__version__",
    "load_config",
]

if TYPE_CHECKING:
    from .data.hdf5 import HDF5Writer
    from .data.skim import Skimmer
    from .data.source import NanoAODSource
    from .ml.predictor import Predictor
    from .ml.trainer import Trainer
    from .ml.tuner import Tuner
    from .pipeline import Pipeline


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cmsmlkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
