"""HEP-style figures of a classifier: ROC, score distributions, overtraining check, confusion
matrix, loss curves.

A leaf module: it knows arrays and matplotlib, nothing of the stages. Every
function returns a :class:`matplotlib.figure.Figure` built without pyplot's
global state (so figures never pile up in a notebook and ``MPLBACKEND=Agg``
is all a batch job needs), drawn in the CMS style of mplhep and labelled
"CMS Simulation Preliminary".

Conventions: ``y_true`` holds class indices [N], ``proba`` the predicted
class probabilities [N, C] (C >= 2, rows summing to 1), ``class_names`` the
C names in index order. In a binary problem the first class is the signal.

>>> import numpy as np
>>> y = np.array([0, 0, 1, 1])
>>> p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
>>> fig = roc_figure(y, p, ["signal", "background"])
>>> fig.axes[0].get_legend().get_texts()[0].get_text()
'signal vs background (AUC = 1.000)'
>>> save_figure(fig, "figures", "roc")  # doctest: +SKIP
[PosixPath('figures/roc.png'), PosixPath('figures/roc.pdf')]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib.style
import mplhep
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "roc_curve",
    "roc_figure",
    "score_figure",
    "overtraining_figure",
    "confusion_matrix",
    "confusion_figure",
    "loss_figure",
    "save_figure",
]

#: The text after "CMS" on every figure.
LABEL = "Preliminary"


# --------------------------------------------------------------------------- pure functions


def _as_inputs(
    y_true: Any, proba: Any, class_names: Sequence[str], weights: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(y [N] int, proba [N, C] float, weights [N] float)``."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"proba must have shape [N, C] with N = len(y_true) = {len(y)}, got {p.shape}."
        )
    if p.shape[1] != len(class_names):
        raise ValueError(
            f"proba has {p.shape[1]} columns but {len(class_names)} class names were given: "
            f"{list(class_names)}."
        )
    if p.shape[1] < 2:
        raise ValueError("a classifier has at least 2 classes; proba has 1 column.")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true holds class indices outside 0..{p.shape[1] - 1}.")
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != y.shape:
        raise ValueError(f"weights must have shape [{len(y)}], got {w.shape}.")
    return y, p, w


def roc_curve(
    is_signal: Any, score: Any, weights: Any = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Signal and background efficiencies of the cut ``score >= t`` for every threshold, and the AUC.

    Returns ``(eff_sig, eff_bkg, auc)``; both efficiencies start at 0 and end
    at 1, ties in ``score`` are one step. The AUC is the area under
    ``eff_sig(eff_bkg)``: 1 is perfect, 0.5 is chance. NaN when a class has
    no events.

    >>> s, b, auc = roc_curve([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1])
    >>> auc
    1.0
    """
    sig = np.asarray(is_signal, dtype=bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    w = np.ones(len(sig)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    order = np.argsort(-score, kind="mergesort")
    score, sig, w = score[order], sig[order], w[order]
    # one point per distinct threshold: the last index of each run of equal scores
    last = (
        np.r_[np.flatnonzero(np.diff(score)), len(score) - 1] if len(score) else np.array([], int)
    )
    tp = np.cumsum(np.where(sig, w, 0.0))[last]
    fp = np.cumsum(np.where(sig, 0.0, w))[last]
    total_s = tp[-1] if len(tp) else 0.0
    total_b = fp[-1] if len(fp) else 0.0
    if total_s == 0 or total_b == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    eff_s = np.r_[0.0, tp / total_s]
    eff_b = np.r_[0.0, fp / total_b]
    auc = float(np.sum(np.diff(eff_b) * (eff_s[1:] + eff_s[:-1]) / 2.0))
    return eff_s, eff_b, auc


def confusion_matrix(y_true: Any, proba: Any, n_classes: int | None = None) -> np.ndarray:
    """Row-normalised confusion matrix [C, C]: entry (i, j) is the fraction of true class i
    predicted as class j (the class of highest probability). A class without events is a row of 0.

    >>> confusion_matrix([0, 0, 1], [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]]).tolist()
    [[0.5, 0.5], [0.0, 1.0]]
    """
    p = np.asarray(proba)
    y = np.asarray(y_true).astype(np.int64).ravel()
    c = p.shape[1] if n_classes is None else n_classes
    counts = np.zeros((c, c))
    np.add.at(counts, (y, np.argmax(p, axis=1)), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


# --------------------------------------------------------------------------- figures


@contextmanager
def _cms_style():
    with matplotlib.style.context(mplhep.style.CMS):
        yield


def _label(ax: Axes) -> None:
    mplhep.cms.label(ax=ax, data=False, text=LABEL, rlabel="")


def roc_figure(y_true: Any, proba: Any, class_names: Sequence[str], weights: Any = None) -> Figure:
    """ROC curves: background rejection (1 - background efficiency) against signal efficiency.

    Binary: the first class is the signal, scored by its probability; one
    curve. Multiclass: one curve per class, that class against all others
    (one-vs-rest), scored by its own probability. The legend gives each AUC.
    """
    y, p, w = _as_inputs(y_true, proba, class_names, weights)
    names = list(class_names)
    with _cms_style():
        fig = Figure(figsize=(10, 10))
        ax = fig.add_subplot()
        shown = [0] if len(names) == 2 else range(len(names))
        for k in shown:
            eff_s, eff_b, auc = roc_curve(y == k, p[:, k], w)
            rest = names[1] if len(names) == 2 else "rest"
            ax.plot(eff_s, 1.0 - eff_b, label=f"{names[k]} vs {rest} (AUC = {auc:.3f})")
        ax.plot([0, 1], [1, 0], linestyle="--", color="grey", label="random")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("Signal efficiency")
        ax.set_ylabel("Background rejection")
        ax.legend(loc="lower left")
        _label(ax)
    return fig


def _score_panels(names: Sequence[str]) -> tuple[Figure, list[tuple[Any, int]]]:
    """A figure with one panel per score shown: P(first class) when binary, every P(k) otherwise."""
    shown = [0] if len(names) == 2 else list(range(len(names)))
    fig = Figure(figsize=(10 * len(shown), 10))
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    return fig, list(zip(axes, shown, strict=True))


def score_figure(
    y_true: Any,
    proba: Any,
    class_names: Sequence[str],
    weights: Any = None,
    bins: int = 40,
) -> Figure:
    """Distributions of the classifier scores, one normalised histogram per true class.

    Binary: one panel, the score P(first class), for events of each true
    class. Multiclass: one panel per class k holding P(k) for events of each
    true class. Each histogram has unit area (weighted when ``weights`` are given).
    """
    y, p, w = _as_inputs(y_true, proba, class_names, weights)
    names = list(class_names)
    edges = np.linspace(0.0, 1.0, bins + 1)
    with _cms_style():
        fig, panels = _score_panels(names)
        for ax, k in panels:
            for true in range(len(names)):
                sel = y == true
                if not sel.any():
                    continue
                counts, _ = np.histogram(np.clip(p[sel, k], 0.0, 1.0), bins=edges, weights=w[sel])
                area = counts.sum() * (edges[1] - edges[0])
                density = counts / area if area != 0 else counts
                mplhep.histplot(density, edges, ax=ax, label=f"true {names[true]}", histtype="step")
            ax.set_xlim(0, 1)
            ax.set_xlabel(f"P({names[k]})")
            ax.set_ylabel("Normalised events")
            ax.legend(loc="upper center")
            _label(ax)
    return fig


def overtraining_figure(
    y_train: Any,
    proba_train: Any,
    y_test: Any,
    proba_test: Any,
    class_names: Sequence[str],
    *,
    train_weights: Any = None,
    test_weights: Any = None,
    bins: int = 25,
) -> Figure:
    """The overtraining check: score distributions of training and test events, overlaid.

    For each true class, the training events are a filled histogram and the
    test events points with their statistical errors, both normalised to unit
    area; a network that learned the training sample by heart shows them
    apart. The legend gives the Kolmogorov-Smirnov p-value of each pair
    (unweighted). Binary: one panel, P(first class); multiclass: one panel
    per class. Histograms are filled with :mod:`hist`, drawn with mplhep.

    >>> import numpy as np
    >>> y = np.array([0, 0, 1, 1])
    >>> p = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    >>> fig = overtraining_figure(y, p, y, p, ["signal", "background"])
    >>> fig.axes[0].get_legend().get_texts()[0].get_text()
    'signal train'
    """
    import hist
    from scipy.stats import ks_2samp

    y_tr, p_tr, w_tr = _as_inputs(y_train, proba_train, class_names, train_weights)
    y_te, p_te, w_te = _as_inputs(y_test, proba_test, class_names, test_weights)
    names = list(class_names)
    axis = hist.axis.Regular(bins, 0.0, 1.0, name="score", underflow=False, overflow=False)
    with _cms_style():
        fig, panels = _score_panels(names)
        for ax, k in panels:
            for true in range(len(names)):
                tr, te = y_tr == true, y_te == true
                if not (tr.any() and te.any()):
                    continue
                color = f"C{true}"
                h_tr = hist.Hist(axis, storage=hist.storage.Weight())
                h_tr.fill(score=np.clip(p_tr[tr, k], 0.0, 1.0), weight=w_tr[tr])
                h_te = hist.Hist(axis, storage=hist.storage.Weight())
                h_te.fill(score=np.clip(p_te[te, k], 0.0, 1.0), weight=w_te[te])
                width = 1.0 / bins
                area_tr = h_tr.values().sum() * width or 1.0
                area_te = h_te.values().sum() * width or 1.0
                mplhep.histplot(
                    h_tr.values() / area_tr,
                    h_tr.axes[0].edges,
                    ax=ax,
                    histtype="fill",
                    alpha=0.3,
                    color=color,
                    label=f"{names[true]} train",
                )
                pvalue = ks_2samp(p_tr[tr, k], p_te[te, k]).pvalue
                mplhep.histplot(
                    h_te.values() / area_te,
                    h_te.axes[0].edges,
                    yerr=np.sqrt(h_te.variances()) / area_te,
                    ax=ax,
                    histtype="errorbar",
                    color=color,
                    label=f"{names[true]} test (KS p = {pvalue:.2f})",
                )
            ax.set_xlim(0, 1)
            ax.set_xlabel(f"P({names[k]})")
            ax.set_ylabel("Normalised events")
            ax.legend(loc="upper center")
            _label(ax)
    return fig


def confusion_figure(y_true: Any, proba: Any, class_names: Sequence[str]) -> Figure:
    """The row-normalised confusion matrix, with the fraction written in each cell.

    Rows are the true class, columns the predicted one (highest probability).
    """
    y, p, _ = _as_inputs(y_true, proba, class_names)
    names = list(class_names)
    matrix = confusion_matrix(y, p, len(names))
    with _cms_style():
        fig = Figure(figsize=(10, 10))
        ax = fig.add_subplot()
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="Blues", origin="upper")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Fraction of true class")
        for i in range(len(names)):
            for j in range(len(names)):
                value = matrix[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color="white" if value > 0.5 else "black",
                )
        ticks = np.arange(len(names))
        ax.set_xticks(ticks, names)
        ax.set_yticks(ticks, names)
        ax.minorticks_off()
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        _label(ax)
    return fig


def loss_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """Loss curves against epoch: every ``*loss`` entry of ``history`` on the left axis,
    every ``*auc`` entry (e.g. ``val_auc``) on a twin right axis.

    ``history`` maps a metric name to one value per epoch (epoch 1 first), as
    the Trainer records it: ``{"train_loss": [...], "val_loss": [...], "val_auc": [...]}``.
    """
    losses = {k: list(v) for k, v in history.items() if k.endswith("loss") and len(v)}
    aucs = {k: list(v) for k, v in history.items() if k.endswith("auc") and len(v)}
    with _cms_style():
        fig = Figure(figsize=(10, 10))
        ax = fig.add_subplot()
        for name, values in losses.items():
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=name)
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, labels = ax.get_legend_handles_labels()
        if aucs:
            twin = ax.twinx()
            for i, (name, values) in enumerate(aucs.items()):
                twin.plot(
                    np.arange(1, len(values) + 1),
                    values,
                    marker="s",
                    linestyle="--",
                    color=f"C{len(losses) + i}",
                    label=name,
                )
            twin.set_ylabel("AUC")
            more_handles, more_labels = twin.get_legend_handles_labels()
            handles += more_handles
            labels += more_labels
        if handles:
            ax.legend(handles, labels, loc="upper center")
        _label(ax)
    return fig


def save_figure(fig: Figure, directory: str | os.PathLike[str], name: str) -> list[Path]:
    """Write ``fig`` as ``<directory>/<name>.png`` and ``.pdf``, each atomically.

    Each file is drawn to ``<name>.<ext>.tmp`` and then moved into place, so a
    reader never sees half a file. The directory is created when missing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        target = directory / f"{name}.{ext}"
        tmp = directory / f"{name}.{ext}.tmp"
        try:
            fig.savefig(tmp, format=ext, bbox_inches="tight")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(target)
    return written
