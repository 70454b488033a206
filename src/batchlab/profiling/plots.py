"""PNG plots of a :class:`~batchlab.profiling.records.Profile`: throughput and peak memory vs batch size.

matplotlib is imported only when a plot is drawn, through :func:`batchlab.optional.require` (it is an extra,
not a core dependency: ``pip install 'batchlab[plot]'``), and only its object-oriented API is used -- a
``Figure`` drawn by the Agg canvas -- so plotting never switches the caller's pyplot backend or opens a
window.

Two plots per profile, one line per variant, batch size on a log2 axis:

- ``<name>-throughput.png``: samples/s vs batch size, the knee marked with a star; sizes over the budget as
  crosses; with an input pipeline, its throughput dashed in the same colour.
- ``<name>-memory.png``: peak memory vs batch size with the budget line; sizes that did not fit as crosses
  (at their peak, or on the top edge when they had none: out of memory or not run).

And one plot of a shape table (``find_batch_size(..., shapes=...)`` or ``plan(..., shapes=...)``): the largest
batch and the tokens (pixels) per batch against the sample's length, both on log2 axes (:func:`plot_shapes`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchlab.optional import require
from batchlab.profiling.records import PointOutcome, Profile, ProfilePoint
from batchlab.units import format_bytes

DPI = 110  # 7.5 x 4.5 in at 110 dpi: 825 x 495 px, legible in a terminal image viewer and a README
SIZE_INCHES = (7.5, 4.5)
BUDGET_IN_VIEW = 1.5  # draw the budget line when it is at most 1.5x the highest peak
CROSS = {"markersize": 9, "mew": 2}  # the mark of a size that does not fit


def _axes() -> tuple[Any, Any]:
    """A new Figure on the Agg canvas, and its axes (never pyplot: the caller's backend stays as it is)."""
    figure = require("matplotlib.figure", extra="plot", purpose="plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure.Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "profile"


def _memory_unit(values: list[float]) -> tuple[str, float]:
    top = max(values, default=0.0)
    return ("GiB", 2.0**30) if top >= 2 * 2**30 else ("MiB", 2.0**20)


def _log2_batch_axis(ax: Any, sizes: list[int]) -> None:
    """Log2 x axis with plain integer labels at the powers of two in range."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    lo, hi = min(sizes), max(sizes)
    ticks = [2**k for k in range(max(lo.bit_length() - 1, 0), hi.bit_length() + 1) if lo / 2 < 2**k < hi * 2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(round(x))}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lo / 1.4, hi * 1.4)
    ax.set_xlabel("batch size (samples per step, log2 scale)")
    ax.grid(True, which="major", alpha=0.3)


def _variants(profile: Profile) -> list[tuple[str, list[ProfilePoint]]]:
    return [(v.variant, profile.points_of(v.variant)) for v in profile.variants]


def _series(
    ax: Any, points: list[ProfilePoint], value: Callable[[ProfilePoint], float], style: str, **kwargs: Any
) -> None:
    """One line or set of marks: batch size vs ``value(point)``."""
    ax.plot([p.batch_size for p in points], [value(p) for p in points], style, **kwargs)


def plot_throughput(profile: Profile, path: str | Path) -> Path:
    """samples/s vs batch size per variant, knee starred; returns the PNG's path."""
    fig, ax = _axes()
    sizes = [p.batch_size for p in profile.points if p.samples_per_second] or [1, 2]
    for index, (name, points) in enumerate(_variants(profile)):
        color = f"C{index}"
        fitting = [p for p in points if p.fits and p.samples_per_second]
        over = [p for p in points if not p.fits and p.samples_per_second]
        _series(ax, fitting, lambda p: p.samples_per_second, "o-", color=color, label=name)
        if over:
            _series(ax, over, lambda p: p.samples_per_second, "x", color=color, **CROSS)
        loaded = [p for p in fitting if p.loader_samples_per_second]
        if loaded:
            _series(
                ax, loaded, lambda p: p.loader_samples_per_second, "^--", color=color, alpha=0.8,
                label=f"{name} with input pipeline",
            )  # fmt: skip
        summary = profile.variant(name)
        if summary.knee_batch is not None:
            ax.plot(
                [summary.knee_batch],
                [summary.knee_samples_per_second],
                "*",
                color=color,
                markersize=18,
                markeredgecolor="black",
                zorder=5,
            )
            ax.annotate(
                f"knee {summary.knee_batch}",
                (summary.knee_batch, summary.knee_samples_per_second),
                textcoords="offset points",
                xytext=(6, -14),
                fontsize=9,
            )
    ax.plot([], [], "*", color="grey", markersize=12, markeredgecolor="black",
            label=f"knee: first batch at {profile.knee_threshold:.0%} of the best")  # fmt: skip
    if any(not p.fits and p.samples_per_second for p in profile.points):
        ax.plot([], [], "x", color="grey", label="over the budget", **CROSS)
    _log2_batch_axis(ax, sizes)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("throughput (samples / s)")
    ax.set_title(f"{profile.workload} on {profile.device}: training throughput vs batch size", fontsize=11)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_memory(profile: Profile, path: str | Path) -> Path:
    """Peak memory vs batch size per variant with the budget line; returns the PNG's path."""
    fig, ax = _axes()
    peaks = [p.peak_bytes for p in profile.points if p.peak_bytes is not None]
    # The budget line joins the plot only when it is near the data: a budget far above every peak would
    # squash the curves into a flat line at the bottom; it is then named in the legend instead.
    budget_in_view = not peaks or profile.budget_bytes <= BUDGET_IN_VIEW * max(peaks)
    unit, scale = _memory_unit([*peaks, profile.budget_bytes] if budget_in_view else peaks)
    sizes = [p.batch_size for p in profile.points] or [1, 2]
    top_edge = ax.get_xaxis_transform()  # x in data, y in axes fraction: marks for sizes without a peak
    for index, (name, points) in enumerate(_variants(profile)):
        color = f"C{index}"
        fitting = [p for p in points if p.fits and p.peak_bytes is not None]
        over = [p for p in points if not p.fits and p.peak_bytes is not None]
        unknown = [p for p in points if not p.fits and p.peak_bytes is None]
        _series(ax, fitting, lambda p: p.peak_bytes / scale, "o-", color=color, label=name)
        allocated = [p for p in fitting if p.allocated_bytes is not None]
        if allocated:
            _series(
                ax, allocated, lambda p: p.allocated_bytes / scale, ":", color=color,
                label=f"{name}: allocated (live tensors)",
            )  # fmt: skip
        if over:
            _series(ax, over, lambda p: p.peak_bytes / scale, "x", color=color, **CROSS)
        for p in unknown:
            ax.plot([p.batch_size], [0.97], "x", color=color, transform=top_edge, **CROSS)
            ax.annotate(
                "oom" if p.outcome is PointOutcome.OOM else "not run",
                (p.batch_size, 0.97),
                xycoords=top_edge,
                textcoords="offset points",
                xytext=(5, -4),
                fontsize=8,
                color=color,
            )
    if any(not p.fits for p in profile.points):
        ax.plot([], [], "x", color="grey", label="does not fit (x on top: oom / not run)", **CROSS)
    budget_label = (
        f"budget {format_bytes(profile.budget_bytes)} ({profile.fraction:.0%} of "
        f"{format_bytes(profile.capacity_bytes)})"
    )
    if budget_in_view:
        ax.axhline(profile.budget_bytes / scale, color="red", linestyle="--", label=budget_label)
    else:
        ax.plot([], [], color="red", linestyle="--", label=f"{budget_label}, far above")
    _log2_batch_axis(ax, sizes)
    what = (
        "process peak RSS"
        if profile.device == "cpu"
        else "peak reserved"
        if profile.device.startswith("cuda")
        else "peak"
    )
    ax.set_ylabel(f"peak memory ({unit}, {what})")
    ax.set_title(f"{profile.workload} on {profile.device}: peak memory of a training step", fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_profile(profile: Profile, directory: str | Path, *, name: str | None = None) -> dict[str, Path]:
    """Write both plots into ``directory`` (created if needed); returns ``{"throughput": ..., "memory": ...}``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _slug(name or profile.workload)
    return {
        "throughput": plot_throughput(profile, directory / f"{stem}-throughput.png"),
        "memory": plot_memory(profile, directory / f"{stem}-memory.png"),
    }


def plot_shapes(table: Any, path: str | Path, *, title: str = "") -> Path:
    """Largest batch (left axis) and tokens per batch (right axis) vs length; returns the PNG's path.

    ``table`` is a :class:`~batchlab.fit.shapes.ShapeTable` or a plan's shape table: anything whose
    ``entries`` have ``length``, ``batch_size``, ``tokens_per_batch`` and ``fits``. A flat token line means
    memory grows linearly with length; one that falls shows the ``L^2`` term (attention) taking over.
    """
    fig, ax = _axes()
    rows = [e for e in table.entries if e.fits]
    lengths = [e.length for e in rows] or [1, 2]
    ax.plot(lengths, [e.batch_size for e in rows], "o-", color="C0", label="largest batch")
    ax.set_yscale("log", base=2)
    ax.set_ylabel("largest batch that fits (samples, log2)", color="C0")
    _log2_batch_axis(ax, lengths)
    ax.set_xlabel("length per sample (tokens; pixels h x w for images), log2 scale")
    tokens = ax.twinx()
    tokens.plot(lengths, [e.tokens_per_batch for e in rows], "s--", color="C1", label="tokens per batch")
    tokens.set_ylim(bottom=0, top=max([e.tokens_per_batch for e in rows], default=1) * 1.15)
    tokens.set_ylabel("tokens (pixels) per batch", color="C1")
    for e in table.entries:
        if not e.fits:
            ax.plot([e.length], [1], "x", color="red", **CROSS)
    handles = ax.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower left")
    ax.set_title(title or "largest batch and tokens per batch vs length", fontsize=11)
    return _save(fig, path)
