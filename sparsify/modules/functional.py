"""Weights used functionally (``F.linear(x, self.w, self.b)``), rewritten in the user's module.

A parameter that the model's own code passes to ``F.linear`` / ``x @ W.T`` /
``torch.addmm`` has no module to swap.  sparsify registers the rewritten layer
beside it (``<w>_rewritten``), removes the dense parameter, and makes the
attribute ``w`` read the layer's :class:`~sparsify.modules.weight_view.DenseWeightView`,
so the unchanged model code computes the linear-like call with the layer's own
product (and anything else with the exact dense weight).

The attribute is served by ``__getattr__`` on a subclass of the owner's class,
made once per class: same ``__name__``, ``__qualname__`` and ``__module__``, so
``isinstance`` holds and the class reads the same; copies and pickles rebuild
it from the original class (``__reduce_ex__``).  This is the mechanism torch's
own ``nn.utils.parametrize`` uses for computed attributes.
"""

from __future__ import annotations

import functools

from torch import nn

__all__ = ["replace_parameter", "functional_weights"]

_TABLE = "_sparsify_functional_weights"


def functional_weights(module: nn.Module) -> dict[str, str]:
    """``attribute -> name of the layer module that serves it`` for ``module`` (empty if none).

    Example:
        >>> functional_weights(nn.Linear(2, 2))
        {}
    """
    return dict(module.__dict__.get(_TABLE, {}))


def _rebuild(base: type) -> nn.Module:
    cls = _with_views(base)
    return cls.__new__(cls)


@functools.cache
def _with_views(base: type) -> type:
    def __getattr__(self, name):
        table = self.__dict__.get(_TABLE)
        if table is not None and name in table:
            return self._modules[table[name]].weight
        return base.__getattr__(self, name)

    def __reduce_ex__(self, protocol):
        return _rebuild, (base,), self.__getstate__()

    def __dir__(self):
        return sorted(set(base.__dir__(self)) | set(self.__dict__.get(_TABLE, {})))

    ns = {"__getattr__": __getattr__, "__reduce_ex__": __reduce_ex__, "__dir__": __dir__,
          "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
          "_sparsify_views_base": base}
    return type(base.__name__, (base,), ns)


def replace_parameter(owner: nn.Module, attr: str, layer_attr: str) -> None:
    """Make ``owner.<attr>`` read the dense view of the submodule ``owner.<layer_attr>``,
    removing the parameter ``attr``."""
    if attr in owner._parameters:
        del owner._parameters[attr]
    table = dict(owner.__dict__.get(_TABLE, {}))
    table[attr] = layer_attr
    owner.__dict__[_TABLE] = table
    if "_sparsify_views_base" not in type(owner).__dict__:
        owner.__class__ = _with_views(type(owner))


def restore_parameter(owner: nn.Module, attr: str, weight) -> None:
    """Undo :func:`replace_parameter` for ``attr`` with a dense ``weight`` (``densify``)."""
    table = dict(owner.__dict__.get(_TABLE, {}))
    layer_attr = table.pop(attr, None)
    owner.__dict__[_TABLE] = table
    if layer_attr is not None and layer_attr in owner._modules:
        del owner._modules[layer_attr]
    owner.register_parameter(attr, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
    if not table:
        del owner.__dict__[_TABLE]
        base = type(owner).__dict__.get("_sparsify_views_base")
        if base is not None:
            owner.__class__ = base
