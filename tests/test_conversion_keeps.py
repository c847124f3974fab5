"""What a conversion keeps of the user's model besides its arithmetic.

* Hooks: a hook registered on a layer runs on its rewritten layer and sees the same tensors (the
  layer is a drop-in), whether the model is converted in place of its class or as an fx graph;
  ``densify`` hands it back to the dense layer; the user's handle still removes it.  A layer whose
  hooks would see other tensors after a fusion (BatchNorm folding, an activation) is not fused.
* A Hugging Face model's output embedding stays dense unless a rule names it, so
  ``resize_token_embeddings`` works and the report says why.
* No block-sparse layer stores more than its dense layer (``dense_if_larger``): Linear, conv and
  nn.LSTM alike, counted exactly as the layer stores its blocks.
* The report's totals are the parameter counts of the original and the converted model, for
  parametrized layers (``parametrizations.weight_norm``) too.
* A model torch cannot copy (``prune``, the old ``weight_norm``) is refused with what to do.

Tolerances (float32): density 1.0 and full rank sum the same terms as the dense layer in another
order, a few ulps per layer: 1e-5 relative.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify import BlockSparseConv2d
from sparsify.errors import InputError

from .helpers import rel_err

EXACT = [dict(method="block_sparse", density=1.0, block_size=16), dict(method="low_rank", rank=1.0)]


def _convert(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(model, min_size=0, example_inputs=inputs, **kw)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ hooks
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.attn(h, h, h)[0]


def _hooked_net(seen: dict) -> Net:
    torch.manual_seed(0)
    model = Net().eval()
    model.fc1.register_forward_hook(lambda m, i, o: seen.setdefault("fc1", o))          # activation capture
    model.attn.register_forward_hook(lambda m, i, o: seen.setdefault("attn", o[0]))
    model.fc2.register_forward_pre_hook(lambda m, i: (i[0].clamp(max=0.1),))            # changes what fc2 computes
    model.attn.out_proj.register_forward_hook(lambda m, i, o: seen.setdefault("out_proj", o))  # torch never calls it
    return model


@pytest.mark.parametrize("graph", [False, True], ids=["model", "graph"])
@pytest.mark.parametrize("kw", EXACT, ids=lambda kw: kw["method"])
def test_hooks_run_on_the_rewritten_layers_and_see_the_same_tensors(kw, graph):
    seen: dict = {}
    model = _hooked_net(seen)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y0 = model(x)
    ref, _ = dict(seen), seen.clear()
    assert set(ref) == {"fc1", "attn"}  # nn.MultiheadAttention never calls out_proj as a module

    conv = _convert(model, (x,), graph=graph, dense_if_larger=False, **kw)
    assert not isinstance(conv.fc1, nn.Linear) and hasattr(conv.attn, "to_dense_module")
    with torch.no_grad():
        y = conv(x)
    assert set(seen) == set(ref)
    assert all(rel_err(seen[k], ref[k]) < 1e-5 for k in ref)
    assert rel_err(y, y0) < 1e-5  # the clamp on fc2's input still applies
    assert any("out_proj" in n and "never ran" in n for n in conv._sparsify_plan.notes)

    seen.clear()
    dense = sparsify.densify(conv)
    assert type(dense.fc1) is nn.Linear
    with torch.no_grad():
        assert rel_err(dense(x), y0) < 1e-5
    assert set(seen) == set(ref)


def test_backward_and_state_dict_hooks_move_and_the_users_handles_still_remove_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    calls: list[str] = []
    handles = [
        model[0].register_full_backward_hook(lambda m, gi, go: calls.append("backward")),
        model[0].register_forward_hook(lambda m, args, kwargs, o: calls.append("forward"), with_kwargs=True),
        model[0].register_state_dict_post_hook(lambda m, sd, prefix, meta: calls.append("state_dict")),
        model[0].register_load_state_dict_post_hook(lambda m, keys: calls.append("load")),
    ]
    x = torch.randn(4, 64, requires_grad=True)
    conv = _convert(model, (x,), inplace=True, method="block_sparse", density=0.5, block_size=16)
    assert conv is model and not isinstance(conv[0], nn.Linear)
    assert type(conv[1]) is nn.ReLU  # not fused: the hooks on conv[0] would see relu(output)
    calls.clear()  # the conversion ran the model and read its state
    conv(x).sum().backward()
    conv.load_state_dict(conv.state_dict())
    assert calls == ["forward", "backward", "state_dict", "load"]

    for h in handles:
        h.remove()
    calls.clear()
    conv(x).sum().backward()
    conv.load_state_dict(conv.state_dict())
    assert calls == []


def test_a_hooked_layer_is_not_folded_or_fused_so_its_hooks_see_what_they_saw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Flatten(),
                          nn.Linear(32 * 16, 64), nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    seen: dict = {}
    model[0].register_forward_hook(lambda m, i, o: seen.setdefault("conv", o))   # sees the output before BN
    model[4].register_forward_hook(lambda m, i, o: seen.setdefault("relu", o))   # an activation module's hook
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        y0 = model(x)
    ref, _ = dict(seen), seen.clear()
    conv = _convert(model, (x,), method="block_sparse", density=1.0, block_size=16, dense_if_larger=False)
    assert isinstance(conv[0], BlockSparseConv2d) and type(conv[1]) is nn.BatchNorm2d and type(conv[4]) is nn.ReLU
    with torch.no_grad():
        assert rel_err(conv(x), y0) < 1e-5
    assert set(seen) == set(ref) and all(rel_err(seen[k], ref[k]) < 1e-5 for k in ref)
    notes = " ".join(conv._sparsify_plan.notes)
    assert "not folded" in notes and "not fused" in notes


# ------------------------------------------------------------ output embedding
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), (torch.randint(0, 128, (1, 8)),)


@pytest.mark.parametrize("kw", [dict(method="block_sparse", density=0.5, block_size=16),
                                dict(method="low_rank", rank=0.5)], ids=lambda kw: kw["method"])
def test_an_untied_output_embedding_stays_dense_and_resize_token_embeddings_works(kw):
    model, ids = _tiny_llama()
    conv = _convert(model, ids, **kw)
    assert any(d.rewrites for d in conv._sparsify_plan.decisions)
    assert type(conv.lm_head) is nn.Linear
    d = conv._sparsify_plan.get("lm_head")
    assert d.method == "dense" and "output embedding" in d.reason and "resize_token_embeddings" in d.reason
    assert "lm_head" in str(sparsify.report(conv))
    conv.resize_token_embeddings(130)  # what tokenizer.add_special_tokens asks for
    with torch.no_grad():
        assert conv(*ids).logits.shape[-1] == 130


def test_only_a_rule_naming_the_output_embedding_converts_it():
    model, ids = _tiny_llama()
    kw = dict(method="block_sparse", density=0.5, block_size=16)
    by_type = _convert(model, ids, rules=[sparsify.Rule("*", type="Linear", density=0.25)], **kw)
    assert type(by_type.lm_head) is nn.Linear
    named = _convert(model, ids, rules=[sparsify.Rule("lm_head", density=0.25)], **kw)
    assert not isinstance(named.lm_head, nn.Linear)
    assert named._sparsify_plan.get("lm_head").method == "block_sparse"


# ------------------------------------------------------------ never larger than dense
def test_a_block_sparse_conv_larger_than_its_dense_kernel_stays_dense():
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 256, 5, padding=2), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    conv = _convert(stem, (x,), method="block_sparse", density=0.5, block_size=32)
    assert type(conv[0]) is nn.Conv2d and isinstance(conv[2], BlockSparseConv2d)
    d = conv._sparsify_plan.get("0")
    assert "left dense" in d.reason and "204800" in d.reason and "19200" in d.reason
    assert _params(conv) < _params(stem)
    forced = _convert(stem, (x,), method="block_sparse", density=0.5, block_size=32, dense_if_larger=False)
    assert isinstance(forced[0], BlockSparseConv2d) and forced[0].values.numel() == 204800


def _layer(kind: str, rows: int, cols: int, b: int) -> nn.Module:
    if kind == "Linear":
        return nn.Linear(cols, rows)
    if kind == "Conv1d":
        return nn.Conv1d(cols, rows, 3)
    if kind == "Conv2d":
        return nn.Conv2d(cols, rows, (3, 2))
    return nn.LSTM(cols, b * max(1, rows // b), num_layers=2, bidirectional=True)


@given(st.sampled_from(["Linear", "Conv1d", "Conv2d", "LSTM"]), st.integers(1, 70), st.integers(1, 70),
       st.sampled_from([8, 16]), st.sampled_from([0.1, 0.5, 1.0]), st.sampled_from(["magnitude", "random"]))
def test_the_size_guard_counts_what_the_layer_stores(kind, rows, cols, b, density, layout):
    from sparsify.passes.allocate_ranks import _block_sparse_size
    from sparsify.passes.block_sparsify_layers import _convert as build
    from sparsify.passes.sites import find_sites

    from sparsify.decision import Decision

    torch.manual_seed(0)
    model = nn.Sequential(_layer(kind, rows, cols, b))
    (site,) = find_sites(model)
    params = dict(block_size=b, density=density, layout=layout, init="copy", seed=0)
    d = Decision(name=site.name, layer_type=site.layer_type, weight_shape=tuple(site.weight.shape),
                 method="block_sparse", params=params)
    stored, dense, _ = _block_sparse_size(d, site)
    new, _ = build(site, params)
    kept = new.sparse_weights() if kind == "LSTM" else [new]
    assert stored == sum(w.values.numel() for w in kept)
    assert dense == sum(p.numel() for n, p in model.named_parameters() if "weight" in n)


# ------------------------------------------------------------------ report
@pytest.mark.parametrize("rules", [[], [sparsify.Rule("2", skip=True)]], ids=["converted", "skipped"])
def test_report_totals_are_the_parameter_counts_of_both_models(rules):
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    weight_norm(model[2])
    x = torch.randn(4, 64)
    conv = _convert(model, (x,), method="block_sparse", density=0.5, block_size=16, rules=rules)
    report = sparsify.report(conv)
    totals = report.totals()
    assert totals["params_before"] == _params(model)
    assert totals["params_after"] == _params(conv)
    assert [r["name"] for r in report.rows] == ["0", "2"]  # no rows for weight_norm's originals


# ------------------------------------------------------------------ copying
def _prune(m):
    from torch.nn.utils import prune

    prune.l1_unstructured(m, "weight", amount=0.5)


def _old_weight_norm(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(m)


@pytest.mark.parametrize("reparametrize, fix", [(_prune, "prune.remove"), (_old_weight_norm, "remove_weight_norm")],
                         ids=["prune", "weight_norm"])
def test_a_model_torch_cannot_copy_is_refused_with_what_to_do(reparametrize, fix):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    reparametrize(model[0])
    x = torch.randn(4, 64)
    y0 = model(x).detach()  # with grad on, as in training: the hook leaves a weight autograd computed
    with pytest.raises(InputError) as err:
        _convert(model, (x,), method="block_sparse", density=1.0, block_size=16)
    msg = str(err.value)
    assert "0.weight" in msg
    assert fix in msg and "inplace=True" in msg
    conv = _convert(model, (x,), inplace=True, method="block_sparse", density=1.0, block_size=16,
                    dense_if_larger=False)
    assert conv is model and not isinstance(conv[0], nn.Linear)
    with torch.no_grad():
        assert rel_err(conv(x), y0) < 1e-5
    assert any("reparametrization" in n for n in conv._sparsify_plan.notes)
