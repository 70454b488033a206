"""Real variable-length text offline: the Python standard library's own source, cut into documents of bytes.

Every Python ships its standard library as source, so this corpus exists on any machine with no download and
was written by no one here (issues 12 and 13 ask for real data of many lengths). A document is one top-level
definition or block of a module: each ``.py`` file is cut where a line starts with ``def ``, ``class `` or
``@`` at column 0, which gives lengths from a few bytes to tens of thousands -- the spread real text has.
Tokens are bytes (vocabulary 256), so no tokenizer has to be trained or downloaded.

The file list is sorted and the cut is deterministic; the train/validation split is by file (a hash of its
path), so no document is split across the two.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["VOCAB_SIZE", "Corpus", "stdlib_corpus"]

VOCAB_SIZE = 256  # byte tokens
_TOP_LEVEL = re.compile(rb"^(?=def |class |async def |@)", re.MULTILINE)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
VAL_FRACTION = 0.1  # one file in ten held out, by path hash


@dataclass(frozen=True)
class Corpus:
    """Documents as 1-d ``torch.long`` tensors of byte ids, split by file into train and validation."""

    train: tuple[torch.Tensor, ...]
    val: tuple[torch.Tensor, ...]
    root: str
    files: int

    def lengths(self, split: str = "train") -> list[int]:
        """The length of every document of ``split`` ("train" or "val"), in tokens."""
        return [len(doc) for doc in self._split(split)]

    def stream(self, split: str = "train") -> torch.Tensor:
        """All documents of ``split`` joined end to end: the token stream a character-level LM trains on."""
        return torch.cat(self._split(split))

    def _split(self, split: str) -> tuple[torch.Tensor, ...]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


def _source_files(root: Path) -> list[Path]:
    return sorted(
        path
        for path in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts) and path.is_file()
    )


def _documents(source: bytes, min_bytes: int) -> list[bytes]:
    starts = [0, *(m.start() for m in _TOP_LEVEL.finditer(source) if m.start() > 0), len(source)]
    pieces = (source[a:b].strip(b"\n") for a, b in zip(starts, starts[1:]))
    return [piece for piece in pieces if len(piece) >= min_bytes]


def _held_out(relative: str) -> bool:
    digest = hashlib.sha1(relative.encode()).digest()
    return digest[0] < 256 * VAL_FRACTION


@functools.cache
def stdlib_corpus(max_files: int | None = None, min_bytes: int = 16) -> Corpus:
    """The standard library of the running Python as a corpus of byte documents (cached per process).

    ``max_files`` takes the first files of the sorted list (for fast tests); ``min_bytes`` drops fragments
    shorter than that (a stray decorator line). Raises :class:`FileNotFoundError` on a Python installed
    without its library sources.
    """
    if max_files is not None and (
        isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1
    ):
        raise ValueError(f"max_files must be a positive int or None, got {max_files!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _source_files(root)[:max_files]
    if not files:
        raise FileNotFoundError(f"no .py sources under the standard library path {root}")
    train: list[torch.Tensor] = []
    val: list[torch.Tensor] = []
    for path in files:
        docs = _documents(path.read_bytes(), min_bytes)
        target = val if _held_out(str(path.relative_to(root))) else train
        target.extend(torch.frombuffer(bytearray(doc), dtype=torch.uint8).long() for doc in docs)
    return Corpus(train=tuple(train), val=tuple(val), root=str(root), files=len(files))
