"""The spatial CUDA kernels: they compile, and on the CPU emulator they equal the CPU executor.

Properties:
* every spatial kernel compiles with NVRTC for sm_80 and sm_90 with zero register spills,
  zero stack, the static shared memory ``SpatialKernel.smem_bytes`` says, and few enough
  registers to launch;
* on the emulator (``sparsify.runtime.emulator``, the same grids and arguments a GPU gets),
  for random scenes, channel counts (aligned and ragged), strides and every tile
  configuration, forward / input gradient / weight gradient equal the float64 CPU executor:
  relative error below 1e-5 for float32 (FFMA, fp32 accumulation) and, for float16 /
  bfloat16 (tensor cores, fp32 accumulation, inputs exact in the reference), below the
  output rounding of the dtype (2^-11 and 2^-8 relative per element, so 2e-3 / 1e-2 in norm);
* the hash kernels find exactly the rows the CPU lookup finds, for every kernel offset,
  under a warp-skewing (greedy) and an interleaving (round-robin) thread schedule.

The emulator tests are skipped only when the emulator cannot build here (no host C++
compiler or CUDA headers), with that reason.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify.runtime.spatial import cuda as sc
from sparsify.runtime.spatial.cpu import SpatialCPUExecutor

import sparsify.spatial as ME
from tests.helpers import rel_err

pytestmark = pytest.mark.xdist_group("nvrtc")

ARCHS = ("sm_80", "sm_90")
REGISTERS_PER_SM = 65536
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------ NVRTC
@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install -e '.[cuda]')")
    from sparsify.runtime.cuda import compiler
    from sparsify.runtime.cuda.cache import DiskCache

    cache = DiskCache(tmp_path_factory.mktemp("spatial-kernel-cache"))
    jobs = [(p, a) for a in ARCHS for p in sc.programs()]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: compiler.compile_source(j[0].name, j[0].source(), j[1], cache=cache), jobs))
    return {(p.name, a): r for (p, a), r in zip(jobs, results)}


def _all_kernels():
    specs = [(p, k) for p in sc.programs() for k in p.kernels]
    return specs + [(sc.program_for("f32"), sc._QuerySpec())]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prog,spec", _all_kernels(), ids=lambda v: getattr(v, "name", None))
def test_every_spatial_kernel_compiles_without_spills(compiled, prog, spec, arch):
    result = compiled[(prog.name, arch)]
    assert result.target == "cubin" and result.binary[:4] == b"\x7fELF"
    res = result.resources.get(spec.name)
    assert res is not None, f"{spec.name} missing from the ptxas report of {prog.name}:\n{result.log}"
    assert (res.spill_stores, res.spill_loads) == (0, 0), f"{spec.name} spills on {arch}: {res}"
    assert res.stack_bytes == 0, f"{spec.name} uses {res.stack_bytes} bytes of stack on {arch}"
    assert res.smem_bytes == spec.smem_bytes() and res.smem_bytes <= 48 * 1024
    assert res.registers * spec.threads <= REGISTERS_PER_SM


# ------------------------------------------------------------------ emulator
@pytest.fixture(scope="module")
def emulated():
    try:
        from sparsify.runtime.emulator.builder import compiler, cuda_include_dirs

        compiler()
        cuda_include_dirs()
    except Exception as exc:  # only a missing toolchain may skip these
        pytest.skip(f"the CUDA emulator cannot build here: {type(exc).__name__}: {exc}")
    # a warp-skewing schedule (catches a missing barrier) and an interleaving one
    return {s: sc.SpatialCUDAExecutor(sc.EmulatedSpatialRuntime(sm_count=4, schedule=s))
            for s in ("greedy", "round_robin")}


@st.composite
def conv_cases(draw):
    d = draw(st.sampled_from([2, 3]))
    ext = draw(st.integers(3, 6 if d == 3 else 10))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(draw(st.integers(1, 2)), *(ext,) * d, generator=g) < draw(st.floats(0.1, 0.5))
    mask.view(-1)[0] = True
    coords = torch.nonzero(mask).to(torch.int32)
    cin = draw(st.sampled_from([8, 16, 5, 40]))
    cout = draw(st.sampled_from([8, 32, 7, 72]))
    k, stride = draw(st.sampled_from([(3, 1), (2, 2), (3, 2)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return d, coords, cin, cout, k, stride, dtype, g


def _map(d, coords, k, stride):
    x = ME.SparseTensor(torch.zeros(len(coords), 1), coords)
    cm = x.coordinate_manager
    out = cm.stride(x.coordinate_map_key, (stride,) * d)
    return cm.kernel_map(x.coordinate_map_key, out, (k,) * d, (stride,) * d)


@settings(max_examples=5)
@given(conv_cases(), st.integers(0, 1))
def test_emulated_kernels_equal_the_cpu_executor(emulated, case, config):
    d, coords, cin, cout, k, stride, dtype, g = case
    km = _map(d, coords, k, stride)
    for ex in emulated.values():
        _check_emulated(ex, km, cin, cout, dtype, g, config)


def _check_emulated(ex, km, cin, cout, dtype, g, config):
    x = torch.randn(km.n_in, cin, generator=g).to(dtype)
    w = (torch.randn(km.volume, cin, cout, generator=g) / cin**0.5).to(dtype)
    dy = torch.randn(km.n_out, cout, generator=g).to(dtype)
    cpu = SpatialCPUExecutor()
    args = (km.in_idx, km.out_idx, list(km.k_offsets))
    ex.forced = {"fwd": sc.program_for(sc._math_for(dtype)).kernels[config].name,
                 "dgrad": sc.program_for(sc._math_for(dtype)).kernels[2 + config].name,
                 "wgrad": sc.program_for(sc._math_for(dtype)).kernels[4 + config].name}
    try:
        y = ex.conv_forward(x, w, *args, km.n_out, km.identity_k, False)
        dx = ex.conv_dgrad(dy, w, *args, km.n_in, km.identity_k, False)
        dw = ex.conv_wgrad(x, dy, *args, km.identity_k, False)
    finally:
        ex.forced = {}
    ref_y = cpu.conv_forward(x.double(), w.double(), *args, km.n_out, km.identity_k, False)
    ref_dx = cpu.conv_dgrad(dy.double(), w.double(), *args, km.n_in, km.identity_k, False)
    ref_dw = cpu.conv_wgrad(x.double(), dy.double(), *args, km.identity_k, False)
    for got, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
        assert got.dtype == dtype and got.shape == ref.shape
        if ref.norm() > 0:
            assert rel_err(got, ref.to(dtype)) < TOL[dtype]


@settings(max_examples=6)
@given(conv_cases(), st.sampled_from(["greedy", "round_robin"]))
def test_emulated_hash_finds_the_kernel_map(emulated, case, schedule):
    d, coords, cin, cout, k, stride, dtype, g = case
    x = ME.SparseTensor(torch.zeros(len(coords), 1), coords)
    cmap = x.coordinate_manager.coordinate_map(x.coordinate_map_key)
    offsets = ME.KernelGenerator(k, dimension=d).offsets((1,) * d)
    pad = offsets.abs().amax(0).tolist()
    index = cmap.index(pad)
    # query every coordinate of the box around the points, and a few out-of-box markers
    keys = (((cmap.coordinates.long() - index.lo) // index.step) * index.mult).sum(1)
    base = torch.cat([keys, torch.tensor([-1, -5])])
    shifts = ((offsets // index.step[1:]) * index.mult[1:]).sum(1).tolist()
    rows = sc.kernel_map_rows(emulated[schedule], keys, base, shifts)
    for kk, s in enumerate(shifts):
        want = index.rows_of_inside_keys(keys + s)
        assert torch.equal(rows[kk, : len(keys)], want)
        assert rows[kk, len(keys):].tolist() == [-1, -1]


def test_layers_run_through_the_op_on_the_emulated_kernels(emulated):
    """``use_emulator()``: a layer's forward and backward go through torch.ops.sparsify.spatial_conv
    to the CUDA kernels on the emulator, and equal the CPU executor's."""
    from sparsify.runtime.spatial import spatial_executor_for, use_emulator

    g = torch.Generator().manual_seed(3)
    coords = torch.nonzero(torch.rand(1, 6, 6, 6, generator=g) < 0.3).to(torch.int32)
    feats = torch.randn(len(coords), 8, generator=g)
    conv = ME.MinkowskiConvolution(8, 16, kernel_size=3, stride=2, dimension=3)
    results = []
    for emulate in (False, True):
        use_emulator(emulate)
        try:
            ex = spatial_executor_for(torch.device("cpu"))
            assert ex.name == ("cuda" if emulate else "cpu")
            f = feats.clone().requires_grad_(True)
            conv.kernel.grad = None
            y = conv(ME.SparseTensor(f, coords))
            y.F.square().sum().backward()
            results.append((y.F.detach(), f.grad, conv.kernel.grad.clone()))
            if emulate:  # forward, dgrad and wgrad kernels ran
                assert {n.split("_")[1] for n, *_ in ex.runtime.launches} >= {"fwd", "dgrad", "wgrad"}
        finally:
            use_emulator(False)
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-5  # float32: FFMA with fp32 accumulation, another summation order
