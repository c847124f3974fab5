"""Hypothesis strategies for whole random architectures: MLPs, CNNs, transformer blocks.

Each draws a model in eval mode (so BatchNorm uses running statistics and the
conversion is deterministic) together with an example input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    def __init__(self, widths, act, batchnorm, residual):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if batchnorm else nn.Identity() for b in widths[1:])
        self.act = ACTS[act]()
        self.residual = [residual and a == b for a, b in zip(widths[:-1], widths[1:])]

    def forward(self, x):
        for lin, norm, res in zip(self.layers, self.norms, self.residual):
            h = self.act(norm(lin(x)))
            x = x + h if res else h
        return x


class CNN(nn.Module):
    def __init__(self, channels, hidden, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 4)
        return self.fc2(F.gelu(self.fc1(x.flatten(1))))


class TransformerBlock(nn.Module):
    """Pre-norm block with the attention projections used functionally (F.linear)."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv_weight = nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        b, t, d = x.shape
        qkv = F.linear(self.norm1(x), self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.silu(self.fc1(self.norm2(x))))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


dims = st.sampled_from([96, 128, 160, 200, 256])


@st.composite
def mlps(draw):
    depth = draw(st.integers(1, 3))
    widths = [draw(dims) for _ in range(depth + 1)]
    model = MLP(widths, draw(st.sampled_from(sorted(ACTS))), draw(st.booleans()), draw(st.booleans()))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = _randomize_bn(model).eval()
    return model, (torch.randn(draw(st.integers(2, 6)), widths[0]),)


@st.composite
def cnns(draw):
    model = CNN(draw(st.sampled_from([8, 16])), draw(dims), draw(st.sampled_from([10, 130])))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return _randomize_bn(model).eval(), (torch.randn(draw(st.integers(2, 3)), 3, 12, 12),)


@st.composite
def transformer_blocks(draw):
    dim = draw(st.sampled_from([128, 192]))
    model = TransformerBlock(dim, draw(st.sampled_from([2, 4])), draw(st.sampled_from([256, 384])))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return model.eval(), (torch.randn(draw(st.integers(1, 2)), draw(st.integers(1, 9)), dim),)


architectures = st.one_of(mlps(), cnns(), transformer_blocks())
