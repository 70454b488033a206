"""benchmarks/removed_hooks.py: the three copies it times are what it says they are, and it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is scripts, not a package

import removed_hooks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_removed_copy_keeps_an_empty_hook_dict_and_the_reset_one_none():
    removed, reset = removed_hooks._model(), removed_hooks._model()
    removed_hooks._unhook(removed, reset=False)
    removed_hooks._unhook(reset, reset=True)
    assert all(p._backward_hooks == {} for p in removed.parameters())
    assert all(p._backward_hooks is None for p in reset.parameters())


def test_main_prints_a_row_per_copy_and_refuses_too_few_rounds(capsys):
    assert removed_hooks.main(["--reps", "7", "--steps", "1"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line
    ]
    assert [row.split(" | ")[0] for row in rows] == [
        "| never hooked",
        "| removed",
        "| removed, reset to None",
    ]
    with pytest.raises(SystemExit):
        removed_hooks.main(["--reps", "6"])
    assert "--reps must be >= 7 and --steps >= 1, got 6 and 40" in capsys.readouterr().err
