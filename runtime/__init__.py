"""The runtime: layouts, ops and executors.  It knows nothing of passes or the API.

Importing it registers ``torch.ops.sparsify.*``.  It never fails for lack of
CUDA: without a driver the CPU (reference) executor runs everything.
"""

from .cuda import register as _register_cuda
from .executors import executor_for, register_executor
from .layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout
from .ops import ACTIVATIONS, bsmm, bsmm_dw, bsmm_dx

_register_cuda()  # a factory only: cuda-python is imported on first use of a CUDA tensor

from .emulator.device import register as _register_emulator  # noqa: E402

_register_emulator()  # SPARSIFY_EMULATE_CUDA=1: CPU tensors run the CUDA kernels on the CPU emulator

from . import ops_conv, ops_lstm  # noqa: E402,F401  (registers bsconv2d* and bslstm_recurrence*)

__all__ = [
    "ACTIVATIONS",
    "BlockSparseLayout",
    "SUPPORTED_BLOCK_SIZES",
    "bsmm",
    "bsmm_dw",
    "bsmm_dx",
    "executor_for",
    "register_executor",
]
