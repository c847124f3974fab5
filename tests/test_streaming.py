"""Streaming conversion (issue 14 part 2): a checkpoint converted one layer at a time equals the
in-memory conversion bit for bit, never holds more than one layer, and writes an ordinary artifact.

The properties:

* for any model and config the streaming path accepts (hypothesis draws widths, methods, block
  sizes, densities, ranks), every tensor and every decision of the streamed conversion equals those
  of ``sparsify.sparsify`` on the loaded model, bit for bit;
* before each layer is converted, every other tensor of the skeleton is on the meta device (nothing
  accumulates), and afterwards the layer is meta again;
* a single-shard artifact's weights file is byte-identical to ``sparsify.save`` of the in-memory
  conversion; a sharded one loads (Hugging Face class, factory) to the same outputs;
* what cannot be streamed, and checkpoints that do not fit, are refused before any work, by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import sparsify
from sparsify import Rule, SparsifyConfig
from sparsify import streaming as S
from sparsify.errors import InputError


# ----------------------------------------------------------------------------- helpers
def _write_checkpoint(model: nn.Module, folder: Path, shard_bytes: int | None = None) -> Path:
    """``model``'s state_dict as safetensors: one file, or HF-style shards with an index (tied tensors once,
    as transformers writes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    seen, sd = set(), {}
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            sd[k] = t.detach().contiguous().clone()
    if shard_bytes is None:
        save_file(sd, str(folder / "model.safetensors"))
        return folder / "model.safetensors"
    from huggingface_hub import split_torch_state_dict_into_shards

    plan = split_torch_state_dict_into_shards(sd, max_shard_size=shard_bytes)
    for f, names in plan.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(folder / f))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}))
    return index


def _stream(build, ckpt: Path, config: SparsifyConfig, inputs=None, *, check_meta: bool = True):
    """Stream ``ckpt`` into ``build()``'s skeleton; ``(tensors by name, decisions, plan)``."""
    with torch.device("meta"):
        torch.manual_seed(0)
        skeleton = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp = S.plan_units(skeleton, config, example_inputs=None if inputs is None else
                          tuple(x.to("meta") for x in inputs))
        reader = S.CheckpointReader(ckpt)
        results = {}

        def result_of(unit):
            if check_meta:  # nothing accumulates: the skeleton is all meta before each layer
                real = [k for k, t in skeleton.state_dict(keep_vars=True).items() if not t.is_meta]
                assert real == [], f"before {unit.name}: {real[:3]} are real"
            res = S.convert_unit(sp, unit, reader)
            results[unit.index] = res
            return res

        got = dict(S.ordered_tensors(sp, reader, result_of))
    assert all(t.is_meta for t in skeleton.state_dict(keep_vars=True).values())
    return got, S.final_decisions(sp, results), sp


def _in_memory(build, config, inputs=None):
    torch.manual_seed(0)
    model = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, sparsify.sparsify(model, config, example_inputs=inputs, check=False)


def _assert_same(got, decisions, sp, ref):
    sd = ref.state_dict()
    stored = {k for k in sd if k not in sp.aliases}
    assert set(got) == stored
    for k in stored:
        assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), k
    assert [d.to_dict() for d in decisions] == [d.to_dict() for d in ref._sparsify_plan.decisions]


# ----------------------------------------------------------------------------- the property
_METHODS = {
    "block_sparse": st.fixed_dictionaries({"density": st.sampled_from([0.25, 0.5, 1.0]),
                                           "block_size": st.sampled_from([8, 16, 32])}),
    "low_rank": st.fixed_dictionaries({"rank": st.one_of(st.integers(1, 12), st.sampled_from([0.25, 0.5]))}),
    "tt": st.fixed_dictionaries({"rank": st.sampled_from([0.25, 0.5])}),
    "tucker": st.fixed_dictionaries({"rank": st.sampled_from([0.25, 0.5])}),
    "skip": st.just({}),
}


@st.composite
def _mlps(draw):
    widths = draw(st.lists(st.sampled_from([24, 40, 64, 96]), min_size=2, max_size=5))
    bias = draw(st.lists(st.booleans(), min_size=len(widths) - 1, max_size=len(widths) - 1))
    rules = []
    for i in range(len(widths) - 1):
        method = draw(st.sampled_from(sorted(_METHODS)))
        params = draw(_METHODS[method])
        rules.append(Rule(str(2 * i), skip=True) if method == "skip" else Rule(str(2 * i), method=method, **params))
    act = draw(st.sampled_from([nn.ReLU, nn.Tanh]))
    with_inputs = draw(st.booleans())

    def build():
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Linear(a, b, bias=bias[i]), act()]
        return nn.Sequential(*layers)

    return build, SparsifyConfig(min_size=0, rules=rules), (torch.randn(3, widths[0]),) if with_inputs else None


@given(_mlps())
def test_streaming_equals_in_memory_conversion(tmp_path_factory, case):
    build, config, inputs = case
    torch.manual_seed(0)
    ckpt = _write_checkpoint(build(), tmp_path_factory.mktemp("ckpt"))
    _, ref = _in_memory(build, config, inputs)
    got, decisions, sp = _stream(build, ckpt, config, inputs)
    _assert_same(got, decisions, sp, ref)


class _ConvNet(nn.Module):
    """fx traces it: a Conv + BatchNorm (folded into the converted conv), an LSTM, a functional weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.w = nn.Parameter(torch.randn(48, 32) / 6)
        self.b = nn.Parameter(torch.zeros(48))
        with torch.no_grad():  # trained-looking statistics, so the fold changes the weights
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(self.conv2(h)).flatten(2).transpose(1, 2)   # [N, HW, C]
        h, _ = self.lstm(h)
        return torch.nn.functional.linear(h, self.w, self.b)


class _AttnNet(nn.Module):
    """fx cannot trace it (torch.export analyzes it): attention projections and an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 48)

    def forward(self, x):
        return self.head(self.attn(x))


@pytest.mark.parametrize("net", ["conv", "attn"])
@pytest.mark.parametrize("method", ["block_sparse", "tucker"])
def test_every_site_kind_streams_exactly(tmp_path, method, net):
    """Conv with a folded BatchNorm, LSTM, a functional weight (fx graph); attention projections (export
    graph).  Example inputs give the graph, so folding and the functional site happen in both paths."""
    build = _ConvNet if net == "conv" else _AttnNet
    inputs = (torch.randn(2, 8, 4, 4),) if net == "conv" else (torch.randn(2, 5, 32),)
    config = SparsifyConfig(method=method, rank=0.5, min_size=0,
                            rules=[Rule("lstm", method="block_sparse", density=0.5, block_size=8)]) \
        if method == "tucker" else SparsifyConfig(method=method, density=0.5, block_size=8, min_size=0)
    torch.manual_seed(0)
    ckpt = _write_checkpoint(build(), tmp_path)
    _, ref = _in_memory(build, config, inputs)
    got, decisions, sp = _stream(build, ckpt, config, inputs)
    _assert_same(got, decisions, sp, ref)
    kinds = {type(m).__name__ for m in ref.modules()}
    if net == "conv":
        assert sp.capture.how == "torch.fx"
        assert any(n.startswith("folded BatchNorm") for n in ref._sparsify_plan.notes)
        assert "BlockSparseLSTM" in kinds
        assert any(d.layer_type == "F.linear" and d.rewrites for d in decisions)
    elif method == "block_sparse":
        assert sp.capture.how == "torch.export" and "SparseMultiheadAttention" in kinds


# ----------------------------------------------------------------------------- artifacts
def _tiny_llama(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                      vocab_size=300, tie_word_embeddings=tie)
    return lambda: LlamaForCausalLM(cfg)


def test_single_shard_artifact_is_byte_identical_to_save(tmp_path):
    build = _tiny_llama()
    torch.manual_seed(0)
    ckpt = _write_checkpoint(build(), tmp_path / "ckpt", shard_bytes=60_000)  # several input shards
    config = SparsifyConfig(method="block_sparse", density=0.5, block_size=16, min_size=0)
    ids = torch.randint(0, 300, (1, 6))
    _, ref = _in_memory(build, config, (ids,))
    sparsify.save(ref, tmp_path / "mem", export=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = S.convert_checkpoint(build, ckpt, tmp_path / "stream", config, example_inputs=(ids,))
    assert sorted(os.listdir(r.path)) == ["manifest.json", "weights.safetensors"]
    assert (r.path / "weights.safetensors").read_bytes() == (tmp_path / "mem" / "weights.safetensors").read_bytes()
    a, b = (sparsify.io.read_manifest(p) for p in (tmp_path / "mem", r.path))
    for key in ("layouts", "hf"):
        assert a[key] == b[key], key
    assert a["plan"]["decisions"] == b["plan"]["decisions"]
    assert a["weights"]["aliases"] == b["weights"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(a["weights"]["state_dict_keys"]) == set(b["weights"]["state_dict_keys"])
    assert b["format_version"] == 2 and b["program"] is None and "streaming" in b["program_note"]


def test_sharded_artifact_loads_to_the_same_model(tmp_path):
    build = _tiny_llama(tie=False)
    torch.manual_seed(0)
    ckpt = _write_checkpoint(build(), tmp_path / "ckpt", shard_bytes=100_000)
    config = SparsifyConfig(method="block_sparse", density=0.5, block_size=16, min_size=0,
                            rules=[Rule("*mlp*", method="low_rank", rank=8)])
    _, ref = _in_memory(build, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = S.convert_checkpoint(build, ckpt, tmp_path / "out", config, max_shard_size="40kB")
    names = sorted(os.listdir(r.path))
    shards = [n for n in names if n.startswith("weights-")]
    assert len(shards) > 2 and "weights.safetensors.index.json" in names
    m = sparsify.io.read_manifest(r.path)
    assert m["format_version"] == 3 and [s["file"] for s in m["weights"]["shards"]] == shards
    index = json.loads((r.path / "weights.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(m["weights"]["tensors"]) and set(index["weight_map"].values()) == set(shards)
    ids = torch.randint(0, 300, (2, 7))
    ref.eval()
    for loaded in (sparsify.load(r.path), sparsify.load(r.path, factory=build)):
        assert type(loaded).__name__ == "LlamaForCausalLM"
        assert torch.equal(loaded.eval()(ids).logits, ref(ids).logits)


def test_a_sharded_artifact_is_checked_like_a_single_file(tmp_path):
    build = lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))  # noqa: E731
    torch.manual_seed(0)
    ckpt = _write_checkpoint(build(), tmp_path / "ckpt")
    r = S.convert_checkpoint(build, ckpt, tmp_path / "out", density=0.5, block_size=16, min_size=0,
                             max_shard_size=10_000)
    shards = sparsify.io.read_manifest(r.path)["weights"]["shards"]
    assert len(shards) > 1
    shard = r.path / shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch"):
        sparsify.load(r.path, factory=build)
    m = json.loads((r.path / "manifest.json").read_text())
    m["weights"]["shards"][0]["file"] = "../../etc/passwd"
    (r.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match=r"weights.shards\[0\].file"):
        sparsify.load(r.path, factory=build)
    # --force replaces a sharded artifact (all its files are known), nothing else
    r2 = S.convert_checkpoint(build, ckpt, tmp_path / "out", density=0.5, block_size=16, min_size=0, overwrite=True)
    assert sorted(os.listdir(r2.path)) == ["manifest.json", "weights.safetensors"]


# ----------------------------------------------------------------------------- refusals
def test_refusals_before_any_work(tmp_path):
    build = lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))  # noqa: E731
    torch.manual_seed(0)
    ckpt = _write_checkpoint(build(), tmp_path / "ckpt")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="model-wide compression"):
        S.convert_checkpoint(build, ckpt, out, method="tucker", compression=2.0, min_size=0)
    with pytest.raises(ValueError, match="real tensors"):
        S.convert_checkpoint(build(), ckpt, out, density=0.5)
    with pytest.raises(ValueError, match="max_shard_size"):
        S.convert_checkpoint(build, ckpt, out, density=0.5, max_shard_size="lots")
    wrong = lambda: nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))  # noqa: E731
    with pytest.raises(InputError, match=r"'0.weight' has shape \[64, 64\], the model expects \[48, 64\]"):
        S.convert_checkpoint(wrong, ckpt, out, density=0.5, min_size=0)
    more = lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 8))  # noqa: E731
    with pytest.raises(InputError, match="no tensor '3.weight'"):
        S.convert_checkpoint(more, ckpt, out, density=0.5, min_size=0)
    fewer = lambda: nn.Sequential(nn.Linear(64, 64))  # noqa: E731
    with pytest.raises(InputError, match="2 unexpected tensors"):
        S.convert_checkpoint(fewer, ckpt, out, density=0.5, min_size=0)
    assert not out.exists()
    # an index may only name shards in its own folder
    bad = tmp_path / "ckpt" / "bad.safetensors.index.json"
    bad.write_text(json.dumps({"weight_map": {"0.weight": "../model.safetensors"}}))
    with pytest.raises(InputError, match="not a file name in the index's folder"):
        S.CheckpointReader(bad)
    bad.write_text(json.dumps({"weight_map": {"0.weight": "missing.safetensors"}}))
    with pytest.raises(InputError, match="shard missing.safetensors is missing"):
        S.CheckpointReader(bad)
    bad.write_text(json.dumps({"weights": {}}))
    with pytest.raises(InputError, match="weight_map"):
        S.CheckpointReader(bad)
    S.convert_checkpoint(build, ckpt, out, density=0.5, min_size=0)
    with pytest.raises(InputError, match="exists; pass --force"):
        S.convert_checkpoint(build, ckpt, out, density=0.5, min_size=0)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Linear(64, 64, bias=False), nn.Linear(64, 64), nn.Linear(64, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.body(self.emb(x))))


@pytest.mark.parametrize("bad", ["nan", "inf", "tied"])
def test_checkpoints_with_non_finite_or_disagreeing_tied_weights_are_refused(tmp_path, bad):
    # Both paths (streamed, and --weights loaded whole) refuse them naming the tensor; a streamed
    # conversion wrote an artifact computing NaN, and of two different tied copies each path kept another.
    from sparsify.model_spec import _load_weights

    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in _Tied().state_dict().items()}  # both tied names
    if bad == "tied":
        sd["head.weight"] = torch.randn(64, 64)
        match = "'emb.weight' and 'head.weight' are one tied tensor"
    else:
        sd["body.weight"][3, 5] = float(bad)
        match = "tensor 'body.weight' holds NaN or inf"
    ckpt = tmp_path / "model.safetensors"
    save_file(sd, str(ckpt))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        S.convert_checkpoint(_Tied, ckpt, out, density=0.5, block_size=16, min_size=0)
    assert not out.exists()
    model = _Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=match):
        _load_weights(model, str(ckpt), "_Tied")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before loading
    if bad == "tied":  # equal copies are what transformers may write: accepted
        sd["head.weight"] = sd["emb.weight"].clone()
        save_file(sd, str(ckpt))
        _load_weights(model, str(ckpt), "_Tied")
        S.convert_checkpoint(_Tied, ckpt, out, density=0.5, block_size=16, min_size=0)


def test_fresh_init_streams_exactly_whatever_the_global_rng(tmp_path):
    # init="fresh" drew from torch's global RNG, so the streamed layers (converted one unit at a
    # time, a low-rank unit in between) differed from the in-memory conversion's
    build = lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),  # noqa: E731
                                  nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    cfg = SparsifyConfig(min_size=0, rules=[
        Rule("0", method="block_sparse", density=0.5, block_size=8, layout="small_world", init="fresh"),
        Rule("2", method="low_rank", rank=8),
        Rule("4", method="block_sparse", density=0.25, block_size=8, layout="random", init="fresh")])
    torch.manual_seed(0)
    dense = build().eval()
    ckpt = _write_checkpoint(dense, tmp_path / "ckpt")
    torch.manual_seed(1)
    streamed, _, _ = _stream(build, ckpt, cfg)
    torch.manual_seed(2)  # another global RNG state: the same layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_memory = sparsify.sparsify(dense, cfg, check=False).state_dict()
    assert set(streamed) <= set(in_memory)
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)


def test_assign_units_balances_and_covers():
    from types import SimpleNamespace

    from sparsify.distributed import assign_units, unit_cost

    @given(st.lists(st.tuples(st.integers(1, 10**7), st.sampled_from(["block_sparse", "tt", "tucker", "cp"])),
                    min_size=0, max_size=40), st.integers(1, 6))
    def prop(units, world):
        us = [SimpleNamespace(nbytes=n, method=m) for n, m in units]
        owners = assign_units(us, world)
        assert owners == assign_units(us, world)  # every rank computes the same answer
        assert len(owners) == len(us) and all(0 <= r < world for r in owners)
        load = [sum(unit_cost(u) for u, r in zip(us, owners) if r == k) for k in range(world)]
        if us:  # greedy list scheduling: no rank exceeds the mean by more than one unit
            assert max(load) <= sum(load) / world + max(unit_cost(u) for u in us) + 1e-6

    prop()


# ----------------------------------------------------------------------------- the command line
def test_cli_streams_a_sharded_hf_checkpoint_and_verify_accepts_it(tmp_path):
    """``sparsify convert config.json --hf --weights model.safetensors.index.json`` streams; the artifact loads
    and ``sparsify verify`` (which rebuilds the dense model from the same index) checks it and its fingerprint."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 300,
           "tie_word_embeddings": False}
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.for_model(**cfg))
    index = _write_checkpoint(model, tmp_path / "ckpt", shard_bytes=80_000)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "sparsify", "convert", str(tmp_path / "ckpt" / "config.json"), "--hf",
           "--weights", str(index), "-o", str(tmp_path / "out"), "--density", "0.5", "--block-size", "16",
           "--min-size", "0", "--max-shard-size", "60kB", "--report", str(tmp_path / "r.md")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "streamed 7 layers" in p.stdout and "block_sparse" in p.stdout
    m = sparsify.io.read_manifest(tmp_path / "out")
    assert m["weights"]["file"] == "weights.safetensors.index.json" and len(m["source_fingerprint"]) == 64
    assert (tmp_path / "r.md").exists()
    v = subprocess.run([sys.executable, "-m", "sparsify", "verify", str(tmp_path / "out"), "--against",
                        str(tmp_path / "ckpt" / "config.json"), "--hf", "--weights", str(index)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "converted model equals its dense reference: yes" in v.stdout
