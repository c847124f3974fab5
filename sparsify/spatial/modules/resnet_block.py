"""Residual blocks of sparse convolutions (``MinkowskiEngine.modules.resnet_block``).

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> x = ME.SparseTensor(torch.randn(4, 8), torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 5, 5]], dtype=torch.int32))
    >>> tuple(BasicBlock(8, 8, dimension=2)(x).F.shape)
    (4, 8)
"""

from __future__ import annotations

from torch import nn

from ..conv import MinkowskiConvolution
from ..nonlinearity import MinkowskiReLU
from ..norm import MinkowskiBatchNorm

__all__ = ["BasicBlock", "Bottleneck"]


class BasicBlock(nn.Module):
    """conv3 - BN - ReLU - conv3 - BN, plus the (optionally downsampled) input, then ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, bn_momentum: float = 0.1, dimension: int = -1) -> None:
        super().__init__()
        if dimension <= 0:
            raise ValueError(f"BasicBlock: dimension must be a positive int. Got {dimension}.")
        self.conv1 = MinkowskiConvolution(inplanes, planes, kernel_size=3, stride=stride, dilation=dilation, dimension=dimension)
        self.norm1 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.conv2 = MinkowskiConvolution(planes, planes, kernel_size=3, stride=1, dilation=dilation, dimension=dimension)
        self.norm2 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.relu = MinkowskiReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """conv1 - conv3 - conv1 (x4 channels) with BN and ReLU, plus the input, then ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, bn_momentum: float = 0.1, dimension: int = -1) -> None:
        super().__init__()
        if dimension <= 0:
            raise ValueError(f"Bottleneck: dimension must be a positive int. Got {dimension}.")
        self.conv1 = MinkowskiConvolution(inplanes, planes, kernel_size=1, dimension=dimension)
        self.norm1 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.conv2 = MinkowskiConvolution(planes, planes, kernel_size=3, stride=stride, dilation=dilation, dimension=dimension)
        self.norm2 = MinkowskiBatchNorm(planes, momentum=bn_momentum)
        self.conv3 = MinkowskiConvolution(planes, planes * self.expansion, kernel_size=1, dimension=dimension)
        self.norm3 = MinkowskiBatchNorm(planes * self.expansion, momentum=bn_momentum)
        self.relu = MinkowskiReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)
