"""What every command shares: the ``--workload``/``--device``/``--json`` options, errors, the progress display."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from batchlab import checks
from batchlab.devices import parse_device, resolve_device
from batchlab.fit import Probe
from batchlab.memory import MemoryBreakdown
from batchlab.sweeps.records import Target
from batchlab.units import format_bytes
from batchlab.workload.workload import Workload
from batchlab.workloads import BUILTIN, load_workload

COUNT_LINES = 4  # off a terminal, a count (noise steps) prints a line at each quarter: a log shows how far


def fail(message: str) -> int:
    """Print one clear line (no traceback) to stderr and return the exit code for errors."""
    first_line = message.strip().splitlines()[0] if message.strip() else "error"
    print(f"batchlab: error: {first_line}", file=sys.stderr)
    return 1


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload",
        required=True,
        help=f"built-in ({', '.join(BUILTIN)}), path/to/file.py:function or module:function "
        "(the function returns a batchlab.Workload or a step(batch_size) callable)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (default: a built-in on CUDA if available; your Workload where its model is), cpu, cuda "
        "or cuda:N (your Workload's model must be there: batchlab never moves it)",
    )
    parser.add_argument("--json", action="store_true", help="print only JSON on stdout")


def resolve_cli_device(text: str) -> str:
    """The device to build a built-in workload on (validated): ``auto`` becomes cuda when available, else cpu."""
    return str(parse_device(text))


def build_workload(args: argparse.Namespace) -> Any:
    """Load the workload named by ``--workload``: a built-in is built on ``--device``; a user's function
    places its own model, and a ``--device`` it did not place it on is a one-line error, never ignored.

    Commands pass ``args.device`` itself on to the library, where ``auto`` follows the model.
    """
    workload = load_workload(args.workload, device=resolve_cli_device(args.device))
    if isinstance(workload, Workload):
        resolve_device(args.device, workload.device)  # raises ValueError naming both devices on a mismatch
    return workload


class Display:
    """What a long command shows while it measures: which phase it is in and how far, on stderr.

    A live line (spinner, phase, how far, time since the command began) that rich redraws in place on a
    terminal, and permanent lines above it: one when a phase starts (``title: phase ...``) and one per
    finished measurement (a probe of a fit search, a timed profile point). Off a terminal (a pipe, a CI
    log) only the permanent lines appear. Results go to stdout, so ``batchlab advise ... > advice.txt`` still shows
    progress; with ``enabled=False`` (``--json``) every call does nothing and stderr stays clean for scripts.
    """

    def __init__(self, title: str, *, enabled: bool = True):
        self.title = title
        self.enabled = enabled
        self.console = Console(stderr=True) if enabled else None
        self._status: Progress | None = None
        self._task = None
        self._phase = ""
        self._probes = 0  # in the current phase

    def __enter__(self) -> Display:
        if self.enabled and self.console.is_terminal:  # off a terminal a live line would only leave blanks
            self._status = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,  # the live line goes when the command ends; the permanent lines stay
            )
            self._status.__enter__()
            self._task = self._status.add_task(f"{self.title} ...", total=None)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._status is not None:
            self._status.__exit__(*exc_info)
            self._status = None

    def phase(self, text: str) -> None:
        """A new phase begins: a permanent line, and the live line's text (the current phase again: nothing)."""
        if text == self._phase:
            return
        self._phase, self._probes = text, 0
        self.line(f"{self.title}: {text} ...")
        self.status("")

    def status(self, detail: str) -> None:
        """How far the current phase is (the live line only)."""
        if self._status is not None:
            where = f"{self.title}: {self._phase}"
            self._status.update(self._task, description=f"{where}: {detail}" if detail else f"{where} ...")

    def line(self, text: str) -> None:
        """A permanent line (a finished measurement)."""
        if self.enabled:
            self.console.print(text, highlight=False, markup=False, soft_wrap=True)  # a path stays one line

    def count(self, label: str, done: int, total: int) -> None:
        """``done`` of ``total`` (noise steps): the live line, and off a terminal a line at each quarter."""
        self.status(f"{label} {done}/{total}")
        if self.enabled and not self.console.is_terminal:
            if done == total or done % max(1, total // COUNT_LINES) == 0:
                self.line(f"  {label} {done}/{total}")

    def probe(self, probe: Probe) -> None:
        """One probe of a fit search (``on_probe``): a permanent line, and the count on the live line."""
        self._probes += 1
        self.line(
            f"  probe b={probe.batch_size:<6} {probe.outcome:<12} peak {format_bytes(probe.peak_bytes):>11}  "
            f"{probe.seconds:6.2f} s"
        )
        self.status(f"{self._probes} probes, last b={probe.batch_size} {probe.outcome}")

    def variant_probe(self, variant: str, probe: Probe) -> None:
        """One probe of a profile variant's fit search (``profile(on_probe=...)``)."""
        self.phase(f"fit search ({variant})")
        self.probe(probe)

    def point(self, point: Any) -> None:
        """One timed :class:`~batchlab.profile.ProfilePoint` (``profile(on_point=...)``)."""
        self.phase(f"timing batch sizes ({point.variant})")
        speed = f"{point.samples_per_second:10,.1f} samples/s" if point.samples_per_second else " " * 20
        self.line(
            f"  {point.variant:<10} b={point.batch_size:<6} {point.outcome:<12} {speed}  "
            f"peak {format_bytes(point.peak_bytes):>11}"
        )
        self.status(f"done b={point.batch_size}")


def print_breakdown(console: Console, breakdown: MemoryBreakdown, title: str, peak_bytes: int | None) -> None:
    """The memory split as a table: each non-zero part by name, then the peak."""
    split = Table(title=title, show_header=True)
    split.add_column("what")
    split.add_column("bytes", justify="right")
    for name, value in breakdown.to_dict().items():
        if value:
            split.add_row(name.replace("_", " "), format_bytes(value))
    split.add_row("[bold]peak[/]", f"[bold]{format_bytes(peak_bytes)}[/]")
    console.print(split)


def add_target_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--target-loss X`` / ``--target "accuracy>=0.95"``, one parser for ``sweep`` and ``report``; ``what``
    ends each help text (what the target is for there)."""
    parser.add_argument("--target-loss", type=float, default=None, help=f"validation loss to reach{what}")
    parser.add_argument("--target", default=None, help=f'another target, e.g. "accuracy>=0.95"{what}')


def target_from(args: argparse.Namespace) -> Target | None:
    """The :class:`~batchlab.sweeps.records.Target` of :func:`add_target_arguments`' flags (None: neither)."""
    if args.target_loss is not None and args.target is not None:
        raise ValueError("give --target-loss or --target, not both")
    return Target.parse(args.target_loss if args.target_loss is not None else args.target)


def comma_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the items of a comma-separated flag, blanks dropped."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def comma_ints(flag: str, text: str, *, example: str = "8,16,32") -> list[int]:
    """A comma-separated flag of positive ints (``--batch-sizes 8,16,32``), or one line naming the flag."""
    try:
        values = [int(item) for item in comma_list(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"invalid {flag} {text!r}: expected positive ints like {example}")
    return values


def comma_shapes(flag: str, text: str) -> list[int | tuple[int, ...]]:
    """A comma-separated flag of batch shapes: lengths ``128,256,512`` or image sizes ``320x320,640x480``
    (height x width), checked by :func:`batchlab.checks.shapes` (sorted, each once), or one line naming the flag."""
    try:
        values = [
            tuple(int(part) for part in item.lower().split("x")) if "x" in item.lower() else int(item)
            for item in comma_list(text)
        ]
    except ValueError:
        raise ValueError(
            f"invalid {flag} {text!r}: expected lengths like 128,256,512 or image sizes like 320x320,640x640"
        ) from None
    return checks.shapes(flag, values)


def print_table_footer(console: Any, table: Any, *, estimated: bool) -> None:
    """Below a shape table (measured by ``fit --shapes`` or planned by ``plan --shapes``): the fitted peak model
    and every note of the entries, once each."""
    if table.model is not None:
        model = table.model
        shared = f" + {model.fixed_per_length2:.4g} L^2" if model.fixed_per_length2 else ""
        console.print(
            f"peak(b, L) = {format_bytes(model.fixed_bytes)}{shared} + b x ({model.alpha:.4g} L + "
            f"{model.beta:.4g} L^2) bytes{' (estimated)' if estimated else ''}, fitted over L = "
            f"{', '.join(map(str, model.lengths))}"
        )
    for note in sorted({note for entry in table.entries for note in entry.result.notes}):
        console.print(f"[dim]note: {note}[/]")
