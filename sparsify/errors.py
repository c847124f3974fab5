"""``InputError``: something the user gave (a file, a model, an option) is unusable.

Raised before any work is done where possible, with what, where, why and what
to do in one line.  The CLI prints it as ``sparsify: error: ...`` and exits 2.
It subclasses ``ValueError`` so callers that catch the core's input errors
(which are ``ValueError``) catch these too.
"""

from __future__ import annotations

__all__ = ["InputError", "ConversionCheckError"]


class InputError(ValueError):
    """Bad input from the user: a missing file, a bad model spec, a corrupt artifact, ...

    Example:
        >>> raise InputError("cfg.toml: unknown key 'densty'. Known keys: density, method, rules")
        Traceback (most recent call last):
        ...
        sparsify.errors.InputError: cfg.toml: unknown key 'densty'. Known keys: density, method, rules
    """


class ConversionCheckError(RuntimeError):
    """The converted model crashed or did not match its dense reference on the example
    inputs (``sparsify(check=True)``); the message names the layer.

    Example:
        >>> issubclass(ConversionCheckError, RuntimeError)
        True
    """
