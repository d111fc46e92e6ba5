"""The HDF5Writer: skimmed events -> one padded, self-describing HDF5 file.

The file layout is the contract of DESIGN.md that the Trainer, the Predictor
and any other ML tool read::

    /scalars/<name>            float32 [N]     one dataset per event variable
    /objects/<Coll>/<field>    float32 [N, L]  padded; L = max_len of Coll
    /objects/<Coll>/mask       bool    [N, L]  True where a real object sits
    /label                     int64   [N]     attrs: class_names (strings)
    /weight                    float32 [N]     genWeight x xsec x lumi / sumw
    /event_id                  int64   [N, 3]  run, luminosityBlock, event
    /dataset                   int64   [N]     index into the root attr datasets

The root attributes hold the cmsmlkit version, the configs as YAML, the
padding, input files, cutflow, sums of weights and datasets as JSON.

:func:`columns` turns one awkward array of events into the flat mapping of
paths to numpy arrays (the "Columns" of docs/internals.md) that the file holds;
the Predictor uses it to pad new data exactly as the training data were.

>>> from cmsmlkit.data.hdf5 import HDF5Writer, read_info
>>> path = HDF5Writer(output="data.h5", collections={"GoodJet": {"max_len": 6}}).write(skim)  # doctest: +SKIP
>>> read_info(path)["n_events"]  # doctest: +SKIP
12345
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import CollectionConfig, ConvertConfig, SkimConfig, build_config, dump_yaml
from ..errors import ConfigError, DataError, InputFileError, did_you_mean
from .pad import choose_max_len, numeric_fields, pad_collection

if TYPE_CHECKING:
    import awkward as ak
    import h5py

__all__ = ["HDF5Writer", "columns", "read_info", "EVENT_ID_FIELDS", "RESERVED_FIELDS"]

logger = logging.getLogger(__name__)

#: The fields that make /event_id, in its column order.
EVENT_ID_FIELDS = ("run", "luminosityBlock", "event")
#: Per-event fields that are bookkeeping, never written as /scalars.
RESERVED_FIELDS = (*EVENT_ID_FIELDS, "genWeight")
#: Rows per HDF5 chunk (same for every dataset, so the reader's blocks line up).
CHUNK_ROWS = 32768
#: Root attributes stored as JSON text.
JSON_ATTRS = ("padding", "input_files", "cutflow", "sumw", "datasets", "class_names")


# --------------------------------------------------------------------------- columns


def _strip(layout: Any) -> Any:
    """Look through option and indexed nodes (they do not change the shape)."""
    while layout.is_option or layout.is_indexed:
        layout = layout.content
    return layout


def _split_fields(events: ak.Array) -> tuple[list[str], list[str]]:
    """Names of the numeric per-event fields and of the jagged record collections."""
    import awkward as ak

    scalars, collections = [], []
    for name in ak.fields(events):
        layout = _strip(events[name].layout)
        if layout.is_numpy and layout.purelist_depth == 1 and layout.dtype.kind in "biuf":
            scalars.append(name)
        elif layout.is_list and _strip(layout.content).is_record:
            collections.append(name)
    return scalars, collections


def _match(patterns: Sequence[str], names: Sequence[str], what: str) -> list[str]:
    """Names matching the wildcard ``patterns``: pattern by pattern, each in the order of ``names``.

    A pattern without wildcards that matches nothing is an error naming the close matches.
    """
    for pattern in patterns:
        if not any(ch in pattern for ch in "*?[") and pattern not in names:
            raise ConfigError(
                f"{what} '{pattern}' is not in the data (available: {', '.join(names) or 'none'})."
                f"{did_you_mean(pattern, names)}"
            )
    matched = (n for p in patterns for n in names if fnmatch.fnmatchcase(n, p))
    return list(dict.fromkeys(matched))


def _scalar(events: ak.Array, name: str) -> np.ndarray:
    import awkward as ak

    array = events[name]
    if array.layout.is_option or _strip(array.layout) is not array.layout:
        array = ak.fill_none(array, np.nan)
    values = np.asarray(ak.to_numpy(array)).astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.count_nonzero(np.isnan(values)))
        raise DataError(
            f"scalar '{name}' has {int(bad.sum())} non-finite values out of {len(values)} events "
            f"({n_nan} NaN or missing, {int(bad.sum()) - n_nan} inf; first at event "
            f"{int(np.flatnonzero(bad)[0])}). Fix its expression (e.g. guard a division or take "
            "GoodJet.pt[:, 0] only after a cut 'num(GoodJet) >= 1'), or drop it from convert.scalars."
        )
    return values


def columns(
    events: ak.Array,
    config: ConvertConfig,
    max_lens: Mapping[str, int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """The HDF5 columns of one array of events, and the padding used.

    Parameters
    ----------
    events : awkward.Array
        One record per event: numeric per-event variables and jagged record
        collections (a SkimResult's array of one dataset).
    config : ConvertConfig
        Which scalars (``scalars``, wildcards) and how each collection is padded
        (``collections``; an unlisted collection uses ``CollectionConfig()``).
    max_lens : mapping of str to int, optional
        Fixed slot counts per collection, taking precedence over the config
        (the Predictor passes the bundle's padding so that new data are padded
        exactly like the training data); collections not named choose theirs
        from ``max_len`` or from the data's multiplicity ``quantile``.

    Returns
    -------
    columns : dict of str to numpy.ndarray
        ``"scalars/<name>"`` -> ``[N]`` float32, ``"objects/<Coll>/<field>"`` ->
        ``[N, L]`` float32, ``"objects/<Coll>/mask"`` -> ``[N, L]`` bool.
    padding : dict of str to dict
        ``{coll: {"max_len", "sort_by", "pad_value", "fields", "n_truncated"}}``.

    Raises
    ------
    ConfigError
        A configured collection, scalar or field is not in the data.
    DataError
        A scalar holds NaN or inf.
    """
    max_lens = dict(max_lens or {})
    scalar_names, collection_names = _split_fields(events)
    scalar_names = [n for n in scalar_names if n not in RESERVED_FIELDS]
    for name in config.collections:
        if name not in collection_names:
            raise ConfigError(
                f"convert.collections names '{name}', which is not a collection of the skimmed "
                f"events (collections present: {', '.join(collection_names) or 'none'})."
                f"{did_you_mean(name, collection_names)} Keep it in skim.collections, or remove it."
            )

    out: dict[str, np.ndarray] = {}
    for name in _match(config.scalars, scalar_names, "convert.scalars entry"):
        out[f"scalars/{name}"] = _scalar(events, name)

    padding: dict[str, dict[str, Any]] = {}
    for coll in collection_names:
        cc = config.collections.get(coll, CollectionConfig())
        array = events[coll]
        available = numeric_fields(array)
        fields = _match(cc.fields, available, f"convert.collections.{coll}.fields entry")
        if coll in max_lens:
            max_len = int(max_lens[coll])
        elif cc.max_len is not None:
            max_len = cc.max_len
        else:
            max_len = choose_max_len(_counts(array), cc.quantile)
        padded = pad_collection(
            array, max_len, fields=fields, sort_by=cc.sort_by, pad_value=cc.pad_value
        )
        for field, values in padded.values.items():
            out[f"objects/{coll}/{field}"] = values
        out[f"objects/{coll}/mask"] = padded.mask
        padding[coll] = {
            "max_len": max_len,
            "sort_by": cc.sort_by,
            "pad_value": cc.pad_value,
            "fields": fields,
            "n_truncated": padded.n_truncated,
        }
    return out, padding


def _counts(array: ak.Array) -> np.ndarray:
    import awkward as ak

    return ak.to_numpy(ak.fill_none(ak.num(array, axis=1), 0)).astype(np.int64)


# --------------------------------------------------------------------------- writer


def _is_fileset(data: Any) -> bool:
    return isinstance(data, Mapping) and not hasattr(data, "arrays")


def _create(group: h5py.Group, path: str, array: np.ndarray, compression: str) -> None:
    """One HDF5 dataset with row chunks and the configured filter."""
    n = array.shape[0]
    kwargs: dict[str, Any] = {}
    if n > 0:
        kwargs["chunks"] = (min(n, CHUNK_ROWS), *array.shape[1:])
        if compression == "lzf":
            kwargs.update(compression="lzf", shuffle=True)
        elif compression == "gzip":
            kwargs.update(compression="gzip", compression_opts=4, shuffle=True)
    group.create_dataset(path, data=array, **kwargs)


class HDF5Writer:
    """Write skimmed events to one padded, self-describing HDF5 file.

    Parameters
    ----------
    config : ConvertConfig, dict, str or Path, optional
        The ``convert:`` configuration (a YAML path is read); keyword arguments
        override its fields.
    **fields
        Any :class:`~cmsmlkit.config.ConvertConfig` field: ``output``,
        ``collections``, ``scalars``, ``lumi``, ``compression``, ``shuffle``, ``seed``.

    Examples
    --------
    >>> from cmsmlkit import HDF5Writer
    >>> writer = HDF5Writer(output="data.h5", collections={"GoodJet": {"max_len": 6}})
    >>> writer
    HDF5Writer(output='data.h5', collections={'GoodJet': 6}, scalars=['*'], compression='lzf', shuffle=True, seed=42)
    >>> writer.write(skim_result)  # doctest: +SKIP
    PosixPath('data.h5')
    """

    def __init__(
        self, config: ConvertConfig | dict[str, Any] | str | Path | None = None, **fields: Any
    ):
        self.config: ConvertConfig = build_config(ConvertConfig, config, fields)

    def __repr__(self) -> str:
        c = self.config
        colls = {
            k: v.max_len if v.max_len is not None else f"q{v.quantile:g}"
            for k, v in c.collections.items()
        }
        return (
            f"HDF5Writer(output={c.output!r}, collections={colls}, scalars={c.scalars}, "
            f"compression={c.compression!r}, shuffle={c.shuffle}, seed={c.seed})"
        )

    # ----------------------------------------------------------------- work

    def write(
        self,
        data: Any,
        output: str | Path | None = None,
        *,
        skim_config: SkimConfig | dict[str, Any] | None = None,
    ) -> Path:
        """Pad, label, weight and write the events of every dataset to one HDF5 file.

        Parameters
        ----------
        data : SkimResult or dict
            A :class:`~cmsmlkit.data.skim.SkimResult` (``arrays``, ``cutflow``,
            ``metadata``, ``class_names``) or a coffea fileset, which is skimmed
            first with ``skim_config`` (default: keep the configured collections).
        output : str or Path, optional
            The file to write; default ``config.output``. Parent directories are made.
        skim_config : SkimConfig or dict, optional
            The skim that made ``data``; recorded in the file (and used to skim a fileset).

        Returns
        -------
        Path
            The written file. It appears atomically: a failure leaves no partial
            file and any previous file at that path untouched.
        """
        if skim_config is not None and not isinstance(skim_config, SkimConfig):
            skim_config = build_config(SkimConfig, skim_config, {})
        if _is_fileset(data):
            from .skim import Skimmer

            if skim_config is None:
                skim_config = SkimConfig(collections={c: ["*"] for c in self.config.collections})
            data = Skimmer(skim_config).run(data)
        arrays, cutflow, metadata, class_names = self._unpack(data)
        path = Path(output if output is not None else self.config.output)
        tables, padding, n_events = self._tables(arrays, metadata, class_names)
        attrs = self._attrs(arrays, cutflow, metadata, class_names, padding, n_events, skim_config)
        self._write_file(path, tables, attrs, class_names)
        logger.info("wrote %d events of %d datasets to %s", n_events, len(arrays), path)
        return path

    # ----------------------------------------------------------------- steps

    @staticmethod
    def _unpack(
        data: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]], list[str]]:
        if not hasattr(data, "arrays"):
            raise ConfigError(
                f"HDF5Writer.write takes a SkimResult (from Skimmer.run) or a coffea fileset dict, "
                f"not a {type(data).__name__}."
            )
        arrays = dict(data.arrays)
        cutflow = dict(getattr(data, "cutflow", None) or {})
        metadata = {ds: dict((getattr(data, "metadata", None) or {}).get(ds, {})) for ds in arrays}
        class_names = list(getattr(data, "class_names", None) or [])
        for ds, meta in metadata.items():
            label = meta.get("label")
            if label is None:
                raise DataError(
                    f"dataset '{ds}' has no 'label' in its metadata; give every dataset a label "
                    "(source.datasets.<name>.label) naming its class."
                )
            if label not in class_names:
                if getattr(data, "class_names", None):
                    raise DataError(
                        f"dataset '{ds}' has label '{label}', which is not among the class names "
                        f"{class_names}.{did_you_mean(str(label), class_names)}"
                    )
                class_names.append(label)
        if not arrays:
            raise DataError("there are no datasets to write (the SkimResult holds no arrays).")
        return arrays, cutflow, metadata, class_names

    def _max_lens(self, arrays: dict[str, Any]) -> dict[str, int]:
        """L per collection, chosen once over all datasets together."""
        per_coll: dict[str, list[np.ndarray]] = {}
        for events in arrays.values():
            for coll in _split_fields(events)[1]:
                per_coll.setdefault(coll, []).append(_counts(events[coll]))
        out = {}
        for coll, counts in per_coll.items():
            cc = self.config.collections.get(coll, CollectionConfig())
            if cc.max_len is not None:
                out[coll] = cc.max_len
            else:
                out[coll] = choose_max_len(np.concatenate(counts), cc.quantile)
        return out

    def _tables(
        self, arrays: dict[str, Any], metadata: dict[str, dict[str, Any]], class_names: list[str]
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], int]:
        """All datasets' columns plus label, weight, event_id and dataset, concatenated (and shuffled)."""
        max_lens = self._max_lens(arrays)
        parts: list[tuple[str, dict[str, np.ndarray]]] = []
        padding: dict[str, dict[str, Any]] = {}
        for index, (ds, events) in enumerate(arrays.items()):
            try:
                cols, pads = columns(events, self.config, max_lens)
            except (ConfigError, DataError) as exc:
                raise type(exc)(f"dataset '{ds}': {exc}") from None
            n = len(events)
            meta = metadata[ds]
            cols["label"] = np.full(n, class_names.index(meta["label"]), dtype=np.int64)
            cols["weight"] = self._weights(ds, events, meta)
            cols["event_id"] = _event_id(ds, events)
            cols["dataset"] = np.full(n, index, dtype=np.int64)
            parts.append((ds, cols))
            for coll, spec in pads.items():
                if coll in padding:
                    padding[coll]["n_truncated"] += spec["n_truncated"]
                else:
                    padding[coll] = spec

        n_total = sum(len(events) for events in arrays.values())
        # Empty datasets may come without the record type; they add no rows.
        filled = [(ds, cols) for ds, cols in parts if len(cols["label"])] or parts[:1]
        keys = list(filled[0][1])
        for ds, cols in filled[1:]:
            if set(cols) != set(keys):
                missing = sorted(set(keys) - set(cols))
                extra = sorted(set(cols) - set(keys))
                raise DataError(
                    f"dataset '{ds}' does not have the same variables as '{filled[0][0]}' "
                    f"(missing: {missing}, extra: {extra}); skim all datasets with the same selection."
                )
        tables = {k: np.concatenate([cols[k] for _, cols in filled]) for k in keys}
        if self.config.shuffle and n_total > 1:
            order = np.random.default_rng(self.config.seed).permutation(n_total)
            tables = {k: v[order] for k, v in tables.items()}
        return tables, padding, n_total

    def _weights(self, ds: str, events: Any, meta: dict[str, Any]) -> np.ndarray:
        import awkward as ak

        n = len(events)
        if "genWeight" in ak.fields(events):
            weights = ak.to_numpy(ak.fill_none(events["genWeight"], 1.0)).astype(np.float64)
        else:
            weights = np.ones(n, dtype=np.float64)
        is_mc = bool(meta.get("is_mc", True))
        xsec = meta.get("xsec")
        if is_mc and xsec is not None:
            sumw = meta.get("sumw")
            if sumw is None:
                raise DataError(
                    f"dataset '{ds}' has a cross-section but no 'sumw' (sum of genWeight before cuts) "
                    "in its metadata; run it through the Skimmer, which records it."
                )
            if not np.isfinite(sumw) or sumw == 0:
                raise DataError(
                    f"dataset '{ds}': the sum of genWeight before cuts is {sumw}, so it cannot be "
                    "normalised to its cross-section; check the input files or remove its xsec."
                )
            weights = weights * (float(xsec) * self.config.lumi / float(sumw))
        return weights.astype(np.float32)

    def _attrs(
        self,
        arrays: dict[str, Any],
        cutflow: dict[str, Any],
        metadata: dict[str, dict[str, Any]],
        class_names: list[str],
        padding: dict[str, dict[str, Any]],
        n_events: int,
        skim_config: SkimConfig | None,
    ) -> dict[str, Any]:
        from .. import __version__

        files = [str(f) for ds in arrays for f in metadata[ds].get("files", [])]
        datasets = [
            {
                "name": ds,
                "label": metadata[ds]["label"],
                "n_events": len(arrays[ds]),
                "xsec": metadata[ds].get("xsec"),
                "is_mc": bool(metadata[ds].get("is_mc", True)),
            }
            for ds in arrays
        ]
        return {
            "cmsmlkit_version": __version__,
            "config": dump_yaml(self.config.to_dict(full=True)),
            "skim_config": dump_yaml(skim_config.to_dict(full=True))
            if skim_config is not None
            else "",
            "padding": padding,
            "input_files": files,
            "cutflow": cutflow,
            "sumw": {ds: metadata[ds].get("sumw") for ds in arrays},
            "datasets": datasets,
            "class_names": class_names,
            "n_events": n_events,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _write_file(
        self,
        path: Path,
        tables: dict[str, np.ndarray],
        attrs: dict[str, Any],
        class_names: list[str],
    ) -> None:
        import h5py

        if attrs["n_events"] == 0:
            logger.warning("no events to write: %s will hold 0 events", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with h5py.File(tmp, "w") as f:
                for key, value in attrs.items():
                    f.attrs[key] = (
                        json.dumps(value, default=_json_default) if key in JSON_ATTRS else value
                    )
                for key, array in tables.items():
                    _create(f, key, array, self.config.compression)
                f["label"].attrs["class_names"] = list(class_names)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _event_id(ds: str, events: Any) -> np.ndarray:
    import awkward as ak

    n = len(events)
    present = ak.fields(events)
    out = np.full((n, 3), -1, dtype=np.int64)
    missing = [name for name in EVENT_ID_FIELDS if name not in present]
    if missing and n:
        logger.warning("dataset '%s' has no %s; /event_id holds -1 there", ds, missing)
    for i, name in enumerate(EVENT_ID_FIELDS):
        if name in present:
            out[:, i] = ak.to_numpy(ak.fill_none(events[name], -1)).astype(np.int64)
    return out


# --------------------------------------------------------------------------- reading


def read_info(path: str | Path) -> dict[str, Any]:
    """What a cmsmlkit HDF5 file holds, without reading its arrays.

    Parameters
    ----------
    path : str or Path
        A file written by :class:`HDF5Writer`.

    Returns
    -------
    dict
        The root attributes, decoded (JSON attributes as Python objects, the
        configs as dicts, ``skim_config`` None when absent), plus ``file`` and
        ``paths``: ``{dataset path: (shape, dtype name)}`` of every dataset.

    Raises
    ------
    InputFileError
        The file is missing, not HDF5, corrupt, or not written by cmsmlkit.

    Examples
    --------
    >>> info = read_info("data.h5")  # doctest: +SKIP
    >>> info["class_names"], info["padding"]["GoodJet"]["max_len"]  # doctest: +SKIP
    (['signal', 'background'], 6)
    """
    import h5py
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"HDF5 file {path} does not exist (working directory: {Path.cwd()}).")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputFileError(
            f"{path} is not a readable HDF5 file ({exc}); it may be truncated or not HDF5 at all. "
            "Write it again with HDF5Writer (cmsml convert)."
        ) from None
    with f:
        if "cmsmlkit_version" not in f.attrs:
            raise InputFileError(
                f"{path} is an HDF5 file but was not written by cmsmlkit's HDF5Writer (no "
                "'cmsmlkit_version' attribute on /); convert the data with HDF5Writer (cmsml convert)."
            )
        info: dict[str, Any] = {"file": str(path)}
        try:
            for key, value in f.attrs.items():
                if isinstance(value, bytes):
                    value = value.decode()
                if key in JSON_ATTRS:
                    value = json.loads(value)
                elif key in ("config", "skim_config"):
                    value = yaml.safe_load(value) if value else None
                elif isinstance(value, np.generic):
                    value = value.item()
                info[key] = value
            paths: dict[str, tuple[tuple[int, ...], str]] = {}

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    paths[name] = (tuple(obj.shape), obj.dtype.name)

            f.visititems(visit)
        except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
            raise InputFileError(
                f"{path}: corrupt cmsmlkit metadata ({exc}); write the file again."
            ) from None
    info["paths"] = paths
    for required in ("label", "weight", "event_id"):
        if required not in paths:
            raise InputFileError(
                f"{path}: the dataset '/{required}' is missing; write the file again."
            )
    return info
