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

import contextlib
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
    "replace_nonfinite",
    "InputLayout",
    "HDF5DataModule",
]


def _h5py() -> Any:
    """h5py with the hdf5plugin codecs (blosc2, zstd, ...) registered, so compressed files open."""
    import h5py

    with contextlib.suppress(ImportError):
        import hdf5plugin  # noqa: F401

    return h5py


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


def replace_nonfinite(X: np.ndarray, valid: np.ndarray, value: float) -> int:
    """Set NaN and infinite real entries of ``X`` to ``value`` in place; return how many there were.

    >>> import numpy as np
    >>> X = np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32)
    >>> replace_nonfinite(X, np.ones((2, 2), bool), 0.0), X.tolist()
    (2, [[1.0, 0.0], [0.0, 2.0]])
    """
    bad = ~np.isfinite(X) & valid
    n = int(bad.sum())
    if n:
        X[bad] = value
    return n


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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (provenance and bundle checks)."""
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


@dataclass
class _Opened:
    """The checked header of a set of input files: features, classes, event counts."""

    files: list[Path]
    infos: list[dict[str, Any]]
    features: list[FeatureSpec]
    class_names: list[str]
    n_per_file: list[int]

    @property
    def n_total(self) -> int:
        return sum(self.n_per_file)

    @property
    def names(self) -> str:
        return ", ".join(str(p) for p in self.files)


def _open_inputs(paths: Sequence[str | Path], patterns: Sequence[str]) -> _Opened:
    """Read the headers of the input files and check they agree; no event data are read."""
    from ..data.hdf5 import read_info

    h5py = _h5py()
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
    for path, info in zip(files, infos, strict=True):
        have = info["paths"]
        for spec in features:
            if spec.path not in have:
                near = did_you_mean(spec.path, list(have))
                raise DataError(
                    f"{path} has no feature '{spec.name}' ({spec.path}) although {first} has it;"
                    f"{near} convert every input file with the same selection and variables."
                )
            if spec.length > 1 and have[spec.path][0][1:] != (spec.length,):
                raise DataError(
                    f"{path}: '{spec.name}' has shape {have[spec.path][0]} but {first} pads it to "
                    f"{spec.length} slots; convert every input file with the same padding."
                )
    n_per_file = [int(info["paths"]["label"][0][0]) for info in infos]
    return _Opened(files, infos, features, class_names, n_per_file)


def _check_labels(labels: np.ndarray, class_names: list[str], source: str) -> None:
    bad = (labels < 0) | (labels >= len(class_names))
    if bad.any():
        raise DataError(
            f"{source}: {int(bad.sum())} events have a label outside 0..{len(class_names) - 1} "
            f"(classes {class_names}); write the file again."
        )


def _check_two_classes(labels: np.ndarray, class_names: list[str], source: str) -> None:
    present = np.unique(labels)
    if len(present) < 2:
        only = class_names[int(present[0])] if len(present) else "none"
        raise DataError(
            f"all {len(labels)} events of {source} are class '{only}'; the classifier needs at "
            "least two classes: add a dataset with another label to source.datasets."
        )


def load_inputs(
    paths: Sequence[str | Path], patterns: Sequence[str], *, nan_value: float | None = None
) -> InputData:
    """Read the features, labels and weights of one or more cmsmlkit HDF5 files.

    Parameters
    ----------
    paths : sequence of str or Path
        HDF5 files written by :class:`~cmsmlkit.data.hdf5.HDF5Writer`, or globs
        (each expanded in sorted order).
    patterns : sequence of str
        Feature names or wildcards (``ht``, ``GoodJet.*``, ``*``), resolved on
        the first file; every other file must hold the same features.
    nan_value : float, optional
        Replace NaN and infinite feature values by this number; None (the
        default) refuses them.

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
    h5py = _h5py()
    opened = _open_inputs(paths, patterns)
    features, class_names = opened.features, opened.class_names
    n_total = opened.n_total
    n_inputs = int(sum(spec.length for spec in features))

    X = np.empty((n_total, n_inputs), dtype=np.float32)
    valid = np.empty((n_total, n_inputs), dtype=bool)
    labels = np.empty(n_total, dtype=np.int64)
    weights = np.empty(n_total, dtype=np.float32)
    event_id = np.empty((n_total, 3), dtype=np.int64)
    provenance: list[dict[str, Any]] = []
    start = 0
    for path, n in zip(opened.files, opened.n_per_file, strict=True):
        stop = start + n
        with h5py.File(path, "r") as f:
            if n:
                X[start:stop], valid[start:stop] = feature_matrix(f, features)
                labels[start:stop] = f["label"][:]
                weights[start:stop] = f["weight"][:]
                event_id[start:stop] = f["event_id"][:]
        _check_labels(labels[start:stop], class_names, str(path))
        provenance.append({"path": str(path.resolve()), "sha256": file_sha256(path), "n_events": n})
        start = stop

    names = opened.names
    if n_total == 0:
        raise DataError(f"{names} hold no events: nothing to train on; loosen the selection.")
    if nan_value is None:
        check_finite(X, valid, features, source=names)
    else:
        replace_nonfinite(X, valid, nan_value)
    _check_two_classes(labels, class_names, names)
    first_info = opened.infos[0]
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


# --------------------------------------------------------------------------- network input rows


@dataclass(frozen=True)
class InputLayout:
    """What each column of the network's input row holds.

    The row is every feature standardised, in order (object fields slot by
    slot), followed, when ``masks`` is not empty, by the mask of each listed
    collection (1.0 for a real object, 0.0 for a padded slot), ``L`` columns
    each. The MLP reads features only; set models (Deep Sets) and custom
    models also get the masks, so that padding is never mistaken for data.

    >>> layout = InputLayout([FeatureSpec("ht", "scalars/ht"),
    ...                       FeatureSpec("Jet.pt", "objects/Jet/pt", 2, "Jet")], with_masks=True)
    >>> layout.n_features, layout.n_inputs, layout.masks
    (3, 5, [('Jet', 2)])
    """

    features: list[FeatureSpec]
    masks: list[tuple[str, int]] = field(default_factory=list)

    def __init__(self, features: Sequence[FeatureSpec], with_masks: bool = False) -> None:
        object.__setattr__(self, "features", list(features))
        masks: list[tuple[str, int]] = []
        if with_masks:
            for spec in self.features:
                if spec.collection is not None and spec.collection not in dict(masks):
                    masks.append((spec.collection, spec.length))
        object.__setattr__(self, "masks", masks)

    @property
    def n_features(self) -> int:
        """Columns of standardised features ``D``."""
        return int(sum(spec.length for spec in self.features))

    @property
    def n_inputs(self) -> int:
        """Columns of the whole row: features and masks."""
        return self.n_features + int(sum(length for _, length in self.masks))

    def offsets(self) -> dict[str, int]:
        """Feature name (and ``mask:<collection>``) -> its first column in the row."""
        out: dict[str, int] = {}
        start = 0
        for spec in self.features:
            out[spec.name] = start
            start += spec.length
        for coll, length in self.masks:
            out[f"mask:{coll}"] = start
            start += length
        return out

    def rows(self, X: np.ndarray, valid: np.ndarray, standardiser: Standardiser) -> np.ndarray:
        """The float32 input rows ``[N, n_inputs]`` of raw features ``X`` and their ``valid`` map."""
        Z = standardiser.transform(X, valid)
        if not self.masks:
            return Z
        where = self.offsets()
        offsets: dict[str | None, int] = {}
        for spec in self.features:
            offsets.setdefault(spec.collection, where[spec.name])
        blocks = [Z] + [
            valid[:, offsets[coll] : offsets[coll] + length].astype(np.float32)
            for coll, length in self.masks
        ]
        return np.concatenate(blocks, axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": [spec.to_dict() for spec in self.features],
            "masks": [[coll, length] for coll, length in self.masks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputLayout:
        layout = cls([FeatureSpec.from_dict(d) for d in data["features"]])
        object.__setattr__(layout, "masks", [(str(c), int(n)) for c, n in data.get("masks", [])])
        return layout

    def __repr__(self) -> str:
        masks = f", masks of {[c for c, _ in self.masks]}" if self.masks else ""
        return f"InputLayout({len(self.features)} features, {self.n_inputs} inputs{masks})"


class _Moments:
    """Running sums of each feature over real entries, for standardisation in one pass."""

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        self.features = list(features)
        n = len(self.features)
        self.count = np.zeros(n)
        self.sum = np.zeros(n)
        self.sumsq = np.zeros(n)

    def update(self, X: np.ndarray, valid: np.ndarray) -> None:
        start = 0
        for i, spec in enumerate(self.features):
            block = X[:, start : start + spec.length][valid[:, start : start + spec.length]]
            block = block.astype(np.float64)
            self.count[i] += block.size
            self.sum[i] += block.sum()
            self.sumsq[i] += np.square(block).sum()
            start += spec.length

    def standardiser(self) -> Standardiser:
        count = np.maximum(self.count, 1)
        mean = np.where(self.count > 0, self.sum / count, 0.0)
        var = np.maximum(self.sumsq / count - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where((self.count > 0) & (std > 1e-12), std, 1.0)
        return Standardiser(
            [f.name for f in self.features], [f.length for f in self.features], mean, std
        )


# --------------------------------------------------------------------------- loaders

SPLITS = ("train", "val", "test")


def _memory_loader(
    tensors: Sequence[Any], batch_size: int, *, shuffle: bool, seed: int, epoch: Any
) -> Any:
    """A DataLoader over in-memory tensors: each epoch one seeded permutation of all rows
    (one gather), then contiguous slices as batches."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class MemoryStream(IterableDataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return max(1, -(-len(tensors[0]) // batch_size))

        def __iter__(self) -> Any:
            data = tensors
            if shuffle:
                generator = torch.Generator()
                generator.manual_seed(seed * 1_000_003 + int(epoch.item()))
                order = torch.randperm(len(tensors[0]), generator=generator)
                data = [t[order] for t in tensors]
            for start in range(0, len(data[0]), batch_size):
                yield tuple(t[start : start + batch_size] for t in data)

    return DataLoader(MemoryStream(), batch_size=None, num_workers=0)


class _BlockReader:
    """Reads whole row blocks of the input files (aligned with their HDF5 chunks)."""

    def __init__(
        self, files: Sequence[Path], features: Sequence[FeatureSpec], nan_value: float | None
    ) -> None:
        self.files = list(files)
        self.features = list(features)
        self.nan_value = nan_value
        self._open: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # open h5py files do not cross process boundaries: each worker opens its own
        return {**self.__dict__, "_open": {}}

    def read(self, file: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        f = self._open.get(file)
        if f is None:
            f = self._open[file] = _h5py().File(self.files[file], "r")
        X, valid = feature_matrix(f, self.features, rows=slice(start, stop))
        if self.nan_value is not None:
            replace_nonfinite(X, valid, self.nan_value)
        return X, valid

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _block_stream_class() -> type:
    from torch.utils.data import IterableDataset, get_worker_info

    class BlockStream(IterableDataset):  # type: ignore[type-arg]
        """Batches of one split, read block by block and shuffled within a buffer of blocks."""

        def __init__(self, module: HDF5DataModule, split: int, shuffle: bool) -> None:
            self.reader = module._reader
            self.blocks = [b for b in module._blocks if module._block_has[split][b[3]]]
            self.split = split
            self.shuffle = shuffle
            self.assign = module._assign
            self.labels = module._labels
            self.weights = module._weights
            self.layout = module.layout
            self.standardiser = module.standardiser
            self.batch_size = module.batch_size
            self.buffer = module.block_buffer if shuffle else 1
            self.seed = module.seed
            self.epoch = module._epoch  # a shared tensor: workers see the current epoch

            self.num_workers = max(module.num_workers, 1)

        def _events(self, blocks: Sequence[tuple[int, int, int, int, int]]) -> int:
            return int(
                sum((self.assign[o + s : o + e] == self.split).sum() for _, s, e, _, o in blocks)
            )

        def __len__(self) -> int:
            # each worker serves its own blocks and ends with its own short batch
            n = [self._events(self.blocks[w :: self.num_workers]) for w in range(self.num_workers)]
            return max(1, sum(-(-k // self.batch_size) for k in n))

        def __iter__(self) -> Any:
            import torch

            info = get_worker_info()
            worker = info.id if info is not None else 0
            blocks = self.blocks[worker :: self.num_workers]
            rng = None
            if self.shuffle:
                rng = np.random.default_rng([self.seed, int(self.epoch.item()), worker])
                blocks = [blocks[i] for i in rng.permutation(len(blocks))]
            carry: list[np.ndarray] | None = None
            for g in range(0, len(blocks), self.buffer):
                parts: list[list[np.ndarray]] = [[], [], []]
                for file, start, stop, _, offset in blocks[g : g + self.buffer]:
                    keep = self.assign[offset + start : offset + stop] == self.split
                    X, valid = self.reader.read(file, start, stop)
                    X, valid = X[keep], valid[keep]
                    parts[0].append(self.layout.rows(X, valid, self.standardiser))
                    idx = np.flatnonzero(keep) + offset + start
                    parts[1].append(self.labels[idx])
                    parts[2].append(self.weights[idx])
                arrays = [np.concatenate(p) for p in parts]
                if carry is not None:
                    arrays = [np.concatenate([c, a]) for c, a in zip(carry, arrays, strict=True)]
                if rng is not None:
                    order = rng.permutation(len(arrays[0]))
                    arrays = [a[order] for a in arrays]
                n_full = len(arrays[0]) // self.batch_size * self.batch_size
                tensors = [torch.from_numpy(np.ascontiguousarray(a[:n_full])) for a in arrays]
                for i in range(0, n_full, self.batch_size):
                    yield tuple(t[i : i + self.batch_size] for t in tensors)
                carry = [a[n_full:] for a in arrays]
            if carry is not None and len(carry[0]):
                yield tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in carry)

    return BlockStream


def _lightning_datamodule() -> type:
    import lightning.pytorch as pl

    return pl.LightningDataModule  # type: ignore[no-any-return]


class HDF5DataModule(_lightning_datamodule()):  # type: ignore[misc]
    """Training, validation and test batches from one or many cmsmlkit HDF5 files.

    :meth:`setup` (Lightning calls it; call it yourself to inspect the data)
    reads the file headers, labels and weights, splits the events, checks the
    features for NaN and infinity, and computes the standardisation on the
    training split only (padded slots excluded). Every bad input is reported
    there, before any training. Batches are ``(rows, labels, weights)``:
    float32 ``[B, n_inputs]`` (see :class:`InputLayout`), int64 ``[B]``,
    float32 ``[B]`` (the event weight times the class weight is applied by the
    LightningModule; here ``|/weight|`` with ``event_weights``, else 1).

    Parameters
    ----------
    inputs : sequence of str
        HDF5 files or globs.
    features : sequence of str
        Feature names or wildcards.
    val_inputs, test_inputs : sequence of str, optional
        Split by file: these files are the validation and test splits and
        ``inputs`` the training split. Otherwise each class is split by
        ``val_fraction`` and ``test_fraction`` with ``seed`` (stable across runs).
    loader : {"auto", "memory", "blocks"}
        ``memory`` reads every event once; ``blocks`` streams contiguous blocks
        of rows (the files' HDF5 chunks, read whole) and shuffles the events
        of ``block_buffer`` blocks together; ``auto`` takes memory when the
        rows fit in ``memory_limit_gb``.
    num_workers : int
        DataLoader worker processes for the block loader.
    nan_value : float, optional
        Replace NaN and infinity by this number; None refuses them (the error
        names each feature and how many events carry it).
    with_masks : bool
        Append the collection masks to the rows (set models).

    Examples
    --------
    >>> dm = HDF5DataModule(["data.h5"], ["ht", "GoodJet.*"], batch_size=1024)  # doctest: +SKIP
    >>> dm.setup()  # doctest: +SKIP
    >>> dm  # doctest: +SKIP
    HDF5DataModule(memory, 20000 events: train 12000, val 4000, test 4000, 2 classes, 31 inputs)
    >>> x, y, w = next(iter(dm.train_dataloader()))  # doctest: +SKIP
    """

    def __init__(
        self,
        inputs: Sequence[str | Path],
        features: Sequence[str] = ("*",),
        *,
        val_inputs: Sequence[str | Path] = (),
        test_inputs: Sequence[str | Path] = (),
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 42,
        batch_size: int = 512,
        loader: str = "auto",
        memory_limit_gb: float = 4.0,
        block_buffer: int = 8,
        num_workers: int = 0,
        nan_value: float | None = None,
        event_weights: bool = False,
        with_masks: bool = False,
    ) -> None:
        super().__init__()
        if loader not in ("auto", "memory", "blocks"):
            raise ConfigError(f"train.loader must be auto, memory or blocks, not {loader!r}.")
        if bool(val_inputs) != bool(test_inputs):
            raise ConfigError("split by file needs both train.val_inputs and train.test_inputs.")
        self.inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
        self.patterns = list(features)
        self.val_inputs = [str(p) for p in val_inputs]
        self.test_inputs = [str(p) for p in test_inputs]
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.loader = loader
        self.memory_limit_gb = memory_limit_gb
        self.block_buffer = block_buffer
        self.num_workers = num_workers
        self.nan_value = nan_value
        self.event_weights = event_weights
        self.with_masks = with_masks
        self._ready = False

    @classmethod
    def from_config(cls, config: Any) -> HDF5DataModule:
        """The DataModule of a :class:`~cmsmlkit.config.TrainConfig`."""
        return cls(
            config.inputs,
            config.features,
            val_inputs=config.val_inputs,
            test_inputs=config.test_inputs,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
            batch_size=config.batch_size,
            loader=config.loader,
            memory_limit_gb=config.memory_limit_gb,
            block_buffer=config.block_buffer,
            num_workers=config.num_workers,
            nan_value=config.nan_value,
            event_weights=config.event_weights,
            with_masks=config.model.type != "mlp",
        )

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Read headers, labels and weights, split, check and standardise (once)."""
        if self._ready:
            return
        import torch

        h5py = _h5py()
        split_by_file = bool(self.val_inputs)
        groups = (
            [self.inputs, self.val_inputs, self.test_inputs] if split_by_file else [self.inputs]
        )
        opened = [_open_inputs(g, self.patterns) for g in groups]
        first = opened[0]
        for other in opened[1:]:
            if other.class_names != first.class_names:
                raise DataError(
                    f"{first.names} have classes {first.class_names} but {other.names} have "
                    f"{other.class_names}; convert all files with the same class list."
                )
            if [f.to_dict() for f in other.features] != [f.to_dict() for f in first.features]:
                raise DataError(
                    f"{other.names} do not hold the features of {first.names} with the same "
                    "padding; convert every input file with the same selection and padding."
                )
        files = [f for o in opened for f in o.files]
        n_per_file = [n for o in opened for n in o.n_per_file]
        self.features = first.features
        self.class_names = first.class_names
        self.layout = InputLayout(self.features, with_masks=self.with_masks)
        info = first.infos[0]
        self.padding = dict(info.get("padding") or {})
        self.skim_config = info.get("skim_config")
        self.convert_config = info.get("config")
        n_total = sum(n_per_file)
        self._offsets = np.r_[0, np.cumsum(n_per_file)].astype(np.int64)

        labels = np.empty(n_total, dtype=np.int64)
        weights = np.empty(n_total, dtype=np.float32)
        blocks: list[tuple[int, int, int, int, int]] = []  # file, start, stop, block id, offset
        provenance = []
        for i, (path, n) in enumerate(zip(files, n_per_file, strict=True)):
            a, b = self._offsets[i], self._offsets[i + 1]
            with h5py.File(path, "r") as f:
                if n:
                    labels[a:b] = f["label"][:]
                    weights[a:b] = f["weight"][:]
                chunk = (f["label"].chunks or (n,))[0] if n else 1
            _check_labels(labels[a:b], self.class_names, str(path))
            step = max(int(chunk), 1)
            for start in range(0, n, step):
                blocks.append((i, start, min(start + step, n), len(blocks), int(a)))
            provenance.append(
                {"path": str(path.resolve()), "sha256": file_sha256(path), "n_events": int(n)}
            )
        self.provenance = {"inputs": provenance}
        names = ", ".join(str(p) for p in files)
        if n_total == 0:
            raise DataError(f"{names} hold no events: nothing to train on; loosen the selection.")

        assign = np.zeros(n_total, dtype=np.int8)
        if split_by_file:
            for k, o in enumerate(opened):
                start = sum(x.n_total for x in opened[:k])
                assign[start : start + o.n_total] = k
        else:
            idx = split_indices(labels, self.val_fraction, self.test_fraction, self.seed)
            assign[idx["val"]] = 1
            assign[idx["test"]] = 2
        for k, split in enumerate(SPLITS):
            sel = assign == k
            if not sel.any():
                source = opened[k].names if split_by_file else names
                raise DataError(
                    f"the {split} split is empty ({source} give it no events); "
                    + (
                        "give train.inputs, val_inputs and test_inputs files with events."
                        if split_by_file
                        else "add events or raise the fractions."
                    )
                )
        train_labels = labels[assign == 0]
        _check_two_classes(train_labels, self.class_names, f"the training split of {names}")
        self.n_events = {split: int((assign == k).sum()) for k, split in enumerate(SPLITS)}
        self._assign = assign
        self._labels = labels
        self._weights = (
            np.abs(weights) if self.event_weights else np.ones(n_total, dtype=np.float32)
        )
        if self.event_weights and not np.isfinite(self._weights).all():
            raise DataError(
                f"{names}: the /weight of some events is NaN or infinite; fix the weights or set "
                "train.event_weights: false."
            )
        self._raw_weights = weights
        self._blocks = blocks
        self._block_has = [
            np.array([(assign[o + s : o + e] == k).any() for _, s, e, _, o in blocks], dtype=bool)
            for k in range(3)
        ]
        self._reader = _BlockReader(files, self.features, self.nan_value)
        bytes_needed = n_total * (self.layout.n_inputs * 4 + 16)
        mode = self.loader
        if mode == "auto":
            mode = "memory" if bytes_needed <= self.memory_limit_gb * 1e9 else "blocks"
        self.mode = mode
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

        if mode == "memory":
            X = np.empty((n_total, self.layout.n_features), dtype=np.float32)
            valid = np.empty(X.shape, dtype=bool)
            for file, start, stop, _, offset in blocks:
                X[offset + start : offset + stop], valid[offset + start : offset + stop] = (
                    self._reader.read(file, start, stop)
                )
            self._reader.close()
            if self.nan_value is None:
                check_finite(X, valid, self.features, source=names)
            train = assign == 0
            self.standardiser = Standardiser.fit(X[train], valid[train], self.features)
            self._tensors = {}
            for k, split in enumerate(SPLITS):
                sel = np.flatnonzero(assign == k)
                self._tensors[split] = (
                    torch.from_numpy(self.layout.rows(X[sel], valid[sel], self.standardiser)),
                    torch.from_numpy(labels[sel]),
                    torch.from_numpy(np.ascontiguousarray(self._weights[sel])),
                )
            del X, valid
        else:
            moments = _Moments(self.features)
            bad = np.zeros(len(self.features), dtype=np.int64)
            for file, start, stop, _, offset in blocks:
                X, valid = self._reader.read(file, start, stop)
                if self.nan_value is None:
                    nonfinite = ~np.isfinite(X) & valid
                    if nonfinite.any():
                        col = 0
                        for i, spec in enumerate(self.features):
                            bad[i] += nonfinite[:, col : col + spec.length].any(axis=1).sum()
                            col += spec.length
                train = assign[offset + start : offset + stop] == 0
                moments.update(X[train], valid[train])
            self._reader.close()
            if bad.any():
                problems = [
                    f"'{spec.name}' in {int(n)} events"
                    for spec, n in zip(self.features, bad, strict=True)
                    if n
                ]
                raise DataError(
                    f"{names} has NaN or infinite values: {', '.join(problems)}. Fix the variable's "
                    "expression (e.g. guard a division or a log), drop the feature from "
                    "train.features, or set train.nan_value to replace them."
                )
            self.standardiser = moments.standardiser()
        self._ready = True

    # ------------------------------------------------------------------ what Lightning calls

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose shuffle the block loader uses (Lightning's current epoch)."""
        self._epoch.fill_(int(epoch))

    def split_loader(self, split: str, *, shuffle: bool = False) -> Any:
        """A DataLoader over ``split`` ("train", "val" or "test"), in file order unless shuffled."""
        from torch.utils.data import DataLoader

        self.setup()
        if self.mode == "memory":
            return _memory_loader(
                self._tensors[split],
                self.batch_size,
                shuffle=shuffle,
                seed=self.seed,
                epoch=self._epoch,
            )
        stream = _block_stream_class()(self, SPLITS.index(split), shuffle)
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )

    def train_dataloader(self) -> Any:
        return self.split_loader("train", shuffle=True)

    def val_dataloader(self) -> Any:
        return self.split_loader("val")

    def test_dataloader(self) -> Any:
        return self.split_loader("test")

    # ------------------------------------------------------------------ inspection

    def split_labels(self, split: str) -> np.ndarray:
        """Class indices of the events of ``split``, in the order its loader serves them unshuffled."""
        self.setup()
        return self._labels[self._assign == SPLITS.index(split)]

    def split_weights(self, split: str) -> np.ndarray:
        """The raw ``/weight`` of the events of ``split`` (unshuffled order)."""
        self.setup()
        return self._raw_weights[self._assign == SPLITS.index(split)]

    def __repr__(self) -> str:
        if not self._ready:
            return f"HDF5DataModule(inputs={self.inputs}, features={self.patterns}, not set up)"
        sizes = ", ".join(f"{k} {v}" for k, v in self.n_events.items())
        return (
            f"HDF5DataModule({self.mode}, {sum(self.n_events.values())} events: {sizes}, "
            f"{len(self.class_names)} classes, {self.layout.n_inputs} inputs)"
        )
