"""How far distillation goes past the CPU budget: all-MiniLM-L6-v2 on a GPU, without transformers.

``bench_accuracy.py`` measures the accuracy targets on the CPU with transformers' BertModel.
The GPU machines this project is lent have neither transformers nor the model package, and
what can be carried to them is limited, so this script splits the work:

* ``prepare DIR`` (here, with the test extra installed): tokenizes the held-out, calibration
  and distillation sentences (Shakespeare, or fortunes with ``--corpus fortunes``) exactly as
  ``bench_accuracy.py`` does, keeps only the
  rows of the word-embedding table those tokens use (renumbering the ids, which changes no
  output), and writes the weights and token ids to ``DIR/minilm.stz`` (safetensors bytes,
  byte-shuffled and zlib-compressed to 83%: 57 MB with the fortunes corpus' 15k-token vocabulary,
  which as plain safetensors would exceed the device tool's 64 MiB carry limit) and a
  slimmed copy of tensorly to ``DIR/pylib`` (1 MB; the GPU machines lack it).  It checks that :class:`MiniBert` (the same computation in plain torch, with BertModel's
  module names) gives transformers' embeddings on the held-out sentences.
* ``run DIR --out FILE`` (on any device): converts the model as ``bench_accuracy.py``'s
  calibrated half-budget cells do, distills it with ``sparsify.finetune`` (hidden states of
  every layer, batches grouped by length) for each step count asked for, one cosine schedule
  per count, and records the held-out cosines, the step time and the device.  Results are
  written after every run, so a run cut short keeps what it finished.

Nothing here is a test; the figures it writes are measurements of one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_accuracy import Encoder  # noqa: E402  (mean pooling + normalization; no transformers import)

LAYERS, HEADS, HIDDEN, EPS = 6, 12, 384, 1e-12


# ----------------------------------------------------------------------------- the model
class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h, bias):
        b, t, _ = h.shape

        def heads(x):
            return x.view(b, t, HEADS, HIDDEN // HEADS).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.query(h)), heads(self.key(h)), heads(self.value(h)),
                                           attn_mask=bias)
        return a.transpose(1, 2).reshape(b, t, HIDDEN)


class _Out(nn.Module):
    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, HIDDEN), nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self, self.output = _SelfAttention(), _Out(HIDDEN)

    def forward(self, h, bias):
        return self.output(self.self(h, bias), h)


class _Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(HIDDEN, 4 * HIDDEN)

    def forward(self, h):
        return F.gelu(self.dense(h))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.intermediate, self.output = _Attention(), _Intermediate(), _Out(4 * HIDDEN)

    def forward(self, h, bias):
        a = self.attention(h, bias)
        return self.output(self.intermediate(a), a)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, HIDDEN)
        self.position_embeddings = nn.Embedding(512, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, ids, types):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None]
                              + self.token_type_embeddings(types))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer() for _ in range(LAYERS))


class MiniBert(nn.Module):
    """BertModel's computation for all-MiniLM-L6-v2 (absolute positions, exact GELU, eval only),
    with its parameter names; returns ``(last_hidden_state,)``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embeddings, self.encoder = _Embeddings(vocab), _Encoder()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        h = self.embeddings(input_ids, types)
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.encoder.layer:
            h = layer(h, bias)
        return (h,)


# ----------------------------------------------------------------------------- prepare
def _pack(name: str, batches: list[dict], remap: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for i, b in enumerate(batches):
        out[f"{name}.{i}.ids"] = remap[b["input_ids"]].to(torch.int32).contiguous()
        out[f"{name}.{i}.mask"] = b["attention_mask"].to(torch.int8).contiguous()
    return out


def prepare(out_dir: Path, distill_sentences: int, corpus: str = "shakespeare") -> None:
    import bench_accuracy as A
    from safetensors.torch import save


    torch.manual_seed(0)
    tok, enc_hf = A.load()
    held_s, cal_s = A.held_out(), A.calibration_sentences(512)
    dis_s = (A.fortune_sentences if corpus == "fortunes" else A.shakespeare_sentences)(distill_sentences)
    if set(dis_s) & set(held_s):
        sys.exit("distillation sentences overlap the held-out ones")
    held, calib = A.batches(tok, held_s, 64), A.batches(tok, cal_s, 32)
    distill = A.length_grouped_batches(tok, dis_s, 16)
    used = torch.unique(torch.cat([b["input_ids"].flatten() for b in held + calib + distill] + [torch.tensor([0])]))
    remap = torch.full((enc_hf.bert.config.vocab_size,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    sd = {k: v for k, v in enc_hf.bert.state_dict().items() if k.startswith(("embeddings.", "encoder."))}
    sd.pop("embeddings.position_ids", None)
    sd["embeddings.word_embeddings.weight"] = sd["embeddings.word_embeddings.weight"][used].clone()
    mini = MiniBert(len(used))
    mini.load_state_dict(sd)
    enc = Encoder(mini).eval()
    with torch.no_grad():
        ref = torch.cat([enc_hf(**b) for b in held])
        got = torch.cat([enc(input_ids=remap[b["input_ids"]], attention_mask=b["attention_mask"]) for b in held])
    err = float((got - ref).abs().max())
    print(f"MiniBert vs transformers on {len(held_s)} held-out sentences: max |diff| {err:.2e}")
    if err > 1e-4:
        sys.exit("MiniBert does not compute what transformers' BertModel does; not writing")
    tensors = {f"weight.{k}": v.contiguous() for k, v in sd.items()}
    tensors.update(_pack("held", held, remap))
    tensors.update(_pack("calib", calib, remap))
    tensors.update(_pack("distill", distill, remap))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"vocab": str(len(used)), "held_sentences": str(len(held_s)), "distill_sentences": str(len(dis_s)),
            "distill_corpus": corpus, "check_max_abs_diff": f"{err:.3e}"}
    packed = _shuffle_pack(save(tensors, metadata=meta))
    tmp = out_dir / f"{PACKED}.tmp"
    tmp.write_bytes(packed)
    tmp.replace(out_dir / PACKED)
    (out_dir / "minilm.safetensors").unlink(missing_ok=True)  # the unpacked form of an earlier version
    _slim_tensorly(out_dir / "pylib")
    print(f"wrote {out_dir / PACKED} ({len(packed) / 1e6:.1f} MB): vocab {len(used)} of "
          f"{enc_hf.bert.config.vocab_size}, {len(distill)} distillation batches")


#: The prepared file: safetensors bytes, byte-shuffled by 4 and zlib-compressed (see _shuffle_pack).
PACKED = "minilm.stz"
_MAGIC = b"SPFYSTZ1"


def _shuffle_pack(raw: bytes) -> bytes:
    """``raw`` with the k-th byte of every 4-byte word gathered together (k = 0..3), then zlib:
    float32 weights' sign / exponent bytes are nearly constant and compress, where the plain bytes
    barely do (83% against 91% of the size).  Header: magic, then the length of ``raw``."""
    pad = (-len(raw)) % 4
    words = np.frombuffer(raw + bytes(pad), dtype=np.uint8).reshape(-1, 4)
    return _MAGIC + len(raw).to_bytes(8, "little") + zlib.compress(words.T.tobytes(), 6)


def _shuffle_unpack(packed: bytes) -> bytes:
    """The inverse of :func:`_shuffle_pack`; checks the header and the length, and never inflates
    more than the header's length (at most 1 GiB), so a damaged or hostile file cannot fill memory."""
    if packed[:8] != _MAGIC:
        raise ValueError(f"not a {PACKED} file made by 'distill_sweep.py prepare' (bad header)")
    n = int.from_bytes(packed[8:16], "little")
    if n > 1 << 30:
        raise ValueError(f"{PACKED}: the header says {n} bytes, more than the 1 GiB such a file can hold")
    want = n + (-n) % 4
    inflate = zlib.decompressobj()
    flat = inflate.decompress(packed[16:], want)
    if len(flat) != want or inflate.unconsumed_tail or not inflate.eof:
        raise ValueError(f"{PACKED}: the data does not unpack to the {n} bytes its header says")
    out = np.frombuffer(flat, dtype=np.uint8).reshape(4, -1).T.tobytes()
    if any(out[n:]):
        raise ValueError(f"{PACKED}: the data is longer than the {n} bytes its header says")
    return out[:n]


def _slim_tensorly(dest: Path) -> None:
    """A copy of the installed tensorly (pure Python) without its tests and bundled datasets: 1 MB
    instead of the 7 MB wheel, so it travels beside the 57-61 MB of weights under the device tool's
    64 MiB carry limit (gpu-check puts ``.distill/pylib`` on the path where tensorly is missing)."""
    import shutil

    import tensorly

    src = Path(tensorly.__file__).parent
    shutil.rmtree(dest / "tensorly", ignore_errors=True)
    shutil.copytree(src, dest / "tensorly", ignore=shutil.ignore_patterns("tests", "__pycache__", "*.npy"))


# ----------------------------------------------------------------------------- run
def _load(path: Path, device):
    from safetensors.torch import load

    raw = _shuffle_unpack((path / PACKED).read_bytes())
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__", {})
    t = load(raw)
    mini = MiniBert(int(meta["vocab"]))
    mini.load_state_dict({k[len("weight."):]: v for k, v in t.items() if k.startswith("weight.")})

    def batches(name):
        out, i = [], 0
        while f"{name}.{i}.ids" in t:
            out.append({"input_ids": t[f"{name}.{i}.ids"].long().to(device),
                        "attention_mask": t[f"{name}.{i}.mask"].long().to(device)})
            i += 1
        return out

    return Encoder(mini).eval().to(device), batches("held"), batches("calib"), batches("distill"), meta


def _cos(model, ref, held) -> tuple[float, float]:
    with torch.no_grad():
        c = (torch.cat([model(**b) for b in held]) * ref).sum(-1)
    return float(c.mean()), float(c.min())


SETTINGS = {"low_rank": dict(method="low_rank", compression=2.0),
            "block_sparse": dict(method="block_sparse", density=0.5, block_size=16)}


def run(data: Path, out: Path, methods: list[str], steps_list: list[int], lr: float, budget_s: float) -> None:
    import sparsify

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    enc, held, calib, distill, meta = _load(data, device)
    hidden = [f"bert.encoder.layer.{i}" for i in range(LAYERS)]
    with torch.no_grad():
        ref = torch.cat([enc(**b) for b in held])
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "lr": lr, "batch": 16,
            "data": meta, "hidden": hidden, "group_by_length": True}
    info["commit"] = os.environ.get("SPARSIFY_COMMIT", "")[:7]  # gpu-check's: a device's copy of .git may be stale
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=HERE).stdout.strip()
        except OSError:
            pass
    rows: list[dict] = []

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": info, "rows": rows}, indent=1))
        tmp.replace(out)

    converted = {}
    for method in methods:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted[method] = sparsify.sparsify(enc, **SETTINGS[method], min_size=0, calibration_data=calib)
        convert_s = time.perf_counter() - t0
        mean, low = _cos(converted[method], ref, held)
        rows.append({"method": method, "steps": 0, "cos_mean": mean, "cos_min": low, "convert_s": convert_s})
        print(f"{method}: one-shot cos {mean:.4f} (min {low:.4f}), convert {convert_s:.1f}s", flush=True)
        save()
    # the cheap runs of every method before the long ones, so a budget cut drops the longest
    for steps in sorted(steps_list):
        for method in methods:
            if time.perf_counter() - t_start > budget_s:
                print(f"  budget of {budget_s:.0f}s spent; skipping {method} at {steps} steps", flush=True)
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tuned = sparsify.finetune(converted[method], teacher=enc, data=distill, steps=steps, lr=lr,
                                      hidden=hidden, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            mean, low = _cos(tuned, ref, held)
            log = tuned._sparsify_finetune
            rows.append({"method": method, "steps": steps, "cos_mean": mean, "cos_min": low, "finetune_s": dt,
                         "ms_per_step": 1e3 * dt / steps, "epochs": steps / len(distill),
                         "loss_first": log["losses"][0], "loss_last": log["losses"][-1]})
            print(f"{method} {steps:6d} steps ({steps / len(distill):.2f} epochs, {dt:.0f}s, "
                  f"{1e3 * dt / steps:.1f} ms/step): cos {mean:.4f} (min {low:.4f}), "
                  f"loss {log['losses'][0]:.3g} -> {log['losses'][-1]:.3g}", flush=True)
            save()
            del tuned
    print(f"wrote {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir", type=Path)
    p.add_argument("--distill-sentences", type=int, default=16384)
    p.add_argument("--corpus", choices=["shakespeare", "fortunes"], default="shakespeare",
                   help="the distillation text (bench_accuracy's --distill-corpus)")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--methods", nargs="+", default=["low_rank", "block_sparse"], choices=list(SETTINGS))
    r.add_argument("--steps", nargs="+", type=int, default=[1000, 4000])
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--budget-s", type=float, default=math.inf, help="start no new run after this many seconds")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.dir, a.distill_sentences, a.corpus)
    else:
        run(a.dir, a.out, a.methods, a.steps, a.lr, a.budget_s)


if __name__ == "__main__":
    main()
