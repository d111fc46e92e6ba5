"""Figures of a classifier: ROC, scores, confusion matrix, loss curves, and how they are saved."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from cmsmlkit import plots

BINARY = ["signal", "background"]
THREE = ["ttbar", "wjets", "dy"]


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def cms_label(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_text() in ("CMS", "Simulation Preliminary")]


@pytest.fixture
def binary():
    """Four events, perfectly separated by P(signal)."""
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    return y, proba


@pytest.fixture
def three():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 2], 100)
    logits = rng.normal(size=(300, 3))
    logits[np.arange(300), y] += 2.0
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


# --------------------------------------------------------------------------- pure functions


def test_roc_curve_values():
    eff_s, eff_b, auc = plots.roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6])
    assert eff_s.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert eff_b.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert auc == pytest.approx(0.75)
    # ties are one step: identical scores give the chance diagonal
    assert plots.roc_curve([1, 0], [0.5, 0.5])[2] == pytest.approx(0.5)
    # a weight of 2 counts like the event twice
    weighted = plots.roc_curve([1, 0, 0], [0.4, 0.5, 0.3], weights=[1.0, 2.0, 1.0])[2]
    doubled = plots.roc_curve([1, 0, 0, 0], [0.4, 0.5, 0.5, 0.3])[2]
    assert weighted == pytest.approx(doubled) == pytest.approx(1 / 3)
    assert np.isnan(plots.roc_curve([1, 1], [0.2, 0.3])[2])


def test_confusion_matrix_is_row_normalised():
    y = [0, 0, 0, 1, 2]
    proba = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.0, 0.1, 0.9]]
    matrix = plots.confusion_matrix(y, proba)
    np.testing.assert_allclose(matrix, [[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])


def test_inputs_are_checked(binary):
    y, proba = binary
    with pytest.raises(ValueError, match=r"proba has 2 columns but 3 class names were given"):
        plots.roc_figure(y, proba, THREE)
    with pytest.raises(ValueError, match=r"N = len\(y_true\) = 3"):
        plots.score_figure(y[:3], proba, BINARY)
    with pytest.raises(ValueError, match=r"weights must have shape \[4\]"):
        plots.roc_figure(y, proba, BINARY, weights=[1.0, 2.0])


# --------------------------------------------------------------------------- figures


def test_binary_roc_figure(binary):
    fig = plots.roc_figure(*binary, BINARY)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.lines) == 2  # the curve and the chance diagonal
    assert legend_texts(ax) == ["signal vs background (AUC = 1.000)", "random"]
    assert ax.get_xlabel() == "Signal efficiency"
    assert ax.get_ylabel() == "Background rejection"
    assert cms_label(ax) == ["CMS", "Simulation Preliminary"]
    x, y = ax.lines[0].get_data()
    assert (x[0], y[0]) == (0.0, 1.0)  # no cut passes: no signal, full rejection
    assert (x[-1], y[-1]) == (1.0, 0.0)


def test_multiclass_roc_figure(three):
    y, proba = three
    fig = plots.roc_figure(y, proba, THREE, weights=np.ones(len(y)))
    (ax,) = fig.axes
    assert len(ax.lines) == 4
    expected = [
        f"{name} vs rest (AUC = {plots.roc_curve(y == k, proba[:, k])[2]:.3f})"
        for k, name in enumerate(THREE)
    ]
    assert legend_texts(ax) == [*expected, "random"]
    assert all(0.8 < float(t.split("= ")[1][:-1]) <= 1.0 for t in expected)


def test_binary_score_figure(binary):
    y, proba = binary
    fig = plots.score_figure(y, proba, BINARY, weights=[1.0, 3.0, 1.0, 1.0])
    (ax,) = fig.axes
    assert ax.get_xlabel() == "P(signal)"
    assert ax.get_ylabel() == "Normalised events"
    assert legend_texts(ax) == ["true signal", "true background"]
    assert cms_label(ax) == ["CMS", "Simulation Preliminary"]
    assert len(ax.patches) == 2
    for patch in ax.patches:
        values, edges, _ = patch.get_data()
        assert len(edges) == 41
        assert np.sum(values * np.diff(edges)) == pytest.approx(1.0)  # unit area
    signal_values, edges, _ = ax.patches[0].get_data()
    # weights 1 and 3 at P = 0.9 and 0.6: a quarter and three quarters of the area
    filled = signal_values[signal_values > 0] * 0.025
    assert filled.tolist() == pytest.approx([0.75, 0.25])


def test_multiclass_score_figure(three):
    fig = plots.score_figure(*three, THREE)
    assert len(fig.axes) == 3
    assert [ax.get_xlabel() for ax in fig.axes] == ["P(ttbar)", "P(wjets)", "P(dy)"]
    for ax in fig.axes:
        assert legend_texts(ax) == ["true ttbar", "true wjets", "true dy"]
        assert len(ax.patches) == 3


def test_confusion_figure(three):
    y, proba = three
    fig = plots.confusion_figure(y, proba, THREE)
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # the matrix and its colour bar
    matrix = plots.confusion_matrix(y, proba)
    np.testing.assert_allclose(ax.images[0].get_array(), matrix)
    cells = [
        t.get_text() for t in ax.texts if t.get_text() not in ("", "CMS", "Simulation Preliminary")
    ]
    assert cells == [f"{v:.2f}" for v in matrix.ravel()]
    assert [t.get_text() for t in ax.get_xticklabels()] == THREE
    assert [t.get_text() for t in ax.get_yticklabels()] == THREE
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted class", "True class")
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_loss_figure_with_auc_on_a_twin_axis():
    history = {
        "train_loss": [0.7, 0.5, 0.4],
        "val_loss": [0.72, 0.55, 0.5],
        "val_auc": [0.7, 0.8, 0.85],
    }
    fig = plots.loss_figure(history)
    ax, twin = fig.axes
    assert [line.get_label() for line in ax.lines] == ["train_loss", "val_loss"]
    assert ax.lines[1].get_ydata().tolist() == [0.72, 0.55, 0.5]
    assert ax.lines[0].get_xdata().tolist() == [1, 2, 3]
    assert [line.get_label() for line in twin.lines] == ["val_auc"]
    assert (ax.get_xlabel(), ax.get_ylabel(), twin.get_ylabel()) == ("Epoch", "Loss", "AUC")
    assert legend_texts(ax) == ["train_loss", "val_loss", "val_auc"]


def test_loss_figure_without_auc():
    fig = plots.loss_figure({"train_loss": [1.0, 0.8]})
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["train_loss"]


def test_save_figure_writes_png_and_pdf(tmp_path, binary):
    fig = plots.roc_figure(*binary, BINARY)
    paths = plots.save_figure(fig, tmp_path / "figures", "roc")
    assert paths == [tmp_path / "figures" / "roc.png", tmp_path / "figures" / "roc.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert all(p.stat().st_size > 1000 for p in paths)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["roc.pdf", "roc.png"]


def test_overtraining_figure_overlays_train_and_test():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 500)
    p_sig = np.clip(np.where(y == 0, rng.beta(5, 2, 1000), rng.beta(2, 5, 1000)), 0, 1)
    proba = np.column_stack([p_sig, 1 - p_sig])
    # test: the same distributions (another sample); shifted: an overtrained-looking test sample
    p_test = np.clip(np.where(y == 0, rng.beta(5, 2, 1000), rng.beta(2, 5, 1000)), 0, 1)
    fig = plots.overtraining_figure(y, proba, y, np.column_stack([p_test, 1 - p_test]), BINARY)
    (ax,) = fig.axes
    texts = sorted(legend_texts(ax))
    assert texts[1] == "background train" and texts[3] == "signal train"
    assert texts[0].startswith("background test (KS p = ") and texts[2].startswith("signal test")
    assert all(float(t.split("= ")[1][:-1]) > 0.01 for t in (texts[0], texts[2]))
    assert cms_label(ax) == ["CMS", "Simulation Preliminary"]
    assert ax.get_xlabel() == "P(signal)"
    shifted = np.column_stack([np.clip(p_test * 0.5, 0, 1), 1 - np.clip(p_test * 0.5, 0, 1)])
    bad = plots.overtraining_figure(y, proba, y, shifted, BINARY)
    tests = [t for t in legend_texts(bad.axes[0]) if "KS" in t]
    assert len(tests) == 2 and all(float(t.split("= ")[1][:-1]) < 0.01 for t in tests)


def test_overtraining_figure_multiclass_and_weights(three):
    y, proba = three
    w = np.linspace(0.5, 1.5, len(y))
    fig = plots.overtraining_figure(y, proba, y, proba, THREE, train_weights=w, test_weights=w)
    assert [ax.get_xlabel() for ax in fig.axes] == ["P(ttbar)", "P(wjets)", "P(dy)"]
    for ax in fig.axes:
        assert len(legend_texts(ax)) == 6
        # identical train and test samples: KS p = 1
        tests = [t for t in legend_texts(ax) if "test" in t]
        assert len(tests) == 3 and all(t.endswith("(KS p = 1.00)") for t in tests)
    with pytest.raises(ValueError, match="proba has 2 columns but 3 class names"):
        plots.overtraining_figure(y, proba[:, :2], y, proba, THREE)
