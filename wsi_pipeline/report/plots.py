"""The report's plots: matplotlib figures written as SVG text (text kept as text, no date stamp,
so an unchanged run draws byte-identical plots)."""

from __future__ import annotations

import io

import numpy as np

from .curves import Curve

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "wsi-pipeline", "font.size": 9})
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]   # drop the XML prolog and DOCTYPE: inlined in HTML


def curve_plot(kind: str, series: list[tuple[str, Curve, str]], *, prevalence: float | None = None) -> str:
    """ROC (`kind` "roc") or PR ("pr") curves, one per (name, Curve, legend label), with bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    for i, (name, curve, label) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        if curve.low is not None:
            ax.fill_between(curve.grid, curve.low, curve.high, color=colour, alpha=0.18, linewidth=0,
                            step="post" if kind == "roc" else None)
        ax.step(curve.x, curve.y, where="post", color=colour, linewidth=1.6, label=label)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    else:
        if prevalence is not None:
            ax.axhline(prevalence, color="#999", linestyle=":", linewidth=1)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7, frameon=False)
    ax.set_title("ROC" if kind == "roc" else "precision-recall", fontsize=9)
    return _svg(fig)


def calibration_plot(bins: list[dict], label: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.4, 3.4))
    ax.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
    if bins:
        x = [b["mean_predicted"] for b in bins]
        y = [b["observed"] for b in bins]
        n = np.array([b["n"] for b in bins], dtype=np.float64)
        ax.plot(x, y, color=COLOURS[0], linewidth=1.2)
        ax.scatter(x, y, s=12 + 60 * n / n.max(), color=COLOURS[0], zorder=3)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(f"mean predicted P({label})")
    ax.set_ylabel("observed fraction")
    ax.set_title("calibration (marker size: slides)", fontsize=9)
    return _svg(fig)


def confusion_plot(matrix: np.ndarray, classes: list[str]) -> str:
    plt = _pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.8 * n))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    for i in range(n):
        for j in range(n):
            dark = matrix[i, j] > matrix.max() / 2
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if dark else "black", fontsize=10)
    ax.set_xticks(range(n), classes, rotation=30, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (argmax)", fontsize=9)
    return _svg(fig)


def loss_plot(folds: list[dict]) -> str | None:
    """Train (solid) and validation (dashed) loss per epoch, one colour per fold; None without history."""
    with_history = [f for f in folds if f.get("history")]
    if not with_history:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for i, meta in enumerate(with_history):
        colour = COLOURS[i % len(COLOURS)]
        hist = meta["history"]
        epochs = [h.get("epoch", k) for k, h in enumerate(hist)]
        train = [h.get("train_loss") for h in hist]
        val = [h.get("val_loss") for h in hist]
        fold = meta.get("fold", i)
        ax.plot(epochs, [np.nan if v is None else v for v in train], color=colour, linewidth=1.2,
                label=f"fold {fold} train")
        if any(v is not None for v in val):
            ax.plot(epochs, [np.nan if v is None else v for v in val], color=colour, linewidth=1.2,
                    linestyle="--", label=f"fold {fold} val")
        best = meta.get("best_epoch")
        if best is not None and best in epochs:
            v = val[epochs.index(best)]
            if v is not None:
                ax.scatter([best], [v], color=colour, marker="o", s=14, zorder=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training (solid) and validation (dashed) loss; dot: best epoch", fontsize=8)
    ax.legend(fontsize=6, frameon=False, ncol=2)
    return _svg(fig)
