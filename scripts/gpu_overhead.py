"""Where a small-M bsmm call spends its host time, on a GPU (a diagnostic of scripts/gpu-check).

For M = 1, K = N = 4096, float16, block 32, density 0.1 it times, per call, the host side of:
the whole ``CUDAExecutor.forward``, ``KernelRuntime.launch`` with the arguments prepared,
the bare cuda.core launch with configuration and stream prepared, their pieces (device
guard, current stream, launch configuration, operand checks), and cuBLAS's ``x @ W.T``.
Each is a loop of back-to-back calls with one synchronize at the end: while the host is
slower than the device, that is the host's cost per call.  Prints a table and writes JSON.

Run from the repository root on a GPU:  python3 scripts/gpu_overhead.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from types import SimpleNamespace

import torch


def per_call(fn, n=2000, rounds=5) -> float:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def main() -> int:
    from sparsify.runtime.cuda import launcher
    from sparsify.runtime.cuda.executor import CUDAExecutor
    from sparsify.runtime.layout import BlockSparseLayout

    dev = torch.device("cuda", torch.cuda.current_device())
    ex = CUDAExecutor(dev)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(128 * 128, dtype=torch.bool)
    mask[torch.randperm(128 * 128, generator=g)[:1638]] = True
    lay = BlockSparseLayout.from_block_mask(mask.view(128, 128), shape=(4096, 4096), block_size=32)
    meta = SimpleNamespace(**{k: t.to(dev) for k, t in lay.metadata().items()})
    vals = torch.randn(lay.nnz, 32, 32, device=dev, dtype=torch.float16)
    x = torch.randn(1, 4096, device=dev, dtype=torch.float16)
    w = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    rt = ex.runtime
    seen = {}
    orig = rt.launch

    def spy(spec, grid, args):
        seen.update(spec=spec, grid=grid, args=args)
        orig(spec, grid, args)

    rt.launch = spy
    ex.forward(x, vals, meta, None, None, "none", 4096)
    rt.launch = orig
    spec, grid, args = seen["spec"], seen["grid"], seen["args"]
    kernel = rt.kernel(spec)
    handle = torch.cuda.current_stream().cuda_stream
    stream = rt._streams.get(handle) or rt._device.create_stream(launcher._TorchStream(handle))
    config = rt._LaunchConfig(grid=grid, block=(spec.threads, 1, 1))

    def guard():
        with torch.cuda.device(0):
            pass

    rows = {
        "cuBLAS x @ W.T (torch)": lambda: x @ w.T,
        "CUDAExecutor.forward": lambda: ex.forward(x, vals, meta, None, None, "none", 4096),
        "KernelRuntime.launch, args prepared": lambda: rt.launch(spec, grid, args),
        "cuda.core launch, all prepared": lambda: rt._launch(stream, config, kernel, *args),
        "torch.cuda.device guard": guard,
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream(0).cuda_stream,
        "LaunchConfig(...)": lambda: rt._LaunchConfig(grid=grid, block=(spec.threads, 1, 1)),
        "10 operand checks": lambda: [launcher.check_operand("op", "x", x, x.device, (x.dtype,)) for _ in range(10)],
        "torch.empty(1, 4096) on the device": lambda: torch.empty(1, 4096, device=dev, dtype=torch.float16),
    }
    out = {}
    print(f"{'host time per call':45} us")
    for name, fn in rows.items():
        out[name] = per_call(fn)
        print(f"{name:45} {out[name] * 1e6:7.1f}")
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3000):
        ex.forward(x, vals, meta, None, None, "none", 4096)
    prof.disable()
    torch.cuda.synchronize()
    print("\nCUDAExecutor.forward x 3000 under cProfile (internal time):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "us_per_call":
              {k: v * 1e6 for k, v in out.items()}, "spec": spec.name, "grid": list(grid)}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
