"""The CUDA executor: runs bsmm / bsmm_dx / bsmm_dw on the NVRTC kernels.

Per call it checks the operands, picks a kernel (:mod:`.autotune`), and
launches it on the current stream.  What it has no kernel for (float64, block
sizes without an instantiation, e.g. 8 in half precision) runs on the CPU
reference executor's torch code on the same device, with one warning per case.

Per layout it keeps a schedule, cached on the ``row_offsets`` tensor until its
version changes: block rows sorted by block count, longest first, for the
forward and for the transposed (dX) walk, so uneven rows do not leave a tail
of idle SMs.

Example:
    >>> ex = CUDAExecutor(torch.device("cuda"))  # doctest: +SKIP
    >>> ex.name  # doctest: +SKIP
    'cuda'
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import torch

from ..executors.cpu import CPUExecutor
from . import kernels
from .autotune import Autotuner, autotune_enabled, m_bucket
from .launcher import KernelRuntime, check_operand, i32, ptr, vec_ok

__all__ = ["CUDAExecutor"]

_A_VEC, _V_VEC = 1, 2  # VecFlags in cuda_src/bsmm_dsd.cuh
_INDEX = (torch.int32,)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class _Plan:
    """Per-layout launch data, computed once per layout tensor."""

    order: torch.Tensor  # int32 [n_block_rows], longest row first
    t_order: torch.Tensor  # int32 [n_block_cols], for dX
    _key: str | None = field(default=None, repr=False)
    meta: object = field(default=None, repr=False)
    #: kernel choices made for this layout, by (op, math, block, M class, ..., autotune on)
    choices: dict = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        """Pattern hash (the autotuner's layout key); one device-to-host copy, once."""
        if self._key is None:
            h = hashlib.sha256()
            for t in (self.meta.row_offsets, self.meta.col_indices):
                h.update(t.detach().cpu().numpy().tobytes())
                h.update(b";")
            self._key = h.hexdigest()[:16]
        return self._key


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _longest_first(offsets: torch.Tensor) -> torch.Tensor:
    return torch.argsort(offsets.diff(), descending=True, stable=True).to(torch.int32)


def _plan(meta) -> _Plan:
    ro = meta.row_offsets
    tag = tuple((t._version, t.data_ptr()) for t in (ro, meta.col_indices, meta.t_row_offsets))
    cached = getattr(ro, "_sparsify_cuda_plan", None)
    if cached is not None and cached[0] == tag:
        return cached[1]
    plan = _Plan(_longest_first(ro), _longest_first(meta.t_row_offsets), meta=meta)
    try:
        ro._sparsify_cuda_plan = (tag, plan)
    except (AttributeError, RuntimeError):
        pass
    return plan


class CUDAExecutor:
    """Executor for one CUDA device; raises at construction when kernels cannot run there."""

    name = "cuda"

    def __init__(self, device: torch.device, runtime: KernelRuntime | None = None) -> None:
        # `runtime` is the seam below the executor: a GPU's KernelRuntime by default, or the CPU
        # emulator's (sparsify.runtime.emulator), which runs the same kernels on CPU tensors.
        self.runtime = runtime if runtime is not None else KernelRuntime.for_device(device)
        self.device = self.runtime.device
        self.device_name = self.runtime.device_name
        self.sm_count = self.runtime.sm_count
        self.tuner = Autotuner(self.device_name, timed=self.runtime.timed)
        self._cpu = CPUExecutor()
        self._warned: set[tuple] = set()
        #: op ("fwd" | "dx" | "dw") -> kernel name to run regardless of tuning (tests, benchmarks).
        self.forced: dict[str, str] = {}

    # ------------------------------------------------------------ helpers
    def _fallback(self, op: str, why: tuple) -> CPUExecutor:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(
                f"sparsify.{op}: no CUDA kernel for {why[0]} (dtype {why[1]}, block size {why[2]}); "
                "running the reference torch implementation on the GPU. Kernels exist for float16/"
                "bfloat16 with blocks 16/32/64 and float32 with blocks 8/16/32/64.",
                RuntimeWarning,
                stacklevel=4,
            )
        return self._cpu

    def _math(self, dtype: torch.dtype, block: int) -> str | None:
        math_ = kernels.math_for(dtype, torch.backends.cuda.matmul.allow_tf32)
        if math_ is None or block not in kernels.BLOCK_SIZES[math_]:
            return None
        return math_

    def _pick(self, op: str, math_: str, block: int, m: int, plan: _Plan, extra: str, run) -> kernels.KernelSpec:
        if self.forced and op in self.forced:
            return kernels.program_for(math_, block).kernel(self.forced[op])
        tuned = autotune_enabled()
        # A choice is fixed once made (tuned or heuristic), so later calls in the same class skip
        # the candidate lists, the key string and the tuner: host time is the op's time at small M.
        memo_key = (op, math_, block, m_bucket(m) if tuned else m, extra, tuned)
        hit = plan.choices.get(memo_key)
        if hit is not None:
            return hit
        heur = kernels.heuristic(op, math_, block, m)
        cands = kernels.candidates(op, math_, block, m)
        if len(cands) <= 1 or not tuned:
            spec = heur  # (and no layout hash, so no device-to-host copy)
        else:
            tune_key = f"{op}|m{m_bucket(m)}|{plan.key}|{extra}|{math_}|b{block}"
            spec = self.tuner.choose(tune_key, cands, run, heur)
            if spec is heur and not self.tuner.lookup(tune_key):
                return spec  # not tuned yet (e.g. under graph capture): ask again next time
        plan.choices[memo_key] = spec
        return spec

    def _check_meta(self, op: str, meta) -> None:
        for name in ("row_offsets", "col_indices", "row_indices", "t_row_offsets", "t_col_indices", "t_block_ids"):
            check_operand(op, name, getattr(meta, name), self.device, _INDEX)

    # -------------------------------------------------------------- DSD
    def _dsd(self, spec, a, values, offsets, cols, ids, order, bias, residual, y, m, k, n, act, out_dtype):
        n_rows = offsets.numel() - 1
        if spec.kind == "tiled":
            n_mtiles = _cdiv(m, spec.config.bm)
            grid = (n_mtiles * n_rows, 1, 1)
        else:
            n_mtiles = _cdiv(m, kernels.SMALL_ROWS)
            grid = (n_rows, n_mtiles, 1)
        flags = (_A_VEC if vec_ok(a) else 0) | (_V_VEC if vec_ok(values) else 0)
        codes = kernels.DTYPE_CODES
        args = (
            ptr(a), ptr(values), ptr(offsets), ptr(cols), ptr(ids), ptr(order), ptr(bias), ptr(residual), ptr(y),
            i32(m), i32(k), i32(n), i32(n_rows), i32(n_mtiles), i32(kernels.ACT_CODES[act]),
            i32(codes[bias.dtype] if bias is not None else 0),
            i32(codes[residual.dtype] if residual is not None else 0),
            i32(codes[out_dtype]), i32(flags),
        )
        self.runtime.launch(spec, grid, args)

    def forward(self, x, values, meta, bias, residual, activation, out_features, out_dtype=None, static_weight=False):
        m, k = x.shape
        block = values.shape[-1]
        out_dtype = out_dtype or x.dtype
        math_ = self._math(x.dtype, block)
        if math_ is None or out_dtype not in _FLOATS:
            return self._fallback("bsmm", ("forward", x.dtype, block, out_dtype)).forward(
                x, values, meta, bias, residual, activation, out_features, out_dtype, static_weight
            )
        op = "bsmm"
        check_operand(op, "x", x, self.device, (x.dtype,))
        check_operand(op, "values", values, self.device, (x.dtype,))
        check_operand(op, "bias", bias, self.device, _FLOATS, (out_features,))
        check_operand(op, "residual", residual, self.device, _FLOATS, (m, out_features))
        self._check_meta(op, meta)
        y = self.runtime.empty(m, out_features, dtype=out_dtype)
        if m == 0:
            return y
        plan = _plan(meta)

        def run(spec):
            self._dsd(spec, x, values, meta.row_offsets, meta.col_indices, None, plan.order,
                      bias, residual, y, m, k, out_features, activation, out_dtype)

        spec = self._pick("fwd", math_, block, m, plan, f"{out_features}x{k}", run)
        run(spec)
        return y

    def grad_input(self, dy, values, meta, in_features):
        m, n = dy.shape
        block = values.shape[-1]
        math_ = self._math(dy.dtype, block)
        if math_ is None or dy.dtype != values.dtype:
            return self._fallback("bsmm_dx", ("grad_input", dy.dtype, block)).grad_input(dy, values, meta, in_features)
        op = "bsmm_dx"
        check_operand(op, "dy", dy, self.device, (values.dtype,))
        check_operand(op, "values", values, self.device)
        self._check_meta(op, meta)
        dx = self.runtime.empty(m, in_features, dtype=dy.dtype)
        if m == 0:
            return dx
        plan = _plan(meta)

        def run(spec):
            self._dsd(spec, dy, values, meta.t_row_offsets, meta.t_col_indices, meta.t_block_ids, plan.t_order,
                      None, None, dx, m, n, in_features, "none", dy.dtype)

        spec = self._pick("dx", math_, block, m, plan, f"{n}x{in_features}", run)
        run(spec)
        return dx

    # -------------------------------------------------------------- SDD
    def _dw_splits(self, nnz: int, m: int, bkm: int) -> int:
        """Split M across thread blocks when the stored blocks alone cannot fill the GPU."""
        if nnz >= 2 * self.sm_count:
            return 1
        return max(1, min(_cdiv(2 * self.sm_count, nnz), m // (8 * bkm), 64))

    def _dw(self, spec, dy, x, meta, out, m, n, k, nnz):
        bkm = spec.config.bkm
        splits = self._dw_splits(nnz, m, bkm)
        rows_per_split = _cdiv(_cdiv(m, splits), bkm) * bkm  # whole stages per split
        splits = _cdiv(m, rows_per_split)
        ws = None
        if splits > 1:
            ws = self.runtime.empty(splits, nnz, spec.block, spec.block, dtype=torch.float32)
        flags = (_A_VEC if vec_ok(dy) else 0) | (_V_VEC if vec_ok(x) else 0)
        args = (
            ptr(dy), ptr(x), ptr(meta.row_indices), ptr(meta.col_indices), ptr(out), ptr(ws),
            i32(m), i32(n), i32(k), i32(nnz), i32(rows_per_split), i32(flags),
        )
        self.runtime.launch(spec, (nnz, splits, 1), args)
        if ws is not None:
            out.copy_(ws.sum(0))  # fixed order: deterministic, unlike atomics

    def grad_weight(self, dy, x, meta, block_size):
        m, n = dy.shape
        k = x.shape[1]
        nnz = meta.col_indices.numel()
        math_ = self._math(x.dtype, block_size)
        if math_ is None or dy.dtype != x.dtype:
            return self._fallback("bsmm_dw", ("grad_weight", x.dtype, block_size)).grad_weight(dy, x, meta, block_size)
        op = "bsmm_dw"
        check_operand(op, "dy", dy, self.device, (x.dtype,))
        check_operand(op, "x", x, self.device, (x.dtype,), (m, k))
        self._check_meta(op, meta)
        out = self.runtime.empty(nnz, block_size, block_size, dtype=x.dtype)
        if nnz == 0:
            return out
        if m == 0:
            return out.zero_()
        plan = _plan(meta)

        def run(spec):
            self._dw(spec, dy, x, meta, out, m, n, k, nnz)

        spec = self._pick("dw", math_, block_size, m, plan, f"{n}x{k}", run)
        run(spec)
        return out
