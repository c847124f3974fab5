"""Benchmark the other CUDA kernel families on a GPU: block-sparse conv, the block-sparse LSTM and
spatially sparse convolution, each against the dense cuDNN op in the same run.

* ``bsconv``: a ResNet-stage 3x3 convolution (batch 32, 256 -> 256 channels, 28x28, stride 1,
  padding 1), block 32, densities 0.5 / 0.25 / 0.1; ours forward, dX and dW through the CUDA
  conv executor against cuDNN's ``conv2d``, ``conv2d_input`` and ``conv2d_weight``.
* ``lstm``: one layer, 1024 -> 1024, batch 32, 64 steps, block 32, densities 0.25 / 0.1;
  ``BlockSparseLSTM`` against cuDNN's ``nn.LSTM``, forward and forward + backward.
* ``spatial``: the synthetic indoor scenes of bench_spatial.py (100k and 1M occupied voxels):
  one 3x3x3 convolution 32 -> 32 and the MinkUNet-style network, forward and forward +
  backward, each call from raw coordinates (the coordinate hash and kernel maps are built
  on the device in every measurement, as in training), against dense ``conv3d`` on the
  voxel grid where it fits in memory.

Timing: kernel-level rows (bsconv) with CUDA events, the median of ``--runs`` calls after
``--warmup`` calls (which also autotune and compile); layer and network rows (lstm, spatial)
as wall time of a synchronized step (host work is part of what a user waits for), the median
of the rounds.  Each row has the ratio dense / ours (above 1: ours is faster).

Usage (on a GPU):  python benchmarks/bench_cuda_layers.py --out bench_cuda_layers.json
``--device cpu --quick`` runs the same code on the CPU at toy sizes: a smoke test of the script.
"""

# ruff: noqa: B023  (every lambda here is timed inside the loop iteration that makes it)
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import Timer, _commit, _layout  # noqa: E402

import sparsify.spatial as ME  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_median(fn, device, warmup: int, rounds: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------- bsconv
def bench_bsconv(device, dtype, densities, timer, quick) -> list[dict]:
    from sparsify.runtime.executors.cpu_conv import CPUConvExecutor

    if device.type == "cuda":
        from sparsify.runtime.cuda.executor_conv import CUDAConvExecutor

        ex = CUDAConvExecutor(device)
    else:
        ex = CPUConvExecutor()
    n, c, hw, block = (2, 64, 8, 32) if quick else (32, 256, 28, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(device, dtype)
    dy = torch.randn(n, c, hw, hw, generator=g).to(device, dtype)
    rows = []
    for density in densities:
        layout = _layout(c, c, block, density, seed=1)
        values = (torch.randn(layout.nnz, block, block, 3, 3, generator=g) / math.sqrt(9 * c)).to(device, dtype)
        meta = SimpleNamespace(**{k: t.to(device) for k, t in layout.metadata().items()})
        from sparsify.runtime.executors.cpu_conv import dense_conv_weight

        wd = dense_conv_weight(values.float().cpu(), layout.metadata()["row_indices"], layout.metadata()["col_indices"],
                               layout.n_block_rows, layout.n_block_cols, c, c).to(device, dtype)
        geom = ((1, 1), (1, 1), (1, 1))
        row = {"family": "bsconv", "dtype": str(dtype).replace("torch.", ""), "shape": f"{n}x{c}x{hw}x{hw} k3",
               "block": block, "density": round(layout.nnz / (layout.n_block_rows * layout.n_block_cols), 4)}
        row["dense_fwd_s"] = timer(lambda: F.conv2d(x, wd, None, 1, 1))
        row["dense_dx_s"] = timer(lambda: torch.nn.grad.conv2d_input(x.shape, wd, dy, 1, 1))
        row["dense_dw_s"] = timer(lambda: torch.nn.grad.conv2d_weight(x, wd.shape, dy, 1, 1))
        row["ours_fwd_s"] = timer(lambda: ex.forward(x, values, meta, None, None, "none", c, *geom))
        row["ours_dx_s"] = timer(lambda: ex.grad_input(dy, values, meta, c, (hw, hw), *geom))
        row["ours_dw_s"] = timer(lambda: ex.grad_weight(dy, x, meta, block, (3, 3), *geom))
        y = ex.forward(x, values, meta, None, None, "none", c, *geom).double()
        ref = F.conv2d(x.double(), wd.double(), None, 1, 1)
        row["fwd_rel_err"] = float((y - ref).norm() / ref.norm())
        for op in ("fwd", "dx", "dw"):
            row[f"ours_{op}_vs_dense"] = row[f"dense_{op}_s"] / row[f"ours_{op}_s"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- lstm
def bench_lstm(device, dtype, densities, warmup, rounds, quick) -> list[dict]:
    from sparsify.modules.block_sparse_lstm import BlockSparseLSTM

    hid, batch, steps, block = (64, 4, 8, 32) if quick else (1024, 32, 64, 32)
    torch.manual_seed(0)
    dense = torch.nn.LSTM(hid, hid, batch_first=True).to(device, dtype)
    x = torch.randn(batch, steps, hid, device=device, dtype=dtype)
    rows = []

    def fwd(m):
        with torch.no_grad():
            m(x)

    def fwd_bwd(m):
        xi = x.detach().requires_grad_(True)
        out, _ = m(xi)
        out.float().square().mean().backward()

    for density in densities:
        sparse = BlockSparseLSTM.from_dense(dense, density=density, block_size=block).to(device, dtype)
        row = {"family": "lstm", "dtype": str(dtype).replace("torch.", ""),
               "shape": f"{hid}->{hid} batch {batch} x {steps} steps", "block": block, "density": density}
        for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            row[f"dense_{name}_s"] = wall_median(lambda: fn(dense), device, warmup, rounds)
            row[f"ours_{name}_s"] = wall_median(lambda: fn(sparse), device, warmup, rounds)
            row[f"ours_{name}_vs_dense"] = row[f"dense_{name}_s"] / row[f"ours_{name}_s"]
        with torch.no_grad():
            y, _ = sparse(x)
            ref, _ = sparse.to_dense_module().to(device, torch.float64)(x.double())
        row["fwd_rel_err"] = float((y.double() - ref).norm() / ref.norm())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- spatial
def bench_spatial(device, dtype, sizes, warmup, rounds, dense_limit_gb) -> list[dict]:
    from bench_spatial import OursUNet, indoor_scene

    rows = []
    for n in sizes:
        coords = indoor_scene(n)
        bc = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).to(device)
        extent = (coords.max(0).values + 1).tolist()
        occupancy = len(coords) / math.prod(extent)
        conv = ME.MinkowskiConvolution(32, 32, kernel_size=3, dimension=3).to(device, dtype)
        unet = OursUNet().to(device, dtype).train()
        feats32 = torch.randn(len(coords), 32, device=device, dtype=dtype)
        feats4 = torch.randn(len(coords), 4, device=device, dtype=dtype)

        def step(net, feats, backward):
            for p in net.parameters():
                p.grad = None
            f = feats.detach().requires_grad_(backward)
            y = net(ME.SparseTensor(f, bc))
            if backward:
                y.F.float().square().sum().backward()
            return y

        cells = math.prod(extent)
        dense_ok = cells * 32 * 4 * torch.empty((), dtype=dtype).element_size() < dense_limit_gb * 2**30
        if dense_ok:
            w3 = conv.kernel.detach()  # [27, in, out]
            # ours: out[p] = sum_k x[p + off_k] W_k with the first axis fastest in k (MinkowskiEngine's
            # order); conv3d is the same cross-correlation with the weight as [out, in, a0, a1, a2]
            wd = w3.reshape(3, 3, 3, 32, 32).permute(4, 3, 2, 1, 0).contiguous()
            grid = torch.zeros(1, 32, *extent, device=device, dtype=dtype)
            idx = coords.long().to(device)
            grid[0, :, idx[:, 0], idx[:, 1], idx[:, 2]] = feats32.T

            def dense_step(backward):
                g_ = grid.detach().requires_grad_(backward)
                y = F.conv3d(g_, wd, None, 1, 1)
                if backward:
                    y.float().square().sum().backward()

        for net_name, net, feats in (("conv3x3x3", conv, feats32), ("unet", unet, feats4)):
            for backward in (False, True):
                row = {"family": "spatial", "dtype": str(dtype).replace("torch.", ""), "workload": net_name,
                       "points": len(coords), "occupancy": round(occupancy, 5),
                       "pass": "fwd+bwd" if backward else "fwd"}
                ctx = torch.enable_grad() if backward else torch.no_grad()
                with ctx:
                    row["ours_s"] = wall_median(lambda: step(net, feats, backward), device, warmup, rounds)
                    if net_name == "conv3x3x3" and dense_ok:
                        row["dense_conv3d_s"] = wall_median(lambda: dense_step(backward), device, warmup, rounds)
                        row["ours_vs_dense"] = row["dense_conv3d_s"] / row["ours_s"]
                rows.append(row)
        if dense_ok and n == min(sizes):  # the two compute the same values at the occupied sites
            with torch.no_grad():
                y = conv(ME.SparseTensor(feats32, bc))
                ref = F.conv3d(grid.double(), wd.double(), None, 1, 1)[0][:, idx[:, 0], idx[:, 1], idx[:, 2]].T
                yc = y.C[:, 1:].long()
                order = torch.argsort((yc[:, 0] * extent[1] + yc[:, 1]) * extent[2] + yc[:, 2])
                ref_order = torch.argsort((idx[:, 0] * extent[1] + idx[:, 1]) * extent[2] + idx[:, 2])
                err = (y.F[order].double() - ref[ref_order]).norm() / ref.norm()
            for r in rows[-4:]:
                if r["workload"] == "conv3x3x3":
                    r["rel_err_vs_dense"] = float(err)
            del grid
    return rows


# ----------------------------------------------------------------------------- main
def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    print("\nfamily   dtype     case                                 ours ms   dense ms   dense/ours   err")
    for r in rows:
        if r["family"] == "spatial":
            case = f"{r['workload']} {r['points']} pts {r['pass']}"
            print(f"{r['family']:8} {r['dtype']:9} {case:36} {r['ours_s'] * 1e3:8.2f} "
                  f"{_fmt(r.get('dense_conv3d_s') and r['dense_conv3d_s'] * 1e3, '9.2f'):>10} "
                  f"{_fmt(r.get('ours_vs_dense'), '10.2f'):>12} {_fmt(r.get('rel_err_vs_dense'), '.1e'):>8}")
            continue
        ops = ("fwd", "dx", "dw") if r["family"] == "bsconv" else ("fwd", "fwd_bwd")
        for op in ops:
            case = f"{r['shape']} b{r['block']} d{r['density']} {op}"
            print(f"{r['family']:8} {r['dtype']:9} {case:36} {r[f'ours_{op}_s'] * 1e3:8.3f} "
                  f"{r[f'dense_{op}_s'] * 1e3:9.3f} {r[f'ours_{op}_vs_dense']:12.2f} "
                  f"{_fmt(r.get('fwd_rel_err') if op == 'fwd' else None, '.1e'):>8}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--families", nargs="+", default=["bsconv", "lstm", "spatial"],
                    choices=["bsconv", "lstm", "spatial"])
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--spatial-dtypes", default="float32,float16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=50, help="timed calls per kernel row")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per layer / network row")
    ap.add_argument("--dense-limit-gb", type=float, default=16.0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu --quick to smoke-test the script)", file=sys.stderr)
        return 2
    if args.quick:
        args.sizes, args.warmup, args.runs, args.rounds = [10_000], 1, 3, 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    timer = Timer(device, args.warmup, args.runs)
    rows = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": os.environ.get("SPARSIFY_COMMIT") or _commit(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "warmup": args.warmup, "runs": args.runs, "rounds": args.rounds,
              "rows": rows}

    def write() -> None:  # after every family: a run stopped at its time limit keeps what it measured
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for fam in args.families:
            t0 = time.perf_counter()
            if fam == "bsconv":
                for dt_name in args.dtypes.split(","):
                    rows += bench_bsconv(device, getattr(torch, dt_name), (0.5, 0.25, 0.1), timer, args.quick)
            elif fam == "lstm":
                for dt_name in args.dtypes.split(","):
                    rows += bench_lstm(device, getattr(torch, dt_name), (0.25, 0.1), args.warmup, args.rounds,
                                       args.quick)
            else:
                for dt_name in args.spatial_dtypes.split(","):
                    rows += bench_spatial(device, getattr(torch, dt_name), args.sizes, args.warmup, args.rounds,
                                          args.dense_limit_gb)
            print(f"[{fam}: {time.perf_counter() - t0:.0f} s]", flush=True)
            write()
    print_table(rows)
    print(f"\nwrote {args.out} ({len(rows)} rows, {name}, commit {result['commit'][:10]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
