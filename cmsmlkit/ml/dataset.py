"""From the HDF5 contract to the network's input rows.

A feature is a scalar (``ht``) or an object field (``GoodJet.pt``, ``L`` slots).
The input row of an event is every feature in order, object fields flattened
slot by slot. Each feature is standardised with one mean and standard
deviation computed on the training split over real (unmasked) entries only;
padded slots are 0 after standardisation, so they carry no information.

The same functions serve an open ``h5py.File`` and an in-memory Columns
mapping (``{"scalars/ht": array, "objects/GoodJet/pt": array, ...}``).

>>> import numpy as np
>>> cols = {"scalars/ht": np.array([100.0, 300.0], dtype=np.float32)}
>>> feats = resolve_features(["*"], cols)
>>> [f.name for f in feats]
['ht']
>>> X, valid = feature_matrix(cols, feats)
>>> Standardiser.fit(X, valid, feats).transform(X, valid).ravel().tolist()
[-1.0, 1.0]
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, InputFileError, did_you_mean

__all__ = [
    "FeatureSpec",
    "Standardiser",
    "InputData",
    "available_features",
    "resolve_features",
    "feature_matrix",
    "check_finite",
    "split_indices",
    "expand_inputs",
    "load_inputs",
]


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature: its name, where it lives in the HDF5 contract, and its width.

    ``length`` is 1 for a scalar and the padded length ``L`` for an object field.
    """

    name: str
    path: str
    length: int = 1
    collection: str | None = None

    @property
    def mask_path(self) -> str | None:
        """The mask dataset of an object field's collection; None for a scalar."""
        return f"objects/{self.collection}/mask" if self.collection else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "length": self.length,
            "collection": self.collection,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        return cls(
            name=str(data["name"]),
            path=str(data["path"]),
            length=int(data.get("length", 1)),
            collection=data.get("collection"),
        )


def _keys(columns: Mapping[str, Any], group: str) -> list[str]:
    """Names directly under ``group`` in a flat Columns mapping or an h5py file."""
    try:
        node = columns[group]
    except (KeyError, ValueError):
        node = None
    if node is not None and hasattr(node, "keys"):
        return list(node.keys())
    prefix = group + "/"
    names: list[str] = []
    for key in columns:
        if key.startswith(prefix):
            name = key[len(prefix) :].split("/")[0]
            if name not in names:
                names.append(name)
    return names


def available_features(columns: Mapping[str, Any]) -> dict[str, FeatureSpec]:
    """Every feature the data offers, in file order: scalars first, then object fields."""
    found: dict[str, FeatureSpec] = {}
    for name in _keys(columns, "scalars"):
        found[name] = FeatureSpec(name=name, path=f"scalars/{name}")
    for coll in _keys(columns, "objects"):
        for fname in _keys(columns, f"objects/{coll}"):
            if fname == "mask":
                continue
            path = f"objects/{coll}/{fname}"
            shape = columns[path].shape
            length = int(shape[1]) if len(shape) > 1 else 1
            found[f"{coll}.{fname}"] = FeatureSpec(
                name=f"{coll}.{fname}", path=path, length=length, collection=coll
            )
    return found


def resolve_features(
    patterns: Sequence[str], columns: Mapping[str, Any], *, source: str = "the input data"
) -> list[FeatureSpec]:
    """The features named by ``patterns`` (names or wildcards such as ``GoodJet.*``), in order.

    A pattern that matches nothing is an error that lists close matches.
    """
    available = available_features(columns)
    if not available:
        raise DataError(
            f"{source} holds no /scalars or /objects datasets: is it a cmsmlkit HDF5 file?"
        )
    chosen: list[FeatureSpec] = []
    for pattern in patterns:
        matches = [spec for name, spec in available.items() if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ConfigError(
                f"train.features: '{pattern}' matches no feature of {source}."
                f"{did_you_mean(pattern, available)} Features there: {', '.join(available)}."
            )
        chosen.extend(spec for spec in matches if spec not in chosen)
    return chosen


def feature_matrix(
    columns: Mapping[str, Any],
    features: Sequence[FeatureSpec],
    rows: slice | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The raw input rows ``X`` [N, D] float32 and where they hold real values ``valid`` [N, D].

    ``rows`` selects events (a slice, or increasing indices for an h5py file).
    """
    index: Any = slice(None) if rows is None else rows
    blocks: list[np.ndarray] = []
    valid_blocks: list[np.ndarray] = []
    masks: dict[str, np.ndarray] = {}
    for spec in features:
        if spec.path not in columns:
            raise DataError(f"feature '{spec.name}' ({spec.path}) is not in the input data.")
        values = np.asarray(columns[spec.path][index], dtype=np.float32)
        if spec.collection is None:
            values = values.reshape(-1, 1)
            valid = np.ones(values.shape, dtype=bool)
        else:
            if spec.collection not in masks:
                mask_path = spec.mask_path or ""
                masks[spec.collection] = (
                    np.asarray(columns[mask_path][index], dtype=bool)
                    if mask_path in columns
                    else np.ones(values.shape, dtype=bool)
                )
            valid = masks[spec.collection]
            if values.shape[1] != spec.length:
                raise DataError(
                    f"feature '{spec.name}' has {values.shape[1]} slots in the input data but the model "
                    f"expects {spec.length}; pad the data with the model's padding."
                )
        blocks.append(values)
        valid_blocks.append(valid)
    if not blocks:
        raise ConfigError("no features selected: train.features is empty.")
    return np.concatenate(blocks, axis=1), np.concatenate(valid_blocks, axis=1)


def check_finite(
    X: np.ndarray,
    valid: np.ndarray,
    features: Sequence[FeatureSpec],
    *,
    source: str = "the input data",
) -> None:
    """Raise :class:`DataError` naming each feature that holds NaN or infinity in a real entry."""
    bad = ~np.isfinite(X) & valid
    if not bad.any():
        return
    problems = []
    start = 0
    for spec in features:
        n = int(bad[:, start : start + spec.length].any(axis=1).sum())
        if n:
            problems.append(f"'{spec.name}' in {n} events")
        start += spec.length
    raise DataError(
        f"{source} has NaN or infinite values: {', '.join(problems)}. Fix the variable's expression "
        "(e.g. guard a division or a log) or drop the feature from train.features."
    )


class Standardiser:
    """One mean and standard deviation per feature, over real entries only; padded slots become 0.

    >>> import numpy as np
    >>> spec = FeatureSpec("ht", "scalars/ht")
    >>> s = Standardiser.fit(np.array([[1.0], [3.0]], np.float32), np.ones((2, 1), bool), [spec])
    >>> s.mean.tolist(), s.std.tolist()
    ([2.0], [1.0])
    """

    def __init__(self, names: Sequence[str], lengths: Sequence[int], mean: Any, std: Any) -> None:
        self.names = list(names)
        self.lengths = [int(n) for n in lengths]
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if not (len(self.names) == len(self.lengths) == len(self.mean) == len(self.std)):
            raise DataError("standardisation: names, lengths, mean and std differ in length.")

    @classmethod
    def fit(cls, X: np.ndarray, valid: np.ndarray, features: Sequence[FeatureSpec]) -> Standardiser:
        """Compute mean and std of each feature over the real entries of ``X``."""
        means, stds = [], []
        start = 0
        for spec in features:
            block = X[:, start : start + spec.length][valid[:, start : start + spec.length]]
            block = block.astype(np.float64)
            mean = float(block.mean()) if block.size else 0.0
            std = float(block.std()) if block.size else 1.0
            means.append(mean)
            stds.append(std if std > 1e-12 else 1.0)
            start += spec.length
        return cls([f.name for f in features], [f.length for f in features], means, stds)

    def _expanded(self) -> tuple[np.ndarray, np.ndarray]:
        return np.repeat(self.mean, self.lengths), np.repeat(self.std, self.lengths)

    @property
    def n_inputs(self) -> int:
        return int(sum(self.lengths))

    def transform(self, X: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Standardised float32 rows; padded (invalid) slots set to 0."""
        if X.shape[1] != self.n_inputs:
            raise DataError(
                f"input rows have {X.shape[1]} columns, the standardisation expects {self.n_inputs}."
            )
        mean, std = self._expanded()
        out = ((X - mean) / std).astype(np.float32)
        out[~valid] = 0.0
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": self.names,
            "lengths": self.lengths,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Standardiser:
        return cls(data["features"], data["lengths"], data["mean"], data["std"])

    def __repr__(self) -> str:
        return f"Standardiser({len(self.names)} features, {self.n_inputs} inputs)"


# --------------------------------------------------------------------------- splits


def split_indices(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Split events into training, validation and test sets, stratified per class.

    Each class is shuffled with a generator seeded by ``seed`` and cut into the
    three fractions (at least one event per class in every split), so every
    split holds the classes in the proportions of the whole sample.

    Parameters
    ----------
    labels : numpy.ndarray
        ``[N]`` integer class index of each event.
    val_fraction, test_fraction : float
        Fractions of each class for validation and test; the rest trains.
    seed : int
        Seed of the shuffle: the same seed gives the same split.

    Returns
    -------
    dict of str to numpy.ndarray
        ``{"train": idx, "val": idx, "test": idx}``, each sorted ascending, disjoint,
        together covering every event.

    Raises
    ------
    DataError
        A class has too few events to put one in every split.

    Examples
    --------
    >>> import numpy as np
    >>> parts = split_indices(np.array([0] * 10 + [1] * 10), 0.2, 0.2, seed=1)
    >>> [len(parts[k]) for k in ("train", "val", "test")]
    [12, 4, 4]
    """
    labels = np.asarray(labels)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction = {val_fraction:g} and test_fraction = {test_fraction:g} must each lie in "
            "(0, 1) and leave events for training."
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = len(members)
        n_val = max(1, int(round(n * val_fraction)))
        n_test = max(1, int(round(n * test_fraction)))
        if n - n_val - n_test < 1:
            raise DataError(
                f"class {int(cls)} has only {n} events: too few for a training, a validation and a "
                "test split (at least 3 are needed, many more to learn anything); add events of "
                "this class or drop it."
            )
        members = rng.permutation(members)
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {
        key: np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.int64)
        for key, chunks in parts.items()
    }


# --------------------------------------------------------------------------- HDF5 inputs


@dataclass
class InputData:
    """The events of one or more cmsmlkit HDF5 files, as the Trainer needs them.

    Attributes
    ----------
    X : numpy.ndarray
        ``[N, D]`` float32 raw input rows (:func:`feature_matrix` order).
    valid : numpy.ndarray
        ``[N, D]`` bool, True where ``X`` holds a real (not padded) value.
    labels : numpy.ndarray
        ``[N]`` int64 class index.
    weights : numpy.ndarray
        ``[N]`` float32 event weight (``/weight``).
    event_id : numpy.ndarray
        ``[N, 3]`` int64 run, luminosityBlock, event.
    features : list of FeatureSpec
        The input features, in column order.
    class_names : list of str
        Class name of each label index.
    padding : dict
        The padding of the object collections (root attribute ``padding``).
    skim_config, convert_config : dict or None
        The Skimmer's and HDF5Writer's configurations, when recorded.
    provenance : dict
        ``{"inputs": [{"path", "sha256", "n_events"}, ...]}``.

    Examples
    --------
    >>> data = load_inputs(["data.h5"], ["ht", "GoodJet.*"])  # doctest: +SKIP
    >>> feats = [FeatureSpec("ht", "scalars/ht"), FeatureSpec("met", "scalars/met")]
    >>> data = InputData(
    ...     X=np.zeros((4, 2), np.float32), valid=np.ones((4, 2), bool),
    ...     labels=np.array([0, 1, 1, 0]), weights=np.ones(4, np.float32),
    ...     event_id=np.zeros((4, 3), np.int64), features=feats, class_names=["signal", "background"],
    ... )
    >>> data
    InputData(4 events, 2 classes ['signal', 'background'], 2 inputs from 0 files)
    >>> data.class_counts()
    {'signal': 2, 'background': 2}
    """

    X: np.ndarray
    valid: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    event_id: np.ndarray
    features: list[FeatureSpec]
    class_names: list[str]
    padding: dict[str, Any] = field(default_factory=dict)
    skim_config: dict[str, Any] | None = None
    convert_config: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        """Number of events (rows)."""
        return int(self.X.shape[0])

    @property
    def n_inputs(self) -> int:
        """Number of input columns ``D``."""
        return int(self.X.shape[1])

    def class_counts(self) -> dict[str, int]:
        """Events per class name."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts, strict=True)}

    def __repr__(self) -> str:
        n_files = len(self.provenance.get("inputs", []))
        return (
            f"InputData({self.n_events} events, {len(self.class_names)} classes {self.class_names}, "
            f"{self.n_inputs} inputs from {n_files} file{'s' if n_files != 1 else ''})"
        )


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Expand globs (each sorted) and check the files exist; duplicates are kept once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        text = str(entry)
        if glob.has_magic(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputFileError(
                    f"train.inputs: the pattern '{text}' matches no file (working directory: {Path.cwd()})."
                )
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(text)]
        for path in candidates:
            if not path.is_file():
                near = (
                    did_you_mean(path.name, [p.name for p in path.parent.glob("*.h5")])
                    if path.parent.is_dir()
                    else ""
                )
                raise InputFileError(
                    f"input file {path} does not exist (working directory: {Path.cwd()}).{near}"
                )
            if path not in files:
                files.append(path)
    if not files:
        raise ConfigError(
            "train.inputs is empty: list the HDF5 files written by HDF5Writer (cmsml convert)."
        )
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _class_names(info: Mapping[str, Any], path: Path) -> list[str]:
    names = info.get("class_names")
    if not names:
        raise InputFileError(
            f"{path} records no class_names (root attribute); write it again with HDF5Writer."
        )
    return [str(n) for n in names]


def load_inputs(paths: Sequence[str | Path], patterns: Sequence[str]) -> InputData:
    """Read the features, labels and weights of one or more cmsmlkit HDF5 files.

    Parameters
    ----------
    paths : sequence of str or Path
        HDF5 files written by :class:`~cmsmlkit.data.hdf5.HDF5Writer`, or globs
        (each expanded in sorted order).
    patterns : sequence of str
        Feature names or wildcards (``ht``, ``GoodJet.*``, ``*``), resolved on
        the first file; every other file must hold the same features.

    Returns
    -------
    InputData
        All events of all files, in file order.

    Raises
    ------
    InputFileError
        A file is missing, not HDF5, or not written by cmsmlkit.
    DataError
        Files disagree on class names or features, a feature holds NaN or
        infinity, or all events belong to one class.
    ConfigError
        A feature pattern matches nothing (close matches are listed).

    Examples
    --------
    >>> data = load_inputs(["sig.h5", "bkg.h5"], ["*"])  # doctest: +SKIP
    >>> data.X.shape, data.class_names  # doctest: +SKIP
    ((20000, 13), ['signal', 'background'])
    """
    import h5py

    from ..data.hdf5 import read_info

    files = expand_inputs(paths)
    infos = [read_info(path) for path in files]
    first, first_info = files[0], infos[0]
    class_names = _class_names(first_info, first)
    for path, info in zip(files[1:], infos[1:], strict=True):
        other = _class_names(info, path)
        if other != class_names:
            raise DataError(
                f"{first} has classes {class_names} but {path} has {other}: the label indices would "
                "mean different classes. Convert all datasets into files with the same class list "
                "(one HDF5Writer run, or the same source.datasets labels in the same order)."
            )
    with h5py.File(first, "r") as f:
        features = resolve_features(list(patterns), f, source=str(first))
    n_per_file = [int(info["paths"]["label"][0][0]) for info in infos]
    n_total = sum(n_per_file)
    n_inputs = int(sum(spec.length for spec in features))

    X = np.empty((n_total, n_inputs), dtype=np.float32)
    valid = np.empty((n_total, n_inputs), dtype=bool)
    labels = np.empty(n_total, dtype=np.int64)
    weights = np.empty(n_total, dtype=np.float32)
    event_id = np.empty((n_total, 3), dtype=np.int64)
    provenance: list[dict[str, Any]] = []
    start = 0
    for path, info, n in zip(files, infos, n_per_file, strict=True):
        have = info["paths"]
        for spec in features:
            if spec.path not in have:
                raise DataError(
                    f"{path} has no feature '{spec.name}' ({spec.path}) although {first} has it; "
                    "convert every input file with the same selection and variables."
                )
        stop = start + n
        with h5py.File(path, "r") as f:
            if n:
                X[start:stop], valid[start:stop] = feature_matrix(f, features)
                labels[start:stop] = f["label"][:]
                weights[start:stop] = f["weight"][:]
                event_id[start:stop] = f["event_id"][:]
        bad = (labels[start:stop] < 0) | (labels[start:stop] >= len(class_names))
        if bad.any():
            raise DataError(
                f"{path}: {int(bad.sum())} events have a label outside 0..{len(class_names) - 1} "
                f"(classes {class_names}); write the file again."
            )
        provenance.append({"path": str(path.resolve()), "sha256": _sha256(path), "n_events": n})
        start = stop

    names = ", ".join(str(p) for p in files)
    if n_total == 0:
        raise DataError(f"{names} hold no events: nothing to train on; loosen the selection.")
    check_finite(X, valid, features, source=names)
    present = np.unique(labels)
    if len(present) < 2:
        only = class_names[int(present[0])]
        raise DataError(
            f"all {n_total} events of {names} are class '{only}'; the classifier needs at least two "
            "classes: add a dataset with another label to source.datasets."
        )
    return InputData(
        X=X,
        valid=valid,
        labels=labels,
        weights=weights,
        event_id=event_id,
        features=features,
        class_names=class_names,
        padding=dict(first_info.get("padding") or {}),
        skim_config=first_info.get("skim_config"),
        convert_config=first_info.get("config"),
        provenance={"inputs": provenance},
    )
