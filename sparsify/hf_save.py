"""``save_pretrained`` on a converted Hugging Face model: a folder that cannot pass for a dense checkpoint.

A converted model is still its own class, so transformers' ``save_pretrained`` runs and
writes the stored blocks / factors under their own names.  ``from_pretrained`` builds the
*dense* class from that folder, finds none of the dense weights of the converted layers and
initializes them at random, logging only a table of missing / unexpected keys.  Raising in
``save_pretrained`` would break ``Trainer``, which checkpoints through it, so this module
owns what ``sparsify()`` attaches to the converted model (the model sparsify returns, never
the user's original, unless ``inplace=True``) to make such a folder refuse to load as a dense model instead:

* **placeholders**: every dense tensor the conversion removed (``q.weight`` of a rewritten
  layer, a folded BatchNorm's statistics) is written as a 0-dim zero under its dense name.
  transformers' ``from_pretrained`` stops on the size mismatch with a ``RuntimeError``
  (unless the caller passes ``ignore_mismatched_sizes=True``), and so does torch's
  ``load_state_dict`` into the dense class, even with ``strict=False``;
* **a marker**: ``config.json`` gets a ``"sparsify"`` field saying what the folder holds
  and how to load it;
* **a warning**: one :class:`SavePretrainedWarning` per model says what happened and what
  to do (``sparsify.save`` / ``sparsify.load``, or ``sparsify.densify(model).save_pretrained``);
* **a load pre-hook**: the converted model's own ``load_state_dict`` drops the placeholders,
  so a ``Trainer`` resuming from such a checkpoint into the converted model loads it without
  unexpected keys.

Everything lives on the instance: ``save_pretrained`` in its ``__dict__`` (a callable that
holds the model by weak reference, so it adds no reference cycle, and that ``copy.deepcopy``,
pickle and ``torch.save`` rebind to the copy, as torch's own module hooks are), and a ``load_state_dict`` pre-hook.  ``sparsify.densify`` removes both.  Nothing
here reads a file: the marker is written, never trusted.
"""

from __future__ import annotations

import inspect
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["SavePretrainedWarning", "CONFIG_FIELD", "dense_record", "guard", "unguard", "placeholders"]

#: The field of the saved ``config.json`` that marks a converted model's folder.
CONFIG_FIELD = "sparsify"

#: A dense tensor's shape and dtype, by state_dict key.
Record = dict[str, tuple[tuple[int, ...], torch.dtype]]


class SavePretrainedWarning(UserWarning):
    """``save_pretrained`` wrote a converted model: ``from_pretrained`` refuses the folder.

    Example:
        >>> issubclass(SavePretrainedWarning, UserWarning)
        True
    """


def _is_hf_model(module: Any) -> bool:
    transformers = sys.modules.get("transformers")  # never imported here: only its models need this
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def dense_record(model: nn.Module) -> Record | None:
    """The shape and dtype of every tensor of ``model``'s state_dict, taken before conversion;
    None unless ``model`` is a Hugging Face ``PreTrainedModel``.

    A model converted before keeps the dense tensors its first conversion removed.

    Example:
        >>> import torch
        >>> dense_record(torch.nn.Linear(4, 2)) is None  # not a Hugging Face model
        True
    """
    if not _is_hf_model(model):
        return None
    record = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    g = model.__dict__.get("save_pretrained")
    if isinstance(g, _GuardedSavePretrained):
        record.update(g.placeholders)
    return record


def placeholders(model: nn.Module) -> list[str]:
    """The state_dict keys ``save_pretrained`` writes as placeholders for ``model`` (sorted; empty
    for a model without the guard: not converted, not a Hugging Face model, or densified).

    Example:
        >>> import torch
        >>> placeholders(torch.nn.Linear(4, 2))
        []
    """
    g = model.__dict__.get("save_pretrained")
    return sorted(g.placeholders) if isinstance(g, _GuardedSavePretrained) else []


def guard(model: nn.Module, dense: Record | None) -> None:
    """Attach the guard to the converted ``model``, given the :func:`dense_record` taken before
    conversion: its ``save_pretrained`` writes placeholders, the marker and one warning; its
    ``load_state_dict`` drops the placeholders.  A no-op when ``dense`` is None or the
    conversion removed no dense tensor.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(4, 2)
        >>> guard(m, dense_record(m)); "save_pretrained" in m.__dict__
        False
    """
    unguard(model)
    if dense is None or not _is_hf_model(model):
        return
    have = model.state_dict().keys()
    missing = {k: v for k, v in dense.items() if k not in have}
    if not missing:
        return
    model.__dict__["save_pretrained"] = _GuardedSavePretrained(model, missing)
    model.register_load_state_dict_pre_hook(_drop_placeholders)


def unguard(model: nn.Module) -> None:
    """Remove the guard (the dense copy ``densify`` makes must not carry it).

    Example:
        >>> import torch
        >>> unguard(torch.nn.Linear(4, 2))  # nothing to remove: a no-op
    """
    if isinstance(model.__dict__.get("save_pretrained"), _GuardedSavePretrained):
        del model.__dict__["save_pretrained"]
    hooks = getattr(model, "_load_state_dict_pre_hooks", None)
    for key, hook in list((hooks or {}).items()):
        if getattr(hook, "hook", hook) is _drop_placeholders:
            del hooks[key]


def _placeholder_shape(dense_shape: tuple[int, ...]) -> tuple[int, ...]:
    # 0-dim, which no rewritten weight is; for a 0-dim dense tensor (a folded BatchNorm's
    # num_batches_tracked) 2-dim, since torch's load_state_dict reads a 1-dim tensor into a 0-dim one
    return () if dense_shape != () else (1, 1)


def _is_placeholder(t: Any, dense_shape: tuple[int, ...]) -> bool:
    return isinstance(t, torch.Tensor) and tuple(t.shape) == _placeholder_shape(dense_shape)


def _drop_placeholders(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook of a converted model: the placeholders its ``save_pretrained``
    wrote are not its tensors (a Trainer resuming from its checkpoint must not see them as
    unexpected keys).  A real dense tensor under the same name is left, to be reported."""
    g = module.__dict__.get("save_pretrained")
    if not isinstance(g, _GuardedSavePretrained):
        return
    for key, (shape, _) in g.placeholders.items():
        if _is_placeholder(state_dict.get(prefix + key), shape):
            del state_dict[prefix + key]


_NOTE = ("These weights are a model converted by sparsify (block-sparse / factorized layers). "
         "transformers' from_pretrained cannot rebuild it: the dense weights of the converted layers "
         "are written as 0-dim placeholders (listed here), so it stops with a size mismatch. Save the "
         "converted model with sparsify.save(model, path) and load it with sparsify.load(path); "
         "sparsify.densify(model).save_pretrained(dir) writes a dense copy that from_pretrained loads. "
         "The converted model itself reloads these weights with load_state_dict (as Trainer does to "
         "resume from a checkpoint).")

_MISSING = object()


class _GuardedSavePretrained:
    """A converted model's ``save_pretrained`` (in the instance ``__dict__``, so it shadows the
    class's): the class's own, with the placeholders added to the state_dict and the marker
    set on the config while it runs, and one :class:`SavePretrainedWarning`.

    Holds the model by weak reference; pickling (hence ``copy.deepcopy`` and ``torch.save``)
    stores the model itself, which the copy resolves to the copied model, as torch's
    ``_WrappedHook`` does."""

    def __init__(self, model: nn.Module, placeholders: Record) -> None:
        self._model = weakref.ref(model)
        self.placeholders = dict(placeholders)
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self._model(), "placeholders": self.placeholders}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"], state["placeholders"])

    def _owner(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ReferenceError("save_pretrained of a converted model that no longer exists.")
        return model

    @property
    def __signature__(self) -> inspect.Signature:
        """The class's ``save_pretrained`` signature, bound to the model (what ``inspect`` shows)."""
        return inspect.signature(type(self._owner()).save_pretrained.__get__(self._owner()))

    def __repr__(self) -> str:
        model = self._model()
        owner = type(model).__name__ if model is not None else "a dead model"
        return f"<save_pretrained of {owner}, converted by sparsify: writes {len(self.placeholders)} placeholders>"

    def __call__(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        model = self._owner()
        save = type(model).save_pretrained
        bound = inspect.signature(save).bind(model, save_directory, *args, **kwargs)
        if "state_dict" not in inspect.signature(save).parameters:  # not transformers' own: nothing to add
            return save(*bound.args, **bound.kwargs)
        given = bound.arguments.get("state_dict")
        state = model.state_dict() if given is None else given
        absent = {k: v for k, v in self.placeholders.items() if k not in state}
        if not absent:  # the caller gave the dense tensors themselves
            return save(*bound.args, **bound.kwargs)
        floating = next((t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()),
                        None)
        state = dict(state)  # transformers deletes from the dict it is given; never from the caller's
        for key, (shape, dtype) in absent.items():
            state[key] = torch.zeros(_placeholder_shape(shape),
                                     dtype=floating if dtype.is_floating_point and floating else dtype)
        bound.arguments["state_dict"] = state
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"sparsify: {type(model).__name__}.save_pretrained({str(save_directory)!r}) saved a converted "
                f"model. transformers' from_pretrained cannot load it and will refuse the folder: the dense "
                f"weights of the {len(absent)} converted tensors are written as 0-dim placeholders "
                f"(config.json's {CONFIG_FIELD!r} field lists them). To share or reload the converted model use "
                "sparsify.save(model, path) and sparsify.load(path); for a dense checkpoint that from_pretrained "
                "loads, sparsify.densify(model).save_pretrained(dir). This model's load_state_dict (Trainer's "
                "resume_from_checkpoint) reads the folder's weights back.", SavePretrainedWarning, stacklevel=2)
        config = getattr(model, "config", None)
        if config is None:
            return save(*bound.args, **bound.kwargs)
        from . import __version__

        old = getattr(config, CONFIG_FIELD, _MISSING)
        setattr(config, CONFIG_FIELD, {"converted": True, "sparsify_version": __version__, "note": _NOTE,
                                       "placeholders": sorted(absent)})
        try:
            return save(*bound.args, **bound.kwargs)
        finally:  # the marker is the folder's, not the model's: sparsify.save records config.to_dict()
            if old is _MISSING:
                delattr(config, CONFIG_FIELD)
            else:
                setattr(config, CONFIG_FIELD, old)
