"""The public face: names, lazy imports, version."""

from __future__ import annotations

import subprocess
import sys

import cmsmlkit


def test_public_names():
    for name in (
        "NanoAODSource",
        "Skimmer",
        "HDF5Writer",
        "Trainer",
        "Tuner",
        "Predictor",
        "load_config",
    ):
        assert name in cmsmlkit.__all__
        assert name in dir(cmsmlkit)


def test_import_is_light():
    code = (
        "import sys, cmsmlkit\n"
        "heavy = [m for m in ('torch', 'lightning', 'optuna', 'mlflow', 'coffea', 'uproot') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lazy_class_is_the_module_class():
    from cmsmlkit.data.source import NanoAODSource

    assert cmsmlkit.NanoAODSource is NanoAODSource


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        cmsmlkit.Nope  # noqa: B018
