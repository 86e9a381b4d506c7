"""The plots of ``ecoptim compare`` / ``sweep`` / ``finetune``: memory against loss (the paper's Figure 1), loss
curves, and the gaps against the learning rate. With several seeds every point is the mean over seeds with its
95% t-interval (error bars; shaded bands on the curves).

matplotlib is imported inside the functions, through its Agg canvas (headless, no global backend switch), so
importing the app does not need it until a figure is drawn; it comes with the ``app`` extra.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .stats import mean_interval
from .train import RunResult

__all__ = ["plot_memory_vs_loss", "plot_loss_curves", "plot_sweep", "style_of", "COLORS"]

#: Line colour per optimizer mode (None: the dense fp32 baseline).
COLORS = {None: "black", "master": "tab:blue", "naive": "tab:red", "eco": "tab:green"}


def style_of(r: RunResult) -> dict[str, Any]:
    """Colour by how the weights are updated, marker and line by the rounding."""
    return {"color": COLORS.get(r.mode, "tab:gray"),
            "marker": "^" if r.rounding == "stochastic" else ("o" if r.rounding == "nearest" else "s"),
            "linestyle": ":" if r.rounding == "nearest" else "-"}


def _by_method(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped by method (in first-seen order), at the first peak LR only (a sweep's plot of its own)."""
    lr0 = results[0].peak_lr if results else None
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        if r.peak_lr == lr0:
            groups.setdefault(r.method, []).append(r)
    return groups


def _mean_err(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (0 for one value)."""
    iv = mean_interval(values)
    return iv.mean, iv.half_width or 0.0


def plot_memory_vs_loss(results: Sequence[RunResult], path: Path, title: str) -> None:
    """The paper's Figure 1: static bytes/param against final validation loss, one labelled point per method
    (mean over seeds, with its 95% interval as an error bar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend switch (Agg, headless)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = _by_method(results)
    finite = [r.final_val_loss for rs in groups.values() for r in rs if r.final_val_loss is not None
              and r.status == "ok"]
    top = (max(finite) + 0.05 * (max(finite) - min(finite) + 0.1)) if finite else 1.0
    dense_y = None
    for name, rs in groups.items():
        r = rs[0]
        st = style_of(r)
        ok = [x.final_val_loss for x in rs if x.status == "ok" and x.final_val_loss is not None]
        if ok:
            y, err = _mean_err(ok)
            ax.errorbar(r.bytes_per_param, y, yerr=err, color=st["color"], marker=st["marker"], markersize=7,
                        capsize=4, zorder=3)
            if name == "fp32_mw":
                dense_y = y
        else:
            y = top
            ax.scatter(r.bytes_per_param, y, color=st["color"], marker="x", s=60, zorder=3)
        ax.annotate(r.label if ok else f"{r.label} (diverged)", (r.bytes_per_param, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    if dense_y is not None:
        ax.axhline(dense_y, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("static memory (bytes / parameter: weights + scales + optimizer state)")
    n = max((len(rs) for rs in groups.values()), default=1)
    ax.set_ylabel("final validation loss (nats / byte)" + (f", mean of {n} seeds +- 95% CI" if n > 1 else ""))
    ax.set_title(title, fontsize=10)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.35 * (hi - lo))  # room for the labels on the right
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_loss_curves(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Validation loss against step (mean over seeds, with a 95% band): the full curves, and a zoom on the second
    half where methods separate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax_full, ax_zoom = fig.subplots(1, 2)
    zoom_vals: list[float] = []
    steps = 1
    for name, rs in _by_method(results).items():
        r = rs[0]
        by_step: dict[int, list[float]] = {}
        for x in rs:
            for s, v in x.val_curve:
                if v is not None:
                    by_step.setdefault(s, []).append(v)
        # a step counts only where every seed has a point (a diverged seed's curve stops early)
        pts = sorted((s, _mean_err(vs)) for s, vs in by_step.items() if len(vs) == len(rs))
        if not pts:
            continue
        st = style_of(r)
        xs = [s for s, _ in pts]
        ys = [m for _, (m, _) in pts]
        es = [e for _, (_, e) in pts]
        diverged = any(x.status != "ok" for x in rs)
        for ax in (ax_full, ax_zoom):
            ax.plot(xs, ys, color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=3,
                    label=r.label + (" (diverged)" if diverged else ""))
            if any(es):
                ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)],
                                color=st["color"], alpha=0.15, linewidth=0)
        steps = max(steps, max(xs))
        half = max(xs) / 2
        zoom_vals += [y for s, y in zip(xs, ys) if s >= half]
    if zoom_vals:
        lo, hi = min(zoom_vals), max(zoom_vals)
        pad = 0.05 * (hi - lo) + 1e-3
        ax_zoom.set_ylim(lo - pad, hi + pad)
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


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Each method's mean paired difference to MW + SR (nats; + = worse) against the peak LR (log axis), with
    its 95% interval: the theory predicts naive + SR's gap grows as the LR shrinks (floor ~ sigma^2 / lr) and
    ECO + SR's does not."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {"naive": COLORS["naive"], "eco": COLORS["eco"], "master": COLORS["master"]}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for name in methods:
        pts = sorted((r["peak_lr"], r["diff_vs_mw_sr"], r) for r in rows
                     if r["method"] == name and r["diff_vs_mw_sr"] is not None)
        if not pts or all(d["mean"] == 0 and d["sd"] in (0, None) for _, d, _ in pts):
            continue  # the reference itself
        xs = [lr for lr, _, _ in pts]
        ys = [d["mean"] for _, d, _ in pts]
        lo = [d["mean"] - d["lo"] if d["lo"] is not None else 0.0 for _, d, _ in pts]
        hi = [d["hi"] - d["mean"] if d["hi"] is not None else 0.0 for _, d, _ in pts]
        mode = next((m for m in colors if name.split("_")[-2:-1] == [m] or f"_{m}_" in f"_{name}_"), None)
        ax.errorbar(xs, ys, yerr=[lo, hi], color=colors.get(mode or "", "tab:gray"), marker="o", capsize=4,
                    label=pts[0][2]["label"])
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (cosine to 0.1x)")
    ax.set_ylabel("final val loss minus MW + SR, same seed (nats / byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
