"""The one list of kernel instantiations: every (kernel, math, block size, tile configuration).

A *program* (one NVRTC compile, one cubin) holds every kernel of one math path
and block size; its source is ``#include "bsmm.cuh"`` plus one macro line per
kernel (see ``cuda_src/bsmm.cuh``).  Kernels are ``extern "C"`` and named after
their configuration, so a name says everything about a kernel.

Math paths: ``f16`` and ``bf16`` run on tensor cores (mma.sync m16n8k16, fp32
accumulation); ``tf32`` is float32 on tensor cores (m16n8k8), used when
``torch.backends.cuda.matmul.allow_tf32`` is set; ``f32`` is float32 on FFMA.

Example:
    >>> spec = program_for("f16", 32)
    >>> [k.name for k in spec.kernels if k.op == "fwd"][:1]
    ['bsmm_fwd_tiled_f16_b32_m64k32w4x1s3']
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import torch

__all__ = [
    "ACT_CODES",
    "BLOCK_SIZES",
    "DTYPE_CODES",
    "MATHS",
    "KernelSpec",
    "ProgramSpec",
    "SMEM_LIMIT",
    "candidates",
    "heuristic",
    "math_for",
    "program_for",
    "programs",
]

#: Codes shared with ``cuda_src/bsmm_common.cuh`` (DTypeCode, ActCode).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

#: math path -> (C++ tag, element dtype, element bytes)
MATHS = {
    "f16": ("MathF16", torch.float16, 2),
    "bf16": ("MathBF16", torch.bfloat16, 2),
    "tf32": ("MathTF32", torch.float32, 4),
    "f32": ("MathFFMA", torch.float32, 4),
}
#: Block sizes with kernels, per math path (8 only in float32).
BLOCK_SIZES = {"f16": (16, 32, 64), "bf16": (16, 32, 64), "tf32": (8, 16, 32, 64), "f32": (8, 16, 32, 64)}
#: Static shared memory per thread block (no opt-in attribute needed at launch).
SMEM_LIMIT = 48 * 1024
#: Rows of A per thread block in the small-M kernel.
SMALL_ROWS = 16


@dataclass(frozen=True)
class Tiled:
    """DSD tile: BM rows of A, BK of the block per stage, a warp grid, pipeline depth."""

    bm: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def tag(self) -> str:
        return f"m{self.bm}k{self.bk}w{self.warps_m}x{self.warps_n}s{self.stages}"


@dataclass(frozen=True)
class Small:
    """Small-M DSD: 16 rows, warps split the row's blocks, BK of a block per stage."""

    bk: int
    warps: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def tag(self) -> str:
        return f"k{self.bk}w{self.warps}s{self.stages}"


@dataclass(frozen=True)
class Dw:
    """SDD dW: BKM rows of M per stage, warps WI x WJ over the block, WK over M."""

    bkm: int
    wi: int
    wj: int
    wk: int
    stages: int

    @property
    def threads(self) -> int:
        return 32 * self.wi * self.wj * self.wk

    def tag(self) -> str:
        return f"k{self.bkm}w{self.wi}x{self.wj}x{self.wk}s{self.stages}"


# (math family, block) -> configurations.  Family "16" is f16/bf16, "32" is tf32/f32.
_TILED = {
    ("16", 16): (Tiled(64, 16, 4, 1, 4), Tiled(128, 16, 4, 1, 4)),
    ("16", 32): (Tiled(64, 32, 4, 1, 3), Tiled(128, 32, 4, 1, 3)),
    ("16", 64): (Tiled(64, 32, 2, 2, 3), Tiled(128, 32, 4, 2, 3)),
    ("32", 8): (Tiled(64, 8, 4, 1, 4), Tiled(128, 8, 4, 1, 4)),
    ("32", 16): (Tiled(64, 16, 4, 1, 3), Tiled(128, 16, 4, 1, 3)),
    ("32", 32): (Tiled(64, 16, 4, 1, 3), Tiled(128, 16, 4, 1, 3)),
    ("32", 64): (Tiled(64, 16, 2, 2, 3), Tiled(128, 16, 4, 2, 3)),
}
_SMALL = {
    ("16", 16): Small(16, 4, 3),
    ("16", 32): Small(16, 4, 3),
    ("16", 64): Small(16, 4, 2),
    ("32", 8): Small(8, 4, 3),
    ("32", 16): Small(16, 4, 3),
    ("32", 32): Small(16, 4, 3),
    ("32", 64): Small(8, 4, 2),
}
_DW = {
    ("16", 16): (Dw(64, 1, 1, 4, 3), Dw(128, 1, 1, 8, 3)),
    ("16", 32): (Dw(64, 2, 1, 2, 3), Dw(32, 2, 2, 1, 4)),
    ("16", 64): (Dw(32, 2, 2, 1, 3), Dw(64, 2, 2, 1, 2)),
    ("32", 8): (Dw(32, 1, 1, 4, 3),),
    ("32", 16): (Dw(32, 1, 1, 4, 3),),
    ("32", 32): (Dw(32, 2, 1, 2, 3),),
    ("32", 64): (Dw(16, 2, 2, 1, 3), Dw(32, 2, 2, 1, 2)),
}


def _family(math: str) -> str:
    return "16" if MATHS[math][2] == 2 else "32"


@dataclass(frozen=True)
class KernelSpec:
    """One kernel entry point.  ``op`` is fwd | dx | dw; ``kind`` is tiled | small | dw."""

    op: str
    kind: str
    math: str
    block: int
    config: Tiled | Small | Dw

    @cached_property  # on every launch's path: computed once per spec
    def name(self) -> str:
        return f"bsmm_{self.op}_{self.kind}_{self.math}_b{self.block}_{self.config.tag()}"

    @property
    def threads(self) -> int:
        return self.config.threads

    @property
    def rows_per_block(self) -> int:
        """Rows of M one thread block covers (DSD kernels)."""
        return self.config.bm if self.kind == "tiled" else SMALL_ROWS

    def smem_bytes(self) -> int:
        """Static shared memory, as the kernel declares it (checked against ptxas in the tests)."""
        elt = MATHS[self.math][2]
        pad = 16 // elt
        b, c = self.block, self.config
        if self.kind == "tiled":
            lda = c.bk + pad
            b_elems = c.bk * (b + pad) if self.op == "dx" else b * (c.bk + pad)
            staging = c.stages * (c.bm * lda + b_elems) * elt
            return max(staging, c.bm * (b + 4) * 4)
        if self.kind == "small":
            lda = c.bk + pad
            b_elems = c.bk * (b + pad) if self.op == "dx" else b * (c.bk + pad)
            return c.warps * c.stages * (SMALL_ROWS * lda + b_elems) * elt + SMALL_ROWS * b * 4
        bi = max(b, 16)
        red = bi * b * 4 if c.wk > 1 else 0  # ptxas drops the unused 1-element buffer
        return c.stages * c.bkm * ((bi + pad) + (b + pad)) * elt + red

    def macro(self) -> str:
        tag = MATHS[self.math][0]
        c = self.config
        if self.kind == "tiled":
            trans = "true" if self.op == "dx" else "false"
            return (
                f"SPARSIFY_DSD_TILED({self.name}, {tag}, {self.block}, {c.bm}, {c.bk}, "
                f"{c.warps_m}, {c.warps_n}, {c.stages}, {trans})"
            )
        if self.kind == "small":
            trans = "true" if self.op == "dx" else "false"
            return f"SPARSIFY_DSD_SMALL({self.name}, {tag}, {self.block}, {c.bk}, {c.warps}, {c.stages}, {trans})"
        return f"SPARSIFY_SDD_DW({self.name}, {tag}, {self.block}, {c.bkm}, {c.wi}, {c.wj}, {c.wk}, {c.stages})"


@dataclass(frozen=True)
class ProgramSpec:
    """One compile unit: every kernel of one math path and block size."""

    math: str
    block: int
    kernels: tuple[KernelSpec, ...]

    @property
    def name(self) -> str:
        return f"bsmm_{self.math}_b{self.block}"

    def source(self) -> str:
        lines = [f"// {self.name}: generated by sparsify.runtime.cuda.kernels", '#include "bsmm.cuh"', ""]
        lines += [k.macro() for k in self.kernels]
        return "\n".join(lines) + "\n"

    def kernel(self, name: str) -> KernelSpec:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"{self.name} has no kernel {name!r}; it has {[k.name for k in self.kernels]}.")


@cache
def program_for(math: str, block: int) -> ProgramSpec:
    """The compile unit for ``math`` and ``block`` (KeyError if there are no kernels for it)."""
    if math not in MATHS or block not in BLOCK_SIZES[math]:
        raise KeyError(
            f"no CUDA kernels for math {math!r} with block size {block}; "
            f"available: {', '.join(f'{m}: {BLOCK_SIZES[m]}' for m in BLOCK_SIZES)}."
        )
    fam = _family(math)
    ks: list[KernelSpec] = []
    for op in ("fwd", "dx"):
        ks += [KernelSpec(op, "tiled", math, block, c) for c in _TILED[(fam, block)]]
        ks.append(KernelSpec(op, "small", math, block, _SMALL[(fam, block)]))
    ks += [KernelSpec("dw", "dw", math, block, c) for c in _DW[(fam, block)]]
    return ProgramSpec(math, block, tuple(ks))


def programs() -> list[ProgramSpec]:
    """Every compile unit: what ``sparsify doctor --compile-all`` and the tests compile."""
    return [program_for(m, b) for m in MATHS for b in BLOCK_SIZES[m]]


def math_for(dtype: torch.dtype, allow_tf32: bool) -> str | None:
    """The math path for an element dtype, or None when there are no kernels for it."""
    if dtype == torch.float16:
        return "f16"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "f32"
    return None


def candidates(op: str, math: str, block: int, m: int) -> list[KernelSpec]:
    """The kernels the autotuner times for ``op`` at ``m`` rows (the small-M kernel up to 64 rows)."""
    ks = [k for k in program_for(math, block).kernels if k.op == op]
    if op != "dw" and m > 4 * SMALL_ROWS:
        ks = [k for k in ks if k.kind != "small"]
    return ks


def heuristic(op: str, math: str, block: int, m: int) -> KernelSpec:
    """The kernel used without autotuning (``SPARSIFY_AUTOTUNE=0``)."""
    ks = [k for k in program_for(math, block).kernels if k.op == op]
    if op == "dw":
        return ks[0]
    if m <= SMALL_ROWS:
        return next(k for k in ks if k.kind == "small")
    tiled = [k for k in ks if k.kind == "tiled"]
    return tiled[0] if m <= 512 else tiled[-1]
