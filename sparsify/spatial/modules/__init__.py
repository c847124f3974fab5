"""Building blocks with MinkowskiEngine's names (``MinkowskiEngine.modules``)."""

from . import resnet_block  # noqa: F401
from .resnet_block import BasicBlock, Bottleneck

__all__ = ["BasicBlock", "Bottleneck", "resnet_block"]
