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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, did_you_mean

__all__ = [
    "FeatureSpec",
    "Standardiser",
    "available_features",
    "resolve_features",
    "feature_matrix",
    "check_finite",
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
        return {"name": self.name, "path": self.path, "length": self.length, "collection": self.collection}

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
        raise DataError(f"{source} holds no /scalars or /objects datasets: is it a cmsmlkit HDF5 file?")
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
    X: np.ndarray, valid: np.ndarray, features: Sequence[FeatureSpec], *, source: str = "the input data"
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
            raise DataError(f"input rows have {X.shape[1]} columns, the standardisation expects {self.n_inputs}.")
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
