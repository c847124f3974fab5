"""sparsify: rewrite dense PyTorch models into block-sparse and factorized ones.

    >>> import torch, sparsify
    >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    >>> sparse = sparsify.sparsify(model, density=0.25, block_size=32)
    >>> dense_again = sparsify.densify(sparse)
"""

__version__ = "0.1.0"

from . import runtime  # noqa: F401, I001  (registers torch.ops.sparsify.*; first)
from . import dynamic, patterns  # noqa: F401  (training from scratch: sparsify.patterns, sparsify.dynamic)
from .api import densify, report, sparsify
from .config import Rule, SparsifyConfig
from .decision import Decision, Plan
from .calibration import CalibrationWarning
from .errors import ConversionCheckError, InputError
from .finetune import finetune
from .hf_save import SavePretrainedWarning
from .io import load, save
from .methods import METHODS
from .modules import (
    BlockSparseConv1d,
    BlockSparseConv2d,
    BlockSparseLinear,
    BlockSparseLSTM,
    CPConv,
    CPLinear,
    LowRankLinear,
    TTConv,
    TTLinear,
    TuckerConv,
    TuckerLinear,
)
from .report import Report
from .runtime import BlockSparseLayout

__all__ = [
    "METHODS",
    "BlockSparseLayout",
    "BlockSparseConv1d",
    "BlockSparseConv2d",
    "BlockSparseLinear",
    "BlockSparseLSTM",
    "CalibrationWarning",
    "CPConv",
    "CPLinear",
    "ConversionCheckError",
    "Decision",
    "InputError",
    "LowRankLinear",
    "Plan",
    "Report",
    "Rule",
    "SavePretrainedWarning",
    "TTConv",
    "TTLinear",
    "TuckerConv",
    "TuckerLinear",
    "SparsifyConfig",
    "densify",
    "finetune",
    "load",
    "report",
    "save",
    "sparsify",
]
