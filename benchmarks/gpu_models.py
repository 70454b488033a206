"""GPU-class benchmark models in plain torch: ResNet-50, ViT-B/16 and GPT-2 small, as batchlab Workloads.

Plain torch so that the GPU image needs nothing else (no torchvision/transformers weights or configs, no
network) and the CPU dry run builds the same code at a tiny scale. The shapes follow the papers:

- ``resnet50``: He et al. 2016, bottleneck blocks [3, 4, 6, 3], widths 64..512 (x4 expansion), 224x224
  images, 1000 classes, SGD with momentum 0.9 (25.6M parameters).
- ``vit-b``: Dosovitskiy et al. 2021, ViT-B/16: 16x16 patches of 224x224, width 768, 12 layers, 12 heads,
  MLP 3072, class token, AdamW (86.6M parameters).
- ``gpt2-small``: Radford et al. 2019, 12 layers, width 768, 12 heads, 1024 tokens, vocabulary 50257, tied
  output head, AdamW (124M parameters).

``scale="tiny"`` keeps every structure (blocks, attention, optimizer) at sizes a CPU runs in milliseconds, for
``benchmarks/gpu_check.sh --dry-run``. Attention uses ``F.scaled_dot_product_attention`` (flash / memory-
efficient kernels on CUDA, as real training code does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from batchlab import Workload


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (stride here), 1x1 expand x4, BatchNorm, shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), base: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, 2, 3, bias=False), nn.BatchNorm2d(base), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages, in_channels = [], base
        for index, blocks in enumerate(layers):
            width = base * 2**index
            stage = []
            for block in range(blocks):
                stage.append(Bottleneck(in_channels, width, 2 if block == 0 and index > 0 else 1))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (batch, heads, tokens, head_dim)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    """Pre-norm transformer block (GPT-2 and ViT share it; GPT-2 is causal)."""

    def __init__(self, width: int, heads: int, causal: bool, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attention = Attention(width, heads, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 224, patch: int = 16, width: int = 768, depth: int = 12, heads: int = 12, classes: int = 1000):  # fmt: skip
        super().__init__()
        self.patches = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.positions = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, causal=False) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2)  # (batch, patches, width)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, 0]))


class GPT(nn.Module):
    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768, depth: int = 12, heads: int = 12):  # fmt: skip
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, causal=True) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied, as GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (batch, tokens, vocab)


def _images(size: int, classes: int, device: str) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    def make_batch(b: int):
        return (
            torch.randn(b, 3, size, size, device=device),
            torch.randint(0, classes, (b,), device=device),
        )

    return make_batch


def resnet50(device: str = "cuda", scale: str = "full") -> Workload:
    """ResNet-50 on 224x224 images, SGD momentum 0.9 (tiny: base width 8, [1,1,1,1], 32x32)."""
    full = scale == "full"
    model = ResNet((3, 4, 6, 3) if full else (1, 1, 1, 1), 64 if full else 8, 1000 if full else 10).to(device)
    size, classes = (224, 1000) if full else (32, 10)
    return Workload(
        model,
        _images(size, classes, device),
        F.cross_entropy,
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        name="resnet50" if full else "resnet50-tiny",
    )


def vit_b(device: str = "cuda", scale: str = "full") -> Workload:
    """ViT-B/16 on 224x224 images, AdamW (tiny: width 32, 2 layers, 32x32 images, 8x8 patches)."""
    full = scale == "full"
    model = (ViT() if full else ViT(image=32, patch=8, width=32, depth=2, heads=2, classes=10)).to(device)
    size, classes = (224, 1000) if full else (32, 10)
    return Workload(
        model,
        _images(size, classes, device),
        F.cross_entropy,
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
        name="vit-b" if full else "vit-b-tiny",
    )


def gpt2_small(device: str = "cuda", scale: str = "full") -> Workload:
    """GPT-2 small, 1024 tokens, AdamW (tiny: width 32, 2 layers, 64 tokens, vocabulary 256)."""
    full = scale == "full"
    model = (GPT() if full else GPT(vocab=256, context=64, width=32, depth=2, heads=2)).to(device)
    vocab = model.tokens.num_embeddings

    def make_batch(b: int):
        tokens = torch.randint(0, vocab, (b, model.context + 1), device=device)
        return tokens[:, :-1], tokens[:, 1:]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return Workload(
        model,
        make_batch,
        loss_fn,
        lambda p: torch.optim.AdamW(p, lr=6e-4, weight_decay=0.1),
        name="gpt2-small" if full else "gpt2-small-tiny",
    )


MODELS: dict[str, Callable[..., Workload]] = {"resnet50": resnet50, "vit-b": vit_b, "gpt2-small": gpt2_small}
