"""Ultralytics without the network: the settings, the font it would download, and a small synthetic dataset.

Apart from :mod:`batchlab.integrations.ultralytics` (the trainer and its search) because they are the set-up that a
test, a demo or an air-gapped machine runs once, before Ultralytics is imported (DESIGN.md: offline work).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = ["prepare_offline", "make_synthetic_dataset"]

# Ultralytics' settings that reach for the network or a tracking service; all turned off.
_SETTINGS_OFF = (
    "sync",
    "mlflow",
    "raytune",
    "wandb",
    "comet",
    "clearml",
    "dvc",
    "neptune",
    "tensorboard",
    "hub",
)


def _find_font() -> Path | None:
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    try:
        import matplotlib

        candidates.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    except ImportError:
        pass
    return next((path for path in candidates if path.is_file()), None)


def prepare_offline(config_dir: str | os.PathLike) -> Path:
    """Make Ultralytics work with no network: call it *before* importing ``ultralytics``.

    Sets ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR=config_dir``, puts a TTF font at
    ``config_dir/Ultralytics/Arial.ttf`` (Ultralytics downloads Arial for its plots otherwise), then imports
    Ultralytics and turns off its network-facing settings (``sync``, ``mlflow``, ``raytune``, loggers). Returns
    the settings directory. Ultralytics reads ``YOLO_CONFIG_DIR`` once, at import: calling this after an
    earlier import with another directory raises ``RuntimeError``.
    """
    settings_dir = Path(config_dir) / "Ultralytics"
    settings_dir.mkdir(parents=True, exist_ok=True)
    font = settings_dir / "Arial.ttf"
    if not font.exists():
        source = _find_font()
        if source is None:
            raise FileNotFoundError(
                "no TTF font found to stand in for Arial.ttf; install fonts-dejavu or matplotlib"
            )
        shutil.copy(source, font)
    import sys

    if "ultralytics" in sys.modules:
        from ultralytics.utils import USER_CONFIG_DIR

        if Path(USER_CONFIG_DIR).resolve() != settings_dir.resolve():
            raise RuntimeError(
                f"ultralytics was imported before prepare_offline() with config dir {USER_CONFIG_DIR}; "
                "call prepare_offline() first, in a fresh process"
            )
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(Path(config_dir))
    from ultralytics import settings

    settings.update({key: False for key in _SETTINGS_OFF if key in settings})
    return settings_dir


def make_synthetic_dataset(
    root: str | os.PathLike,
    *,
    n_train: int = 64,
    n_val: int = 8,
    imgsz: int = 64,
    classes: Sequence[str] = ("red", "blue"),
    boxes_per_image: int = 3,
    seed: int = 0,
) -> Path:
    """Write a small YOLO-format detection dataset (coloured rectangles) under ``root``; return its data.yaml.

    Layout: ``images/{train,val}/*.png`` and ``labels/{train,val}/*.txt`` with one ``class xc yc w h`` line per
    box (normalised), as Ultralytics expects. Deterministic for a given ``seed``; needs no network.
    """
    import numpy as np
    from PIL import Image

    colours = [(230, 40, 40), (40, 40, 230), (40, 200, 40), (220, 200, 40)]
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = np.full((imgsz, imgsz, 3), 114, np.uint8)  # Ultralytics' letterbox grey
            lines = []
            for _ in range(boxes_per_image):
                cls = int(rng.integers(len(classes)))
                w, h = rng.uniform(0.15, 0.4, 2)
                xc, yc = rng.uniform(0.2, 0.8, 2)
                x0, x1 = int((xc - w / 2) * imgsz), int((xc + w / 2) * imgsz)
                y0, y1 = int((yc - h / 2) * imgsz), int((yc + h / 2) * imgsz)
                image[max(y0, 0) : y1, max(x0, 0) : x1] = colours[cls % len(colours)]
                lines.append(f"{cls} {xc:.5f} {yc:.5f} {w:.5f} {h:.5f}")
            Image.fromarray(image).save(root / "images" / split / f"{split}{index:04d}.png")
            (root / "labels" / split / f"{split}{index:04d}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(classes))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return data
