"""Every kernel instantiation compiles with NVRTC, for sm_80 and sm_90, without a GPU.

Properties:
* every kernel of every program is in the cubin, with zero register spills,
  zero stack, shared memory within the static 48 KiB and equal to what
  ``KernelSpec.smem_bytes`` says, and few enough registers to launch;
* arch selection clamps to what NVRTC supports;
* a compile failure carries the log, the options and the numbered source.

Each program is compiled once per session into a temporary disk cache, two at a
time (NVRTC releases the GIL).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install -e '.[cuda]')")

from sparsify.runtime.cuda import compiler, kernels  # noqa: E402
from sparsify.runtime.cuda.cache import DiskCache  # noqa: E402

# NVRTC compiles are shared through the in-process memo: keep these tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("nvrtc")

ARCHS = ("sm_80", "sm_90")
REGISTERS_PER_SM = 65536


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """{(program name, arch): CompiledProgram} for every program and arch."""
    cache = DiskCache(tmp_path_factory.mktemp("kernel-cache"))
    jobs = [(p, a) for a in ARCHS for p in kernels.programs()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: compiler.compile_program(j[0], j[1], cache=cache), jobs))
    return {(p.name, a): r for (p, a), r in zip(jobs, results)}


def _all_kernels():
    return [(p, k) for p in kernels.programs() for k in p.kernels]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prog,spec", _all_kernels(), ids=lambda v: getattr(v, "name", None))
def test_every_kernel_compiles_without_spills(compiled, prog, spec, arch):
    result = compiled[(prog.name, arch)]
    assert result.target == "cubin" and result.binary[:4] == b"\x7fELF"
    res = result.resources.get(spec.name)
    assert res is not None, f"{spec.name} missing from the ptxas report of {prog.name}:\n{result.log}"
    assert (res.spill_stores, res.spill_loads) == (0, 0), f"{spec.name} spills on {arch}: {res}"
    assert res.stack_bytes == 0, f"{spec.name} uses {res.stack_bytes} bytes of stack on {arch}"
    assert res.smem_bytes <= kernels.SMEM_LIMIT
    assert res.smem_bytes == spec.smem_bytes(), "KernelSpec.smem_bytes disagrees with ptxas"
    assert res.registers * spec.threads <= REGISTERS_PER_SM, f"{spec.name} cannot launch: {res}"


def test_program_sources_define_exactly_their_kernels():
    names = [k.name for p in kernels.programs() for k in p.kernels]
    assert len(names) == len(set(names)), "kernel names must be unique"
    for p in kernels.programs():
        defined = re.findall(r"^SPARSIFY_\w+\((\w+),", p.source(), re.M)
        assert defined == [k.name for k in p.kernels]


@pytest.mark.parametrize("prog", kernels.programs(), ids=lambda p: p.name)
def test_every_op_has_a_kernel_for_every_size(prog):
    for op in ("fwd", "dx", "dw"):
        for m in (1, 7, 16, 17, 64, 65, 1000, 4096):
            h = kernels.heuristic(op, prog.math, prog.block, m)
            cands = kernels.candidates(op, prog.math, prog.block, m)
            assert h in prog.kernels and h.op == op
            assert cands and all(c.op == op and c in prog.kernels for c in cands)
            if op != "dw" and m > 64:
                assert all(c.kind == "tiled" for c in cands)


def test_sm_90a_compiles(tmp_path):
    src = '#include "bsmm.cuh"\n' + kernels.program_for("f16", 16).kernels[0].macro() + "\n"
    result = compiler.compile_source("sm90a_probe", src, "sm_90a", cache=DiskCache(tmp_path))
    assert result.binary[:4] == b"\x7fELF" and result.resources


def test_compile_error_carries_log_options_and_numbered_source(tmp_path):
    src = '#include "bsmm_common.cuh"\nextern "C" __global__ void broken() { this_is_not_declared(); }\n'
    with pytest.raises(compiler.KernelCompileError) as info:
        compiler.compile_source("broken", src, "sm_80", cache=DiskCache(tmp_path))
    err = info.value
    assert "this_is_not_declared" in err.log
    assert err.options["arch"] == "sm_80" and err.options["std"] == "c++17"
    assert "   2 | extern" in str(err) and "broken" in str(err)


@pytest.mark.parametrize(
    "cc,specific,expected",
    [
        ((8, 0), False, ("sm_80", "cubin")),
        ((8, 6), False, ("sm_86", "cubin")),
        ((8, 9), False, ("sm_89", "cubin")),
        ((9, 0), False, ("sm_90", "cubin")),
        ((9, 0), True, ("sm_90a", "cubin")),
        ((8, 6), True, ("sm_86", "cubin")),
        ((10, 3), False, ("sm_103", "cubin")),
        ((10, 5), False, ("sm_103", "cubin")),  # newest supported minor of the same major
        ((15, 0), False, ("compute_121", "ptx")),  # unknown major: PTX for the driver to JIT
    ],
)
def test_arch_is_clamped_to_what_nvrtc_supports(monkeypatch, cc, specific, expected):
    monkeypatch.setattr(compiler, "supported_archs", lambda: (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121))
    assert compiler.arch_for(cc, arch_specific=specific) == expected


def test_device_older_than_nvrtc_supports_is_refused(monkeypatch):
    monkeypatch.setattr(compiler, "supported_archs", lambda: (75, 80, 90))
    with pytest.raises(compiler.CUDAUnavailableError, match="sm_70"):
        compiler.arch_for((7, 0))


def test_supported_archs_include_the_ci_targets():
    assert {80, 90} <= set(compiler.supported_archs())
    assert compiler.nvrtc_version() >= (12, 0)


def test_ptxas_log_is_parsed_per_kernel():
    log = (
        "ptxas info    : Compiling entry function 'k1' for 'sm_80'\n"
        "ptxas info    : Function properties for k1\n"
        "ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 90 registers, used 1 barriers, 34816 bytes smem, 464 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'k2' for 'sm_80'\n"
        "ptxas info    : Function properties for k2\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 0 barriers, 372 bytes cmem[0]\n"
    )
    res = compiler.parse_ptxas_log(log)
    assert res["k1"] == compiler.KernelResources(90, 8, 4, 16, 34816)
    assert res["k2"] == compiler.KernelResources(40, 0, 0, 0, 0)
