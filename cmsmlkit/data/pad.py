"""Padding of jagged collections to fixed-length, masked numpy arrays.

A jagged collection (``GoodJet`` with a variable number of jets per event) is
written to HDF5 as one ``[N, L]`` float32 array per field plus a ``[N, L]``
boolean mask. This module does that with plain numpy against the offsets of
the jagged arrays: ``ak.pad_none`` + ``ak.fill_none`` + ``ak.to_numpy`` per
field is several times slower.

The functions are pure: arrays in, arrays out, no files.

>>> import numpy as np
>>> from cmsmlkit.data.pad import pad
>>> padded = pad(np.array([2, 0, 1]), {"pt": np.array([10.0, 30.0, 5.0])}, max_len=2)
>>> padded.values["pt"].tolist()
[[30.0, 10.0], [0.0, 0.0], [5.0, 0.0]]
>>> padded.mask.tolist()
[[True, True], [False, False], [True, False]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, DataError, did_you_mean

if TYPE_CHECKING:
    import awkward as ak

__all__ = [
    "Padded",
    "pad",
    "pad_collection",
    "choose_max_len",
    "max_len_from_histogram",
    "numeric_fields",
]


@dataclass
class Padded:
    """A padded collection: one ``[N, L]`` float32 array per field and a ``[N, L]`` mask.

    Attributes
    ----------
    values : dict of str to numpy.ndarray
        Field name -> ``[N, L]`` float32 values; padded slots hold the pad value.
    mask : numpy.ndarray
        ``[N, L]`` bool, True where a real object sits.
    n_truncated : int
        Number of events that had more than ``L`` objects (their trailing objects
        were dropped).

    Examples
    --------
    >>> import numpy as np
    >>> p = pad(np.array([3]), {"pt": np.array([1.0, 3.0, 2.0])}, max_len=2)
    >>> p
    Padded(n_events=1, max_len=2, fields=['pt'], n_truncated=1)
    >>> p.values["pt"].tolist()
    [[3.0, 2.0]]
    """

    values: dict[str, np.ndarray]
    mask: np.ndarray
    n_truncated: int

    @property
    def n_events(self) -> int:
        """Number of events (rows)."""
        return int(self.mask.shape[0])

    @property
    def max_len(self) -> int:
        """Number of object slots per event (columns)."""
        return int(self.mask.shape[1])

    def __repr__(self) -> str:
        return (
            f"Padded(n_events={self.n_events}, max_len={self.max_len}, "
            f"fields={list(self.values)}, n_truncated={self.n_truncated})"
        )


def _check_max_len(max_len: int) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ConfigError(
            f"max_len must be an integer >= 1 (objects kept per event), got {max_len!r}."
        )
    return int(max_len)


def pad(
    counts: np.ndarray,
    values: Mapping[str, np.ndarray],
    max_len: int,
    *,
    sort_by: str | None = "pt",
    pad_value: float = 0.0,
) -> Padded:
    """Pad flat per-object values to ``[N, max_len]`` arrays, keeping the leading objects.

    Parameters
    ----------
    counts : numpy.ndarray
        ``[N]`` number of objects in each event.
    values : mapping of str to numpy.ndarray
        Field name -> flat contents of that field, ``sum(counts)`` entries, event by event.
    max_len : int
        Object slots per event; events with more objects are truncated.
    sort_by : str or None
        Field whose largest values come first in each event (a stable sort, so
        ties keep file order); None keeps the file order.
    pad_value : float
        Value written in the empty slots.

    Returns
    -------
    Padded
        The ``[N, max_len]`` float32 values, the bool mask and the number of
        truncated events.

    Raises
    ------
    ConfigError
        ``sort_by`` is not one of the fields, or ``max_len`` < 1.
    DataError
        A field does not hold ``sum(counts)`` entries.
    """
    max_len = _check_max_len(max_len)
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise DataError(
            f"counts must be one number of objects per event ([N]), got shape {counts.shape}."
        )
    whole = np.issubdtype(counts.dtype, np.integer) or not counts.size
    if not whole and not np.all(np.isfinite(counts) & (counts == np.round(counts))):
        raise DataError("counts must be whole numbers of objects per event.")
    if counts.size and counts.min() < 0:
        raise DataError(f"counts must be >= 0 (objects per event), found {counts.min()}.")
    counts = counts.astype(np.int64, copy=False)
    n_events = counts.shape[0]
    total = int(counts.sum())

    flat: dict[str, np.ndarray] = {}
    for name, array in values.items():
        array = np.asarray(array)
        if array.shape != (total,):
            raise DataError(
                f"field '{name}' holds {array.shape} values but the counts add up to {total} "
                "objects; give the flat contents of the jagged field (ak.flatten(array, axis=1))."
            )
        flat[name] = array

    if sort_by is not None and sort_by not in flat:
        raise ConfigError(
            f"cannot sort objects by '{sort_by}': it is not a field of the collection "
            f"(fields: {', '.join(flat) or 'none'}).{did_you_mean(sort_by, flat)} "
            "Set sort_by to one of the fields, or to null to keep the file order."
        )

    starts = np.cumsum(counts) - counts
    slots = np.arange(max_len, dtype=np.int64)
    mask = slots < counts[:, None]
    # flat position of the object in each slot (a gather per field: no scatter, no fill
    # pass); empty slots point one past the objects, where each field's pad value sits
    source = starts[:, None] + slots
    np.copyto(source, total, where=~mask)
    if sort_by is not None and not _already_descending(counts, starts, flat[sort_by]):
        event = np.repeat(np.arange(n_events, dtype=np.int64), counts)
        order = _descending_within_events(event, flat[sort_by])
        source = np.append(order, total)[source]

    padded: dict[str, np.ndarray] = {}
    for name, array in flat.items():
        extended = np.empty(total + 1, dtype=np.float32)
        extended[:total] = array
        extended[total] = pad_value
        padded[name] = extended.take(source)
    n_truncated = int(np.count_nonzero(counts > max_len))
    return Padded(values=padded, mask=mask, n_truncated=n_truncated)


def _already_descending(counts: np.ndarray, starts: np.ndarray, key: np.ndarray) -> bool:
    """True when every event's objects already come largest first (NanoAOD stores them by pt).

    Then the stable sort would keep the file order anyway, and is skipped. An object
    larger than the one before it is allowed only as the first object of its event.
    """
    key = np.asarray(key, dtype=np.float32)
    if key.size < 2:
        return True
    if np.isnan(key).any():
        return False
    rising = np.flatnonzero(key[1:] > key[:-1]) + 1
    if not rising.size:
        return True
    first = np.zeros(key.size, dtype=bool)
    first[starts[counts > 0]] = True
    return bool(first[rising].all())


def _descending_within_events(event: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Permutation of the flat objects that orders each event's objects by ``key``, largest first.

    One stable sort of a 64-bit composite key (event index above, the float32 key's
    bits, flipped so that larger sorts first, below) is several times faster than
    ``np.lexsort``; the input is sorted by event already, which timsort exploits.
    Ties keep file order; NaN sorts last. Keys are compared as float32, as written.
    """
    key = np.asarray(key, dtype=np.float32)
    key = np.where(np.isnan(key), np.float32(-np.inf), key) + np.float32(0.0)  # -0.0 -> 0.0
    bits = key.view(np.uint32)
    ascending = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    composite = (event.astype(np.uint64) << np.uint64(32)) | (~ascending).astype(np.uint64)
    return np.argsort(composite, kind="stable")


def numeric_fields(array: ak.Array) -> list[str]:
    """The fields of a jagged record array that hold one number (or bool) per object."""
    import awkward as ak

    out = []
    for name in ak.fields(array):
        layout = _strip(array[name].layout)
        if not layout.is_list:
            continue
        content = _strip(layout.content)
        if content.is_numpy and content.purelist_depth == 1 and content.dtype.kind in "biuf":
            out.append(name)
    return out


def _strip(layout):  # type: ignore[no-untyped-def]
    """Look through option and indexed nodes (they do not change the shape)."""
    while layout.is_option or layout.is_indexed:
        layout = layout.content
    return layout


def pad_collection(
    array: ak.Array,
    max_len: int,
    *,
    fields: Sequence[str] | None = None,
    sort_by: str | None = "pt",
    pad_value: float = 0.0,
) -> Padded:
    """Pad a jagged record array (``events.GoodJet``) field by field.

    Parameters
    ----------
    array : awkward.Array
        ``N`` events, each a list of records (``var * {pt: float32, eta: ...}``).
    max_len : int
        Object slots per event.
    fields : sequence of str, optional
        Fields to pad; None pads every numeric field. The ``sort_by`` field is
        used for ordering even when it is not among them.
    sort_by : str or None
        Field whose largest values come first; None keeps the file order.
    pad_value : float
        Value written in the empty slots.

    Returns
    -------
    Padded

    Examples
    --------
    >>> import awkward as ak
    >>> jets = ak.Array([[{"pt": 20.0, "eta": 1.0}, {"pt": 50.0, "eta": -1.0}], []])
    >>> pad_collection(jets, 1).values["eta"].tolist()
    [[-1.0], [0.0]]
    """
    import awkward as ak

    available = numeric_fields(array)
    if fields is None:
        fields = available
    for name in fields:
        if name not in available:
            raise ConfigError(
                f"the collection has no numeric field '{name}' (fields: {', '.join(available) or 'none'})."
                f"{did_you_mean(name, available)}"
            )
    if sort_by is not None and sort_by not in available:
        raise ConfigError(
            f"cannot sort objects by '{sort_by}': it is not a numeric field of the collection "
            f"(fields: {', '.join(available) or 'none'}).{did_you_mean(sort_by, available)} "
            "Set sort_by to one of the fields, or to null to keep the file order."
        )
    counts = ak.to_numpy(ak.fill_none(ak.num(array, axis=1), 0)).astype(np.int64)
    wanted = list(dict.fromkeys([*fields, *([sort_by] if sort_by is not None else [])]))
    flat = {}
    for name in wanted:
        contents = ak.flatten(array[name], axis=1)
        if contents.layout.is_option:
            contents = ak.fill_none(contents, np.nan)
        flat[name] = np.asarray(ak.to_numpy(contents))
    padded = pad(counts, flat, max_len, sort_by=sort_by, pad_value=pad_value)
    padded.values = {name: padded.values[name] for name in fields}
    return padded


def choose_max_len(counts: np.ndarray, quantile: float = 0.95) -> int:
    """The number of slots that holds all objects of a ``quantile`` of the events.

    Parameters
    ----------
    counts : numpy.ndarray
        ``[N]`` objects per event.
    quantile : float
        Fraction of events, in (0, 1], whose objects all fit.

    Returns
    -------
    int
        At least 1; 1 when there are no events.

    Examples
    --------
    >>> choose_max_len(np.array([0, 1, 2, 3, 10]), quantile=0.8)
    3
    """
    counts = np.asarray(counts)
    if counts.size and counts.min() < 0:
        raise DataError(f"counts must be >= 0 (objects per event), found {counts.min()}.")
    return max_len_from_histogram(np.bincount(counts.astype(np.int64, copy=False)), quantile)


def max_len_from_histogram(histogram: np.ndarray, quantile: float = 0.95) -> int:
    """:func:`choose_max_len` from the multiplicity histogram (``np.bincount(counts)``).

    Histograms of several files add up, so ``max_len`` is chosen over many files
    from a cheap first pass over the counter branches (``nJet``) in bounded memory.

    Parameters
    ----------
    histogram : numpy.ndarray
        ``histogram[k]`` = number of events with ``k`` objects.
    quantile : float
        Fraction of events, in (0, 1], whose objects all fit.

    Returns
    -------
    int
        The smallest ``k`` with at least ``quantile`` of the events at or below
        it (numpy's ``inverted_cdf`` quantile), at least 1.

    Examples
    --------
    >>> max_len_from_histogram(np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1]), quantile=0.8)
    3
    """
    if not 0 < quantile <= 1:
        raise ConfigError(f"quantile must be in (0, 1], got {quantile!r}.")
    histogram = np.asarray(histogram, dtype=np.int64)
    total = int(histogram.sum())
    if total == 0:
        return 1
    cumulative = np.cumsum(histogram)
    # smallest k whose cumulative fraction reaches the quantile, in exact integer arithmetic
    needed = int(np.ceil(quantile * total - 1e-9 * total))
    k = int(np.searchsorted(cumulative, max(needed, 1), side="left"))
    return max(1, k)
