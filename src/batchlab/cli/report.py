"""``batchlab report``: PNG plots and one self-contained HTML page from a sweep directory or MLflow experiment."""

from __future__ import annotations

import argparse
from pathlib import Path

from batchlab.cli.common import add_target_arguments, target_from
from batchlab.sweeps import SweepStore, load_sweep, verdict, write_report
from batchlab.sweeps.report import default_report_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="draw a sweep's comparison: PNGs and one self-contained HTML page",
        description="Loss vs steps/samples/time per batch size, steps-to-target with the fitted critical batch "
        "size and the measured noise scale, throughput and memory, the epoch/iteration table and a verdict.",
    )
    parser.add_argument(
        "source", help="a sweep directory (batchlab-runs/sweeps/NAME) or an MLflow experiment name or id"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: SOURCE/report, or batchlab-report-NAME for an MLflow experiment; with a "
        "target, the same name ending -at-METRIC-VALUE, so the sweep's own report stays)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store holding the experiment (default: ./batchlab-runs/mlflow.db)",
    )
    add_target_arguments(
        parser, " instead of the sweep's own: read off the recorded validation curves, nothing trains again"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.tracking_uri is not None and (Path(args.source) / SweepStore.CONFIG).is_file():
        raise ValueError(
            f"--tracking-uri reads an MLflow experiment; {args.source} is a sweep directory, which holds its "
            "runs itself: drop --tracking-uri, or name the experiment instead"
        )
    target = target_from(args)
    result = load_sweep(args.source, args.tracking_uri)
    out = args.out
    if target is not None:
        result = result.with_target(target)
        if out is None:
            own = default_report_dir(result)
            out = own.with_name(f"{own.name}-at-{target.metric}-{target.value:g}")
    files = write_report(result, out)
    for line in verdict(result):
        print(line)
    print(f"report: {files.html}")
    for image in files.images:
        print(f"plot: {image}")
    return 0
