"""The sweep report's PNGs: loss against steps, samples and time; steps to target with the fit; throughput, memory.

Drawn with matplotlib's object-oriented API on the Agg canvas only, so the caller's pyplot state and backend
are never touched; matplotlib (``pip install 'batchlab[plot]'``) is imported through
:func:`batchlab.optional.require` when a plot is drawn, never at import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from batchlab import optional
from batchlab.sweeps.records import SweepRun
from batchlab.sweeps.result import SweepResult

__all__ = ["PLOTS", "draw", "require_matplotlib"]

DPI = 110  # 11 x 4.2 in at 110 dpi: ~1210 x 460 px, legible inline in a 1400 px wide page and in a viewer
WIDE = (11.0, 4.2)
SMOOTH = 0.9  # EMA weight for the training-loss lines: per-step losses at small batches are too noisy to read
PLOTS = ("loss-vs-steps", "loss-vs-samples", "loss-vs-time", "steps-to-target", "throughput-memory")
PURPOSE = "sweep reports"


def require_matplotlib() -> ModuleType:
    """``matplotlib.figure``, or ImportError naming the ``plot`` extra (call it before any long work)."""
    return optional.require("matplotlib.figure", extra="plot", purpose=PURPOSE)


def _best_runs(result: SweepResult) -> dict[int, list[SweepRun]]:
    """batch size -> the runs at its best LR multiplier (what the summaries and the loss plots show)."""
    best = {s.batch_size: s.lr_multiplier for s in result.by_batch_size()}
    return {b: [r for r in result.runs_at(b) if r.lr_multiplier == best[b]] for b in result.batch_sizes}


def _colors(sizes: Sequence[int]) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = max(len(sizes) - 1, 1)
    return {b: cmap(0.05 + 0.85 * i / n) for i, b in enumerate(sizes)}  # skip viridis' pale yellow end


def _ema(values: Sequence[float | None], weight: float) -> list[float | None]:
    out, state, seen = [], 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        seen += 1
        state = weight * state + (1 - weight) * v
        out.append(state / (1 - weight**seen))  # bias-corrected, so the first points are not pulled to 0
    return out


def _figure(ncols: int) -> tuple[Any, list[Any]]:
    figure = require_matplotlib()
    agg = optional.require("matplotlib.backends.backend_agg", extra="plot", purpose=PURPOSE)
    fig = figure.Figure(figsize=WIDE, dpi=DPI, layout="constrained")
    agg.FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _plain_log(axis: Any) -> None:
    """Label a log axis with plain numbers (0.5, 2, 1000) instead of 2x10^0, minor ticks too when it is short."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:  # LogFormatter's text hook
            return f"{x:g}"

    axis.set_major_formatter(Plain(labelOnlyBase=False))
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.8)))


def _batch_axis(ax: Any, sizes: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(list(sizes)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x))}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)
    ax.set_xlabel("batch size (samples per optimizer step, log scale)")
    ax.grid(True, which="major", alpha=0.3)


def _loss_plot(result: SweepResult, axis: str, path: Path) -> Path:
    """Training (smoothed) and validation loss per batch size against steps, samples or seconds."""
    fig, (left, right) = _figure(2)
    sizes = result.batch_sizes
    colors = _colors(sizes)
    label = {"step": "optimizer steps", "samples": "training samples", "seconds": "training time (s)"}[axis]
    for b, runs in _best_runs(result).items():
        for i, run in enumerate(runs):
            tag = f"batch {b}" if i == 0 else None
            xs = getattr(run.train, axis)
            ys = _ema(run.train["loss"], SMOOTH)
            points = [(x, y) for x, y in zip(xs, ys) if y is not None and x > 0]
            if points:
                left.plot(*zip(*points), color=colors[b], lw=1.3, alpha=0.9, label=tag)
            vx = getattr(run.val, axis)
            vy = run.val["loss"]
            points = [(x, y) for x, y in zip(vx, vy) if y is not None and x > 0]
            if points:
                right.plot(*zip(*points), color=colors[b], lw=1.6, marker="o", ms=2.5, label=tag)
    target = result.config.target
    if target is not None and target.metric == "loss":
        right.axhline(target.value, color="crimson", ls="--", lw=1.2, label=f"target {target.value:g}")
    for ax, title in ((left, "training loss (smoothed)"), (right, "validation loss")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log(ax.xaxis)
        _plain_log(ax.yaxis)
        ax.set_xlabel(f"{label}, log scale")
        ax.set_ylabel("loss (log scale)")
        ax.set_title(f"{title} vs {label}")
        ax.grid(True, which="both", alpha=0.25)
    right.legend(fontsize=8, ncol=2 if len(sizes) > 5 else 1, loc="best")
    return _save(fig, path)


def _target_plot(result: SweepResult, path: Path) -> Path:
    """Steps and samples to the target per batch size, the fitted curves, B_crit and the noise scale."""
    fig, (left, right) = _figure(2)
    rows = [s for s in result.by_batch_size() if s.trained_to_target]
    sizes = result.batch_sizes
    fit = result.critical_batch()
    noise = result.noise_scale()
    target = result.config.target
    multipliers = sorted({r.lr_multiplier for r in result.runs})
    for ax, attr, what in (
        (left, "steps_to_target", "optimizer steps"),
        (right, "samples_to_target", "training samples"),
    ):
        if len(multipliers) > 1:  # every LR of the grid, faint; the best per batch size in the main markers
            for b in sizes:
                for m in multipliers:
                    values = [getattr(r, attr) for r in result.runs_at(b) if r.lr_multiplier == m]
                    if values and all(v is not None for v in values):
                        ax.scatter([b], [sum(values) / len(values)], s=14, color="0.65", zorder=2)
            ax.scatter([], [], s=14, color="0.65", label="other LRs of the grid")
        for b, runs in _best_runs(result).items():
            seeds = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
            if len(runs) > 1 and seeds:
                ax.scatter([b] * len(seeds), seeds, s=10, color="C0", alpha=0.4, zorder=3)
        ax.plot(
            [s.batch_size for s in rows],
            [getattr(s, attr) for s in rows],
            "o",
            color="C0",
            ms=7,
            zorder=4,
            label="measured (best LR, mean over seeds)",
        )
        if fit is not None:
            grid = [min(sizes) / 1.5 * (max(sizes) * 2.25 / min(sizes)) ** (i / 200) for i in range(201)]
            curve = [fit.steps(b) if attr == "steps_to_target" else fit.samples(b) for b in grid]
            formula = "S = S_min(1 + B_crit/B)" if attr == "steps_to_target" else "E = E_min(1 + B/B_crit)"
            ax.plot(grid, curve, color="C1", lw=2, label=f"fit {formula}")
            floor = fit.s_min if attr == "steps_to_target" else fit.e_min
            ax.axhline(
                floor,
                color="C1",
                ls=":",
                lw=1.2,
                label=f"{'S_min' if attr == 'steps_to_target' else 'E_min'} ≈ {floor:.3g}",
            )
            if fit.bounded:
                ax.axvline(fit.b_crit, color="C1", ls="--", lw=1.4, label=f"B_crit ≈ {fit.b_crit:.0f} (fit)")
        if noise is not None:
            ax.axvline(noise, color="C3", ls="-.", lw=1.6, label=f"noise scale B_simple ≈ {noise:.0f}")
        _batch_axis(ax, sizes)
        ax.set_yscale("log")
        _plain_log(ax.yaxis)
        ax.set_ylabel(f"{what} to target (log scale)")
        ax.set_title(f"{what} to reach {target.describe() if target else 'the target'}")
    left.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _hardware_plot(result: SweepResult, path: Path) -> Path:
    """Throughput and peak memory per batch size."""
    fig, (left, right) = _figure(2)
    rows = result.by_batch_size()
    sizes = [s.batch_size for s in rows]
    tp = [(s.batch_size, s.throughput) for s in rows if s.throughput]
    if tp:
        left.plot(*zip(*tp), "o-", color="C0", lw=2)
        b0, t0 = tp[0]
        left.plot(
            [b for b, _ in tp],
            [t0 * b / b0 for b, _ in tp],
            ls=":",
            color="0.5",
            label="linear in batch (ideal)",
        )
        left.set_yscale("log")
        _plain_log(left.yaxis)
        left.set_ylim(min(t for _, t in tp) / 1.5, max(t for _, t in tp) * 2.0)
        left.legend(fontsize=8, loc="upper left")
    left.set_ylabel("samples per second (log scale)")
    left.set_title("throughput (training steps, warm-up excluded)")
    memory = [(s.batch_size, s.peak_bytes / 2**20) for s in rows if s.peak_bytes]
    if memory:
        right.plot(*zip(*memory), "o-", color="C2", lw=2, label="peak during the run")
        base = [
            (b, min(r.baseline_bytes for r in result.runs_at(b) if r.baseline_bytes) / 2**20)
            for b in sizes
            if any(r.baseline_bytes for r in result.runs_at(b))
        ]
        if base:
            right.plot(*zip(*base), "s--", color="0.5", ms=4, label="in use when the run started")
        right.set_ylim(0, max(m for _, m in memory) * 1.2)
        right.legend(fontsize=8, loc="lower right")
    device = result.runs[0].device if result.runs else "?"
    right.set_ylabel("MiB")
    right.set_title(
        f"peak memory ({'whole process RSS' if device == 'cpu' else 'allocator reserved'}, {device})"
    )
    for ax in (left, right):
        _batch_axis(ax, sizes)
    return _save(fig, path)


def draw(result: SweepResult, out: Path) -> dict[str, Path]:
    """Every plot of ``result`` as ``out/<name>.png``; name -> path (no steps-to-target plot when no batch size
    reached the target)."""
    images = {
        "loss-vs-steps": _loss_plot(result, "step", out / "loss-vs-steps.png"),
        "loss-vs-samples": _loss_plot(result, "samples", out / "loss-vs-samples.png"),
        "loss-vs-time": _loss_plot(result, "seconds", out / "loss-vs-time.png"),
    }
    if any(s.trained_to_target for s in result.by_batch_size()):
        images["steps-to-target"] = _target_plot(result, out / "steps-to-target.png")
    images["throughput-memory"] = _hardware_plot(result, out / "throughput-memory.png")
    return images
