"""Fixtures shared by the whole suite: real NanoAOD files and generated demo data."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Real NanoAOD files from coffea's test samples (see files/nanoaod/README.md).
NANOAOD = Path(__file__).parent / "files" / "nanoaod"


@pytest.fixture(scope="session")
def nanoaod_dir() -> Path:
    """The directory of the real NanoAOD files: nano_dy.root, nano_tt_v12.root, nano_dy_empty.root."""
    return NANOAOD


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, list[Path]]:
    """Small toy NanoAOD files of the demo (ttbar, wjets, dy, new), written once per session."""
    from cmsmlkit.data import toy

    return toy.make_demo(tmp_path_factory.mktemp("demo"), n_events=1500, seed=7)
