"""The CPU executor: the reference implementation of the block-sparse ops.

It is written with plain torch ops, so it also runs on devices that have no
kernel executor.  For each call :func:`choose_path` (a static cost model
fitted to ``python -m sparsify.bench bsmm --paths``; docs/benchmarks.md)
picks one of three paths:

* ``dense``  - multiply by the materialized weight.  When the caller passes
  ``static_weight=True`` (modules do in eval mode) and grad is off, the
  materialized weight is cached on the ``values`` tensor itself, keyed by its
  version counter, so inference pays for it once.  Otherwise it is rebuilt on
  every call: writes through ``.data`` (gradcheck, old pruning code) bypass the
  version counter.  ``clear_dense_cache(values)`` drops cached forms.
* ``bsr``    - torch's BSR sparse x dense matmul (MKL-backed on CPU), as
  ``bsr @ x.T``.  With ``static_weight`` the BSR tensor is cached too; it
  shares the storage of ``values``, so it never goes stale.
* ``gather`` - gather the input blocks each stored block needs and run one
  batched matmul over the stored blocks (best for a few rows of input).

``SPARSIFY_CPU_PATH=dense|bsr|gather`` forces one path (used by the tests to
prove each path correct).  No path is a Python loop over blocks.

The cost model is static, not a measurement at run time: timings on a shared
CPU swing by 5-10x with other processes' load (OpenMP threads descheduled),
so an autotuner run at the first call would bake that noise into the model.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..layout import gather_blocks, scatter_blocks

__all__ = ["CPUExecutor", "activate", "apply_epilogue", "choose_path", "dw_path", "rebuilt_path", "clear_dense_cache", "dense_weight", "fsdp2_in_use",
           "ACTIVATIONS", "PATHS"]

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")

PATHS = ("dense", "bsr", "gather")
#: Rows of x per MKL BSR call (more rows are split into calls of this many; see _bsr_matmul).
BSR_CHUNK_ROWS = 256

# The cost model, fitted to `python -m sparsify.bench bsmm --paths` on CPUs
# (docs/benchmarks.md has the figures).  Rows are rows of input (tokens).
#
# * A few rows make a matrix-vector product, bound by reading the weight: the
#   gathered batched matmul reads only the stored blocks and beats torch's BSR
#   (MKL) and the dense matmul below GATHER_FEW_ROWS_DENSITY.  Up to
#   GATHER_MAX_ROWS rows it still beats them at low density.
# * With more rows torch's BSR matmul wins below a density that falls as the
#   rows grow (MKL's BSR kernel runs at a fraction of the dense GEMM's FLOP
#   rate, and the dense GEMM reaches its peak only with many rows).
# * Everything else, and every dtype torch's CPU BSR does not take, is dense.
GATHER_FEW_ROWS = 16
GATHER_FEW_ROWS_DENSITY = 0.4
GATHER_MAX_ROWS = 128
GATHER_MAX_DENSITY = 0.075
# ... for large weights, up to GATHER_MAX_ROWS rows: below this density the gathered matmul
# beat MKL's BSR at 2 threads (K = N = 4096, density 0.1: 5.6 vs 7.3 ms at 64 rows, 11.6 vs
# 12.0 at 128); at 1 thread BSR was 4-13% faster there (docs/benchmarks.md).
GATHER_MAX_ROWS_DENSITY = 0.15
BSR_FEW_ROWS = 256
BSR_MAX_DENSITY_FEW_ROWS = 0.3
BSR_MAX_DENSITY = 0.175
# Small weights (at most SMALL_WEIGHT elements: the projections of BERT / GPT-2-sized models,
# 768-3072 wide) behave differently: torch's BSR kernel rarely beats the dense GEMM there,
# while the gathered batched matmul does at low density for any number of rows.  Fitted to
# 1- and 2-thread grids over 768x2304, 768x3072, 3072x768 (2.4M elements) against 4096x4096
# (16.8M, the rules above); sizes in between were not measured (docs/benchmarks.md).
SMALL_WEIGHT = 4 << 20
SMALL_GATHER_ROWS = 256
SMALL_GATHER_DENSITY = 0.175
SMALL_GATHER_FEW_ROWS = 64
SMALL_GATHER_FEW_ROWS_DENSITY = 0.3
# dW (the stored blocks' gradient) is one dense product ``dy.T @ x`` with its stored blocks picked
# out, unless the gathered batched matmul (one small ``[b, M] @ [M, b]`` product per stored block)
# is cheaper: always for a few rows, and below DW_GATHER_DENSITY otherwise.  Fitted 2026-12-01 at
# 1 and 2 threads on 4096x4096 / block 32 (M = 1, 64, 1024) and MiniLM's 384x1536 / 1536x384 /
# block 16 (M = 336, 2048): with many rows the batched matmul runs at about a seventh of the dense
# GEMM's rate (4096^2, M = 1024: 87 ms at density 0.1 against 131 dense, 204 at 0.25 against 135);
# with 64 rows or fewer it wins up to density 0.5 (30 against 37 ms).  docs/benchmarks.md.
DW_GATHER_FEW_ROWS = 64
DW_GATHER_DENSITY_FEW_ROWS = 0.6
DW_GATHER_DENSITY = 0.15
# Train mode (or grad on): nothing is cached, so the dense path rebuilds the weight from its
# blocks on every forward and dX call.  For a large weight that costs more than the GEMM at few
# rows: a fresh 64 MiB buffer alone takes ~30 ms to fault in (4096 x 4096; the GEMM at 64 rows
# takes 20).  ``rebuilt_path`` then moves large weights off the dense path, where measured
# (2026-12-01, 4096 x 4096 / block 32, M = 1..1024, density 0.25-0.6, 1 and 2 threads;
# docs/benchmarks.md): the gathered matmul up to REBUILT_GATHER_ROWS rows, torch's BSR below the
# densities below for the forward, and for dX only with many rows (its BSR runs on transposed
# blocks and lost at 64-256 rows).
REBUILT_GATHER_ROWS = 16
REBUILT_GATHER_DENSITY = 0.65
REBUILT_BSR_FEW_ROWS = 64
REBUILT_BSR_DENSITY_FEW_ROWS = 0.65  # forward, up to REBUILT_BSR_FEW_ROWS rows
REBUILT_BSR_DENSITY_MID_ROWS = 0.55  # forward, up to BSR_FEW_ROWS rows
REBUILT_BSR_DENSITY = 0.3  # forward, more rows (at 0.35 / 1024 rows BSR won at 1 thread, lost at 2)
REBUILT_DX_BSR_DENSITY = 0.3  # dX, more than BSR_FEW_ROWS rows
# torch's CPU BSR matmul supports these dtypes (MKL; bf16 and fp16 raise).
_BSR_DTYPES = (torch.float32, torch.float64)
# Upper bound on the temporaries of the gather paths (bytes).
_GATHER_BYTES = 64 << 20
# ... of the gathered dW, whose two temporaries are read once each: 4 MiB chunks stay in cache
# (4096^2, M = 1024, density 0.25: 204 ms against 673 with 64 MiB chunks; 1 MiB: 238).
_DW_GATHER_BYTES = 4 << 20

# torch warns on every BSR construction that the format is in beta; we use it
# deliberately and test it, so the warning says nothing to our users.
warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta state", category=UserWarning)


def activate(y: torch.Tensor, activation: str, inplace: bool = False) -> torch.Tensor:
    """``activation`` (one of ``ACTIVATIONS``) applied to ``y``; ReLU in place with ``inplace=True``
    (the composite forms under ``torch.func`` need every op out of place)."""
    if activation == "relu":
        return y.relu_() if inplace else F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    if activation != "none":
        raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    return y


def apply_epilogue(y: torch.Tensor, bias, residual, activation: str) -> torch.Tensor:
    """``act(y + bias) + residual``, in place on ``y`` where that is safe."""
    if bias is not None:
        y = y.add_(bias)
    y = activate(y, activation, inplace=True)
    if residual is not None:
        y = y.add_(residual)
    return y


def _density(meta, n_block_rows: int, n_block_cols: int) -> float:
    return meta.col_indices.numel() / max(1, n_block_rows * n_block_cols)


def choose_path(rows: int, density: float, dtype: torch.dtype, weight_elems: int | None = None) -> str:
    """The cost model: the fastest path for ``rows`` rows of input at block ``density``
    (``weight_elems``: the dense weight's element count, where the caller knows it).

    ``SPARSIFY_CPU_PATH=dense|bsr|gather`` overrides it (``bsr`` falls back to
    ``dense`` for dtypes torch's CPU BSR matmul does not take).

    Example:
        >>> choose_path(1024, 0.5, torch.float32)
        'dense'
        >>> choose_path(1024, 0.05, torch.float32)
        'bsr'
        >>> choose_path(1024, 0.05, torch.bfloat16)  # no CPU BSR for bf16
        'dense'
        >>> choose_path(1024, 0.1, torch.float32, weight_elems=768 * 3072)  # a small weight
        'dense'
        >>> choose_path(128, 0.1, torch.float32, weight_elems=768 * 3072)
        'gather'
    """
    bsr_ok = dtype in _BSR_DTYPES
    forced = os.environ.get("SPARSIFY_CPU_PATH")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"SPARSIFY_CPU_PATH={forced!r}: expected one of {PATHS}.")
        return "dense" if forced == "bsr" and not bsr_ok else forced
    if rows <= GATHER_FEW_ROWS and density < GATHER_FEW_ROWS_DENSITY:
        return "gather"
    if weight_elems is not None and weight_elems <= SMALL_WEIGHT:
        if (density < GATHER_MAX_DENSITY or (rows <= SMALL_GATHER_ROWS and density < SMALL_GATHER_DENSITY)
                or (rows <= SMALL_GATHER_FEW_ROWS and density < SMALL_GATHER_FEW_ROWS_DENSITY)):
            return "gather"
        return "dense"
    if rows <= GATHER_MAX_ROWS and density < GATHER_MAX_ROWS_DENSITY:
        return "gather"
    if not bsr_ok:
        return "dense"
    limit = BSR_MAX_DENSITY_FEW_ROWS if rows <= BSR_FEW_ROWS else BSR_MAX_DENSITY
    return "bsr" if density < limit else "dense"


def rebuilt_path(path: str, rows: int, density: float, dtype: torch.dtype, weight_elems: int, product: str) -> str:
    """``path`` (``choose_path``'s choice) revised for a call whose dense path would rebuild the
    weight from its blocks (nothing cached: train mode or grad on); ``product`` is ``"forward"``
    or ``"grad_input"``.  Only large weights (above SMALL_WEIGHT elements) change; a forced
    ``SPARSIFY_CPU_PATH`` never does.

    Example:
        >>> rebuilt_path("dense", 1, 0.5, torch.float32, 4096 * 4096, "forward")
        'gather'
        >>> rebuilt_path("dense", 64, 0.5, torch.float32, 4096 * 4096, "forward")
        'bsr'
        >>> rebuilt_path("dense", 64, 0.5, torch.float32, 4096 * 4096, "grad_input")
        'dense'
        >>> rebuilt_path("dense", 64, 0.5, torch.float32, 768 * 3072, "forward")  # a small weight
        'dense'
    """
    if product not in ("forward", "grad_input"):
        raise ValueError(f"rebuilt_path: product={product!r}: expected 'forward' or 'grad_input'.")
    if path != "dense" or weight_elems <= SMALL_WEIGHT or os.environ.get("SPARSIFY_CPU_PATH"):
        return path
    if rows <= REBUILT_GATHER_ROWS and density < REBUILT_GATHER_DENSITY:
        return "gather"
    if dtype not in _BSR_DTYPES:
        return path
    if product == "forward":
        limit = (REBUILT_BSR_DENSITY_FEW_ROWS if rows <= REBUILT_BSR_FEW_ROWS
                 else REBUILT_BSR_DENSITY_MID_ROWS if rows <= BSR_FEW_ROWS else REBUILT_BSR_DENSITY)
    else:
        limit = REBUILT_DX_BSR_DENSITY if rows > BSR_FEW_ROWS else 0.0
    return "bsr" if density < limit else path


def dw_path(rows: int, density: float) -> str:
    """How ``grad_weight`` computes dW for ``rows`` rows at block ``density``: ``"dense"`` (one
    dense product, stored blocks picked out) or ``"gather"`` (a batched matmul over the stored
    blocks).  ``SPARSIFY_CPU_PATH=dense`` forces the first, ``bsr`` / ``gather`` the second.

    Example:
        >>> dw_path(1024, 0.25), dw_path(1024, 0.1), dw_path(64, 0.5)
        ('dense', 'gather', 'gather')
    """
    forced = os.environ.get("SPARSIFY_CPU_PATH")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"SPARSIFY_CPU_PATH={forced!r}: expected one of {PATHS}.")
        return "dense" if forced == "dense" else "gather"
    limit = DW_GATHER_DENSITY_FEW_ROWS if rows <= DW_GATHER_FEW_ROWS else DW_GATHER_DENSITY
    return "gather" if density < limit else "dense"


# ------------------------------------------------- forms derived from weights
_STEPS = [0]


def _optimizer_stepped(*_args, **_kwargs) -> None:
    _STEPS[0] += 1


# A fused optimizer (AdamW(fused=True), HF Trainer's default) writes parameters in place without
# bumping their version counters, so (version, data_ptr) cannot see its steps: every optimizer
# step, of any optimizer, is counted here and is part of every cache key.
register_optimizer_step_post_hook(_optimizer_stepped)


def optimizer_steps() -> int:
    """How many optimizer steps (any optimizer) this process has taken: part of every cache key of a form
    derived from weights, since fused optimizers update parameters without bumping their versions.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2)); before = optimizer_steps()
        >>> p.grad = torch.ones(2); torch.optim.SGD([p], lr=0.1).step(); optimizer_steps() - before
        1
    """
    return _STEPS[0]


def fsdp2_in_use() -> bool:
    """Whether FSDP2 (``fully_shard``) manages modules in this process: then no weight form is cached.

    FSDP2 frees an unsharded parameter's storage after each forward and refills it
    before the next under ``torch.autograd._unsafe_preserve_version_counter``, and
    the allocator may hand back the same address, so a key of (version, data_ptr)
    cannot tell the weights of the next step from those of the last: an eval pass
    after an optimizer step could read a stale dense weight.  The reshard after
    every forward would discard a cached form anyway.  The check reads
    ``sys.modules`` only (never imports FSDP) and says yes if torch's layout of
    that module changes.

    Example:
        >>> isinstance(fsdp2_in_use(), bool)
        True
    """
    mod = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")
    return mod is not None and bool(getattr(mod, "cls_to_fsdp_cls", True))


def _cacheable(values: torch.Tensor, static: bool) -> bool:
    # (a jit trace would record a cached form as a constant of its graph, stale after a weight update)
    return (
        static
        and not fsdp2_in_use()
        and not torch.is_grad_enabled()
        and not torch._C._is_tracing()  # torch.jit.is_tracing() without its wrapper
        and not torch._C._are_functorch_transforms_active()
        and not isinstance(values, torch._subclasses.FakeTensor)
    )


def _cached(values: torch.Tensor, meta, what: str, shape, build):
    """``build()``, cached on ``values`` under ``what`` until ``values`` or the layout changes.

    The key holds the version counter (bumped by every in-place op outside
    ``.data``), the process's optimizer step count (fused optimizers bump no
    version: :func:`optimizer_steps`) and the storage of the values and of the layout."""
    key = (values._version, optimizer_steps(), values.data_ptr(), meta.col_indices.data_ptr(),
           meta.row_offsets.data_ptr(), shape)
    store = getattr(values, "_sparsify_cache", None)
    if store is not None:
        hit = store.get(what)
        if hit is not None and hit[0] == key:
            return hit[1]
    form = build()
    try:
        if store is None:
            store = values._sparsify_cache = {}
        store[what] = (key, form)
    except (AttributeError, RuntimeError):
        pass
    return form


def _materialize(values: torch.Tensor, meta, shape: tuple[int, int]) -> torch.Tensor:
    nbc = -(-shape[1] // values.shape[-1])
    return scatter_blocks(values, meta.row_indices, meta.col_indices, nbc, meta.row_offsets.numel() - 1, shape)


def dense_weight(values: torch.Tensor, meta, shape: tuple[int, int], static: bool = False) -> torch.Tensor:
    """The materialized ``shape`` weight; cached on ``values`` until it changes if ``static``.

    The cache is used only with grad off (inference): writes through ``.data``
    (gradcheck, old pruning code) bypass the version counter, and a cached
    tensor must never enter an autograd graph."""
    if not _cacheable(values, static):
        return _materialize(values, meta, shape)
    v = values.detach()
    return _cached(values, meta, "dense", shape, lambda: _materialize(v, meta, shape).contiguous())


def clear_dense_cache(values: torch.Tensor) -> None:
    """Drop every cached form of ``values`` (after writes through ``.data``)."""
    for attr in ("_sparsify_cache", "_sparsify_dense"):
        if hasattr(values, attr):
            delattr(values, attr)


def _pad_cols(x: torch.Tensor, cols: int) -> torch.Tensor:
    return x if x.shape[1] == cols else F.pad(x, (0, cols - x.shape[1]))


def _bsr_tensor(values, row_offsets, col_indices, cols: int) -> torch.Tensor:
    nnz, b, _ = values.shape
    nbr = row_offsets.numel() - 1
    return torch.sparse_bsr_tensor(row_offsets, col_indices, values.contiguous(), size=(nbr * b, cols),
                                   check_invariants=False)


def _bsr_matmul(values, row_offsets, col_indices, x, out_rows: int, w=None) -> torch.Tensor:
    """``x @ W.T`` as ``[M, out_rows]`` with W given as BSR (padded shape); ``w`` a prebuilt BSR ``W``.

    ``bsr @ x.T`` (MKL's BSR x dense product on the strided view) measured
    faster than ``torch.sparse.mm`` and than ``bsr @ x.T.contiguous()`` and
    ``F.linear(x, bsr)`` does not run under inference mode (docs/benchmarks.md)."""
    if w is None:
        w = _bsr_tensor(values, row_offsets, col_indices, x.shape[1])
    m = x.shape[0]
    if m <= BSR_CHUNK_ROWS:
        return (w @ x.T).T[:, :out_rows]
    # MKL's BSR product slows down sharply once x.T has more than a few hundred columns (it no
    # longer stays in cache): at K = N = 4096, density 0.1, M = 1024 it took 98 ms in one call
    # and 48 ms in four calls of 256 rows, each copied into its rows of a row-major result,
    # so the result is contiguous too (docs/benchmarks.md).
    y = x.new_empty(m, out_rows)
    for start in range(0, m, BSR_CHUNK_ROWS):
        rows = slice(start, start + BSR_CHUNK_ROWS)
        y[rows] = (w @ x[rows].T).T[:, :out_rows]
    return y


def _gather_matmul(values, row_indices, col_indices, x, n_block_rows: int, out_rows: int) -> torch.Tensor:
    """``x @ W.T`` by a batched matmul over the stored blocks, chunked to bound memory."""
    m, kp = x.shape
    nnz, b, _ = values.shape
    xb = x.view(m, kp // b, b)
    out = x.new_zeros(n_block_rows, m, b)
    chunk = max(1, _GATHER_BYTES // max(1, m * b * x.element_size() * 2))
    for start in range(0, nnz, chunk):  # chunks of blocks, not single blocks
        sl = slice(start, start + chunk)
        xg = xb.index_select(1, col_indices[sl]).transpose(0, 1)  # [k, M, b]
        part = torch.bmm(xg, values[sl].transpose(1, 2))  # [k, M, b]
        out.index_add_(0, row_indices[sl], part)
    return out.permute(1, 0, 2).reshape(m, n_block_rows * b)[:, :out_rows]


class CPUExecutor:
    """Reference executor in plain torch; see the module docstring for its paths."""

    name = "cpu"

    def forward(self, x, values, meta, bias, residual, activation, out_features, out_dtype=None, static_weight=False):
        m, k = x.shape
        nnz, b, _ = values.shape
        nbr = meta.row_offsets.numel() - 1
        nbc = -(-k // b)
        density = _density(meta, nbr, nbc)
        path = choose_path(m, density, x.dtype, out_features * k)
        if x.device.type == "cpu" and not _cacheable(values, static_weight):  # fitted on CPUs only
            path = rebuilt_path(path, m, density, x.dtype, out_features * k, "forward")
        if path == "dense":
            wt = dense_weight(values, meta, (out_features, k), static_weight).T
            if bias is not None and bias.dtype == x.dtype:
                # one pass over the output, as nn.Linear's addmm (a separate add re-reads it)
                y, bias = torch.addmm(bias, x, wt), None
            else:
                y = x @ wt
        elif path == "bsr":
            w = None
            if _cacheable(values, static_weight):
                v = values.detach()
                w = _cached(values, meta, "bsr", (out_features, k),
                            lambda: _bsr_tensor(v, meta.row_offsets, meta.col_indices, nbc * b))
            y = _bsr_matmul(values, meta.row_offsets, meta.col_indices, _pad_cols(x, nbc * b), out_features, w)
        else:
            y = _gather_matmul(
                values, meta.row_indices.long(), meta.col_indices.long(), _pad_cols(x, nbc * b), nbr, out_features
            )
        # Any strides: the bsr path's natural result is a transposed view, and copying it
        # to row-major costs up to 10% of the product. The op makes its output contiguous.
        y = apply_epilogue(y, bias, residual, activation)
        return y if out_dtype is None else y.to(out_dtype)

    def grad_input(self, dy, values, meta, in_features):
        m, n = dy.shape
        nnz, b, _ = values.shape
        nbr = meta.row_offsets.numel() - 1
        nbc = meta.t_row_offsets.numel() - 1
        density = _density(meta, nbr, nbc)
        path = choose_path(m, density, dy.dtype)
        if dy.device.type == "cpu":  # fitted on CPUs only
            path = rebuilt_path(path, m, density, dy.dtype, n * in_features, "grad_input")
        if path == "dense":
            return dy @ dense_weight(values, meta, (n, in_features))
        t_ids = meta.t_block_ids.long()
        t_values = values.index_select(0, t_ids).transpose(1, 2)
        dyp = _pad_cols(dy, nbr * b)
        if path == "bsr":
            dx = _bsr_matmul(t_values, meta.t_row_offsets, meta.t_col_indices, dyp, in_features)
        else:
            t_rows = torch.repeat_interleave(
                torch.arange(nbc, device=dy.device), meta.t_row_offsets.diff().long()
            )
            dx = _gather_matmul(t_values, t_rows, meta.t_col_indices.long(), dyp, nbc, in_features)
        return dx.contiguous()

    def grad_weight(self, dy, x, meta, block_size):
        """dW for the stored blocks only: ``dW[k] = dy[:, rows of k].T @ x[:, cols of k]``."""
        m, n = dy.shape
        k = x.shape[1]
        b = block_size
        nbr = meta.row_offsets.numel() - 1
        nbc = -(-k // b)
        rows, cols = meta.row_indices.long(), meta.col_indices.long()
        nnz = cols.numel()
        dyp = _pad_cols(dy, nbr * b).view(m, nbr, b)
        xp = _pad_cols(x, nbc * b).view(m, nbc, b)
        if dw_path(m, _density(meta, nbr, nbc)) == "dense":
            return gather_blocks(dyp.reshape(m, -1).T @ xp.reshape(m, -1), rows, cols, b)
        out = x.new_empty(nnz, b, b)
        chunk = max(1, _DW_GATHER_BYTES // max(1, 2 * m * b * x.element_size()))
        for start in range(0, nnz, chunk):  # chunks of blocks, not single blocks
            sl = slice(start, start + chunk)
            g = dyp.index_select(1, rows[sl]).permute(1, 2, 0)  # [k, b, M]
            h = xp.index_select(1, cols[sl]).transpose(0, 1)  # [k, M, b]
            torch.bmm(g, h, out=out[sl])
        return out
