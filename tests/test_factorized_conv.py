"""Properties of the factorized convs (Tucker-2, CP, TT): every conv setting survives.

For any drawn stride (asymmetric), padding (ints, 'valid', 'same' at stride 1),
dilation, padding_mode, groups and bias, the factorized conv's output equals
the output of the plain conv built from its ``to_dense()`` weight with the
original settings; at full rank it equals the original layer.  float64
throughout, so 1e-8 relative is ~1e7 x eps: round-off of sums of a few hundred
terms, never a dropped setting (which gives O(1) errors).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify.passes.factorized import param_formula
from torch import nn

import sparsify
from sparsify import decompose
from sparsify.modules.factorized_conv import CPConv, TTConv, TuckerConv, conv_padding

from .helpers import rel_err


@st.composite
def convs(draw):
    dim = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))
    k = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    choices = ["ints", "valid"] + (["same"] if all(s == 1 for s in stride) else [])
    how = draw(st.sampled_from(choices))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dim)) if how == "ints" else how
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    cls = nn.Conv1d if dim == 1 else nn.Conv2d
    conv = cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
               padding_mode=mode).double()
    return conv


def full_rank(cls, conv):
    cin, cout = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    if cls is TuckerConv:
        return (cout, cin)
    if cls is TTConv:
        return 10**6  # every bond capped at what TT-SVD supports: exact
    return decompose.cp_exact_rank((cout, cin, *conv.kernel_size))


def low_rank(cls):
    return (1, 1) if cls is TuckerConv else 1


FACTORIZED = [TuckerConv, CPConv, TTConv]


@settings(deadline=None)
@given(conv=convs(), cls=st.sampled_from(FACTORIZED), full=st.booleans(),
       forward=st.sampled_from(["factorized", "reconstructed"]), seed=st.integers(0, 2**16))
def test_every_setting_preserved(conv, cls, full, forward, seed):
    torch.manual_seed(seed)
    rank = full_rank(cls, conv) if full else low_rank(cls)
    m = cls.from_dense(conv, rank=rank, forward=forward)
    x = torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=torch.float64)
    y = m(x)
    ref = m.to_dense_module()  # a plain conv with the original settings and the to_dense() weight
    assert type(ref) is type(conv)
    assert (ref.stride, ref.dilation, ref.groups, ref.padding_mode) == (conv.stride, conv.dilation, conv.groups,
                                                                       conv.padding_mode)
    assert conv_padding(ref) == conv_padding(conv)
    assert rel_err(y, ref(x)) < 1e-8
    if full:
        assert rel_err(y, conv(x)) < 1e-8
        assert m.relative_error < 1e-8


@settings(deadline=None)
@given(conv=convs(), cls=st.sampled_from(FACTORIZED),
       forward=st.sampled_from(["factorized", "reconstructed"]))
def test_backward_matches_autograd_through_to_dense(conv, cls, forward):
    m = cls.from_dense(conv, rank=low_rank(cls), forward=forward)
    x = torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=torch.float64,
                    requires_grad=True)
    ref = conv.__class__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=False,
                         padding_mode=conv.padding_mode).double()
    params = list(m.parameters())
    y1 = m(x)
    g = torch.randn_like(y1)
    grads1 = torch.autograd.grad((y1 * g).sum(), [x, *params], allow_unused=True)
    y2 = ref._conv_forward(x, m.to_dense(), m.bias)
    grads2 = torch.autograd.grad((y2 * g).sum(), [x, *params], allow_unused=True)
    assert rel_err(y1, y2) < 1e-8
    for a, b in zip(grads1, grads2):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-8


@settings(deadline=None)
@given(conv=convs(), cls=st.sampled_from(FACTORIZED))
def test_params_match_formula_and_state_dict(conv, cls):
    m = cls.from_dense(conv, rank=low_rank(cls))
    ranks = m.rank if cls is CPConv else m.ranks
    assert sum(p.numel() for p in m.parameters()) == param_formula(cls.method_name, conv, ranks)
    twin = cls(conv.in_channels, conv.out_channels, conv.kernel_size, ranks, stride=conv.stride,
               padding=conv_padding(conv), dilation=conv.dilation, groups=conv.groups,
               padding_mode=conv.padding_mode, bias=conv.bias is not None, dtype=torch.float64)
    twin.load_state_dict(m.state_dict())
    x = torch.randn(1, conv.in_channels, *([9] * (conv.weight.dim() - 2)), dtype=torch.float64)
    torch.testing.assert_close(twin(x), m(x))


def test_float32_full_rank():
    conv = nn.Conv2d(8, 16, 3, stride=(2, 1), padding=(1, 0), padding_mode="reflect")
    x = torch.randn(2, 8, 10, 10)
    for cls in FACTORIZED:
        m = cls.from_dense(conv, rank=full_rank(cls, conv))
        assert m.first_weight.dtype == torch.float32
        assert rel_err(m(x), conv(x)) < 1e-4


@pytest.mark.parametrize("method", ["cp", "tucker", "tt"])
def test_cnn_converts_traces_and_densifies(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, stride=2, padding="valid", padding_mode="zeros"), nn.ReLU(),
                          nn.Conv2d(32, 32, (1, 3), padding="same", padding_mode="circular", groups=2))
    x = torch.randn(2, 16, 12, 12)
    conv = sparsify.sparsify(model, method=method, rank=0.5, min_size=0, example_inputs=(x,))
    assert sum(isinstance(m, tuple(FACTORIZED)) for m in conv.modules()) >= 2
    traced = torch.fx.symbolic_trace(conv)
    torch.testing.assert_close(traced(x), conv(x))
    torch.testing.assert_close(sparsify.densify(conv)(x), conv(x), rtol=1e-4, atol=1e-5)
    conv(x).sum().backward()


def test_tt_ranks_are_the_produced_ones():
    # modes (in=2, 3, 3, out=8): TT-SVD caps the bonds at (2, 6, 8) whatever is asked
    conv = nn.Conv2d(2, 8, 3, stride=(1, 2), padding=(2, 0)).double()
    m = TTConv.from_dense(conv, rank=7)
    assert m.ranks == (1, 2, 6, 7, 1)
    assert [tuple(w.shape[:2]) for w in m.spatial_weights] == [(6, 2), (7, 6)]
    assert TTConv.from_dense(conv, rank=10**6).ranks == (1, 2, 6, 8, 1)


def test_depthwise_left_dense_with_reason():
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1, groups=256))
    conv = sparsify.sparsify(model, method="tucker", rank=0.5, min_size=0,
                             example_inputs=(torch.randn(1, 256, 8, 8),))
    d = conv._sparsify_plan.decisions[0]
    assert d.method == "dense" and "not fewer than the dense layer" in d.reason
    assert isinstance(conv.get_submodule("0"), nn.Conv2d)


def test_conv_padding_same_matches_torch():
    for k, dil in [((4, 3), (1, 2)), ((2, 2), (3, 1))]:
        conv = nn.Conv2d(1, 1, k, padding="same", dilation=dil, bias=False)
        x = torch.randn(1, 1, 7, 7)
        pads = conv_padding(conv)
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        torch.testing.assert_close(F.conv2d(F.pad(x, flat), conv.weight, dilation=dil), conv(x))


# ------------------------------------------- reconstructed-weight cache and the forward choice
@settings(deadline=None, max_examples=20)
@given(conv=convs(), cls=st.sampled_from(FACTORIZED))
def test_reconstructed_cache_used_only_in_eval_no_grad_and_invalidated_by_inplace_updates(conv, cls):
    m = cls.from_dense(conv, rank=low_rank(cls), forward="reconstructed")
    x = torch.randn(2, conv.in_channels, *([7] * len(conv.kernel_size)), dtype=torch.float64)

    def ref():
        return m._padded_conv(x, m.to_dense(), m.groups, range(m.dim), m.bias)

    m.train()
    with torch.no_grad():
        m(x)
    assert "_weight_cache" not in m.__dict__          # training mode: rebuilt every call
    m.eval()
    y = m(x)
    assert y.grad_fn is not None and "_weight_cache" not in m.__dict__  # grad on: never cached
    with torch.no_grad():
        m(x)
        w = m.__dict__["_weight_cache"][1]
        m(x)
        assert m.__dict__["_weight_cache"][1] is w      # reused
        m.first_weight.mul_(2.0)                        # in-place: the version counter moves
        assert torch.allclose(m(x), ref(), rtol=1e-10, atol=1e-12)
        assert m.__dict__["_weight_cache"][1] is not w
        m.clear_weight_cache()
        assert "_weight_cache" not in m.__dict__


def _planned(conv: nn.Module, x: torch.Tensor, method: str, rank):
    out = sparsify.sparsify(nn.Sequential(conv), method=method, rank=rank, min_size=0, example_inputs=(x,))
    (d,) = out._sparsify_plan.decisions
    return d, out.get_submodule(d.result["module"])


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_roofline_picks_reconstructed_for_memory_bound_stages(method):
    # 64->128 3x3 stride 2 at 56x56: fewer FLOPs factorized, but the 1x1 / depthwise stages at
    # 56x56 are memory-bound (1.2-2.7x slower than dense on CPU, benchmarks/results)
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3, stride=2, padding=1)
    x = torch.randn(16, 64, 56, 56)
    d, m = _planned(conv, x, method, 0.25)
    assert m.factorized_flops(x.shape) <= d.flops_before + 16 * 128 * 28 * 28
    assert d.result["forward"] == "reconstructed" and "roofline" in d.result["forward_reason"]
    assert m.flops(x.shape) == m.dense_flops(x.shape)


def test_roofline_picks_factorized_when_compute_bound():
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(16, 256, 14, 14)
    d, m = _planned(conv, x, "tucker", 0.1)
    assert d.result["forward"] == "factorized" and "roofline" in d.result["forward_reason"]


@settings(deadline=None, max_examples=15)
@given(method=st.sampled_from(["tucker", "cp", "tt"]), rank=st.sampled_from([0.05, 0.3, 0.9]),
       side=st.sampled_from([4, 16]), stride=st.sampled_from([1, 2]))
def test_auto_forward_never_exceeds_dense_inference_flops(method, rank, side, stride):
    conv = nn.Conv2d(16, 32, 3, stride=stride, padding=1)
    x = torch.randn(2, 16, side, side)
    d, m = _planned(conv, x, method, rank)
    if d.method == "dense":
        return
    assert m.flops(x.shape) <= m.dense_flops(x.shape)
