"""Tests of cmsmlkit.data.expr: the checked selection-expression evaluator."""

from __future__ import annotations

import math

import awkward as ak
import numpy as np
import pytest

from cmsmlkit.data.expr import FUNCTIONS, Expression, FieldNamespace, parse
from cmsmlkit.errors import CmsmlError, ExpressionError

JETS = ak.Array(
    [
        [
            {"pt": 50.0, "eta": 0.5, "phi": 0.1, "mass": 5.0, "btag": 0.9, "jetId": 6},
            {"pt": 30.0, "eta": -1.0, "phi": 3.0, "mass": 4.0, "btag": 0.1, "jetId": 2},
        ],
        [],
        [{"pt": 20.0, "eta": 2.5, "phi": -3.0, "mass": 3.0, "btag": 0.5, "jetId": 0}],
    ]
)
MET = ak.Array([{"pt": 10.0, "phi": 0.0}, {"pt": 40.0, "phi": 1.0}, {"pt": 25.0, "phi": -1.0}])
NS = {"Jet": JETS, "MET": MET, "nPV": np.array([3, 1, 2])}


def ev(text: str, ns: object = NS) -> list:
    return ak.to_list(parse(text).evaluate(ns))


# --------------------------------------------------------------------------- parsing


def test_parse_records_names_attributes_functions():
    e = parse("num(GoodJet[GoodJet.btagDeepFlavB > 0.3]) >= 2 & MET.pt > 30", context="cuts[0]")
    assert isinstance(e, Expression)
    assert e.text == "num(GoodJet[GoodJet.btagDeepFlavB > 0.3]) >= 2 & MET.pt > 30"
    assert e.names == {"GoodJet", "MET"}
    assert e.attributes == {("GoodJet", "btagDeepFlavB"), ("MET", "pt")}
    assert e.functions == {"num"}
    assert repr(e) == (
        "Expression('num(GoodJet[GoodJet.btagDeepFlavB > 0.3]) >= 2 & MET.pt > 30', "
        "context='cuts[0]')"
    )


def test_pi_is_a_constant_not_a_name():
    e = parse("abs(Jet.phi) < pi")
    assert e.names == {"Jet"}
    assert ev("abs(Jet.phi) < pi") == [[True, True], [], [True]]


def test_attribute_of_a_masked_collection_counts_as_its_root():
    e = parse("Jet[Jet.btag > 0.3].pt")
    assert e.attributes == {("Jet", "btag"), ("Jet", "pt")}
    assert ev("Jet[Jet.btag > 0.3].pt") == [[50.0], [], [20.0]]


# --------------------------------------------------------------------------- arithmetic, logic


def test_arithmetic_operators():
    assert ev("MET.pt + 1") == [11.0, 41.0, 26.0]
    assert ev("MET.pt - 5 * 2") == [0.0, 30.0, 15.0]
    assert ev("MET.pt / 4") == [2.5, 10.0, 6.25]
    assert ev("MET.pt // 4") == [2.0, 10.0, 6.0]
    assert ev("MET.pt % 4") == [2.0, 0.0, 1.0]
    assert ev("MET.pt ** 2") == [100.0, 1600.0, 625.0]
    assert ev("-MET.pt") == [-10.0, -40.0, -25.0]
    assert ev("nPV * 2 + 1") == [7, 3, 5]


def test_and_or_bind_looser_than_comparisons():
    # Python would read "pt > 25 & eta < 1" as "pt > (25 & eta) < 1"; we read it as in C++
    assert ev("MET.pt > 15 & MET.phi < 0.5") == [False, False, True]
    assert ev("MET.pt > 30 | MET.phi < -0.5") == [False, True, True]
    assert ev("MET.pt > 15 and MET.phi < 0.5") == [False, False, True]
    assert ev("MET.pt > 30 or MET.phi < -0.5") == [False, True, True]
    assert ev("MET.pt > 30 | MET.pt < 15 & MET.phi > 0") == [False, True, False]


def test_bitwise_and_on_integers_with_parentheses():
    assert ev("(Jet.jetId & 2) > 0") == [[True, True], [], [False]]
    assert ev("(nPV | 4)") == [7, 5, 6]


def test_not_and_invert():
    assert ev("~(MET.pt > 15)") == [True, False, False]
    assert ev("not MET.pt > 15") == [True, False, False]


def test_chained_comparison():
    assert ev("15 < MET.pt <= 40") == [False, True, True]
    assert ev("MET.pt == 40") == [False, True, False]
    assert ev("MET.pt != 40") == [True, False, True]
    assert ev("MET.pt >= 25") == [False, True, True]


def test_masks_slices_and_indices():
    assert ev("Jet.pt[Jet.pt > 25]") == [[50.0, 30.0], [], []]
    assert ev("Jet.pt[:, :1]") == [[50.0], [], [20.0]]
    assert ev("Jet.pt[:, -1:]") == [[30.0], [], [20.0]]
    two = {"Jet": JETS[[0]]}
    assert ev("Jet.pt[:, 1]", two) == [30.0]
    assert ev("Jet.pt[:, -1]", two) == [30.0]


# --------------------------------------------------------------------------- functions


def test_reductions_per_event():
    assert ev("num(Jet)") == [2, 0, 1]
    assert ev("sum(Jet.pt)") == [80.0, 0.0, 20.0]
    assert ev("sum(Jet.pt > 25)") == [2, 0, 0]
    assert ev("any(Jet.pt > 40)") == [True, False, False]
    assert ev("all(Jet.pt > 25)") == [True, True, False]
    assert ev("mean(Jet.pt)")[0] == 40.0


def test_min_max_mean_of_empty_lists_are_nan():
    mins, maxs, means = ev("min(Jet.pt)"), ev("max(Jet.pt)"), ev("mean(Jet.pt)")
    assert (mins[0], mins[2]) == (30.0, 20.0)
    assert (maxs[0], maxs[2]) == (50.0, 20.0)
    assert math.isnan(mins[1]) and math.isnan(maxs[1]) and math.isnan(means[1])
    assert ev("max(Jet.pt) > 10") == [True, False, True]  # NaN compares False


def test_two_argument_min_max_are_elementwise():
    assert ev("max(MET.pt, 20)") == [20.0, 40.0, 25.0]
    assert ev("min(MET.pt, 20)") == [10.0, 20.0, 20.0]


def test_elementwise_math_functions():
    x = {"x": np.array([0.25, 1.0, 4.0]), "y": np.array([-1.5, 2.5, 0.5])}
    np.testing.assert_allclose(ev("abs(y)", x), [1.5, 2.5, 0.5])
    np.testing.assert_allclose(ev("sqrt(x)", x), [0.5, 1.0, 2.0])
    np.testing.assert_allclose(ev("exp(x)", x), np.exp([0.25, 1.0, 4.0]))
    np.testing.assert_allclose(ev("log(x)", x), np.log([0.25, 1.0, 4.0]))
    np.testing.assert_allclose(ev("log10(x)", x), np.log10([0.25, 1.0, 4.0]))
    np.testing.assert_allclose(ev("sin(y)", x), np.sin([-1.5, 2.5, 0.5]))
    np.testing.assert_allclose(ev("cos(y)", x), np.cos([-1.5, 2.5, 0.5]))
    np.testing.assert_allclose(ev("tan(y)", x), np.tan([-1.5, 2.5, 0.5]))
    np.testing.assert_allclose(ev("cosh(y)", x), np.cosh([-1.5, 2.5, 0.5]))
    np.testing.assert_allclose(ev("sinh(y)", x), np.sinh([-1.5, 2.5, 0.5]))
    np.testing.assert_allclose(ev("tanh(y)", x), np.tanh([-1.5, 2.5, 0.5]))
    np.testing.assert_allclose(ev("arctan2(y, x)", x), np.arctan2([-1.5, 2.5, 0.5], [0.25, 1, 4]))
    assert ev("round(y)", x) == [-2.0, 2.0, 0.0]  # halves to even
    assert ev("floor(y)", x) == [-2.0, 2.0, 0.0]
    assert ev("ceil(y)", x) == [-1.0, 3.0, 1.0]
    assert ev("clip(y, -1, 1)", x) == [-1.0, 1.0, 0.5]
    assert ev("where(y > 0, x, -x)", x) == [-0.25, 1.0, 4.0]


def test_math_on_jagged_arrays():
    assert ev("abs(Jet.eta)") == [[0.5, 1.0], [], [2.5]]
    assert ev("sum(Jet.pt * (abs(Jet.eta) < 2.4))") == [80.0, 0.0, 0.0]


def test_delta_phi_wraps_into_minus_pi_pi():
    phis = {"a": np.array([3.0, -3.0, 0.5]), "b": np.array([-3.0, 3.0, 0.25])}
    np.testing.assert_allclose(
        ev("delta_phi(a, b)", phis), [6.0 - 2 * np.pi, -6.0 + 2 * np.pi, 0.25]
    )
    values = np.array(ev("delta_phi(a, b)", phis))
    assert np.all((values >= -np.pi) & (values < np.pi))


def test_delta_r():
    ns = {
        "e1": np.array([0.0]),
        "p1": np.array([3.0]),
        "e2": np.array([0.3]),
        "p2": np.array([-3.0]),
    }
    expected = math.hypot(0.3, 6.0 - 2 * math.pi)
    np.testing.assert_allclose(ev("delta_r(e1, p1, e2, p2)", ns), [expected])
    # jets against the MET direction: broadcast per event
    dr = ev("delta_r(Jet.eta, Jet.phi, 0 * MET.phi, MET.phi)")
    np.testing.assert_allclose(dr[0], [math.hypot(0.5, 0.1), math.hypot(1.0, 3.0)])
    assert dr[1] == []


def test_inv_mass_of_two_back_to_back_massless_objects():
    mu = ak.Array(
        [
            [
                {"pt": 45.0, "eta": 0.0, "phi": 0.0, "mass": 0.0},
                {"pt": 45.0, "eta": 0.0, "phi": math.pi, "mass": 0.0},
            ],
            [],
        ]
    )
    np.testing.assert_allclose(ev("inv_mass(Mu)", {"Mu": mu}), [90.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(
        ev("inv_mass(Mu[:, 0], Mu[:, 1])", {"Mu": mu[:1]}), [90.0], atol=1e-9
    )


def test_every_function_is_documented_with_its_usage():
    assert {"num", "sum", "any", "all", "min", "max", "mean", "delta_r", "delta_phi"} <= set(
        FUNCTIONS
    )
    assert all(spec.usage for spec in FUNCTIONS.values())


# --------------------------------------------------------------------------- object `where`


def test_bare_names_in_where_are_fields_of_the_collection():
    mask = parse("pt > 25 & abs(eta) < 2.4 & jetId >= 2").evaluate(FieldNamespace(JETS))
    assert ak.to_list(mask) == [[True, True], [], [False]]


def test_where_falls_back_to_event_names():
    ns = FieldNamespace(JETS, parent={"MET": MET})
    assert ak.to_list(parse("pt > MET.pt").evaluate(ns)) == [[True, True], [], [False]]
    assert "MET" in ns and "pt" in ns
    assert list(ns)[:3] == ["pt", "eta", "phi"]


def test_where_unknown_field_suggests_the_close_one():
    with pytest.raises(ExpressionError) as info:
        parse("ptt > 25", context="skim.selection.objects.GoodJet.where").evaluate(
            FieldNamespace(JETS)
        )
    assert str(info.value) == (
        "expression in skim.selection.objects.GoodJet.where:\n"
        "    ptt > 25\n"
        "    ^^^\n"
        "unknown name 'ptt'. Did you mean 'pt'?"
    )


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Jet.__class__", "names starting with '_' are not allowed ('__class__')"),
        ("__import__('os')", "names starting with '_' are not allowed ('__import__')"),
        ("_secret > 1", "names starting with '_' are not allowed ('_secret')"),
        ("lambda x: x", "lambdas are not allowed"),
        ("[j for j in Jet]", "comprehensions are not allowed"),
        ("sum(j for j in Jet)", "generator expressions are not allowed"),
        ("{j: 1 for j in Jet}", "comprehensions are not allowed"),
        ("'Jet'", "strings are not allowed"),
        ("f'{Jet}'", "strings are not allowed"),
        ("Jet.pt.sum()", "may be called (no methods or attribute calls)"),
        ("Jet.matched.pt > 1", "only one level of fields is supported"),
        ("a.b.c", "only one level of fields is supported"),
        ("Jet.pt if x else 1", "use where(c, x, y)"),
        ("x in Jet", "'in' is not allowed"),
        ("x is None", "'is' is not allowed"),
        ("None", "None is not allowed"),
        ("[1, 2]", "lists are not allowed"),
        ("(1, 2)", "tuples are only allowed inside [...]"),
        ("(x := 1)", "':=' is not allowed"),
        ("x << 1", "operator LShift is not allowed"),
        ("sum", "'sum' is a function; call it, e.g. sum(GoodJet.pt): per-event sum"),
        ("sum(x, axis=0)", "sum() takes no keyword arguments"),
        ("delta_r(a)", "delta_r() takes 2 to 4 argument(s), got 1"),
        ("Jet.pt[0]", "[0] picks event 0, not an object of every event; write [:, 0]"),
        ("Jet.pt[:, 0.5]", "inside [a, b] use whole numbers and slices"),
        ("Jet.pt[:x]", "slice bounds must be whole numbers"),
        ("", "the expression is empty"),
        ("Jet.pt >", "invalid syntax"),
    ],
)
def test_refused_at_parse_time(text, message):
    with pytest.raises(ExpressionError) as info:
        parse(text, context="skim.selection.cuts[2]")
    text_of_error = str(info.value)
    assert text_of_error.startswith("expression in skim.selection.cuts[2]:")
    assert message in text_of_error
    assert isinstance(info.value, CmsmlError)


def test_error_points_at_the_offending_part():
    with pytest.raises(ExpressionError) as info:
        parse("MET.pt > 30 & summ(Jet.pt) > 100", context="skim.selection.cuts[1]")
    lines = str(info.value).splitlines()
    assert lines[0] == "expression in skim.selection.cuts[1]:"
    assert lines[1] == "    MET.pt > 30 & summ(Jet.pt) > 100"
    assert lines[2] == "                  ^^^^"
    assert lines[3].startswith("unknown function 'summ'. Did you mean 'sum' or 'num'?")
    assert "Allowed functions: num, sum, any" in lines[3]


def test_not_a_string_is_refused():
    with pytest.raises(ExpressionError, match="expression in cuts must be a string, not int"):
        parse(3, context="cuts")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- evaluation errors


def test_unknown_name_lists_close_matches():
    with pytest.raises(ExpressionError) as info:
        parse("num(Jets) > 1", context="skim.selection.cuts[0]").evaluate(NS)
    assert str(info.value) == (
        "expression in skim.selection.cuts[0]:\n"
        "    num(Jets) > 1\n"
        "        ^^^^\n"
        "unknown name 'Jets'. Did you mean 'Jet'?"
    )


def test_unknown_field_lists_close_matches():
    with pytest.raises(ExpressionError, match=r"'MET' has no field 'ptt'\. Did you mean 'pt'\?"):
        parse("MET.ptt > 1").evaluate(NS)


def test_jagged_index_past_the_end_names_events_and_suggests_a_cut():
    with pytest.raises(ExpressionError) as info:
        parse("Jet.pt[:, 1]", context="skim.selection.variables.sublead").evaluate(NS)
    assert str(info.value) == (
        "expression in skim.selection.variables.sublead:\n"
        "    Jet.pt[:, 1]\n"
        "    ^^^^^^^^^^^^\n"
        "2 of 3 events have fewer than 2 object(s) in Jet.pt, so [:, 1] does not exist for "
        'them. Add a cut before this, e.g. "num(Jet) >= 2", or use a reduction such as '
        "max(Jet.pt)."
    )


def test_reduction_of_one_value_per_event_is_an_error():
    with pytest.raises(ExpressionError, match=r"sum\(\) reduces a list per event .* one value per"):
        parse("sum(MET.pt)").evaluate(NS)
    with pytest.raises(ExpressionError, match=r"num\(\) reduces a list per event"):
        parse("num(MET)").evaluate(NS)


def test_inv_mass_needs_four_vector_fields():
    with pytest.raises(ExpressionError, match="inv_mass.. needs objects with fields pt, eta, phi"):
        parse("inv_mass(MET)").evaluate(NS)


def test_expressions_are_never_evaluated_with_python_eval(monkeypatch):
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("eval was called")

    monkeypatch.setattr(builtins, "eval", refuse)
    assert ev("sum(Jet.pt) > 50") == [True, False, False]


# --------------------------------------------------------------------------- physics helpers


MUONS = ak.Array(
    [
        [
            {"pt": 40.0, "eta": 0.3, "phi": 0.2, "mass": 0.1057, "charge": 1},
            {"pt": 35.0, "eta": -0.8, "phi": 2.9, "mass": 0.1057, "charge": -1},
            {"pt": 10.0, "eta": 1.5, "phi": -1.0, "mass": 0.1057, "charge": 1},
        ],
        [{"pt": 25.0, "eta": 2.0, "phi": -2.0, "mass": 0.1057, "charge": -1}],
    ]
)


def p4(pt: float, eta: float, phi: float, mass: float) -> np.ndarray:
    px, py, pz = pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta)
    return np.array([math.sqrt(px**2 + py**2 + pz**2 + mass**2), px, py, pz])


def mass_of(*vectors: np.ndarray) -> float:
    e, px, py, pz = sum(vectors)
    return math.sqrt(max(e**2 - px**2 - py**2 - pz**2, 0.0))


def test_inv_mass_of_a_pair_and_of_a_collection_by_hand():
    mu = [[p4(m["pt"], m["eta"], m["phi"], m["mass"]) for m in ev_] for ev_ in MUONS.tolist()]
    ns = {"Mu": MUONS[:1]}
    np.testing.assert_allclose(ev("inv_mass(Mu[:, 0], Mu[:, 1])", ns), [mass_of(*mu[0][:2])])
    np.testing.assert_allclose(ev("inv_mass(Mu[:, :2])", ns), [mass_of(*mu[0][:2])])
    # the whole collection, event by event; a single object has its own mass
    np.testing.assert_allclose(
        ev("inv_mass(Mu)", {"Mu": MUONS}), [mass_of(*mu[0]), 0.1057], rtol=1e-5
    )
    # a collection plus an object; a sum with a second collection
    np.testing.assert_allclose(
        ev("inv_mass(Mu[:, :1], Mu[:, 2])", ns), [mass_of(mu[0][0], mu[0][2])]
    )


def test_delta_r_of_two_objects_and_nearest_neighbour():
    ns = {"Jet": JETS[:1], "Mu": MUONS[:1]}
    expected = math.hypot(0.5 - 0.3, 0.1 - 0.2)
    np.testing.assert_allclose(ev("delta_r(Jet[:, 0], Mu[:, 0])", ns), [expected])
    # an object against a collection: one value per jet
    np.testing.assert_allclose(
        ev("delta_r(Mu[:, 0], Jet)", ns)[0], [expected, math.hypot(1.3, 2.8)]
    )
    near = ev("min_delta_r(Jet, Mu)", {"Jet": JETS, "Mu": MUONS[[0, 1, 1]]})
    jets = JETS.tolist()
    mus = MUONS.tolist()[0]
    want0 = [
        min(
            math.hypot(
                j["eta"] - m["eta"], (j["phi"] - m["phi"] + math.pi) % (2 * math.pi) - math.pi
            )
            for m in mus
        )
        for j in jets[0]
    ]
    np.testing.assert_allclose(near[0], want0)
    assert near[1] == []
    assert len(near[2]) == 1 and 0 < near[2][0] < 10
    # no muon at all: every jet is infinitely far from one, so a cleaning cut keeps it
    three = MUONS[[0, 1, 1]]
    empty = {"Jet": JETS, "Mu": three[three.pt > 1000]}
    assert ev("min_delta_r(Jet, Mu) > 0.4", empty) == [[True, True], [], [True]]


def test_delta_r_argument_errors():
    with pytest.raises(ExpressionError, match=r"delta_r\(\) takes two objects or four numbers"):
        parse("delta_r(Jet.eta, Jet.phi, MET.phi)").evaluate(NS)
    with pytest.raises(ExpressionError, match=r"delta_r\(\) needs objects with fields eta, phi"):
        parse("delta_r(MET, nPV)").evaluate(NS)
    with pytest.raises(ExpressionError, match=r"min_delta_r\(\) takes two collections"):
        parse("min_delta_r(Jet, MET)").evaluate(NS)


# --------------------------------------------------------------------------- escape attempts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # dunder attributes: the classic walk to object.__subclasses__()
        ("Jet.__class__.__mro__", "names starting with '_' are not allowed ('__mro__')"),
        ("Jet.__dict__", "names starting with '_' are not allowed ('__dict__')"),
        ("Jet[:, 0].__init__", "names starting with '_' are not allowed ('__init__')"),
        ("__builtins__", "names starting with '_' are not allowed ('__builtins__')"),
        ("(1).__class__", "names starting with '_' are not allowed ('__class__')"),
        ("().__class__", "names starting with '_' are not allowed ('__class__')"),
        # imports: a statement is not an expression; __import__ is a dunder
        ("import os", "invalid syntax"),
        ("__import__('os').system('ls')", "may be called (no methods or attribute calls)"),
        # calls outside the whitelist
        ("open('/etc/passwd')", "unknown function 'open'"),
        ("eval('1 + 1')", "unknown function 'eval'"),
        ("exec('x = 1')", "unknown function 'exec'"),
        ("getattr(Jet, 'pt')", "unknown function 'getattr'"),
        ("globals()", "unknown function 'globals'"),
        ("type(Jet)", "unknown function 'type'"),
        ("breakpoint()", "unknown function 'breakpoint'"),
        ("compile(x, y, z)", "unknown function 'compile'"),
        ("Jet.pt.sum()", "may be called (no methods or attribute calls)"),
        ("num(Jet)(1)", "may be called (no methods or attribute calls)"),
        ("(lambda: 1)()", "may be called"),
        # huge exponents, written every which way
        ("10**10**10", "the exponent (1e+10) is too large; at most 100 in size"),
        ("2 ** 1000", "the exponent (1000) is too large"),
        ("Jet.pt ** (10 ** 10)", "the exponent (1e+10) is too large"),
        ("Jet.pt ** -101", "the exponent (-101) is too large"),
        ("9 ** 9 ** 9 ** 9", "the exponent (too large to compute) is too large"),
    ],
)
def test_escape_attempts_are_refused(text, message):
    with pytest.raises(ExpressionError) as info:
        parse(text, context="skim.selection.variables.x")
    assert message in str(info.value)


def test_exponent_from_data_is_checked_when_evaluated():
    # the exponent is only known on the data: refused then, not computed
    with pytest.raises(ExpressionError, match=r"the exponent 1000 is too large \(at most 100"):
        parse("2 ** k").evaluate({"k": 1000})
    assert parse("2 ** k").evaluate({"k": 10}) == 1024.0
    assert ev("MET.pt ** 0.5") == pytest.approx([math.sqrt(10), math.sqrt(40), 5.0])
    # whole numbers are powered in floating point: no giant integers, overflow is inf
    assert parse("(10 ** 100) ** 100").evaluate({}) == math.inf


# --------------------------------------------------------------------------- numpy fast paths
# The evaluator skips awkward's broadcasting where numpy on the flat contents
# gives the same answer; these compare the two on layouts that arise in a skim.


def _sliced_jets() -> ak.Array:
    """Jets of events 1.. of a larger array: offsets that do not start at 0."""
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 6, size=200)
    flat = {f: rng.normal(40, 20, counts.sum()) for f in ("pt", "eta", "btag")}
    whole = ak.unflatten(ak.zip(flat), counts)
    layout = whole.layout
    offsets = np.asarray(layout.offsets)[5:]  # events 5.. only, the content kept whole
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets), layout.content))


@pytest.mark.parametrize(
    "text",
    [
        "pt > 25 & abs(eta) < 40",
        "-pt + 2 * eta ** 2 >= btag",
        "not (pt < 30)",
        "sqrt(abs(eta)) / (pt + 1)",
        "pt // 7 % 3",
    ],
)
def test_fast_elementwise_matches_awkward(text):
    jets = _sliced_jets()
    expr = parse(text)
    fast = expr.evaluate(FieldNamespace(jets))
    assert fast.layout.offsets is jets.layout.offsets  # the numpy path was taken
    expected = parse(text).evaluate(FieldNamespace(ak.Array(ak.to_list(jets))))
    np.testing.assert_allclose(
        ak.to_numpy(ak.flatten(fast)).astype(float),
        ak.to_numpy(ak.flatten(expected)).astype(float),
        rtol=1e-12,
    )
    assert ak.to_list(ak.num(fast)) == ak.to_list(ak.num(expected))


def test_fast_select_and_take_events_match_awkward():
    from cmsmlkit.data.expr import select, take_events

    jets = _sliced_jets()
    reference = ak.Array(ak.to_list(jets))
    good = select(jets, jets.pt > 30)
    assert type(good.layout).__name__ == "ListOffsetArray"
    assert ak.to_list(good) == ak.to_list(reference[reference.pt > 30])
    # a selection of a selection goes through one index into the original records
    better = select(good, good.btag > 40)
    assert ak.to_list(better) == ak.to_list(reference[(reference.pt > 30) & (reference.btag > 40)])
    events = np.asarray(ak.num(good) >= 2)
    picked = take_events(better, events)
    assert ak.to_list(picked) == ak.to_list(
        reference[(reference.pt > 30) & (reference.btag > 40)][events]
    )
    assert ak.to_list(parse("num(J[J.pt > 50])").evaluate({"J": picked})) == ak.to_list(
        ak.num(picked[picked.pt > 50])
    )


def test_fast_paths_leave_other_layouts_to_awkward():
    # lists against per-event values, missing values, and lists of different offsets
    jets = ak.Array([[1.0, 2.0], [], [3.0]])
    per_event = np.array([1.5, 0.0, 2.0])
    assert ev("J > x", {"J": jets, "x": per_event}) == [[False, True], [], [True]]
    optional = ak.Array([[1.0, None], [], [3.0]])
    assert ev("J > 1.5", {"J": optional}) == [[False, None], [], [True]]
    other = ak.Array([[0.5, 2.5], [], [1.0]])
    assert ev("J > K", {"J": jets, "K": other}) == [[True, False], [], [True]]
    assert ev("J[K > 1]", {"J": jets, "K": other}) == [[2.0], [], []]
