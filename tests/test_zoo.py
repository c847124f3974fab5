"""The models people use, converted whole (issue 8): Hugging Face BERT, GPT-2, Llama,
T5, ViT, Whisper, Wav2Vec2, ConvNeXt, ResNet and torch's nn.TransformerEncoder,
nn.TransformerDecoderLayer, nn.MultiheadAttention, built from tiny configs.

For each: the class is kept; every linear-like projection is rewritten (counted);
at density 1.0 the converted model equals the original; at density 0.25 it equals
its ``densify``; it trains one step with gradients on the stored blocks only; it
saves and loads back equal; causal LMs generate the same tokens at density 1.0.

Tolerances (float32): at density 1.0 the block-sparse product sums the same terms
as the dense one in another order, a few ulps per layer (eps 1.2e-7) through a
handful of layers: 1e-5 relative.  Against ``densify`` the same argument holds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify
from sparsify import BlockSparseConv1d, BlockSparseConv2d, BlockSparseLinear
from tests.models.real_zoo import ZOO, output_of

pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")
REL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def convert(model, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify.sparsify(model, example_inputs=inputs, min_size=0, **kw)


def all_outputs(model, inputs) -> torch.Tensor:
    """A scalar that depends on every floating output of the model."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in leaves)


def rewritten(model) -> list:
    return [d for d in model._sparsify_plan.decisions if d.rewrites]


@pytest.mark.parametrize("name", list(ZOO))
def test_whole_model_block_sparse(name, tmp_path):
    entry = ZOO[name]
    model, inputs = entry.build()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = output_of(model, inputs)

    # density 1.0: same class, every projection rewritten, same outputs
    # dense_if_larger=False: an RGB / 1-channel stem conv padded to 16-blocks would store more than its kernel
    full = convert(model, inputs, method="block_sparse", density=1.0, block_size=16, dense_if_larger=False)
    assert type(full) is type(model)
    assert len(rewritten(full)) == entry.linear_sites, [d.name for d in rewritten(full)]
    with torch.no_grad():
        assert rel(output_of(full, inputs), reference) < REL
    # the input model is untouched
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())

    # every 2-D or conv weight of the model has a row in the report, with a reason
    rows = {d.name for d in full._sparsify_plan.decisions}
    names: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)

    def has_row(pname: str) -> bool:
        owner = (pname.partition(".parametrizations.")[0] if ".parametrizations." in pname
                 else pname.rpartition(".")[0])  # a weight-normed weight is counted in its layer's row
        return pname in rows or owner in rows or any(r.startswith(owner + ".") and r.endswith("_proj")
                                                       for r in rows)

    for p in model.parameters():
        if p.dim() >= 2:
            assert any(has_row(n) for n in names[id(p)]), names[id(p)]
    assert all(d.reason for d in full._sparsify_plan.decisions)

    if entry.linear_sites == 0:
        return
    # density 0.25: equals its densify, trains one step on the stored blocks only
    sparse = convert(model, inputs, method="block_sparse", density=0.25, block_size=16)
    assert type(sparse) is type(model)
    dense = sparsify.densify(sparse)
    assert type(dense) is type(model)
    with torch.no_grad():
        y = output_of(sparse, inputs)
        assert rel(y, output_of(dense, inputs)) < REL
    layers = [m for m in sparse.modules() if isinstance(m, (BlockSparseLinear, BlockSparseConv1d, BlockSparseConv2d))]
    # a quarter of the blocks, but at least one per block row (a 3-channel stem keeps its one column)
    for m in layers:
        rows, cols = (-(-n // m.layout.block_size) for n in m.layout.shape)
        assert m.layout.nnz == max(rows, round(0.25 * rows * cols)), m
    sparse.train()
    opt = torch.optim.SGD(sparse.parameters(), lr=1e-2)
    before = [m.values.detach().clone() for m in layers]
    all_outputs(sparse, inputs).backward()
    for m in layers:  # every layer is on the path to some output (poolers included)
        assert m.values.grad is not None and m.values.grad.shape == m.values.shape
    opt.step()
    assert any(not torch.equal(b, m.values) for b, m in zip(before, layers))
    sparse.eval()

    # save and load: equal outputs; a Hugging Face model comes back as its class (rebuilt from
    # its config through transformers' auto classes); a user's own class needs its factory, so
    # without one it comes back as the stored program
    out = sparsify.save(sparse, tmp_path / "m.sparsify", example_inputs=inputs)
    back = sparsify.load(out)
    if not name.startswith("torch_"):
        assert type(back).__name__ == type(model).__name__
    with torch.no_grad():
        assert rel(output_of(back, inputs), output_of(sparse, inputs)) < REL

    if entry.causal_lm:
        (ids,) = inputs
        want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = full.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
        sparse.train()
        loss = sparse(ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name", [n for n, e in ZOO.items() if e.convs])
def test_whole_model_tucker_keeps_every_conv_setting(name):
    """T5 / ViT read ``layer.weight`` of rewritten layers; convs are rewritten by Tucker-2."""
    model, inputs = ZOO[name].build()
    sparse = convert(model, inputs, method="tucker", rank=0.5)
    assert type(sparse) is type(model)
    convs = [d for d in rewritten(sparse) if d.layer_type in ("Conv1d", "Conv2d")]
    assert convs
    with torch.no_grad():
        assert rel(output_of(sparse, inputs), output_of(sparsify.densify(sparse), inputs)) < 1e-4


def test_t5_reads_the_weight_of_rewritten_layers():
    """T5's feed-forward compares ``self.wo.weight.dtype`` with its input on every call."""
    model, inputs = ZOO["t5"].build()
    sparse = convert(model, inputs, method="low_rank", rank=0.5)
    wo = sparse.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32 and tuple(wo.weight.shape) == (64, 128)
    with torch.no_grad():
        assert rel(output_of(sparse, inputs), output_of(sparsify.densify(sparse), inputs)) < REL


def test_inplace_relu_after_a_rewritten_layer_trains():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    sparse = convert(model, (x,), density=0.5, block_size=16)
    sparse.train()
    sparse(x).sum().backward()
    assert sparse[0].values.grad is not None


def test_check_names_where_the_converted_model_crashes():
    class NeedsLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            if not isinstance(self.fc, nn.Linear):
                raise RuntimeError("this model only works with nn.Linear layers")
            return self.fc(x)

    x = torch.randn(2, 64)
    with pytest.raises(sparsify.ConversionCheckError, match="crashed.*'NeedsLinear'.*only works"):
        convert(NeedsLinear(), (x,), density=0.5, block_size=16)
    out = convert(NeedsLinear(), (x,), density=0.5, block_size=16, check=False)  # explicitly unchecked
    assert isinstance(out.fc, BlockSparseLinear)


def test_check_names_the_layer_that_mismatches(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    x = torch.randn(3, 64)
    wrong = BlockSparseLinear.forward
    monkeypatch.setattr(BlockSparseLinear, "forward", lambda self, x, residual=None: wrong(self, x) + 1e-2)
    with pytest.raises(sparsify.ConversionCheckError, match="layer '0' \\(BlockSparseLinear\\) differs"):
        convert(model, (x,), density=0.5, block_size=16)
