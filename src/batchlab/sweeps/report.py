"""The sweep report: one self-contained HTML page, with the plots inlined, that compares the batch sizes.

``write_report(source)`` reads a :class:`~batchlab.sweeps.result.SweepResult`, a sweep directory or an MLflow
experiment (name or id) and writes into one folder:

- ``loss-vs-steps.png``, ``loss-vs-samples.png``, ``loss-vs-time.png``: training loss (smoothed) and
  validation loss per batch size against optimizer steps, training samples and training seconds -- the three
  views in which a larger batch looks best, about equal and (past the critical batch) worst;
- ``steps-to-target.png``: steps and samples to the target against the batch size, with the fitted
  S = S_min(1 + B_crit/B) and E = E_min(1 + B/B_crit) curves, B_crit and the measured noise scale marked;
- ``throughput-memory.png``: samples per second and peak memory per batch size;
- ``report.html``: the plots inlined as base64 (one file that opens offline, no external URL anywhere), the
  epoch/iteration table per batch size (:func:`batchlab.advice.scaling.schedule`), every run, and a short verdict
  in words (:func:`verdict`).

The PNGs are drawn by :mod:`batchlab.sweeps.plots` (matplotlib, the ``plot`` extra, only when a report is
drawn; the caller's pyplot state and backend are never touched); this module writes the page around them.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batchlab.advice.scaling import schedule
from batchlab.sweeps import plots
from batchlab.sweeps.records import RunStatus
from batchlab.sweeps.result import BatchSummary, SweepResult
from batchlab.sweeps.store import DEFAULT_DIRECTORY, SweepStore
from batchlab.sweeps.tracking import default_tracking_uri, read_experiment
from batchlab.units import format_bytes

__all__ = ["ReportFiles", "write_report", "load_sweep", "verdict"]


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote: the HTML page and the PNGs (also inlined in the page)."""

    html: Path
    images: list[Path] = field(default_factory=list)


def load_sweep(source: SweepResult | str | Path, tracking_uri: str | None = None) -> SweepResult:
    """A SweepResult from itself, a sweep directory (with ``sweep.json``) or an MLflow experiment name/id."""
    if isinstance(source, SweepResult):
        return source
    path = Path(source)
    if (path / SweepStore.CONFIG).is_file():
        return SweepResult.load(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory but not a sweep directory (no sweep.json)")
    uri = tracking_uri or default_tracking_uri(DEFAULT_DIRECTORY)
    if tracking_uri is None and not (Path(DEFAULT_DIRECTORY) / "mlflow.db").exists():
        raise ValueError(
            f"{source!r} is neither a sweep directory nor an experiment in the default store "
            f"({DEFAULT_DIRECTORY}/mlflow.db does not exist); pass a directory or --tracking-uri"
        )
    return read_experiment(str(source), uri)


# ------------------------------------------------------------------------------------------------ verdict


def verdict(result: SweepResult) -> list[str]:
    """A few sentences that say what the sweep shows, derived only from its numbers."""
    rows = result.by_batch_size()
    if not rows:
        return ["No run has finished yet."]
    lines: list[str] = []
    target = result.config.target
    fit = result.critical_batch()
    noise = result.noise_scale()
    reached = [s for s in rows if s.trained_to_target]
    untrained = [s.batch_size for s in rows if s.steps_to_target == 0]
    if target is None:
        best = min(rows, key=lambda s: s.final_val_loss if s.final_val_loss is not None else math.inf)
        lines.append(
            f"No target was set, so only final losses compare: the lowest final validation loss after "
            f"{result.config.budget.describe()} is {best.final_val_loss:.4g} at batch {best.batch_size}. "
            "Give a target to measure steps-to-target and the critical batch size: `batchlab report "
            "SWEEP --target-loss X` reads it off the recorded curves (SweepResult.with_target), nothing trains again."
        )
    elif untrained and not reached:
        lines.append(
            f"Every batch size that reached {target.describe()} met it at the first evaluation, before any step "
            f"({untrained}): the target says nothing about the batch size; give a tighter one."
        )
    elif not reached:
        lines.append(
            f"No batch size reached {target.describe()} within {result.config.budget.describe()}: raise the "
            "budget or loosen the target."
        )
    else:
        lo, hi = reached[0], reached[-1]
        if lo is hi:
            alone = "the only batch size swept" if len(rows) == 1 else "the only batch size that reached it"
            lines.append(
                f"Reaching {target.describe()} took {lo.steps_to_target:.0f} optimizer steps at batch "
                f"{lo.batch_size}, {alone}: no other batch size to compare it with."
            )
        else:
            lines.append(
                f"Reaching {target.describe()} took {lo.steps_to_target:.0f} optimizer steps at batch {lo.batch_size} "
                f"and {hi.steps_to_target:.0f} at batch {hi.batch_size} "
                f"({lo.steps_to_target / hi.steps_to_target:.1f}x fewer steps for {hi.batch_size / lo.batch_size:.0f}x the batch)."
            )
        missed = [s.batch_size for s in rows if s.steps_to_target is None]
        if missed:
            lines.append(f"Batch sizes {missed} did not reach the target within the budget.")
        if untrained:
            lines.append(
                f"Batch sizes {untrained} met it at the first evaluation, before any step: left out."
            )
    ends = result.ramp_ends()
    if ends:
        lines.append(
            f"These runs are batch ramps: each batch size here is where its runs started, and they ended {ends} "
            "(the batch per step is in each run's record)."
        )
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
    bad = [r for r in result.runs if r.status is not RunStatus.FINISHED]
    if bad:
        lines.append(
            "Runs that did not finish normally: "
            + ", ".join(f"{r.key} ({r.status}{': ' + r.error if r.error else ''})" for r in bad)
            + "."
        )
    return lines


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


def default_report_dir(result: SweepResult) -> Path:
    """Where :func:`write_report` writes by default: ``<sweep dir>/report``, or ``batchlab-report-<name>`` for
    an experiment read from MLflow (no sweep directory)."""
    return result.directory / "report" if result.directory else Path(f"batchlab-report-{result.name}")


def write_report(
    source: SweepResult | str | Path, out_dir: str | Path | None = None, *, tracking_uri: str | None = None
) -> ReportFiles:
    """Draw the PNGs and the self-contained HTML page for a sweep; return their paths.

    ``source`` is a SweepResult, a sweep directory or an MLflow experiment name/id (in ``tracking_uri``, by
    default the local store). ``out_dir`` defaults to ``<sweep dir>/report`` (or ``batchlab-report-<name>``
    for an experiment read from MLflow).
    """
    plots.require_matplotlib()  # fail before reading anything when matplotlib is missing
    result = load_sweep(source, tracking_uri)
    if not result.runs:
        raise ValueError(f"sweep {result.name!r} has no finished run to report")
    out = Path(out_dir) if out_dir is not None else default_report_dir(result)
    out.mkdir(parents=True, exist_ok=True)
    images = plots.draw(result, out)
    page = out / "report.html"
    page.write_text(_html(result, images, verdict(result)), encoding="utf-8")
    return ReportFiles(page, list(images.values()))
