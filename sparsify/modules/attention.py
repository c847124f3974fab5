"""``SparseMultiheadAttention``: ``nn.MultiheadAttention`` with rewritten projections.

``nn.MultiheadAttention`` never calls its projections as modules: it hands
``in_proj_weight`` and ``out_proj.weight`` to ``F.multi_head_attention_forward``
(or to the fused ``torch._native_multi_head_attention`` fast path), so swapping
its ``out_proj`` alone would compute with the dense weight.  This subclass keeps
the four projections as modules (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``;
each an ``nn.Linear`` or any rewritten layer) and runs the same attention
computation as torch's slow path, step for step, with the projections called
as modules.  It is still an ``nn.MultiheadAttention`` (``isinstance`` holds, the
constructor attributes are the same), and ``in_proj_weight`` / ``in_proj_bias``
/ ``q_proj_weight``... read as the dense tensors they stand for (weights as
:class:`~sparsify.modules.weight_view.DenseWeightView`, so reading them is free
and ``nn.TransformerEncoderLayer``'s fused fast path, which would bypass the
projections, is not taken).

The packed ``in_proj_weight [3E, E]`` is split into its three row blocks, so a
cross-attention (``query`` differs from ``key``) projects each input by its own
block only, as torch does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weight_view import DenseWeightView

__all__ = ["SparseMultiheadAttention", "mha_projection_weights"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def mha_projection_weights(mha: nn.MultiheadAttention) -> dict[str, tuple[Tensor, Tensor | None, str]]:
    """``name -> (weight, bias, where)`` of the q / k / v projections of an MHA module.

    Example:
        >>> mha = torch.nn.MultiheadAttention(16, 2)
        >>> {k: tuple(w.shape) for k, (w, b, where) in mha_projection_weights(mha).items()}
        {'q_proj': (16, 16), 'k_proj': (16, 16), 'v_proj': (16, 16)}
    """
    e = mha.embed_dim
    bias = mha.in_proj_bias
    out = {}
    for i, name in enumerate(PROJECTIONS):
        b = None if bias is None else bias[i * e:(i + 1) * e]
        if mha._qkv_same_embed_dim:
            out[name] = (mha.in_proj_weight[i * e:(i + 1) * e], b, f"in_proj_weight rows {i * e}:{(i + 1) * e}")
        else:
            out[name] = (getattr(mha, f"{name}_weight"), b, f"{name}_weight")
    return out


def _canonical_mask(mask: Tensor | None, name: str, target_dtype: torch.dtype) -> Tensor | None:
    """Boolean masks become additive float masks (``-inf`` where True), as torch's MHA does."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=target_dtype).masked_fill_(mask, float("-inf"))
    return mask


def _linear_of(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.train(weight.requires_grad)
    return lin


class SparseMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose q / k / v / out projections are modules.

    Example:
        >>> mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
        >>> sm = SparseMultiheadAttention.from_mha(mha)
        >>> x = torch.randn(2, 5, 32)
        >>> torch.allclose(sm(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    def __init__(self, *args, **kwargs) -> None:  # built by from_mha only
        raise TypeError("SparseMultiheadAttention is built from an nn.MultiheadAttention: "
                        "use SparseMultiheadAttention.from_mha(mha).")

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> SparseMultiheadAttention:
        """The same attention with each projection as an ``nn.Linear`` copy of its weights."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                     "batch_first", "head_dim"):
            setattr(self, attr, getattr(mha, attr))
        self.add_zero_attn = mha.add_zero_attn
        self.bias_k = None if mha.bias_k is None else nn.Parameter(mha.bias_k.detach().clone())
        self.bias_v = None if mha.bias_v is None else nn.Parameter(mha.bias_v.detach().clone())
        for name, (w, b, _) in mha_projection_weights(mha).items():
            self.add_module(name, _linear_of(w.detach(), None if b is None else b.detach()))
        self.out_proj = mha.out_proj
        self.train(mha.training)
        return self

    # ----------------------------------------------- the attributes torch's MHA has
    def _projections(self) -> list[nn.Module]:
        return [getattr(self, n) for n in PROJECTIONS]

    @property
    def in_proj_weight(self) -> Tensor | None:
        """The packed ``[3E, E]`` weight (None when kdim / vdim differ from embed_dim)."""
        return DenseWeightView(self._projections()) if self._qkv_same_embed_dim else None

    @property
    def in_proj_bias(self) -> Tensor | None:
        biases = [getattr(m, "bias", None) for m in self._projections()]
        return None if any(b is None for b in biases) else torch.cat(biases)

    @property
    def q_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else DenseWeightView([self.q_proj])

    @property
    def k_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else DenseWeightView([self.k_proj])

    @property
    def v_proj_weight(self) -> Tensor | None:
        return None if self._qkv_same_embed_dim else DenseWeightView([self.v_proj])

    def __setstate__(self, state):  # nn.MultiheadAttention's would add a stale attribute
        nn.Module.__setstate__(self, state)

    # ------------------------------------------------------------ dense reference
    def to_dense_module(self) -> nn.MultiheadAttention:
        """The plain ``nn.MultiheadAttention`` with the dense weights these projections represent."""
        ref = self.out_proj.weight
        mha = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.in_proj_bias is not None,
            add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn, kdim=self.kdim,
            vdim=self.vdim, batch_first=self.batch_first, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            dense = [_dense_weight(m) for m in self._projections()]
            if self._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat(dense))
            else:
                for name, w in zip(PROJECTIONS, dense):
                    getattr(mha, f"{name}_weight").copy_(w)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(self.in_proj_bias)
            if self.bias_k is not None:
                mha.bias_k.copy_(self.bias_k)
                mha.bias_v.copy_(self.bias_v)
            mha.out_proj.weight.copy_(_dense_weight(self.out_proj))
            if mha.out_proj.bias is not None:
                mha.out_proj.bias.copy_(self.out_proj.bias)
        mha.train(self.training)
        return mha

    # ------------------------------------------------------------------ forward
    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        is_batched = query.dim() == 3
        key_padding_mask = _canonical_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _canonical_mask(attn_mask, "attn_mask", query.dtype)
        if self.batch_first and is_batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal, is_batched)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal, is_batched):
        # The steps of torch's F.multi_head_attention_forward, with the projections called as modules.
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, key.shape[0]):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, key.shape[0])}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * heads, tgt_len, key.shape[0]):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * heads, tgt_len, key.shape[0])}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise RuntimeError(f"Expected key_padded_mask.shape == {(bsz, src_len)}, "
                                   f"but got {tuple(key_padding_mask.shape)}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
                                .reshape(bsz * heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            if is_causal and attn_mask is None:
                raise AssertionError("is_causal without an attn_mask is not supported with need_weights=True")
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        q = q.view(bsz, heads, tgt_len, head_dim)
        k = k.view(bsz, heads, src_len, head_dim)
        v = v.view(bsz, heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not is_batched:
            out = out.squeeze(1)
        return out, None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _dense_weight(m: nn.Module) -> Tensor:
    return m.to_dense() if hasattr(m, "to_dense") else m.weight
