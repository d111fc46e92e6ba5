"""Tests of cmsmlkit.data.pad: numpy padding against a pure-Python reference."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest

from cmsmlkit.data.pad import Padded, choose_max_len, numeric_fields, pad, pad_collection
from cmsmlkit.errors import ConfigError, DataError


def reference(counts, values, max_len, sort_by, pad_value):
    """Event by event, object by object: the obvious (slow) way."""
    n = len(counts)
    out = {k: [[pad_value] * max_len for _ in range(n)] for k in values}
    mask = [[False] * max_len for _ in range(n)]
    start = 0
    truncated = 0
    for i, c in enumerate(counts):
        idx = list(range(start, start + c))
        if sort_by is not None:
            # stable: equal keys keep file order
            idx = sorted(idx, key=lambda j: -values[sort_by][j])
        truncated += c > max_len
        for slot, j in enumerate(idx[:max_len]):
            mask[i][slot] = True
            for k in values:
                out[k][i][slot] = values[k][j]
        start += c
    return out, mask, truncated


def random_jagged(seed, n=200, max_count=9):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_count, n)
    total = int(counts.sum())
    # rounded pt so that ties occur and stability is exercised
    values = {
        "pt": np.round(rng.exponential(30, total), 0),
        "eta": rng.normal(0, 2, total),
        "btag": rng.integers(0, 2, total).astype(bool),
    }
    return counts, values


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("sort_by", ["pt", "eta", None])
@pytest.mark.parametrize(("max_len", "pad_value"), [(1, 0.0), (4, -999.0), (12, 0.0)])
def test_pad_matches_reference(seed, sort_by, max_len, pad_value):
    counts, values = random_jagged(seed)
    got = pad(counts, values, max_len, sort_by=sort_by, pad_value=pad_value)
    want, want_mask, want_truncated = reference(counts, values, max_len, sort_by, pad_value)
    assert set(got.values) == {"pt", "eta", "btag"}
    for k in values:
        assert got.values[k].dtype == np.float32
        assert got.values[k].shape == (200, max_len)
        np.testing.assert_array_equal(got.values[k], np.asarray(want[k], dtype=np.float32))
    assert got.mask.dtype == bool
    np.testing.assert_array_equal(got.mask, np.asarray(want_mask))
    np.testing.assert_array_equal(got.mask.sum(axis=1), np.minimum(counts, max_len))
    assert got.n_truncated == want_truncated == int(np.sum(counts > max_len))


def test_pad_small_example_sorted_and_truncated():
    counts = np.array([3, 0, 2])
    values = {"pt": np.array([10.0, 40.0, 25.0, 7.0, 7.5]), "eta": np.array([1, 2, 3, 4, 5.0])}
    got = pad(counts, values, 2, pad_value=-1.0)
    assert got.values["pt"].tolist() == [[40.0, 25.0], [-1.0, -1.0], [7.5, 7.0]]
    assert got.values["eta"].tolist() == [[2.0, 3.0], [-1.0, -1.0], [5.0, 4.0]]
    assert got.mask.tolist() == [[True, True], [False, False], [True, True]]
    assert got.n_truncated == 1
    assert repr(got) == "Padded(n_events=3, max_len=2, fields=['pt', 'eta'], n_truncated=1)"
    unsorted = pad(counts, values, 2, sort_by=None)
    assert unsorted.values["pt"].tolist() == [[10.0, 40.0], [0.0, 0.0], [7.0, 7.5]]


def test_pad_ties_keep_file_order():
    got = pad(np.array([3]), {"pt": np.array([5.0, 9.0, 5.0]), "i": np.array([0, 1, 2.0])}, 3)
    assert got.values["i"].tolist() == [[1.0, 0.0, 2.0]]


def test_pad_zero_events():
    got = pad(np.array([], dtype=np.int64), {"pt": np.array([])}, 3)
    assert got.values["pt"].shape == (0, 3)
    assert got.values["pt"].dtype == np.float32
    assert got.mask.shape == (0, 3)
    assert got.n_truncated == 0
    assert (got.n_events, got.max_len) == (0, 3)


def test_pad_events_without_objects():
    got = pad(
        np.zeros(4, dtype=np.int64), {"pt": np.array([]), "eta": np.array([])}, 2, pad_value=3.5
    )
    assert got.values["pt"].tolist() == [[3.5, 3.5]] * 4
    assert not got.mask.any()
    assert got.n_truncated == 0


def test_pad_max_len_larger_than_any_multiplicity():
    counts, values = random_jagged(5, n=50, max_count=4)
    got = pad(counts, values, 10)
    assert got.mask.shape == (50, 10)
    assert not got.mask[:, 3:].any()
    assert got.mask.sum() == counts.sum()
    assert got.n_truncated == 0
    # every object is kept: the real entries are a permutation of the input per event
    assert (
        np.sort(got.values["pt"][got.mask]).tolist()
        == np.sort(values["pt"]).astype(np.float32).tolist()
    )


def test_pad_unknown_sort_by_lists_fields():
    with pytest.raises(ConfigError) as info:
        pad(np.array([1]), {"pt": np.array([1.0]), "eta": np.array([0.5])}, 2, sort_by="ptt")
    text = str(info.value)
    assert "cannot sort objects by 'ptt'" in text
    assert "fields: pt, eta" in text
    assert "Did you mean 'pt'?" in text


def test_pad_rejects_bad_inputs():
    with pytest.raises(
        DataError, match="field 'pt' holds \\(3,\\) values but the counts add up to 2"
    ):
        pad(np.array([1, 1]), {"pt": np.array([1.0, 2.0, 3.0])}, 2)
    with pytest.raises(ConfigError, match="max_len must be an integer >= 1"):
        pad(np.array([1]), {"pt": np.array([1.0])}, 0)
    with pytest.raises(DataError, match="counts must be >= 0"):
        pad(np.array([-1, 2]), {"pt": np.array([1.0])}, 2)
    # float counts holding whole numbers are accepted
    assert pad(np.array([1.0, 0.0]), {"pt": np.array([4.0])}, 1).values["pt"].tolist() == [
        [4.0],
        [0.0],
    ]


def test_pad_collection_matches_pad():
    counts, values = random_jagged(11, n=100)
    jets = ak.zip({k: ak.unflatten(v, counts) for k, v in values.items()})
    got = pad_collection(jets, 3, fields=["eta", "btag"], sort_by="pt", pad_value=-5.0)
    want = pad(counts, values, 3, sort_by="pt", pad_value=-5.0)
    assert list(got.values) == ["eta", "btag"]  # sorted by pt, pt itself not written
    np.testing.assert_array_equal(got.values["eta"], want.values["eta"])
    np.testing.assert_array_equal(got.values["btag"], want.values["btag"])
    np.testing.assert_array_equal(got.mask, want.mask)
    assert got.n_truncated == want.n_truncated
    everything = pad_collection(jets, 3)
    assert list(everything.values) == ["pt", "eta", "btag"]


def test_pad_collection_option_lists_and_unknown_field():
    jets = ak.Array(
        [[{"pt": 1.0, "eta": 0.1}], None, [{"pt": 3.0, "eta": 0.3}, {"pt": 4.0, "eta": 0.4}]]
    )
    got = pad_collection(jets, 2)
    assert got.values["pt"].tolist() == [[1.0, 0.0], [0.0, 0.0], [4.0, 3.0]]
    assert got.mask.tolist() == [[True, False], [False, False], [True, True]]
    with pytest.raises(ConfigError, match="no numeric field 'phi' \\(fields: pt, eta\\)"):
        pad_collection(jets, 2, fields=["phi"])
    with pytest.raises(ConfigError, match="cannot sort objects by 'mass'"):
        pad_collection(jets, 2, sort_by="mass")


def test_numeric_fields_skips_nested_and_strings():
    jets = ak.Array([[{"pt": 1.0, "idx": [1, 2], "name": "a", "ok": True}]])
    assert numeric_fields(jets) == ["pt", "ok"]


@pytest.mark.parametrize(
    ("counts", "quantile", "expected"),
    [
        ([0, 1, 2, 3, 10], 0.8, 3),
        ([0, 1, 2, 3, 10], 1.0, 10),
        ([0, 1, 2, 3, 10], 0.95, 10),
        (list(range(100)), 0.95, 94),
        ([0, 0, 0], 0.95, 1),
        ([], 0.95, 1),
        ([4] * 10, 0.5, 4),
    ],
)
def test_choose_max_len(counts, quantile, expected):
    got = choose_max_len(np.array(counts, dtype=np.int64), quantile)
    assert got == expected
    assert isinstance(got, int)
    if counts:  # at least the quantile of the events fit
        assert np.mean(np.array(counts) <= got) >= quantile or got == 1


def test_choose_max_len_rejects_bad_quantile():
    with pytest.raises(ConfigError, match="quantile must be in \\(0, 1\\], got 1.5"):
        choose_max_len(np.array([1, 2]), 1.5)


def test_padded_is_a_dataclass():
    p = Padded(
        values={"pt": np.zeros((2, 3), np.float32)}, mask=np.zeros((2, 3), bool), n_truncated=0
    )
    assert (p.n_events, p.max_len) == (2, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_len_from_histogram_equals_quantile_of_counts(seed):
    from cmsmlkit.data.pad import max_len_from_histogram

    rng = np.random.default_rng(seed)
    counts = rng.poisson(4, 500)
    for q in (0.1, 0.5, 0.9, 0.95, 0.999, 1.0):
        want = max(1, int(np.quantile(counts, q, method="inverted_cdf")))
        assert max_len_from_histogram(np.bincount(counts), q) == want == choose_max_len(counts, q)
    # histograms of two files add up to the histogram of both
    a, b = counts[:200], counts[200:]
    h = np.zeros(counts.max() + 1, dtype=np.int64)
    h[: a.max() + 1] += np.bincount(a)
    h[: b.max() + 1] += np.bincount(b)
    assert max_len_from_histogram(h, 0.9) == choose_max_len(counts, 0.9)
    assert max_len_from_histogram(np.zeros(0), 0.9) == 1
    with pytest.raises(ConfigError, match="quantile must be in \\(0, 1\\]"):
        max_len_from_histogram(h, 0.0)


def test_pad_of_already_sorted_objects_skips_the_sort_with_the_same_result(monkeypatch):
    from cmsmlkit.data import pad as pad_module

    counts = np.array([3, 2, 0, 2])
    values = {"pt": np.array([50.0, 40.0, 40.0, 30.0, 10.0, 7.0, 7.0]), "i": np.arange(7.0)}
    calls = []
    real = pad_module._descending_within_events
    monkeypatch.setattr(
        pad_module, "_descending_within_events", lambda *a: calls.append(1) or real(*a)
    )
    got = pad(counts, values, 2)
    assert calls == []  # NanoAOD order (by pt) is kept as it is
    assert got.values["i"].tolist() == [[0.0, 1.0], [3.0, 4.0], [0.0, 0.0], [5.0, 6.0]]
    values["pt"][4] = 99.0  # now the second event is out of order
    got = pad(counts, values, 2)
    assert calls == [1]
    assert got.values["i"].tolist() == [[0.0, 1.0], [4.0, 3.0], [0.0, 0.0], [5.0, 6.0]]
    values["pt"][0] = np.nan  # NaN sorts last: the sort runs
    assert pad(counts, values, 3).values["i"][0].tolist() == [1.0, 2.0, 0.0]


def test_pad_sort_check_allows_rises_only_between_events(monkeypatch):
    from cmsmlkit.data import pad as pad_module

    calls = []
    real = pad_module._descending_within_events
    monkeypatch.setattr(
        pad_module, "_descending_within_events", lambda *a: calls.append(1) or real(*a)
    )
    # pt rises from 5 to 50 across an empty event: still NanoAOD order, no sort
    got = pad(np.array([1, 0, 2]), {"pt": np.array([5.0, 50.0, 40.0])}, 2)
    assert calls == []
    assert got.values["pt"].tolist() == [[5.0, 0.0], [0.0, 0.0], [50.0, 40.0]]
    # a rise inside the last event: sorted
    got = pad(np.array([1, 0, 2]), {"pt": np.array([5.0, 40.0, 50.0])}, 2)
    assert calls == [1]
    assert got.values["pt"].tolist() == [[5.0, 0.0], [0.0, 0.0], [50.0, 40.0]]


def test_pad_any_numeric_dtype_to_float32_with_a_nan_pad_value():
    counts = np.array([2, 0, 3], dtype=np.int32)
    values = {
        "pt": np.array([9, 3, 8, 7, 1], dtype=np.int64),
        "id": np.array([True, False, True, True, False]),
        "charge": np.array([1, -1, -1, 1, 1], dtype=np.int8),
    }
    got = pad(counts, values, 4, pad_value=np.nan)
    assert {k: v.dtype for k, v in got.values.items()} == dict.fromkeys(values, np.float32)
    np.testing.assert_array_equal(
        got.values["pt"], [[9, 3, np.nan, np.nan], [np.nan] * 4, [8, 7, 1, np.nan]]
    )
    np.testing.assert_array_equal(
        got.values["id"], [[1, 0, np.nan, np.nan], [np.nan] * 4, [1, 1, 0, np.nan]]
    )
    np.testing.assert_array_equal(got.values["charge"][2], [-1, 1, 1, np.nan])
    assert got.mask.tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]
    assert got.n_truncated == 0
