"""Fixtures shared by the whole suite: real NanoAOD files and generated demo data."""

from __future__ import annotations

from pathlib import Path

import pytest

# The demo selection and padding; tests take them from here.
from cmsmlkit.data.toy import DEMO_PADDING, DEMO_SKIM  # noqa: F401

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


@pytest.fixture(scope="session")
def demo_chain(tmp_path_factory, demo_files):
    """The demo chain run once, small: skimmed HDF5 and a trained bundle (3 epochs, no tracking)."""
    from types import SimpleNamespace

    from cmsmlkit import HDF5Writer, NanoAODSource, Skimmer, Trainer

    out = tmp_path_factory.mktemp("chain")
    source = NanoAODSource(
        datasets={
            name: {"files": [str(p) for p in demo_files[name]], "label": label}
            for name, label in (("ttbar", "signal"), ("wjets", "background"), ("dy", "background"))
        }
    )
    skimmer = Skimmer(DEMO_SKIM)
    skim = skimmer.run(source.fileset())
    h5 = HDF5Writer(output=str(out / "demo.h5"), collections=DEMO_PADDING).write(
        skim, skim_config=skimmer.config
    )
    trained = Trainer(
        inputs=[str(h5)],
        output=str(out / "model"),
        max_epochs=3,
        batch_size=256,
        tracking={"enabled": False},
    ).fit()
    return SimpleNamespace(
        dir=out,
        files=demo_files,
        skim=skim,
        skim_config=skimmer.config,
        h5=h5,
        bundle=trained.bundle_path,
        train=trained,
    )
