"""The pass infrastructure, the planner's decisions and the config's rules."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from sparsify.passes import PIPELINE, PassContext, PassError, run_passes
from torch import nn

import sparsify
from sparsify import Rule, SparsifyConfig

from .archs import TransformerBlock
from .helpers import rel_err


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(256, 256)
        self.dec = nn.Linear(256, 256)
        self.dec.weight = self.enc.weight
        self.other = nn.Linear(256, 256)

    def forward(self, x):
        return self.other(self.dec(torch.relu(self.enc(x))))


def test_tied_weights_stay_tied_and_dense_with_the_reason():
    converted = sparsify.sparsify(Tied(), density=0.25)
    plan = converted._sparsify_plan
    assert plan.get("enc").method == "dense" and "tied" in plan.get("enc").reason
    assert plan.get("dec").method == "dense" and "tied" in plan.get("dec").reason
    assert plan.get("other").method == "block_sparse"
    assert converted.enc.weight is converted.dec.weight


def test_functional_linear_is_found_and_rewritten():
    block = TransformerBlock(128, 4, 256).eval()
    x = torch.randn(2, 5, 128)
    converted = sparsify.sparsify(block, density=0.5, example_inputs=(x,))
    kinds = {d.name: d.layer_type for d in converted._sparsify_plan.decisions}
    assert kinds["qkv_weight"] == "F.linear"
    d = converted._sparsify_plan.get("qkv_weight")
    assert d.method == "block_sparse" and d.flops_before == 2 * 10 * 384 * 128
    assert "qkv_weight" not in dict(converted.named_parameters())  # the dense weight is gone
    assert isinstance(converted.get_submodule(d.result["module"]), sparsify.BlockSparseLinear)


def test_batchnorm_folds_and_epilogues_fuse():
    model = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 256)
    converted = sparsify.sparsify(model, density=1.0, example_inputs=(x,))
    notes = converted._sparsify_plan.notes
    assert any("folded BatchNorm" in n for n in notes) and any("fused relu" in n for n in notes)
    assert converted.get_submodule("0").activation == "relu"
    assert not any(isinstance(m, nn.BatchNorm1d) for m in converted.modules())
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) < 1e-5


def test_residual_add_fuses_in_graph_mode_and_densify_restores_it():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 256)

        def forward(self, x):
            return F.gelu(self.fc(x)) + x

    model = Res().eval()
    x = torch.randn(3, 256)
    converted = sparsify.sparsify(model, density=0.5, example_inputs=(x,), graph=True)
    assert "add" not in converted.code and converted.fc.activation == "gelu"
    with torch.no_grad():
        assert rel_err(converted(x), sparsify.densify(converted)(x)) < 1e-5
    # On the user's model the add and the functional gelu stay in its code: nothing fused.
    kept = sparsify.sparsify(model, density=0.5, example_inputs=(x,))
    assert type(kept) is Res and kept.fc.activation == "none"
    with torch.no_grad():
        assert rel_err(kept(x), converted(x)) < 1e-5


def test_graph_mode_needs_a_traceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 256)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(ValueError, match="graph=True.*cannot trace Branchy"):
        sparsify.sparsify(Branchy(), density=0.5, graph=True)


def test_too_small_layers_stay_dense_with_the_reason_and_min_size_changes_that():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 512), nn.Linear(128, 128))
    plan = sparsify.sparsify(model, density=0.5)._sparsify_plan
    assert plan.get("0").method == "dense" and "min_size" in plan.get("0").reason
    assert plan.get("1").method == "block_sparse"  # 64x512 = 32768 elements
    plan = sparsify.sparsify(nn.Sequential(nn.Linear(128, 128)), density=0.5)._sparsify_plan
    assert plan.get("0").method == "block_sparse"  # a 128x128 Linear is still a candidate
    plan = sparsify.sparsify(model, density=0.5, min_size=0)._sparsify_plan
    assert plan.get("0").method == "block_sparse"


def test_rules_match_by_glob_and_type_first_match_wins():
    model = nn.Sequential()
    model.add_module("enc1", nn.Linear(256, 256))
    model.add_module("enc2", nn.Linear(256, 256))
    model.add_module("head", nn.Linear(256, 256))
    cfg = SparsifyConfig(method="block_sparse", density=0.5, rules=[
        Rule("head", skip=True),
        Rule("enc2", method="low_rank", rank=8),
        Rule("enc*", type="Linear", density=0.125, block_size=16),
    ])
    converted = sparsify.sparsify(model, cfg)
    plan = converted._sparsify_plan
    assert plan.get("head").method == "dense" and "skipped" in plan.get("head").reason
    assert plan.get("enc2").method == "low_rank" and converted.enc2.rank == 8
    assert plan.get("enc1").params == {"density": 0.125, "block_size": 16}
    assert isinstance(converted.enc1, sparsify.BlockSparseLinear) and converted.enc1.block_size == 16


def test_config_round_trips_through_a_dict_and_shorthand_overrides():
    cfg = SparsifyConfig(method="low_rank", rank=0.5, rules=[Rule("a.*", type="Linear", method="block_sparse")])
    again = SparsifyConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()
    merged = SparsifyConfig.coerce(cfg, {"rank": 0.25})
    assert merged.params["rank"] == 0.25 and merged.rules[0].pattern == "a.*"


@pytest.mark.parametrize("make, option", [
    (lambda: Rule(), "pattern"),
    (lambda: Rule("x", method="nope"), "unknown method"),
    (lambda: Rule("x", skip=True, density=0.5), "skip rule"),
    (lambda: Rule("x", method="block_sparse", rank=4), "takes no option 'rank'"),
    (lambda: SparsifyConfig(method="block_sparse", rules=[Rule("x", method="low_rank")]), "needs one of rank"),
    (lambda: SparsifyConfig(min_size=-1), "min_size"),
    (lambda: SparsifyConfig(rules=["x"]), "rule 0"),
    # a rule without a method configures the default one: checked before the model is touched
    (lambda: SparsifyConfig(method="block_sparse", density=0.5, rules=[Rule("2", rank=4)]),
     r"Rule\('2', rank=4\): method 'block_sparse' takes no option 'rank'"),
    (lambda: SparsifyConfig(method="block_sparse", density=0.5, rank=4, strict=True), "option rank= is taken by no"),
])
def test_invalid_config_names_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_an_option_no_method_takes_is_a_warning_unless_a_rule_uses_it():
    with pytest.warns(UserWarning, match=r"option rank= is taken by no method this config uses \(block_sparse\)"):
        SparsifyConfig(method="block_sparse", density=0.5, rank=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a rule's method takes it: the model-wide rank applies to those layers
        SparsifyConfig(method="block_sparse", density=0.5, rank=4, rules=[Rule("fc*", method="low_rank")])


def test_report_is_a_table_and_json_and_works_without_shapes():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    rep = sparsify.report(sparsify.sparsify(model, density=0.25))
    text = str(rep)
    assert "layer" in text and "block_sparse" in text and "min_size" in text
    d = json.loads(rep.to_json())
    assert d["layers"][0]["flops_before"] is None and d["totals"]["params_after"] < d["totals"]["params_before"]
    layer0 = d["layers"][0]
    assert layer0["bytes_before"] == (256 * 512 + 512) * 4  # weight + bias, float32
    # stored blocks + bias + the int32 block indices (row offsets, column indices)
    nnz = layer0["result"]["nnz_blocks"]
    assert layer0["bytes_after"] == (nnz * 32 * 32 + 512) * 4 + (512 // 32 + 1) * 4 + nnz * 4
    assert "bytes" in text
    rep = sparsify.report(sparsify.sparsify(model, density=0.25, example_inputs=(torch.randn(8, 256),)))
    row = rep.to_dict()["layers"][0]
    assert row["flops_before"] == 2 * 8 * 256 * 512 and row["flops_after"] == pytest.approx(row["flops_before"] * 0.25, rel=0.02)


def test_a_failing_pass_is_named_with_the_passes_before_it():
    def explode(module, ctx):
        raise KeyError("boom")

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    ctx = PassContext(config=SparsifyConfig(), planner=lambda m, c: None)
    with pytest.raises(PassError, match=r"pass 'explode' failed \(passes before it: plan_layers\)"):
        run_passes(gm, ctx, [PIPELINE[0], explode])


def test_dump_graph_prints_before_and_after_the_named_pass(monkeypatch, capsys):
    monkeypatch.setenv("SPARSIFY_DUMP_GRAPH", "block_sparsify")
    sparsify.sparsify(nn.Sequential(nn.Linear(256, 256)), density=0.5)
    err = capsys.readouterr().err
    assert "graph before pass 'block_sparsify'" in err and "graph after pass 'block_sparsify'" in err
    assert "fold_batchnorm" not in err


def test_the_pipeline_is_one_list_of_verb_named_passes():
    names = [p.__name__ for p in PIPELINE]
    assert names[0] == "plan_layers" and names[-1] == "check_lowered"
    assert "block_sparsify" in names and "fuse_epilogues" in names


def test_strict_names_a_rule_that_earlier_rules_shadow():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    cfg = sparsify.SparsifyConfig(strict=True, rules=[
        sparsify.Rule("0", density=0.5), sparsify.Rule("1", skip=True), sparsify.Rule("*", density=0.1)])
    with pytest.raises(ValueError, match=r"rule #3 .* is shadowed: every layer it matches \(0, 1\) is taken first"):
        sparsify.sparsify(model, cfg)
