"""The hooks a user registered on a layer, and moving them to the module that replaces it.

A rewritten layer is a drop-in for the dense one: it takes the same inputs and
returns the same outputs, so a hook registered on the dense layer (activation
capture, an input clamp, a gradient probe, a state-dict rename) means the same
thing on its replacement.  ``carry_hooks`` moves every ``nn.Module`` hook
registry to the new module, the way ``torch.ao.quantization``'s module swap
keeps forward hooks: forward pre- / post-hooks with their keyword and
always-call bookkeeping, backward pre- / post-hooks, state-dict and
load-state-dict hooks.  The registries move as objects, so a ``RemovableHandle``
the user holds still removes its hook from the new module.

Not carried: the hooks of torch's own weight reparametrizations
(``torch.nn.utils.weight_norm`` / ``spectral_norm`` / ``prune`` and
``parametrizations``' compatibility hooks).  They recompute or rename the dense
layer's ``weight``, which the rewritten layer does not have; the value they
produced is what was converted.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

from torch import nn

__all__ = ["CALL_HOOKS", "carry_hooks", "clear_call_hooks", "has_call_hooks"]

#: The registries hooks run from when the module is called (forward) or differentiated (backward),
#: with the dicts their handles also remove from (keyword hooks, always-called hooks).
CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")
_STATE_HOOKS = ("_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")
_HOOKS = CALL_HOOKS + _STATE_HOOKS
_HAVE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def has_call_hooks(m: nn.Module, *, pre: bool = True) -> bool:
    """Whether ``m`` has a forward or backward hook (``pre=False``: one that sees its output or
    gradients, i.e. not counting forward pre-hooks, which see only the input).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> _ = lin.register_forward_pre_hook(lambda m, args: None)
        >>> has_call_hooks(lin), has_call_hooks(lin, pre=False)
        (True, False)
    """
    names = _HAVE_HOOKS if pre else _HAVE_HOOKS[1:]
    return any(getattr(m, n, None) for n in names)


def _callable_of(hook):
    fn = getattr(hook, "hook", hook)  # torch's _WrappedHook (hooks registered with the module)
    return getattr(fn, "func", fn)  # functools.partial


def _torch_reparametrization(hook) -> bool:
    fn = _callable_of(hook)
    owner = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    return (getattr(owner, "__module__", None) or "").startswith("torch.nn.utils.")


def _bound_to(hook, old: nn.Module, new: nn.Module):
    """A ``_WrappedHook`` that passes ``old`` to its function, re-made to pass ``new``."""
    if getattr(hook, "with_module", False) and getattr(hook, "module", lambda: None)() is old:
        return type(hook)(hook.hook, new)
    return hook


def carry_hooks(old: nn.Module, new: nn.Module) -> list[str]:
    """Give ``new`` (the module that replaces ``old`` in the model) the hooks registered on ``old``;
    return the names of the hooks left behind (torch's weight reparametrizations, module docstring).

    ``new``'s own hooks, if it has any, run after ``old``'s.

    Example:
        >>> old, new = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> handle = old.register_forward_hook(lambda m, i, o: print("seen"))
        >>> carry_hooks(old, new)
        []
        >>> _ = new(new.weight.new_zeros(2))
        seen
        >>> handle.remove(); len(new._forward_hooks)
        0
    """
    if old is new:
        return []
    left: list[str] = []
    dropped: set[int] = set()
    for attr in _HOOKS:
        theirs = getattr(old, attr, None)
        if not theirs:
            continue
        for key, hook in list(theirs.items()):
            if _torch_reparametrization(hook):
                del theirs[key]
                dropped.add(key)
                left.append(getattr(_callable_of(hook), "__qualname__", type(_callable_of(hook)).__qualname__))
            else:
                theirs[key] = _bound_to(hook, old, new)
    for attr in _HOOKS:
        theirs = getattr(old, attr, None)
        if theirs is None:
            continue
        for key in dropped & set(theirs):
            del theirs[key]  # the bookkeeping entries of a dropped hook
        if not theirs:
            continue
        for key, hook in getattr(new, attr, {}).items():
            theirs.setdefault(key, hook)
        setattr(new, attr, theirs)
    if getattr(old, "_backward_hooks", None):
        new._is_full_backward_hook = old._is_full_backward_hook
    return left


def clear_call_hooks(m: nn.Module) -> int:
    """Detach ``m``'s forward and backward hooks (fresh, empty registries); return how many it had."""
    n = sum(len(getattr(m, a, ())) for a in _HAVE_HOOKS)
    for attr in CALL_HOOKS:
        if hasattr(m, attr):
            setattr(m, attr, OrderedDict())
    if hasattr(m, "_is_full_backward_hook"):
        m._is_full_backward_hook = None
    return n
