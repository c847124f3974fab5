"""sparsify_voxels: rewrite a dense voxel network into its spatially sparse form.

Not part of the model ``PIPELINE``: it is driven by ``sparsify.spatial.from_dense``.
Every ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``, ``BatchNorm{1,2,3}d``,
``InstanceNorm{1,2,3}d`` (affine), ``MaxPool`` / ``AvgPool``, activation, dropout and
``Identity`` of an fx graph becomes its ``sparsify.spatial`` counterpart (weights
copied, the dense model untouched), and the functions that act on channels
(``+``, ``*`` by a scalar, ``torch.cat(dim=1)``, ``F.relu`` and friends) are
rewritten to their sparse forms.  Anything else (``flatten``, ``view``, a
``Linear`` on a flattened grid, spatial indexing) has no sparse meaning: the
pass refuses with the node's name.

The semantics under which the sparse network equals the dense one (the tests
check each): **masked dense evaluation**.  Let ``M_l`` be the active sites of
layer ``l``'s output (the input's sites; ``floor(c / s) * s`` after a stride-s
layer; the finer map after a transposed one).  The sparse network computes
exactly the dense network in which every layer's input is zero outside
``M_{l-1}`` and only sites in ``M_l`` are read.  Per layer that requires:

* convolutions: ``padding == (k // 2) * dilation`` for odd kernels, ``0`` for even ones
  (then dense output ``j`` is the sparse output at coordinate ``j * stride``),
  ``padding_mode='zeros'``; groups become a block-diagonal weight (exact);
  transposed convolutions: the same padding rule (``output_padding`` only changes the
  dense output size);
* batch / instance norm: equal in eval mode (an affine map per channel); in training the
  statistics are those of the active sites only, which is the point of a sparse network;
* max pooling: equal when its input is non-negative (e.g. after a ReLU: the zeros at
  empty sites never win); ``padding`` as for convolutions, or ``kernel_size == stride``
  with no padding;
* average pooling: a sum pooling divided by the kernel volume (the dense
  ``count_include_pad`` average counts empty sites as zeros);
* activations: exact at active sites (``f(0) != 0`` at empty sites is what the mask drops).

Example:
    >>> import torch
    >>> from torch import nn
    >>> dense = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
    >>> gm = torch.fx.symbolic_trace(dense)
    >>> sparse = sparsify_voxels(gm, None).module
    >>> [type(m).__name__ for m in sparse.children()]
    ['MinkowskiConvolution', 'MinkowskiBatchNorm', 'MinkowskiReLU']
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .infra import PassResult, set_submodule

__all__ = ["VoxelRewriteError", "sparse_module_for", "sparsify_voxels"]


class VoxelRewriteError(ValueError):
    """A dense layer or function has no exact sparse form; the message says which and why."""


_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_TCONVS = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BNS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_INS = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
_MAXP = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGP = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ACTS = ("ReLU", "ReLU6", "LeakyReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Sigmoid", "Tanh", "Hardtanh",
         "Hardswish", "Hardsigmoid", "Softplus", "Softsign", "Tanhshrink", "LogSigmoid", "PReLU", "Dropout",
         "AlphaDropout")
_FUNCS = (F.relu, torch.relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.leaky_relu, F.elu, F.relu6)


def _tuple(v, d):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def _check_padding(name: str, m: nn.Module, d: int) -> None:
    ks, dil = _tuple(m.kernel_size, d), _tuple(getattr(m, "dilation", 1), d)
    pad = getattr(m, "padding", 0)
    if isinstance(pad, str):
        if pad == "same" and all(k % 2 for k in ks):
            return
        raise VoxelRewriteError(
            f"{name} ({type(m).__name__}): padding={pad!r} has no sparse form here; use padding='same' with odd "
            "kernels, or the explicit padding (k // 2) * dilation."
        )
    pad = _tuple(pad, d)
    want = tuple((k // 2) * di if k % 2 else 0 for k, di in zip(ks, dil))
    if pad != want:
        raise VoxelRewriteError(
            f"{name} ({type(m).__name__}): padding {pad} with kernel {ks} and dilation {dil}: a sparse "
            f"convolution centres odd kernels and starts even ones at the point itself, which is dense padding "
            f"{want}. Other paddings shift the output grid; change the padding to {want} to convert."
        )
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise VoxelRewriteError(
            f"{name} ({type(m).__name__}): padding_mode={m.padding_mode!r}; only 'zeros' matches a sparse "
            "tensor's empty sites."
        )


def _dense_groups_weight(w: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """A grouped weight as the equivalent full (block-diagonal) one: [out, in, *k] (or [in, out, *k])."""
    if groups == 1:
        return w
    # conv [out, in / g, *k] -> [out, in, *k]; transposed [in, out / g, *k] -> [in, out, *k]
    a, b = w.shape[:2]
    full = w.new_zeros(a, b * groups, *w.shape[2:])
    per = a // groups
    for g in range(groups):
        full[g * per:(g + 1) * per, g * b:(g + 1) * b] = w[g * per:(g + 1) * per]
    return full


def _me_kernel(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Dense [out, in, k0..] (conv) or [in, out, k0..] (transposed) -> ME [K, in, out], axis 0 fastest."""
    d = w.dim() - 2
    w = w if transposed else w.transpose(0, 1)  # [in, out, k0, ..., k_{D-1}]
    perm = list(range(d + 1, 1, -1)) + [0, 1]  # [k_{D-1}, ..., k0, in, out]
    return w.permute(*perm).reshape(-1, w.shape[0], w.shape[1]).contiguous()


def sparse_module_for(name: str, m: nn.Module) -> nn.Module | None:
    """The sparse module for dense module ``m`` (None if ``m`` is not a voxel layer at all).

    Example:
        >>> type(sparse_module_for("c", nn.Conv2d(1, 2, 3, padding=1))).__name__
        'MinkowskiConvolution'
    """
    import sparsify.spatial as ME

    t = type(m)
    if t in _CONVS or t in _TCONVS:
        transposed = t in _TCONVS
        d = (_TCONVS if transposed else _CONVS)[t]
        _check_padding(name, m, d)
        ks, st, dil = _tuple(m.kernel_size, d), _tuple(m.stride, d), _tuple(m.dilation, d)
        w = _dense_groups_weight(m.weight.detach(), m.groups, transposed)
        cin, cout = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
        cls = ME.MinkowskiConvolutionTranspose if transposed else ME.MinkowskiConvolution
        out = cls(cin, cout, kernel_size=ks, stride=st, dilation=dil, bias=m.bias is not None, dimension=d)
        kernel = _me_kernel(w, transposed)
        with torch.no_grad():
            out.kernel = nn.Parameter(kernel.reshape(out.kernel.shape).to(m.weight.dtype).clone())
            if m.bias is not None:
                out.bias = nn.Parameter(m.bias.detach().reshape(1, -1).clone())
        return out.to(m.weight.device)
    if t in _BNS:
        out = ME.MinkowskiBatchNorm(m.num_features, m.eps, m.momentum if m.momentum is not None else 0.1, m.affine,
                                    m.track_running_stats)
        ref = m.weight if m.affine else m.running_mean
        if ref is not None:
            out = out.to(ref.dtype).to(ref.device)
        out.bn.load_state_dict(m.state_dict())
        out.bn.momentum = m.momentum
        return out.train(m.training)
    if t in _INS:
        if m.track_running_stats:
            raise VoxelRewriteError(f"{name} ({t.__name__}): track_running_stats=True has no sparse counterpart.")
        out = ME.MinkowskiInstanceNorm(m.num_features, m.eps)
        if m.affine:
            out = out.to(m.weight.dtype).to(m.weight.device)
            with torch.no_grad():
                out.weight.copy_(m.weight.reshape(1, -1))
                out.bias.copy_(m.bias.reshape(1, -1))
        return out
    if t in _MAXP or t in _AVGP:
        d = (_MAXP if t in _MAXP else _AVGP)[t]
        ks, st = _tuple(m.kernel_size, d), _tuple(m.stride if m.stride is not None else m.kernel_size, d)
        pad = _tuple(m.padding, d)
        if getattr(m, "ceil_mode", False):
            raise VoxelRewriteError(f"{name} ({t.__name__}): ceil_mode=True is not supported; use ceil_mode=False.")
        if t in _MAXP and (_tuple(m.dilation, d) != (1,) * d or m.return_indices):
            raise VoxelRewriteError(f"{name} ({t.__name__}): dilation and return_indices are not supported.")
        if not (ks == st and pad == (0,) * d):
            want = tuple(k // 2 if k % 2 else 0 for k in ks)
            if pad != want:
                raise VoxelRewriteError(
                    f"{name} ({t.__name__}): kernel {ks}, stride {st}, padding {pad}: a sparse pooling pools "
                    f"kernel == stride windows without padding, or centred windows (padding {want})."
                )
        if t in _MAXP:
            return ME.MinkowskiMaxPooling(ks, st, dimension=d)
        if getattr(m, "divisor_override", None) is not None or (pad != (0,) * d and not m.count_include_pad):
            raise VoxelRewriteError(f"{name} ({t.__name__}): divisor_override / count_include_pad=False are not supported.")
        return DenseAveragePooling(ks, st, d)
    if t.__name__ in _ACTS and getattr(nn, t.__name__, None) is t:
        out = getattr(ME, f"Minkowski{t.__name__}")()
        out.module = m  # same hyper-parameters (and PReLU weights) as the dense one
        return out
    if t is nn.Identity:
        return nn.Identity()
    return None


class DenseAveragePooling(nn.Module):
    """Dense ``AvgPool`` semantics on a sparse tensor: the window sum over the kernel volume."""

    def __init__(self, kernel_size, stride, dimension: int) -> None:
        super().__init__()
        import sparsify.spatial as ME

        self.pool = ME.MinkowskiSumPooling(kernel_size, stride, dimension=dimension)
        self.volume = math.prod(kernel_size)

    def forward(self, x):
        y = self.pool(x)
        return y._with_features(y.F / self.volume)


def _sparse_cat(*tensors, dim=1):
    import sparsify.spatial as ME

    if dim != 1:
        raise VoxelRewriteError(f"torch.cat(dim={dim}): only the channel dimension (dim=1) has a sparse form.")
    tensors = tensors[0] if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)) else tensors
    return ME.cat(*tensors)


def _on_features(fn):
    def act(x, *args, **kwargs):
        return x._with_features(fn(x.F, *args, **kwargs))

    act.__name__ = f"sparse_{fn.__name__}"
    return act


_SPARSE_FUNCS = {f: _on_features(f) for f in _FUNCS}
_PASSTHROUGH = (operator.add, operator.sub, operator.mul, operator.truediv, operator.neg)


def sparsify_voxels(module: nn.Module, ctx=None) -> PassResult:
    """Rewrite every voxel layer and channel function of an fx GraphModule into its sparse form
    (see the module docstring for the semantics); raise :class:`VoxelRewriteError` for nodes
    that have none."""
    if not isinstance(module, fx.GraphModule):
        raise VoxelRewriteError(
            "sparsify_voxels needs an fx graph of the dense network (torch.fx.symbolic_trace failed or was not run)."
        )
    gm = module
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            new = sparse_module_for(node.target, sub)
            if new is None:
                raise VoxelRewriteError(
                    f"{node.target} ({type(sub).__name__}): no sparse form. Supported: Conv1d-3d, "
                    "ConvTranspose1d-3d, BatchNorm, InstanceNorm, MaxPool, AvgPool, activations, Dropout, Identity."
                )
            set_submodule(gm, node.target, new)
            modified = True
        elif node.op == "call_function":
            if node.target in _SPARSE_FUNCS:
                node.target = _SPARSE_FUNCS[node.target]
                modified = True
            elif node.target is torch.cat:
                node.target = _sparse_cat
                modified = True
            elif node.target in _PASSTHROUGH:
                continue  # SparseTensor implements them on the features (same coordinates) or the union
            else:
                raise VoxelRewriteError(
                    f"node {node.name} calls {getattr(node.target, '__name__', node.target)}: it has no sparse "
                    "form (only channel-wise functions do: +, -, *, /, torch.cat(dim=1), relu / gelu / silu / "
                    "sigmoid / tanh / leaky_relu)."
                )
        elif node.op == "call_method":
            raise VoxelRewriteError(
                f"node {node.name} calls the tensor method .{node.target}(): tensor methods act on dense layout "
                "(shapes, views); a sparse network cannot run them."
            )
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
