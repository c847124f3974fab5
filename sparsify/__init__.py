"""sparsify: rewrite dense PyTorch models into block-sparse and factorized ones."""

__version__ = "0.1.0"

from . import runtime  # noqa: F401  (registers torch.ops.sparsify.*)
