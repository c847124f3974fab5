"""Layer modules: they hold parameters and call runtime ops.  Each has
``from_dense(...)`` and ``to_dense()`` (the exact dense weight it represents)
and ``to_dense_module()`` (an equivalent plain torch layer, which ``densify``
uses) and ``flops(input_shape)``."""

from .block_sparse import BlockSparseLinear
from .block_sparse_conv import BlockSparseConv1d, BlockSparseConv2d
from .block_sparse_lstm import BlockSparseLSTM
from .factorized_conv import CPConv, TTConv, TuckerConv
from .factorized_linear import CPLinear, TTLinear, TuckerLinear
from .low_rank import LowRankLinear, svd_rank

__all__ = ["BlockSparseConv1d", "BlockSparseConv2d", "BlockSparseLSTM", "BlockSparseLinear", "CPConv", "CPLinear", "LowRankLinear", "TTConv", "TTLinear", "TuckerConv", "TuckerLinear",
           "svd_rank"]
