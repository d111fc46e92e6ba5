"""The Skimmer: NanoAOD fileset -> selected events, as a coffea processor.

A :class:`Skimmer` is built from a :class:`~cmsmlkit.config.SkimConfig`
(object definitions, event cuts, derived variables, collections to keep). Its
constructor parses every expression, so a typo fails at once, and opens
nothing. :meth:`Skimmer.run` checks the inputs (every file readable, every
branch the selection names present in the first file of each dataset), then
runs a stateless coffea processor over the fileset in chunks, locally or on
the dask cluster of the ``cluster:`` block, and returns a :class:`SkimResult`.

Per chunk the processor

1. applies the optional ``function`` (``events -> events``, the notebook escape hatch);
2. for collision data with a ``lumi_mask`` (the dataset's golden JSON), keeps
   the certified luminosity blocks only (coffea's ``LumiMask``);
3. defines the objects in order (``GoodJet: {from: Jet, where: ...}`` keeps the
   jets passing ``where``; an object may be defined from an earlier one);
4. applies the dataset's own ``cuts``, then the selection's cuts, in order,
   recording events and the sum of ``genWeight`` after each (the cutflow);
5. computes the variables (float64 per event; later variables may use earlier ones);
6. returns the selected events: variables, kept collections (plain jagged
   records), the ``keep`` branches, ``run``, ``luminosityBlock``, ``event`` and
   ``genWeight``, less what ``drop`` names.

Chunks are merged in file order and entry order, so a run split into small
chunks gives exactly the arrays of a run in one chunk.

Faults: a chunk that fails to read is tried ``retries`` more times; then its
file is skipped with a report (``SkimResult.skipped``: file -> error) when
``skip_bad_files`` is set, or the run stops with that report. On a dask
cluster the chunks of a worker that dies are re-run by dask on another worker.
With ``output`` set, the skim writes ``<dataset>.root`` files, ``cutflow.json``
and ``skim.json`` (a hash of the configuration and of the inputs), each
atomically; a rerun with the same configuration and inputs reads them back
instead of skimming again. A progress bar (tqdm, in a terminal or a notebook)
counts the chunks.

>>> skimmer = Skimmer(selection={"cuts": ["num(Jet) >= 2"], "variables": {"ht": "sum(Jet.pt)"}})
>>> result = skimmer.run({"ttbar": {"files": {"ttbar.root": "Events"}}})  # doctest: +SKIP
>>> print(result.cutflow_table())  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import html
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import awkward as ak
import numpy as np
from coffea import processor
from coffea.nanoevents import NanoAODSchema
from tqdm.auto import tqdm

from ..cluster import dask_client
from ..config import ClusterConfig, SkimConfig, build_config, config_hash
from ..errors import (
    CmsmlError,
    ConfigError,
    EmptySelectionError,
    ExpressionError,
    InputFileError,
    MissingBranchError,
    closest,
    did_you_mean,
)
from .expr import CONSTANTS, Expression, FieldNamespace, parse, positions, select, take_events
from .source import normalise_fileset

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Skimmer", "SkimResult"]

log = logging.getLogger(__name__)

#: Per-event columns every skim keeps.
EVENT_ID = ("run", "luminosityBlock", "event")
WEIGHT = "genWeight"
#: The branch of a skimmed ROOT file holding the class index of its dataset.
LABEL = "label"
_RESERVED = (*EVENT_ID, WEIGHT, LABEL)
#: The column of :meth:`Skimmer.select` ``entries=True``: each event's position in its chunk.
ENTRY = "_entry"
#: The cutflow step of the golden-JSON lumi mask.
LUMI_STEP = "lumi_mask"
#: What a skim output directory holds besides the ROOT files.
CUTFLOW_FILE = "cutflow.json"
STATE_FILE = "skim.json"


# --------------------------------------------------------------------------- result


@dataclass
class SkimResult:
    """What :meth:`Skimmer.run` returns (see docs/internals.md, SkimResult).

    Attributes
    ----------
    arrays : dict of str to ak.Array
        dataset -> one record per selected event: the variables (float64), the
        kept collections (jagged records), ``run``, ``luminosityBlock``,
        ``event`` (int64) and ``genWeight`` (float64).
    cutflow : dict
        dataset -> ordered ``{"all": {"events": n, "sumw": w}, "<cut>": {...}}``.
    metadata : dict
        dataset -> fileset metadata plus ``"sumw"`` (sum of genWeight before
        any cut), ``"files"`` and, when some were skipped, ``"skipped_files"``.
    class_names : list of str
        class labels in order of first appearance among the datasets.
    skipped : dict
        dataset -> {file: why it was skipped}, for the files ``skip_bad_files``
        left out (empty when none were).

    Examples
    --------
    >>> r = SkimResult(arrays={}, cutflow={"dy": {"all": {"events": 4, "sumw": 4.0}}},
    ...                metadata={}, class_names=["background"])
    >>> r.n_events
    0
    """

    arrays: dict[str, ak.Array]
    cutflow: dict[str, dict[str, dict[str, Any]]]
    metadata: dict[str, dict[str, Any]]
    class_names: list[str] = field(default_factory=list)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def n_events(self) -> int:
        """Selected events over all datasets."""
        return sum(len(a) for a in self.arrays.values())

    def _rows(self) -> tuple[list[str], list[str]]:
        """Datasets, and the steps of all of them merged (a dataset's own step after its predecessor)."""
        datasets = list(self.cutflow)
        steps: list[str] = []
        for flow in self.cutflow.values():
            at = 0
            for step in flow:
                if step in steps:
                    at = steps.index(step) + 1
                else:
                    steps.insert(at, step)
                    at += 1
        return datasets, steps

    def _cell(self, dataset: str, steps: list[str], i: int) -> str:
        flow = self.cutflow[dataset]
        if steps[i] not in flow:
            return "-"
        n = flow[steps[i]]["events"]
        own = list(flow)
        at = own.index(steps[i])
        if at == 0:
            return f"{n}"
        prev = flow[own[at - 1]]["events"]  # efficiency against this dataset's previous step
        eff = f" ({100.0 * n / prev:.1f}%)" if prev else ""
        return f"{n}{eff}"

    def cutflow_table(self) -> str:
        """The cutflow as a text table: events after each step, and the step's efficiency."""
        datasets, steps = self._rows()
        if not datasets:
            return "(no datasets)"
        cells = [[self._cell(d, steps, i) for d in datasets] for i in range(len(steps))]
        first = max(len("cut"), *(len(s) for s in steps))
        widths = [max(len(d), *(len(row[j]) for row in cells)) for j, d in enumerate(datasets)]
        lines = [
            "cut".ljust(first)
            + "".join(f"  {d:>{w}}" for d, w in zip(datasets, widths, strict=True))
        ]
        for step, row in zip(steps, cells, strict=True):
            lines.append(
                step.ljust(first) + "".join(f"  {c:>{w}}" for c, w in zip(row, widths, strict=True))
            )
        return "\n".join(lines)

    def skipped_report(self) -> str:
        """The skipped files, one line each with the error; empty when none were skipped."""
        return "\n".join(
            f"skipped {path} (dataset '{ds}'): {why}"
            for ds, files in self.skipped.items()
            for path, why in files.items()
        )

    def __repr__(self) -> str:
        head = (
            f"SkimResult({len(self.arrays)} dataset(s), {self.n_events} selected event(s), "
            f"classes={self.class_names})"
        )
        report = self.skipped_report()
        return head + "\n" + self.cutflow_table() + ("\n" + report if report else "")

    def save_cutflow(self, path: str | Path) -> Path:
        """Write the cutflow as JSON, ``{dataset: {step: {"events": n, "sumw": w}}}``, atomically.

        >>> result.save_cutflow("skims/cutflow.json")  # doctest: +SKIP
        PosixPath('skims/cutflow.json')
        """
        path = Path(path)
        _write_json(path, self.cutflow)
        return path

    @staticmethod
    def read_cutflow(path: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
        """Read a cutflow saved by :meth:`save_cutflow` (steps keep their order)."""
        return dict(json.loads(Path(path).read_text()))

    def cutflow_figure(self, weighted: bool = False) -> Figure:
        """The cutflow as a CMS-style figure: events (or sum of genWeight) after each step.

        One line per dataset on a log scale, the steps along the x axis.

        >>> fig = result.cutflow_figure()  # doctest: +SKIP
        >>> from cmsmlkit.plots import save_figure; save_figure(fig, "figures", "cutflow")  # doctest: +SKIP
        """
        import matplotlib.style
        import mplhep
        from matplotlib.figure import Figure

        from ..plots import LABEL as CMS_TEXT

        datasets, steps = self._rows()
        key = "sumw" if weighted else "events"
        with matplotlib.style.context(mplhep.style.CMS):
            fig = Figure(figsize=(max(8.0, 1.2 * len(steps) + 4), 8))
            ax = fig.add_subplot()
            x = np.arange(len(steps))
            for ds in datasets:
                flow = self.cutflow[ds]
                y = np.array([flow.get(s, {}).get(key, np.nan) for s in steps], dtype=float)
                y[y <= 0] = np.nan  # nothing left: off the log scale
                ax.plot(x, y, marker="o", drawstyle="steps-mid", label=ds)
            ax.set_xticks(x, [_short(s) for s in steps], rotation=30, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("sum of genWeight" if weighted else "events")
            ax.set_xlabel("")
            if datasets:
                ax.legend(title="dataset")
            mplhep.cms.label(ax=ax, data=False, text=CMS_TEXT, rlabel="")
            fig.tight_layout()
        return fig

    @classmethod
    def load(cls, directory: str | Path) -> SkimResult:
        """Read a skim written by :meth:`Skimmer.write` (ROOT files, cutflow.json, skim.json).

        >>> result = SkimResult.load("skims")  # doctest: +SKIP
        """
        import uproot

        directory = Path(directory)
        state_path = directory / STATE_FILE
        if not state_path.is_file():
            raise InputFileError(
                f"{directory} holds no finished skim ({STATE_FILE} is missing); run the Skimmer "
                "with output set to this directory."
            )
        state = json.loads(state_path.read_text())
        cutflow = cls.read_cutflow(directory / CUTFLOW_FILE)
        arrays: dict[str, ak.Array] = {}
        for ds, info in state["datasets"].items():
            with uproot.open(directory / info["file"]) as file:
                raw = file["Events"].arrays(library="ak")
            arrays[ds] = _from_branches(raw, info["columns"])
        return cls(
            arrays=arrays,
            cutflow=cutflow,
            metadata={ds: info["metadata"] for ds, info in state["datasets"].items()},
            class_names=list(state["class_names"]),
            skipped={ds: dict(info.get("skipped", {})) for ds, info in state["datasets"].items()},
        )

    def _repr_html_(self) -> str:
        datasets, steps = self._rows()
        esc = html.escape
        head = "".join(f"<th>{esc(d)}</th>" for d in datasets)
        body = "".join(
            f"<tr><td><code>{esc(s)}</code></td>"
            + "".join(f"<td>{esc(self._cell(d, steps, i))}</td>" for d in datasets)
            + "</tr>"
            for i, s in enumerate(steps)
        )
        return (
            f"<p><b>SkimResult</b>: {len(self.arrays)} dataset(s), {self.n_events} selected "
            f"event(s), classes {esc(str(self.class_names))}</p>"
            f"<table><tr><th>cut</th>{head}</tr>{body}</table>"
        )


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Object:
    name: str
    source: str
    where: Expression | None
    root: str  # the NanoAOD collection it comes from in the end


@dataclass(frozen=True)
class _Plan:
    """The parsed selection: everything the processor needs, checked once."""

    objects: tuple[_Object, ...]
    cuts: tuple[tuple[str, Expression], ...]  # (cutflow key, expression)
    variables: tuple[tuple[str, Expression], ...]
    collections: dict[str, tuple[str, ...]]  # kept collection -> field patterns

    @classmethod
    def from_config(cls, config: SkimConfig) -> _Plan:
        sel = config.selection
        objects: list[_Object] = []
        defined: dict[str, _Object] = {}
        names = list(sel.objects)
        for i, (name, obj) in enumerate(sel.objects.items()):
            key = f"skim.selection.objects.{name}"
            _check_identifier(name, key)
            if obj.from_ in names[i + 1 :] and obj.from_ != name:
                raise ConfigError(
                    f"{key}.from is '{obj.from_}', which is defined later; objects are built in "
                    f"order, so move '{obj.from_}' above '{name}'."
                )
            where = parse(obj.where, context=f"{key}.where") if obj.where.strip() else None
            root = defined[obj.from_].root if obj.from_ in defined else obj.from_
            defined[name] = _Object(name, obj.from_, where, root)
            objects.append(defined[name])
        variables = list(sel.variables)
        cuts: list[tuple[str, Expression]] = []
        for i, text in enumerate(sel.cuts):
            expr = parse(text, context=f"skim.selection.cuts[{i}]")
            used = expr.names & set(variables)
            if used:
                raise ExpressionError(
                    f"skim.selection.cuts[{i}] ({text!r}) uses the variable(s) "
                    f"{', '.join(sorted(used))}, but variables are computed after the cuts; "
                    "write their expression into the cut instead."
                )
            label = text.strip()
            if label in ("all", *(k for k, _ in cuts)):
                label = f"{label} (cuts[{i}])"  # a repeated cut keeps its own cutflow row
            cuts.append((label, expr))
        parsed_vars: list[tuple[str, Expression]] = []
        for name, text in sel.variables.items():
            key = f"skim.selection.variables.{name}"
            _check_identifier(name, key)
            if name in _RESERVED or name in defined:
                raise ConfigError(
                    f"{key}: '{name}' is already a column of the skim; choose another name."
                )
            parsed_vars.append((name, parse(text, context=key)))
        collections = {c: tuple(f) for c, f in config.collections.items()}
        if not collections:
            collections = {o.name: ("*",) for o in objects}
        for key, names in (("keep", config.keep), ("drop", config.drop)):
            for i, pattern in enumerate(names):
                if not pattern.strip():
                    raise ConfigError(f"skim.{key}[{i}] is empty; remove it or give a name.")
        for i, pattern in enumerate(config.drop):
            if pattern in (*EVENT_ID, WEIGHT):
                raise ConfigError(
                    f"skim.drop[{i}] names '{pattern}', which every skim keeps (the event id and "
                    "the weight are needed downstream); remove it from skim.drop."
                )
        for coll, patterns in collections.items():
            if coll in sel.variables or coll in _RESERVED:
                raise ConfigError(
                    f"skim.collections.{coll}: '{coll}' is also a variable or event column; "
                    "rename one of them."
                )
            if not patterns:
                raise ConfigError(
                    f"skim.collections.{coll} lists no fields; write ['*'] to keep every field."
                )
        return cls(tuple(objects), tuple(cuts), tuple(parsed_vars), collections)

    @property
    def object_names(self) -> dict[str, _Object]:
        return {o.name: o for o in self.objects}

    def root_of(self, name: str) -> str:
        objects = self.object_names
        return objects[name].root if name in objects else name


def _check_identifier(name: str, key: str) -> None:
    if not name.isidentifier() or name.startswith("_"):
        raise ConfigError(
            f"{key}: '{name}' is not a usable name; use letters, digits and '_' "
            "(not first), e.g. GoodJet."
        )


# --------------------------------------------------------------------------- inputs


@dataclass
class _Branches:
    """What a NanoAOD file offers: branch names, and the collections they form."""

    path: str
    names: list[str]

    def __post_init__(self) -> None:
        self.set = set(self.names)
        prefixes = {b.split("_", 1)[0] for b in self.names if "_" in b}
        # uproot-written files carry one counter per jagged branch (nJet_pt): not collections
        self.collections = {p for p in prefixes if not (p.startswith("n") and p[1:] in prefixes)}
        self.collections |= {b[1:] for b in self.names if b.startswith("n") and b[1:] in prefixes}
        counters = {"n" + c for c in self.collections}
        self.scalars = {b for b in self.names if "_" not in b and b not in counters}

    def has_name(self, name: str) -> bool:
        return name in self.set or name in self.collections

    def is_jagged(self, branch: str) -> bool:
        """A list per event: a field of a counted collection (nJet), or a branch with its own counter."""
        return "n" + branch.split("_", 1)[0] in self.set or "n" + branch in self.set

    def plain(self) -> list[str]:
        """Branches with one value per event, counters and event columns excluded."""
        counters = {
            b
            for b in self.names
            if b[:1] == "n" and (b[1:] in self.set or b[1:] in self.collections)
        }
        return [
            b
            for b in self.names
            if not self.is_jagged(b) and b not in counters and b not in (*EVENT_ID, WEIGHT)
        ]

    def fields_of(self, collection: str) -> list[str]:
        start = collection + "_"
        return [b[len(start) :] for b in self.names if b.startswith(start)]

    def has_field(self, collection: str, name: str) -> bool:
        branch = f"{collection}_{name}"
        # coffea adds a global index "<x>IdxG" beside every cross-reference "<x>Idx"
        return branch in self.set or (name.endswith("G") and branch[:-1] in self.set)


def _normalise_fileset(fileset: Any) -> dict[str, dict[str, Any]]:
    """Accept coffea's fileset form, ``{dataset: [files]}``, or an object with ``.fileset()``."""
    out = normalise_fileset(fileset)
    for dataset, entry in out.items():
        if not entry["files"]:
            raise ConfigError(f"fileset['{dataset}'] has no files.")
    return out


def _open_check(path: str, treename: str) -> None:
    """Open ``path`` and look up the tree; raise InputFileError saying what is wrong."""
    import uproot

    if "://" not in path and not Path(path).exists():
        raise InputFileError(f"input file {path} does not exist (working directory: {Path.cwd()}).")
    try:
        with uproot.open(path) as file:
            keys = file.keys(cycle=False)
            if treename not in keys:
                near = closest(treename, keys)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise InputFileError(
                    f"{path} has no tree '{treename}'.{hint} It holds: {', '.join(keys[:20]) or 'nothing'}."
                )
    except InputFileError:
        raise
    except Exception as exc:
        raise InputFileError(
            f"cannot read {path} as a ROOT file ({type(exc).__name__}: {exc}). The file is missing, "
            "truncated or not ROOT; check it with uproot.open, or set skim.skip_bad_files: true to "
            "skip unreadable files."
        ) from None


def _read_branches(path: str, treename: str) -> _Branches:
    import uproot

    try:
        with uproot.open(path) as file:
            return _Branches(path, list(file[treename].keys()))
    except Exception as exc:
        raise InputFileError(
            f"cannot read the branches of {path}:{treename} ({type(exc).__name__}: {exc})."
        ) from None


# --------------------------------------------------------------------------- per-chunk physics


class _Namespace(Mapping[str, Any]):
    """Names an expression sees: defined objects and variables first, then the events' fields."""

    def __init__(self, events: Any, extra: dict[str, Any]) -> None:
        self.events = events
        self.extra = extra
        self._fields = list(getattr(events, "fields", []))

    def __getitem__(self, name: str) -> Any:
        if name in self.extra:
            return self.extra[name]
        if name in self._fields:
            return self.events[name]
        raise KeyError(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self.extra
        yield from (f for f in self._fields if f not in self.extra)

    def __len__(self) -> int:
        return len(set(self.extra) | set(self._fields))

    def __contains__(self, name: object) -> bool:
        return name in self.extra or name in self._fields


def _per_event(value: Any, n: int, expr: Expression, what: str) -> np.ndarray:
    """One value per event as a numpy array; a list per event is an error naming the expression."""
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return np.full(n, value)
    if isinstance(value, ak.Array):
        if value.ndim != 1 or value.fields:
            raise expr._error(
                f"{what} must give one number per event, but this gives "
                f"{'a record' if value.fields else 'a list'} per event ({value.type}); reduce it "
                "with any(...), all(...), num(...), sum(...) or max(...), or pick one object with [:, 0]"
            )
        layout = value.layout
        if isinstance(layout, ak.contents.NumpyArray):  # nothing missing: no fill needed
            return np.asarray(layout.data)
        value = ak.to_numpy(ak.fill_none(value, np.nan if what == "a variable" else False))
    return np.asarray(value)


def _plain(collection: Any, fields: list[str]) -> ak.Array:
    """The kept fields of a collection as a plain (behaviour-free, packed) awkward array."""
    gathered = _gather(collection, fields) if fields else None
    if gathered is not None:
        return gathered
    if collection.ndim >= 2:
        counts = ak.to_numpy(ak.num(collection, axis=1))
        columns = {f: ak.to_numpy(ak.flatten(collection[f], axis=1)) for f in fields}
        return ak.unflatten(ak.zip(columns, depth_limit=1), counts)
    return ak.zip({f: ak.to_numpy(collection[f]) for f in fields}, depth_limit=1)


def _gather(collection: Any, fields: list[str]) -> ak.Array | None:
    """:func:`_plain` with numpy, for lists of records of numbers (None for anything else).

    A selected collection is a list per event (after event cuts, a view of
    some events' lists) over an index into the original records; one
    position array built from the lists' starts and stops reads every field.
    """
    layout = collection.layout
    if isinstance(layout, ak.contents.ListOffsetArray):
        offsets = np.asarray(layout.offsets.data)
        starts, stops = offsets[:-1], offsets[1:]
    elif isinstance(layout, ak.contents.ListArray):
        starts, stops = np.asarray(layout.starts.data), np.asarray(layout.stops.data)
    else:
        return None
    new_offsets, position = positions(starts, stops)
    content = layout.content
    while type(content) is ak.contents.IndexedArray:
        position = np.asarray(content.index.data)[position]
        content = content.content
    if not isinstance(content, ak.contents.RecordArray) or content.is_tuple:
        return None
    columns = []
    for name in fields:
        if name not in content.fields:
            return None
        column = content.content(name)
        if not isinstance(column, ak.contents.NumpyArray) or column.data.ndim != 1:
            return None
        columns.append(ak.contents.NumpyArray(np.asarray(column.data)[position]))
    records = ak.contents.RecordArray(columns, list(fields), length=len(position))
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(new_offsets), records))


@dataclass(frozen=True)
class _Layout:
    """What the skim outputs: kept collections and their fields, plain branches, variables."""

    collections: dict[str, list[str]]
    branches: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()
    entry: bool = False  # add ENTRY: each selected event's position in the chunk


@dataclass
class _Extra:
    """What one dataset adds to the selection: its own cuts and its golden-JSON lumi mask."""

    cuts: tuple[tuple[str, Expression], ...] = ()
    lumi_mask: Any = None  # a coffea LumiMask
    lumi_path: str | None = None


def _branch(events: Any, name: str) -> np.ndarray:
    """A plain per-event NanoAOD branch (``HLT_IsoMu24`` is ``events.HLT.IsoMu24``) as numpy."""
    fields = getattr(events, "fields", [])
    if name in fields:
        value = events[name]
    else:
        prefix, rest = name.split("_", 1)
        value = events[prefix][rest]
    return ak.to_numpy(value)


def _select(
    events: Any,
    plan: _Plan,
    layout: _Layout,
    function: Callable[[Any], Any] | None,
    extra: _Extra | None = None,
) -> tuple[ak.Array, dict[str, dict[str, float]]]:
    """Apply the selection to one chunk: the selected records and the chunk's cutflow."""
    extra = extra or _Extra()
    n_in = len(events)
    weight = _weights(events)
    cutflow = {"all": {"events": n_in, "sumw": float(weight.sum())}}
    origin = np.arange(n_in)  # the chunk position of each event still there
    if function is not None:
        events = function(events)
        weight = _weights(events)
        cutflow[_function_label(function)] = {"events": len(events), "sumw": float(weight.sum())}
    if extra.lumi_mask is not None:
        certified = np.asarray(
            extra.lumi_mask(ak.to_numpy(events.run), ak.to_numpy(events.luminosityBlock)),
            dtype=bool,
        )
        events = events[certified]
        weight = weight[certified]
        origin = origin[certified]
        cutflow[LUMI_STEP] = {"events": len(events), "sumw": float(weight.sum())}
    objects: dict[str, Any] = {}
    for obj in plan.objects:
        source = _Namespace(events, objects)[obj.source]
        if obj.where is None:
            objects[obj.name] = source
            continue
        mask = obj.where.evaluate(FieldNamespace(source, _Namespace(events, objects)))
        objects[obj.name] = select(source, mask)
    defined = objects  # before the cuts; each cut below slices a (cheap, lazy) view of them
    rows = np.arange(len(events))
    n_defined = len(events)
    for label, cut in (*extra.cuts, *plan.cuts):
        mask = _per_event(cut.evaluate(_Namespace(events, objects)), len(events), cut, "a cut")
        if mask.dtype != np.bool_:
            raise cut._error(
                f"a cut must be True or False per event, but this gives {mask.dtype} values; "
                "compare it with something, e.g. ... > 0"
            )
        events = events[mask]
        objects = {k: v[mask] for k, v in objects.items()}
        weight = weight[mask]
        rows = rows[mask]
        cutflow[label] = {"events": len(events), "sumw": float(weight.sum())}
    # the selected events of each object, resolved once: the variables' fast paths need it
    selected = np.zeros(n_defined, dtype=bool)
    selected[rows] = True
    objects = {k: take_events(v, selected) for k, v in defined.items()}
    n = len(events)
    columns: dict[str, Any] = {}
    variables: dict[str, Any] = {}
    for name, expr in plan.variables:
        value = expr.evaluate(_Namespace(events, {**objects, **variables}))
        variables[name] = _per_event(value, n, expr, "a variable").astype(np.float64)
        if name in layout.variables:
            columns[name] = variables[name]
    ns = _Namespace(events, objects)
    for coll, fields in layout.collections.items():
        columns[coll] = _plain(ns[coll], fields)
    for name in layout.branches:
        columns[name] = _branch(events, name)
    for name in EVENT_ID:
        columns[name] = ak.to_numpy(events[name]).astype(np.int64)
    if layout.entry:
        if function is not None:
            raise ConfigError(
                "the position of selected events in the chunk is not known after a function "
                "(it may reorder or add events); select without entries=True."
            )
        columns[ENTRY] = origin[rows]
    columns[WEIGHT] = weight.astype(np.float64)
    return ak.zip(columns, depth_limit=1), cutflow


def _events(file: Any, tree: str, start: int, stop: int, **options: Any) -> Any:
    """coffea NanoEvents of entries [start, stop) of an open uproot file (``preload``: read together)."""
    from coffea.nanoevents import NanoEventsFactory

    meta = {"filename": file.file_path, "treename": tree, "entrystart": start, "entrystop": stop}
    with warnings.catch_warnings():
        _quiet_coffea()
        return NanoEventsFactory.from_root(
            file=file,
            treepath=tree,
            schemaclass=_QuietNanoAODSchema,
            metadata={**meta, **options.pop("metadata", {})},
            mode="virtual",
            entry_start=start,
            entry_stop=stop,
            **options,
        ).events()


def _trace(
    file: Any, tree: str, function: Callable[[Any], Any], metadata: dict[str, Any] | None = None
) -> list[str]:
    """The branches ``function`` reads from NanoEvents of an open file: traced on zero events.

    coffea's ``trace_with_length_zero_array`` runs it on a length-zero copy of
    the file's events and records the branches touched; no event data is read.
    """
    from coffea.nanoevents.trace import trace_with_length_zero_array

    events = _events(file, tree, 0, 0, metadata=metadata or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return sorted(trace_with_length_zero_array(function, events, throw=True))


def _preload(files: dict[str, str], instance: _SkimProcessor, dataset: str) -> dict[str, Any]:
    """``{"preload": branches}``: what the selection reads, so coffea reads it in one go per chunk.

    Traced on the first file (:func:`_trace`). Reading the branches together,
    as ``uproot.iterate`` does, is faster than branch by branch on first use.
    A selection that cannot be traced reads lazily instead, as does one with a
    ``function`` (which may need real events).
    """
    import uproot

    path, tree = next(iter(files.items()))
    try:
        with uproot.open(path) as file:
            return {"preload": _trace(file, tree, instance.process, {"dataset": dataset})}
    except Exception as exc:  # the run itself reports real errors
        log.debug("no preload for %s (tracing failed: %s)", dataset, exc)
        return {}


def _weights(events: Any) -> np.ndarray:
    if WEIGHT in getattr(events, "fields", []):
        return ak.to_numpy(events[WEIGHT]).astype(np.float64)
    return np.ones(len(events), dtype=np.float64)


def _function_label(function: Callable[..., Any]) -> str:
    return f"function {getattr(function, '__name__', type(function).__name__)}"


class _SkimProcessor(processor.ProcessorABC):  # type: ignore[misc]
    """Stateless coffea processor: the selection and what to keep; one accumulator per chunk.

    The accumulator is ``{dataset: {"chunks": [((file, entry_start), records, cutflow)]}}``
    with ``cutflow = {step: {"events": n, "sumw": w}}`` of that chunk: coffea's
    ``accumulate`` concatenates the chunk lists.
    """

    def __init__(
        self,
        plan: _Plan,
        layout: _Layout,
        function: Callable[[Any], Any] | None = None,
        extras: dict[str, _Extra] | None = None,
    ) -> None:
        self.plan = plan
        self.layout = layout
        self.function = function
        self.extras = extras or {}

    def process(self, events: Any) -> dict[str, Any]:
        meta = events.metadata
        with warnings.catch_warnings():
            _quiet_coffea()
            records, cutflow = _select(
                events, self.plan, self.layout, self.function, self.extras.get(meta["dataset"])
            )
        chunk = (meta["filename"], int(meta["entrystart"]))
        # the cutflow stays per chunk, so a file skipped later can be taken out whole
        return {meta["dataset"]: {"chunks": [(chunk, records, cutflow)]}}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


class _QuietNanoAODSchema(NanoAODSchema):  # type: ignore[misc]
    """coffea's NanoAODSchema without its notes about cross-references (on workers too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            _quiet_coffea()
            super().__init__(*args, **kwargs)


def _quiet_coffea() -> None:
    """Silence the schema's notes about cross-references and Photon fields in real NanoAOD."""
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"coffea\.nanoevents")


# --------------------------------------------------------------------------- execution


@dataclass
class _ChunkFailure:
    """A chunk that could not be processed after every attempt (picklable, sent back by workers)."""

    dataset: str
    filename: str
    entrystart: int
    entrystop: int
    attempts: int
    error: str

    def describe(self) -> str:
        return (
            f"{self.filename} (dataset '{self.dataset}', entries {self.entrystart} to "
            f"{self.entrystop}) failed {self.attempts} time(s): {self.error}"
        )


def _root_cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost exception (coffea wraps the reader's own)."""
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    return f"{type(inner).__name__}: {inner}"


def _attempt(function: Callable[[Any], Any], attempts: int, item: Any) -> Any:
    """Run one chunk up to ``attempts`` times; a cmsmlkit error (a selection bug) is not retried."""
    work = item[0] if isinstance(item, tuple) else item
    error = ""
    for _ in range(attempts):
        try:
            return function(item)
        except Exception as exc:  # a read that failed: the network, a broken basket, ...
            unwrapped = _unwrap(exc)
            if isinstance(unwrapped, CmsmlError):
                raise unwrapped from None
            error = _root_cause(exc)
    return {
        "out": {
            "_failures": [
                _ChunkFailure(
                    work.dataset,
                    work.filename,
                    int(work.entrystart),
                    int(work.entrystop),
                    attempts,
                    error,
                )
            ]
        }
    }


def _bar(total: int, enabled: bool) -> Any:
    """The progress bar over chunks: tqdm.auto, so a widget in a notebook and text in a terminal."""
    return tqdm(total=total, desc="skim", unit="chunk", disable=not enabled, dynamic_ncols=True)


@dataclass
class _QuietExecutor(processor.IterativeExecutor):  # type: ignore[misc]
    """coffea's in-process executor without its bar (for reading the files' entry counts)."""

    def __call__(self, items: Iterable[Any], function: Callable[..., Any], accumulator: Any) -> Any:
        return processor.accumulate(map(function, items), accumulator), 0


@dataclass
class _LocalExecutor(processor.IterativeExecutor):  # type: ignore[misc]
    """coffea's in-process executor with per-chunk attempts and a tqdm progress bar."""

    attempts: int = 1

    def __call__(self, items: Iterable[Any], function: Callable[..., Any], accumulator: Any) -> Any:
        items = list(items)
        out = accumulator
        with _bar(len(items), self.status) as bar:
            for item in items:
                out = processor.accumulate([_attempt(function, self.attempts, item)], out)
                bar.update()
        return out, 0


@dataclass
class _ClusterExecutor(processor.DaskExecutor):  # type: ignore[misc]
    """coffea's dask executor, results gathered as they finish (a tqdm bar over chunks).

    A chunk is retried on its worker (``attempts``); a chunk whose worker dies
    is rescheduled by dask itself (up to ``distributed.scheduler.allowed-failures``).
    """

    attempts: int = 1

    def __call__(self, items: Iterable[Any], function: Callable[..., Any], accumulator: Any) -> Any:
        from functools import partial

        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        items = list(items)
        if self.heavy_input is not None:
            heavy = self.client.scatter(self.heavy_input, broadcast=True, hash=False)
            items = [(item, heavy) for item in items]
        futures = self.client.map(
            partial(_attempt, function, self.attempts), items, pure=False, priority=self.priority
        )
        work = {
            f.key: (i[0] if isinstance(i, tuple) else i)
            for f, i in zip(futures, items, strict=True)
        }
        out = accumulator
        try:
            with _bar(len(futures), self.status) as bar:
                for future in as_completed(futures):
                    try:
                        result = future.result()
                    except KilledWorker:
                        item = work[future.key]
                        raise InputFileError(
                            f"the chunk {item.filename} (entries {item.entrystart} to "
                            f"{item.entrystop}) killed the workers that ran it, again and again "
                            "(out of memory? a crash in a compiled library?). Lower "
                            "skim.chunksize or give the workers more memory."
                        ) from None
                    out = processor.accumulate([result], out)
                    bar.update()
        finally:
            self.client.cancel(futures)
        return out, 0


# --------------------------------------------------------------------------- the Skimmer


class Skimmer:
    """Select events and objects from NanoAOD with a coffea processor.

    Parameters
    ----------
    config : SkimConfig, dict, str or Path, optional
        The skim section (a YAML path holds just that section's keys).
    cluster : ClusterConfig or dict, optional
        Where to run (default: in this process).
    function : callable, optional
        ``events -> events``, applied to every chunk before the selection
        (e.g. to add a corrected field). The check of branch names against the
        files is skipped when it is set, since it may add fields.
    **fields
        Any :class:`~cmsmlkit.config.SkimConfig` field, overriding ``config``.

    Notes
    -----
    A progress bar counts the chunks (tqdm: text in a terminal, a widget in a
    notebook); set the environment variable ``CMSMLKIT_PROGRESS=0`` to hide it
    (e.g. in batch logs). Per-dataset ``cuts`` and ``lumi_mask`` come with the
    fileset metadata (``NanoAODSource`` puts them there). Files written by
    uproot with one counter per jagged branch (``nJet_pt``) work as well as
    CMSSW-written NanoAOD.

    Examples
    --------
    >>> skimmer = Skimmer(
    ...     selection={
    ...         "objects": {"GoodJet": {"from": "Jet", "where": "pt > 30 & abs(eta) < 2.4"}},
    ...         "cuts": ["num(GoodJet) >= 2"],
    ...         "variables": {"ht": "sum(GoodJet.pt)"},
    ...     },
    ...     collections={"GoodJet": ["pt", "eta"]},
    ... )
    >>> result = skimmer.run({"tt": {"files": {"nano_tt.root": "Events"}}})  # doctest: +SKIP
    >>> result.arrays["tt"].ht  # doctest: +SKIP
    """

    def __init__(
        self,
        config: SkimConfig | dict[str, Any] | str | Path | None = None,
        *,
        cluster: ClusterConfig | dict[str, Any] | None = None,
        function: Callable[[Any], Any] | None = None,
        **fields: Any,
    ) -> None:
        self.config: SkimConfig = build_config(SkimConfig, config, fields)
        self.cluster: ClusterConfig = build_config(ClusterConfig, cluster, {})
        if function is not None and not callable(function):
            raise ConfigError(f"function must be callable (events -> events), not {function!r}.")
        self.function = function
        self._plan = _Plan.from_config(self.config)

    def __repr__(self) -> str:
        sel = self.config.selection
        return (
            f"Skimmer(objects={list(sel.objects)}, cuts={sel.cuts}, "
            f"variables={list(sel.variables)}, collections={list(self._plan.collections)}, "
            f"cluster={self.cluster.type!r})"
        )

    # ------------------------------------------------------------------ checks

    def _check_branches(self, branches: _Branches, dataset: str) -> dict[str, list[str]]:
        """Check every name against one file's branches; return the kept fields per collection."""
        plan = self._plan
        objects = plan.object_names
        defined: set[str] = set()
        for obj in plan.objects:
            key = f"skim.selection.objects.{obj.name}"
            if obj.source not in defined:
                self._need_collection(branches, obj.source, f"{key}.from", dataset)
            if obj.where is not None:
                self._check_where(branches, obj, defined)
            defined.add(obj.name)
        variables: set[str] = set()
        for _, expr in plan.cuts:
            self._check_expr(branches, expr, set(objects))
        for name, expr in plan.variables:
            self._check_expr(branches, expr, set(objects) | variables)
            variables.add(name)
        keep: dict[str, list[str]] = {}
        for coll, patterns in plan.collections.items():
            key = f"skim.collections.{coll}"
            if coll not in objects:
                self._need_collection(branches, coll, key, dataset)
            root = plan.root_of(coll)
            available = branches.fields_of(root)
            chosen: list[str] = []
            for pattern in patterns:
                if any(ch in pattern for ch in "*?["):
                    matched = fnmatch.filter(available, pattern)
                    if not matched:
                        raise MissingBranchError(
                            f"{key}: the pattern '{pattern}' matches no field of {root} in "
                            f"{branches.path} (fields: {', '.join(available[:30])})."
                        )
                elif branches.has_field(root, pattern):
                    matched = [pattern]
                else:
                    raise self._missing(branches, f"{root}_{pattern}", f"{key} lists '{pattern}'")
                chosen.extend(m for m in matched if m not in chosen)
            keep[coll] = chosen
        return keep

    def _need_collection(self, branches: _Branches, name: str, key: str, dataset: str) -> None:
        if name not in branches.collections:
            near = closest(name, sorted(branches.collections))
            hint = f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else ""
            raise MissingBranchError(
                f"{key}: no collection '{name}' (no branch n{name} or {name}_*) in "
                f"{branches.path} (dataset '{dataset}').{hint}"
            )

    def _check_expr(self, branches: _Branches, expr: Expression, known: set[str]) -> None:
        for name in sorted(expr.names):
            if name in known or name in CONSTANTS:
                continue
            if not branches.has_name(name):
                pool = sorted(branches.collections | known | branches.scalars)
                raise self._missing(branches, name, f"{expr.context} ({expr.text!r})", pool)
        for name, attr in sorted(expr.attributes):
            if name in known and name not in self._plan.object_names:
                continue  # a field of a variable: checked when evaluated
            root = self._plan.root_of(name)
            if not branches.has_field(root, attr):
                raise self._missing(branches, f"{root}_{attr}", f"{expr.context} ({expr.text!r})")

    def _check_where(self, branches: _Branches, obj: _Object, defined: set[str]) -> None:
        assert obj.where is not None
        expr = obj.where
        for name in sorted(expr.names):
            if branches.has_field(obj.root, name) or name in defined or branches.has_name(name):
                continue
            raise self._missing(branches, f"{obj.root}_{name}", f"{expr.context} ({expr.text!r})")
        for name, attr in sorted(expr.attributes):
            if branches.has_field(obj.root, name):
                continue  # a field of a field: left to evaluation
            root = self._plan.root_of(name)
            if not branches.has_field(root, attr):
                raise self._missing(branches, f"{root}_{attr}", f"{expr.context} ({expr.text!r})")

    @staticmethod
    def _missing(
        branches: _Branches, branch: str, where: str, pool: Iterable[str] | None = None
    ) -> MissingBranchError:
        if pool is None and "_" in branch:
            # a field of a collection: compare with that collection's fields only
            root, name = branch.split("_", 1)
            near = [f"{root}_{m}" for m in closest(name, branches.fields_of(root))]
        else:
            near = closest(branch, list(pool) if pool is not None else branches.names)
        hint = f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else ""
        return MissingBranchError(
            f"{where} needs the branch '{branch}', which is not in {branches.path}.{hint}"
        )

    # ------------------------------------------------------------------ one file, in this process

    def branches(
        self,
        path: str,
        tree: str = "Events",
        *,
        collections: Mapping[str, Iterable[str]] | None = None,
    ) -> list[str]:
        """The branches the selection reads from ``path``, after checking them against the file.

        Raises :class:`~cmsmlkit.errors.InputFileError` for a file that is
        missing or not ROOT and :class:`~cmsmlkit.errors.MissingBranchError`
        (with the nearest names) for a branch the selection needs that the
        file lacks. ``collections`` as in :meth:`select`.

        >>> Skimmer(selection={"cuts": ["num(Jet) >= 2"]}).branches("nano.root")  # doctest: +SKIP
        ['Jet_pt', ..., 'event', 'genWeight', 'luminosityBlock', 'nJet', 'run']
        """
        import uproot

        _open_check(path, tree)
        with uproot.open(path) as file:
            return self._branches_in(file, path, tree, collections)

    def _branches_in(
        self,
        file: Any,
        path: str,
        tree: str,
        collections: Mapping[str, Iterable[str]] | None,
    ) -> list[str]:
        if self.function is None:
            self._check_branches(_Branches(path, list(file[tree].keys())), _stem_of(path))
        try:
            return _trace(file, tree, lambda events: self.select(events, collections=collections))
        except CmsmlError:
            raise
        except Exception as exc:
            raise InputFileError(
                f"cannot read the structure of {path}:{tree} ({type(exc).__name__}: {exc})."
            ) from None

    def iterate(
        self,
        path: str,
        tree: str = "Events",
        *,
        collections: Mapping[str, Iterable[str]] | None = None,
        entries: bool = False,
    ) -> Iterator[tuple[Any, ak.Array, dict[str, dict[str, float]]]]:
        """Select ``path`` chunk by chunk in this process: ``(events, records, cutflow)`` per chunk.

        The file is opened once and each chunk (``chunksize`` entries) reads
        the branches the selection needs together (:meth:`branches`, which
        also checks them first). ``events`` are the chunk's NanoEvents (every
        entry: their ``run``, ``event``, ``genWeight`` are already read),
        ``records`` and ``cutflow`` what :meth:`select` gives (``collections``
        and ``entries`` as there). For one file in a script or a prediction;
        :meth:`run` is the way for filesets.

        >>> for events, records, cutflow in Skimmer(...).iterate("nano.root"):  # doctest: +SKIP
        ...     print(len(events), len(records))
        """
        import uproot

        _open_check(path, tree)
        with uproot.open(path) as file:
            branches = self._branches_in(file, path, tree, collections)
            n = file[tree].num_entries
            step = self.config.chunksize
            layout: _Layout | None = None
            for start in range(0, n, step):
                stop = min(start + step, n)
                try:
                    events = _events(file, tree, start, stop, preload=branches)
                    if layout is None:
                        layout = self._chunk_layout(events, collections, entries)
                    records, cutflow = self._select_chunk(events, layout)
                except CmsmlError:
                    raise
                except Exception as exc:
                    raise InputFileError(
                        f"cannot read {path} (entries {start} to {stop}): {_root_cause(exc)}. "
                        "Check the file with uproot.open; it may be truncated or corrupt."
                    ) from None
                yield events, records, cutflow

    # ------------------------------------------------------------------ work

    def select(
        self,
        events: Any,
        *,
        collections: Mapping[str, Iterable[str]] | None = None,
        entries: bool = False,
    ) -> tuple[ak.Array, dict[str, dict[str, float]]]:
        """Apply the selection to one chunk of coffea NanoEvents, as :meth:`run` does per chunk.

        Returns the selected records (variables, kept collections, kept
        branches, event id and weight; the layout of ``SkimResult.arrays``)
        and the chunk's cutflow. ``collections`` (collection -> fields)
        replaces ``skim.collections`` for what is kept, e.g. only what a model
        reads. With ``entries`` the records also hold ``_entry``, each selected
        event's position among ``events`` (not with a ``function``, which may
        reorder events). The ``function`` runs first, if there is one;
        per-dataset cuts and lumi masks come with filesets and are not applied here.

        >>> events = NanoEventsFactory.from_root({"nano.root": "Events"}).events()  # doctest: +SKIP
        >>> records, cutflow = Skimmer(selection=...).select(events)  # doctest: +SKIP
        """
        return self._select_chunk(events, self._chunk_layout(events, collections, entries))

    def _select_chunk(
        self, events: Any, layout: _Layout
    ) -> tuple[ak.Array, dict[str, dict[str, float]]]:
        with warnings.catch_warnings():
            _quiet_coffea()
            return _select(events, self._plan, layout, self.function)

    def _chunk_layout(
        self, events: Any, collections: Mapping[str, Iterable[str]] | None, entries: bool
    ) -> _Layout:
        """What :meth:`select` keeps, resolved against the fields of ``events``."""
        fields = list(getattr(events, "fields", []))
        wanted = dict(self._plan.collections if collections is None else collections)
        keep: dict[str, list[str]] = {}
        for coll, patterns in wanted.items():
            root = self._plan.root_of(coll)
            available = list(events[root].fields) if root in fields else []
            keep[coll] = _match_fields(available, patterns)
        plain: list[str] = []
        for name in fields if self.config.keep else ():
            value = events[name]
            if value.ndim == 1:
                plain.extend([name] if not value.fields else [f"{name}_{f}" for f in value.fields])
        branches = [b for p in self.config.keep for b in fnmatch.filter(plain, p)]
        layout = self._apply_drop(keep, list(dict.fromkeys(branches)))
        return dataclasses.replace(layout, entry=entries)

    def run(self, fileset: Any) -> SkimResult:
        """Skim ``fileset`` (coffea form, ``{dataset: [files]}`` or a source with ``.fileset()``).

        With ``output`` set and a finished skim of the same configuration and
        inputs already there, it is read back and nothing is skimmed.

        Raises
        ------
        InputFileError
            a file is missing, not ROOT, lacks the tree, or cannot be read
            after every attempt (unless ``skip_bad_files``); a lumi mask file
            is missing or not a golden JSON.
        MissingBranchError
            a collection, field or branch the selection names is not in the files.
        ExpressionError
            an expression fails on the data (e.g. ``[:, 0]`` of an empty list).
        EmptySelectionError
            the inputs have events but the cuts keep none in any dataset.
        """
        fileset = _normalise_fileset(fileset)
        extras = {d: self._extra(d, e["metadata"]) for d, e in fileset.items()}
        key = None
        if self.config.output:
            key = self._state_key(fileset)
            if _finished(Path(self.config.output), key, list(fileset)):
                log.info("the skim in %s is up to date; nothing to do", self.config.output)
                return SkimResult.load(self.config.output)
        skipped: dict[str, dict[str, str]] = {d: {} for d in fileset}
        good: dict[str, dict[str, str]] = {}
        for dataset, entry in fileset.items():
            good[dataset] = {}
            for path, tree in entry["files"].items():
                try:
                    _open_check(path, tree)
                except InputFileError as exc:
                    if not self.config.skip_bad_files:
                        raise
                    log.warning("skipping %s: %s", path, exc)
                    skipped[dataset][path] = str(exc)
                    continue
                good[dataset][path] = tree
        layout = self._resolve_layout(good, extras)
        runnable = {d: {"files": files} for d, files in good.items() if files}
        output: dict[str, Any] = {}
        if runnable:
            output = self._run_coffea(runnable, layout, extras)
        for failure in output.pop("_failures", []):
            if not self.config.skip_bad_files:
                raise InputFileError(
                    f"cannot read {failure.describe()}. Check the file (uproot.open), or set "
                    "skim.skip_bad_files: true to skip unreadable files with a report."
                )
            if failure.filename not in skipped[failure.dataset]:
                log.warning("skipping %s", failure.describe())
                skipped[failure.dataset][failure.filename] = failure.error
        result = self._assemble(fileset, output, skipped, layout, extras)
        if self.config.output:
            self.write(result, self.config.output, key=key)
        return result

    def _extra(self, dataset: str, metadata: Mapping[str, Any]) -> _Extra:
        """Parse the dataset's own cuts and load its lumi mask: errors before any file is read."""
        variables = {name for name, _ in self._plan.variables}
        taken = {"all", LUMI_STEP, *(label for label, _ in self._plan.cuts)}
        cuts: list[tuple[str, Expression]] = []
        texts = metadata.get("cuts") or []
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            context = f"source.datasets.{dataset}.cuts[{i}]"
            expr = parse(text, context=context)
            used = expr.names & variables
            if used:
                raise ExpressionError(
                    f"{context} ({text!r}) uses the variable(s) {', '.join(sorted(used))}, but "
                    "variables are computed after the cuts; write their expression instead."
                )
            label = text.strip()
            if label in taken:
                label = f"{label} ({context})"
            taken.add(label)
            cuts.append((label, expr))
        path = metadata.get("lumi_mask")
        if not path:
            return _Extra(tuple(cuts))
        return _Extra(tuple(cuts), _lumi_mask(dataset, str(path)), str(path))

    def _steps(self, extra: _Extra) -> list[str]:
        steps = ["all"]
        if self.function is not None:
            steps.append(_function_label(self.function))
        if extra.lumi_mask is not None:
            steps.append(LUMI_STEP)
        return steps + [label for label, _ in extra.cuts] + [label for label, _ in self._plan.cuts]

    def _state_key(self, fileset: dict[str, dict[str, Any]]) -> str:
        """What makes a finished skim reusable: the configuration and the inputs as they are now."""
        inputs: dict[str, list[int] | None] = {}
        for entry in fileset.values():
            for path in entry["files"]:
                try:
                    st = os.stat(path)
                    inputs[path] = [st.st_size, st.st_mtime_ns]
                except OSError:
                    inputs[path] = None  # remote (or missing: the run says so)
        function = None
        if self.function is not None:
            function = f"{getattr(self.function, '__module__', '')}." + getattr(
                self.function, "__qualname__", repr(self.function)
            )
        payload = json.dumps(
            [config_hash(self.config), fileset, inputs, function], sort_keys=True, default=str
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _resolve_layout(
        self, good: dict[str, dict[str, str]], extras: dict[str, _Extra]
    ) -> _Layout:
        """Check names against the first file of each dataset; the outputs common to all."""
        keep: dict[str, list[str]] | None = None
        branches: list[str] | None = None
        for dataset, files in good.items():
            if not files:
                continue
            path, tree = next(iter(files.items()))
            found = _read_branches(path, tree)
            if self.function is not None:
                this = {
                    c: _match_fields(found.fields_of(self._plan.root_of(c)), p)
                    for c, p in self._plan.collections.items()
                }
            else:
                this = self._check_branches(found, dataset)
                extra = extras.get(dataset, _Extra())
                for _, expr in extra.cuts:
                    self._check_expr(found, expr, set(self._plan.object_names))
            plain = self._match_keep(found)
            keep = this if keep is None else {c: [f for f in keep[c] if f in this[c]] for c in keep}
            branches = plain if branches is None else [b for b in branches if b in plain]
        keep = keep or {c: [] for c in self._plan.collections}
        return self._apply_drop(keep, branches or [])

    def _match_keep(self, found: _Branches) -> list[str]:
        """The plain per-event branches ``skim.keep`` names in one file."""
        chosen: list[str] = []
        plain = found.plain()
        for i, pattern in enumerate(self.config.keep):
            matched = fnmatch.filter(plain, pattern)
            if not matched:
                jagged = [b for b in fnmatch.filter(found.names, pattern) if found.is_jagged(b)]
                if jagged:
                    coll = jagged[0].split("_", 1)[0]
                    raise ConfigError(
                        f"skim.keep[{i}] ('{pattern}') names fields of the collection {coll}, "
                        f"which has a list per event; keep them with skim.collections: "
                        f"{{{coll}: [...]}}."
                    )
                near = closest(pattern, plain)
                hint = f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else ""
                raise MissingBranchError(
                    f"skim.keep[{i}]: '{pattern}' matches no per-event branch of {found.path}.{hint}"
                )
            chosen.extend(m for m in matched if m not in chosen)
        return chosen

    def _apply_drop(self, keep: dict[str, list[str]], branches: list[str]) -> _Layout:
        variables = [name for name, _ in self._plan.variables]
        columns = variables + branches + [f"{c}_{f}" for c, fields in keep.items() for f in fields]
        dropped: set[str] = set()
        for i, pattern in enumerate(self.config.drop):
            matched = fnmatch.filter(columns, pattern)
            if not matched:
                raise ConfigError(
                    f"skim.drop[{i}]: '{pattern}' matches no output column."
                    f"{did_you_mean(pattern, columns)} The columns are: {', '.join(columns[:40])}."
                )
            dropped.update(matched)
        collections = {
            c: [f for f in fields if f"{c}_{f}" not in dropped] for c, fields in keep.items()
        }
        return _Layout(
            collections={c: f for c, f in collections.items() if f or not keep[c]},
            branches=tuple(b for b in branches if b not in dropped),
            variables=tuple(v for v in variables if v not in dropped),
        )

    def _run_coffea(
        self, fileset: dict[str, Any], layout: _Layout, extras: dict[str, _Extra]
    ) -> dict[str, Any]:
        treename = next(iter(next(iter(fileset.values()))["files"].values()))
        instance = _SkimProcessor(self._plan, layout, self.function, extras)
        if self.function is None:  # a user's function is not run outside the chunks
            fileset = {d: {**e, **_preload(e["files"], instance, d)} for d, e in fileset.items()}
        attempts = 1 + self.config.retries
        status = _want_progress()
        with dask_client(self.cluster) as client:
            if client is None:
                executor: Any = _LocalExecutor(status=status, retries=0, attempts=attempts)
                pre: Any = _QuietExecutor(status=False, retries=0)
            else:
                executor = _ClusterExecutor(
                    client=client, status=status, retries=0, attempts=attempts
                )
                pre = processor.DaskExecutor(client=client, status=False, retries=0)
            runner = processor.Runner(
                executor,
                pre_executor=pre,
                schema=_QuietNanoAODSchema,
                chunksize=self.config.chunksize,
                skipbadfiles=False,
                savemetrics=False,
            )
            try:
                with warnings.catch_warnings():
                    _quiet_coffea()
                    out = runner(fileset, processor_instance=instance, treename=treename)
            except Exception as exc:
                raise _unwrap(exc) from None
        return dict(out or {})

    def _assemble(
        self,
        fileset: dict[str, dict[str, Any]],
        output: dict[str, Any],
        skipped: dict[str, dict[str, str]],
        layout: _Layout,
        extras: dict[str, _Extra],
    ) -> SkimResult:
        arrays: dict[str, ak.Array] = {}
        cutflow: dict[str, dict[str, dict[str, Any]]] = {}
        metadata: dict[str, dict[str, Any]] = {}
        class_names: list[str] = []
        for dataset, entry in fileset.items():
            order = {path: i for i, path in enumerate(entry["files"])}
            acc = output.get(dataset, {})
            chunks = sorted(
                (c for c in acc.get("chunks", []) if c[0][0] not in skipped[dataset]),
                key=lambda c: (order.get(c[0][0], 0), c[0][1]),
            )
            if chunks:
                arrays[dataset] = _concatenate([c[1] for c in chunks])
            else:
                arrays[dataset] = self._empty(layout)
            steps = self._steps(extras.get(dataset, _Extra()))
            flow = {s: {"events": 0, "sumw": 0.0} for s in steps}
            for chunk in chunks:
                for step, numbers in chunk[2].items():
                    flow[step]["events"] += int(numbers["events"])
                    flow[step]["sumw"] += float(numbers["sumw"])
            cutflow[dataset] = flow
            meta = dict(entry["metadata"])
            meta["sumw"] = cutflow[dataset]["all"]["sumw"]
            meta["files"] = [p for p in entry["files"] if p not in skipped[dataset]]
            if skipped[dataset]:
                meta["skipped_files"] = list(skipped[dataset])
            metadata[dataset] = meta
            label = meta.get("label", dataset)
            if label not in class_names:
                class_names.append(label)
        result = SkimResult(
            arrays, cutflow, metadata, class_names, {d: dict(f) for d, f in skipped.items() if f}
        )
        n_in = sum(f["all"]["events"] for f in cutflow.values())
        if n_in and result.n_events == 0:
            raise EmptySelectionError(self._empty_message(result))
        return result

    def _empty_message(self, result: SkimResult) -> str:
        datasets, steps = result._rows()
        culprit = next(
            (
                s
                for s in steps
                if sum(result.cutflow[d].get(s, {}).get("events", 0) for d in datasets) == 0
            ),
            steps[-1],
        )
        return (
            f"no event of any dataset passes the selection: nothing is left after the cut "
            f"'{culprit.strip()}'. Loosen that cut (or the object definitions it uses).\n"
            f"Cutflow:\n{result.cutflow_table()}"
        )

    def _empty(self, layout: _Layout) -> ak.Array:
        columns: dict[str, Any] = {name: np.zeros(0, np.float64) for name in layout.variables}
        for coll, fields in layout.collections.items():
            columns[coll] = ak.unflatten(
                ak.zip({f: np.zeros(0, np.float64) for f in fields}, depth_limit=1)
                if fields
                else ak.Array(np.zeros(0)),
                np.zeros(0, np.int64),
            )
        columns.update({name: np.zeros(0, np.float64) for name in layout.branches})
        columns.update({name: np.zeros(0, np.int64) for name in EVENT_ID})
        columns[WEIGHT] = np.zeros(0, np.float64)
        return ak.zip(columns, depth_limit=1)

    def write(
        self, result: SkimResult, directory: str | Path, *, key: str | None = None
    ) -> list[Path]:
        """Write ``result`` to ``directory``: a NanoAOD-like ROOT file per dataset and the cutflow.

        ``<dataset>.root`` holds a TTree ``Events``: collections as NanoAOD
        branches (``GoodJet_pt`` with the counter ``nGoodJet``), variables, kept
        branches and event columns as plain branches, and ``label``, the class
        index of the dataset (its position in ``result.class_names``).
        ``cutflow.json`` holds the cutflow and ``skim.json`` what
        :meth:`SkimResult.load` needs (and ``key``, the hash a rerun compares).
        Every file is written under a temporary name and renamed when complete;
        ``skim.json`` comes last, so only a finished skim counts as one.
        """
        import uproot

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATE_FILE).unlink(missing_ok=True)  # unfinished until rewritten
        written: list[Path] = []
        datasets: dict[str, Any] = {}
        for dataset, array in result.arrays.items():
            target = directory / f"{dataset}.root"
            tmp = target.with_name(target.name + ".tmp")
            branches = {name: array[name] for name in array.fields}
            label = result.metadata.get(dataset, {}).get("label", dataset)
            index = result.class_names.index(label) if label in result.class_names else -1
            branches[LABEL] = ak.Array(np.full(len(array), index, np.int32))
            with uproot.recreate(tmp) as file:
                tree = file.mktree("Events", {k: _branch_type(v) for k, v in branches.items()})
                if len(array):
                    tree.extend(branches)
            os.replace(tmp, target)
            written.append(target)
            datasets[dataset] = {
                "file": target.name,
                "columns": _columns_of(array),
                "metadata": result.metadata.get(dataset, {}),
                "skipped": result.skipped.get(dataset, {}),
            }
        result.save_cutflow(directory / CUTFLOW_FILE)
        from .. import __version__

        _write_json(
            directory / STATE_FILE,
            {
                "key": key,
                "cmsmlkit": __version__,
                "class_names": result.class_names,
                "datasets": datasets,
            },
        )
        return written


def _concatenate(parts: list[ak.Array]) -> ak.Array:
    """The chunks' records end to end: numpy on the columns of the skim's own flat layout.

    ``ak.concatenate`` gives the same array but first normalises every list
    it meets; a skim's records are already plain columns and packed lists of
    plain columns, so joining their buffers is all there is to do.
    """
    layouts = [p.layout for p in parts]
    if len(parts) == 1:
        return parts[0]
    if not all(layout.form == layouts[0].form for layout in layouts) or not all(
        isinstance(layout, ak.contents.RecordArray) for layout in layouts
    ):
        return ak.concatenate(parts, axis=0)
    columns = []
    for name in layouts[0].fields:
        pieces = [layout.content(name) for layout in layouts]
        joined = _join(pieces)
        if joined is None:
            return ak.concatenate(parts, axis=0)
        columns.append(joined)
    length = sum(len(p) for p in parts)
    return ak.Array(ak.contents.RecordArray(columns, list(layouts[0].fields), length=length))


def _join(pieces: list[ak.contents.Content]) -> ak.contents.Content | None:
    """Plain numbers, or packed lists of records of plain numbers, end to end; None otherwise."""
    first = pieces[0]
    if isinstance(first, ak.contents.NumpyArray):
        return ak.contents.NumpyArray(np.concatenate([np.asarray(p.data) for p in pieces]))
    if not isinstance(first, ak.contents.ListOffsetArray):
        return None
    offsets = [np.asarray(p.offsets.data) for p in pieces]
    if any(o[0] != 0 for o in offsets):
        return None
    ends = np.cumsum([0] + [int(o[-1]) for o in offsets[:-1]])
    joined = np.concatenate(
        [offsets[0]] + [o[1:] + e for o, e in zip(offsets[1:], ends[1:], strict=True)]
    )
    contents = [p.content[: int(o[-1])] for p, o in zip(pieces, offsets, strict=True)]
    if isinstance(first.content, ak.contents.RecordArray):
        fields = first.content.fields
        inner = [_join([c.content(f) for c in contents]) for f in fields]
        if any(x is None or not isinstance(x, ak.contents.NumpyArray) for x in inner):
            return None
        content: ak.contents.Content = ak.contents.RecordArray(
            inner, list(fields), length=int(joined[-1])
        )
    else:
        content = _join(contents)
        if not isinstance(content, ak.contents.NumpyArray):
            return None
    return ak.contents.ListOffsetArray(ak.index.Index64(joined), content)


def _columns_of(array: ak.Array) -> list[list[Any]]:
    """The record layout of a skim: ``[name, None]`` for a column, ``[name, [fields]]`` for a collection."""
    columns: list[list[Any]] = []
    for name in array.fields:
        value = array[name]
        columns.append([name, list(value.fields) if value.ndim >= 2 else None])
    return columns


def _from_branches(raw: ak.Array, columns: list[list[Any]]) -> ak.Array:
    """Rebuild the skim records from the branches of a skimmed ROOT file."""
    out: dict[str, Any] = {}
    for name, fields in columns:
        if fields is None:
            out[name] = ak.to_numpy(raw[name])
            continue
        counts = ak.to_numpy(raw[f"n{name}"])
        flat = {f: ak.to_numpy(ak.flatten(raw[f"{name}_{f}"], axis=1)) for f in fields}
        content = ak.zip(flat, depth_limit=1) if flat else ak.Array(np.zeros(int(counts.sum())))
        out[name] = ak.unflatten(content, counts)
    return ak.zip(out, depth_limit=1)


def _finished(directory: Path, key: str, datasets: list[str]) -> bool:
    """True when ``directory`` holds a complete skim made with ``key``."""
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if state.get("key") != key or sorted(state.get("datasets", {})) != sorted(datasets):
        return False
    files = [directory / info["file"] for info in state["datasets"].values()]
    return (directory / CUTFLOW_FILE).is_file() and all(f.is_file() for f in files)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _lumi_mask(dataset: str, path: str) -> Any:
    """coffea's LumiMask of a golden JSON, with errors that name the file."""
    from coffea.lumi_tools import LumiMask

    where = f"source.datasets.{dataset}.lumi_mask"
    if "://" not in path and not Path(path).is_file():
        raise InputFileError(
            f"{where}: the golden JSON {path} does not exist. Download it from "
            "https://cms-service-dqmdc.web.cern.ch/CAF/certification/ (or give the right path)."
        )
    try:
        data = json.loads(Path(path).read_text()) if "://" not in path else None
        if data is not None and not (
            isinstance(data, dict)
            and all(
                str(run).isdigit()
                and isinstance(ranges, list)
                and all(isinstance(r, list) and len(r) == 2 for r in ranges)
                for run, ranges in data.items()
            )
        ):
            raise ValueError('expected {"run": [[first_lumi, last_lumi], ...], ...}')
        return LumiMask(path)
    except Exception as exc:
        raise InputFileError(
            f"{where}: {path} is not a golden JSON ({type(exc).__name__}: {exc}). It maps run "
            'numbers to lists of [first, last] luminosity-block ranges: {"315257": [[1, 88]]}.'
        ) from None


def _short(step: str, width: int = 28) -> str:
    return step if len(step) <= width else step[: width - 1] + "…"


def _branch_type(value: ak.Array) -> Any:
    """The type uproot's mktree wants for a column: a numpy dtype or an awkward type."""
    if value.ndim == 1 and not value.fields:
        return ak.to_numpy(value).dtype
    return value.type


def _match_fields(available: list[str], patterns: Iterable[str]) -> list[str]:
    chosen: list[str] = []
    for pattern in patterns:
        chosen.extend(f for f in fnmatch.filter(available, pattern) if f not in chosen)
    return chosen


def _stem_of(path: str) -> str:
    """A file's name without directories and suffix (what error messages call its dataset)."""
    return Path(path.split("?", 1)[0]).stem


def _unwrap(exc: BaseException) -> BaseException:
    """The cmsmlkit error inside an exception coffea wrapped, else the exception itself."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CmsmlError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _want_progress() -> bool:
    return os.environ.get("CMSMLKIT_PROGRESS", "1") not in ("0", "false", "no")
