"""Ultralytics ``batch=-1`` on the CPU with batchlab, next to what Ultralytics alone would use.

Builds ``YOLO("yolo26n.yaml")`` (no weights download), writes a small synthetic YOLO-format dataset, and trains
one epoch offline with ``batch=-1``: batchlab's search picks the batch (Ultralytics' AutoBatch falls back to 16 on
the CPU). The memory budget is the process's memory now plus ``--headroom-mib``, small so the search is quick.

    python examples/ultralytics_demo.py                     # memory-limited search, 1 epoch
    python examples/ultralytics_demo.py --json out.json     # also write the numbers (the test reads them)
    python examples/ultralytics_demo.py --check-fixed 16    # then check a fixed batch=16 against a tiny budget

Needs ``pip install 'batchlab[ultralytics]'`` (torch + torchvision); no network.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headroom-mib", type=int, default=420, help="memory budget = current RSS + this")
    parser.add_argument("--n-train", type=int, default=64, help="synthetic training images")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", default="-1", help="-1, a fraction such as 0.7, or a fixed size")
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--check-fixed", type=int, default=None, help="then check this fixed batch on a tiny budget"
    )
    parser.add_argument("--multi-scale", type=float, default=0.0, help="Ultralytics' multi_scale (e.g. 0.5)")
    parser.add_argument(
        "--shape-table", action="store_true", help="with --multi-scale: the largest batch at each size too"
    )
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="batchlab-yolo-"))
    from batchlab.integrations.ultralytics import (
        ULTRALYTICS_CPU_DEFAULT,
        make_synthetic_dataset,
        prepare_offline,
        train,
    )

    # before ultralytics is imported: YOLO_OFFLINE, the config dir, a font, network settings off
    prepare_offline(workdir / "config")
    data = make_synthetic_dataset(workdir / "data", n_train=args.n_train, n_val=8, imgsz=args.imgsz)

    import psutil
    from ultralytics import YOLO

    from batchlab import DoesNotFitError
    from batchlab.spec import parse_batch
    from batchlab.units import format_bytes

    batch = parse_batch(args.batch)
    batch_value = (
        batch.size if batch.is_fixed else (-1 if args.batch.strip() in ("-1", "auto") else batch.fraction)
    )
    model = YOLO("yolo26n.yaml")
    budget = psutil.Process().memory_info().rss + args.headroom_mib * MIB
    print(f"memory budget: {format_bytes(budget)} (this process now + {args.headroom_mib} MiB)")
    common = dict(
        data=str(data),
        imgsz=args.imgsz,
        device="cpu",
        workers=0,
        project=str(workdir / "runs"),
        plots=False,
        amp=False,
        verbose=False,
        exist_ok=True,
    )
    train(
        model,
        memory_budget=budget,
        epochs=args.epochs,
        batch=batch_value,
        name="auto",
        compare=True,
        multi_scale=args.multi_scale,
        shape_table=args.shape_table,
        on_probe=lambda p: print(
            f"  probe b={p.batch_size:<5} {p.outcome:<12} peak {format_bytes(p.peak_bytes):>11}  {p.seconds:5.1f} s"
        ),
        **common,
    )
    trainer = model.trainer
    result = trainer.batchlab_result
    print()
    print(f"batchlab chose batch {trainer.batch_size}: {result.summary()}")
    print(
        f"Ultralytics AutoBatch alone would use: {trainer.ultralytics_batch} "
        f"(its CPU fallback is {ULTRALYTICS_CPU_DEFAULT})"
    )
    out = {
        "trained_batch": trainer.batch_size,
        "batchlab_batch": result.batch_size,
        "ultralytics_batch": trainer.ultralytics_batch,
        "fits": result.fits,
        "limited_by": result.limited_by,
        "budget_bytes": result.budget_bytes,
        "probes": [p.to_dict() for p in result.probes],
        "epochs_done": trainer.epoch + 1,
        "results_csv": str(trainer.csv) if Path(trainer.csv).exists() else None,
        "shape_table": trainer.batchlab_shape_table.to_dict() if trainer.batchlab_shape_table else None,
    }
    if trainer.batchlab_shape_table is not None:
        print(trainer.batchlab_shape_table.summary())

    if args.check_fixed is not None:
        # 32 MiB over what the process held before the first search's first step: too small for batch 16. (Not
        # over its resident memory now: after training, that counts the heap the fast allocator keeps.)
        tiny = result.probes[0].baseline_bytes + 32 * MIB
        print(f"\nchecking a fixed batch={args.check_fixed} against a budget of {format_bytes(tiny)} ...")
        try:
            train(
                YOLO("yolo26n.yaml"),
                memory_budget=tiny,
                epochs=1,
                batch=args.check_fixed,
                name="fixed",
                on_misfit="raise",
                **common,
            )
            out["fixed_check"] = "fits"
        except DoesNotFitError as exc:
            print(f"DoesNotFitError: {exc}")
            out["fixed_check"] = str(exc)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
