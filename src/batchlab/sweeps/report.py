"""The sweep report: PNG plots and one self-contained HTML page that compares the batch sizes.

``write_report(source)`` reads a :class:`~batchlab.sweep.SweepResult`, a sweep directory or an MLflow
experiment (name or id) and writes into one folder:

- ``loss-vs-steps.png``, ``loss-vs-samples.png``, ``loss-vs-time.png``: training loss (smoothed) and
  validation loss per batch size against optimizer steps, training samples and training seconds -- the three
  views in which a larger batch looks best, about equal and (past the critical batch) worst;
- ``steps-to-target.png``: steps and samples to the target against the batch size, with the fitted
  S = S_min(1 + B_crit/B) and E = E_min(1 + B/B_crit) curves, B_crit and the measured noise scale marked;
- ``throughput-memory.png``: samples per second and peak memory per batch size;
- ``report.html``: the plots inlined as base64 (one file that opens offline, no external URL anywhere), the
  epoch/iteration table per batch size (:func:`batchlab.scaling.schedule`), every run, and a short verdict
  in words (:func:`verdict`).

matplotlib (``pip install 'batchlab[plot]'``) is imported only when a report is drawn, and only through its
object-oriented API with the Agg canvas: the caller's pyplot state and backend are never touched.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlab.scaling import schedule
from batchlab.sweeps.records import BatchSummary, SweepResult, SweepRun
from batchlab.units import format_bytes

__all__ = ["ReportFiles", "write_report", "load_sweep", "verdict"]

DPI = 110  # 11 x 4.2 in at 110 dpi: ~1210 x 460 px, legible inline in a 1400 px wide page and in a viewer
WIDE = (11.0, 4.2)
SMOOTH = 0.9  # EMA weight for the training-loss lines: per-step losses at small batches are too noisy to read
PLOTS = ("loss-vs-steps", "loss-vs-samples", "loss-vs-time", "steps-to-target", "throughput-memory")


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote: the HTML page and the PNGs (also inlined in the page)."""

    html: Path
    images: list[Path] = field(default_factory=list)


def _mpl() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the sweep report needs matplotlib: pip install 'batchlab[plot]'") from None
    return Figure, FigureCanvasAgg


def load_sweep(source: SweepResult | str | Path, tracking_uri: str | None = None) -> SweepResult:
    """A SweepResult from itself, a sweep directory (with ``sweep.json``) or an MLflow experiment name/id."""
    if isinstance(source, SweepResult):
        return source
    path = Path(source)
    if (path / "sweep.json").is_file():
        return SweepResult.load(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory but not a sweep directory (no sweep.json)")
    from batchlab.sweeps.records import DEFAULT_DIRECTORY
    from batchlab.sweeps.tracking import default_tracking_uri, read_experiment

    uri = tracking_uri or default_tracking_uri(DEFAULT_DIRECTORY)
    if tracking_uri is None and not (Path(DEFAULT_DIRECTORY) / "mlflow.db").exists():
        raise ValueError(
            f"{source!r} is neither a sweep directory nor an experiment in the default store "
            f"({DEFAULT_DIRECTORY}/mlflow.db does not exist); pass a directory or --tracking-uri"
        )
    return read_experiment(str(source), uri)


# ------------------------------------------------------------------------------------------------ verdict


def _best_runs(result: SweepResult) -> dict[int, list[SweepRun]]:
    """batch size -> the runs at its best LR multiplier (what the summaries and the loss plots show)."""
    best = {s.batch_size: s.lr_multiplier for s in result.by_batch_size()}
    return {b: [r for r in result.runs_at(b) if r.lr_multiplier == best[b]] for b in result.batch_sizes}


def verdict(result: SweepResult) -> list[str]:
    """A few sentences that say what the sweep shows, derived only from its numbers."""
    rows = result.by_batch_size()
    if not rows:
        return ["No run has finished yet."]
    lines: list[str] = []
    target = result.config.target
    fit = result.critical_batch()
    noise = result.noise_scale()
    reached = [s for s in rows if s.steps_to_target is not None]
    if target is None:
        best = min(rows, key=lambda s: s.final_val_loss if s.final_val_loss is not None else math.inf)
        lines.append(
            f"No target was set, so only final losses compare: the lowest final validation loss after "
            f"{result.config.budget.describe()} is {best.final_val_loss:.4g} at batch {best.batch_size}. "
            "Set a target to measure steps-to-target and the critical batch size."
        )
    elif not reached:
        lines.append(
            f"No batch size reached {target.describe()} within {result.config.budget.describe()}: raise the "
            "budget or loosen the target."
        )
    else:
        lo, hi = reached[0], reached[-1]
        lines.append(
            f"Reaching {target.describe()} took {lo.steps_to_target:.0f} optimizer steps at batch {lo.batch_size} "
            f"and {hi.steps_to_target:.0f} at batch {hi.batch_size} "
            f"({lo.steps_to_target / hi.steps_to_target:.1f}x fewer steps for {hi.batch_size / lo.batch_size:.0f}x the batch)."
        )
        missed = [s.batch_size for s in rows if s.steps_to_target is None]
        if missed:
            lines.append(f"Batch sizes {missed} did not reach the target within the budget.")
    if fit is not None:
        if fit.bounded:
            lines.append(
                f"The fit S = S_min(1 + B_crit/B) gives a critical batch B_crit ≈ {fit.b_crit:.0f} and S_min ≈ "
                f"{fit.s_min:.0f} steps (scatter about the fit {math.expm1(fit.rms_log_error):.0%}). Below B_crit a "
                f"larger batch cuts the steps almost in proportion; above it mostly costs samples: at batch "
                f"{rows[-1].batch_size} the fit needs {fit.samples(rows[-1].batch_size) / fit.e_min:.1f}x the "
                f"minimum samples E_min ≈ {fit.e_min:.0f}."
            )
        else:
            lines.append(f"The fit S = S_min(1 + B_crit/B) is not bounded by these batch sizes: {fit.note}.")
    if noise is not None:
        text = f"The gradient noise scale measured during the runs is B_simple ≈ {noise:.0f}"
        if fit is not None and fit.bounded:
            ratio = noise / fit.b_crit
            agree = "within 2x of" if 0.5 <= ratio <= 2.0 else "not within 2x of"
            text += (
                f", {ratio:.2f}x the fitted B_crit -- {agree} it (McCandlish et al. 2018 predict B_crit ≈ B_noise, "
                "which B_simple approximates; B_simple ignores curvature and Adam's preconditioning, so it tends "
                "to read low)."
            )
        else:
            text += " (McCandlish et al. 2018: the critical batch size is about this, often somewhat more)."
        lines.append(text)
    timed = [s for s in reached if s.seconds_to_target is not None]
    if timed:
        fastest = min(timed, key=lambda s: s.seconds_to_target)
        lines.append(
            f"Soonest in training time on this machine: batch {fastest.batch_size}, {fastest.seconds_to_target:.2f} s "
            f"to the target at {fastest.throughput or 0:,.0f} samples/s."
        )
    if fit is not None and fit.bounded:
        near = min(rows, key=lambda s: abs(math.log(s.batch_size / fit.b_crit)))
        lines.append(
            f"Verdict: use a batch near B_crit (here about {near.batch_size}) when steps or wall-clock time matter; "
            "a smaller one when samples (data, compute) are the cost; a larger one buys little."
        )
    bad = [r for r in result.runs if r.status != "finished"]
    if bad:
        lines.append(
            "Runs that did not finish normally: "
            + ", ".join(f"{r.key} ({r.status}{': ' + r.error if r.error else ''})" for r in bad)
            + "."
        )
    return lines


# -------------------------------------------------------------------------------------------------- plots


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
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=WIDE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
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
    rows = [s for s in result.by_batch_size() if s.steps_to_target is not None]
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


# --------------------------------------------------------------------------------------------------- html


def _fmt(value: float | None, spec: str = ".3g", none: str = "–") -> str:
    return (
        none
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def _schedule_cells(summary: BatchSummary, dataset_size: int | None) -> list[str]:
    if not dataset_size or summary.batch_size > dataset_size:
        return ["–", "–"]
    plan = schedule(dataset_size, summary.batch_size, epochs=1, drop_last=True)  # the sampler drops the tail
    return [f"{plan.steps_per_epoch:,}", f"{summary.samples / plan.samples_per_epoch:.2f}"]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1300px;
color:#1b1b1b;background:#fff;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#555;font-size:.95em}.verdict{background:#f3f7fb;border-left:4px solid #2b6cb0;padding:10px 16px;margin:12px 0}
.verdict p{margin:.45em 0}figure{margin:12px 0 24px}figure img{max-width:100%;height:auto;border:1px solid #e3e3e3}
figcaption{color:#444;font-size:.92em;margin-top:4px}table{border-collapse:collapse;font-size:.9em;margin:8px 0}
th,td{border:1px solid #d5d5d5;padding:4px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}code{background:#f4f4f4;padding:1px 4px;border-radius:3px}
"""

CAPTIONS = {
    "loss-vs-steps": "Loss against optimizer steps, one colour per batch size (at its best LR, every seed): larger "
    "batches need fewer steps -- until the critical batch size.",
    "loss-vs-samples": "Loss against training samples: small batches use data best; past the critical batch, "
    "larger batches waste samples.",
    "loss-vs-time": "Loss against training time on this machine (evaluation excluded): what the batch size buys in "
    "practice, throughput included.",
    "steps-to-target": "Steps (left) and samples (right) to the target per batch size, with the fitted McCandlish "
    "curves; B_crit from the fit and the measured gradient noise scale marked.",
    "throughput-memory": "Throughput and peak memory per batch size.",
}


def _html(result: SweepResult, images: dict[str, Path], lines: list[str]) -> str:
    config = result.config
    rows = result.by_batch_size()
    target = config.target
    title = f"batchlab sweep: {config.name}"
    meta = (
        f"workload <b>{html.escape(config.workload)}</b> · batch sizes {html.escape(str(result.batch_sizes))} · "
        f"lr {config.lr:g} at batch {config.effective_base_batch}, scaled by rule <b>{html.escape(config.rule)}</b>"
        + (f" × LR grid {html.escape(str(config.lr_multipliers))}" if len(config.lr_multipliers) > 1 else "")
        + f" · seeds {html.escape(str(config.seeds))} · budget {html.escape(config.budget.describe())} · "
        + (f"target {html.escape(target.describe())}" if target else "no target")
        + f" · {len(result.runs)} of {len(config.specs())} runs finished"
    )
    figures = {}
    for name, path in images.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures[name] = (
            f'<figure><img alt="{name}" data-plot="{path.name}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{path.name}</b> — {html.escape(CAPTIONS[name])}</figcaption></figure>"
        )
    figures.setdefault(
        "steps-to-target",
        "<p class='meta'>No steps-to-target plot: no target was set, or no run reached it.</p>",
    )
    dataset = config.dataset_size
    batch_rows = []
    for s in rows:
        batch_rows.append(
            [
                str(s.batch_size),
                f"{s.lr:.3g}" + (f" (×{s.lr_multiplier:g})" if len(config.lr_multipliers) > 1 else ""),
                *_schedule_cells(s, dataset),
                f"{s.steps:,}",
                f"{s.samples:,}",
                _fmt(s.steps_to_target, ",.0f"),
                _fmt(s.samples_to_target, ",.0f"),
                _fmt(s.seconds_to_target, ".2f"),
                _fmt(s.throughput, ",.0f"),
                format_bytes(s.peak_bytes) if s.peak_bytes else "–",
                _fmt(s.final_val_loss, ".4g"),
                _fmt(s.noise_scale, ".3g"),
            ]
        )
    batch_table = _table(
        [
            "batch",
            "lr",
            "iterations / epoch",
            "epochs run",
            "optimizer steps",
            "samples",
            "steps to target",
            "samples to target",
            "seconds to target",
            "samples / s",
            "peak memory",
            "final val loss",
            "noise scale",
        ],
        batch_rows,
    )
    run_rows = [
        [
            r.key,
            f"{r.lr:.3g}",
            r.status,
            r.stopped_by,
            f"{r.steps:,}",
            f"{r.train_seconds:.2f}",
            _fmt(r.final_val.get("loss"), ".4g"),
            _fmt(r.steps_to_target, ",.1f"),
            _fmt(r.throughput, ",.0f"),
            _fmt(r.noise_scale, ".3g"),
            _fmt(r.noise_scale_at_target, ".3g"),
        ]
        for r in result.runs
    ]
    run_table = _table(
        [
            "run",
            "lr",
            "status",
            "stopped by",
            "steps",
            "train s",
            "final val loss",
            "steps to target",
            "samples / s",
            "noise scale (end)",
            "noise scale (at target)",
        ],
        run_rows,
    )
    fit = result.critical_batch()
    fit_text = (
        f"S_min = {fit.s_min:.4g} steps, B_crit = {fit.b_crit:.4g}, E_min = {fit.e_min:.4g} samples, "
        f"rms log error {fit.rms_log_error:.3f} ({html.escape(fit.note)})"
        if fit
        else "not fitted (needs at least 3 batch sizes that reached the target)"
    )
    tracking = ""
    if result.tracking_uri:
        tracking = (
            f"<p class='meta'>MLflow experiment <code>{html.escape(config.name)}</code> in "
            f"<code>{html.escape(result.tracking_uri)}</code>; browse it with "
            f"<code>mlflow ui --backend-store-uri {html.escape(result.tracking_uri)}</code>.</p>"
        )
    per_epoch = (
        f"Iterations per epoch count optimizer steps over the {dataset:,} training samples with the sampler's "
        "drop_last (batchlab.scaling.schedule); epochs run = samples / samples per epoch."
        if dataset
        else "The workload does not state its dataset size, so iterations per epoch are not shown."
    )
    verdict_html = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{meta}</p>
<div class="verdict"><h2 style="margin-top:0;border:0">Verdict</h2>{verdict_html}</div>
<h2>Loss curves per batch size</h2>
{figures["loss-vs-steps"]}{figures["loss-vs-samples"]}{figures["loss-vs-time"]}
<h2>Steps to target and the critical batch size</h2>
<p class="meta">Fit: {fit_text}.</p>
{figures["steps-to-target"]}
<h2>Per batch size</h2>
<p class="meta">{html.escape(per_epoch)} Steps and samples are per run (the largest over seeds); target columns are
means over seeds at the best LR.</p>
{batch_table}
<h2>Throughput and memory</h2>
{figures["throughput-memory"]}
<h2>Every run</h2>
{run_table}
{tracking}
<p class="meta">Written by batchlab on {time.strftime("%Y-%m-%d %H:%M")}; sweep directory
<code>{html.escape(str(result.directory) if result.directory else "(from MLflow)")}</code>.</p>
</body></html>
"""


def write_report(
    source: SweepResult | str | Path, out_dir: str | Path | None = None, *, tracking_uri: str | None = None
) -> ReportFiles:
    """Draw the PNGs and the self-contained HTML page for a sweep; return their paths.

    ``source`` is a SweepResult, a sweep directory or an MLflow experiment name/id (in ``tracking_uri``, by
    default the local store). ``out_dir`` defaults to ``<sweep dir>/report`` (or ``batchlab-report-<name>``
    for an experiment read from MLflow).
    """
    _mpl()  # fail before reading anything when matplotlib is missing
    result = load_sweep(source, tracking_uri)
    if not result.runs:
        raise ValueError(f"sweep {result.name!r} has no finished run to report")
    out = (
        Path(out_dir)
        if out_dir is not None
        else (result.directory / "report" if result.directory else Path(f"batchlab-report-{result.name}"))
    )
    out.mkdir(parents=True, exist_ok=True)
    images = {
        "loss-vs-steps": _loss_plot(result, "step", out / "loss-vs-steps.png"),
        "loss-vs-samples": _loss_plot(result, "samples", out / "loss-vs-samples.png"),
        "loss-vs-time": _loss_plot(result, "seconds", out / "loss-vs-time.png"),
    }
    if any(s.steps_to_target is not None for s in result.by_batch_size()):
        images["steps-to-target"] = _target_plot(result, out / "steps-to-target.png")
    images["throughput-memory"] = _hardware_plot(result, out / "throughput-memory.png")
    page = out / "report.html"
    page.write_text(_html(result, images, verdict(result)), encoding="utf-8")
    return ReportFiles(page, list(images.values()))
