"""The CPU executor's train-mode path choice before and after its 2026-12-01 refit, in one run.

A training step of ``BlockSparseLinear`` (forward, then dX and dW) under the first version's
rules and under the refit ones, against dense autograd of ``x @ W.T`` (dW of the full matrix).
The first version gathered dW below density 0.3 at any row count, in 64 MiB chunks, and chose the
forward and dX paths as for inference, where the dense weight is cached.  The refit
(``runtime/executors/cpu.py``) gathers dW only where that wins (``dw_path``, ``DW_GATHER_*``,
``_DW_GATHER_BYTES``).  It also moves large weights off the dense path when that path would
rebuild the weight on every call (``rebuilt_path``, ``REBUILT_*``).  The
three run in turn inside every round (``sparsify.bench.time_interleaved``), so load that comes
and goes falls on all of them alike; medians, warm-up excluded.  The shapes: the 4096 x 4096 /
block 32 of ``python -m sparsify.bench bsmm``, and MiniLM's FFN projections (384 x 1536 and
1536 x 384, block 16) at 336 rows, a distillation batch of ``bench_accuracy.py``.

    python benchmarks/bench_train_paths.py [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from sparsify.runtime.executors import cpu

from sparsify.bench import _machine, _random_layout, time_interleaved
from sparsify.modules import BlockSparseLinear

HERE = Path(__file__).resolve().parent
SHAPES = ((4096, 4096, 32, (1, 64, 1024)), (384, 1536, 16, (336,)), (1536, 384, 16, (336,)))
DENSITIES = (0.5, 0.25, 0.1, 0.05)
#: (DW_GATHER_DENSITY, DW_GATHER_FEW_ROWS, _DW_GATHER_BYTES) of each rule.
RULES = {"first": (0.3, 0, 64 << 20),
         "refit": (cpu.DW_GATHER_DENSITY, cpu.DW_GATHER_FEW_ROWS, cpu._DW_GATHER_BYTES)}


_REBUILT_PATH = cpu.rebuilt_path


def _unchanged(path, *_):
    return path


def _use(rule: str) -> None:
    cpu.DW_GATHER_DENSITY, cpu.DW_GATHER_FEW_ROWS, cpu._DW_GATHER_BYTES = RULES[rule]
    cpu.rebuilt_path = _REBUILT_PATH if rule == "refit" else _unchanged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default: results/bsmm_cpu_train_paths_<threads>thread.json")
    args = ap.parse_args()
    if os.environ.get("SPARSIFY_CPU_PATH"):
        raise SystemExit("unset SPARSIFY_CPU_PATH: it overrides the rules compared here")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print("| shape | block | density | M | dense fwd+bwd (ms) | first rule (ms) | refit (ms) | first / dense | "
          "refit / dense |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for n, k, b, ms in SHAPES:
            for density in DENSITIES:
                layout = _random_layout(n, k, b, density, gen)
                w = torch.randn(n, k, generator=gen) / math.sqrt(k) * layout.element_mask()
                layer = BlockSparseLinear.from_weight(w, None, layout).train()
                for m in ms:
                    x = torch.randn(m, k, generator=gen).requires_grad_(True)
                    g = torch.randn(m, n, generator=gen)
                    wd = w.clone().requires_grad_(True)

                    def dense(x=x, g=g, wd=wd):
                        wd.grad = x.grad = None
                        (x @ wd.T).backward(g)

                    def ours(rule, x=x, g=g, layer=layer):
                        def step():
                            _use(rule)
                            layer.values.grad = x.grad = None
                            layer(x).backward(g)
                        return step

                    t = time_interleaved({"dense": dense, "first": ours("first"), "refit": ours("refit")},
                                         rounds=7 if n * k > 1 << 22 else 15)
                    med = {name: statistics.median(v) * 1e3 for name, v in t.items()}
                    row = {"shape": [n, k], "block": b, "density": density, "M": m,
                           "dw_path_first": "gather" if layout.density < RULES["first"][0] else "dense",
                           "dw_path_refit": cpu.dw_path(m, layout.density),
                           "forward_path_refit": _REBUILT_PATH(
                               cpu.choose_path(m, layout.density, torch.float32, n * k), m, layout.density,
                               torch.float32, n * k, "forward"),
                           "dx_path_refit": _REBUILT_PATH(cpu.choose_path(m, layout.density, torch.float32), m,
                                                          layout.density, torch.float32, n * k, "grad_input"),
                           "median_ms": {name: round(v, 4) for name, v in med.items()},
                           "first_over_dense": round(med["first"] / med["dense"], 3),
                           "refit_over_dense": round(med["refit"] / med["dense"], 3)}
                    rows.append(row)
                    print(f"| {n} x {k} | {b} | {density} | {m} | {med['dense']:.2f} | {med['first']:.2f} | "
                          f"{med['refit']:.2f} | {row['first_over_dense']:.2f} | {row['refit_over_dense']:.2f} |",
                          flush=True)
    finally:
        _use("refit")
    out = Path(args.out or HERE / "results" / f"bsmm_cpu_train_paths_{args.threads}thread.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"benchmark": "bsmm train-mode paths", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "machine": _machine(), "threads": args.threads, "rules": {
                                   k: {"DW_GATHER_DENSITY": v[0], "DW_GATHER_FEW_ROWS": v[1],
                                       "DW_GATHER_BYTES": v[2], "rebuilt_path": k == "refit"}
                                   for k, v in RULES.items()},
                               "rows": rows}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
