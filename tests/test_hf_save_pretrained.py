"""``save_pretrained`` on a converted Hugging Face model writes a folder that cannot pass for a dense one.

Properties: for every model family, ``from_pretrained`` of the folder raises instead of
initializing the converted layers at random (each dense tensor the conversion removed is a
0-dim placeholder: a size mismatch); ``config.json`` carries a ``"sparsify"`` marker; one
``SavePretrainedWarning`` per model says what to do; the converted model reads its own
checkpoint back (Trainer's resume) without unexpected keys; ``densify``'s dense copy saves and
loads as plain transformers; copies (deepcopy, pickle, torch.save) and ``sparsify.load`` carry
the same guard, bound to themselves.  Tiny models from configs: nothing is downloaded.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import sparsify
from sparsify.hf_save import CONFIG_FIELD, SavePretrainedWarning, placeholders

from .test_hf_roundtrip import MODELS, _ids, _model

transformers = pytest.importorskip("transformers")
T = transformers
load_file = pytest.importorskip("safetensors.torch").load_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # capture notes; each test records its own


def _convert(name="bert", **kw):
    torch.manual_seed(0)
    model, x = _model(name)
    model.eval()
    opts = dict(density=0.5, block_size=16, min_size=0, example_inputs=x)
    opts.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, sparsify.sparsify(model, **opts), x


def _save(model, path, **kw) -> list[warnings.WarningMessage]:
    """``model.save_pretrained(path, **kw)``; the SavePretrainedWarnings it gave."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model.save_pretrained(path, **kw)
    return [w for w in rec if issubclass(w.category, SavePretrainedWarning)]


def _quiet_transformers(monkeypatch):
    """transformers logs a load report table at WARNING; these tests read the outcome, not the table."""
    monkeypatch.setattr(T.utils.logging.get_logger("transformers.modeling_utils"), "disabled", True)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


# ------------------------------------------------------------------------- the folder
@pytest.mark.parametrize("name", MODELS)
def test_from_pretrained_refuses_a_converted_models_folder(tmp_path, monkeypatch, name):
    # Before: it loaded, with the converted layers' dense weights initialized at random.
    _quiet_transformers(monkeypatch)
    model, conv, _ = _convert(name)
    assert placeholders(conv), "every rewritten layer's dense weight is one the converted model lacks"
    assert len(_save(conv, tmp_path, safe_serialization=True)) == 1  # Trainer's call, keyword and all
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(model).from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch"):  # torch's own loader too, even not strict
        type(model)(model.config).load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)


def test_each_placeholder_is_a_size_mismatch_and_config_json_lists_them(tmp_path, monkeypatch):
    _quiet_transformers(monkeypatch)
    model, conv, _ = _convert("bert")
    _save(conv, tmp_path)
    marker = json.loads((tmp_path / "config.json").read_text())[CONFIG_FIELD]
    assert marker["converted"] is True and marker["placeholders"] == placeholders(conv)
    assert "sparsify.load" in marker["note"] and "densify" in marker["note"]
    stored = load_file(tmp_path / "model.safetensors")
    assert all(stored[k].shape == () for k in placeholders(conv))
    # ignore_mismatched_sizes=True is the caller's explicit choice of random weights; it reports each one
    dense, info = T.BertModel.from_pretrained(tmp_path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert sorted(k for k, *_ in info["mismatched_keys"]) == placeholders(conv)
    assert dense.config.sparsify["converted"] is True  # the marker travels with the config


def test_the_warning_says_what_to_do_once_per_model_and_the_model_is_unchanged(tmp_path):
    model, conv, x = _convert("bert")
    sd_before = {k: v.clone() for k, v in conv.state_dict().items()}
    w = _save(conv, tmp_path / "a")
    msg = str(w[0].message)
    assert len(w) == 1 and w[0].filename == __file__  # points at the caller
    for words in ("sparsify.save(model, path)", "sparsify.load(path)", "sparsify.densify(model).save_pretrained",
                  "from_pretrained cannot load it"):
        assert words in msg
    assert _save(conv, tmp_path / "b") == []  # once per model: Trainer saves a checkpoint every N steps
    assert not hasattr(conv.config, CONFIG_FIELD)  # the marker is the folder's, not the model's config
    assert sparsify.io.hf_info(conv)["config"].get(CONFIG_FIELD) is None  # what sparsify.save records
    assert conv.state_dict().keys() == sd_before.keys()
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in sd_before.items())
    assert "save_pretrained" not in model.__dict__ and not model._load_state_dict_pre_hooks  # the user's model


def test_a_given_state_dict_gets_the_placeholders_on_a_copy(tmp_path, monkeypatch):
    # Trainer passes state_dict= itself under some setups; transformers deletes from the dict it is given
    _quiet_transformers(monkeypatch)
    _, conv, _ = _convert("bert")
    given = conv.state_dict()
    keys = list(given)
    _save(conv, tmp_path, state_dict=given)
    assert list(given) == keys
    assert set(placeholders(conv)) <= set(load_file(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        T.AutoModel.from_pretrained(tmp_path)


def test_a_sharded_save_carries_the_placeholders_in_its_index(tmp_path, monkeypatch):
    _quiet_transformers(monkeypatch)
    _, conv, _ = _convert("llama")
    _save(conv, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(placeholders(conv)) <= set(index)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        T.LlamaForCausalLM.from_pretrained(tmp_path)


def test_placeholders_take_the_models_dtype(tmp_path, monkeypatch):
    # from_pretrained(dtype="auto") must not see a float32 tensor in a bfloat16 checkpoint
    _quiet_transformers(monkeypatch)
    torch.manual_seed(0)
    model, x = _model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = sparsify.sparsify(model.to(torch.bfloat16).eval(), density=0.5, block_size=16, min_size=0)
    _save(conv, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert {stored[k].dtype for k in placeholders(conv)} == {torch.bfloat16}
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        T.LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto")


# --------------------------------------------------------------- the converted model reads it back
def test_the_converted_model_reads_its_own_checkpoint_back_as_trainer_resumes(tmp_path):
    _, conv, x = _convert("bert")
    with torch.no_grad():
        want = _hidden(conv(*x))
    _save(conv, tmp_path)
    with torch.no_grad():
        for p in conv.parameters():
            p.zero_()
    # Trainer._load_from_checkpoint: load_file, then load_state_dict(state_dict, False)
    result = conv.load_state_dict(load_file(tmp_path / "model.safetensors"), False)
    assert not result.missing_keys and not result.unexpected_keys
    conv.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert torch.equal(_hidden(conv(*x)), want)


def test_a_real_dense_tensor_under_a_placeholders_name_is_still_reported(tmp_path):
    # Loading a dense checkpoint into a converted model does not convert it: that stays visible.
    model, conv, _ = _convert("bert")
    result = conv.load_state_dict(model.state_dict(), strict=False)
    assert set(placeholders(conv)) <= set(result.unexpected_keys)


# ------------------------------------------------------------------------ what carries the guard
def test_the_dense_copy_saves_and_loads_as_plain_transformers(tmp_path):
    _, conv, x = _convert("bert")
    dense = sparsify.densify(conv)
    assert "save_pretrained" not in dense.__dict__ and not dense._load_state_dict_pre_hooks
    assert placeholders(dense) == [] and placeholders(conv)  # the converted model keeps its own
    assert _save(dense, tmp_path) == []
    assert CONFIG_FIELD not in json.loads((tmp_path / "config.json").read_text())
    back, info = T.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        assert torch.equal(_hidden(back.eval()(*x)), _hidden(dense(*x)))


def _copies(conv):
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    return {"deepcopy": copy.deepcopy(conv), "pickle": pickle.loads(pickle.dumps(conv)),
            "torch.save": torch.load(buf, weights_only=False)}


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_carries_the_guard_bound_to_itself(tmp_path, how):
    _, conv, x = _convert("bert")
    other = _copies(conv)[how]
    assert placeholders(other) == placeholders(conv)
    assert other.__dict__["save_pretrained"]._model() is other
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    assert len(_save(other, tmp_path)) == 1  # a copy warns for itself
    stored = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(stored[k], v) for k, v in other.state_dict().items() if k in stored)  # the copy's weights
    assert other.load_state_dict(stored, strict=False).unexpected_keys == []  # and its pre-hook


def test_sparsify_load_gives_the_loaded_model_the_same_guard(tmp_path, monkeypatch):
    _quiet_transformers(monkeypatch)
    _, conv, x = _convert("gpt2")
    back = sparsify.load(sparsify.save(conv, tmp_path / "art", example_inputs=x, export=False))
    assert placeholders(back) == placeholders(conv)
    assert len(_save(back, tmp_path / "hf")) == 1
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        T.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")


def test_only_a_model_that_lost_dense_tensors_is_guarded():
    R = sparsify.Rule
    _, none, _ = _convert("bert", rules=[R("*", skip=True)])
    assert "save_pretrained" not in none.__dict__ and not none._load_state_dict_pre_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(64, 64)), density=0.5, block_size=16)
    assert "save_pretrained" not in plain.__dict__  # not a transformers model: nothing to guard
    _, once, _ = _convert("bert", rules=[R("*.query", density=0.5, block_size=16), R("*", skip=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice = sparsify.sparsify(once, rules=[R("*.key", density=0.5, block_size=16), R("*", skip=True)],
                                  min_size=0)
    # converting a converted model again keeps what the first conversion removed
    assert placeholders(twice) == ["encoder.layer.0.attention.self.key.weight",
                                   "encoder.layer.0.attention.self.query.weight"]
    assert len(twice._load_state_dict_pre_hooks) == 1


def test_inspect_sees_transformers_signature():
    import inspect

    _, conv, _ = _convert("bert")
    params = inspect.signature(conv.save_pretrained).parameters
    assert "state_dict" in params and "self" not in params and "max_shard_size" in params


# ---------------------------------------------------------------------------- the real Trainer
def test_trainer_checkpoints_and_resumes_a_converted_model(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    _quiet_transformers(monkeypatch)
    torch.manual_seed(0)
    c = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=64, max_position_embeddings=16, num_labels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = sparsify.sparsify(T.BertForSequenceClassification(c), density=0.5, block_size=16, min_size=0)
    data = [{"input_ids": _ids()[0], "attention_mask": torch.ones(6, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(8)]
    args = T.TrainingArguments(str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                               report_to=[], use_cpu=True, logging_strategy="no", save_strategy="steps")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        T.Trainer(model=conv, args=args, train_dataset=data).train()
    assert sum(issubclass(w.category, SavePretrainedWarning) for w in rec) == 1  # two checkpoints, one warning
    ckpt = Path(tmp_path / "run" / "checkpoint-1")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        T.BertForSequenceClassification.from_pretrained(ckpt)
    trainer = T.Trainer(model=conv, args=args, train_dataset=data)
    seen = []
    monkeypatch.setattr(trainer, "_issue_warnings_after_load", seen.append)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert seen and not seen[0].unexpected_keys and not seen[0].missing_keys
