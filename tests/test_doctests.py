"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sparsify

_PACKAGES = ("sparsify", "sparsify.passes", "sparsify.runtime", "sparsify.modules", "sparsify.runtime.executors")
# Modules that need optional pieces to import (CUDA bindings) are covered by their own tests.
_OPTIONAL = ("sparsify.runtime.cuda",)


def _modules() -> list[str]:
    names = []
    for pkg in _PACKAGES:
        names.append(pkg)
        for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__):
            name = f"{pkg}.{m.name}"
            if m.name != "__main__" and not name.startswith(_OPTIONAL):
                names.append(name)
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"


def test_the_package_has_examples():
    assert sparsify.sparsify.__doc__ and ">>>" in sparsify.sparsify.__doc__
