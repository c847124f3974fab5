"""block_sparsify_layers: the block_sparse rewrites that train from scratch or reach past Linear.

Carries out the ``block_sparse`` decisions of

* Conv1d / Conv2d -> BlockSparseConv1d / BlockSparseConv2d (channel blocks shared by
  all taps; ``groups != 1`` stays dense, with the reason);
* nn.LSTM -> BlockSparseLSTM (every input and recurrent weight; ``proj_size`` or a
  hidden size that is not a multiple of the block size stays dense, with the reason);
* Linear sites whose ``layout`` is not ``'magnitude'`` or whose ``init`` is ``'fresh'``.

``layout``: ``'magnitude'`` keeps the largest blocks of the trained weight; ``'random'``,
``'small_world'``, ``'scale_free'`` draw a pattern (``sparsify.patterns``) with a seed
derived from ``seed`` and the layer's name, so every layer gets its own pattern and a run
repeats.  ``init``: ``'copy'`` keeps the trained weights' values in the kept blocks,
``'fresh'`` initializes the layer for training from scratch (the dense default scaled to
the kept fan-in, docs/training.md).  Plain magnitude-copy Linear decisions are left to
``block_sparsify``, which runs after this pass.
"""

from __future__ import annotations

import copy
import hashlib
from types import SimpleNamespace

import torch
from torch import nn

from ..modules.block_sparse import BlockSparseLinear
from ..modules.block_sparse_conv import BlockSparseConv1d, BlockSparseConv2d, channel_block_norms
from ..modules.block_sparse_lstm import BlockSparseLSTM, lstm_layouts
from ..patterns import layout_for
from .infra import PassContext, PassResult
from .rewrite import carry_out
from .sites import LayerSite

__all__ = ["block_sparsify_layers", "layer_seed"]


def layer_seed(seed: int, name: str) -> int:
    """The pattern seed of the layer ``name``: stable across runs and machines.

    Example:
        >>> layer_seed(0, "encoder.fc1") == layer_seed(0, "encoder.fc1") != layer_seed(1, "encoder.fc1")
        True
    """
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _ours(d) -> bool:
    if d.method != "block_sparse" or "module" in d.result:
        return False
    return (d.layer_type in ("Conv1d", "Conv2d", "LSTM") or d.params.get("layout", "magnitude") != "magnitude"
            or d.params.get("init", "copy") != "copy")


def _refusal(site: LayerSite, params: dict) -> str | None:
    m = site.module
    if site.layer_type in ("Conv1d", "Conv2d") and m is not None and m.groups != 1:
        return (f"a grouped convolution (groups={m.groups}) is already block-diagonal; block_sparse takes "
                "groups=1 convolutions, so it stays dense")
    if site.layer_type == "LSTM":
        if m.proj_size:
            return f"an LSTM with projections (proj_size={m.proj_size}): BlockSparseLSTM does not support them"
        if m.hidden_size % params["block_size"]:
            return (f"hidden_size={m.hidden_size} is not a multiple of block_size={params['block_size']} "
                    "(each of the four gates must start on a block row); choose a block size that divides it")
    return None


def _fresh(new: nn.Module, seed: int) -> None:
    """``new.reset_parameters()`` drawn from a generator seeded by the layer's seed (``layer_seed(seed,
    name)``), not from where torch's global RNG happens to be: the layer is the same whether the model
    is converted in memory, streamed one layer at a time, or split across ranks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new.reset_parameters()


def _convert(site: LayerSite, params: dict) -> tuple[nn.Module, dict]:
    pattern, init = params.get("layout", "magnitude"), params.get("init", "copy")
    b, density = params["block_size"], params["density"]
    seed = layer_seed(params.get("seed", 0), site.name)
    m = site.module
    if site.layer_type == "LSTM":
        if pattern == "magnitude":
            new = BlockSparseLSTM.from_dense(m, density=density, block_size=b)
        else:
            dirs = 2 if m.bidirectional else 1
            layouts = lstm_layouts(m.input_size, m.hidden_size, num_layers=m.num_layers, bidirectional=dirs == 2,
                                   block_size=b, density=density, pattern=pattern, seed=seed)
            new = BlockSparseLSTM.from_dense(m, layouts=layouts)
        if init == "fresh":
            _fresh(new, seed)
        hh = new.weight_hh_l0.layout
        return new, {"density": hh.density, "block_size": b, "nnz_blocks": sum(w.layout.nnz for w in
                                                                             new.sparse_weights()),
                     "layout": pattern, "init": init, "dense_params": sum(p.numel() for p in m.parameters())}
    if site.layer_type in ("Conv1d", "Conv2d"):
        cls = BlockSparseConv2d if site.layer_type == "Conv2d" else BlockSparseConv1d
        weight = m.weight.detach()
        shape = (m.out_channels, m.in_channels)
        norms = channel_block_norms(weight) if pattern == "magnitude" else None
        layout = layout_for(pattern, shape, block_size=b, density=density, seed=seed, weight=norms)
        new = cls.from_dense(m, layout=layout)
    else:
        w = site.weight.detach()
        layout = layout_for(pattern, tuple(w.shape), block_size=b, density=density, seed=seed, weight=w)
        new = BlockSparseLinear.from_weight(w, None if site.bias is None else site.bias.detach(), layout)
    if init == "fresh":
        _fresh(new, seed)
    return new, {"density": layout.density, "block_size": b, "nnz_blocks": layout.nnz, "layout": pattern,
                 "init": init}


def block_sparsify_layers(module: nn.Module, ctx: PassContext) -> PassResult:
    if ctx.plan is None:
        return PassResult(module, False)
    mine = [d for d in ctx.plan.decisions if _ours(d)]
    if not mine:
        return PassResult(module, False)
    sites = {}
    from .sites import find_sites

    for site in find_sites(module, ctx):
        sites[site.key] = site
    todo = []
    for d in mine:
        site = sites.get((d.name, d.node))
        why = None if site is None else _refusal(site, d.params)
        if why is not None:  # the planner cannot see these settings: leave the layer dense, say why
            d.method, d.params, d.reason = "dense", {}, why
            continue
        todo.append(d)
    sub = copy.copy(ctx)
    sub.plan = SimpleNamespace(decisions=todo)
    result = carry_out(module, sub, "block_sparse", _convert)
    for d in todo:
        dense = d.result.pop("dense_params", None)
        if dense is not None:  # an nn.LSTM decision stands for all of the layer's parameters
            site = sites[(d.name, d.node)]
            elt = site.weight.element_size()
            d.params_before, d.bytes_before = dense, dense * elt
    return result
