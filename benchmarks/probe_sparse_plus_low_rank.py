"""Would a block-sparse + low-rank sum beat either alone at the same parameters?  One-shot, per layer.

A probe for issue 10 (accuracy at half the Linear parameters of all-MiniLM-L6-v2), not a method
sparsify offers: before building a hybrid layer ``W ~ S + A B`` (``S`` 16x16 block-sparse, ``A B``
low rank), measure whether it fits the trained weights better than its parts.

For every Linear of the encoder (36) and each split ``f`` of the layer's budget (half its
parameters) between the parts: ``S`` keeps ``f / 2`` of the blocks, ``A B`` has rank
``(1 - f) * (out * in / 2) / (out + in)``.  ``f = 0`` is low rank alone (whitened SVD), ``f = 1``
block-sparse alone (blocks chosen by saliency, refit by least squares), each exactly as
sparsify's calibrated conversions fit them (``sparsify.calibration``), without the budget
allocation across layers.  In between, alternating minimization (as OATS, Zhang et al. 2025, does
for unstructured sparsity): ``A B`` = whitened SVD of ``W - S``, then ``S`` = blocks of ``W - A B``
chosen and refit, ``--iters`` times.  Each cell is the relative output error on the calibration
inputs, ``||X (W - W')^T|| / ||X W^T||``, from the inputs' second moment (512 phrase-grammar
sentences, as ``bench_accuracy.py`` calibrates; the original model's inputs, not sequential).

``python benchmarks/probe_sparse_plus_low_rank.py`` prints a table and writes
``benchmarks/results/sparse_plus_low_rank_probe.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import bench_accuracy as ba  # noqa: E402

from sparsify.calibration import InputStats, damped, refit_blocks, select_blocks, whitened_svd  # noqa: E402


def rel_error(w: torch.Tensor, w_new: torch.Tensor, h: torch.Tensor) -> float:
    d = w - w_new
    return math.sqrt(float(torch.einsum("od,de,oe->", d, h, d)) / float(torch.einsum("od,de,oe->", w, h, w)))


def hybrid(w: torch.Tensor, hd: torch.Tensor, f: float, block: int, iters: int) -> tuple[torch.Tensor, int, int]:
    """``S + A B`` with ``f`` of half the layer's parameters in ``S``: (weight, rank, kept blocks)."""
    o, i = w.shape
    density, rank = f * 0.5, int(round((1 - f) * 0.5 * o * i / (o + i)))
    low, sparse = torch.zeros_like(w), torch.zeros_like(w)
    blocks = 0
    for _ in range(iters if 0 < f < 1 else 1):
        if rank > 0:
            low = (lambda ab: ab[0] @ ab[1])(whitened_svd(w - sparse, hd)[1](rank))
        if density > 0:
            mask = select_blocks(w - low, hd, density, block).block_mask()
            sparse, blocks = refit_blocks(w - low, hd, mask, block), int(mask.sum())
    return sparse + low, rank, blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="the share of each layer's budget in the block-sparse part")
    ap.add_argument("--iters", type=int, default=6, help="alternating rounds for a split")
    ap.add_argument("--damping", type=float, default=0.1, help="as sparsify's calibration_damping (its default)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "sparse_plus_low_rank_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.process_time()
    tok, enc = ba.load()
    calib = ba.batches(tok, ba.calibration_sentences(512), 32)
    stats: dict[str, InputStats] = {}
    hooks = []
    for name, m in enc.named_modules():
        if isinstance(m, torch.nn.Linear):
            stats[name] = InputStats.empty(1, m.in_features)
            hooks.append(m.register_forward_hook(
                lambda mod, a, o, name=name: stats[name].add(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in calib:
            enc(**b)
    for h in hooks:
        h.remove()
    mods = dict(enc.named_modules())
    rows = []
    head = "| layer | " + " | ".join(f"f={f:g}" for f in args.fractions) + " |"
    print(head + "\n|---|" + "---|" * len(args.fractions), flush=True)
    for name, st in stats.items():
        w = mods[name].weight.detach().double()
        hd = damped(st.h, args.damping)[0][0]
        cells = []
        for f in args.fractions:
            w_new, rank, blocks = hybrid(w, hd, f, args.block_size, args.iters)
            cells.append({"fraction_sparse": f, "rank": rank, "blocks": blocks,
                          "params": rank * sum(w.shape) + blocks * args.block_size ** 2,
                          "rel_output_error": rel_error(w, w_new, st.h[0])})
        rows.append({"layer": name, "shape": list(w.shape), "cells": cells})
        print(f"| {name.removeprefix('bert.encoder.layer.')} | "
              + " | ".join(f"{c['rel_output_error']:.3f}" for c in cells) + " |", flush=True)
    sums = [sum(r["cells"][k]["rel_output_error"] for r in rows) for k in range(len(args.fractions))]
    print("| **sum** | " + " | ".join(f"**{s:.3f}**" for s in sums) + " |")
    best = [min(range(len(args.fractions)), key=lambda k: r["cells"][k]["rel_output_error"]) for r in rows]
    print("layers where a split beats both parts alone: "
          f"{sum(1 for k in best if 0 < args.fractions[k] < 1)} of {len(rows)}")
    out = ba.write_results(args.out, rows, {
        "cpu_s": time.process_time() - t0, "iters": args.iters, "damping": args.damping,
        "block_size": args.block_size, "calibration_sentences": 512,
        "sum_rel_output_error": dict(zip(map(str, args.fractions), sums))})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
