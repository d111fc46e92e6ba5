"""The Predictor: a saved model bundle applied to new data, with the identical preprocessing.

The bundle holds everything: the selection the training data went through,
the padding of each collection, the feature list and its standardisation.
New NanoAOD files are skimmed and padded exactly as the training data were;
HDF5 files written by :class:`~cmsmlkit.data.hdf5.HDF5Writer` are read as
they are.

>>> from cmsmlkit import Predictor
>>> predictor = Predictor.from_bundle("model")  # doctest: +SKIP
>>> scores = predictor.predict("new.root")  # doctest: +SKIP
>>> scores.shape  # [events, classes]  # doctest: +SKIP
(1834, 2)
>>> predictor.predict_files(["new.root"], "predictions")  # doctest: +SKIP
[PosixPath('predictions/new.h5')]
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ClusterConfig, ConvertConfig, PredictConfig, SkimConfig, build_config
from ..errors import BundleError, ConfigError, EmptySelectionError, InputFileError

__all__ = ["Predictor"]

log = logging.getLogger(__name__)

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def _expand(inputs: list[str]) -> list[str]:
    """Globs expanded (sorted); a pattern that matches nothing is an error."""
    files: list[str] = []
    for item in inputs:
        if "://" in item:
            files.append(item)
            continue
        path = os.path.expanduser(item)
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise InputFileError(f"predict.inputs: the pattern '{item}' matches no file.")
            files.extend(matches)
        else:
            if not os.path.exists(path):
                raise InputFileError(
                    f"predict.inputs: the file '{item}' does not exist; check the path."
                )
            files.append(path)
    return files


class Predictor:
    """Scores new events with a saved model bundle.

    Parameters
    ----------
    config
        A :class:`~cmsmlkit.config.PredictConfig`, a dict, or a YAML path.
    cluster
        Where the skim of NanoAOD inputs runs.
    **fields
        Any field of ``PredictConfig`` as a keyword (``bundle``, ``inputs``, ``output``, ``batch_size``).

    Examples
    --------
    >>> p = Predictor(bundle="model", output="scores")
    >>> p.config.output
    'scores'
    """

    def __init__(
        self,
        config: PredictConfig | dict[str, Any] | str | Path | None = None,
        *,
        cluster: ClusterConfig | None = None,
        **fields: Any,
    ) -> None:
        self.config = build_config(PredictConfig, config, fields)
        self.cluster = cluster
        self._bundle: Any = None

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        config: PredictConfig | dict[str, Any] | None = None,
        *,
        cluster: ClusterConfig | None = None,
        **fields: Any,
    ) -> Predictor:
        """A Predictor for the bundle directory ``path``, loaded at once so a bad bundle fails here."""
        predictor = cls(config, cluster=cluster, **{**fields, "bundle": str(path)})
        _ = predictor.bundle
        return predictor

    @property
    def bundle(self) -> Any:
        """The loaded :class:`~cmsmlkit.ml.bundle.Bundle`."""
        if self._bundle is None:
            from .bundle import Bundle

            self._bundle = Bundle.load(self.config.bundle)
        return self._bundle

    @property
    def class_names(self) -> list[str]:
        return list(self.bundle.class_names)

    def __repr__(self) -> str:
        state = (
            repr(self._bundle)
            if self._bundle is not None
            else f"{self.config.bundle!r} (not loaded yet)"
        )
        return f"Predictor(bundle={state}, output={self.config.output!r})"

    # ------------------------------------------------------------------ scoring

    def predict(self, data: Any) -> np.ndarray:
        """Class probabilities [N, C] for ``data``.

        ``data`` is a path (NanoAOD ``.root`` or cmsmlkit ``.h5``), a list of
        paths (scores concatenated in order), a Columns mapping or open
        ``h5py.File``, or an awkward array of skimmed events.
        """
        return self._score(data)[0]

    def _score(self, data: Any) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Scores, event ids [N, 3], and extra per-event arrays to carry into the output."""
        if isinstance(data, (str, Path)):
            return self._score_file(str(data))
        if isinstance(data, (list, tuple)):
            parts = [self._score_file(f) for f in _expand([str(d) for d in data])]
            if not parts:
                raise InputFileError("nothing to score: the list of inputs is empty.")
            extras = {
                k: np.concatenate([p[2][k] for p in parts])
                for k in parts[0][2]
                if all(k in p[2] for p in parts)
            }
            return (
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
                extras,
            )
        if isinstance(data, Mapping):
            scores = self.bundle.predict_proba(data, batch_size=self.config.batch_size)
            ids = (
                np.asarray(data["event_id"][:], dtype=np.int64)
                if "event_id" in data
                else _no_ids(len(scores))
            )
            return scores, ids, {}
        import awkward as ak

        if isinstance(data, ak.Array):
            return self._score_events(data)
        raise TypeError(
            f"Predictor.predict takes a file path, a list of paths, a Columns mapping or an awkward array, "
            f"not {type(data).__name__}."
        )

    def _score_file(self, path: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        if path.lower().endswith(_HDF5_SUFFIXES):
            return self._score_hdf5(path)
        return self._score_nanoaod(path)

    def _score_hdf5(self, path: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        import h5py

        if not os.path.exists(path):
            raise InputFileError(f"{path}: no such file; check predict.inputs.")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise InputFileError(f"{path}: not a readable HDF5 file ({exc}).") from None
        with f:
            scores = self.bundle.predict_proba(f, batch_size=self.config.batch_size)
            ids = f["event_id"][:].astype(np.int64) if "event_id" in f else _no_ids(len(scores))
            extras = {key: f[key][:] for key in ("label", "weight") if key in f}
        return scores, ids, extras

    def _score_nanoaod(self, path: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        from ..data.skim import Skimmer

        skim = self.bundle.skim_config
        if skim is None:
            raise BundleError(
                f"{self.config.bundle}: the bundle records no skim selection (it was trained on HDF5 "
                "files made outside cmsmlkit), so NanoAOD cannot be prepared identically; score HDF5 "
                "files made the same way as the training data instead."
            )
        skim_config = build_config(SkimConfig, dict(skim), {"output": None})
        name = Path(path).stem
        fileset = {
            name: {
                "files": {path: "Events"},
                "metadata": {
                    "dataset": name,
                    "label": self.class_names[0],
                    "is_mc": True,
                    "xsec": None,
                },
            }
        }
        try:
            result = Skimmer(skim_config, cluster=self.cluster).run(fileset)
        except EmptySelectionError:
            log.warning("%s: no event passes the bundle's selection; writing empty scores", path)
            return self._empty()
        return self._score_events(result.arrays[name])

    def _score_events(self, events: Any) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        from ..data.hdf5 import columns

        if len(events) == 0:
            return self._empty()
        padding = self.bundle.padding or {}
        convert = ConvertConfig(
            collections={
                coll: {
                    k: spec[k] for k in ("max_len", "sort_by", "pad_value", "fields") if k in spec
                }
                for coll, spec in padding.items()
            },
            # Only the scalars the model reads: a NaN in an unused variable must not stop scoring.
            scalars=[f.name for f in self.bundle.features if f.collection is None],
        )
        cols, _ = columns(
            events, convert, max_lens={c: int(s["max_len"]) for c, s in padding.items()}
        )
        scores = self.bundle.predict_proba(cols, batch_size=self.config.batch_size)
        fields = set(events.fields)
        if {"run", "luminosityBlock", "event"} <= fields:
            import awkward as ak

            ids = np.stack(
                [
                    ak.to_numpy(events[k]).astype(np.int64)
                    for k in ("run", "luminosityBlock", "event")
                ],
                axis=1,
            )
        else:
            ids = _no_ids(len(scores))
        return scores, ids, {}

    def _empty(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        return np.zeros((0, len(self.class_names)), np.float32), _no_ids(0), {}

    # ------------------------------------------------------------------ files

    def predict_files(
        self, inputs: list[str] | None = None, output: str | Path | None = None
    ) -> list[Path]:
        """Score every input file and write ``<output>/<input stem>.h5`` for each; return the paths.

        Each output holds ``/scores`` [N, C] float32 (attrs ``class_names``),
        ``/event_id`` [N, 3] (run, luminosityBlock, event) to join back to the
        analysis, and ``/label``, ``/weight`` when the input had them. Files
        are written atomically.
        """
        from tqdm.auto import tqdm

        files = _expand(list(inputs if inputs is not None else self.config.inputs))
        if not files:
            raise ConfigError("predict.inputs is empty: list the NanoAOD or HDF5 files to score.")
        out_dir = Path(output if output is not None else self.config.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        stems = [Path(f).stem for f in files]
        if len(set(stems)) != len(stems):
            dupes = sorted({s for s in stems if stems.count(s) > 1})
            raise ConfigError(
                f"predict.inputs: several inputs are named {dupes}; their outputs would overwrite each "
                "other. Score them into different output directories."
            )
        written = []
        for path in tqdm(
            files, desc="predict", unit="file", disable=None if len(files) > 1 else True
        ):
            scores, ids, extras = self._score_file(path)
            target = out_dir / f"{Path(path).stem}.h5"
            self._write(target, scores, ids, extras, source=path)
            log.info("%s: %d events scored -> %s", path, len(scores), target)
            written.append(target)
        return written

    def _write(
        self,
        target: Path,
        scores: np.ndarray,
        ids: np.ndarray,
        extras: dict[str, np.ndarray],
        *,
        source: str,
    ) -> None:
        import h5py

        from .. import __version__

        tmp = target.with_name(target.name + ".tmp")
        try:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("scores", data=scores.astype(np.float32))
                ds.attrs["class_names"] = self.class_names
                f.create_dataset("event_id", data=ids.astype(np.int64))
                for key, values in extras.items():
                    f.create_dataset(key, data=values)
                f.attrs["cmsmlkit_version"] = __version__
                f.attrs["bundle"] = str(Path(self.config.bundle).resolve())
                f.attrs["source"] = source
                f.attrs["n_events"] = len(scores)
                f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()


def _no_ids(n: int) -> np.ndarray:
    return np.full((n, 3), -1, dtype=np.int64)
