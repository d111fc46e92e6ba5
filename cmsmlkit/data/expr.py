"""Checked selection expressions: parsed once, evaluated on arrays, never ``eval``-ed.

An expression such as ``"num(GoodJet[GoodJet.btagDeepFlavB > 0.3]) >= 2"`` is
parsed with :func:`ast.parse` and walked against a whitelist before any file is
opened; evaluation walks the same tree over awkward or numpy arrays.

What an expression may hold
---------------------------
- numbers and ``True``/``False``, the constant ``pi``;
- names (``Jet``, ``MET``, ``genWeight``; in an object's ``where`` the bare
  names are fields of the collection: ``pt > 25 & abs(eta) < 2.4``) and one
  level of field access ``Coll.field``; nothing starting with ``_``;
- subscripts: ``[:, 0]`` (the first object of every event), slices
  ``[:, :2]``, and boolean masks ``GoodJet[GoodJet.pt > 50]``;
- arithmetic ``+ - * / // % **``, unary ``-``, ``~`` and ``not`` (an
  exponent may not exceed :data:`MAX_EXPONENT` in size: ``10**10**10`` is refused);
- comparisons, chained ones too (``0 < x < 5``);
- ``&``, ``|`` (and ``and``, ``or``) as elementwise logic. They bind *looser*
  than comparisons, as in C++ and ``TTree::Draw``: ``pt > 25 & abs(eta) < 2.4``
  means ``(pt > 25) & (abs(eta) < 2.4)``. On integers ``&`` stays a bitwise
  and, so flag tests read ``(jetId & 2) > 0``;
- calls of the functions in :data:`FUNCTIONS` only.

Reductions (``num sum any all min max mean``) act per event on the innermost
list (``axis=-1``): ``sum(GoodJet.pt)`` is the scalar sum per event. ``min``,
``max`` and ``mean`` of an empty list give NaN (so a cut on them is False and
a variable is NaN); ``sum`` of an empty list is 0, ``any`` False, ``all`` True.
``min(a, b)`` and ``max(a, b)`` with two arguments are elementwise.

Physics helpers: ``inv_mass(GoodMuon[:, 0], GoodMuon[:, 1])`` is the invariant
mass of a pair (any number of objects, or whole collections, summed through
coffea's Lorentz-vector behaviour; each needs ``pt eta phi mass``);
``delta_r(GoodJet[:, 0], GoodMuon[:, 0])`` the distance of two objects (or
``delta_r(eta1, phi1, eta2, phi2)``); ``min_delta_r(Jet, GoodMuon)`` the
distance of each jet to its nearest muon (``inf`` when there is none), for
cleaning: ``GoodJet: {from: Jet, where: "pt > 30 & min_delta_r(Jet, GoodMuon) > 0.4"}``.

>>> import awkward as ak
>>> jets = ak.Array([[{"pt": 50.0}, {"pt": 20.0}], []])
>>> parse("sum(Jet.pt[Jet.pt > 30])").evaluate({"Jet": jets}).tolist()
[50.0, 0.0]
"""

from __future__ import annotations

import ast
import io
import math
import tokenize
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import awkward as ak
import numpy as np

from ..errors import ExpressionError, closest

__all__ = [
    "FUNCTIONS",
    "CONSTANTS",
    "MAX_EXPONENT",
    "Expression",
    "FieldNamespace",
    "parse",
    "positions",
    "select",
    "take_events",
]

#: Named constants an expression may use.
CONSTANTS: dict[str, float] = {"pi": math.pi}

#: The largest exponent (in size) ``a ** b`` accepts: no physics needs more, and
#: Python's whole numbers would otherwise let ``10**10**10`` run out of memory.
MAX_EXPONENT = 100


# --------------------------------------------------------------------------- functions
# Pure functions on arrays: each takes awkward/numpy arrays (or numbers) and returns one.


def _is_list(x: Any) -> bool:
    """True when ``x`` has a list per event (an awkward array of at least 2 dimensions)."""
    return isinstance(x, ak.Array) and x.ndim >= 2


def _need_list(name: str, x: Any) -> None:
    if not _is_list(x):
        what = "a number" if not isinstance(x, (ak.Array, np.ndarray)) else "one value per event"
        raise _Usage(
            f"{name}() reduces a list per event (e.g. {name}(GoodJet.pt)), but its argument is {what}"
        )


def _num(x: Any) -> Any:
    _need_list("num", x)
    return ak.num(x, axis=1)


def _sum(x: Any) -> Any:
    _need_list("sum", x)
    return ak.sum(x, axis=-1)


def _any(x: Any) -> Any:
    _need_list("any", x)
    return ak.any(x, axis=-1)


def _all(x: Any) -> Any:
    _need_list("all", x)
    return ak.all(x, axis=-1)


def _nan_for_empty(x: Any) -> Any:
    return ak.fill_none(x, np.nan)


def _min(x: Any, y: Any = None) -> Any:
    if y is not None:
        return np.minimum(x, y)
    _need_list("min", x)
    return _nan_for_empty(ak.min(x, axis=-1))


def _max(x: Any, y: Any = None) -> Any:
    if y is not None:
        return np.maximum(x, y)
    _need_list("max", x)
    return _nan_for_empty(ak.max(x, axis=-1))


def _mean(x: Any) -> Any:
    _need_list("mean", x)
    return _nan_for_empty(ak.mean(x, axis=-1))


def _where(cond: Any, a: Any, b: Any) -> Any:
    return ak.where(cond, a, b)


def _clip(x: Any, lo: Any, hi: Any) -> Any:
    return np.minimum(np.maximum(x, lo), hi)


def delta_phi(phi1: Any, phi2: Any) -> Any:
    """``phi1 - phi2`` wrapped into [-pi, pi)."""
    return (phi1 - phi2 + np.pi) % (2 * np.pi) - np.pi


def _need_fields(func: str, obj: Any, needed: tuple[str, ...]) -> None:
    fields = getattr(obj, "fields", [])
    missing = [f for f in needed if f not in fields]
    if missing:
        raise _Usage(
            f"{func}() needs objects with fields {', '.join(needed)}; "
            f"an argument lacks {', '.join(missing)}"
        )


def delta_r(*args: Any) -> Any:
    """``delta_r(a, b)`` of two objects (fields eta, phi), or ``delta_r(eta1, phi1, eta2, phi2)``.

    sqrt(delta_eta**2 + delta_phi**2), broadcast per event (an object against a
    collection gives one value per object).
    """
    if len(args) == 2:
        a, b = args
        _need_fields("delta_r", a, ("eta", "phi"))
        _need_fields("delta_r", b, ("eta", "phi"))
        args = (a["eta"], a["phi"], b["eta"], b["phi"])
    elif len(args) != 4:
        raise _Usage("delta_r() takes two objects or four numbers (eta1, phi1, eta2, phi2)")
    eta1, phi1, eta2, phi2 = args
    return np.sqrt((eta1 - eta2) ** 2 + delta_phi(phi1, phi2) ** 2)


def min_delta_r(objects: Any, others: Any) -> Any:
    """For each object of ``objects``, the delta-R to the nearest of ``others`` (inf if none).

    Both are collections (a list per event) with fields eta and phi; the
    result has one value per object of ``objects``.
    """
    for x in (objects, others):
        if not _is_list(x):
            raise _Usage("min_delta_r() takes two collections, e.g. min_delta_r(Jet, GoodMuon)")
        _need_fields("min_delta_r", x, ("eta", "phi"))
    a = ak.zip({"eta": objects["eta"], "phi": objects["phi"]})
    b = ak.zip({"eta": others["eta"], "phi": others["phi"]})
    pairs = ak.cartesian({"a": a, "b": b}, axis=1, nested=True)
    dr = delta_r(pairs["a"]["eta"], pairs["a"]["phi"], pairs["b"]["eta"], pairs["b"]["phi"])
    return ak.fill_none(ak.min(dr, axis=-1), np.inf)


def inv_mass(*objects: Any) -> Any:
    """Invariant mass of the sum of all given objects, per event (coffea's Lorentz vectors).

    Each argument is a collection (a list of objects per event, all of which
    are summed) or one object per event (``GoodMuon[:, 0]``); each needs the
    fields ``pt``, ``eta``, ``phi`` and ``mass``. An event with no object gives 0.
    """
    from coffea.nanoevents.methods import vector

    total: Any = None
    for obj in objects:
        _need_fields("inv_mass", obj, ("pt", "eta", "phi", "mass"))
        p4 = ak.zip(
            {f: obj[f] for f in ("pt", "eta", "phi", "mass")},
            with_name="PtEtaPhiMLorentzVector",
            behavior=vector.behavior,
        )
        if _is_list(obj):
            p4 = p4.sum(axis=-1)
        total = p4 if total is None else total + p4
    return np.sqrt(np.maximum(ak.without_parameters(total.mass2), 0.0))


def _power(base: Any, exponent: Any) -> Any:
    """``base ** exponent`` that refuses huge exponents and never builds huge whole numbers."""
    if isinstance(exponent, (int, float, np.number)) and abs(exponent) > MAX_EXPONENT:
        raise _Usage(f"the exponent {exponent} is too large (at most {MAX_EXPONENT} in size)")
    if isinstance(base, (int, float)) and isinstance(exponent, (int, float)):
        try:
            return float(base) ** float(exponent)
        except OverflowError:
            return math.inf
        except ZeroDivisionError:
            return math.inf
    return base**exponent


@dataclass(frozen=True)
class _Function:
    impl: Callable[..., Any]
    min_args: int
    max_args: int
    usage: str


def _ufunc(f: np.ufunc, usage: str) -> _Function:
    return _Function(f, f.nin, f.nin, usage)


#: The functions an expression may call: name -> implementation and usage.
FUNCTIONS: dict[str, _Function] = {
    "num": _Function(_num, 1, 1, "num(GoodJet): objects per event"),
    "sum": _Function(_sum, 1, 1, "sum(GoodJet.pt): per-event sum"),
    "any": _Function(_any, 1, 1, "any(GoodJet.pt > 50): at least one per event"),
    "all": _Function(_all, 1, 1, "all(abs(GoodJet.eta) < 2): every one per event"),
    "min": _Function(_min, 1, 2, "min(GoodJet.pt) per event (NaN if none), or min(a, b)"),
    "max": _Function(_max, 1, 2, "max(GoodJet.pt) per event (NaN if none), or max(a, b)"),
    "mean": _Function(_mean, 1, 1, "mean(GoodJet.pt) per event (NaN if none)"),
    "abs": _ufunc(np.absolute, "abs(x)"),
    "sqrt": _ufunc(np.sqrt, "sqrt(x)"),
    "exp": _ufunc(np.exp, "exp(x)"),
    "log": _ufunc(np.log, "log(x)"),
    "log10": _ufunc(np.log10, "log10(x)"),
    "sin": _ufunc(np.sin, "sin(x)"),
    "cos": _ufunc(np.cos, "cos(x)"),
    "tan": _ufunc(np.tan, "tan(x)"),
    "arctan2": _ufunc(np.arctan2, "arctan2(y, x)"),
    "cosh": _ufunc(np.cosh, "cosh(x)"),
    "sinh": _ufunc(np.sinh, "sinh(x)"),
    "tanh": _ufunc(np.tanh, "tanh(x)"),
    "round": _ufunc(np.rint, "round(x): nearest integer (halves to even)"),
    "floor": _ufunc(np.floor, "floor(x)"),
    "ceil": _ufunc(np.ceil, "ceil(x)"),
    "where": _Function(_where, 3, 3, "where(condition, if_true, if_false)"),
    "clip": _Function(_clip, 3, 3, "clip(x, low, high)"),
    "delta_phi": _Function(delta_phi, 2, 2, "delta_phi(phi1, phi2), in [-pi, pi)"),
    "delta_r": _Function(
        delta_r, 2, 4, "delta_r(GoodJet[:, 0], GoodMuon[:, 0]) or delta_r(eta1, phi1, eta2, phi2)"
    ),
    "min_delta_r": _Function(
        min_delta_r, 2, 2, "min_delta_r(Jet, GoodMuon): per jet, delta-R to the nearest muon"
    ),
    "inv_mass": _Function(
        inv_mass, 1, 8, "inv_mass(GoodMuon[:, 0], GoodMuon[:, 1]) or inv_mass(GoodMuon)"
    ),
}


class _Usage(Exception):
    """A function was called with arguments it cannot use (turned into ExpressionError)."""


# --------------------------------------------------------------------------- namespaces


class FieldNamespace(Mapping[str, Any]):
    """The names of an object's ``where``: the collection's fields, then ``parent``'s names.

    >>> import awkward as ak
    >>> jets = ak.Array([[{"pt": 50.0, "eta": 0.1}]])
    >>> parse("pt > 30 & abs(eta) < 2.4").evaluate(FieldNamespace(jets)).tolist()
    [[True]]
    """

    def __init__(self, collection: Any, parent: Mapping[str, Any] | None = None) -> None:
        self.collection = collection
        self.parent = parent if parent is not None else {}

    def _fields(self) -> list[str]:
        return list(getattr(self.collection, "fields", []))

    def __getitem__(self, name: str) -> Any:
        if name in self._fields():
            return self.collection[name]
        return self.parent[name]

    def __iter__(self) -> Iterator[str]:
        seen = self._fields()
        yield from seen
        yield from (k for k in self.parent if k not in seen)

    def __len__(self) -> int:
        return len(set(self._fields()) | set(self.parent))

    def __contains__(self, name: object) -> bool:
        return name in self._fields() or name in self.parent

    def __repr__(self) -> str:
        return f"FieldNamespace(fields={self._fields()!r})"


def _names_of(namespace: Any) -> list[str]:
    if isinstance(namespace, Mapping):
        return [str(k) for k in namespace]
    return list(getattr(namespace, "fields", []))


# --------------------------------------------------------------------------- parsing

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
    ast.BitAnd: lambda a, b: a & b,
    ast.BitOr: lambda a, b: a | b,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}
_REFUSED: dict[type, str] = {
    ast.Lambda: "lambdas are not allowed",
    ast.ListComp: "comprehensions are not allowed; use a mask, e.g. GoodJet.pt[GoodJet.pt > 30]",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "generator expressions are not allowed; use sum(...), any(...) or all(...)",
    ast.IfExp: "'x if c else y' is not allowed; use where(c, x, y)",
    ast.JoinedStr: "strings are not allowed",
    ast.List: "lists are not allowed",
    ast.Dict: "dicts are not allowed",
    ast.Set: "sets are not allowed",
    ast.Starred: "'*' unpacking is not allowed",
    ast.NamedExpr: "':=' is not allowed",
    ast.Await: "'await' is not allowed",
}


def _c_precedence(text: str) -> tuple[str, list[int]]:
    """Rewrite ``&``/``|`` as ``and``/``or`` so they bind looser than comparisons.

    Returns the rewritten text and, for each of its characters, the column of
    the original character it came from (for error pointers).
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return text, list(range(len(text) + 1))
    out: list[str] = []
    origin: list[int] = []
    pos = 0
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in ("&", "|"):
            start = tok.start[1]
            out.append(text[pos:start])
            origin.extend(range(pos, start))
            word = " and " if tok.string == "&" else " or "
            out.append(word)
            origin.extend([start] * len(word))
            pos = start + 1
    out.append(text[pos:])
    origin.extend(range(pos, len(text) + 1))
    return "".join(out), origin


@dataclass
class Expression:
    """A parsed, checked selection expression.

    Build it with :func:`parse`; evaluate it with :meth:`evaluate` on a mapping
    of names to arrays (or a coffea ``events`` array).

    Attributes
    ----------
    text : str
        The expression as written.
    context : str
        Where it came from (``"skim.selection.cuts[1]"``), for error messages.
    names : set of str
        Top-level names it uses (collections, branches, fields), without functions.
    attributes : set of (str, str)
        ``(name, field)`` pairs of every ``name.field`` it reads.
    functions : set of str
        The functions it calls.

    Examples
    --------
    >>> import awkward as ak
    >>> e = parse("num(GoodJet) >= 1", context="skim.selection.cuts[0]")
    >>> sorted(e.names)
    ['GoodJet']
    >>> e.evaluate({"GoodJet": ak.Array([[1.0], []])}).tolist()
    [True, False]
    """

    text: str
    context: str = ""
    names: set[str] = field(default_factory=set)
    attributes: set[tuple[str, str]] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    _tree: ast.Expression | None = field(default=None, repr=False, compare=False)
    _origin: list[int] = field(default_factory=list, repr=False, compare=False)

    def __repr__(self) -> str:
        where = f", context={self.context!r}" if self.context else ""
        return f"Expression({self.text!r}{where})"

    def __str__(self) -> str:
        return self.text

    # ------------------------------------------------------------------ errors

    def _error(self, message: str, node: ast.AST | None = None) -> ExpressionError:
        where = f" in {self.context}" if self.context else ""
        lines = [f"expression{where}:", f"    {self.text}"]
        if node is not None and hasattr(node, "col_offset"):
            start = self._col(node.col_offset)
            end = self._col(getattr(node, "end_col_offset", None) or node.col_offset + 1)
            end = max(end, start + 1)
            lines.append("    " + " " * start + "^" * (end - start))
        lines.append(message)
        return ExpressionError("\n".join(lines))

    def _col(self, col: int) -> int:
        if not self._origin:
            return col
        if col >= len(self._origin):
            return self._origin[-1] + col - len(self._origin) + 1
        return self._origin[col]

    # ------------------------------------------------------------------ checking

    def _check(self, node: ast.AST) -> None:
        """Walk the tree, refusing everything outside the whitelist."""
        if isinstance(node, ast.Expression):
            self._check(node.body)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or (
                isinstance(node.value, (int, float)) and not isinstance(node.value, complex)
            ):
                return
            kind = "strings are" if isinstance(node.value, (str, bytes)) else f"{node.value!r} is"
            raise self._error(f"{kind} not allowed; use numbers, names and fields", node)
        elif isinstance(node, ast.Name):
            self._check_name(node.id, node)
            if node.id in FUNCTIONS:
                raise self._error(
                    f"'{node.id}' is a function; call it, e.g. {FUNCTIONS[node.id].usage}", node
                )
            if node.id not in CONSTANTS:
                self.names.add(node.id)
        elif isinstance(node, ast.Attribute):
            self._check_name(node.attr, node)
            base = node.value
            while isinstance(base, ast.Subscript):
                base = base.value
            if not isinstance(base, ast.Name):
                raise self._error(
                    f"'.{node.attr}' reads a field of something that is not a collection; "
                    "only one level of fields is supported: write Collection.field",
                    node,
                )
            self._check(node.value)
            self.attributes.add((base.id, node.attr))
        elif isinstance(node, ast.Subscript):
            self._check(node.value)
            self._check_key(node.slice, node)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                raise self._error(f"operator {type(node.op).__name__} is not allowed", node)
            if isinstance(node.op, ast.Pow):
                exponent = _static_number(node.right)
                if exponent is not None and not abs(exponent) <= MAX_EXPONENT:
                    shown = "too large to compute" if math.isinf(exponent) else f"{exponent:g}"
                    raise self._error(
                        f"the exponent ({shown}) is too large; at most {MAX_EXPONENT} in size",
                        node.right,
                    )
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.UAdd):
                raise self._error("unary '+' is not allowed", node)
            self._check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self._check(value)
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if type(op) not in _CMPOPS:
                    word = {ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
                    raise self._error(
                        f"'{word.get(type(op), type(op).__name__)}' is not allowed; "
                        "compare with < <= > >= == !=",
                        node,
                    )
            self._check(node.left)
            for comparator in node.comparators:
                self._check(comparator)
        elif isinstance(node, ast.Call):
            self._check_call(node)
        elif isinstance(node, ast.Tuple):
            raise self._error("tuples are only allowed inside [...], e.g. GoodJet.pt[:, 0]", node)
        elif type(node) in _REFUSED:
            raise self._error(_REFUSED[type(node)], node)
        else:
            raise self._error(f"{type(node).__name__} is not allowed in a selection", node)

    def _check_name(self, name: str, node: ast.AST) -> None:
        if name.startswith("_"):
            raise self._error(f"names starting with '_' are not allowed ('{name}')", node)

    def _check_key(self, key: ast.AST, node: ast.Subscript) -> None:
        parts = key.elts if isinstance(key, ast.Tuple) else [key]
        if not isinstance(key, ast.Tuple) and _static_int(key) is not None:
            n = _static_int(key)
            raise self._error(
                f"[{n}] picks event {n}, not an object of every event; write [:, {n}] "
                f"for the object at position {n} in each event",
                node,
            )
        for part in parts:
            if isinstance(part, ast.Slice):
                for bound in (part.lower, part.upper, part.step):
                    if bound is not None and _static_int(bound) is None:
                        raise self._error("slice bounds must be whole numbers, e.g. [:, :2]", bound)
            elif (
                _static_int(part) is not None
                or isinstance(part, ast.Constant)
                and part.value is Ellipsis
            ):
                continue
            elif isinstance(key, ast.Tuple):
                raise self._error(
                    "inside [a, b] use whole numbers and slices, e.g. [:, 0]; "
                    "a mask goes alone: Coll[Coll.pt > 30]",
                    part,
                )
            else:
                self._check(part)

    def _check_call(self, node: ast.Call) -> None:
        func = node.func
        if not isinstance(func, ast.Name):
            raise self._error(
                "only the functions " + ", ".join(FUNCTIONS) + " may be called "
                "(no methods or attribute calls)",
                func,
            )
        self._check_name(func.id, func)
        if func.id not in FUNCTIONS:
            near = closest(func.id, FUNCTIONS)
            hint = f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else ""
            raise self._error(
                f"unknown function '{func.id}'.{hint} Allowed functions: {', '.join(FUNCTIONS)}.",
                func,
            )
        if node.keywords:
            raise self._error(f"{func.id}() takes no keyword arguments", node.keywords[0].value)
        spec = FUNCTIONS[func.id]
        n = len(node.args)
        if not spec.min_args <= n <= spec.max_args:
            want = (
                str(spec.min_args)
                if spec.min_args == spec.max_args
                else f"{spec.min_args} to {spec.max_args}"
            )
            raise self._error(
                f"{func.id}() takes {want} argument(s), got {n}; usage: {spec.usage}", node
            )
        self.functions.add(func.id)
        for arg in node.args:
            self._check(arg)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, namespace: Mapping[str, Any] | Any) -> Any:
        """Evaluate on ``namespace``: a mapping of names to arrays, or a record array (``events``).

        Raises
        ------
        ExpressionError
            for an unknown name or field (with close matches), an object index
            past the end of some event's list, or a computation that fails.
        """
        assert self._tree is not None
        return self._eval(self._tree.body, namespace)

    def _eval(self, node: ast.AST, ns: Any) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self._lookup(ns, node)
        if isinstance(node, ast.Attribute):
            return self._field(self._eval(node.value, ns), node)
        if isinstance(node, ast.Subscript):
            return self._subscript(node, ns)
        if isinstance(node, ast.BinOp):
            return self._apply(
                _BINOPS[type(node.op)],
                node,
                self._eval(node.left, ns),
                self._eval(node.right, ns),
                elementwise=True,
            )
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, ns)
            if isinstance(node.op, ast.USub):
                return self._apply(np.negative, node, value, elementwise=True)
            if isinstance(node.op, ast.Not):
                return self._apply(np.logical_not, node, value, elementwise=True)
            return self._apply(np.invert, node, value, elementwise=True)
        if isinstance(node, ast.BoolOp):
            op = _BINOPS[ast.BitAnd if isinstance(node.op, ast.And) else ast.BitOr]
            result = self._eval(node.values[0], ns)
            for value in node.values[1:]:
                result = self._apply(op, node, result, self._eval(value, ns), elementwise=True)
            return result
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, ns)
            result = None
            for cmp, right_node in zip(node.ops, node.comparators, strict=True):
                right = self._eval(right_node, ns)
                part = self._apply(_CMPOPS[type(cmp)], node, left, right, elementwise=True)
                result = (
                    part
                    if result is None
                    else self._apply(_BINOPS[ast.BitAnd], node, result, part, elementwise=True)
                )
                left = right
            return result
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            spec = FUNCTIONS[node.func.id]
            args = [self._eval(a, ns) for a in node.args]
            elementwise = isinstance(spec.impl, np.ufunc)
            return self._apply(spec.impl, node, *args, elementwise=elementwise)
        raise self._error(f"{type(node).__name__} is not allowed", node)  # unreachable after _check

    def _apply(
        self, func: Callable[..., Any], node: ast.AST, *args: Any, elementwise: bool = False
    ) -> Any:
        try:
            with np.errstate(all="ignore"):
                if elementwise:
                    fast = _on_contents(func, args)
                    if fast is not None:
                        return fast
                return func(*args)
        except ExpressionError:
            raise
        except _Usage as exc:
            raise self._error(str(exc), node) from None
        except Exception as exc:
            raise self._error(
                f"cannot compute this part: {type(exc).__name__}: {exc}", node
            ) from None

    def _lookup(self, ns: Any, node: ast.Name) -> Any:
        name = node.id
        if name in CONSTANTS:
            return CONSTANTS[name]
        known = _names_of(ns)
        if name in known:
            try:
                return ns[name]
            except Exception as exc:
                raise self._error(
                    f"cannot read '{name}': {type(exc).__name__}: {exc}", node
                ) from None
        near = closest(name, known)
        hint = f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else ""
        raise self._error(f"unknown name '{name}'.{hint}", node)

    def _field(self, value: Any, node: ast.Attribute) -> Any:
        fields = _names_of(value)
        if node.attr in fields:
            return value[node.attr]
        near = closest(node.attr, fields)
        hint = f" Did you mean {' or '.join(repr(m) for m in near)}?" if near else ""
        owner = ast.unparse(node.value)
        listed = f" Its fields: {', '.join(sorted(fields)[:30])}." if fields and not near else ""
        raise self._error(f"'{owner}' has no field '{node.attr}'.{hint}{listed}", node)

    def _subscript(self, node: ast.Subscript, ns: Any) -> Any:
        value = self._eval(node.value, ns)
        key_node = node.slice
        if isinstance(key_node, ast.Tuple):
            key: Any = tuple(_static_key(p) for p in key_node.elts)
        elif isinstance(key_node, ast.Slice):
            key = _static_key(key_node)
        else:
            key = self._eval(key_node, ns)
        if isinstance(key, tuple) and len(key) >= 2 and isinstance(key[1], int) and _is_list(value):
            self._check_lengths(value, key[1], node)
        try:
            return select(value, key) if isinstance(key, ak.Array) else value[key]
        except Exception as exc:
            raise self._error(f"cannot index: {type(exc).__name__}: {exc}", node) from None

    def _check_lengths(self, value: Any, index: int, node: ast.Subscript) -> None:
        counts = np.asarray(ak.num(value, axis=1))
        short = counts <= index if index >= 0 else counts < -index
        n_short = int(np.count_nonzero(short))
        if n_short:
            owner = ast.unparse(node.value)
            base = owner.split(".")[0].split("[")[0]
            need = index + 1 if index >= 0 else -index
            raise self._error(
                f"{n_short} of {len(counts)} events have fewer than {need} object(s) in "
                f"{owner}, so [:, {index}] does not exist for them. Add a cut before this, "
                f'e.g. "num({base}) >= {need}", or use a reduction such as max({owner}).',
                node,
            )


_NUMBER = (bool, int, float, np.number, np.bool_)


def _on_contents(func: Callable[..., Any], args: tuple[Any, ...]) -> ak.Array | None:
    """``func`` (elementwise) on flat numpy contents where that is awkward's answer, else None.

    That is when every array argument is a list of numbers over one and the
    same offsets (fields of one collection, and what was computed from them),
    or every one is a column of numbers of one length, and the rest are plain
    numbers. Skipping awkward's broadcasting makes the common object cuts
    (``pt > 25 & abs(eta) < 2.4``) several times faster; anything else
    (missing values, records, lists against per-event values) goes through
    awkward as before.
    """
    offsets: Any = None
    jagged = flat = 0
    values: list[Any] = []
    for arg in args:
        if isinstance(arg, _NUMBER):
            values.append(arg)
            continue
        if not isinstance(arg, ak.Array):
            return None
        layout = arg.layout
        if isinstance(layout, ak.contents.ListOffsetArray):
            if offsets is not None and layout.offsets is not offsets:
                return None
            offsets, jagged, layout = layout.offsets, jagged + 1, layout.content
        else:
            flat += 1
        value = _numbers(layout)
        if value is None:
            return None
        values.append(value)
    if (jagged and flat) or not (jagged or flat):
        return None
    arrays = [v for v in values if isinstance(v, np.ndarray)]
    if len({len(a) for a in arrays}) != 1:
        return None
    result: ak.contents.Content = ak.contents.NumpyArray(np.asarray(func(*values)))
    if offsets is not None:
        result = ak.contents.ListOffsetArray(offsets, result)
    return ak.Array(result)


def _numbers(layout: ak.contents.Content) -> np.ndarray | None:
    """A flat content of numbers as numpy (through an index, as a selected field has it), else None."""
    index = None
    if type(layout) is ak.contents.IndexedArray:
        index, layout = np.asarray(layout.index.data), layout.content
    if (
        not isinstance(layout, ak.contents.NumpyArray)
        or layout.data.ndim != 1
        or layout.parameter("__array__") is not None
    ):
        return None
    data = np.asarray(layout.data)
    return data if index is None else data[index]


def select(lists: Any, mask: Any) -> Any:
    """``lists[mask]`` for a list-per-event ``mask`` of booleans (``Jet[Jet.pt > 25]``).

    When the mask was computed from the lists' own fields (one and the same
    offsets) the selection is made with numpy on the offsets, keeping the
    collection lazy (an index over its records, as awkward itself does) and
    its behaviour; anything else is awkward's own slicing.
    """
    if not (isinstance(lists, ak.Array) and isinstance(mask, ak.Array)):
        return lists[mask]
    src, sel = lists.layout, mask.layout
    if not (
        isinstance(src, ak.contents.ListOffsetArray)
        and isinstance(sel, ak.contents.ListOffsetArray)
        and sel.offsets is src.offsets
        and isinstance(sel.content, ak.contents.NumpyArray)
        and sel.content.data.ndim == 1
        and sel.content.dtype == np.bool_
    ):
        return lists[mask]
    offsets = np.asarray(src.offsets.data)
    keep = np.asarray(sel.content.data)
    passed = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=passed[1:])
    new_offsets = passed[offsets] - passed[offsets[0]]
    index = np.flatnonzero(keep[offsets[0] : offsets[-1]]) + offsets[0]
    return _regrouped(lists, new_offsets, index)


def take_events(lists: Any, mask: np.ndarray) -> Any:
    """``lists[mask]`` for a per-event boolean ``mask``, kept as offsets over an index.

    awkward's own event slice of a list array is a view (starts and stops)
    that every later operation has to broadcast through; resolving it here
    with numpy keeps the fast paths of :func:`select` and of elementwise
    arithmetic open for what follows (the variables after the cuts).
    """
    layout = lists.layout if isinstance(lists, ak.Array) else None
    if not isinstance(layout, ak.contents.ListOffsetArray):
        return lists[mask]
    offsets = np.asarray(layout.offsets.data)
    new_offsets, position = positions(offsets[:-1][mask], offsets[1:][mask])
    return _regrouped(lists, new_offsets, position)


def _regrouped(lists: ak.Array, offsets: np.ndarray, position: np.ndarray) -> ak.Array:
    """Lists of ``lists``' elements at ``position`` (content positions), cut at ``offsets``.

    An index over the original records (one, however many selections deep),
    so nothing is copied and the collection keeps its behaviour.
    """
    layout = lists.layout
    content = layout.content
    if type(content) is ak.contents.IndexedArray:
        position, content = np.asarray(content.index.data)[position], content.content
    out = ak.contents.ListOffsetArray(
        ak.index.Index64(offsets),
        ak.contents.IndexedArray(ak.index.Index64(position), content),
        parameters=layout.parameters,
    )
    return ak.Array(out, behavior=lists.behavior, attrs=lists.attrs)


def positions(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the lists ``[start, stop)`` laid end to end, and the content position of each element."""
    counts = (stops - starts).astype(np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, np.arange(offsets[-1], dtype=np.int64) + np.repeat(
        starts - offsets[:-1], counts
    )


def _static_int(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int
    ):
        return -node.operand.value
    return None


def _static_number(node: ast.AST) -> float | None:
    """The value of a constant sub-expression (numbers and + - * / ** only), else None.

    Folded in floating point, so that checking ``10**10**10`` costs nothing;
    an exponent beyond :data:`MAX_EXPONENT` folds to inf.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _static_number(node.operand)
        return None if value is None else -value
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Pow):
        left, right = _static_number(node.left), _static_number(node.right)
        if left is None or right is None:
            return None
        try:
            if isinstance(node.op, ast.Pow):
                if not abs(right) <= MAX_EXPONENT:
                    return math.inf
                return float(abs(left) ** right) if left >= 0 or right.is_integer() else None
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            return left * right
        except (OverflowError, ZeroDivisionError):
            return math.inf
    return None


def _static_key(node: ast.AST) -> Any:
    if isinstance(node, ast.Slice):
        return slice(
            *(None if b is None else _static_int(b) for b in (node.lower, node.upper, node.step))
        )
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return Ellipsis
    return _static_int(node)


def parse(text: str, *, context: str = "") -> Expression:
    """Parse and check ``text``; raise :class:`~cmsmlkit.errors.ExpressionError` if it is not allowed.

    Parameters
    ----------
    text : str
        The expression, e.g. ``"num(GoodJet) >= 4 & MET.pt > 30"``.
    context : str
        Where it comes from (a config path such as ``"skim.selection.cuts[1]"``),
        quoted in every error message.

    Examples
    --------
    >>> parse("MET.pt > 30").attributes
    {('MET', 'pt')}
    """
    if not isinstance(text, str):
        raise ExpressionError(
            f"expression{' in ' + context if context else ''} must be a string, "
            f"not {type(text).__name__} ({text!r})"
        )
    expr = Expression(text=text, context=context)
    flat = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    if not flat.strip():
        raise expr._error("the expression is empty")
    rewritten, origin = _c_precedence(flat.strip())
    shift = len(flat) - len(flat.lstrip())
    expr._origin = [o + shift for o in origin]
    try:
        tree = ast.parse(rewritten, mode="eval")
    except SyntaxError as exc:
        col = exc.offset - 1 if exc.offset else len(rewritten)
        node = ast.Constant(value=0, col_offset=col, end_col_offset=col + 1)
        detail = "" if exc.msg == "invalid syntax" else f": {exc.msg}"
        raise expr._error(f"invalid syntax{detail}", node) from None
    expr._check(tree)
    expr._tree = tree
    return expr
