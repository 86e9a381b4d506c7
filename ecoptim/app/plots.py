"""The plots of ``ecoptim compare`` / ``finetune``: memory against loss (the paper's Figure 1) and loss curves.

matplotlib is imported inside the functions, through its Agg canvas (headless, no global backend switch), so
importing the app does not need it until a figure is drawn; it comes with the ``app`` extra.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .train import RunResult

__all__ = ["plot_memory_vs_loss", "plot_loss_curves", "style_of", "COLORS"]

#: Line colour per optimizer mode (None: the dense fp32 baseline).
COLORS = {None: "black", "master": "tab:blue", "naive": "tab:red", "eco": "tab:green"}


def style_of(r: RunResult) -> dict[str, Any]:
    """Colour by how the weights are updated, marker and line by the rounding."""
    return {"color": COLORS.get(r.mode, "tab:gray"),
            "marker": "^" if r.rounding == "stochastic" else ("o" if r.rounding == "nearest" else "s"),
            "linestyle": ":" if r.rounding == "nearest" else "-"}


def plot_memory_vs_loss(results: Sequence[RunResult], path: Path, title: str) -> None:
    """The paper's Figure 1: static bytes/param against final validation loss, one labelled point per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend switch (Agg, headless)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = [r.final_val_loss for r in results if r.final_val_loss is not None and r.status == "ok"]
    top = (max(finite) + 0.05 * (max(finite) - min(finite) + 0.1)) if finite else 1.0
    for r in results:
        st = style_of(r)
        ok = r.status == "ok" and r.final_val_loss is not None
        y = r.final_val_loss if ok else top
        ax.scatter(r.bytes_per_param, y, color=st["color"], marker=st["marker"] if ok else "x", s=60, zorder=3)
        ax.annotate(r.label if ok else f"{r.label} (diverged)", (r.bytes_per_param, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    dense = next((r for r in results if r.method == "fp32_mw" and r.status == "ok"), None)
    if dense is not None and dense.final_val_loss is not None:
        ax.axhline(dense.final_val_loss, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("static memory (bytes / parameter: weights + scales + optimizer state)")
    ax.set_ylabel("final validation loss (nats / byte)")
    ax.set_title(title, fontsize=10)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.35 * (hi - lo))  # room for the labels on the right
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_loss_curves(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Validation loss against step: the full curves, and a zoom on the second half where methods separate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax_full, ax_zoom = fig.subplots(1, 2)
    zoom_vals: list[float] = []
    for r in results:
        pts = [(s, v) for s, v in r.val_curve if v is not None]
        if not pts:
            continue
        st = style_of(r)
        xs, ys = zip(*pts)
        for ax in (ax_full, ax_zoom):
            ax.plot(xs, ys, color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=3,
                    label=r.label + ("" if r.status == "ok" else " (diverged)"))
        half = max(s for s, _ in r.val_curve) / 2
        zoom_vals += [v for s, v in pts if s >= half]
    if zoom_vals:
        lo, hi = min(zoom_vals), max(zoom_vals)
        pad = 0.05 * (hi - lo) + 1e-3
        ax_zoom.set_ylim(lo - pad, hi + pad)
        steps = max(s for r in results for s, _ in r.val_curve)
        ax_zoom.set_xlim(steps / 2 - 0.02 * steps, steps * 1.02)
    for ax, sub in ((ax_full, "validation loss"), (ax_zoom, "second half (zoom)")):
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.set_title(sub, fontsize=10)
        ax.grid(alpha=0.3)
    ax_full.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
