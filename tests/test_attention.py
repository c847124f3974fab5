"""``SparseMultiheadAttention`` computes what ``nn.MultiheadAttention`` computes.

Property: for any MHA configuration (bias, kdim / vdim, bias_kv, zero attention,
batch-first, batched or not) and any call (self- or cross-attention, boolean or
float masks, need_weights, averaged or not, causal), the subclass with its
projections as modules equals torch's module with the same weights.
Tolerance: float32, attention over <= 8 keys with the same arithmetic in another
association order (three projections instead of one packed product): 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify.modules.attention import SparseMultiheadAttention

E, HEADS = 32, 4


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@settings(max_examples=60, deadline=None)
@given(bias=st.booleans(), kv_dim=st.sampled_from([None, 24]), bias_kv=st.booleans(), zero=st.booleans(),
       batch_first=st.booleans(), batched=st.booleans(), self_attn=st.booleans(), need_weights=st.booleans(),
       average=st.booleans(), kpm=st.sampled_from([None, "bool", "float"]), mask=st.sampled_from([None, "2d", "3d"]),
       seed=st.integers(0, 2**16))
def test_sparse_mha_equals_torch_mha(bias, kv_dim, bias_kv, zero, batch_first, batched, self_attn, need_weights,
                                     average, kpm, mask, seed):
    torch.manual_seed(seed)
    if self_attn:
        kv_dim = None
    mha = nn.MultiheadAttention(E, HEADS, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero, kdim=kv_dim,
                                vdim=kv_dim, batch_first=batch_first).eval()
    sm = SparseMultiheadAttention.from_mha(mha).eval()
    L, S, B = 5, (5 if self_attn else 7), 3

    def make(n, d):
        if not batched:
            return torch.randn(n, d)
        return torch.randn(B, n, d) if batch_first else torch.randn(n, B, d)

    q = make(L, E)
    k = q if self_attn else make(S, kv_dim or E)
    v = q if self_attn else make(S, kv_dim or E)
    kw = {}
    bool_masks = kpm == "bool" or (kpm is None and mask is not None and seed % 2 == 0)
    if kpm is not None:
        m = torch.rand(B, S) < 0.3 if bool_masks else torch.randn(B, S)
        if bool_masks:
            m[:, 0] = False
        kw["key_padding_mask"] = m if batched else m[0]
    if mask == "2d":
        m = torch.rand(L, S) < 0.3 if bool_masks else torch.randn(L, S)
        if bool_masks:
            m[:, 0] = False
        kw["attn_mask"] = m
    elif mask == "3d":
        m = torch.rand(B * HEADS if batched else HEADS, L, S)
        kw["attn_mask"] = (m < 0.3) if bool_masks else m
        if bool_masks:
            kw["attn_mask"][..., 0] = False
    want = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
    got = sm(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
    assert rel(got[0], want[0]) < 1e-5
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        assert rel(got[1], want[1]) < 1e-5


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_self_attention(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    sm = SparseMultiheadAttention.from_mha(mha)
    x = torch.randn(2, 6, E)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    want = mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0]
    assert rel(sm(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)[0], want) < 1e-5


def test_mha_attributes_read_as_the_dense_tensors_and_densify_returns_torch_mha():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS)
    model = nn.Sequential()
    model.attn = mha
    sparse = sparsify.sparsify(model, density=0.5, block_size=8, min_size=0)
    sm = sparse.attn
    assert isinstance(sm, SparseMultiheadAttention) and isinstance(sm, nn.MultiheadAttention)
    assert sm.in_proj_weight.shape == mha.in_proj_weight.shape and sm.in_proj_bias.shape == (3 * E,)
    names = {d.name for d in sparse._sparsify_plan.decisions if d.rewrites}
    assert names == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}
    back = sparsify.densify(sparse).attn
    assert type(back) is nn.MultiheadAttention
    x = torch.randn(5, 2, E)
    with torch.no_grad():
        assert rel(back(x, x, x)[0], sm(x, x, x)[0]) < 1e-5
        # the dense weight the view stands for is the densified module's packed weight
        assert torch.allclose(sm.in_proj_weight * 1, back.in_proj_weight, atol=1e-7)



class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_graph_mode_converts_attention_and_densify_calls_it_with_its_three_inputs():
    # densify of an fx graph once read any call with two or more inputs as a fused residual add
    torch.manual_seed(0)
    model = _SelfAttention().eval()
    x = torch.randn(5, 2, E)
    gm = sparsify.sparsify(model, density=1.0, block_size=8, min_size=0, example_inputs=(x,), graph=True,
                           dense_if_larger=False)
    assert isinstance(gm, torch.fx.GraphModule) and isinstance(gm.attn, SparseMultiheadAttention)
    back = sparsify.densify(gm)
    assert type(back.attn) is nn.MultiheadAttention
    with torch.no_grad():
        want = model(x)
        assert rel(gm(x), want) < 1e-5 and rel(back(x), want) < 1e-5

def test_encoder_layer_fast_path_is_not_taken_around_rewritten_projections():
    """The fused fast path would read the dense weights and bypass the rewritten layers."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, E)
    sparse = sparsify.sparsify(nn.Sequential(layer), density=0.5, block_size=8, min_size=0, example_inputs=(x,))
    calls = []
    handle = sparse[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        y = sparse(x)
    handle.remove()
    assert calls, "the projections were bypassed"
    with torch.no_grad():
        assert rel(y, sparsify.densify(sparse)(x)) < 1e-5


class _PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        # enable_nested_tensor=True (torch's default): in eval mode without gradients torch packs the padded
        # batch as a nested tensor and returns zeros at the padded positions
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, 64, dropout=0.0, batch_first=True), 2)

    def forward(self, x, pad):
        return self.enc(x, src_key_padding_mask=pad)


@pytest.mark.parametrize("method, kw", [("block_sparse", dict(density=1.0, block_size=8)), ("low_rank", dict(rank=E))])
def test_a_padded_encoder_on_torch_fast_path_converts_with_example_inputs(method, kw):
    # It once failed in annotate_shapes (a nested tensor has no shape), then in the check, which compared
    # the converted model (standard path) with its dense reference (fast path: zeros where padded).
    from sparsify.calibration import as_batches, model_error

    torch.manual_seed(0)
    model = _PaddedEncoder().eval()
    x = torch.randn(2, 6, E)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    sparse = sparsify.sparsify(model, method=method, min_size=0, dense_if_larger=False, example_inputs=(x, pad),
                               **kw)
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while sparsify ran
    assert sum(d.rewrites for d in sparse._sparsify_plan.decisions) == 2 * 6
    with torch.no_grad():
        want = model(x, pad)
        got = sparse(x, pad)
    assert rel(got[~pad], want[~pad]) < 1e-5  # the real positions: what the original computes
    # measured against the original on the same (standard) path, padded positions included
    assert model_error(model, sparse, as_batches([(x, pad)]))["error"] < 1e-5
    # calibration statistics and the fit come from that path too
    calibrated = sparsify.sparsify(model, method=method, min_size=0, calibration_data=[(x, pad)],
                                   example_inputs=(x, pad), **(dict(density=0.5, block_size=8)
                                                               if method == "block_sparse" else dict(rank=8)))
    assert calibrated._sparsify_plan.calibration["error"] < 1


class _Stack(nn.Module):
    def __init__(self, layer: nn.Module, decoder: bool):
        super().__init__()
        self.layer, self.decoder = layer, decoder

    def forward(self, x, memory):
        return self.layer(x, memory) if self.decoder else self.layer(x)


@settings(max_examples=12, deadline=None)
@given(decoder=st.booleans(), heads=st.sampled_from([2, 4]), head_dim=st.sampled_from([8, 16]),
       ff=st.sampled_from([32, 64]), norm_first=st.booleans(), batch_first=st.booleans(),
       activation=st.sampled_from(["relu", "gelu"]), bias=st.booleans(),
       method=st.sampled_from(["block_sparse", "low_rank"]), seed=st.integers(0, 2**16))
def test_any_torch_transformer_layer_converts_whole(decoder, heads, head_dim, ff, norm_first, batch_first,
                                                    activation, bias, method, seed):
    torch.manual_seed(seed)
    d = heads * head_dim
    cls = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
    layer = cls(d, heads, ff, dropout=0.0, activation=activation, norm_first=norm_first,
                batch_first=batch_first, bias=bias)
    model = _Stack(layer, decoder).eval()
    shape = (2, 5, d) if batch_first else (5, 2, d)
    x, memory = torch.randn(*shape), torch.randn(*shape)
    kw = dict(density=0.5, block_size=8) if method == "block_sparse" else dict(rank=0.5)
    sparse = sparsify.sparsify(model, method=method, min_size=0, example_inputs=(x, memory), **kw)
    assert type(sparse) is _Stack and type(sparse.layer) is cls
    # every projection: q, k, v, out per attention block, and the two feed-forward Linears
    expected = (8 if decoder else 4) + 2
    assert sum(dd.rewrites for dd in sparse._sparsify_plan.decisions) == expected
    with torch.no_grad():
        assert rel(sparse(x, memory), sparsify.densify(sparse)(x, memory)) < 1e-5
