"""Benchmark the CUDA block-sparse kernels against cuBLAS dense and torch's BSR kernels.

For each dtype x block x density x M: time cuBLAS dense (``x @ W.T``), torch
BSR (``F.linear`` with a BSR weight, Triton-backed on CUDA), and our forward,
dX and dW, with CUDA events: warm-up runs (which also autotune) are excluded,
then the median of ``--runs`` timed calls.  Reports the effective TFLOP/s
(useful, i.e. sparse, FLOPs per second), the speed ratio to dense and to torch
BSR, and the fraction of the roofline floor reached:
``floor = max(density * dense FLOPs / peak, bytes moved / bandwidth)``.
Each row also carries the relative error of our forward against dense.

Usage (on a GPU):
    python benchmarks/bench_cuda.py --out benchmarks/results/bench_cuda_<device>.json
``--device cpu --quick`` runs the same code on the CPU reference executor, as
a smoke test of the script itself (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from sparsify.runtime.executors import executor_for
from sparsify.runtime.layout import BlockSparseLayout

# Physical limits measured on this workplace's devices (shared/ANCHORS.md).
ROOFLINE = {"H200": (798e12, 4.3e12), "H100": (798e12, 3.0e12)}


def _roofline(device_name: str, peak: float | None, bw: float | None) -> tuple[float, float]:
    for key, (p, b) in ROOFLINE.items():
        if key in device_name:
            return peak or p, bw or b
    return peak or ROOFLINE["H100"][0], bw or ROOFLINE["H100"][1]


class Timer:
    """Median time per call in seconds: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, runs: int, graphs: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.warmup, self.runs, self.graphs = warmup, runs, graphs

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.runs)]
            for start, end in pairs:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) / 1e3 for s, e in pairs]
        else:
            for _ in range(self.runs):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    def graph(self, fn, reps: int = 20) -> float | None:
        """Median time per call of ``fn`` replayed from a CUDA graph of ``reps`` calls: the device
        time without the host's per-call cost (how CUDA-graph inference runs it).  None where
        the op cannot be captured."""
        if not self.cuda:
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    fn()
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                     for _ in range(max(5, self.runs // 5))]
            for start, end in pairs:
                start.record()
                g.replay()
                end.record()
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs) / reps
        except Exception as exc:  # noqa: BLE001 - a benchmark row records what could not be captured
            print(f"  (no graph timing: {type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
            return None


def _layout(n: int, k: int, block: int, density: float, seed: int) -> BlockSparseLayout:
    """A random layout with exactly round(density * blocks) blocks, spread unevenly over rows."""
    g = torch.Generator().manual_seed(seed)
    nbr, nbc = -(-n // block), -(-k // block)
    keep = max(1, round(density * nbr * nbc))
    mask = torch.zeros(nbr * nbc, dtype=torch.bool)
    mask[torch.randperm(nbr * nbc, generator=g)[:keep]] = True
    return BlockSparseLayout.from_block_mask(mask.view(nbr, nbc), shape=(n, k), block_size=block)


def bench_case(dtype, block, density, m, k, n, device, timer, peak, bw, seed=0) -> dict:
    layout = _layout(n, k, block, density, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)) * layout.element_mask()
    x = torch.randn(m, k, generator=g).to(device, dtype)
    dy = torch.randn(m, n, generator=g).to(device, dtype)
    w_dev = w.to(device, dtype)
    values = layout.values_from_dense(w).to(device, dtype)
    meta = SimpleNamespace(**{name: t.to(device) for name, t in layout.metadata().items()})
    ex = executor_for(device)
    e = torch.empty((), dtype=dtype).element_size()
    d = layout.nnz / (layout.n_block_rows * layout.n_block_cols)
    dense_flops = 2.0 * m * n * k
    sparse_flops = 2.0 * m * layout.nnz * block * block

    row: dict = {
        "dtype": str(dtype).replace("torch.", ""), "block": block, "density": round(d, 4),
        "M": m, "K": k, "N": n, "nnz_blocks": layout.nnz, "executor": ex.name,
    }
    row["dense_fwd_s"] = timer(lambda: x @ w_dev.T)
    row["dense_dx_s"] = timer(lambda: dy @ w_dev)
    row["dense_dw_s"] = timer(lambda: dy.T @ x)
    try:
        w_bsr = w_dev.to_sparse_bsr((block, block))
        row["torch_bsr_fwd_s"] = timer(lambda: F.linear(x, w_bsr))
    except Exception as exc:  # not every torch build has BSR kernels for every dtype / block
        row["torch_bsr_fwd_s"] = None
        row["torch_bsr_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    row["ours_fwd_s"] = timer(lambda: ex.forward(x, values, meta, None, None, "none", n))
    row["ours_dx_s"] = timer(lambda: ex.grad_input(dy, values, meta, k))
    row["ours_dw_s"] = timer(lambda: ex.grad_weight(dy, x, meta, block))

    if timer.graphs:
        row["dense_fwd_graph_s"] = timer.graph(lambda: x @ w_dev.T)
        row["ours_fwd_graph_s"] = timer.graph(lambda: ex.forward(x, values, meta, None, None, "none", n))
        row["ours_dx_graph_s"] = timer.graph(lambda: ex.grad_input(dy, values, meta, k))
        row["ours_dw_graph_s"] = timer.graph(lambda: ex.grad_weight(dy, x, meta, block))
        row["dense_dx_graph_s"] = timer.graph(lambda: dy @ w_dev)
        row["dense_dw_graph_s"] = timer.graph(lambda: dy.T @ x)
        for op in ("fwd", "dx", "dw"):
            a, b = row[f"dense_{op}_graph_s"], row[f"ours_{op}_graph_s"]
            row[f"ours_{op}_graph_vs_dense"] = a / b if a and b else None

    y = ex.forward(x, values, meta, None, None, "none", n).double()
    ref = (x.double() @ w_dev.double().T)
    row["fwd_rel_err"] = float((y - ref).norm() / ref.norm().clamp_min(1e-30))

    bytes_fwd = (m * k + layout.nnz * block * block + m * n) * e
    bytes_dx = (m * n + layout.nnz * block * block + m * k) * e
    bytes_dw = (m * n + m * k + layout.nnz * block * block) * e
    for op, nbytes in (("fwd", bytes_fwd), ("dx", bytes_dx), ("dw", bytes_dw)):
        t = row[f"ours_{op}_s"]
        floor = max(sparse_flops / peak, nbytes / bw)
        row[f"ours_{op}_tflops"] = sparse_flops / t / 1e12
        row[f"ours_{op}_vs_dense"] = row[f"dense_{op}_s"] / t
        row[f"ours_{op}_roofline_frac"] = floor / t
    row["dense_fwd_tflops"] = dense_flops / row["dense_fwd_s"] / 1e12
    if row["torch_bsr_fwd_s"]:
        row["ours_fwd_vs_torch_bsr"] = row["torch_bsr_fwd_s"] / row["ours_fwd_s"]
        row["torch_bsr_fwd_tflops"] = sparse_flops / row["torch_bsr_fwd_s"] / 1e12
    return row


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


HEADER = ("dtype", "b", "dens", "M", "fwd TF/s", "x dense", "x bsr", "roof", "dx x dense", "dw x dense", "err",
          "graph us", "g x dense")


def print_row(r: dict | None) -> None:
    """One table line (the header for None)."""
    if r is None:
        print(" ".join(f"{c:>10}" for c in HEADER))
        return
    print(" ".join(f"{v:>10}" for v in (
        r["dtype"], r["block"], _fmt(r["density"], ".3f"), r["M"], _fmt(r["ours_fwd_tflops"]),
        _fmt(r["ours_fwd_vs_dense"]), _fmt(r.get("ours_fwd_vs_torch_bsr")), _fmt(r["ours_fwd_roofline_frac"]),
        _fmt(r["ours_dx_vs_dense"]), _fmt(r["ours_dw_vs_dense"]), _fmt(r["fwd_rel_err"], ".1e"),
        _fmt(r.get("ours_fwd_graph_s") and r["ours_fwd_graph_s"] * 1e6, ".1f"), _fmt(r.get("ours_fwd_graph_vs_dense")),
    )), flush=True)


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--blocks", default="32,64")
    ap.add_argument("--densities", default="0.5,0.25,0.1,0.05")
    ap.add_argument("--m", default="4096,64,1", help="rows of x (batch x sequence)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the dense peak for the roofline")
    ap.add_argument("--bandwidth-tbs", type=float, default=None, help="override the memory bandwidth (TB/s)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few runs (smoke test)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time each op replayed from a CUDA graph (device time without host overhead)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU (or --device cpu --quick to smoke-test the script)", file=sys.stderr)
        return 2
    if args.quick:
        args.k = args.n = 256
        args.m, args.warmup, args.runs = "64,1", 1, 3
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, bw = _roofline(name, args.peak_tflops and args.peak_tflops * 1e12, args.bandwidth_tbs and args.bandwidth_tbs * 1e12)
    timer = Timer(device, args.warmup, args.runs, args.graphs)
    rows = []
    result = {
        "device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("SPARSIFY_COMMIT") or _commit(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "peak_flops": peak, "bandwidth_bytes_s": bw,
        "warmup": args.warmup, "runs": args.runs, "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write() -> None:  # after every row: a run stopped at its time limit keeps what it measured
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    print_row(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "BSR support is in beta"
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for block in map(int, args.blocks.split(",")):
                for density in map(float, args.densities.split(",")):
                    for m in map(int, args.m.split(",")):
                        rows.append(bench_case(dtype, block, density, m, args.k, args.n, device, timer, peak, bw))
                        print_row(rows[-1])
                        write()
    write()
    print(f"\nwrote {args.out} ({len(rows)} rows, {name}, commit {result['commit'][:10]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
