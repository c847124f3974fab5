"""Dynamic sparsity: block-level prune and regrow during training (SET and RigL), as an optimizer-side helper.

Every ``update_every`` optimizer steps, each block-sparse weight of the model
drops the ``k`` stored blocks with the smallest L2 norm and grows ``k`` blocks
among those not stored, so its density stays fixed:

* ``SET`` (Mocanu et al. 2018) grows uniformly random blocks;
* ``RigL`` (Evci et al. 2020) grows the blocks where the dense gradient of the
  current batch has the largest L2 norm.  The dense gradient is never built
  whole: for a weight with input ``x`` and output gradient ``dy`` it is
  ``dy^T x``, computed a chunk of block rows at a time (at most
  ``SCORE_BYTES``) and reduced to block norms at once.

``k = drop_fraction(t) * nnz`` with RigL's cosine decay
``drop_fraction / 2 * (1 + cos(pi * t / end_step))`` (or ``schedule="constant"``);
no update after ``end_step`` (default: never stops).  Grown blocks start at
zero, so an update does not change what the model computes; the optimizer's
per-element state of the values (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's
``momentum_buffer``, anything shaped like the values) follows the surviving
blocks and is zero for the new ones, as is ``values.grad``.  Layouts change in
place: the ``values`` parameters keep their identity and shape, so the
optimizer, DDP and any references stay valid.

Distributed training: rank 0 decides and broadcasts the new block masks to
every rank (``torch.distributed.broadcast``), so all ranks adopt identical
layouts whatever their local batches; RigL's scores are rank 0's local
gradient.  Under FSDP2 (``fully_shard``) the values, their gradient and
optimizer state are sharded DTensors between forwards: every rank gathers a
weight's values (``full_tensor()``, one weight at a time) before rank 0
decides, and writes its own shard of the permuted tensors back in place.  Decisions are deterministic given ``seed`` (SET draws from a
generator seeded by ``(seed, update, weight)``; ties break towards the lower
block index).

Usage::

    rigl = sparsify.dynamic.RigL(model, optimizer, update_every=100, drop_fraction=0.3, end_step=7500)
    for x, y in data:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        rigl.step()          # after optimizer.step(): counts steps, updates layouts when due
"""

from __future__ import annotations

import hashlib
import math
import sys
import weakref

import torch
from torch import nn

from .runtime import BlockSparseLayout

__all__ = ["DynamicSparsity", "RigL", "SET", "sparse_weight_modules"]

#: Upper bound on the dense-gradient chunk RigL builds at once (bytes).
SCORE_BYTES = 64 << 20


def sparse_weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every block-sparse weight in ``model`` (a module with ``values`` and ``layout``).

    Example:
        >>> from sparsify.modules.block_sparse_lstm import BlockSparseLSTM
        >>> lstm = BlockSparseLSTM(16, 32, density=0.5, block_size=8)
        >>> [n for n, _ in sparse_weight_modules(lstm)]
        ['weight_ih_l0', 'weight_hh_l0']
    """
    out = []
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "values", None), nn.Parameter) and hasattr(mod, "_set_layout") and hasattr(
                type(mod), "layout"):
            out.append((name, mod))
    return out


def _is_dtensor(t) -> bool:
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def _gathered(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor on every rank (a collective for an FSDP2-sharded DTensor; call it on all ranks)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _write_(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Overwrite ``t`` in place with ``whole`` (for a sharded DTensor: this rank's shard of it)."""
    if _is_dtensor(t):
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the same ``whole``: each takes its own shard, no communication
        t.copy_(distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None))
    else:
        t.copy_(whole)


def _block_norms(values: torch.Tensor) -> torch.Tensor:
    return values.detach().flatten(1).double().norm(dim=1)


def _grad_block_norms(dy: torch.Tensor, x: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """``[n_block_rows, n_block_cols]`` L2 norms of the blocks of ``dy^T x``, a chunk of block rows at a time."""
    b = layout.block_size
    nbr, nbc = layout.n_block_rows, layout.n_block_cols
    rows, cols = layout.shape
    dy = dy.reshape(-1, rows).double()
    x = torch.nn.functional.pad(x.reshape(-1, cols).double(), (0, nbc * b - cols))
    out = torch.empty(nbr, nbc, dtype=torch.float64)
    chunk = max(1, SCORE_BYTES // max(1, b * nbc * b * 8))
    for r0 in range(0, nbr, chunk):  # chunks of block rows: never the whole dense gradient
        r1 = min(nbr, r0 + chunk)
        a = torch.nn.functional.pad(dy[:, r0 * b: min(rows, r1 * b)], (0, r1 * b - min(rows, r1 * b)))
        g = a.T @ x  # [(r1 - r0) * b, nbc * b]
        out[r0:r1] = g.view(r1 - r0, b, nbc, b).pow(2).sum(dim=(1, 3)).sqrt().cpu()
    return out


def _conv_grad_block_norms(module, x: torch.Tensor, dy: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """Block norms of a block-sparse conv's dense weight gradient, a chunk of output block rows at a time."""
    x4, pad = module._prepare(x.unsqueeze(0) if x.dim() == module._nd + 1 else x)
    dy4 = dy if dy.dim() == module._nd + 2 else dy.unsqueeze(0)
    if module._nd == 1:
        dy4 = dy4.unsqueeze(2)
    stride = list(module.stride) if module._nd == 2 else [1, module.stride[0]]
    dilation = list(module.dilation) if module._nd == 2 else [1, module.dilation[0]]
    b = layout.block_size
    nbr, nbc = layout.n_block_rows, layout.n_block_cols
    cout, cin = layout.shape
    kh, kw = module.kernel_size if module._nd == 2 else (1, module.kernel_size[0])
    out = torch.empty(nbr, nbc, dtype=torch.float64)
    chunk = max(1, SCORE_BYTES // max(1, b * nbc * b * kh * kw * 8))
    x4, dy4 = x4.double(), dy4.double()
    for r0 in range(0, nbr, chunk):
        r1 = min(nbr, r0 + chunk)
        hi = min(cout, r1 * b)
        g = torch.nn.grad.conv2d_weight(x4, (hi - r0 * b, cin, kh, kw), dy4[:, r0 * b: hi], stride, pad, dilation)
        g = torch.nn.functional.pad(g, (0, 0, 0, 0, 0, nbc * b - cin, 0, r1 * b - hi))
        out[r0:r1] = g.view(r1 - r0, b, nbc, b, kh, kw).pow(2).sum(dim=(1, 3, 4, 5)).sqrt().cpu()
    return out


class _Recorder:
    """Captures, on update steps only, the operands of each sparse weight's dense gradient."""

    def __init__(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
        self.active = False
        self.data: dict[int, dict] = {}
        self.handles = []
        owners = {}
        for _, mod in model.named_modules():
            if hasattr(mod, "sparse_weights") and hasattr(mod, "_cells"):  # BlockSparseLSTM
                mod._dynamic_record = None
                owners[id(mod)] = mod
                self.handles.append(mod.register_forward_pre_hook(self._lstm_pre))
        self.lstms = list(owners.values())
        self._lstm_weights = {id(w) for lstm in self.lstms for w in lstm.sparse_weights()}
        for _, mod in targets:
            if id(mod) in self._lstm_weights:
                continue
            self.handles.append(mod.register_forward_hook(self._hook))

    def _lstm_pre(self, module, args):
        module._dynamic_record = {} if self.active else None

    def _hook(self, module, args, output):
        if not self.active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        rec = self.data.setdefault(id(module), {})
        rec["x"] = args[0].detach()
        if getattr(module, "activation", "none") != "none":
            rec["post"] = output.detach()

        def save(g, rec=rec):
            rec["dy"] = g.detach()

        output.register_hook(save)

    def scores(self, module, values: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """Block norms of ``module``'s dense gradient on the recorded batch, or None if nothing was recorded.

        ``values`` / ``bias``: the module's whole tensors where they are sharded (FSDP2)."""
        lay = module.layout
        for lstm in self.lstms:
            rec = lstm._dynamic_record or {}
            for k, (ih, hh, _, _) in enumerate(lstm._cells()):
                if module is ih or module is hh:
                    r = rec.get(k)
                    if r is None or "dxproj" not in r:
                        return None
                    dy = r["dxproj"].reshape(-1, lay.shape[0])
                    if module is ih:
                        return _grad_block_norms(dy, r["x"], lay)
                    h_prev = torch.cat([r["h0"].unsqueeze(0), r["hs"][:-1]], dim=0)
                    return _grad_block_norms(dy, h_prev, lay)
        rec = self.data.get(id(module))
        if not rec or "dy" not in rec:
            return None
        dy = rec["dy"]
        if hasattr(module, "_nd"):  # a block-sparse conv
            return _conv_grad_block_norms(module, rec["x"], dy, lay)
        act = getattr(module, "activation", "none")
        if act != "none":
            dy = self._pre_activation_grad(module, rec["x"], dy, act, values, bias)
        return _grad_block_norms(dy, rec["x"], lay)

    @staticmethod
    def _pre_activation_grad(module, x, dy, act, values=None, bias=None):
        from .runtime.executors.cpu import apply_epilogue

        values = module.values if values is None else values
        bias = module.bias if bias is None else bias
        with torch.no_grad():
            pre = x @ module.layout.to_dense(values).T
            if bias is not None:
                pre = pre + bias
        with torch.enable_grad():
            p = pre.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(apply_epilogue(p.clone(), None, None, act), p, dy)
        return g

    def clear(self) -> None:
        self.data.clear()
        for lstm in self.lstms:
            lstm._dynamic_record = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class DynamicSparsity:
    """Prune-and-regrow of every block-sparse weight of ``model`` (module docstring); ``mode`` is ``"set"`` or ``"rigl"``.

    Example:
        >>> import torch
        >>> from sparsify.modules.block_sparse_conv import BlockSparseConv2d
        >>> from sparsify.patterns import random_layout
        >>> _ = torch.manual_seed(0)  # SET may regrow the very blocks it dropped (then nothing changes)
        >>> conv = BlockSparseConv2d(32, 32, 3, random_layout((32, 32), 8, 0.25, seed=0), padding=1)
        >>> opt = torch.optim.Adam(conv.parameters())
        >>> dyn = DynamicSparsity(conv, opt, mode="set", update_every=1, seed=0)
        >>> before = conv.layout
        >>> conv(torch.randn(2, 32, 5, 5)).sum().backward(); opt.step(); changed = dyn.step()
        >>> changed, conv.layout != before, conv.layout.nnz == before.nnz
        (True, True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        mode: str = "rigl",
        update_every: int = 100,
        drop_fraction: float = 0.3,
        end_step: int | None = None,
        schedule: str = "cosine",
        seed: int = 0,
    ) -> None:
        where = type(self).__name__
        if mode not in ("set", "rigl"):
            raise ValueError(f"{where}: mode must be 'set' or 'rigl'. Got {mode!r}.")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"{where}: update_every must be a positive int (optimizer steps). Got {update_every!r}.")
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) or not 0 < drop_fraction < 1:
            raise ValueError(f"{where}: drop_fraction must be in (0, 1). Got {drop_fraction!r}; RigL uses 0.3.")
        if end_step is not None and (isinstance(end_step, bool) or not isinstance(end_step, int) or end_step < 1):
            raise ValueError(f"{where}: end_step must be a positive int or None. Got {end_step!r}.")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"{where}: schedule must be 'cosine' or 'constant'. Got {schedule!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{where}: seed must be an int. Got {type(seed).__name__}.")
        self.targets = sparse_weight_modules(model)
        if not self.targets:
            raise ValueError(f"{where}: the model has no block-sparse weights (BlockSparseLinear, BlockSparseConv*, "
                             "BlockSparseLSTM); convert it with sparsify.sparsify(..., method='block_sparse') first.")
        self.model_ref = weakref.ref(model)
        self.optimizer = optimizer
        self.mode, self.update_every, self.drop_fraction = mode, update_every, float(drop_fraction)
        self.end_step, self.schedule, self.seed = end_step, schedule, seed
        self.step_count = 0
        self.updates = 0
        self.recorder = _Recorder(model, self.targets) if mode == "rigl" else None
        self._arm()

    # ------------------------------------------------------------ schedule
    def fraction(self, step: int) -> float:
        """The drop fraction at optimizer step ``step``."""
        if self.end_step is not None and step > self.end_step:
            return 0.0
        if self.schedule == "constant" or self.end_step is None:
            return self.drop_fraction
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.end_step))

    def _due(self, step: int) -> bool:
        return step % self.update_every == 0 and self.fraction(step) > 0

    def _arm(self) -> None:
        """Record the operands of the next forward/backward if the next step is an update (RigL)."""
        if self.recorder is not None:
            self.recorder.clear()
            self.recorder.active = self._due(self.step_count + 1)

    # ---------------------------------------------------------------- step
    def step(self) -> bool:
        """Count one optimizer step; update the layouts when due.  Returns whether they changed."""
        self.step_count += 1
        changed = False
        if self._due(self.step_count):
            changed = self._update(self.step_count)
            self.updates += 1
        self._arm()
        return changed

    def _rank(self) -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @torch.no_grad()
    def _update(self, step: int) -> bool:
        rank, world = self._rank()
        frac = self.fraction(step)
        changed = False
        for idx, (name, mod) in enumerate(self.targets):
            lay = mod.layout
            total = lay.n_block_rows * lay.n_block_cols
            k = int(round(frac * lay.nnz))
            if k == 0 or lay.nnz == total:
                continue
            values = _gathered(mod.values)  # on every rank: a collective under FSDP2
            bias = _gathered(getattr(mod, "bias", None)) if getattr(mod, "activation", "none") != "none" else None
            new_mask = self._decide(idx, name, mod, lay, k, step, values, bias) if rank == 0 else lay.block_mask()
            if world > 1:
                flag = new_mask.to(torch.uint8).to(mod.values.device)
                torch.distributed.broadcast(flag, src=0)
                new_mask = flag.cpu().bool()
            if torch.equal(new_mask, lay.block_mask()):
                continue
            self._adopt(mod, lay, new_mask, values)
            changed = True
        return changed

    def _decide(self, idx: int, name: str, mod, lay: BlockSparseLayout, k: int, step: int,
                values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, cols = lay.row_indices.long(), lay.col_indices.long()
        mag = _block_norms(values).cpu()
        # drop the k smallest blocks; a stable sort breaks ties towards the lower block index
        drop = torch.sort(mag, stable=True).indices[:k]
        mask = lay.block_mask()
        mask[rows[drop], cols[drop]] = False
        candidates = (~mask).view(-1).nonzero().squeeze(1)  # everything not kept, the just-dropped included
        if self.mode == "set":
            gen = torch.Generator().manual_seed(_sub_seed(self.seed, self.updates, idx))
            grow = candidates[torch.randperm(candidates.numel(), generator=gen)[:k]]
        else:
            scores = self.recorder.scores(mod, values, bias)
            if scores is None:
                raise RuntimeError(
                    f"RigL: no gradient was recorded for {name or 'the model'} on update step {step}. Call "
                    "rigl.step() once per optimizer step, after backward(), with a forward and backward of the "
                    "model in between.")
            s = scores.view(-1)[candidates]
            order = torch.sort(-s, stable=True).indices[:k]
            grow = candidates[order]
        mask.view(-1)[grow] = True
        return mask

    def _adopt(self, mod, old: BlockSparseLayout, mask: torch.Tensor, whole: torch.Tensor) -> None:
        new = BlockSparseLayout.from_block_mask(mask, shape=old.shape, block_size=old.block_size)
        device = mod.values.device
        where_old = torch.full(mask.shape, -1, dtype=torch.long)
        where_old[old.row_indices.long(), old.col_indices.long()] = torch.arange(old.nnz)
        src = where_old[new.row_indices.long(), new.col_indices.long()].to(device)  # -1: a grown block
        fresh = src < 0
        src_c = src.clamp_min(0)

        def permuted(t: torch.Tensor) -> torch.Tensor:
            out = t.index_select(0, src_c)
            out[fresh] = 0
            return out

        values = mod.values
        new_values = permuted(whole.detach())
        state = self.optimizer.state.get(values, {}) if self.optimizer is not None else {}
        for t in list(state.values()):
            if isinstance(t, torch.Tensor) and t.shape == values.shape:
                _write_(t, permuted(_gathered(t)))
        if values.grad is not None:
            _write_(values.grad, permuted(_gathered(values.grad)))
        if _is_dtensor(values):  # FSDP2: same block count, so this rank's shard is overwritten in place
            _write_(values, new_values)
            mod._set_layout(new, device=device)
        elif hasattr(mod, "set_layout_"):
            mod.set_layout_(new, new_values)
        else:  # BlockSparseLinear: same block count, so overwrite the values in place
            values.copy_(new_values)
            mod._set_layout(new, device=device)

    def remove(self) -> None:
        """Remove the hooks this helper installed (RigL)."""
        if self.recorder is not None:
            self.recorder.remove()


def _sub_seed(seed: int, *parts: int) -> int:
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFFFFFFFFFFFFFF


class RigL(DynamicSparsity):
    """RigL: drop the smallest blocks, grow where the dense gradient is largest (module docstring).

    Example:
        >>> from sparsify.modules.block_sparse_lstm import BlockSparseLSTM
        >>> lstm = BlockSparseLSTM(8, 32, density=0.25, block_size=8, seed=0)
        >>> opt = torch.optim.SGD(lstm.parameters(), lr=0.1)
        >>> rigl = RigL(lstm, opt, update_every=1)
        >>> lstm(torch.randn(4, 2, 8))[0].sum().backward(); opt.step(); _ = rigl.step()
        >>> [w.layout.nnz for w in lstm.sparse_weights()]
        [16, 16]
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs) -> None:
        super().__init__(model, optimizer, mode="rigl", **kwargs)


class SET(DynamicSparsity):
    """SET: drop the smallest blocks, grow uniformly random ones (module docstring).

    Example:
        >>> from sparsify.modules.sparse_weight import BlockSparseWeight
        >>> from sparsify.patterns import random_layout
        >>> w = BlockSparseWeight(random_layout((64, 64), 8, 0.25, seed=0))
        >>> s = SET(w, update_every=1, seed=3)
        >>> s.step(), w.layout.nnz
        (True, 16)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs) -> None:
        super().__init__(model, optimizer, mode="set", **kwargs)
