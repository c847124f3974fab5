"""Write a synthetic Hugging Face checkpoint, sharded like HF's: config.json, model-0000k-of-0000n.safetensors
and model.safetensors.index.json (issue 14: the streaming-conversion benchmark reads it).

The model is a ``LlamaForCausalLM`` (untied embeddings) sized to about ``--size-gb`` of float32 weights;
the shard plan is huggingface_hub's ``split_torch_state_dict_into_shards`` over the model's state dict
built on the ``meta`` device, and each shard's tensors are drawn (one shard in memory at a time, from a
generator seeded by the tensor's name) and written with safetensors.  Peak memory is one shard.

    python benchmarks/make_sharded_checkpoint.py --out /tmp/ckpt --size-gb 2.2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 2048, 5632, 16, 8192


def llama_config(size_gb: float) -> dict:
    """A Llama config whose float32 weights take about ``size_gb`` GB (1e9 bytes)."""
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, math.ceil((size_gb * 1e9 / 4 - fixed) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "torch_dtype": "float32", "rms_norm_eps": 1e-5,
    }


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _draw(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape)
    g = torch.Generator().manual_seed(_seed(name, seed))
    return torch.randn(shape, generator=g).mul_(0.02)


def make(out: Path, size_gb: float, shard_size: str, seed: int) -> dict:
    """Write the checkpoint into ``out`` (a new or empty folder); return a summary."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"make_sharded_checkpoint: {out} is not empty; give a new folder.")
    config = llama_config(size_gb)
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    state = model.state_dict()
    plan = split_torch_state_dict_into_shards(state, max_shard_size=shard_size)
    t0 = time.perf_counter()
    for filename, names in plan.filename_to_tensors.items():
        tensors = {n: _draw(n, state[n].shape, seed) for n in names}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
    index = {"metadata": dict(plan.metadata), "weight_map": dict(plan.tensor_to_filename)}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    total = sum(os.path.getsize(out / f) for f in plan.filename_to_tensors)
    return {"folder": str(out), "layers": config["num_hidden_layers"], "shards": len(plan.filename_to_tensors),
            "bytes": total, "tensors": len(state), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="a new folder for the checkpoint")
    p.add_argument("--size-gb", type=float, default=2.2, help="float32 weights, in GB (1e9 bytes); default 2.2")
    p.add_argument("--shard-size", default="500MB", help="largest shard, as huggingface_hub reads it (500MB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(make(args.out, args.size_gb, args.shard_size, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
