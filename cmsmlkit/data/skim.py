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
2. defines the objects in order (``GoodJet: {from: Jet, where: ...}`` keeps the
   jets passing ``where``; an object may be defined from an earlier one);
3. applies the cuts in order, recording events and the sum of ``genWeight``
   after each (the cutflow);
4. computes the variables (float64 per event; later variables may use earlier ones);
5. returns the selected events: variables, kept collections (plain jagged
   records), ``run``, ``luminosityBlock``, ``event`` and ``genWeight``.

Chunks are merged in file order and entry order, so a run split into small
chunks gives exactly the arrays of a run in one chunk.

>>> skimmer = Skimmer(selection={"cuts": ["num(Jet) >= 2"], "variables": {"ht": "sum(Jet.pt)"}})
>>> result = skimmer.run({"ttbar": {"files": {"ttbar.root": "Events"}}})  # doctest: +SKIP
>>> print(result.cutflow_table())  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import html
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
from coffea import processor
from coffea.nanoevents import NanoAODSchema

from ..cluster import dask_client
from ..config import ClusterConfig, SkimConfig, build_config
from ..errors import (
    ConfigError,
    EmptySelectionError,
    ExpressionError,
    InputFileError,
    MissingBranchError,
    closest,
)
from .expr import CONSTANTS, Expression, FieldNamespace, parse

__all__ = ["Skimmer", "SkimResult"]

log = logging.getLogger(__name__)

#: Per-event columns every skim keeps.
EVENT_ID = ("run", "luminosityBlock", "event")
WEIGHT = "genWeight"
_RESERVED = (*EVENT_ID, WEIGHT)


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

    @property
    def n_events(self) -> int:
        """Selected events over all datasets."""
        return sum(len(a) for a in self.arrays.values())

    def _rows(self) -> tuple[list[str], list[str]]:
        datasets = list(self.cutflow)
        steps: list[str] = []
        for flow in self.cutflow.values():
            steps.extend(s for s in flow if s not in steps)
        return datasets, steps

    def _cell(self, dataset: str, steps: list[str], i: int) -> str:
        flow = self.cutflow[dataset]
        if steps[i] not in flow:
            return "-"
        n = flow[steps[i]]["events"]
        if i == 0:
            return f"{n}"
        prev = flow.get(steps[i - 1], {}).get("events", 0)
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

    def __repr__(self) -> str:
        head = (
            f"SkimResult({len(self.arrays)} dataset(s), {self.n_events} selected event(s), "
            f"classes={self.class_names})"
        )
        return head + "\n" + self.cutflow_table()

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

    def fields_of(self, collection: str) -> list[str]:
        start = collection + "_"
        return [b[len(start) :] for b in self.names if b.startswith(start)]

    def has_field(self, collection: str, name: str) -> bool:
        branch = f"{collection}_{name}"
        # coffea adds a global index "<x>IdxG" beside every cross-reference "<x>Idx"
        return branch in self.set or (name.endswith("G") and branch[:-1] in self.set)


def _normalise_fileset(fileset: Any) -> dict[str, dict[str, Any]]:
    """Accept coffea's fileset form, ``{dataset: [files]}``, or an object with ``.fileset()``."""
    if hasattr(fileset, "fileset") and callable(fileset.fileset):
        fileset = fileset.fileset()
    if not isinstance(fileset, Mapping) or not fileset:
        raise ConfigError(
            "the fileset must be a non-empty mapping {dataset: {'files': {path: 'Events'}, "
            f"'metadata': {{...}}}}}}, not {type(fileset).__name__}."
        )
    out: dict[str, dict[str, Any]] = {}
    for dataset, entry in fileset.items():
        if isinstance(entry, (str, Path)):
            entry = {"files": [entry]}
        elif isinstance(entry, (list, tuple)):
            entry = {"files": list(entry)}
        if not isinstance(entry, Mapping) or "files" not in entry:
            raise ConfigError(
                f"fileset['{dataset}'] must be a mapping with a 'files' key (or a list of files)."
            )
        files = entry["files"]
        if isinstance(files, (str, Path)):
            files = [files]
        if not isinstance(files, Mapping):
            files = {str(f): "Events" for f in files}
        if not files:
            raise ConfigError(f"fileset['{dataset}'] has no files.")
        out[str(dataset)] = {
            "files": {str(k): str(v) for k, v in files.items()},
            "metadata": dict(entry.get("metadata") or {}),
        }
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
        value = ak.to_numpy(ak.fill_none(value, np.nan if what == "a variable" else False))
    return np.asarray(value)


def _plain(collection: Any, fields: list[str]) -> ak.Array:
    """The kept fields of a collection as a plain (behaviour-free, packed) awkward array."""
    if collection.ndim >= 2:
        counts = ak.to_numpy(ak.num(collection, axis=1))
        columns = {f: ak.to_numpy(ak.flatten(collection[f], axis=1)) for f in fields}
        return ak.unflatten(ak.zip(columns, depth_limit=1), counts)
    return ak.zip({f: ak.to_numpy(collection[f]) for f in fields}, depth_limit=1)


def _select(
    events: Any,
    plan: _Plan,
    keep: dict[str, list[str]],
    function: Callable[[Any], Any] | None,
) -> tuple[ak.Array, dict[str, dict[str, float]]]:
    """Apply the selection to one chunk: the selected records and the chunk's cutflow."""
    n_in = len(events)
    weight = _weights(events)
    cutflow = {"all": {"events": n_in, "sumw": float(weight.sum())}}
    if function is not None:
        events = function(events)
        weight = _weights(events)
        cutflow[_function_label(function)] = {"events": len(events), "sumw": float(weight.sum())}
    objects: dict[str, Any] = {}
    for obj in plan.objects:
        source = _Namespace(events, objects)[obj.source]
        if obj.where is None:
            objects[obj.name] = source
            continue
        mask = obj.where.evaluate(FieldNamespace(source, _Namespace(events, objects)))
        objects[obj.name] = source[mask]
    for label, cut in plan.cuts:
        mask = _per_event(cut.evaluate(_Namespace(events, objects)), len(events), cut, "a cut")
        if mask.dtype != np.bool_:
            raise cut._error(
                f"a cut must be True or False per event, but this gives {mask.dtype} values; "
                "compare it with something, e.g. ... > 0"
            )
        events = events[mask]
        objects = {k: v[mask] for k, v in objects.items()}
        weight = weight[mask]
        cutflow[label] = {"events": len(events), "sumw": float(weight.sum())}
    n = len(events)
    columns: dict[str, Any] = {}
    variables: dict[str, Any] = {}
    for name, expr in plan.variables:
        value = expr.evaluate(_Namespace(events, {**objects, **variables}))
        variables[name] = _per_event(value, n, expr, "a variable").astype(np.float64)
        columns[name] = variables[name]
    ns = _Namespace(events, objects)
    for coll, fields in keep.items():
        columns[coll] = _plain(ns[coll], fields)
    for name in EVENT_ID:
        columns[name] = ak.to_numpy(events[name]).astype(np.int64)
    columns[WEIGHT] = weight.astype(np.float64)
    return ak.zip(columns, depth_limit=1), cutflow


def _weights(events: Any) -> np.ndarray:
    if WEIGHT in getattr(events, "fields", []):
        return ak.to_numpy(events[WEIGHT]).astype(np.float64)
    return np.ones(len(events), dtype=np.float64)


def _function_label(function: Callable[..., Any]) -> str:
    return f"function {getattr(function, '__name__', type(function).__name__)}"


class _SkimProcessor(processor.ProcessorABC):  # type: ignore[misc]
    """Stateless coffea processor: the selection and what to keep; one accumulator per chunk.

    The accumulator is ``{dataset: {"chunks": [((file, entry_start), records)],
    "cutflow": {step: {"events": n, "sumw": w}}}}``: coffea's ``accumulate``
    concatenates the chunk lists and adds the cutflow numbers.
    """

    def __init__(
        self,
        plan: _Plan,
        keep: dict[str, list[str]],
        function: Callable[[Any], Any] | None = None,
    ) -> None:
        self.plan = plan
        self.keep = keep
        self.function = function

    def process(self, events: Any) -> dict[str, Any]:
        meta = events.metadata
        with warnings.catch_warnings():
            _quiet_coffea()
            records, cutflow = _select(events, self.plan, self.keep, self.function)
        chunk = (meta["filename"], int(meta["entrystart"]))
        return {meta["dataset"]: {"chunks": [(chunk, records)], "cutflow": cutflow}}

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
    coffea shows a progress bar; set the environment variable
    ``CMSMLKIT_PROGRESS=0`` to hide it (e.g. in batch logs). Files written by
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

    # ------------------------------------------------------------------ work

    def run(self, fileset: Any) -> SkimResult:
        """Skim ``fileset`` (coffea form, ``{dataset: [files]}`` or a source with ``.fileset()``).

        Raises
        ------
        InputFileError
            a file is missing, not ROOT, or lacks the tree (unless ``skip_bad_files``).
        MissingBranchError
            a collection, field or branch the selection names is not in the files.
        ExpressionError
            an expression fails on the data (e.g. ``[:, 0]`` of an empty list).
        EmptySelectionError
            the inputs have events but the cuts keep none in any dataset.
        """
        fileset = _normalise_fileset(fileset)
        skipped: dict[str, list[str]] = {d: [] for d in fileset}
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
                    skipped[dataset].append(path)
                    continue
                good[dataset][path] = tree
        keep = self._resolve_keep(good)
        runnable = {d: {"files": files} for d, files in good.items() if files}
        output: dict[str, Any] = {}
        if runnable:
            output = self._run_coffea(runnable, keep)
        result = self._assemble(fileset, output, skipped, keep)
        if self.config.output:
            self.write(result, self.config.output)
        return result

    def _resolve_keep(self, good: dict[str, dict[str, str]]) -> dict[str, list[str]]:
        """Check names against the first file of each dataset; the kept fields common to all."""
        keep: dict[str, list[str]] | None = None
        for dataset, files in good.items():
            if not files:
                continue
            path, tree = next(iter(files.items()))
            branches = _read_branches(path, tree)
            if self.function is not None:
                this = {
                    c: _match_fields(branches.fields_of(self._plan.root_of(c)), p)
                    for c, p in self._plan.collections.items()
                }
            else:
                this = self._check_branches(branches, dataset)
            keep = this if keep is None else {c: [f for f in keep[c] if f in this[c]] for c in keep}
        return keep or {c: [] for c in self._plan.collections}

    def _run_coffea(self, fileset: dict[str, Any], keep: dict[str, list[str]]) -> dict[str, Any]:
        treename = next(iter(next(iter(fileset.values()))["files"].values()))
        instance = _SkimProcessor(self._plan, keep, self.function)
        # a local file that fails fails again: retry only reads over the network
        remote = any("://" in path for entry in fileset.values() for path in entry["files"])
        options: dict[str, Any] = {"status": _want_progress()}
        if not remote:
            options["retries"] = 0
        with dask_client(self.cluster) as client:
            if client is None:
                executor = processor.IterativeExecutor(**options)
            else:
                executor = processor.DaskExecutor(client=client, **options)
            runner = processor.Runner(
                executor,
                schema=_QuietNanoAODSchema,
                chunksize=self.config.chunksize,
                skipbadfiles=self.config.skip_bad_files,
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
        skipped: dict[str, list[str]],
        keep: dict[str, list[str]],
    ) -> SkimResult:
        labels = [label for label, _ in self._plan.cuts]
        arrays: dict[str, ak.Array] = {}
        cutflow: dict[str, dict[str, dict[str, Any]]] = {}
        metadata: dict[str, dict[str, Any]] = {}
        class_names: list[str] = []
        for dataset, entry in fileset.items():
            order = {path: i for i, path in enumerate(entry["files"])}
            acc = output.get(dataset, {})
            chunks = sorted(acc.get("chunks", []), key=lambda c: (order.get(c[0][0], 0), c[0][1]))
            if chunks:
                arrays[dataset] = ak.concatenate([c[1] for c in chunks], axis=0)
            else:
                arrays[dataset] = self._empty(keep)
            flow = acc.get("cutflow", {})
            steps = ["all"] + [s for s in flow if s.startswith("function ")] + labels
            cutflow[dataset] = {
                s: {
                    "events": int(flow.get(s, {}).get("events", 0)),
                    "sumw": float(flow.get(s, {}).get("sumw", 0.0)),
                }
                for s in steps
            }
            meta = dict(entry["metadata"])
            meta["sumw"] = cutflow[dataset]["all"]["sumw"]
            meta["files"] = [p for p in entry["files"] if p not in skipped[dataset]]
            if skipped[dataset]:
                meta["skipped_files"] = list(skipped[dataset])
            metadata[dataset] = meta
            label = meta.get("label", dataset)
            if label not in class_names:
                class_names.append(label)
        result = SkimResult(arrays, cutflow, metadata, class_names)
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

    def _empty(self, keep: dict[str, list[str]]) -> ak.Array:
        columns: dict[str, Any] = {
            name: np.zeros(0, np.float64) for name, _ in self._plan.variables
        }
        for coll, fields in keep.items():
            columns[coll] = ak.unflatten(
                ak.zip({f: np.zeros(0, np.float64) for f in fields}, depth_limit=1)
                if fields
                else ak.Array(np.zeros(0)),
                np.zeros(0, np.int64),
            )
        columns.update({name: np.zeros(0, np.int64) for name in EVENT_ID})
        columns[WEIGHT] = np.zeros(0, np.float64)
        return ak.zip(columns, depth_limit=1)

    def write(self, result: SkimResult, directory: str | Path) -> list[Path]:
        """Write every dataset of ``result`` to ``<directory>/<dataset>.root`` (TTree ``Events``).

        Collections become NanoAOD-like branches (``GoodJet_pt`` with counter
        ``nGoodJet``), variables and event columns plain branches. Each file is
        written to ``<name>.tmp`` first and renamed when complete.
        """
        import uproot

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for dataset, array in result.arrays.items():
            target = directory / f"{dataset}.root"
            tmp = target.with_name(target.name + ".tmp")
            branches = {name: array[name] for name in array.fields}
            with uproot.recreate(tmp) as file:
                tree = file.mktree("Events", {k: _branch_type(v) for k, v in branches.items()})
                if len(array):
                    tree.extend(branches)
            os.replace(tmp, target)
            written.append(target)
        return written


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


def _unwrap(exc: BaseException) -> BaseException:
    """The cmsmlkit error inside an exception coffea wrapped, else the exception itself."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ExpressionError, InputFileError, ConfigError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _want_progress() -> bool:
    return os.environ.get("CMSMLKIT_PROGRESS", "1") not in ("0", "false", "no")
