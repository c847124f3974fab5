"""Factories for the CLI tests: ``sparsify convert tests/models/zoo.py:mlp -o out``.

Each factory's ``input_shape`` attribute is the input the CLI uses when no
``--input-shape`` is given.  The ``bad_*`` and ``slow_*`` factories exist to
test error handling and interruption.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


def mlp(hidden: int = 256, depth: int = 2) -> nn.Module:
    """Linear -> ReLU stacks, then a head."""
    layers: list[nn.Module] = [nn.Linear(128, hidden), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, 128))
    return nn.Sequential(*layers)


mlp.input_shape = (4, 128)


class SmallCNN(nn.Module):
    """Two convs and a classifier MLP: the convs stay dense, the Linears are rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def cnn() -> nn.Module:
    return SmallCNN()


cnn.input_shape = (2, 3, 16, 16)


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP with residuals; the projections are Linears."""

    def __init__(self, d: int = 128, heads: int = 4, ff: int = 512) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def transformer_block(d: int = 128, heads: int = 4, ff: int = 512) -> nn.Module:
    return TransformerBlock(d, heads, ff)


transformer_block.input_shape = (2, 8, 128)


class TiedHead(nn.Module):
    """An embedding and an output head sharing one weight (tied), plus a hidden Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(200, 128)
        self.hidden = nn.Linear(128, 128)
        self.head = nn.Linear(128, 200, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.emb(ids))))


def tied() -> nn.Module:
    return TiedHead()


tied.input_shape = "2,6:int64"  # token ids


def bad_raises() -> nn.Module:
    raise RuntimeError("the factory failed on purpose")


def bad_not_module() -> list:
    return [1, 2, 3]


def slow_mlp(seconds: float = 30.0, ready: str | None = None) -> nn.Module:
    """Takes ``seconds`` to build (to interrupt a convert while it runs); touches ``ready`` first."""
    if ready:
        open(ready, "w").close()
    time.sleep(seconds)
    return mlp()


slow_mlp.input_shape = (4, 128)
