"""Graph passes.  The pipeline, in order, is ``PIPELINE``; each pass is one file.

    plan_layers         config rules -> one Decision per candidate layer
    annotate_shapes     shapes and dense costs from the example inputs
    fold_batchnorm      eval-mode BatchNorm into the Linear / Conv before it
    allocate_ranks      planning that needs weights and shapes: concrete ranks for the
                        factorizations (per layer, or a global compression= target)
                        and the forward each runs (factorized / reconstructed)
    block_sparsify_layers  block_sparse on Conv1d / Conv2d and nn.LSTM, and the from-scratch
                        patterns (layout=..., init='fresh') on Linear (not calibrated: they
                        run first, so the calibrated layers after them see their outputs)
    calibrate           with calibration data: every planned layer converted in forward
                        order from the statistics of the inputs it gets (saliency +
                        least-squares refit, whitened SVD, factors refit to the outputs)
    block_sparsify      Linear / F.linear -> BlockSparseLinear
    factorize_low_rank  Linear / F.linear -> LowRankLinear
    factorize_cp        Linear / Conv1d / Conv2d -> CPLinear / CPConv
    factorize_tucker    Linear / Conv1d / Conv2d -> TuckerLinear / TuckerConv (Tucker-2)
    factorize_tt        Linear / F.linear -> TTLinear (TT-matrix); Conv1d / Conv2d -> TTConv
    fuse_epilogues      activation and residual add into the block-sparse op
    check_lowered       every planned rewrite produced a runtime module

Capture (``capture.capture``) runs before the pipeline: it decides between a
graph and the module-tree fallback.
"""

from .allocate_ranks import allocate_ranks
from .annotate_shapes import annotate_shapes
from .block_sparsify import block_sparsify
from .block_sparsify_layers import block_sparsify_layers
from .calibrate import calibrate
from .capture import CaptureWarning, capture
from .check_lowered import check_lowered
from .factorize_cp import factorize_cp
from .factorize_low_rank import factorize_low_rank
from .factorize_tt import factorize_tt
from .factorize_tucker import factorize_tucker
from .fold_batchnorm import fold_batchnorm
from .fuse_epilogues import fuse_epilogues
from .infra import PassContext, PassError, PassResult, run_passes
from .plan_layers import plan_layers

PIPELINE = [
    plan_layers,
    annotate_shapes,
    fold_batchnorm,
    allocate_ranks,
    block_sparsify_layers,
    calibrate,
    block_sparsify,
    factorize_low_rank,
    factorize_cp,
    factorize_tucker,
    factorize_tt,
    fuse_epilogues,
    check_lowered,
]

__all__ = [
    "PIPELINE",
    "CaptureWarning",
    "PassContext",
    "PassError",
    "PassResult",
    "capture",
    "run_passes",
] + [p.__name__ for p in PIPELINE]
