"""The spatial CUDA executor on a real GPU equals the float64 CPU executor (skipped without one).

Same properties as the emulator tests of tests/test_spatial_cuda.py, on device memory and
through ``torch.ops.sparsify.spatial_conv``: forward, input and weight gradients of every
tile configuration for float32 / float16 / bfloat16, kernel maps built by the hash kernels
equal the CPU-built ones, and a MinkUNet training step runs on the device.
Tolerances as there: 1e-5 (float32), 2e-3 (float16), 1e-2 (bfloat16) relative.
"""

from __future__ import annotations

import pytest
import torch
from sparsify.runtime.spatial import cuda as sc
from sparsify.runtime.spatial.cpu import SpatialCPUExecutor

import sparsify.spatial as ME
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _scene(n_ext=24, occ=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, n_ext, n_ext, n_ext, generator=g) < occ
    return torch.nonzero(mask).to(torch.int32), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [0, 1])
@pytest.mark.parametrize("k,stride", [(3, 1), (2, 2)])
def test_gpu_kernels_equal_the_cpu_executor(dtype, config, k, stride):
    coords, g = _scene()
    x = ME.SparseTensor(torch.zeros(len(coords), 1), coords)
    cm = x.coordinate_manager
    km = cm.kernel_map(x.coordinate_map_key, cm.stride(x.coordinate_map_key, (stride,) * 3), (k,) * 3, (stride,) * 3)
    ex = sc.SpatialCUDAExecutor.for_device(torch.device("cuda"))
    math = sc._math_for(dtype)
    ks = sc.program_for(math).kernels
    ex.forced = {"fwd": ks[config].name, "dgrad": ks[2 + config].name, "wgrad": ks[4 + config].name}
    xf = torch.randn(km.n_in, 48, generator=g).to(dtype)
    w = (torch.randn(km.volume, 48, 40, generator=g) / 7).to(dtype)
    dy = torch.randn(km.n_out, 40, generator=g).to(dtype)
    cuda = lambda t: t.cuda()  # noqa: E731
    args = (cuda(km.in_idx).int(), cuda(km.out_idx).int(), list(km.k_offsets))
    cpu_args = (km.in_idx, km.out_idx, list(km.k_offsets))
    cpu = SpatialCPUExecutor()
    got = [ex.conv_forward(cuda(xf), cuda(w), *args, km.n_out, km.identity_k, False),
           ex.conv_dgrad(cuda(dy), cuda(w), *args, km.n_in, km.identity_k, False),
           ex.conv_wgrad(cuda(xf), cuda(dy), *args, km.identity_k, False)]
    ref = [cpu.conv_forward(xf.double(), w.double(), *cpu_args, km.n_out, km.identity_k, False),
           cpu.conv_dgrad(dy.double(), w.double(), *cpu_args, km.n_in, km.identity_k, False),
           cpu.conv_wgrad(xf.double(), dy.double(), *cpu_args, km.identity_k, False)]
    for a, b in zip(got, ref):
        assert rel_err(a.cpu(), b.to(dtype)) < TOL[dtype]


def test_gpu_kernel_maps_equal_cpu_kernel_maps():
    coords, _ = _scene()
    xc = ME.SparseTensor(torch.zeros(len(coords), 1), coords)
    xg = ME.SparseTensor(torch.zeros(len(coords), 1, device="cuda"), coords.cuda())
    for x in (xc, xg):
        x._km = x.coordinate_manager.kernel_map(x.coordinate_map_key, x.coordinate_map_key, (3, 3, 3))
    assert xc._km.k_offsets == xg._km.k_offsets
    assert torch.equal(xc._km.in_idx, xg._km.in_idx.cpu().long())
    assert torch.equal(xc._km.out_idx, xg._km.out_idx.cpu().long())


def test_gpu_training_step():
    coords, g = _scene(16, 0.2)
    x = ME.SparseTensor(torch.randn(len(coords), 3, device="cuda"), coords.cuda())
    net = torch.nn.Sequential(ME.MinkowskiConvolution(3, 16, kernel_size=3, dimension=3), ME.MinkowskiBatchNorm(16),
                              ME.MinkowskiReLU(), ME.MinkowskiConvolution(16, 16, kernel_size=2, stride=2, dimension=3),
                              ME.MinkowskiConvolutionTranspose(16, 4, kernel_size=2, stride=2, dimension=3)).cuda()
    y = net(x)
    y.F.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
