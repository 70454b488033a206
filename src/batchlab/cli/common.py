"""What every command shares: the ``--workload``/``--device``/``--json`` options, errors, the console."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from batchlab.devices import parse_device
from batchlab.workloads import BUILTIN, load_workload

console = Console(stderr=True)  # progress and summaries go to stderr-free stdout below; errors to stderr


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
        "--device", default="auto", help="auto (default: CUDA if available), cpu, cuda or cuda:N"
    )
    parser.add_argument("--json", action="store_true", help="print only JSON on stdout")


def resolve_cli_device(text: str) -> str:
    """The device to build a built-in workload on (validated): ``auto`` becomes cuda when available, else cpu."""
    return str(parse_device(text))


def build_workload(args: argparse.Namespace):
    """Load the workload named by ``--workload`` on ``--device``."""
    return load_workload(args.workload, device=resolve_cli_device(args.device))
