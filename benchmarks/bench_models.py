"""Whole-model CPU inference: a GPT-2-small-sized model, dense against its conversions.

The model is Hugging Face's GPT2LMHeadModel from a config (random weights, nothing
downloaded): hidden 768, 12 heads, 4 layers, vocabulary 50257 (the head is tied to
the embedding and stays dense, as in the real model).  Its 16 projections (HF
``Conv1D``) are converted to block-sparse 0.25 and 0.1 (block 32) and to low rank
0.25 (a quarter of min(in, out)); every model runs ``model(ids).logits`` in eval mode
with grad off on batch 1 x 128 and 8 x 128 tokens.

Method: the contenders are interleaved round by round (each round runs every model
once, in a rotating order) after two warm-up rounds, and the median of the rounds
is reported with its ratio to the dense model's median *in the same run*.  The
tied 768 x 50257 head is a third of the dense model's FLOPs at these sizes and is
not converted, so the whole-model ratio is bounded well above the projections' own.

Run:  python benchmarks/bench_models.py [--rounds 15] [--threads N]
It prints a markdown table and writes benchmarks/results/models_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import sparsify
from sparsify.bench import _load, _machine

warnings.filterwarnings("ignore")

CONFIG = dict(n_embd=768, n_head=12, n_layer=4, n_positions=1024, vocab_size=50257)
SHAPES = [(1, 128), (8, 128)]
VARIANTS = [
    ("dense", None),
    ("block_sparse 0.25", dict(method="block_sparse", density=0.25, block_size=32)),
    ("block_sparse 0.1", dict(method="block_sparse", density=0.1, block_size=32)),
    ("low_rank 0.25", dict(method="low_rank", rank=0.25)),
]


def build():
    import transformers

    cfg = transformers.GPT2Config(**CONFIG)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "models_cpu.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = _load()
    dense = build()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 128))
    models = {}
    conversion_s = {}
    params = {}
    for name, kw in VARIANTS:
        t = time.perf_counter()
        models[name] = dense if kw is None else sparsify.sparsify(dense, example_inputs=(ids,), **kw)
        conversion_s[name] = round(time.perf_counter() - t, 2)
        params[name] = sum(p.numel() for p in models[name].parameters())
    rows = []
    for batch, seq in SHAPES:
        x = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
        times = {name: [] for name in models}
        order = list(models)
        with torch.no_grad():
            for r in range(args.rounds + 2):
                order = order[1:] + order[:1]  # rotate, so no contender always runs first
                for name in order:
                    t = time.perf_counter()
                    _ = models[name](x).logits
                    if r >= 2:
                        times[name].append(time.perf_counter() - t)
        base = statistics.median(times["dense"])
        for name in models:
            med = statistics.median(times[name])
            rows.append({"batch": batch, "seq": seq, "model": name, "median_ms": round(med * 1e3, 3),
                         "vs_dense": round(med / base, 3), "params": params[name],
                         "conversion_s": conversion_s[name]})
    info = _machine()
    info["load_start"] = load_start
    info["load"] = _load()
    out = {"benchmark": "whole-model CPU inference, GPT-2-small-sized (hidden 768, 12 heads, 4 layers)",
           "config": CONFIG, "rounds": args.rounds, "machine": info, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"GPT-2-small-sized model, CPU, {info['cpu_model']}, {info['threads']} threads, torch {info['torch']}, "
          f"{info['date']}, commit {info['git_commit']}, load {info['load']}")
    print("| tokens | model | params | median (ms) | vs dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} x {r['seq']} | {r['model']} | {r['params'] / 1e6:.1f}M | {r['median_ms']:.1f} | "
              f"{r['vs_dense']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
