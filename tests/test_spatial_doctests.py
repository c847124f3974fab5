"""Every docstring example of the spatial packages runs and prints what it says.

(tests/test_doctests.py covers the packages it lists; these are sparsify.spatial,
sparsify.spatial.modules, sparsify.runtime.spatial and the sparsify_voxels pass.)
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

_PACKAGES = ("sparsify.spatial", "sparsify.spatial.modules", "sparsify.runtime.spatial")


def _modules() -> list[str]:
    names = ["sparsify.passes.sparsify_voxels"]
    for pkg in _PACKAGES:
        names.append(pkg)
        names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__)]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_spatial_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"


def test_every_public_spatial_function_has_an_example():
    import inspect

    import sparsify.spatial as ME

    missing = []
    for name in ("SparseTensor", "from_dense", "cat", "to_sparse", "dense_coordinates"):
        obj = getattr(ME, name)
        mod = inspect.getmodule(obj)
        if ">>>" not in (obj.__doc__ or "") and ">>>" not in (mod.__doc__ or ""):
            missing.append(name)
    assert not missing, f"no runnable example for {missing}"
