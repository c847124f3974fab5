"""``finetune``: recover what one-shot compression cost, by distillation against the original.

The converted model (the student) learns to reproduce the original model's (the
teacher's) outputs on unlabeled inputs.  Only the stored blocks and factors train
(the parameters of the rewritten layers, biases excluded); every other parameter is
frozen and the block patterns and ranks are fixed.  ``also_train=("bias", "norm")`` opts
in to training, besides, every bias and the affine parameters of normalization layers
(LayerNorm, RMSNorm, GroupNorm, BatchNorm; BitFit-style): they exist in the dense model
too, so the parameter count does not change.  Embeddings never train.  The loss is one of:

* ``"output"`` (default): the relative squared error ``||s - t||^2 / ||t||^2`` of each
  floating output the model returns (or those named in ``outputs=``), summed;
* ``"kl"``: the KL divergence ``KL(softmax(t / T) || softmax(s / T)) T^2`` of the logits
  (the output named ``logits``, or the first one / the one named in ``outputs=``);
* plus, with ``hidden=["encoder.layer.3", ...]``, the relative squared error of those
  modules' outputs (the same qualified name in both models), each weighted by
  ``hidden_weight`` (1 by default) against the output term.

AdamW with a linear warm-up over the first 5% of the steps and a cosine decay;
gradients clipped to norm 1.  The student runs in eval mode (no dropout, BatchNorm on
its running statistics: only the stored blocks / factors change).  A tqdm bar shows the
loss; the loss of every step is kept in ``model._sparsify_finetune["losses"]`` and
logged every ``log_every`` steps to the ``sparsify.finetune`` logger.  Runs on the
model's device (CPU or GPU); the teacher must be on the same one.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import _leaves, as_batches, model_device, model_error

__all__ = ["finetune", "FINETUNE_ATTR", "trainable_parameters", "extra_parameters", "ALSO_TRAIN"]

#: Where a finetuned model keeps its loss log.
FINETUNE_ATTR = "_sparsify_finetune"
_LOSSES = ("output", "kl")
#: What ``finetune(also_train=...)`` may add to the stored blocks and factors.
ALSO_TRAIN = ("bias", "norm")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
log = logging.getLogger("sparsify.finetune")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of the stored blocks and factors of every rewritten layer
    (biases excluded), each once.

    Example:
        >>> import sparsify
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> [n for n, _ in trainable_parameters(m)]
        ['0.values']
    """
    out, seen = [], set()
    for mname, m in model.named_modules():
        if not (hasattr(m, "to_dense_module") and hasattr(m, "to_dense")):
            continue
        for pname, p in m.named_parameters():
            if pname == "bias" or pname.endswith(".bias") or id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def _is_norm(m: nn.Module) -> bool:
    # torch's norms, and the ones models define themselves (LlamaRMSNorm, T5LayerNorm, ...)
    return isinstance(m, _NORMS) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))


def extra_parameters(model: nn.Module, also_train: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` that ``also_train`` adds: every ``bias`` (``"bias"``) and
    the parameters of normalization layers (``"norm"``), not those already in
    ``trainable_parameters`` and never an embedding's.

    Example:
        >>> import sparsify
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256)), density=0.5)
        >>> [n for n, _ in extra_parameters(m, ("bias", "norm"))]
        ['0.bias', '1.weight', '1.bias']
    """
    seen = {id(p) for _, p in trainable_parameters(model)}
    frozen = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
              for p in m.parameters()}
    out = []
    for mname, m in model.named_modules():
        norm = "norm" in also_train and _is_norm(m)
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen or id(p) in frozen or not (norm or ("bias" in also_train and pname == "bias")):
                continue
            seen.add(id(p))
            out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def _check(model, teacher, steps, lr, loss, temperature, hidden, weight_decay, log_every, hidden_weight=1.0,
           also_train=()) -> None:
    if not isinstance(model, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError(f"finetune: expected nn.Modules for the model and teacher=; got {type(model).__name__} and "
                        f"{type(teacher).__name__}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"finetune: invalid steps={steps!r}: expected an int >= 1.")
    for name, v in (("lr", lr), ("temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) < math.inf:
            raise ValueError(f"finetune: invalid {name}={v!r}: expected a finite number > 0.")
    for name, v in (("weight_decay", weight_decay), ("hidden_weight", hidden_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) < math.inf:
            raise ValueError(f"finetune: invalid {name}={v!r}: expected a finite number >= 0.")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"finetune: invalid log_every={log_every!r}: expected an int >= 1.")
    if not isinstance(also_train, (tuple, list)) or any(a not in ALSO_TRAIN for a in also_train):
        raise ValueError(f"finetune: invalid also_train={also_train!r}: expected a tuple of "
                         f"{', '.join(map(repr, ALSO_TRAIN))} (or () for the stored blocks and factors only).")
    if loss not in _LOSSES:
        raise ValueError(f"finetune: invalid loss={loss!r}: expected one of {', '.join(map(repr, _LOSSES))}.")
    for h in hidden:
        for who, m in (("model", model), ("teacher", teacher)):
            try:
                m.get_submodule(h)
            except AttributeError:
                raise ValueError(f"finetune(hidden=...): the {who} has no module {h!r}; name modules by their "
                                 "qualified names (model.named_modules()).") from None
    if not trainable_parameters(model):
        raise ValueError("finetune: the model has no rewritten layers to train (convert it with sparsify.sparsify "
                         "first); only stored blocks and factors train.")
    dm, dt = model_device(model), model_device(teacher)
    if dm is not None and dt is not None and dm != dt:
        raise ValueError(f"finetune: the model is on {dm} and the teacher on {dt}; put them on one device.")


def _rel_sq(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.float(), t.float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def _pick(leaves: list[tuple[str, torch.Tensor]], outputs: Sequence[str] | None, loss: str) -> list:
    if outputs:
        names = [n for n, _ in leaves]
        missing = [o for o in outputs if o not in names]
        if missing:
            raise ValueError(f"finetune(outputs=...): the model returns no output {missing[0]!r}; it returns "
                             f"{', '.join(map(repr, names))}.")
        return [(n, t) for n, t in leaves if n in outputs]
    if loss == "kl":
        logits = [(n, t) for n, t in leaves if n.split(".")[-1] == "logits"]
        return logits or leaves[:1]
    return leaves


def _same_shapes(got: list, want: list, what: str) -> None:
    """The student's and the teacher's tensors to match have one shape each (no silent broadcasting)."""
    if len(got) != len(want):
        raise ValueError(f"finetune: the model's {what} has {len(got)} tensors, the teacher's {len(want)}.")
    for (name, s), (_, t) in zip(got, want):
        if s.shape != t.shape:
            raise ValueError(f"finetune: the model's {what} {name!r} has shape {list(s.shape)}, the teacher's "
                             f"{list(t.shape)}; they must be the same model's outputs (give the original as teacher=).")


class _Grab:
    """Forward hooks that keep the outputs of named modules for one step."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.out: dict[str, Any] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(
            lambda mod, a, o, n=n: self.out.__setitem__(n, o)) for n in names]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 200,
    lr: float = 1e-4,
    loss: str = "output",
    outputs: Sequence[str] | None = None,
    hidden: Sequence[str] = (),
    hidden_weight: float = 1.0,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    also_train: Sequence[str] = (),
    eval_data: Any = None,
    inplace: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> nn.Module:
    """Distill ``teacher`` (the original model) into ``model`` (its converted form) on ``data``;
    return the trained model (a copy unless ``inplace=True``).  See the module docstring.

    ``data`` is an iterable of input batches, as ``calibration_data=`` (cycled for ``steps``
    steps; a one-shot iterator such as a generator is read for at most ``steps`` batches, so an
    endless one is fine).  With ``eval_data``, the model's relative output error against the teacher on it
    is measured before and after and recorded.  ``also_train=("bias", "norm")`` trains every
    bias and the normalization layers' parameters too (see ``extra_parameters``).

    Example:
        >>> import torch, sparsify
        >>> teacher = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
        >>> student = sparsify.sparsify(teacher, density=0.25, block_size=32)
        >>> data = [torch.randn(16, 256) for _ in range(4)]
        >>> student = sparsify.finetune(student, teacher=teacher, data=data, steps=20, lr=1e-3, progress=False)
        >>> log = student._sparsify_finetune; log["steps"], log["losses"][-1] < log["losses"][0]
        (20, True)
    """
    hidden = list(hidden)
    _check(model, teacher, steps, lr, loss, temperature, hidden, weight_decay, log_every, hidden_weight, also_train)
    also_train = tuple(also_train)
    if isinstance(data, Iterator):  # a generator may be endless: the steps take at most `steps` of its batches
        data = list(itertools.islice(data, steps))
    batches = as_batches(data, "finetune(data=...)")
    held = as_batches(eval_data, "finetune(eval_data=...)") if eval_data is not None else None
    student = model if inplace else copy.deepcopy(model)
    chosen = trainable_parameters(student) + extra_parameters(student, also_train)
    names = {id(p) for _, p in chosen}
    params = [p for _, p in chosen]
    flags = {id(p): p.requires_grad for p in student.parameters()}
    device = model_device(student)
    before = model_error(teacher, student, held) if held is not None else None
    from .check import _eval, standard_attention

    t_wall, t_cpu = time.perf_counter(), time.process_time()
    losses: list[float] = []
    grabs = (_Grab(student, hidden), _Grab(teacher, hidden)) if hidden else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        for p in student.parameters():
            p.requires_grad_(id(p) in names)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
        with _eval(student), _eval(teacher), standard_attention():  # targets from the path the student runs
            it = iter(batches.batches(device))
            for step in range(steps):
                try:
                    args, kwargs = next(it)
                except StopIteration:
                    it = iter(batches.batches(device))
                    args, kwargs = next(it, (None, None))
                    if args is None:
                        raise ValueError(f"finetune(data=...): the data yielded no batches (at step {step}); give "
                                         "a list of batches or an iterable that can be read again.") from None
                with torch.no_grad():
                    want = _pick(_leaves(teacher(*args, **kwargs)), outputs, loss)
                    want_hidden = {} if grabs is None else dict(grabs[1].out)
                got = _pick(_leaves(student(*args, **kwargs)), outputs, loss)
                if len(got) != len(want):
                    raise ValueError(f"finetune: the model returned {len(got)} outputs to match, the teacher "
                                     f"{len(want)}.")
                _same_shapes(got, want, "output")
                if loss == "kl":
                    tt = temperature
                    total = sum(F.kl_div(F.log_softmax(s.float() / tt, -1), F.log_softmax(t.float() / tt, -1),
                                         reduction="batchmean", log_target=True) * tt * tt
                                for (_, s), (_, t) in zip(got, want))
                else:
                    total = sum(_rel_sq(s, t) for (_, s), (_, t) in zip(got, want))
                if grabs is not None:
                    for h in hidden:
                        s_leaves, t_leaves = _leaves(grabs[0].out[h]), _leaves(want_hidden[h])
                        _same_shapes(s_leaves, t_leaves, f"hidden state of {h!r}")
                        total = total + hidden_weight * sum(_rel_sq(s, t) for (_, s), (_, t) in zip(s_leaves, t_leaves))
                opt.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                value = float(total.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"finetune: the loss became {value} at step {step}; lower lr= "
                                             f"(now {lr:g}).")
                losses.append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4g}")
                if (step + 1) % log_every == 0 or step == steps - 1:
                    log.info("finetune step %d/%d: loss %.6g", step + 1, steps, value)
    finally:
        if bar is not None:
            bar.close()
        if grabs is not None:
            grabs[0].close()
            grabs[1].close()
        for p in student.parameters():
            p.requires_grad_(flags.get(id(p), True))
            p.grad = None
    record: dict[str, Any] = {
        "steps": steps, "lr": lr, "loss": loss, "hidden": hidden, "hidden_weight": hidden_weight, "losses": losses,
        "seconds": time.perf_counter() - t_wall, "cpu_seconds": time.process_time() - t_cpu,
        "device": str(device) if device is not None else "cpu",
        "also_train": list(also_train),
        "trained": [n for n, _ in chosen],
    }
    if held is not None:
        record["error_before"] = before
        record["error_after"] = model_error(teacher, student, held)
    object.__setattr__(student, FINETUNE_ATTR, record)
    from .api import PLAN_ATTR

    plan = getattr(student, PLAN_ATTR, None)
    if plan is not None and hasattr(plan, "notes"):
        plan = copy.copy(plan)
        stale = getattr(plan, "calibration", None)
        # The model's error on the calibration data describes the weights before training: it is no
        # longer this model's, so the report does not carry it as one (report().model_error is None).
        plan.calibration = None
        plan.notes = list(plan.notes) + [
            f"finetuned by distillation: {steps} steps, loss {losses[0]:.4g} -> {losses[-1]:.4g}"
            + (f", output error on eval_data {record['error_before']['error']:.3g} -> "
               f"{record['error_after']['error']:.3g}" if held is not None else "")
            + "; per-layer errors and any error on the calibration data above were measured before it"
            + (f" (the model's was {stale['error']:.3g}; measure it again with "
               "sparsify.calibration.model_error)" if stale else "")]
        object.__setattr__(student, PLAN_ATTR, plan)
    return student
