"""Dynamic sparsity: block-level prune and regrow during training (SET and RigL), as an optimizer-side helper.

Every ``update_every`` optimizer steps, each block-sparse weight of the model
drops the ``k`` stored blocks with the smallest L2 norm and grows ``k`` blocks
among those not stored, so its density stays fixed:

* ``SET`` (Mocanu et al. 2018) grows uniformly random blocks;
* ``RigL`` (Evci et al. 2020) grows the blocks where the dense gradient of the
  current batch has the largest L2 norm.  The dense gradient is never built
  whole: for a weight with input ``x`` and output gradient ``dy`` it is
  ``dy^T x``, computed a chunk of block rows at a time (at most
  ``SCORE_BYTES``) and reduced to block norms at once.  A weight called
  several times before a backward (shared, called twice, several losses
  summed), or backpropagated several times through one retained graph, is
  scored on the sum over its calls and backwards, the gradient autograd
  accumulates; under gradient accumulation (a backward per micro-batch) on the
  last micro-batch's, so at most two micro-batches' operands are held.

``k = drop_fraction(t) * nnz`` with RigL's cosine decay
``drop_fraction / 2 * (1 + cos(pi * t / end_step))`` (or ``schedule="constant"``);
no update after ``end_step`` (default: never stops).  Grown blocks start at
zero, so an update does not change what the model computes; the optimizer's
state of the values whose first dimension is the block count (Adam's
``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``, Adafactor's
``row_var`` / ``col_var``) follows the surviving blocks and is zero for the new
ones, as is ``values.grad``; scalars (``step``) stay, and other per-parameter
state is refused before any layout changes.  The optimizer must be one that
holds the block-sparse ``values`` of every weight the helper manages (built
after conversion); to train and manage only part of a model, give the helper
that submodule.  Layouts change in
place: the ``values`` parameters keep their identity and shape, so the
optimizer, DDP and any references stay valid.  ``state_dict()`` /
``load_state_dict()`` save and restore the settings and the position in the
schedule (plain numbers, as torch's LR schedulers), so a run resumed from a
checkpoint of model, optimizer and helper takes the same steps.

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
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rigl": rigl.state_dict()}, path)
"""

from __future__ import annotations

import hashlib
import math
import sys
import weakref

import torch
from torch import nn

from .runtime import BlockSparseLayout
from .runtime.executors.cpu_conv import dense_conv_weight

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


def _conv_operands(module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A block-sparse conv's recorded input and output gradient as its 2-D op sees them (batched, padded),
    and the op's padding."""
    x4, pad = module._prepare(x.unsqueeze(0) if x.dim() == module._nd + 1 else x)
    dy4 = dy if dy.dim() == module._nd + 2 else dy.unsqueeze(0)
    return x4, (dy4.unsqueeze(2) if module._nd == 1 else dy4), pad


def _conv_geometry(module) -> tuple[list[int], list[int], tuple[int, int]]:
    """``(stride, dilation, (kh, kw))`` of a block-sparse conv as its 2-D op takes them."""
    if module._nd == 2:
        return list(module.stride), list(module.dilation), tuple(module.kernel_size)
    return [1, module.stride[0]], [1, module.dilation[0]], (1, module.kernel_size[0])


def _conv_grad_block_norms(module, pairs: list[tuple[torch.Tensor, torch.Tensor]], pad: list[int],
                           layout: BlockSparseLayout) -> torch.Tensor:
    """Block norms of a block-sparse conv's dense weight gradient, summed over the calls ``pairs`` of
    ``(x4, dy4)`` (``_conv_operands``), a chunk of output block rows at a time."""
    stride, dilation, (kh, kw) = _conv_geometry(module)
    b = layout.block_size
    nbr, nbc = layout.n_block_rows, layout.n_block_cols
    cout, cin = layout.shape
    out = torch.empty(nbr, nbc, dtype=torch.float64)
    chunk = max(1, SCORE_BYTES // max(1, b * nbc * b * kh * kw * 8))
    pairs = [(x4.double(), dy4.double()) for x4, dy4 in pairs]
    for r0 in range(0, nbr, chunk):
        r1 = min(nbr, r0 + chunk)
        hi = min(cout, r1 * b)
        g = sum(torch.nn.grad.conv2d_weight(x4, (hi - r0 * b, cin, kh, kw), dy4[:, r0 * b: hi], stride, pad,
                                            dilation) for x4, dy4 in pairs)
        g = torch.nn.functional.pad(g, (0, 0, 0, 0, 0, nbc * b - cin, 0, r1 * b - hi))
        out[r0:r1] = g.view(r1 - r0, b, nbc, b, kh, kw).pow(2).sum(dim=(1, 3, 4, 5)).sqrt().cpu()
    return out


def _inside_backward() -> bool:
    """Whether autograd is running a backward pass now (activation checkpointing recomputes forwards there)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _latest(calls: list[dict], has_grad) -> list[dict]:
    """The calls of the latest round in which ``has_grad(call)``."""
    done = [c for c in calls if has_grad(c)]
    last = max((c["round"] for c in done), default=None)
    return [c for c in done if c["round"] == last]


def _lstm_has_grad(call: dict) -> bool:
    return any("dxproj" in r for r in call["cells"].values())


class _Recorder:
    """Captures, on update steps only, the operands of each sparse weight's dense gradient.

    Every call of a weight is kept as its own ``(x, dy)`` pair, so a layer called
    twice, a shared layer or several losses summed give the gradient autograd
    accumulates, the sum of the calls' ``dy^T x``.  Calls come in rounds: a
    forward (outside a backward) after a round that has received gradient starts
    the next one and drops every round but the last that received gradient.  A
    weight is scored on its latest round with gradient: under gradient accumulation
    (forward and backward per micro-batch) the last micro-batch's.  So at most two
    rounds of operands are held, whatever the number of micro-batches.
    """

    def __init__(self, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
        self.active = False
        self.round = 0
        self._round_has_grad = False  # a Linear / conv call of the current round received its gradient
        self.calls: dict[int, list[dict]] = {}  # id(module) -> [{"round", "x", "dy"}], one per call
        self.lstm_calls: dict[int, list[dict]] = {}  # id(lstm) -> [{"round", "cells": {cell: record}}]
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

    def _begin_call(self) -> int:
        """The round of a forward call starting now."""
        if not _inside_backward() and (self._round_has_grad or any(
                _lstm_has_grad(c) for calls in self.lstm_calls.values() for c in calls if c["round"] == self.round)):
            for key, calls in list(self.calls.items()):
                self.calls[key] = _latest(calls, lambda c: "dy" in c)
            for key, calls in list(self.lstm_calls.items()):
                self.lstm_calls[key] = _latest(calls, _lstm_has_grad)
            self.round += 1
            self._round_has_grad = False
        return self.round

    def _lstm_pre(self, module, args):
        if not self.active:
            module._dynamic_record = None
            return
        call = {"round": self._begin_call(), "cells": {}}
        self.lstm_calls.setdefault(id(module), []).append(call)
        module._dynamic_record = call["cells"]  # the LSTM's forward fills it per cell

    def _hook(self, module, args, output):
        if not self.active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        call = {"round": self._begin_call(), "x": args[0].detach()}
        self.calls.setdefault(id(module), []).append(call)

        def save(g, call=call):
            # a second backward through a retained graph accumulates, as .grad does (the LSTM's hook as well)
            call["dy"] = g.detach() if "dy" not in call else call["dy"] + g.detach()
            if call["round"] == self.round:
                self._round_has_grad = True

        output.register_hook(save)

    def scores(self, module, values: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """Block norms of ``module``'s dense gradient on the recorded batch, or None if nothing was recorded.

        ``values`` / ``bias``: the module's whole tensors where they are sharded (FSDP2)."""
        lay = module.layout
        for lstm in self.lstms:
            for k, (ih, hh, _, _) in enumerate(lstm._cells()):
                if module is ih or module is hh:
                    calls = _latest(self.lstm_calls.get(id(lstm), []), lambda c, k=k: "dxproj" in c["cells"].get(k, {}))
                    if not calls:
                        return None
                    recs = [c["cells"][k] for c in calls]
                    dy = torch.cat([r["dxproj"].reshape(-1, lay.shape[0]) for r in recs])
                    if module is ih:
                        x = torch.cat([r["x"].reshape(-1, lay.shape[1]) for r in recs])
                    else:
                        x = torch.cat([torch.cat([r["h0"].unsqueeze(0), r["hs"][:-1]], dim=0).reshape(-1, lay.shape[1])
                                       for r in recs])
                    return _grad_block_norms(dy, x, lay)
        calls = _latest(self.calls.get(id(module), []), lambda c: "dy" in c)
        if not calls:
            return None
        act = getattr(module, "activation", "none")
        if hasattr(module, "_nd"):  # a block-sparse conv
            ops = [_conv_operands(module, c["x"], c["dy"]) for c in calls]
            pad = ops[0][2]
            pairs = [(x4, dy4) for x4, dy4, _ in ops]
            if act != "none":
                pairs = [(x4, self._pre_activation_grad(module, x4, dy4, act, values, bias, pad)) for x4, dy4 in pairs]
            return _conv_grad_block_norms(module, pairs, pad, lay)
        rows, cols = lay.shape
        xs = [c["x"].reshape(-1, cols) for c in calls]
        dys = [c["dy"].reshape(-1, rows) for c in calls]
        if act != "none":
            dys = [self._pre_activation_grad(module, x, dy, act, values, bias) for x, dy in zip(xs, dys)]
        return _grad_block_norms(torch.cat(dys), torch.cat(xs), lay)

    @staticmethod
    def _pre_activation_grad(module, x, dy, act, values=None, bias=None, pad=None):
        """The gradient before the fused activation from the one after it: the pre-activation is recomputed
        from ``x`` (one product; for a conv ``x``, ``dy`` and ``pad`` as ``_conv_operands`` gives them)."""
        from .runtime.executors.cpu import apply_epilogue

        values = module.values if values is None else values
        bias = module.bias if bias is None else bias
        with torch.no_grad():
            if hasattr(module, "_nd"):
                lay = module.layout
                v = values if module._nd == 2 else values.unsqueeze(3)
                w = dense_conv_weight(v, module.row_indices, module.col_indices, lay.n_block_rows, lay.n_block_cols,
                                      *lay.shape)
                stride, dilation, _ = _conv_geometry(module)
                pre = torch.nn.functional.conv2d(x, w.to(x.dtype), None, stride, pad, dilation)
                if bias is not None:
                    pre = pre + bias.view(-1, 1, 1)
            else:
                pre = x @ module.layout.to_dense(values).T
                if bias is not None:
                    pre = pre + bias
        with torch.enable_grad():
            p = pre.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(apply_epilogue(p.clone(), None, None, act), p, dy)
        return g

    def clear(self) -> None:
        self.calls.clear()
        self.lstm_calls.clear()
        self.round = 0
        self._round_has_grad = False
        for lstm in self.lstms:
            lstm._dynamic_record = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


#: What ``DynamicSparsity.state_dict()`` saves: the settings and the position in the schedule.
_STATE_KEYS = ("mode", "update_every", "drop_fraction", "end_step", "schedule", "seed", "step_count", "updates")


def _check_settings(where: str, mode, update_every, drop_fraction, end_step, schedule, seed) -> None:
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
        _check_settings(where, mode, update_every, drop_fraction, end_step, schedule, seed)
        self.targets = sparse_weight_modules(model)
        if not self.targets:
            raise ValueError(f"{where}: the model has no block-sparse weights (BlockSparseLinear, BlockSparseConv*, "
                             "BlockSparseLSTM); convert it with sparsify.sparsify(..., method='block_sparse') first.")
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                got = repr(optimizer) if isinstance(optimizer, str) else f"a {type(optimizer).__name__}"
                raise TypeError(f"{where}: optimizer must be the torch.optim.Optimizer that trains the model (its "
                                "per-block state moves with the blocks), or None to move no optimizer state. Got "
                                f"{got}; build one first, e.g. torch.optim.Adam(model.parameters()).")
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            lacking = [name for name, mod in self.targets if id(mod.values) not in held]
            if len(lacking) == len(self.targets):
                raise ValueError(
                    f"{where}: the optimizer holds none of the model's block-sparse values parameters, so they would "
                    "never train and their optimizer state could not follow the blocks (an optimizer built on the "
                    "model before sparsify.sparsify() holds the replaced dense weights). Build the optimizer from "
                    "the converted model's parameters, e.g. torch.optim.Adam(model.parameters()).")
            if lacking:
                # a layer pruned and regrown but never trained keeps its grown blocks at zero: it only loses weights
                shown = ", ".join(repr(n) for n in lacking[:8]) + (
                    f" and {len(lacking) - 8} more" if len(lacking) > 8 else "")
                raise ValueError(
                    f"{where}: the optimizer lacks the block-sparse values of {len(lacking)} of the "
                    f"{len(self.targets)} layers this helper manages: {shown}. Those layers would be pruned and "
                    "regrown, their grown blocks left at zero, but never trained. Build the optimizer after "
                    "conversion over model.parameters() (or add param groups for those layers' values), or give "
                    f"{where} only the part of the model the optimizer trains: it manages every block-sparse weight "
                    f"of the module it is given, e.g. {where}(model.decoder, optimizer).")
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

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The settings and the position in the schedule, plain Python numbers and strings (as torch's LR
        schedulers keep); save it with the model's and the optimizer's state_dict, which hold the layouts and
        the moved optimizer state.

        Example:
            >>> from sparsify.modules.sparse_weight import BlockSparseWeight
            >>> from sparsify.patterns import random_layout
            >>> s = SET(BlockSparseWeight(random_layout((32, 32), 8, 0.5, seed=0)), update_every=2)
            >>> _ = s.step(), s.step(), s.step()
            >>> {k: s.state_dict()[k] for k in ("step_count", "updates")}
            {'step_count': 3, 'updates': 1}
        """
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from ``state_dict()``: with the model's and the optimizer's state loaded as well, the next
        steps (when to update, the fraction, SET's draws, what RigL records) are those of the saved run.  The
        saved settings replace the constructor's, as in torch's LR schedulers; the mode must match.

        Example:
            >>> from sparsify.modules.sparse_weight import BlockSparseWeight
            >>> from sparsify.patterns import random_layout
            >>> w = BlockSparseWeight(random_layout((32, 32), 8, 0.5, seed=0))
            >>> saved = {**SET(w, update_every=2).state_dict(), "step_count": 5, "updates": 2}
            >>> s = SET(w, update_every=2)
            >>> s.load_state_dict(saved)
            >>> s.step_count, s.fraction(6) > 0
            (5, True)
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{where}: expected the dict state_dict() returns. Got {type(state_dict).__name__}.")
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        unknown = sorted(str(k) for k in state_dict if k not in _STATE_KEYS)
        if missing or unknown:
            raise ValueError(f"{where}: not a dynamic-sparsity state: missing {missing}, unknown {unknown}; "
                             f"expected the keys {list(_STATE_KEYS)} that state_dict() saves.")
        st = dict(state_dict)
        if st["mode"] != self.mode:
            raise ValueError(f"{where}: the state is of mode {st['mode']!r} and this helper's is {self.mode!r}; "
                             f"resume with the class that saved it ({'RigL' if st['mode'] == 'rigl' else 'SET'}).")
        _check_settings(where, st["mode"], st["update_every"], st["drop_fraction"], st["end_step"], st["schedule"],
                        st["seed"])
        for key in ("step_count", "updates"):
            if isinstance(st[key], bool) or not isinstance(st[key], int) or st[key] < 0:
                raise ValueError(f"{where}: {key} must be a non-negative int. Got {st[key]!r}.")
        if st["updates"] > st["step_count"]:
            raise ValueError(f"{where}: updates ({st['updates']}) exceeds step_count ({st['step_count']}); "
                             "the state is not one state_dict() saved.")
        self.update_every, self.drop_fraction = st["update_every"], float(st["drop_fraction"])
        self.end_step, self.schedule, self.seed = st["end_step"], st["schedule"], st["seed"]
        self.step_count, self.updates = st["step_count"], st["updates"]
        self._arm()  # RigL records on the next step if that one updates

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
        for name, mod in self.targets:  # refuse state that cannot move before any layout changes
            self._block_state(name, mod.values)
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
            self._adopt(mod, name, lay, new_mask, values)
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

    def _block_state(self, name: str, values: nn.Parameter) -> list[torch.Tensor]:
        """The optimizer state tensors of ``values`` that move with its blocks: those whose leading dimension is
        the block count (per element like Adam's moments, per block row / column like Adafactor's factors)."""
        if self.optimizer is None:
            return []
        nnz = values.shape[0]
        out = []
        for key, t in self.optimizer.state.get(values, {}).items():
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue  # a scalar such as Adam's step: nothing per block
            if t.shape[0] == nnz:
                out.append(t)
            elif t.numel() != 1:
                raise RuntimeError(
                    f"{type(self).__name__}: cannot move the optimizer state {key!r} of "
                    f"{name + '.values' if name else 'values'} (shape {tuple(t.shape)}) with the blocks: only state "
                    f"whose first dimension is the block count {nnz} (values {tuple(values.shape)}) maps to blocks, "
                    "and keeping it in place would pair it with other blocks. Use an optimizer with per-element or "
                    "per-block state (SGD, Adam, AdamW, Adafactor, ...) for the block-sparse values, or keep the "
                    "layouts fixed.")
        return out

    def _adopt(self, mod, name: str, old: BlockSparseLayout, mask: torch.Tensor, whole: torch.Tensor) -> None:
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
        for t in self._block_state(name, values):
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
