"""Four small training workloads that run offline on the CPU in seconds, each a different memory shape.

- ``mlp_digits``: real data (sklearn's bundled 8x8 digits: 1438 to train on, 359 held out for validation) --
  tiny activations; capped by the dataset size, which shows the cap logic.
- ``small_cnn``: a plain conv net on 3x64x64 images -- activations dominate and grow linearly.
- ``resnet``: residual blocks with BatchNorm and SGD+momentum -- buffers that a search must restore.
- ``gpt``: a small GPT-style decoder on 128-token sequences with AdamW -- attention's per-sample memory.

Images and tokens are synthetic (drawn from torch's global RNG, which batchlab restores after probing):
memory and speed do not depend on what the pixels show. ``cnn``, ``resnet`` and ``gpt`` take a batch ``shape``
(``make_batch(b, shape=...)``: an image's ``(h, w)``, a sequence length up to gpt's context) for
``find_batch_size(..., shapes=...)``; every other command leaves it at its default.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from batchlab.workload.workload import Workload

Split = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DIGITS_VAL_FRACTION = 0.2  # the usual 80/20 hold-out; the split is fixed (seed 0), independent of run seeds


@functools.cache
def digits_split() -> Split:
    """sklearn's 1797 digits as ((train x, y), (val x, y)): 1438 / 359, pixels scaled to [0, 1], on the CPU.

    One split serves the ``mlp-digits`` workload and the ``mlp-digits`` sweep task, so a branch, a sweep and a
    fit on either train and validate on the same samples.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the mlp-digits workload needs scikit-learn: pip install 'batchlab[examples]'"
        ) from None
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = round(len(y) * DIGITS_VAL_FRACTION)
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def mlp_digits(device: str = "cpu") -> Workload:
    """MLP on sklearn's digits (real data, ships offline): 64-256-256-10, Adam, 1438 train / 359 validation.

    Batches are drawn from the training split; ``validation`` is the held-out split, so the commands that
    train and compare (``noise --branch``, ``advise --branch``, a sweep of the workload) run on it as they are.
    """
    (train_x, train_y), (val_x, val_y) = digits_split()
    inputs, labels = train_x.to(device), train_y.to(device)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(device)

    def make_batch(batch_size: int):
        index = torch.randint(0, len(labels), (batch_size,), device=device)
        return inputs[index], labels[index]

    return Workload(
        model,
        make_batch,
        nn.functional.cross_entropy,
        lambda p: torch.optim.Adam(p, lr=1e-3),
        dataset_size=len(labels),
        name="mlp-digits",
        validation=(val_x.to(device), val_y.to(device)),
    )


def _images(batch_size: int, device: str, shape: tuple[int, int] = (64, 64), classes: int = 10):
    height, width = shape
    return torch.randn(batch_size, 3, height, width, device=device), torch.randint(
        0, classes, (batch_size,), device=device
    )


def small_cnn(device: str = "cpu") -> Workload:
    """Small CNN on 3x64x64 images: 3 conv layers (32-64-128), Adam; ~3.5 MiB per sample on CPU."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).to(device)  # fmt: skip
    return Workload(
        model,
        lambda b, shape=(64, 64): _images(b, device, shape),
        nn.functional.cross_entropy,
        lambda p: torch.optim.Adam(p, lr=1e-3),
        name="cnn",
    )


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with BatchNorm and a shortcut (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(device: str = "cpu") -> Workload:
    """ResNet-style CNN (4 stages of basic blocks, BatchNorm) on 3x64x64 images, SGD with momentum."""
    widths = (32, 64, 128, 256)
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    in_channels = widths[0]
    for index, width in enumerate(widths):
        layers.append(_BasicBlock(in_channels, width, 1 if index == 0 else 2))
        in_channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, 10)]
    model = nn.Sequential(*layers).to(device)
    return Workload(
        model,
        lambda b, shape=(64, 64): _images(b, device, shape),
        nn.functional.cross_entropy,
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        name="resnet",
    )


class _Block(nn.Module):
    """Pre-norm transformer decoder block (GPT-2 layout) with causal self-attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)  # True = masked
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, tied output head."""

    def __init__(
        self, vocab: int = 2048, context: int = 128, width: int = 256, depth: int = 4, heads: int = 4
    ):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # weight tying, as GPT-2 does

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (batch, time, vocab)


def gpt(device: str = "cpu") -> Workload:
    """Small GPT-style decoder (4 layers, width 256, 128 tokens, vocab 2048), AdamW, next-token loss."""
    model = TinyGPT().to(device)

    def make_batch(batch_size: int, shape: int = model.context):
        if shape > model.context:  # the position table has no row past the context
            raise ValueError(f"gpt's context is {model.context} tokens, shorter than {shape}")
        tokens = torch.randint(0, 2048, (batch_size, shape + 1), device=device)
        return tokens[:, :-1], tokens[:, 1:]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return Workload(model, make_batch, loss_fn, lambda p: torch.optim.AdamW(p, lr=3e-4), name="gpt")
