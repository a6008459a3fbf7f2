"""Figures for pruning reports, rendered off-screen (Agg canvas; no pyplot global state)."""
from __future__ import annotations

import io
import math

from gradmap.core.result import PruneResult

__all__ = ["plot_scores"]


def plot_scores(result: PruneResult, title: str | None = None) -> bytes:
    """PNG of the layer scores: one line per scoring decision, x = ORIGINAL layer index.

    The layer removed at each decision is marked with a cross on its line. Scores
    spanning several orders of magnitude (all positive) are drawn on a log axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    values = [v for s in result.scores for v in s.values() if math.isfinite(v)]
    positive = bool(values) and min(values) > 0
    log_axis = positive and max(values) / min(values) > 1e3
    n = len(result.scores)
    for k, scores in enumerate(result.scores):
        xs = sorted(scores)
        ys = [scores[i] for i in xs]
        label = f"decision {k + 1}" if result.schedule == "iterative" else "scores"
        (line,) = ax.plot(xs, ys, marker=".", linewidth=1.2, label=label,
                          alpha=0.35 + 0.65 * (k + 1) / n)
        chosen = result.removed_layers[k:k + 1] if result.schedule == "iterative" else result.removed_layers
        for i in chosen:
            if i in scores:
                ax.plot([i], [scores[i]], marker="x", markersize=8, color=line.get_color())
    if log_axis:
        ax.set_yscale("log")
    ax.set_xlabel("original layer index")
    ax.set_ylabel(f"{result.metric} score (lowest removed first)")
    ax.set_title(title or f"{result.metric}, {result.schedule}: removed {result.removed_layers}",
                 fontsize=9)
    if 1 < n <= 16:
        ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
