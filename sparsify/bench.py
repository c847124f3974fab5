"""Micro-benchmarks of the runtime ops against torch's own baselines.

``python -m sparsify.bench bsmm [--out FILE] [--quick]`` times the block-sparse
linear on the CPU executor at K = N = 4096, float32, block 32, densities
0.5 / 0.25 / 0.1 / 0.05 and M = 1, 64, 1024 rows of input:

* inference: ``BlockSparseLinear`` in eval mode under ``torch.inference_mode()``
  (what a user runs) against dense ``x @ W.T`` with the same masked weight and
  torch's CPU BSR matmul ``bsr @ x.T`` (the fastest call form of it measured
  here; see docs/benchmarks.md);
* training: forward + backward (dX and dW) of the layer in train mode against
  dense autograd of ``x @ W.T``.

All contenders of one point are timed in the same run, interleaved round by
round, so a change in machine load hits them alike; each figure is the median
of the rounds, warm-up excluded.  The table is printed and the figures, with
the machine, torch version, thread count, date and git commit, written as JSON.
This is a script, not a test: nothing here asserts a timing.
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
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["bench_bsmm", "main", "time_interleaved"]

# Ours must never be more than this much slower than the best baseline.
TARGET_RATIO = 1.10


def time_interleaved(
    fns: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2, min_sample_s: float = 0.02,
    max_s: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, one sample per function per round.

    Functions run in turn inside every round (the order rotates), so load that
    comes and goes during the run falls on all of them alike.  A call shorter
    than ``min_sample_s`` is repeated inside its sample and the sample divided.

    Example:
        >>> t = time_interleaved({"a": lambda: sum(range(100))}, rounds=3, min_sample_s=0.001)
        >>> len(t["a"])
        3
    """
    names = list(fns)
    inner = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        t0 = time.perf_counter()
        fns[name]()
        dt = time.perf_counter() - t0
        inner[name] = max(1, math.ceil(min_sample_s / max(dt, 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn, n = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
        if max_s is not None and r >= 4 and time.perf_counter() - start > max_s:
            break
    return samples


def _random_layout(n: int, k: int, block: int, density: float, gen: torch.Generator):
    from .runtime import BlockSparseLayout

    nbr, nbc = -(-n // block), -(-k // block)
    keep = max(1, round(density * nbr * nbc))
    mask = torch.zeros(nbr * nbc, dtype=torch.bool)
    mask[torch.randperm(nbr * nbc, generator=gen)[:keep]] = True
    return BlockSparseLayout.from_block_mask(mask.view(nbr, nbc), shape=(n, k), block_size=block)


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent  # the checkout, when installed editable
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
            cwd=repo, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sparsify/bench.py", "runtime"], capture_output=True,
            text=True, cwd=repo, check=True,
        ).stdout.strip()
        if dirty:
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": "cpu",
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit,
    }


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class _forced_path:
    """Force the CPU executor onto one path for the calls inside (diagnostics only)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, fn):
        def run():
            os.environ["SPARSIFY_CPU_PATH"] = self.path
            try:
                return fn()
            finally:
                del os.environ["SPARSIFY_CPU_PATH"]
        return run


def bench_bsmm(
    *, ms=(1, 64, 1024), densities=(0.5, 0.25, 0.1, 0.05), k: int = 4096, n: int = 4096, block: int = 32,
    rounds: int = 15, train_rounds: int = 7, train: bool = True, paths: bool = False, seed: int = 0,
    log=print,
) -> dict:
    """Time ours against dense and torch BSR at every (density, M); returns the JSON-ready result."""
    from .modules import BlockSparseLinear
    from .runtime.executors import cpu as cpu_executor

    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float32
    result = {"benchmark": "bsmm", "machine": _machine(), "load_before": _load(),
              "config": {"K": k, "N": n, "block": block, "dtype": "float32", "rounds": rounds,
                         "train_rounds": train_rounds, "target_ratio": TARGET_RATIO,
                         "torch_bsr_form": "bsr @ x.T (result used through its .T view)",
                         "dense_form": "x @ W.T"},
              "forward": [], "train": []}
    for density in densities:
        layout = _random_layout(n, k, block, density, gen)
        w = torch.randn(n, k, generator=gen, dtype=dtype) / math.sqrt(k) * layout.element_mask()
        layer = BlockSparseLinear.from_weight(w, None, layout).eval()
        bsr = w.to_sparse_bsr((block, block))
        for m in ms:
            x = torch.randn(m, k, generator=gen, dtype=dtype)
            with torch.inference_mode():
                fns = {"dense": lambda x=x, w=w: x @ w.T, "torch_bsr": lambda x=x, bsr=bsr: bsr @ x.T,
                       "ours": lambda x=x, layer=layer: layer(x)}
                if paths:
                    for p in cpu_executor.PATHS:
                        fns[f"ours[{p}]"] = _forced_path(p)(lambda x=x, layer=layer: layer(x))
                err = (layer(x) - x @ w.T).abs().max().item()
                t = time_interleaved(fns, rounds=rounds)
            med = {name: statistics.median(v) for name, v in t.items()}
            best = min(med["dense"], med["torch_bsr"])
            row = {"density": density, "M": m, "nnz_blocks": layout.nnz,
                   "path": cpu_executor.choose_path(m, layout.density, dtype, w.numel()),
                   "median_ms": {name: round(v * 1e3, 4) for name, v in med.items()},
                   "ratio_vs_dense": round(med["ours"] / med["dense"], 3),
                   "ratio_vs_torch_bsr": round(med["ours"] / med["torch_bsr"], 3),
                   "ratio_vs_best": round(med["ours"] / best, 3), "max_abs_err": err,
                   "samples": len(t["ours"])}
            row["meets_target"] = row["ratio_vs_best"] <= TARGET_RATIO
            result["forward"].append(row)
            log(_fmt_fwd(row, paths), flush=True)
        if train:
            for m in ms:
                x = torch.randn(m, k, generator=gen, dtype=dtype)
                g = torch.randn(m, n, generator=gen, dtype=dtype)
                layer.train()
                wd = w.clone().requires_grad_(True)
                xd = x.clone().requires_grad_(True)
                xs = x.clone().requires_grad_(True)

                def dense_step(xd=xd, g=g, wd=wd):
                    wd.grad = xd.grad = None
                    (xd @ wd.T).backward(g)

                def ours_step(xs=xs, g=g, layer=layer):
                    layer.values.grad = xs.grad = None
                    layer(xs).backward(g)

                t = time_interleaved({"dense": dense_step, "ours": ours_step}, rounds=train_rounds)
                med = {name: statistics.median(v) for name, v in t.items()}
                row = {"density": density, "M": m,
                       "median_ms": {name: round(v * 1e3, 4) for name, v in med.items()},
                       "ratio_vs_dense": round(med["ours"] / med["dense"], 3), "samples": len(t["ours"])}
                result["train"].append(row)
                log(_fmt_train(row), flush=True)
                layer.values.grad = None
            layer.eval()
    result["load_after"] = _load()
    return result


def _fmt_fwd(row: dict, paths: bool = False) -> str:
    t = row["median_ms"]
    s = (f"d={row['density']:<5} M={row['M']:<5} dense {t['dense']:9.3f}  torch_bsr {t['torch_bsr']:9.3f}  "
         f"ours {t['ours']:9.3f} [{row['path']:>6}]  ours/dense {row['ratio_vs_dense']:5.2f}  "
         f"ours/bsr {row['ratio_vs_torch_bsr']:5.2f}  ours/best {row['ratio_vs_best']:5.2f}"
         f"{'' if row['meets_target'] else '  MISS'}")
    if paths:
        s += "  | " + " ".join(f"{k[5:-1]} {v:.3f}" for k, v in t.items() if k.startswith("ours["))
    return s


def _fmt_train(row: dict) -> str:
    t = row["median_ms"]
    return (f"train d={row['density']:<5} M={row['M']:<5} dense fwd+bwd {t['dense']:9.3f}  "
            f"ours {t['ours']:9.3f}  ours/dense {row['ratio_vs_dense']:5.2f}")


def markdown_tables(result: dict) -> str:
    """The forward and training tables of ``result`` as Markdown."""
    lines = ["| density | M | dense `x @ W.T` (ms) | torch BSR (ms) | ours (ms) | path | ours / dense | "
             "ours / torch BSR | ours / best |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["forward"]:
        t = r["median_ms"]
        mark = "" if r["meets_target"] else " **miss**"
        lines.append(f"| {r['density']} | {r['M']} | {t['dense']:.3f} | {t['torch_bsr']:.3f} | {t['ours']:.3f} | "
                     f"{r['path']} | {r['ratio_vs_dense']:.2f} | {r['ratio_vs_torch_bsr']:.2f} | "
                     f"{r['ratio_vs_best']:.2f}{mark} |")
    if result["train"]:
        lines += ["", "| density | M | dense autograd fwd+bwd (ms) | ours fwd+bwd (ms) | ours / dense |",
                  "|---|---|---|---|---|"]
        for r in result["train"]:
            t = r["median_ms"]
            lines.append(f"| {r['density']} | {r['M']} | {t['dense']:.3f} | {t['ours']:.3f} | "
                         f"{r['ratio_vs_dense']:.2f} |")
    return "\n".join(lines)


def _is_result(path: Path) -> bool:
    """A JSON this benchmark wrote (the only kind ``--force`` replaces)."""
    from .errors import InputError
    from .files import parse_json, read_regular

    try:
        doc = parse_json(read_regular(path.parent, path.name, max_bytes=256 * 2**20, what="result"), str(path))
    except InputError:
        return False
    return isinstance(doc, dict) and doc.get("benchmark") == "bsmm"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsify.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    b = sub.add_parser("bsmm", help="block-sparse linear (CPU) vs dense and torch BSR")
    b.add_argument("--out", type=Path, default=None, help="write the JSON here, a new file (default: bsmm_cpu.json)")
    b.add_argument("--force", action="store_true", help="replace an existing --out that this benchmark wrote")
    b.add_argument("--quick", action="store_true", help="fewer rounds and a smaller grid, for a smoke run")
    b.add_argument("--no-train", action="store_true", help="skip the training (forward + backward) table")
    b.add_argument("--paths", action="store_true", help="also time each executor path forced")
    b.add_argument("--rounds", type=int, default=None, help="rounds per point (default 15, quick 5)")
    b.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    b.add_argument("--markdown", action="store_true", help="print the tables as Markdown at the end")
    args = p.parse_args(argv)
    out = args.out or Path("bsmm_cpu.json")
    if (out.exists() or out.is_symlink()) and not (args.force and out.is_file() and _is_result(out)):
        p.error(f"--out {out} exists{'' if args.force else '; pass --force to replace a result of this benchmark'}"
                f"{' and was not written by this benchmark' if args.force else ''}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        kw = dict(ms=(1, 64, 256), densities=(0.5, 0.1), k=1024, n=1024, rounds=args.rounds or 5,
                  train_rounds=3)
    else:
        kw = dict(rounds=args.rounds or 15)
    info = _machine()
    print(f"bsmm on {info['cpu_model']}, torch {info['torch']}, {info['threads']} threads, "
          f"commit {info['git_commit']}, load {_load()}")
    res = bench_bsmm(train=not args.no_train, paths=args.paths, **kw)
    misses = [r for r in res["forward"] if not r["meets_target"]]
    print(f"target ours <= {TARGET_RATIO:.2f} x best baseline: "
          f"{'met at every point' if not misses else f'missed at {len(misses)} point(s)'}; load {_load()}")
    out = args.out or Path("bsmm_cpu.json")
    from .io import write_file

    # A new file, created exclusively with the umask's mode; --force replaces only a result of ours.
    write_file(out, json.dumps(res, indent=1) + "\n", force=args.force, is_ours=_is_result, what="--out")
    print(f"wrote {out}")
    if args.markdown:
        print(markdown_tables(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
