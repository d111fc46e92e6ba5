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

:meth:`HDF5Writer.convert` converts NanoAOD ROOT files (skimmed or not)
directly: read with ``uproot`` in chunks of ``step_size`` events, padded on the
offsets and appended to resizable datasets, so memory follows the chunk size;
files convert in parallel on the ``cluster:``, into one file each or merged.

>>> from cmsmlkit.data.hdf5 import HDF5Writer, read_info
>>> path = HDF5Writer(output="data.h5", collections={"GoodJet": {"max_len": 6}}).write(skim)  # doctest: +SKIP
>>> read_info(path)["n_events"]  # doctest: +SKIP
12345
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import (
    ClusterConfig,
    CollectionConfig,
    ConvertConfig,
    SkimConfig,
    build_config,
    dump_yaml,
)
from ..errors import ConfigError, DataError, InputFileError, MissingBranchError, did_you_mean
from .pad import choose_max_len, max_len_from_histogram, numeric_fields, pad, pad_collection
from .source import normalise_fileset

if TYPE_CHECKING:
    import awkward as ak
    import h5py

__all__ = [
    "HDF5Writer",
    "ConvertResult",
    "columns",
    "read_info",
    "open_hdf5",
    "CODECS",
    "EVENT_ID_FIELDS",
    "RESERVED_FIELDS",
]

logger = logging.getLogger(__name__)

#: The fields that make /event_id, in its column order.
EVENT_ID_FIELDS = ("run", "luminosityBlock", "event")
#: Per-event fields that are bookkeeping, never written as /scalars.
RESERVED_FIELDS = (*EVENT_ID_FIELDS, "genWeight")
#: Rows per HDF5 chunk (same for every dataset, so the reader's blocks line up).
CHUNK_ROWS = 32768
#: Events per step of the first pass over the counter branches (and genWeight).
SCAN_STEP = 1_000_000
#: Root attributes stored as JSON text.
JSON_ATTRS = (
    "padding",
    "input_files",
    "cutflow",
    "sumw",
    "datasets",
    "class_names",
    "skipped_files",
)
#: The compression choices (``convert.compression``).
CODECS = ("none", "lzf", "gzip", "blosc2-lz4", "blosc2-zstd")


def open_hdf5(path: str | Path, mode: str = "r", **kwargs: Any) -> h5py.File:
    """Open an HDF5 file with h5py after registering hdf5plugin's filters (blosc2).

    Files written with ``compression: blosc2-lz4`` (the default) or ``blosc2-zstd``
    need ``import hdf5plugin`` before h5py can read them; any ML tool does the same.

    Examples
    --------
    >>> with open_hdf5("data.h5") as f:  # doctest: +SKIP
    ...     pt = f["objects/Jet/pt"][:1000]
    """
    import h5py
    import hdf5plugin  # noqa: F401 - registers the blosc2 filter with HDF5

    return h5py.File(path, mode, **kwargs)


def _filter_kwargs(compression: str) -> dict[str, Any]:
    """h5py ``create_dataset`` keywords of one ``convert.compression`` choice."""
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression.startswith("blosc2-"):
        import hdf5plugin

        # one blosc2 thread per HDF5 chunk: the conversion overlaps reading, padding and
        # writing in threads of its own, and blosc2's default threading (a context per
        # chunk) took twice the CPU time and up to 3x the wall time (benchmarks/convert.py).
        # The filter reads BLOSC_NTHREADS for every chunk; a value the user set is kept.
        os.environ.setdefault("BLOSC_NTHREADS", "1")
        # bit shuffle: padded float32 columns come out smaller than with byte shuffle,
        # and compress and decompress faster (fewer bytes for lz4/zstd to handle)
        return dict(
            hdf5plugin.Blosc2(
                cname=compression.split("-", 1)[1], clevel=5, filters=hdf5plugin.Blosc2.BITSHUFFLE
            )
        )
    if compression == "none":
        return {}
    raise ConfigError(f"unknown compression {compression!r}; choose one of {', '.join(CODECS)}.")


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
        kwargs.update(_filter_kwargs(compression))
    group.create_dataset(path, data=array, **kwargs)


class HDF5Writer:
    """Write skimmed events to one padded, self-describing HDF5 file.

    Parameters
    ----------
    config : ConvertConfig, dict, str or Path, optional
        The ``convert:`` configuration (a YAML path is read); keyword arguments
        override its fields.
    cluster : ClusterConfig or dict, optional
        Where :meth:`convert` runs its per-file work (default: in this process).
    **fields
        Any :class:`~cmsmlkit.config.ConvertConfig` field: ``output``,
        ``collections``, ``objects``, ``scalars``, ``lumi``, ``compression``,
        ``shuffle``, ``seed``, ``inputs``, ``step_size``, ``merge``, ``skip_bad_files``.

    Examples
    --------
    >>> from cmsmlkit import HDF5Writer
    >>> writer = HDF5Writer(output="data.h5", collections={"GoodJet": {"max_len": 6}})
    >>> writer
    HDF5Writer(output='data.h5', collections={'GoodJet': 6}, scalars=['*'], compression='blosc2-lz4', shuffle=True, seed=42)
    >>> writer.write(skim_result)  # doctest: +SKIP
    PosixPath('data.h5')
    >>> HDF5Writer(output="jets.h5", objects=["Jet"]).convert({"signal": ["ttbar_*.root"]})  # doctest: +SKIP
    ConvertResult(outputs=['jets.h5'], n_events=1000000, converted=1, reused=0, skipped=0)
    """

    def __init__(
        self,
        config: ConvertConfig | dict[str, Any] | str | Path | None = None,
        *,
        cluster: ClusterConfig | dict[str, Any] | None = None,
        **fields: Any,
    ):
        self.config: ConvertConfig = build_config(ConvertConfig, config, fields)
        self.cluster: ClusterConfig = (
            cluster
            if isinstance(cluster, ClusterConfig)
            else build_config(ClusterConfig, cluster or {}, {})
        )

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

    def convert(
        self,
        inputs: Any = None,
        output: str | Path | None = None,
    ) -> ConvertResult:
        """Convert NanoAOD ROOT files (skimmed or not) to padded HDF5, streaming.

        Each file is read with ``uproot`` in chunks of ``step_size`` events; the
        chosen collections are padded on the offsets and every chunk is appended
        to resizable datasets, so peak memory follows ``step_size``, not the
        input size (benchmarks/convert.py: about 400 MB for 1M and for 4M events
        at the default 65536, imports included). Reading, padding and writing
        overlap in threads. Files convert in parallel on the writer's ``cluster``.

        Parameters
        ----------
        inputs : optional
            What to convert: ``{label: [files or globs]}`` (default
            ``config.inputs``), a coffea fileset ``{dataset: {"files": {path:
            tree}, "metadata": {"label": ..., "xsec": ..., "is_mc": ...}}}``, a
            :class:`~cmsmlkit.data.source.NanoAODSource`, a list of files or
            globs, or one path (one class named ``events``).
        output : str or Path, optional
            The merged file (``merge: true``, default ``config.output``), or
            with ``merge: false`` the directory of the per-input files (default:
            ``config.output`` without ``.h5``).

        Returns
        -------
        ConvertResult
            The files written (or found finished for the same config and
            inputs), the number of events and the skipped inputs.

        Raises
        ------
        InputFileError
            An input is missing, corrupt or truncated (unless ``skip_bad_files``).
        MissingBranchError
            A branch the first file has is missing from another file.
        ConfigError
            A collection, field or scalar named in the config is not in the files.
        """
        from ..cluster import dask_client

        fileset = _fileset_of(inputs if inputs is not None else self.config.inputs)
        class_names = _class_names(fileset)
        files = [
            _InputFile(path=path, tree=tree, dataset=ds)
            for ds, entry in fileset.items()
            for path, tree in entry["files"].items()
        ]
        with dask_client(self.cluster) as client:
            scans = _map(client, _scan_file, [(f.path, f.tree) for f in files], "scanning")
            good, skipped = self._check_scans(files, scans)
            plan = self._plan(good[0].path, good[0].tree, scans[good[0].path])
            for f in good:
                _check_branches(f.path, f.tree, scans[f.path]["branches"], plan)
            _plan_max_lens(plan, [scans[f.path] for f in good])
            datasets = self._datasets(fileset, good, scans)
            tasks = self._tasks(good, scans, plan, datasets, class_names, skipped, output)
            merged = None
            if self.config.merge and len(tasks) > 1:
                merged = Path(output if output is not None else self.config.output)
                merge_hash = _digest([t["hash"] for t in tasks], self.config.shuffle)
                merge_hash = _digest(merge_hash, self.config.seed, self.config.step_size)
                if _finished(str(merged), merge_hash):
                    report = _report_of(str(merged))
                    return ConvertResult([merged], report["n_events"], 0, 1, skipped)
            todo = [t for t in tasks if not _finished(t["output"], t["hash"])]
            reports = {t["output"]: _report_of(t["output"]) for t in tasks if t not in todo}
            results = _map(client, _convert_file, todo, "converting")
            for task, r in zip(todo, results, strict=True):
                if "error" in r:
                    skipped[task["path"]] = r["error"]
                    tasks.remove(task)
                    todo.remove(task)
                else:
                    reports[r["output"]] = r
            if not tasks:
                raise InputFileError("no input file could be read: " + "; ".join(skipped.values()))
        n_events = sum(int(reports[t["output"]]["n_events"]) for t in tasks)
        if merged is None:
            result = ConvertResult(
                outputs=[Path(t["output"]) for t in tasks],
                n_events=n_events,
                converted=len(todo),
                reused=len(tasks) - len(todo),
                skipped=skipped,
            )
        else:
            attrs = _merged_attrs(tasks, reports, merge_hash)
            attrs["skipped_files"] = skipped
            _merge(
                [Path(t["output"]) for t in tasks],
                merged,
                attrs=attrs,
                shuffle=self.config.shuffle,
                seed=self.config.seed,
                block=self.config.step_size,
                compression=self.config.compression,
            )
            shutil.rmtree(_parts_dir(merged), ignore_errors=True)
            result = ConvertResult([merged], n_events, 1, 0, skipped)
        logger.info("%r", result)
        return result

    def _check_scans(
        self, files: list[_InputFile], scans: dict[str, dict[str, Any]]
    ) -> tuple[list[_InputFile], dict[str, str]]:
        """The readable inputs, and the unreadable ones with why (or an error naming the first)."""
        skipped = {f.path: scans[f.path]["error"] for f in files if scans[f.path].get("error")}
        for path, why in skipped.items():
            if not self.config.skip_bad_files:
                raise InputFileError(
                    f"{why} Fix or remove the file, or set convert.skip_bad_files: true to skip "
                    "unreadable inputs with a report."
                )
            logger.warning("skipping unreadable input %s: %s", path, why)
        good = [f for f in files if f.path not in skipped]
        if not good:
            raise InputFileError(
                f"none of the {len(files)} input files could be read; skipped: "
                + "; ".join(skipped.values())
            )
        return good, skipped

    def _plan(self, path: str, tree: str, scan: dict[str, Any]) -> dict[str, Any]:
        """What to read from every file and how to pad it, from the layout of the first file."""
        layout = scan["layout"]
        scalar_names = [n for n in layout["scalars"] if n not in RESERVED_FIELDS]
        colls = layout["collections"]
        where = f"{path}:{tree}"
        for name in self.config.collections:
            if name not in colls:
                raise ConfigError(
                    f"convert.collections names '{name}', which is not a collection of {where} "
                    f"(collections: {', '.join(colls) or 'none'}).{did_you_mean(name, colls)} "
                    "Remove it, or add it to convert.objects only when the files have it."
                )
        objects = ["*" if p == "all" else p for p in self.config.objects]
        chosen = _match(objects, list(colls), "convert.objects entry")
        chosen += [c for c in self.config.collections if c not in chosen]
        scalars = ["*" if p == "all" else p for p in self.config.scalars]
        plan: dict[str, Any] = {
            "scalars": _match(scalars, scalar_names, "convert.scalars entry"),
            "reserved": [n for n in RESERVED_FIELDS if n in layout["scalars"]],
            "collections": {},
        }
        for coll in chosen:
            cc = self.config.collections.get(coll, CollectionConfig())
            available = list(colls[coll]["fields"])
            fields = _match(cc.fields, available, f"convert.collections.{coll}.fields entry")
            if cc.sort_by is not None and cc.sort_by not in available:
                raise ConfigError(
                    f"cannot sort {coll} by '{cc.sort_by}': it is not a numeric field of {coll} in "
                    f"{where} (fields: {', '.join(available)}).{did_you_mean(cc.sort_by, available)}"
                    " Set sort_by to one of the fields, or to null to keep the file order."
                )
            plan["collections"][coll] = {
                "counter": colls[coll]["counter"],
                "fields": fields,
                "branches": {f: colls[coll]["fields"][f] for f in available},
                "max_len": cc.max_len,
                "quantile": cc.quantile,
                "sort_by": cc.sort_by,
                "pad_value": cc.pad_value,
            }
        return plan

    def _datasets(
        self,
        fileset: dict[str, dict[str, Any]],
        good: list[_InputFile],
        scans: dict[str, dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Per dataset: events, sum of weights and the factor normalising genWeight to xsec x lumi."""
        out = []
        for ds, entry in fileset.items():
            meta = entry["metadata"]
            mine = [f for f in good if f.dataset == ds]
            n = sum(int(scans[f.path]["n_events"]) for f in mine)
            sumw = float(sum(scans[f.path]["sumw"] for f in mine))
            is_mc = bool(meta.get("is_mc", True))
            xsec = meta.get("xsec")
            factor = 1.0
            if is_mc and xsec is not None:
                if not np.isfinite(sumw) or sumw == 0:
                    raise DataError(
                        f"dataset '{ds}': the sum of genWeight is {sumw}, so it cannot be "
                        "normalised to its cross-section; check the input files or remove its xsec."
                    )
                factor = float(xsec) * self.config.lumi / sumw
            out.append(
                {
                    "name": ds,
                    "label": meta["label"],
                    "n_events": n,
                    "xsec": xsec,
                    "is_mc": is_mc,
                    "sumw": sumw,
                    "factor": factor,
                    "files": [f.path for f in mine],
                }
            )
        return out

    def _tasks(
        self,
        good: list[_InputFile],
        scans: dict[str, dict[str, Any]],
        plan: dict[str, Any],
        datasets: list[dict[str, Any]],
        class_names: list[str],
        skipped: dict[str, str],
        output: str | Path | None,
    ) -> list[dict[str, Any]]:
        """One self-contained job per input file (picklable for the cluster)."""
        from .. import __version__

        c = self.config
        index = {d["name"]: i for i, d in enumerate(datasets)}
        base = Path(output if output is not None else c.output)
        if c.merge and len(good) > 1:
            directory = _parts_dir(base)
        elif c.merge:
            directory = base.parent
        else:
            directory = base.with_suffix("") if base.suffix == ".h5" else base
        names: set[str] = set()
        tasks = []
        for f in good:
            ds = datasets[index[f.dataset]]
            if c.merge and len(good) == 1:
                target = base
            else:
                stem = f"{f.dataset}_{Path(f.path.split('://')[-1]).stem}"
                name, k = stem, 1
                while name in names:
                    k += 1
                    name = f"{stem}_{k}"
                names.add(name)
                target = directory / f"{name}.h5"
            scan = scans[f.path]
            attrs = {
                "cmsmlkit_version": __version__,
                "config": dump_yaml(c.to_dict(full=True)),
                "skim_config": "",
                "input_files": [f.path],
                "cutflow": {
                    f.dataset: {"all": {"events": int(scan["n_events"]), "sumw": scan["sumw"]}}
                },
                "sumw": {d["name"]: d["sumw"] for d in datasets},
                "datasets": [
                    {k: d[k] for k in ("name", "label", "n_events", "xsec", "is_mc")}
                    for d in datasets
                ],
                "class_names": class_names,
                "skipped_files": skipped,
            }
            task = {
                "path": f.path,
                "tree": f.tree,
                "dataset": f.dataset,
                "dataset_index": index[f.dataset],
                "label": class_names.index(ds["label"]),
                "factor": ds["factor"],
                "plan": plan,
                "compression": c.compression,
                "step_size": c.step_size,
                "skip_bad_files": c.skip_bad_files,
                "output": str(target),
                "attrs": attrs,
                "file_id": scan["file_id"],
            }
            task["hash"] = _digest(
                {k: v for k, v in task.items() if k != "attrs"},
                {k: v for k, v in attrs.items() if k != "cmsmlkit_version"},
            )
            tasks.append(task)
        return tasks

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


# --------------------------------------------------------------------------- streaming ROOT input


@dataclass
class ConvertResult:
    """What :meth:`HDF5Writer.convert` returns.

    Attributes
    ----------
    outputs : list of Path
        The HDF5 files: one merged file, or one per input file.
    n_events : int
        Events written (or found already written) in all outputs.
    converted : int
        Outputs written by this call.
    reused : int
        Outputs found finished for the same config and inputs, and kept.
    skipped : dict of str to str
        Unreadable inputs skipped (``skip_bad_files``) -> why.

    Examples
    --------
    >>> ConvertResult(outputs=[Path("a.h5")], n_events=10, converted=1, reused=0)
    ConvertResult(outputs=['a.h5'], n_events=10, converted=1, reused=0, skipped=0)
    """

    outputs: list[Path]
    n_events: int
    converted: int
    reused: int
    skipped: dict[str, str] = dataclass_field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"ConvertResult(outputs={[str(p) for p in self.outputs]}, n_events={self.n_events}, "
            f"converted={self.converted}, reused={self.reused}, skipped={len(self.skipped)})"
        )


@dataclass
class _InputFile:
    path: str
    tree: str
    dataset: str


def _fileset_of(inputs: Any) -> dict[str, dict[str, Any]]:
    """Any accepted form of inputs -> ``{dataset: {"files": {path: tree}, "metadata": {...}}}``."""
    if hasattr(inputs, "fileset") and callable(inputs.fileset):
        inputs = inputs.fileset()
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)):
        inputs = {"events": list(inputs)}
    if not isinstance(inputs, Mapping) or not inputs:
        raise ConfigError(
            "nothing to convert: give convert.inputs ({label: [files or globs]}), a fileset, a "
            f"NanoAODSource or a list of ROOT files (got {inputs!r})."
        )
    out = normalise_fileset(inputs, what="inputs")
    for ds, entry in out.items():
        files = entry["files"]
        resolved: dict[str, str] = {}
        for name, tree in files.items():
            for path in _expand(str(name), str(ds)):
                resolved.setdefault(path, str(tree))
        entry["files"] = resolved
        entry["metadata"].setdefault("label", ds)
    return out


def _expand(entry: str, dataset: str) -> list[str]:
    if "://" in entry:
        return [entry]
    path = os.path.expanduser(entry)
    if any(ch in path for ch in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise InputFileError(
                f"inputs['{dataset}']: the pattern {entry} matches no file "
                f"(working directory: {Path.cwd()})."
            )
        return [str(Path(p).resolve()) for p in found]
    if not Path(path).is_file():
        raise InputFileError(
            f"inputs['{dataset}']: input file {entry} does not exist "
            f"(working directory: {Path.cwd()})."
        )
    return [str(Path(path).resolve())]


def _class_names(fileset: dict[str, dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for entry in fileset.values():
        label = str(entry["metadata"]["label"])
        if label not in names:
            names.append(label)
    return names


def _map(client: Any, function: Any, items: list[Any], what: str, events: bool = False) -> Any:
    """``function`` over ``items``, in this process or on the dask client, with a progress bar.

    Returns ``{path: result}`` for scans (items are ``(path, tree)``), a list otherwise.
    """
    from tqdm.auto import tqdm

    results: list[Any] = []
    if client is None:
        for item in tqdm(items, desc=what, unit="file", disable=len(items) < 2):
            results.append(function(item))
    else:
        from distributed import as_completed

        futures = client.map(function, items, pure=False)
        order = {f.key: i for i, f in enumerate(futures)}
        done: dict[int, Any] = {}
        for future in tqdm(as_completed(futures), total=len(futures), desc=what, unit="file"):
            done[order[future.key]] = future.result()
        results = [done[i] for i in range(len(items))]
    if items and isinstance(items[0], tuple):
        return {item[0]: r for item, r in zip(items, results, strict=True)}
    return results


def _root_layout(tree: Any) -> dict[str, Any]:
    """Scalars and collections of a NanoAOD-like TTree, from its branches' interpretations.

    A collection is every jagged numeric branch sharing one counter (``nJet`` ->
    ``Jet_pt``, ``Jet_eta``, ...); a scalar is a numeric branch of one value per event.
    """
    from uproot.interpretation.jagged import AsJagged
    from uproot.interpretation.numerical import AsDtype

    scalars: list[str] = []
    collections: dict[str, dict[str, Any]] = {}
    counters: set[str] = set()
    for branch in tree.itervalues(recursive=True):
        interp = branch.interpretation
        counter = getattr(branch, "count_branch", None)
        if isinstance(interp, AsJagged) and counter is not None:
            content = interp.content
            if not isinstance(content, AsDtype) or content.to_dtype.shape:
                continue
            if content.to_dtype.kind not in "biuf":
                continue
            cname = counter.name
            coll = cname[1:] if cname.startswith("n") and len(cname) > 1 else cname
            name = branch.name
            fname = name[len(coll) + 1 :] if name.startswith(coll + "_") else name
            entry = collections.setdefault(coll, {"counter": cname, "fields": {}})
            entry["fields"][fname] = name
            counters.add(cname)
        elif (
            isinstance(interp, AsDtype)
            and not interp.to_dtype.shape
            and interp.to_dtype.kind in "biuf"
        ):
            scalars.append(branch.name)
    return {
        "scalars": [s for s in scalars if s not in counters],
        "collections": collections,
    }


def _scan_file(item: tuple[str, str]) -> dict[str, Any]:
    """The cheap first pass over one input: layout, entries, counter histograms, sum of weights.

    Never raises for a bad file: returns ``{"error": why}`` so that the caller
    can stop naming it, or skip it (``skip_bad_files``).
    """
    import uproot

    path, treename = item
    try:
        with uproot.open(path) as file:
            keys = file.keys(cycle=False, recursive=False)
            if treename not in keys:
                return {
                    "error": f"{path} has no tree '{treename}'.{did_you_mean(treename, keys)} "
                    f"It holds: {', '.join(keys[:20]) or 'nothing'}."
                }
            tree = file[treename]
            layout = _root_layout(tree)
            n_events = int(tree.num_entries)
            hists: dict[str, np.ndarray] = {}
            counters = [c["counter"] for c in layout["collections"].values()]
            runs_sumw = _runs_sumw(file)
            # without a Runs tree the events' genWeight is summed in the same pass
            weight = "genWeight" if runs_sumw is None and "genWeight" in layout["scalars"] else None
            events_sumw = 0.0
            wanted = counters + ([weight] if weight else [])
            if wanted and n_events:
                # in steps, so that the first pass holds no whole-file array
                for arrays in tree.iterate(wanted, step_size=SCAN_STEP, library="np"):
                    for coll, c in layout["collections"].items():
                        h = np.bincount(np.asarray(arrays[c["counter"]]).astype(np.int64))
                        old = hists.get(coll, np.zeros(0, np.int64))
                        if len(h) < len(old):
                            h, old = old, h
                        h[: len(old)] += old
                        hists[coll] = h
                    if weight:
                        events_sumw += float(np.sum(arrays[weight], dtype=np.float64))
                    del arrays
            if runs_sumw is not None:
                sumw = runs_sumw
            else:
                sumw = events_sumw if weight else float(n_events)
            try:
                stat = os.stat(path)
                file_id = [stat.st_size, stat.st_mtime_ns]
            except OSError:  # a URL
                file_id = [path, n_events]
    except FileNotFoundError:
        return {"error": f"input file {path} does not exist (working directory: {Path.cwd()})."}
    except Exception as exc:  # uproot raises many kinds for a corrupt or truncated file
        return {
            "error": f"cannot read {path} as a ROOT file ({type(exc).__name__}: {exc}); it is "
            "corrupt, truncated or not ROOT."
        }
    return {
        "layout": layout,
        "branches": list(tree.keys(recursive=True)),
        "n_events": n_events,
        "hists": {coll: h.tolist() for coll, h in hists.items()},
        "sumw": sumw,
        "file_id": file_id,
    }


def _runs_sumw(file: Any) -> float | None:
    """Sum of genWeight before any cut from the ``Runs`` tree's genEventSumw; None without it."""
    if "Runs" in file.keys(cycle=False) and "genEventSumw" in file["Runs"].keys():  # noqa: SIM118
        return float(np.sum(file["Runs"]["genEventSumw"].array(library="np")))
    return None


def _check_branches(path: str, tree: str, branches: list[str], plan: dict[str, Any]) -> None:
    """Every branch the plan reads is in this file, or an error naming the file and the branch."""
    present = set(branches)
    for name in _plan_branches(plan):
        if name not in present:
            raise MissingBranchError(
                f"{path}:{tree} has no branch '{name}', which the other input files have."
                f"{did_you_mean(name, present)} Every input must hold the converted branches: "
                "remove the file, or drop the branch from convert.scalars / convert.objects / "
                "the collection's fields."
            )


def _plan_branches(plan: dict[str, Any]) -> list[str]:
    names = list(plan["reserved"]) + list(plan["scalars"])
    for c in plan["collections"].values():
        wanted = list(c["fields"])
        if c["sort_by"] is not None and c["sort_by"] not in wanted:
            wanted.append(c["sort_by"])
        names += [c["branches"][f] for f in wanted]
        if not wanted:
            names.append(c["counter"])
    return list(dict.fromkeys(names))


def _plan_max_lens(plan: dict[str, Any], scans: list[dict[str, Any]]) -> None:
    """Fill each collection's ``max_len`` from the summed counter histograms when it is None."""
    for coll, c in plan["collections"].items():
        if c["max_len"] is not None:
            continue
        hists = [np.asarray(s["hists"].get(coll, []), dtype=np.int64) for s in scans]
        width = max((len(h) for h in hists), default=0)
        total = np.zeros(width, dtype=np.int64)
        for h in hists:
            total[: len(h)] += h
        c["max_len"] = max_len_from_histogram(total, c["quantile"])


def _digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=_json_default)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _parts_dir(merged: Path) -> Path:
    return merged.with_name(merged.name + ".parts")


def _finished(path: str, digest: str) -> bool:
    """True when ``path`` is a complete cmsmlkit file written for the same config and inputs."""
    if not Path(path).is_file():
        return False
    try:
        with open_hdf5(path) as f:
            return bool(f.attrs.get("config_hash") == digest)
    except (OSError, ValueError):
        return False


def _report_of(path: str) -> dict[str, Any]:
    """The report of a finished output, from its attributes."""
    with open_hdf5(path) as f:
        return {
            "output": path,
            "n_events": int(f.attrs["n_events"]),
            "padding": json.loads(f.attrs["padding"]),
        }


def _prefetch(iterator: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Run ``iterator`` in a thread, ``depth`` items ahead: reading overlaps padding and writing."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, end))
        except BaseException as exc:  # handed to the consumer
            q.put((False, exc))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _flat(array: Any) -> tuple[np.ndarray, np.ndarray]:
    """Counts and flat contents of one jagged numeric awkward array, from its offsets."""
    import awkward as ak

    layout = ak.to_layout(array)
    while layout.is_option or layout.is_indexed:
        layout = layout.content
    if not isinstance(layout, ak.contents.ListOffsetArray):
        layout = layout.to_ListOffsetArray64(True)
    offsets = np.asarray(layout.offsets)
    data = np.asarray(ak.to_numpy(layout.content))[offsets[0] : offsets[-1]]
    return np.diff(offsets), data


def _chunk_columns(
    chunk: Mapping[str, Any], plan: dict[str, Any], where: str
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The HDF5 columns of one chunk read from a file, and the events truncated per collection."""
    out: dict[str, np.ndarray] = {}
    for name in plan["scalars"]:
        values = np.asarray(chunk[name]).astype(np.float32)
        if not np.isfinite(values).all():
            bad = ~np.isfinite(values)
            raise DataError(
                f"{where}: scalar '{name}' has {int(bad.sum())} non-finite values (first at entry "
                f"{int(np.flatnonzero(bad)[0])} of this chunk); drop it from convert.scalars."
            )
        out[f"scalars/{name}"] = values
    truncated: dict[str, int] = {}
    for coll, c in plan["collections"].items():
        wanted = list(c["fields"])
        if c["sort_by"] is not None and c["sort_by"] not in wanted:
            wanted.append(c["sort_by"])
        flat: dict[str, np.ndarray] = {}
        counts: np.ndarray | None = None
        for f in wanted:
            counts, flat[f] = _flat(chunk[c["branches"][f]])
        if counts is None:
            counts = np.asarray(chunk[c["counter"]]).astype(np.int64)
        padded = pad(counts, flat, c["max_len"], sort_by=c["sort_by"], pad_value=c["pad_value"])
        for f in c["fields"]:
            out[f"objects/{coll}/{f}"] = padded.values[f]
        out[f"objects/{coll}/mask"] = padded.mask
        truncated[coll] = padded.n_truncated
    return out, truncated


def _book_columns(chunk: Mapping[str, Any], task: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    """label, weight, event_id and dataset of one chunk."""
    reserved = task["plan"]["reserved"]
    weight = (
        np.asarray(chunk["genWeight"], dtype=np.float64)
        if "genWeight" in reserved
        else np.ones(n, dtype=np.float64)
    )
    event_id = np.full((n, 3), -1, dtype=np.int64)
    for i, name in enumerate(EVENT_ID_FIELDS):
        if name in reserved:
            event_id[:, i] = np.asarray(chunk[name]).astype(np.int64)
    return {
        "label": np.full(n, task["label"], dtype=np.int64),
        "weight": (weight * task["factor"]).astype(np.float32),
        "event_id": event_id,
        "dataset": np.full(n, task["dataset_index"], dtype=np.int64),
    }


def _empty_columns(plan: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape (without rows) and dtype of every column the plan writes."""
    out: dict[str, tuple[tuple[int, ...], Any]] = {
        f"scalars/{n}": ((), np.float32) for n in plan["scalars"]
    }
    for coll, c in plan["collections"].items():
        for f in c["fields"]:
            out[f"objects/{coll}/{f}"] = ((c["max_len"],), np.float32)
        out[f"objects/{coll}/mask"] = ((c["max_len"],), np.bool_)
    out.update(
        {
            "label": ((), np.int64),
            "weight": ((), np.float32),
            "event_id": ((3,), np.int64),
            "dataset": ((), np.int64),
        }
    )
    return out


class _Appender:
    """Resizable, row-chunked datasets in an open h5py file, appended chunk by chunk.

    With ``background=True`` the writes (and the compression inside HDF5, which
    runs without the GIL) happen in a thread, overlapping the reading and
    padding of the next chunk; :meth:`close` waits for them, writes the last
    rows and re-raises any error.

    Rows are written in whole HDF5 chunks (``CHUNK_ROWS``); the rest of an
    append waits for the next one. With no chunk cache, a chunk written in two
    parts would be compressed, read back, decompressed and compressed again.
    """

    def __init__(
        self,
        f: h5py.File,
        columns: Mapping[str, tuple[tuple[int, ...], Any]],
        compression: str,
        *,
        background: bool = False,
    ):
        kwargs = _filter_kwargs(compression)
        self.datasets = {
            key: f.create_dataset(
                key,
                shape=(0, *shape),
                maxshape=(None, *shape),
                chunks=(CHUNK_ROWS, *shape),
                dtype=dtype,
                **kwargs,
            )
            for key, (shape, dtype) in columns.items()
        }
        self.n = 0
        self._pending: list[Mapping[str, np.ndarray]] = []  # appended rows not yet written
        self._pending_rows = 0
        self._queue: queue.Queue[Any] | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._work, daemon=True)
            self._thread.start()

    def append(self, cols: Mapping[str, np.ndarray]) -> None:
        if self._queue is None:
            self._write(cols)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(cols)

    def close(self) -> None:
        """Wait for the queued writes, write the last rows; raise what failed in the thread."""
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None
        if self._error is not None:
            raise self._error
        if self._pending_rows:
            self._store(self._join())
        self._pending, self._pending_rows = [], 0

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            cols = self._queue.get()
            if cols is None:
                return
            if self._error is None:
                try:
                    self._write(cols)
                except BaseException as exc:  # re-raised by append/close
                    self._error = exc

    def _write(self, cols: Mapping[str, np.ndarray]) -> None:
        self._pending.append(cols)
        self._pending_rows += len(cols["label"])
        if self._pending_rows < CHUNK_ROWS:
            return
        joined = self._join()
        whole = self._pending_rows - self._pending_rows % CHUNK_ROWS
        self._pending = (
            [{k: v[whole:].copy() for k, v in joined.items()}]
            if whole < len(joined["label"])
            else []
        )
        self._pending_rows -= whole
        self._store({k: v[:whole] for k, v in joined.items()})

    def _join(self) -> Mapping[str, np.ndarray]:
        if len(self._pending) == 1:
            return self._pending[0]
        return {k: np.concatenate([p[k] for p in self._pending]) for k in self.datasets}

    def _store(self, cols: Mapping[str, np.ndarray]) -> None:
        n = len(cols["label"])
        for key, d in self.datasets.items():
            d.resize(self.n + n, axis=0)
            d[self.n : self.n + n] = cols[key]
        self.n += n


def _write_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        f.attrs[key] = json.dumps(value, default=_json_default) if key in JSON_ATTRS else value
    f["label"].attrs["class_names"] = list(attrs["class_names"])


def _convert_file(task: dict[str, Any]) -> dict[str, Any]:
    """Convert one ROOT file to one HDF5 file, chunk by chunk (runs on a cluster worker too)."""
    import uproot

    path, plan = task["path"], task["plan"]
    where = f"{path}:{task['tree']}"
    out = Path(task["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    truncated = dict.fromkeys(plan["collections"], 0)
    first = 0
    try:
        # no chunk cache: every chunk is compressed and written as it is appended,
        # in the appender's thread, instead of piling up until the file closes
        with uproot.open(path) as file, open_hdf5(tmp, "w", rdcc_nbytes=0) as h5:
            tree = file[task["tree"]]
            appender = _Appender(h5, _empty_columns(plan), task["compression"], background=True)
            chunks = tree.iterate(
                _plan_branches(plan), step_size=task["step_size"], library="ak", how=dict
            )
            try:
                for chunk in _prefetch(_reading(chunks, where)):
                    n = len(chunk[next(iter(chunk))]) if chunk else 0
                    cols, trunc = _chunk_columns(chunk, plan, where)
                    cols.update(_book_columns(chunk, task, n))
                    appender.append(cols)
                    for coll, k in trunc.items():
                        truncated[coll] += k
                    first += n
                    del chunk, cols  # free this chunk while the next one is read
            finally:
                appender.close()
            attrs = dict(task["attrs"])
            attrs["padding"] = {
                coll: {
                    "max_len": c["max_len"],
                    "sort_by": c["sort_by"],
                    "pad_value": c["pad_value"],
                    "fields": c["fields"],
                    "n_truncated": truncated[coll],
                }
                for coll, c in plan["collections"].items()
            }
            attrs["n_events"] = appender.n
            attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            attrs["config_hash"] = task["hash"]
            _write_attrs(h5, attrs)
        os.replace(tmp, out)
    except _UnreadableInput as exc:
        tmp.unlink(missing_ok=True)
        if task["skip_bad_files"]:
            logger.warning("skipping %s: %s", path, exc)
            return {"output": str(out), "error": str(exc)}
        raise InputFileError(str(exc)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"output": str(out), "n_events": first, "padding": attrs["padding"]}


class _UnreadableInput(Exception):
    """An input failed while its events were read (corrupt or truncated baskets)."""


def _reading(chunks: Iterator[Any], where: str) -> Iterator[Any]:
    """The chunks of uproot's iterate, its failures turned into an error naming the file."""
    entry = 0
    try:
        for chunk in chunks:
            yield chunk
            entry += len(next(iter(chunk.values()))) if chunk else 0
    except Exception as exc:  # uproot raises many kinds for a corrupt basket
        raise _UnreadableInput(
            f"cannot read {where} after entry {entry} ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated. Fix or remove it, or set "
            "convert.skip_bad_files: true to skip it with a report."
        ) from None


def _merged_attrs(
    tasks: list[dict[str, Any]], reports: dict[str, dict[str, Any]], digest: str
) -> dict[str, Any]:
    attrs = dict(tasks[0]["attrs"])
    attrs["input_files"] = [t["path"] for t in tasks]
    cutflow: dict[str, Any] = {}
    for t in tasks:
        for ds, steps in t["attrs"]["cutflow"].items():
            entry = cutflow.setdefault(ds, {"all": {"events": 0, "sumw": 0.0}})
            entry["all"]["events"] += steps["all"]["events"]
            entry["all"]["sumw"] += steps["all"]["sumw"]
    attrs["cutflow"] = cutflow
    padding: dict[str, Any] = {}
    for t in tasks:
        for coll, spec in reports[t["output"]]["padding"].items():
            if coll in padding:
                padding[coll]["n_truncated"] += spec["n_truncated"]
            else:
                padding[coll] = dict(spec)
    attrs["padding"] = padding
    attrs["n_events"] = sum(int(reports[t["output"]]["n_events"]) for t in tasks)
    attrs["config_hash"] = digest
    attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return attrs


def _merge(
    parts: list[Path],
    output: Path,
    *,
    attrs: dict[str, Any],
    shuffle: bool,
    seed: int,
    block: int,
    compression: str,
) -> None:
    """Merge per-input files into one, in blocks of ``block`` rows, atomically.

    With ``shuffle``, each block takes from every part a seeded, hypergeometric
    share of its rows (so every block mixes all inputs in proportion) and the
    block's rows are permuted; memory holds one block plus HDF5's chunk caches.
    """
    from tqdm.auto import tqdm

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    rng = np.random.default_rng(seed)
    sources: list[h5py.File] = []
    try:
        sources.extend(open_hdf5(p, rdcc_nbytes=8 * 1024**2) for p in parts)
        with open_hdf5(tmp, "w") as out:
            keys: list[str] = []
            sources[0].visititems(
                lambda name, obj: keys.append(name) if hasattr(obj, "shape") else None
            )
            columns = {k: (sources[0][k].shape[1:], sources[0][k].dtype) for k in keys}
            appender = _Appender(out, columns, compression)
            remaining = np.array([s["label"].shape[0] for s in sources], dtype=np.int64)
            position = np.zeros(len(sources), dtype=np.int64)
            total = int(remaining.sum())
            with tqdm(total=total, desc="merging", unit="event", disable=total < block) as bar:
                while remaining.sum() > 0:
                    size = int(min(block, remaining.sum()))
                    if shuffle:
                        take = rng.multivariate_hypergeometric(remaining, size)
                    else:
                        take = np.zeros_like(remaining)
                        i = int(np.flatnonzero(remaining)[0])
                        take[i] = min(size, remaining[i])
                    cols = {}
                    for k in keys:
                        pieces = [
                            s[k][position[i] : position[i] + take[i]]
                            for i, s in enumerate(sources)
                            if take[i]
                        ]
                        cols[k] = np.concatenate(pieces)
                    if shuffle:
                        order = rng.permutation(len(cols["label"]))
                        cols = {k: v[order] for k, v in cols.items()}
                    appender.append(cols)
                    position += take
                    remaining -= take
                    bar.update(int(take.sum()))
            appender.close()
            _write_attrs(out, attrs)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for s in sources:
            s.close()


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
        configs as dicts, ``skim_config`` None when absent), plus ``file``,
        ``paths``: ``{dataset path: (shape, dtype name)}`` of every dataset, and
        ``features``: ``{feature name: shape per event}`` (``ht``: ``()``,
        ``Jet.pt``: ``(L,)``), the names the Trainer's ``features`` select from.

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
        f = open_hdf5(path, "r")
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
    features: dict[str, tuple[int, ...]] = {}
    for name, (shape, _) in paths.items():
        parts = name.split("/")
        if parts[0] == "scalars" and len(parts) == 2:
            features[parts[1]] = ()
        elif parts[0] == "objects" and len(parts) == 3 and parts[2] != "mask":
            features[f"{parts[1]}.{parts[2]}"] = tuple(shape[1:])
    info["features"] = features
    for required in ("label", "weight", "event_id"):
        if required not in paths:
            raise InputFileError(
                f"{path}: the dataset '/{required}' is missing; write the file again."
            )
    return info
