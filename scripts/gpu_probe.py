"""First step of scripts/gpu-check: what this GPU machine has, and whether one kernel of each
family builds, loads and computes the right thing here.  Exit 0 if all do, 1 otherwise (with
the error), so gpu-check can try another header directory or the carried cuda wheels.

Run from the repository root: python3 scripts/gpu_probe.py
"""

from __future__ import annotations

import importlib.metadata as md
import math
import platform
import sys
import traceback
from types import SimpleNamespace


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "-"


def main() -> int:
    import torch

    print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    for dist in ("cuda-bindings", "cuda-core", "cuda-pathfinder", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime",
                 "nvidia-cuda-crt", "tensorly", "hypothesis", "pytest-xdist", "networkx", "safetensors"):
        print(f"  {dist:22} {_version(dist)}")
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch")
        return 1
    dev = torch.device("cuda")
    p = torch.cuda.get_device_properties(dev)
    print(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
    import cuda.core

    print(f"cuda.core from {cuda.core.__file__}")
    ok = True
    try:
        from sparsify.runtime.cuda import compiler

        print(f"NVRTC {compiler.nvrtc_version()}, supported archs {compiler.supported_archs()[-4:]}")
        print(f"include dirs {compiler.include_dirs()}")
        print(f"arch for this device: {compiler.arch_for((p.major, p.minor))}")
    except Exception:
        traceback.print_exc()
        ok = False
    g = torch.Generator().manual_seed(0)

    def check(name, fn):
        nonlocal ok
        try:
            err = fn()
            good = err < 3e-3
            ok &= good
            print(f"  {name:28} rel err {err:.1e}  {'ok' if good else 'WRONG'}")
        except Exception:
            ok = False
            print(f"  {name:28} FAILED")
            traceback.print_exc()

    def bsmm():
        from sparsify.runtime.cuda.executor import CUDAExecutor
        from sparsify.runtime.layout import BlockSparseLayout

        ex = CUDAExecutor(dev)
        mask = torch.rand(8, 8, generator=g) < 0.5
        mask[0, 0] = True
        layout = BlockSparseLayout.from_block_mask(mask, shape=(256, 256), block_size=32)
        w = torch.randn(256, 256, generator=g) * layout.element_mask() / 16
        x = torch.randn(100, 256, generator=g)
        meta = SimpleNamespace(**{k: t.to(dev) for k, t in layout.metadata().items()})
        vals = layout.values_from_dense(w).to(dev, torch.float16)
        y = ex.forward(x.to(dev, torch.float16), vals, meta, None, None, "none", 256).double().cpu()
        ref = x.half().double() @ w.half().double().T
        return float((y - ref).norm() / ref.norm())

    def bsconv():
        import torch.nn.functional as F
        from sparsify.runtime.cuda.executor_conv import CUDAConvExecutor
        from sparsify.runtime.executors.cpu_conv import dense_conv_weight
        from sparsify.runtime.layout import BlockSparseLayout

        ex = CUDAConvExecutor(dev)
        mask = torch.ones(2, 2, dtype=torch.bool)
        layout = BlockSparseLayout.from_block_mask(mask, shape=(32, 32), block_size=16)
        vals = torch.randn(layout.nnz, 16, 16, 3, 3, generator=g) / math.sqrt(288)
        meta = layout.metadata()
        wd = dense_conv_weight(vals.double(), meta["row_indices"], meta["col_indices"], 2, 2, 32, 32)
        x = torch.randn(2, 32, 9, 9, generator=g)
        dmeta = SimpleNamespace(**{k: t.to(dev) for k, t in meta.items()})
        y = ex.forward(x.to(dev), vals.to(dev), dmeta, None, None, "none", 32, (1, 1), (1, 1), (1, 1)).double().cpu()
        ref = F.conv2d(x.double(), wd, None, 1, 1)
        return float((y - ref).norm() / ref.norm())

    def gates():
        from sparsify.runtime import ops_lstm
        from sparsify.runtime.cuda import executor_lstm as el

        k = el.LSTMGateKernels(el._kernel_runtime_class().for_device(dev))
        pre, c = torch.randn(4, 64, generator=g), torch.randn(4, 16, generator=g)
        h, c2, _ = k.forward(pre.to(dev), c.to(dev))
        h_ref, c_ref, _ = ops_lstm.lstm_gates_cpu.forward(pre.double().clone(), c.double())
        return float((h.cpu().double() - h_ref).norm() / h_ref.norm())

    def spatial():
        from sparsify.runtime.spatial import cuda as sc
        from sparsify.runtime.spatial.cpu import SpatialCPUExecutor

        import sparsify.spatial as ME

        coords = torch.nonzero(torch.rand(1, 12, 12, 12, generator=g) < 0.2).to(torch.int32)
        x = ME.SparseTensor(torch.zeros(len(coords), 1), coords)
        cm = x.coordinate_manager
        km = cm.kernel_map(x.coordinate_map_key, x.coordinate_map_key, (3, 3, 3))
        ex = sc.SpatialCUDAExecutor.for_device(dev)
        xf, w = torch.randn(km.n_in, 16, generator=g), torch.randn(km.volume, 16, 8, generator=g) / 8
        y = ex.conv_forward(xf.to(dev), w.to(dev), km.in_idx.to(dev).int(), km.out_idx.to(dev).int(),
                            list(km.k_offsets), km.n_out, km.identity_k, False).cpu().double()
        ref = SpatialCPUExecutor().conv_forward(xf.double(), w.double(), km.in_idx, km.out_idx, list(km.k_offsets),
                                                km.n_out, km.identity_k, False)
        return float((y - ref).norm() / ref.norm())

    print("one kernel of each family, built and run here:")
    for name, fn in (("bsmm f16 b32 forward", bsmm), ("bsconv f32 b16 forward", bsconv),
                     ("lstm gates f32", gates), ("spatial conv f32", spatial)):
        check(name, fn)
    torch.cuda.synchronize()
    print("probe:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
