"""The Predictor: a saved model bundle applied to new data, with the identical preprocessing.

The bundle holds everything: the selection the training data went through,
the padding of each collection, the feature list and its standardisation.
New NanoAOD files are skimmed and padded exactly as the training data were;
HDF5 files written by :class:`~cmsmlkit.data.hdf5.HDF5Writer` are read as
they are; awkward arrays of skimmed events and mappings of numpy arrays are
scored in memory.

Outputs, per input file (``PredictConfig.formats``):

``hdf5`` / ``parquet``
    the scored (selected) events: ``<name>_<class>`` per class, ``run``,
    ``luminosityBlock``, ``event`` and ``entry`` (the input entry).
``friend``
    ``<stem>.friend.root``, TTree ``Friends`` with one entry per *input*
    event in input order: the scores (``default`` where the bundle's
    selection fails), ``<name>_selected``, ``run``, ``luminosityBlock``,
    ``event``; a ROOT friend of the input's ``Events``.
``nanoaod``
    ``<stem>.root``, a copy of the input file with the score branches added.

:meth:`Predictor.predict_fileset` also fills histograms of the score per
dataset (genWeight applied, normalised to ``xsec * lumi / sumw``) and writes
them to a ROOT file that Combine reads. :func:`add_scores` does the same
scoring inside a user's own coffea processor; :func:`export_cmssw` writes
what a CMSSW ONNXRuntime producer needs.

>>> from cmsmlkit import Predictor
>>> predictor = Predictor.from_bundle("model")  # doctest: +SKIP
>>> scores = predictor.predict("new.root")  # doctest: +SKIP
>>> scores.shape  # [events, classes]  # doctest: +SKIP
(1834, 2)
>>> predictor.predict_files(["new.root"], "predictions")  # doctest: +SKIP
PredictReport(1 output(s) for 1 input(s): 1 scored)
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cluster import dask_client
from ..config import ClusterConfig, ConvertConfig, PredictConfig, SkimConfig, build_config
from ..data.source import normalise_fileset
from ..errors import (
    BundleError,
    ConfigError,
    DataError,
    InputFileError,
    MissingBranchError,
    MissingDependencyError,
    did_you_mean,
)

if TYPE_CHECKING:
    import hist

    from .bundle import Bundle

__all__ = [
    "Predictor",
    "PredictReport",
    "FileScores",
    "add_scores",
    "align_events",
    "score_names",
    "export_cmssw",
    "CMSSW_FORMAT_VERSION",
]

log = logging.getLogger(__name__)

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_EVENT_ID = ("run", "luminosityBlock", "event")
#: Version of the preprocessing JSON that :func:`export_cmssw` writes.
CMSSW_FORMAT_VERSION = 1
#: Tree name of the friend-tree output.
FRIEND_TREE = "Friends"
_SUFFIX = {"hdf5": ".h5", "parquet": ".parquet", "friend": ".friend.root", "nanoaod": ".root"}
_DONE_DIR = ".done"
_STEP = 200_000  # entries per chunk when copying ROOT trees


def _expand(inputs: Sequence[str]) -> list[str]:
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


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (*_HDF5_SUFFIXES, ".root"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _is_hdf5(path: str) -> bool:
    return path.lower().endswith(_HDF5_SUFFIXES)


def _safe(name: str) -> str:
    """A class name as a branch-name part: letters, digits and '_'."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name))
    return out or "class"


def score_names(name: str, class_names: Sequence[str]) -> list[str]:
    """Branch names of the scores: ``<name>_<class>`` per class."""
    return [f"{name}_{_safe(c)}" for c in class_names]


# --------------------------------------------------------------------------- alignment


def align_events(all_ids: np.ndarray, selected_ids: np.ndarray) -> np.ndarray:
    """Positions of the ``selected_ids`` rows among ``all_ids`` (both ``[N, 3]`` run, lumi, event).

    The selected events are a subsequence, in order, of all the events (the
    skim keeps file order); each is matched to its input entry by its
    (run, luminosityBlock, event). Raises :class:`DataError` when a selected
    event is not among the inputs.

    >>> import numpy as np
    >>> every = np.array([[1, 1, 5], [1, 1, 6], [1, 2, 7]])
    >>> align_events(every, every[[0, 2]]).tolist()
    [0, 2]
    """
    all_ids = np.asarray(all_ids, dtype=np.int64).reshape(-1, 3)
    selected_ids = np.asarray(selected_ids, dtype=np.int64).reshape(-1, 3)
    if len(selected_ids) == 0:
        return np.zeros(0, np.int64)
    keys_all, keys_sel = _keys(all_ids, selected_ids)
    order = np.argsort(keys_all, kind="stable")
    ordered = keys_all[order]
    index = np.minimum(np.searchsorted(ordered, keys_sel), len(ordered) - 1)
    missing = ordered[index] != keys_sel
    if missing.any():
        first = selected_ids[int(np.flatnonzero(missing)[0])].tolist()
        raise DataError(
            f"{int(missing.sum())} selected event(s) are not among the input events, e.g. "
            f"(run, luminosityBlock, event) = {tuple(first)}; the skim and the file disagree."
        )
    positions = order[index]
    duplicated = len(ordered) > 1 and bool((ordered[1:] == ordered[:-1]).any())
    if not duplicated and (len(positions) < 2 or bool((np.diff(positions) > 0).all())):
        return positions.astype(np.int64)
    log.warning(
        "the input holds events with the same (run, luminosityBlock, event); they are matched "
        "in file order"
    )
    return _greedy(keys_all, keys_sel)


def _keys(all_ids: np.ndarray, selected_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One int64 key per row that orders like the rows."""
    low = all_ids.min(axis=0)
    span = all_ids.max(axis=0) - low + 1
    bits = [int(s - 1).bit_length() for s in span]
    if sum(bits) <= 62:
        shifts = [bits[1] + bits[2], bits[2], 0]
        key_a = sum((all_ids[:, i] - low[i]) << shifts[i] for i in range(3))
        sel = selected_ids - low
        outside = ((sel < 0) | (sel >= span)).any(axis=1)
        key_s = sum(np.clip(sel[:, i], 0, span[i] - 1) << shifts[i] for i in range(3))
        key_s = np.where(outside, -1, key_s)
        return np.asarray(key_a, np.int64), np.asarray(key_s, np.int64)
    both = np.concatenate([all_ids, selected_ids])
    _, inverse = np.unique(both, axis=0, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64)
    return inverse[: len(all_ids)], inverse[len(all_ids) :]


def _greedy(keys_all: np.ndarray, keys_sel: np.ndarray) -> np.ndarray:
    out = np.empty(len(keys_sel), np.int64)
    j = 0
    for i, key in enumerate(keys_sel.tolist()):
        while keys_all[j] != key:
            j += 1
        out[i] = j
        j += 1
    return out


# --------------------------------------------------------------------------- per-file scores


@dataclass
class FileScores:
    """The scores of one input, and where its events sit in the input.

    Attributes
    ----------
    source : str
        The input (a path, ``"<array>"`` for in-memory data).
    scores : numpy.ndarray
        ``[M, C]`` float32 probabilities of the scored (selected) events.
    entry : numpy.ndarray
        ``[M]`` input entry of each scored event.
    n_input : int
        Events in the input.
    input_ids : dict of str to numpy.ndarray
        ``run``, ``luminosityBlock``, ``event`` of every input event (the input's dtypes).
    weight : numpy.ndarray
        ``[M]`` genWeight of the scored events (1 for data or when absent).
    sumw : float
        Sum of genWeight over every input event.
    extras : dict of str to numpy.ndarray
        ``label`` and ``weight`` of HDF5 inputs, carried into HDF5 and Parquet outputs.
    """

    source: str
    scores: np.ndarray
    entry: np.ndarray
    n_input: int
    input_ids: dict[str, np.ndarray]
    weight: np.ndarray
    sumw: float
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def event_id(self) -> np.ndarray:
        """``[M, 3]`` int64 run, luminosityBlock, event of the scored events."""
        if len(self.entry) == 0:
            return np.zeros((0, 3), np.int64)
        return np.stack(
            [np.asarray(self.input_ids[k])[self.entry].astype(np.int64) for k in _EVENT_ID], axis=1
        )

    def aligned(self, default: float = -1.0) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``[n_input, C]`` (``default`` where not selected) and the ``[n_input]`` flag."""
        full = np.full((self.n_input, self.scores.shape[1]), default, dtype=np.float32)
        full[self.entry] = self.scores
        selected = np.zeros(self.n_input, dtype=bool)
        selected[self.entry] = True
        return full, selected


def _columns_from_names(data: Mapping[str, Any]) -> dict[str, Any]:
    """Feature-named numpy arrays (``ht``, ``GoodJet.pt``, ``GoodJet.mask``) as Columns paths."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key.startswith(("scalars/", "objects/")) or key in ("event_id", "label", "weight"):
            out[key] = value
        elif "." in key:
            coll, name = key.split(".", 1)
            out[f"objects/{coll}/{name}"] = value
        else:
            out[f"scalars/{key}"] = value
    return out


# --------------------------------------------------------------------------- backends


class _Scorer:
    """Columns -> probabilities with the bundle's standardisation, by torch or ONNX Runtime."""

    def __init__(self, bundle: Bundle, backend: str, device: str, batch_size: int) -> None:
        self.bundle = bundle
        self.backend = backend
        self.batch_size = batch_size
        self.device = _resolve_device(device)
        self._session: Any = None
        self._net: Any = None
        if backend == "onnx":
            self._session = _onnx_session(bundle, self.device)

    def check(self, columns: Mapping[str, Any], source: str) -> None:
        """Refuse inputs that lack a feature of the bundle, naming every missing one."""
        from .dataset import available_features

        missing = [f for f in self.bundle.features if f.path not in columns]
        if not missing:
            return
        offered = list(available_features(columns))
        hints = "".join(did_you_mean(f.name, offered) for f in missing[:3])
        raise DataError(
            f"{source} lacks {len(missing)} feature(s) of the bundle {self.bundle.path}: "
            f"{', '.join(f'{f.name} ({f.path})' for f in missing)}.{hints} Features there: "
            f"{', '.join(offered) or 'none'}. Prepare the input with the bundle's selection and "
            "padding (score the NanoAOD files, or HDF5 written from the same skim)."
        )

    def __call__(self, columns: Mapping[str, Any], source: str = "the input") -> np.ndarray:
        self.check(columns, source)
        if self._session is not None:
            return self._onnx(columns)
        kwargs: dict[str, Any] = {"batch_size": self.batch_size}
        if self.device != "cpu":
            if _accepts(self.bundle.predict_proba, "device"):
                kwargs["device"] = self.device
            elif hasattr(self.bundle, "rows"):
                return self._torch_on_device(columns)
        return np.asarray(self.bundle.predict_proba(columns, **kwargs), dtype=np.float32)

    def _torch_on_device(self, columns: Mapping[str, Any]) -> np.ndarray:
        """The network on a GPU: the bundle's input rows, its probabilities (as predict_proba)."""
        import copy

        import torch

        from . import bundle as bundle_module

        if self._net is None:
            self._net = copy.deepcopy(self.bundle.model()).to(self.device).eval()
        n = len(columns[self.bundle.features[0].path])
        out = np.empty((n, len(self.bundle.class_names)), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                rows = slice(start, min(start + self.batch_size, n))
                x = torch.from_numpy(self.bundle.rows(columns, rows)).to(self.device)
                logits = self._net(x).cpu()
                out[rows] = bundle_module.probabilities(logits, out.shape[1]).numpy()
        return out

    def _onnx(self, columns: Mapping[str, Any]) -> np.ndarray:
        from .dataset import check_finite, feature_matrix

        features = self.bundle.features
        n = len(columns[features[0].path])
        out = np.empty((n, len(self.bundle.class_names)), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            rows = slice(start, min(start + self.batch_size, n))
            X, valid = feature_matrix(columns, features, rows=rows)
            check_finite(X, valid, features)
            Z = self.bundle.standardiser.transform(X, valid)
            (out[rows],) = self._session.run(["probabilities"], {"features": Z})
        return out


def _accepts(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _resolve_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("predict.device is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'.")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _file_sha256(path: str | Path) -> str:
    from .dataset import file_sha256  # imported late: it brings in lightning

    return file_sha256(path)


def _checked_onnx(bundle: Bundle) -> Path:
    """The bundle's ONNX file, checked against the sha256 in bundle.json."""
    path = Path(bundle.onnx_path)
    if not path.is_file():
        raise BundleError(
            f"model bundle {bundle.path} has no {path.name}: ONNX Runtime and CMSSW need it. "
            "Train the model again (or copy the whole directory)."
        )
    expected = (bundle.info.get("files") or {}).get(path.name)
    if expected is not None and _file_sha256(path) != expected:
        raise BundleError(
            f"{path} does not match the sha256 recorded in bundle.json: the file changed or was "
            "corrupted after saving. Copy the bundle again or retrain."
        )
    return path


def _onnx_session(bundle: Bundle, device: str) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            "predict.backend 'onnx' needs ONNX Runtime: pip install onnxruntime"
        ) from None
    path = _checked_onnx(bundle)
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise BundleError(f"{path} cannot be loaded by ONNX Runtime ({exc}).") from None


# --------------------------------------------------------------------------- the Predictor


class PredictReport(list):  # type: ignore[type-arg]
    """The output files of a prediction (a list of paths), and what happened to each input.

    Attributes
    ----------
    scored : list of str
        Inputs scored in this run.
    reused : list of str
        Inputs whose outputs were already there for the same bundle and input (not redone).
    skipped : dict of str to str
        Inputs that failed after the retries (``skip_bad_files``), with the reason.
    histograms : dict of str to hist.Hist
        Score histogram per process (and ``data_obs``), from :meth:`Predictor.predict_fileset`.
    hist_file : Path or None
        The ROOT file holding them.
    """

    def __init__(self, paths: Sequence[Path] = ()) -> None:
        super().__init__(paths)
        self.scored: list[str] = []
        self.reused: list[str] = []
        self.skipped: dict[str, str] = {}
        self.histograms: dict[str, hist.Hist] = {}
        self.hist_file: Path | None = None

    def __repr__(self) -> str:
        n_inputs = len(self.scored) + len(self.reused) + len(self.skipped)
        parts = [f"{len(self.scored)} scored"]
        if self.reused:
            parts.append(f"{len(self.reused)} already done")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped: {', '.join(self.skipped)}")
        if self.hist_file is not None:
            parts.append(f"histograms in {self.hist_file}")
        return f"PredictReport({len(self)} output(s) for {n_inputs} input(s): {', '.join(parts)})"


class Predictor:
    """Scores new events with a saved model bundle.

    Parameters
    ----------
    config
        A :class:`~cmsmlkit.config.PredictConfig`, a dict, or a YAML path.
    cluster
        Where :meth:`predict_files` and :meth:`predict_fileset` map over files
        (default: in this process).
    **fields
        Any field of ``PredictConfig`` as a keyword (``bundle``, ``inputs``,
        ``output``, ``formats``, ``backend``, ...).

    Examples
    --------
    >>> p = Predictor(bundle="model", output="scores", formats=["friend", "parquet"])
    >>> p.config.output, p.config.formats
    ('scores', ['friend', 'parquet'])
    """

    def __init__(
        self,
        config: PredictConfig | dict[str, Any] | str | Path | None = None,
        *,
        cluster: ClusterConfig | dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        self.config: PredictConfig = build_config(PredictConfig, config, fields)
        self.cluster: ClusterConfig = build_config(ClusterConfig, cluster, {})
        self._bundle: Any = None
        self._scorer: _Scorer | None = None
        self._skimmer: Any = None

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        config: PredictConfig | dict[str, Any] | None = None,
        *,
        cluster: ClusterConfig | dict[str, Any] | None = None,
        **fields: Any,
    ) -> Predictor:
        """A Predictor for the bundle directory ``path``, loaded at once so a bad bundle fails here."""
        predictor = cls(config, cluster=cluster, **{**fields, "bundle": str(path)})
        _ = predictor.scorer
        return predictor

    @property
    def bundle(self) -> Bundle:
        """The loaded :class:`~cmsmlkit.ml.bundle.Bundle`."""
        if self._bundle is None:
            from .bundle import Bundle

            self._bundle = Bundle.load(self.config.bundle)
        return self._bundle

    @property
    def scorer(self) -> _Scorer:
        if self._scorer is None:
            cfg = self.config
            self._scorer = _Scorer(self.bundle, cfg.backend, cfg.device, cfg.batch_size)
        return self._scorer

    @property
    def class_names(self) -> list[str]:
        return list(self.bundle.class_names)

    @property
    def score_names(self) -> list[str]:
        """The score branches: ``<name>_<class>`` per class."""
        return score_names(self.config.name, self.class_names)

    def __repr__(self) -> str:
        state = (
            repr(self._bundle)
            if self._bundle is not None
            else f"{self.config.bundle!r} (not loaded yet)"
        )
        return (
            f"Predictor(bundle={state}, backend={self.config.backend!r}, "
            f"formats={self.config.formats}, output={self.config.output!r})"
        )

    # ------------------------------------------------------------------ scoring

    def predict(self, data: Any, *, aligned: bool = False) -> np.ndarray:
        """Class probabilities ``[N, C]`` for ``data``.

        ``data`` is a path (NanoAOD ``.root`` or cmsmlkit ``.h5``), a list of
        paths (scores concatenated in order), a Columns mapping or open
        ``h5py.File``, a mapping of numpy arrays named by feature (``ht``,
        ``GoodJet.pt`` ``[N, L]``, optionally ``GoodJet.mask``), or an awkward
        array of skimmed events. For NanoAOD, ``N`` counts the events passing
        the bundle's selection; ``aligned=True`` gives one row per input
        event instead, ``config.default`` where the selection fails.
        """
        parts = self._scores(data)
        if aligned:
            return np.concatenate([p.aligned(self.config.default)[0] for p in parts])
        return np.concatenate([p.scores for p in parts])

    def _scores(self, data: Any) -> list[FileScores]:
        if isinstance(data, (str, Path)):
            return [self.score_file(str(data))]
        if isinstance(data, (list, tuple)):
            files = _expand([str(d) for d in data])
            if not files:
                raise InputFileError("nothing to score: the list of inputs is empty.")
            return [self.score_file(f) for f in files]
        if isinstance(data, Mapping):
            return [self._score_columns(data, "the input arrays")]
        import awkward as ak

        if isinstance(data, ak.Array):
            return [self._score_skimmed(data, "the awkward array")]
        raise TypeError(
            "Predictor.predict takes a file path, a list of paths, a mapping of numpy arrays or "
            f"an awkward array, not {type(data).__name__}."
        )

    def score_file(self, path: str, *, is_mc: bool = True) -> FileScores:
        """Score one NanoAOD or HDF5 file; the result knows where each event sits in the input."""
        if _is_hdf5(path):
            return self._score_hdf5(path)
        return self._score_nanoaod(path, is_mc=is_mc)

    def _score_columns(self, data: Mapping[str, Any], source: str) -> FileScores:
        columns = data if hasattr(data, "visit") else _columns_from_names(data)
        scores = self.scorer(columns, source)
        n = len(scores)
        if "event_id" in columns:
            ids = np.asarray(columns["event_id"][:], dtype=np.int64)
        else:
            ids = np.full((n, 3), -1, np.int64)
        extras = {k: np.asarray(columns[k][:]) for k in ("label", "weight") if k in columns}
        return FileScores(
            source=source,
            scores=scores,
            entry=np.arange(n, dtype=np.int64),
            n_input=n,
            input_ids={k: ids[:, i] for i, k in enumerate(_EVENT_ID)},
            weight=np.ones(n, np.float64),
            sumw=float(n),
            extras=extras,
        )

    def _score_hdf5(self, path: str) -> FileScores:
        from ..data.hdf5 import open_hdf5

        if not os.path.exists(path):
            raise InputFileError(f"{path}: no such file; check predict.inputs.")
        try:
            f = open_hdf5(path, "r")
        except OSError as exc:
            raise InputFileError(f"{path}: not a readable HDF5 file ({exc}).") from None
        with f:
            result = self._score_columns(f, path)
        result.source = path
        return result

    # ------------------------------------------------------------------ NanoAOD

    def _skim_config(self) -> SkimConfig:
        """The bundle's skim, reduced to what the model reads, in memory."""
        skim = self.bundle.skim_config
        if skim is None:
            raise BundleError(
                f"{self.config.bundle}: the bundle records no skim selection (it was trained on HDF5 "
                "files made outside cmsmlkit), so NanoAOD cannot be prepared identically; score HDF5 "
                "files made the same way as the training data instead."
            )
        data = dict(skim)
        data["output"] = None
        data["skip_bad_files"] = False
        data["chunksize"] = self.config.chunksize
        for key in ("keep", "drop"):
            if key in data:
                data[key] = []
        keep = self._model_collections()
        if keep:
            data["collections"] = keep
        try:
            return build_config(SkimConfig, data, {})
        except ConfigError as exc:
            raise BundleError(
                f"{self.config.bundle}: the bundle's skim configuration does not fit this cmsmlkit "
                f"({exc}); it was written by another version. Retrain, or use that version."
            ) from None

    @property
    def skimmer(self) -> Any:
        """The :class:`~cmsmlkit.data.skim.Skimmer` of the bundle's selection (in-process)."""
        if self._skimmer is None:
            from ..data.skim import Skimmer

            self._skimmer = Skimmer(self._skim_config())
        return self._skimmer

    def _model_collections(self) -> dict[str, list[str]]:
        """The collections the model reads, with the fields its padding keeps (and sorts by)."""
        used = {f.collection for f in self.bundle.features if f.collection}
        return {
            coll: list(dict.fromkeys([*spec.get("fields", []), *_sort_field(spec)]))
            for coll, spec in self.bundle.padding.items()
            if coll in used
        }

    def _score_nanoaod(self, path: str, *, is_mc: bool = True) -> FileScores:
        """Select, pad and score ``path`` chunk by chunk (:meth:`Skimmer.iterate`: one open file).

        Each chunk's event ids and weights come with the chunk (the selection
        reads them anyway), and the selection says where among them each
        selected event sits (``entries=True``).
        """
        import awkward as ak

        from ..data.skim import ENTRY

        types = _event_id_types(path)
        keep = self._model_collections()
        ids: dict[str, list[np.ndarray]] = {k: [] for k in _EVENT_ID}
        weights: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        entries: list[np.ndarray] = []
        offset = 0
        for events, records, _ in self.skimmer.iterate(path, collections=keep, entries=True):
            for k in _EVENT_ID:
                ids[k].append(ak.to_numpy(events[k]))
            weights.append(_genweight(events, is_mc))
            if len(records):
                scores.append(self._score_skimmed(records, path).scores)
                entries.append(ak.to_numpy(records[ENTRY]) + offset)
            offset += len(events)
        input_ids = {k: _joined(v, types[k]) for k, v in ids.items()}
        genweight = _joined(weights, np.float64)
        entry = _joined(entries, np.int64)
        if not len(entry):
            log.warning("%s: no event passes the bundle's selection", path)
        return FileScores(
            source=path,
            scores=np.concatenate(scores)
            if scores
            else np.zeros((0, len(self.class_names)), np.float32),
            entry=entry,
            n_input=offset,
            input_ids=input_ids,
            weight=genweight[entry],
            sumw=float(genweight.sum()),
        )

    def _score_skimmed(self, events: Any, source: str) -> FileScores:
        """Score an awkward array of skimmed events (one record per event)."""
        import awkward as ak

        n = len(events)
        features = self.bundle.features
        fields = set(ak.fields(events))
        missing = []
        for f in features:
            if f.collection is None:
                ok = f.name in fields
            else:
                ok = f.collection in fields and f.path.rsplit("/", 1)[-1] in ak.fields(
                    events[f.collection]
                )
            if not ok:
                missing.append(f.name)
        if missing:
            raise DataError(
                f"{source} lacks {len(missing)} feature(s) of the bundle {self.bundle.path}: "
                f"{', '.join(missing)}. Its fields: {', '.join(sorted(fields))}. Skim it with the "
                "bundle's selection (Predictor.predict on the NanoAOD file does that)."
            )
        if n == 0:
            scores = np.zeros((0, len(self.class_names)), np.float32)
        else:
            scores = self.scorer(self.columns(events), source)
        if set(_EVENT_ID) <= fields:
            ids = {k: ak.to_numpy(events[k]) for k in _EVENT_ID}
        else:
            ids = {k: np.full(n, -1, np.int64) for k in _EVENT_ID}
        weight = (
            ak.to_numpy(events["genWeight"]).astype(np.float64)
            if "genWeight" in fields
            else np.ones(n)
        )
        return FileScores(
            source=source,
            scores=scores,
            entry=np.arange(n, dtype=np.int64),
            n_input=n,
            input_ids=ids,
            weight=weight,
            sumw=float(weight.sum()),
        )

    def columns(self, events: Any) -> dict[str, np.ndarray]:
        """The model's input Columns of skimmed events: the bundle's scalars, padded collections.

        >>> cols = predictor.columns(skim.arrays["ttbar"])  # doctest: +SKIP
        >>> cols["objects/GoodJet/pt"].shape  # doctest: +SKIP
        (4213, 5)
        """
        from ..data.hdf5 import columns

        padding = self.bundle.padding or {}
        features = self.bundle.features
        collections = sorted({f.collection for f in features if f.collection})
        convert = ConvertConfig(
            collections={
                coll: {
                    k: padding[coll][k]
                    for k in ("max_len", "sort_by", "pad_value", "fields")
                    if k in padding.get(coll, {})
                }
                for coll in collections
            },
            # Only the scalars the model reads: a NaN in an unused variable must not stop scoring.
            scalars=[f.name for f in features if f.collection is None],
        )
        only = events[[f.name for f in features if f.collection is None] + collections]
        cols, _ = columns(
            only,
            convert,
            max_lens={c: int(padding[c]["max_len"]) for c in collections if c in padding},
        )
        return cols

    # ------------------------------------------------------------------ files

    def predict_files(
        self, inputs: Sequence[str] | None = None, output: str | Path | None = None
    ) -> PredictReport:
        """Score every input file and write the configured formats for each.

        Outputs are ``<output>/<input stem><suffix>`` (``.h5``, ``.parquet``,
        ``.friend.root``, ``.root``), each written atomically. An input whose
        outputs exist for the same bundle and the same input file is not
        scored again (``rerun: true`` forces it). Files are mapped over the
        ``cluster`` with a progress bar; a failing file is retried
        ``retries`` times, then stops the run or, with ``skip_bad_files``,
        is listed in the report's ``skipped``.

        Returns
        -------
        PredictReport
            The output paths (a list), and ``scored``/``reused``/``skipped``.
        """
        files = _expand(list(inputs if inputs is not None else self.config.inputs))
        if not files:
            raise ConfigError("predict.inputs is empty: list the NanoAOD or HDF5 files to score.")
        if not self.config.formats:
            raise ConfigError(
                "predict.formats is empty: choose at least one of hdf5, parquet, friend, nanoaod."
            )
        out_dir = Path(output if output is not None else self.config.output)
        stems = [_stem(f) for f in files]
        if len(set(stems)) != len(stems):
            dupes = sorted({s for s in stems if stems.count(s) > 1})
            raise ConfigError(
                f"predict.inputs: several inputs are named {dupes}; their outputs would overwrite each "
                "other. Score them into different output directories."
            )
        jobs = [_Job(_abs(path), _abs(out_dir), _stem(path), "", {"is_mc": True}) for path in files]
        report, _ = self._run(jobs)
        return report

    def predict_fileset(self, fileset: Any, output: str | Path | None = None) -> PredictReport:
        """Score every file of a fileset and histogram the score per dataset.

        ``fileset`` is coffea's form (``{dataset: {"files": {path: "Events"},
        "metadata": {...}}}``), ``{dataset: [files]}``, or a
        :class:`~cmsmlkit.data.source.NanoAODSource`. Each file's outputs go to
        ``<output>/<dataset>/``. The histograms of the score of
        ``hist_class`` (genWeight applied; scaled to ``xsec * lumi / sumw``
        when the dataset has an ``xsec`` and ``lumi`` is set; data, with
        ``is_mc: false``, summed unweighted into ``data_obs``) go to
        ``<output>/histograms.root`` as ``<process>`` or
        ``<channel>/<process>`` TH1s that Combine reads; a dataset's process
        is its metadata ``process``, else its name.
        """
        fileset = _normalise_fileset(fileset)
        out_dir = Path(output if output is not None else self.config.output)
        jobs: list[_Job] = []
        for dataset, entry in fileset.items():
            meta = {"is_mc": True, **entry["metadata"]}
            stems = [_stem(p) for p in entry["files"]]
            for path, stem in zip(entry["files"], stems, strict=True):
                if stems.count(stem) > 1:
                    stem = f"{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"
                jobs.append(_Job(_abs(path), _abs(out_dir / dataset), stem, dataset, meta))
        report, summaries = self._run(jobs, histograms=True)
        report.histograms = self._histograms(fileset, summaries)
        report.hist_file = _write_histograms(
            report.histograms, out_dir / "histograms.root", self.config.channel
        )
        return report

    def _hist_class(self) -> int:
        name = self.config.hist_class
        if name is None:
            return 0
        if name not in self.class_names:
            raise ConfigError(
                f"predict.hist_class '{name}' is not a class of the bundle "
                f"({', '.join(self.class_names)}).{did_you_mean(name, self.class_names)}"
            )
        return self.class_names.index(name)

    def _run(
        self, jobs: list[_Job], histograms: bool = False
    ) -> tuple[PredictReport, list[dict[str, Any]]]:
        from tqdm.auto import tqdm

        _ = self.scorer  # a bad bundle fails here, before any file
        if histograms:
            self._hist_class()
        if "nanoaod" in self.config.formats:
            for job in jobs:
                if _is_hdf5(job.path):
                    raise ConfigError(
                        f"predict.formats has 'nanoaod' (a copy of the input ROOT file with the "
                        f"scores), but {job.path} is HDF5; use hdf5, parquet or friend for it."
                    )
                target = job.out_dir / f"{job.stem}.root"
                if "://" not in job.path and target.resolve() == Path(job.path).resolve():
                    raise ConfigError(
                        f"predict.output: the NanoAOD copy of {job.path} would overwrite the input; "
                        "choose another output directory."
                    )
        state = self._state()
        results: dict[int, dict[str, Any]] = {}
        todo: list[int] = []
        for i, job in enumerate(jobs):
            job.key = _job_key({**state, "histograms": histograms}, job)
            done = None if self.config.rerun else _finished(job)
            if done is not None:
                results[i] = {**done, "status": "reused"}
            else:
                todo.append(i)
        payload = self.config.model_dump(mode="json")
        payload["bundle"] = str(_abs(self.config.bundle))
        show = None if len(todo) > 1 else True
        with dask_client(self.cluster if len(todo) > 1 else None) as client:
            if client is None:
                for i in tqdm(todo, desc="predict", unit="file", disable=show):
                    results[i] = _predict_job(payload, jobs[i], histograms, predictor=self)
            else:
                from distributed import as_completed

                futures = {
                    client.submit(_predict_job, payload, jobs[i], histograms, pure=False): i
                    for i in todo
                }
                bar = tqdm(total=len(futures), desc="predict", unit="file")
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                finally:
                    bar.close()
                    for future in futures:
                        future.cancel()
        report = PredictReport()
        summaries = []
        for i, job in enumerate(jobs):
            summary = results[i]
            summaries.append(summary)
            if summary["status"] == "failed":
                report.skipped[job.path] = summary["error"]
                continue
            report.extend(Path(p) for p in summary["outputs"])
            (report.reused if summary["status"] == "reused" else report.scored).append(job.path)
        if report.skipped:
            log.warning(
                "predict: %d file(s) skipped after %d retries: %s",
                len(report.skipped),
                self.config.retries,
                "; ".join(f"{k}: {v}" for k, v in report.skipped.items()),
            )
        return report, summaries

    def _state(self) -> dict[str, Any]:
        """What the outputs depend on besides the input: the bundle and the output settings."""
        cfg = self.config
        return {
            "bundle": _file_sha256(Path(self.bundle.path) / "bundle.json"),
            "formats": list(cfg.formats),
            "name": cfg.name,
            "default": cfg.default,
            "backend": cfg.backend,
            "hist": [cfg.hist_bins, list(cfg.hist_range), self._hist_class()],
        }

    def _process_file(self, job: _Job, histograms: bool) -> dict[str, Any]:
        """Score one file, write its outputs and its done-marker; return its summary."""
        result = self.score_file(job.path, is_mc=bool(job.metadata.get("is_mc", True)))
        job.out_dir.mkdir(parents=True, exist_ok=True)
        outputs = []
        for fmt in self.config.formats:
            target = job.out_dir / f"{job.stem}{_SUFFIX[fmt]}"
            _WRITERS[fmt](self, target, result)
            outputs.append(str(target))
        summary: dict[str, Any] = {
            "source": job.path,
            "status": "scored",
            "outputs": outputs,
            "n_input": result.n_input,
            "n_selected": len(result.scores),
            "sumw": result.sumw,
        }
        if histograms:
            h = self._fill(result)
            variances = h.variances()
            assert variances is not None  # Weight storage
            summary["hist"] = {"values": h.values().tolist(), "variances": variances.tolist()}
        _write_json(_marker(job), {**summary, "key": job.key})
        log.info("%s: %d of %d events scored", job.path, len(result.scores), result.n_input)
        return summary

    # ------------------------------------------------------------------ histograms

    def _empty_hist(self) -> hist.Hist:
        import hist

        lo, hi = self.config.hist_range
        label = f"{self.config.name}_{_safe(self.class_names[self._hist_class()])}"
        return hist.Hist(
            hist.axis.Regular(self.config.hist_bins, lo, hi, name="score", label=label),
            storage=hist.storage.Weight(),
        )

    def _fill(self, result: FileScores) -> hist.Hist:
        h = self._empty_hist()
        lo, hi = self.config.hist_range
        values = result.scores[:, self._hist_class()].astype(np.float64)
        # scores on or beyond the edges count in the first and last bins (Combine has no flow)
        h.fill(score=np.clip(values, lo, np.nextafter(hi, lo)), weight=result.weight)
        return h

    def _histograms(
        self, fileset: dict[str, dict[str, Any]], summaries: list[dict[str, Any]]
    ) -> dict[str, hist.Hist]:
        by_dataset: dict[str, list[dict[str, Any]]] = {}
        for job_summary in summaries:
            by_dataset.setdefault(job_summary.get("dataset", ""), []).append(job_summary)
        out: dict[str, hist.Hist] = {}
        for dataset, entry in fileset.items():
            meta = entry["metadata"]
            parts = [s for s in by_dataset.get(dataset, []) if s["status"] != "failed"]
            h = self._empty_hist()
            view: Any = h.view()
            sumw = 0.0
            for part in parts:
                view["value"] += np.asarray(part["hist"]["values"])
                view["variance"] += np.asarray(part["hist"]["variances"])
                sumw += float(part["sumw"])
            is_mc = bool(meta.get("is_mc", True))
            xsec = meta.get("xsec")
            if is_mc and xsec is not None and self.config.lumi is not None and sumw > 0:
                scale = float(xsec) * self.config.lumi / sumw
                view["value"] *= scale
                view["variance"] *= scale**2
            process = "data_obs" if not is_mc else str(meta.get("process") or dataset)
            if process in out:
                out[process] += h
            else:
                out[process] = h
        return out

    # ------------------------------------------------------------------ deployment

    def export_cmssw(self, directory: str | Path) -> Path:
        """Write ``model.onnx`` and ``preprocessing.json`` for CMSSW to ``directory``; see :func:`export_cmssw`."""
        return export_cmssw(self.bundle, directory)


# --------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    path: str
    out_dir: Path
    stem: str
    dataset: str
    metadata: dict[str, Any]
    key: str = ""


def _abs(path: str | Path) -> Any:
    """A local path made absolute (workers may start elsewhere); a URL as it is."""
    if isinstance(path, str) and "://" in path:
        return path
    return type(path)(os.path.abspath(path)) if isinstance(path, Path) else os.path.abspath(path)


def _marker(job: _Job) -> Path:
    return job.out_dir / _DONE_DIR / f"{job.stem}.json"


def _input_identity(path: str) -> dict[str, Any]:
    if "://" in path:
        return {"url": path}
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _job_key(state: dict[str, Any], job: _Job) -> str:
    data = {**state, "input": _input_identity(job.path), "is_mc": job.metadata.get("is_mc", True)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _finished(job: _Job) -> dict[str, Any] | None:
    """The summary of an earlier run of ``job`` when its outputs are there for the same key."""
    marker = _marker(job)
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if done.get("key") != job.key or not all(Path(p).is_file() for p in done.get("outputs", [])):
        return None
    return {**done, "dataset": job.dataset}


@functools.lru_cache(maxsize=4)
def _worker_predictor(payload: str) -> Predictor:
    return Predictor(json.loads(payload))


def _predict_job(
    config: dict[str, Any], job: _Job, histograms: bool, predictor: Predictor | None = None
) -> dict[str, Any]:
    """Score one file with retries (run in this process or on a dask worker)."""
    if predictor is None:
        predictor = _worker_predictor(json.dumps(config, sort_keys=True))
    retries = int(config.get("retries", 0))
    for attempt in range(retries + 1):
        try:
            summary = predictor._process_file(job, histograms)
            return {**summary, "dataset": job.dataset}
        except OSError as exc:  # InputFileError too: the file, not the configuration
            reason = f"{type(exc).__name__}: {exc}"
            # a missing branch stays missing; a read may fail once (network, busy disk)
            if attempt < retries and not isinstance(exc, MissingBranchError):
                log.warning(
                    "%s failed (attempt %d of %d), retrying: %s",
                    job.path,
                    attempt + 1,
                    retries + 1,
                    reason,
                )
                continue
            if not config.get("skip_bad_files", False):
                raise
            log.warning("skipping %s after %d attempt(s): %s", job.path, attempt + 1, reason)
            return {"source": job.path, "status": "failed", "error": reason, "dataset": job.dataset}
    raise AssertionError("unreachable")  # pragma: no cover


def _normalise_fileset(fileset: Any) -> dict[str, dict[str, Any]]:
    """``{dataset: {"files": [paths], "metadata": {...}}}`` from the forms a fileset takes."""
    out = normalise_fileset(fileset)
    for dataset, entry in out.items():
        files = _expand(list(entry["files"]))
        if not files:
            raise ConfigError(f"fileset['{dataset}'] has no files.")
        entry["files"] = files
    return out


# --------------------------------------------------------------------------- reading ids


def _event_id_types(path: str) -> dict[str, Any]:
    """The dtypes of run, luminosityBlock and event in ``path``; refuse a file that lacks one.

    Without them the scores could not be aligned with the input events.
    """
    import uproot

    try:
        with uproot.open(path) as file:
            tree = file["Events"]
            names = set(tree.keys())
            missing = [k for k in _EVENT_ID if k not in names]
            if missing:
                raise MissingBranchError(
                    f"{path}:Events has no {', '.join(missing)}; the scores cannot be aligned "
                    "with the input events without them."
                )
            return {k: np.dtype(tree[k].interpretation.to_dtype) for k in _EVENT_ID}
    except MissingBranchError:
        raise
    except Exception:  # a missing or broken file: the Skimmer's check says what is wrong
        return {k: np.dtype(np.int64) for k in _EVENT_ID}


def _genweight(events: Any, is_mc: bool) -> np.ndarray:
    """genWeight per event of a chunk (1 for collision data, or where the branch is absent)."""
    import awkward as ak

    if is_mc and "genWeight" in getattr(events, "fields", []):
        return ak.to_numpy(events["genWeight"]).astype(np.float64)
    return np.ones(len(events), dtype=np.float64)


def _joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _sort_field(spec: Mapping[str, Any]) -> list[str]:
    sort_by = spec.get("sort_by")
    return [sort_by] if sort_by else []


# --------------------------------------------------------------------------- writers


@contextlib.contextmanager
def _atomic(target: Path):  # type: ignore[no-untyped-def]
    """Yield a temporary path beside ``target``; rename it to ``target`` when the block succeeds."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_json(target: Path, data: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(target) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def _attrs(predictor: Predictor, result: FileScores) -> dict[str, Any]:
    from .. import __version__

    return {
        "cmsmlkit_version": __version__,
        "bundle": str(Path(predictor.config.bundle).resolve()),
        "source": result.source,
        "class_names": json.dumps(predictor.class_names),
        "n_events": len(result.scores),
        "n_input": result.n_input,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_hdf5(predictor: Predictor, target: Path, result: FileScores) -> None:
    import h5py

    with _atomic(target) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("scores", data=result.scores.astype(np.float32))
        ds.attrs["class_names"] = predictor.class_names
        ds.attrs["names"] = predictor.score_names
        f.create_dataset("event_id", data=result.event_id)
        f.create_dataset("entry", data=result.entry)
        for key, values in result.extras.items():
            f.create_dataset(key, data=values)
        attrs = _attrs(predictor, result)
        attrs["class_names"] = predictor.class_names
        f.attrs.update(attrs)


def _write_parquet(predictor: Predictor, target: Path, result: FileScores) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(
            "predict.formats 'parquet' needs pyarrow: pip install pyarrow"
        ) from None
    ids = result.event_id
    table: dict[str, Any] = {k: ids[:, i] for i, k in enumerate(_EVENT_ID)}
    table["entry"] = result.entry
    for i, name in enumerate(predictor.score_names):
        table[name] = result.scores[:, i]
    table["genWeight"] = np.asarray(result.weight, np.float64)
    table.update(result.extras)
    meta = {k: str(v) for k, v in _attrs(predictor, result).items()}
    arrow = pa.table(table).replace_schema_metadata(meta)
    with _atomic(target) as tmp:
        pq.write_table(arrow, tmp)


def _write_friend(predictor: Predictor, target: Path, result: FileScores) -> None:
    import uproot

    full, selected = result.aligned(predictor.config.default)
    branches: dict[str, np.ndarray] = {k: np.asarray(result.input_ids[k]) for k in _EVENT_ID}
    for i, name in enumerate(predictor.score_names):
        branches[name] = np.ascontiguousarray(full[:, i])
    branches[f"{predictor.config.name}_selected"] = selected
    with _atomic(target) as tmp, uproot.recreate(tmp, compression=_codec(predictor)) as file:
        tree = file.mktree(
            FRIEND_TREE,
            {k: v.dtype for k, v in branches.items()},
            title=f"cmsmlkit scores of {result.source}",
        )
        for start in range(0, result.n_input, _STEP):
            tree.extend({k: v[start : start + _STEP] for k, v in branches.items()})


def _codec(predictor: Predictor) -> Any:
    """uproot's compression for the ROOT outputs (``predict.compression``)."""
    import uproot

    return {"lz4": uproot.LZ4(1), "zlib": uproot.ZLIB(1), "lzma": uproot.LZMA(1)}[
        predictor.config.compression
    ]


def _write_nanoaod(predictor: Predictor, target: Path, result: FileScores) -> None:
    import uproot

    full, selected = result.aligned(predictor.config.default)
    extra = {name: full[:, i] for i, name in enumerate(predictor.score_names)}
    extra[f"{predictor.config.name}_selected"] = selected
    with (
        _atomic(target) as tmp,
        uproot.open(result.source) as source,
        uproot.recreate(tmp, compression=_codec(predictor)) as out,
    ):
        for name, classname in source.classnames(cycle=False, recursive=False).items():
            if classname != "TTree":
                continue
            _copy_tree(source[name], out, name, extra if name == "Events" else None)


def _copy_tree(tree: Any, out: Any, name: str, extra: dict[str, np.ndarray] | None) -> None:
    """Copy ``tree`` to ``out[name]``, collections kept as ``nX`` + ``X_field``, plus ``extra``."""
    import awkward as ak

    counters: dict[str, str] = {}  # jagged branch -> its counter
    for branch in tree.branches:
        count = getattr(branch, "count_branch", None)
        if count is not None:
            counters[branch.name] = count.name
    groups: dict[str, list[str]] = {}
    plain: list[str] = []
    for branch in tree.keys(recursive=False):
        if branch in counters.values() and branch not in counters:
            continue  # a counter: uproot writes it again with its collection
        count = counters.get(branch)
        prefix = branch.split("_", 1)[0]
        if count is not None and "_" in branch and count == f"n{prefix}":
            groups.setdefault(prefix, []).append(branch)
        else:
            plain.append(branch)
    if extra is not None:
        clash = sorted(set(extra) & set(tree.keys(recursive=False)))
        if clash:
            raise ConfigError(
                f"{tree.file.file_path}: the tree already has the branch(es) {', '.join(clash)}; "
                "set predict.name to another prefix."
            )
    created = None
    n = tree.num_entries
    for start in range(0, max(n, 1), _STEP):
        stop = min(start + _STEP, n)
        arrays = tree.arrays(
            [*plain, *(b for bs in groups.values() for b in bs)],
            entry_start=start,
            entry_stop=stop,
            how=dict,
        )
        chunk: dict[str, Any] = {b: arrays[b] for b in plain}
        for prefix, branches in groups.items():
            chunk[prefix] = ak.zip({b[len(prefix) + 1 :]: arrays[b] for b in branches})
        if extra is not None:
            chunk.update({k: v[start:stop] for k, v in extra.items()})
        if created is None:
            created = out.mktree(name, {k: _branch_type(v) for k, v in chunk.items()})
        if stop > start:
            created.extend(chunk)


def _branch_type(value: Any) -> Any:
    import awkward as ak

    if isinstance(value, np.ndarray):
        return value.dtype
    if value.ndim == 1 and not ak.fields(value):
        return ak.to_numpy(value).dtype
    return value.type


_WRITERS = {
    "hdf5": _write_hdf5,
    "parquet": _write_parquet,
    "friend": _write_friend,
    "nanoaod": _write_nanoaod,
}


def _write_histograms(
    histograms: Mapping[str, hist.Hist], target: Path, channel: str | None
) -> Path:
    """One TH1 per process (``<channel>/<process>`` or ``<process>``), written atomically."""
    import uproot

    target.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(target) as tmp, uproot.recreate(tmp) as file:
        for process, h in histograms.items():
            file[f"{channel}/{process}" if channel else process] = h
    return target


# --------------------------------------------------------------------------- coffea


@functools.lru_cache(maxsize=4)
def _cached_predictor(bundle: str, backend: str, batch_size: int) -> Predictor:
    return Predictor.from_bundle(bundle, backend=backend, batch_size=batch_size, device="cpu")


def add_scores(
    events: Any,
    bundle: str | Path | Predictor,
    *,
    name: str = "score",
    default: float = -1.0,
    backend: str = "torch",
    batch_size: int = 65536,
) -> Any:
    """Add the bundle's scores to the events of a coffea processor, with its preprocessing.

    The bundle's selection (objects, cuts, variables) and padding are applied
    to ``events`` (coffea NanoEvents of one chunk); every event gets
    ``<name>_<class>`` per class (``default`` where the selection fails) and
    ``<name>_selected``. The bundle is loaded once per worker process.

    Parameters
    ----------
    events
        NanoEvents (or any awkward array with the NanoAOD collections the
        selection names, and ``run``, ``luminosityBlock``, ``event``).
    bundle
        The bundle directory, or a :class:`Predictor`.

    Returns
    -------
    The events with the new fields.

    Examples
    --------
    >>> class MyAnalysis(processor.ProcessorABC):  # doctest: +SKIP
    ...     def process(self, events):
    ...         events = add_scores(events, "model")
    ...         signal_like = events[events.score_signal > 0.8]
    ...         ...
    """
    import awkward as ak

    predictor = (
        bundle
        if isinstance(bundle, Predictor)
        else _cached_predictor(str(Path(bundle).resolve()), backend, batch_size)
    )
    n = len(events)
    records = _select_events(predictor, events)
    full = np.full((n, len(predictor.class_names)), default, dtype=np.float32)
    selected = np.zeros(n, dtype=bool)
    if len(records):
        scores = predictor._score_skimmed(records, "the events").scores
        all_ids = np.stack([ak.to_numpy(events[k]) for k in _EVENT_ID], axis=1)
        picked = np.stack([ak.to_numpy(records[k]) for k in _EVENT_ID], axis=1)
        entry = align_events(all_ids, picked)
        full[entry] = scores
        selected[entry] = True
    for i, column in enumerate(score_names(name, predictor.class_names)):
        events[column] = full[:, i]
    events[f"{name}_selected"] = selected
    return events


def _select_events(predictor: Predictor, events: Any) -> Any:
    """The bundle's selection applied to one chunk of NanoEvents: the selected skimmed records."""
    records, _ = predictor.skimmer.select(events, collections=predictor._model_collections())
    return records


# --------------------------------------------------------------------------- CMSSW


def export_cmssw(bundle: str | Path | Bundle, directory: str | Path) -> Path:
    """Write what a CMSSW ONNXRuntime producer needs to ``directory`` and return it.

    ``model.onnx`` (input ``features`` ``[batch, n_inputs]`` float32, output
    ``probabilities`` ``[batch, n_classes]``) and ``preprocessing.json``: the
    input layout (features in order, object fields slot by slot, objects
    sorted by ``sort_by`` descending and cut at ``max_len``), the mean and
    standard deviation of each feature (``x -> (x - mean) / std`` for a real
    entry, ``0`` for an empty slot), the class names and the selection the
    model was trained after. See docs/deploy-cmssw.md.

    Examples
    --------
    >>> export_cmssw("model", "cmssw/data")  # doctest: +SKIP
    PosixPath('cmssw/data')
    """
    from .bundle import Bundle as _Bundle

    if not isinstance(bundle, _Bundle):
        bundle = _Bundle.load(bundle)
    onnx_path = _checked_onnx(bundle)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    std = bundle.standardiser
    by_name = {n: i for i, n in enumerate(std.names)}
    features = []
    offset = 0
    for spec in bundle.features:
        i = by_name[spec.name]
        entry: dict[str, Any] = {
            "name": spec.name,
            "kind": "object" if spec.collection else "scalar",
            "offset": offset,
            "length": spec.length,
            "mean": float(std.mean[i]),
            "std": float(std.std[i]),
        }
        if spec.collection:
            entry["collection"] = spec.collection
            entry["field"] = spec.path.rsplit("/", 1)[-1]
        features.append(entry)
        offset += spec.length
    padding = {
        coll: {
            "max_len": int(spec["max_len"]),
            "sort_by": spec.get("sort_by"),
            "descending": True,
            "pad_value": float(spec.get("pad_value", 0.0)),
        }
        for coll, spec in bundle.padding.items()
        if any(f.collection == coll for f in bundle.features)
    }
    layout = [
        f["name"] if f["kind"] == "scalar" else f"{f['name']}[{j}]"
        for f in features
        for j in range(f["length"])
    ]
    skim = bundle.skim_config or {}
    info = {
        "format": "cmsmlkit-cmssw",
        "format_version": CMSSW_FORMAT_VERSION,
        "model": "model.onnx",
        "model_sha256": _file_sha256(onnx_path),
        "input_name": "features",
        "output_name": "probabilities",
        "n_inputs": offset,
        "class_names": list(bundle.class_names),
        "features": features,
        "padding": padding,
        "empty_slot_value": 0.0,
        "input_layout": layout,
        "selection": skim.get("selection"),
        "bundle": str(Path(bundle.path).resolve()),
    }
    with _atomic(directory / "model.onnx") as tmp:
        shutil.copyfile(onnx_path, tmp)
    _write_json(directory / "preprocessing.json", info)
    return directory
