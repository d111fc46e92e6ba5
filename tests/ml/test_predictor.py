"""The Predictor: a bundle applied to new NanoAOD, HDF5 and arrays with the identical preprocessing."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cmsmlkit import HDF5Writer, Predictor, Skimmer
from cmsmlkit.errors import BundleError, InputFileError


def test_scores_are_probabilities_for_each_class(demo_chain):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    scores = predictor.predict(demo_chain.files["new"])
    assert predictor.class_names == ["signal", "background"]
    assert scores.ndim == 2 and scores.shape[1] == 2 and len(scores) > 100
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert scores.dtype == np.float32


def test_nanoaod_and_hdf5_of_the_same_events_score_identically(demo_chain, tmp_path):
    """The bundle's selection and padding reproduce the training preprocessing exactly."""
    new = demo_chain.files["new"]
    skim = Skimmer(demo_chain.skim_config).run(
        {
            "new": {
                "files": {str(new[0]): "Events"},
                "metadata": {"dataset": "new", "label": "signal", "is_mc": True},
            }
        }
    )
    padding = {
        "GoodJet": {"max_len": 5},
        "GoodMuon": {"max_len": 2},
        "GoodElectron": {"max_len": 2},
    }
    h5 = HDF5Writer(output=str(tmp_path / "new.h5"), collections=padding, shuffle=False).write(skim)
    predictor = Predictor.from_bundle(demo_chain.bundle)
    from_root = predictor.predict(new)
    from_h5 = predictor.predict(str(h5))
    assert from_root.shape == from_h5.shape
    np.testing.assert_allclose(from_root, from_h5, atol=1e-6)


def test_predict_files_writes_scores_with_event_ids(demo_chain, tmp_path):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    paths = predictor.predict_files(
        [str(demo_chain.h5), str(demo_chain.files["new"][0])], tmp_path / "out"
    )
    assert [p.name for p in paths] == ["demo.h5", "new.h5"]
    assert not list((tmp_path / "out").glob("*.tmp"))
    with h5py.File(paths[0]) as f, h5py.File(demo_chain.h5) as src:
        assert f["scores"].shape == (len(src["label"]), 2)
        assert list(f["scores"].attrs["class_names"]) == ["signal", "background"]
        np.testing.assert_array_equal(f["event_id"][:], src["event_id"][:])
        np.testing.assert_array_equal(f["label"][:], src["label"][:])
    with h5py.File(paths[1]) as f:
        ids = f["event_id"][:]
        assert ids.shape == (len(f["scores"]), 3) and (ids >= 0).all()
        assert len(np.unique(ids[:, 2])) == len(ids)


def test_the_model_separates_signal_from_background(demo_chain):
    """Scored again through the Predictor, the test AUC of the bundle is reproduced on its own data."""
    from sklearn.metrics import roc_auc_score

    with h5py.File(demo_chain.h5) as f:
        labels = f["label"][:]
    scores = Predictor.from_bundle(demo_chain.bundle).predict(str(demo_chain.h5))
    assert roc_auc_score(labels == 0, scores[:, 0]) > 0.8


def test_real_nanoaod_and_the_empty_file(demo_chain, nanoaod_dir, tmp_path):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    paths = predictor.predict_files(
        [str(nanoaod_dir / "nano_dy.root"), str(nanoaod_dir / "nano_dy_empty.root")], tmp_path
    )
    with h5py.File(paths[0]) as f:
        n = len(f["scores"])
        assert f["scores"].shape == (n, 2) and f["event_id"].shape == (n, 3)
    with h5py.File(paths[1]) as f:
        assert f["scores"].shape == (0, 2)
        assert f.attrs["n_events"] == 0


def test_missing_input_and_missing_bundle_errors(demo_chain, tmp_path):
    predictor = Predictor.from_bundle(demo_chain.bundle)
    with pytest.raises(InputFileError, match="nowhere.root"):
        predictor.predict_files([str(tmp_path / "nowhere.root")], tmp_path)
    with pytest.raises(InputFileError, match="matches no file"):
        predictor.predict_files([str(tmp_path / "*.root")], tmp_path)
    with pytest.raises(BundleError, match="no-model"):
        Predictor.from_bundle(tmp_path / "no-model")


def test_repr_names_the_bundle(demo_chain):
    predictor = Predictor(bundle=str(demo_chain.bundle))
    assert "not loaded yet" in repr(predictor)
    _ = predictor.bundle
    assert "signal" in repr(predictor)
