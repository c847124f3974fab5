"""Spatially sparse convolution on the CPU: sparsify.spatial against spconv's CPU build and dense conv3d.

Data: synthetic indoor scenes (the surfaces of a room's floor and walls, boxes and
spheres, voxelized at 2 cm; the room grows with the point count so the density of
surface points stays that of a real scan), 10k to 1M occupied voxels, one scene per
size, batch 1.  The occupancy of the bounding grid is printed (well under 5%).

Workloads, each timed from raw coordinates (a new sparse tensor per call, so building
the coordinate hash and kernel maps is part of every measurement on both sides, as in
training where every batch has new coordinates):

* ``conv``: one 3x3x3 convolution, 32 -> 32 channels, stride 1 on the input's sites
  (ME's ``MinkowskiConvolution``; spconv's ``SubMConv3d``; dense ``conv3d`` with
  padding 1 on the voxel grid, where the grid fits in memory);
* ``unet``: a MinkUNet-style network (stem 3x3x3 4 -> 32, two stride-2 2x2x2 downsamplings
  to 64 and 128 channels with a 3x3x3 conv at each level, two transposed 2x2x2
  upsamplings with skip concatenations, BatchNorm + ReLU after each conv, a final
  linear to 8 classes) built from the same layers in both libraries (spconv:
  SubMConv3d / SparseConv3d / SparseInverseConv3d with indice keys).

``fwd`` is the forward pass; ``fwd+bwd`` adds the backward of ``sum(y^2)`` (input and
weight gradients).  Each round runs every system once, interleaved; the table reports
medians (and minima: other work on shared cores only adds time) over the rounds, and
ours / spconv from the medians.

Run:  python benchmarks/bench_spatial.py [--sizes 10000 100000 1000000] [--rounds 5] [--threads 1]
      [--workloads conv unet] [--passes fwd fwd+bwd]  (partial runs, for profiling)
Needs ``pip install spconv`` (its CPU build; not a dependency of sparsify).
Writes benchmarks/results/spatial_cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import sparsify.spatial as ME

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
VOXEL = 0.02


# ----------------------------------------------------------------------------- data
def indoor_scene(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 3]`` int32 voxel coordinates (>= 0) on the surfaces of a room with boxes and spheres."""
    rng = np.random.default_rng(seed)
    side = 4.0 * math.sqrt(n / 100_000)  # surface area grows with n: same points per m^2
    height = 2.5
    pts = []
    m = 4 * n  # oversample, then keep n distinct voxels
    u = rng.uniform(0, 1, (m, 2))
    pts.append(np.c_[u * side, np.zeros(m)])
    for wall in range(2):
        u = rng.uniform(0, 1, (m // 3, 2))
        w = np.c_[u[:, 0] * side, np.full(len(u), wall * side), u[:, 1] * height]
        pts += [w, w[:, [1, 0, 2]]]
    n_obj = max(4, int(12 * side / 4))
    for _ in range(n_obj):
        size = rng.uniform(0.3, 1.0, 3)
        corner = np.r_[rng.uniform(0, side - 1.0, 2), 0.0]
        p = rng.uniform(0, 1, (m // n_obj, 3))
        face = rng.integers(0, 3, len(p))
        p[np.arange(len(p)), face] = rng.integers(0, 2, len(p))
        pts.append(corner + p * size)
        centre = np.r_[rng.uniform(0.5, side - 0.5, 2), rng.uniform(0.3, 1.5)]
        v = rng.normal(size=(m // n_obj, 3))
        pts.append(centre + rng.uniform(0.15, 0.4) * v / np.linalg.norm(v, axis=1, keepdims=True))
    vox = np.unique(np.floor(np.concatenate(pts) / VOXEL).astype(np.int64), axis=0)
    vox = vox[rng.permutation(len(vox))[:n]]
    vox -= vox.min(0)
    return torch.from_numpy(vox.astype(np.int32))


# ----------------------------------------------------------------------------- ours
class OursUNet(nn.Module):
    def __init__(self, cin=4, classes=8):
        super().__init__()

        def cbr(a, b, **kw):
            return nn.Sequential(ME.MinkowskiConvolution(a, b, dimension=3, **kw), ME.MinkowskiBatchNorm(b),
                                 ME.MinkowskiReLU())

        def tbr(a, b):
            return nn.Sequential(ME.MinkowskiConvolutionTranspose(a, b, kernel_size=2, stride=2, dimension=3),
                                 ME.MinkowskiBatchNorm(b), ME.MinkowskiReLU())

        self.stem = cbr(cin, 32, kernel_size=3)
        self.down1, self.enc1 = cbr(32, 64, kernel_size=2, stride=2), cbr(64, 64, kernel_size=3)
        self.down2, self.enc2 = cbr(64, 128, kernel_size=2, stride=2), cbr(128, 128, kernel_size=3)
        self.up2, self.dec2 = tbr(128, 64), cbr(128, 64, kernel_size=3)
        self.up1, self.dec1 = tbr(64, 32), cbr(64, 32, kernel_size=3)
        self.head = ME.MinkowskiLinear(32, classes)

    def forward(self, x):
        s0 = self.stem(x)
        s1 = self.enc1(self.down1(s0))
        s2 = self.enc2(self.down2(s1))
        y = self.dec2(ME.cat(self.up2(s2), s1))
        y = self.dec1(ME.cat(self.up1(y), s0))
        return self.head(y)


def ours_input(coords, feats):
    return ME.SparseTensor(feats, torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1))


# ----------------------------------------------------------------------------- spconv
def spconv_modules():
    import spconv.pytorch as spc
    import spconv.pytorch.ops as spc_ops

    if not torch.cuda.is_available():
        # spconv 2.3.8's CPU backward (ops.indice_conv_backward) calls
        # torch.cuda.current_stream() unconditionally, which raises on a CPU build of torch
        # ("Torch not compiled with CUDA enabled").  Its forward passes stream 0 on the CPU;
        # the backward gets the same, so spconv's own CPU kernels run (nothing else changes).
        spc_ops.get_current_stream = lambda: 0

    class SpUNet(nn.Module):
        def __init__(self, cin=4, classes=8):
            super().__init__()

            def bnr(c):
                return nn.Sequential(nn.BatchNorm1d(c), nn.ReLU())

            self.stem = spc.SparseSequential(spc.SubMConv3d(cin, 32, 3, bias=False, indice_key="s0"), bnr(32))
            self.down1 = spc.SparseSequential(spc.SparseConv3d(32, 64, 2, 2, bias=False, indice_key="d1"), bnr(64))
            self.enc1 = spc.SparseSequential(spc.SubMConv3d(64, 64, 3, bias=False, indice_key="s1"), bnr(64))
            self.down2 = spc.SparseSequential(spc.SparseConv3d(64, 128, 2, 2, bias=False, indice_key="d2"), bnr(128))
            self.enc2 = spc.SparseSequential(spc.SubMConv3d(128, 128, 3, bias=False, indice_key="s2"), bnr(128))
            self.up2 = spc.SparseSequential(spc.SparseInverseConv3d(128, 64, 2, bias=False, indice_key="d2"), bnr(64))
            self.dec2 = spc.SparseSequential(spc.SubMConv3d(128, 64, 3, bias=False, indice_key="s1"), bnr(64))
            self.up1 = spc.SparseSequential(spc.SparseInverseConv3d(64, 32, 2, bias=False, indice_key="d1"), bnr(32))
            self.dec1 = spc.SparseSequential(spc.SubMConv3d(64, 32, 3, bias=False, indice_key="s0"), bnr(32))
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            s0 = self.stem(x)
            s1 = self.enc1(self.down1(s0))
            s2 = self.enc2(self.down2(s1))
            u = self.up2(s2)
            y = self.dec2(u.replace_feature(torch.cat([u.features, s1.features], 1)))
            u = self.up1(y)
            y = self.dec1(u.replace_feature(torch.cat([u.features, s0.features], 1)))
            return y.replace_feature(self.head(y.features))

    return spc, SpUNet


def spconv_input(spc, coords, feats):
    bc = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    # spconv's strided layers only produce outputs inside the spatial shape:
    # (shape - kernel) // stride + 1 sites per axis.  With an odd extent the last slice of
    # voxels has no output site and is dropped; in these scenes that slice is a whole wall
    # (x or y = room side), 21% of the voxels at 100k.  Round the shape up to a multiple of 4
    # (the U-Net's two stride-2 levels) so every voxel is kept, as in MinkowskiEngine and
    # ours (unbounded coordinates): both sides then do the same work.
    shape = ((coords.max(0).values + 1 + 3) // 4 * 4).tolist()
    return spc.SparseConvTensor(feats, bc, shape, 1)


def unet_sites(net_o, net_s, spc, coords, feats) -> list[int]:
    """Active sites at strides 1, 2, 4 in both U-Nets (raises if they differ)."""
    with torch.no_grad():
        x = ours_input(coords, feats)
        net_o(x)
        cm = x.coordinate_manager
        ours = [cm.size(ME.CoordinateMapKey((s, s, s))) for s in (1, 2, 4)]
        theirs = [len(coords)] + [
            int(v.out_indices.shape[0]) for k, v in net_s(spconv_input(spc, coords, feats)).indice_dict.items()
            if k in ("d1", "d2")]
    if ours != theirs:
        raise RuntimeError(f"the two U-Nets compute on different sites: ours {ours}, spconv {theirs}")
    return ours


# ----------------------------------------------------------------------------- timing
def _step(fn, backward: bool, feats: torch.Tensor, params) -> None:
    for p in params:
        p.grad = None
    f = feats.detach().requires_grad_(backward)
    out = fn(f)
    if backward:
        out.square().sum().backward()


def measure(systems: dict, rounds: int, backward: bool) -> dict:
    times = {name: [] for name in systems}
    for fn, f, params in systems.values():  # warm-up (allocator, first-call imports)
        _step(fn, backward, f, params)
    for _ in range(rounds):
        for name, (fn, f, params) in systems.items():
            t0 = time.perf_counter()
            _step(fn, backward, f, params)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: {"median_ms": statistics.median(v), "min_ms": min(v), "runs": len(v), "times_ms": v}
            for n, v in times.items()}


def paired_ratio(res: dict, a: str = "ours", b: str = "spconv", draws: int = 10_000) -> dict:
    """The median over rounds of ``a``'s time over ``b``'s in the same round, with a 95% bootstrap
    interval (rounds resampled, seeded).  Rounds interleave the systems, so a round's ratio cancels
    load that drifts across the run, which a ratio of the two medians does not."""
    r = np.asarray(res[a]["times_ms"]) / np.asarray(res[b]["times_ms"])
    rng = np.random.default_rng(0)
    boot = np.median(r[rng.integers(0, len(r), (draws, len(r)))], axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"paired_ratio_median": float(np.median(r)), "paired_ratio_ci95": [float(lo), float(hi)]}


def dense_fits(coords: torch.Tensor, channels: int, limit_bytes: float) -> bool:
    cells = math.prod((coords.max(0).values + 1).tolist())
    return cells * channels * 4 * 4 < limit_bytes  # input, output and their gradients


def _git() -> tuple[str, bool]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "runtime/spatial", "sparsify/spatial",
                                "benchmarks/bench_spatial.py"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head, bool(dirty)
    except OSError:
        return "unknown", False


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-limit-gb", type=float, default=4.0)
    ap.add_argument("--unet-max", type=int, default=1_000_000, help="largest size to run the U-Net at")
    ap.add_argument("--workloads", nargs="+", choices=["conv", "unet"], default=["conv", "unet"],
                    help="which workloads to run (a partial run for profiling; the table needs both)")
    ap.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"],
                    help="which passes to time")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "spatial_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = list(os.getloadavg())
    spc, SpUNet = spconv_modules()
    import spconv

    rows = []
    for n in args.sizes:
        coords = indoor_scene(n)
        extent = (coords.max(0).values + 1).tolist()
        occupancy = len(coords) / math.prod(extent)
        print(f"# {len(coords)} voxels, grid {extent}, occupancy {occupancy:.4f}", flush=True)
        rounds = args.rounds if n <= 300_000 else max(3, args.rounds // 2)

        backwards = [b for b, name in ((False, "fwd"), (True, "fwd+bwd")) if name in args.passes]
        # ---- one 3x3x3 convolution
        if "conv" in args.workloads:
            f32 = torch.randn(len(coords), 32)
            ours = ME.MinkowskiConvolution(32, 32, kernel_size=3, dimension=3)
            theirs = spc.SubMConv3d(32, 32, 3, bias=False, indice_key="c")
            with torch.no_grad():  # the same weights: ME [K, in, out], spconv [out, k, k, k, in]
                k_me = ours.kernel.detach().reshape(3, 3, 3, 32, 32)  # [kz, ky, kx, in, out]
                theirs.weight.copy_(k_me.permute(4, 2, 1, 0, 3).contiguous())
            systems = {
                "ours": (lambda f, m=ours, c=coords: m(ours_input(c, f)).F, f32, list(ours.parameters())),
                "spconv": (lambda f, m=theirs, c=coords: m(spconv_input(spc, c, f)).features, f32,
                           list(theirs.parameters())),
            }
            # same weights, same data: check the two agree before timing them
            a = systems["ours"][0](f32)
            b_ = theirs(spconv_input(spc, coords, f32))
            order = {tuple(r): i for i, r in enumerate(b_.indices[:, 1:].tolist())}
            perm = torch.tensor([order[tuple(r)] for r in coords.tolist()])
            agree = float((a - b_.features[perm]).norm() / b_.features.norm())
            if dense_fits(coords, 32, args.dense_limit_gb * 2**30):
                dense = nn.Conv3d(32, 32, 3, padding=1, bias=False)
                idx = coords.long().unbind(1)

                def dense_fn(f, dense=dense, idx=idx, extent=extent):
                    grid = f.new_zeros(*extent, 32).index_put(idx, f)
                    y = dense(grid.permute(3, 0, 1, 2)[None])
                    return y[0].permute(1, 2, 3, 0)[idx]

                systems["dense conv3d"] = (dense_fn, f32, list(dense.parameters()))
            for backward in backwards:
                res = measure(systems, rounds, backward)
                row = {"workload": "conv 3x3x3 32->32", "pass": "fwd+bwd" if backward else "fwd", "voxels": len(coords),
                       "grid": extent, "occupancy": occupancy, "ours_vs_spconv_rel_diff": agree, **{
                           k: v for k, v in res.items()}}
                row["ratio_ours_spconv"] = res["ours"]["median_ms"] / res["spconv"]["median_ms"]
                row.update(paired_ratio(res))
                if "dense conv3d" in res:
                    row["ratio_ours_dense"] = res["ours"]["median_ms"] / res["dense conv3d"]["median_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)

        # ---- the U-Net
        if n <= args.unet_max and "unet" in args.workloads:
            f4 = torch.randn(len(coords), 4)
            net_o, net_s = OursUNet().train(), SpUNet().train()
            # both networks must compute on the same sites at every level before they are timed
            sites = unet_sites(net_o, net_s, spc, coords, f4)
            systems = {
                "ours": (lambda f, m=net_o, c=coords: m(ours_input(c, f)).F, f4, list(net_o.parameters())),
                "spconv": (lambda f, m=net_s, c=coords: m(spconv_input(spc, c, f)).features, f4,
                           list(net_s.parameters())),
            }
            for backward in backwards:
                res = measure(systems, rounds, backward)
                row = {"workload": "MinkUNet-style", "pass": "fwd+bwd" if backward else "fwd", "voxels": len(coords),
                       "grid": extent, "occupancy": occupancy, "sites_per_level": sites, **res,
                       "ratio_ours_spconv": res["ours"]["median_ms"] / res["spconv"]["median_ms"],
                       **paired_ratio(res)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    head, dirty = _git()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": head + ("-dirty" if dirty else ""),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "load_average_start": load_start,
                    "load_average": list(os.getloadavg())},
        "threads": args.threads, "rounds": args.rounds, "workloads": args.workloads, "passes": args.passes,
        "torch": torch.__version__, "spconv": spconv.__version__, "python": sys.version.split()[0],
        "voxel_size_m": VOXEL,
    }
    out = {"meta": meta, "rows": rows}
    print(table(out))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    return out


def table(out: dict) -> str:
    lines = ["| workload | pass | voxels | occupancy | ours (ms) | spconv (ms) | dense conv3d (ms) | ours / spconv "
             "| paired ratio [95% CI] | ours / dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        d = r.get("dense conv3d")
        miss = " **miss**" if r["ratio_ours_spconv"] > 1.0 else ""
        lines.append(
            f"| {r['workload']} | {r['pass']} | {r['voxels']:,} | {r['occupancy']:.4f} | {r['ours']['median_ms']:.1f} | "
            f"{r['spconv']['median_ms']:.1f} | {d['median_ms']:.1f} |" if d else
            f"| {r['workload']} | {r['pass']} | {r['voxels']:,} | {r['occupancy']:.4f} | {r['ours']['median_ms']:.1f} | "
            f"{r['spconv']['median_ms']:.1f} | - |")
        ci = r.get("paired_ratio_ci95")
        paired = f"{r['paired_ratio_median']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
        lines[-1] += (f" {r['ratio_ours_spconv']:.2f}{miss} | {paired} | "
                      + (f"{r['ratio_ours_dense']:.3f} |" if d else "- |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
