"""The environment variables sparsify reads, checked in one place before any work.

``check_environment()`` raises ``ValueError`` naming the variable, its value and what it
takes, for a value that would otherwise be ignored silently (a switch set to ``2``), fail
deep inside a conversion (``SPARSIFY_CPU_PATH=bogus``) or crash with an anonymous parse
error (``WORLD_SIZE=two``).  ``sparsify()`` and the ``sparsify`` command call it first.

Example:
    >>> import os
    >>> os.environ["SPARSIFY_AUTOTUNE"] = "maybe"
    >>> check_environment()
    Traceback (most recent call last):
        ...
    ValueError: SPARSIFY_AUTOTUNE='maybe': expected 1 or 0 (or true / false, yes / no, on / off).
    >>> del os.environ["SPARSIFY_AUTOTUNE"]; check_environment()
"""

from __future__ import annotations

import math
import os

__all__ = ["check_environment", "SWITCHES", "TRUE", "FALSE"]

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")
#: The on / off switches.
SWITCHES = ("SPARSIFY_DISABLE_CACHE", "SPARSIFY_AUTOTUNE", "SPARSIFY_EMULATE_CUDA")
_CPU_PATHS = ("dense", "bsr", "gather")


def _int(name: str, lo: int) -> None:
    v = os.environ.get(name)
    if v is None:
        return
    try:
        n = int(v.strip())
    except ValueError:
        n = None
    if n is None or n < lo:
        raise ValueError(f"{name}={v!r}: expected an integer >= {lo} (torchrun sets it).")


def check_environment() -> None:
    """Raise ``ValueError`` for the first sparsify-related environment variable with a value it cannot take."""
    for name in SWITCHES:
        v = os.environ.get(name)
        if v is not None and v.strip().lower() not in TRUE + FALSE:
            raise ValueError(f"{name}={v!r}: expected 1 or 0 (or true / false, yes / no, on / off).")
    path = os.environ.get("SPARSIFY_CPU_PATH")
    if path and path not in _CPU_PATHS:
        raise ValueError(f"SPARSIFY_CPU_PATH={path!r}: expected one of {', '.join(_CPU_PATHS)} (or unset, to let "
                         "the cost model choose).")
    t = os.environ.get("SPARSIFY_DIST_TIMEOUT")
    if t is not None:
        try:
            secs = float(t)
        except ValueError:
            secs = math.nan
        if not (math.isfinite(secs) and secs > 0):
            raise ValueError(f"SPARSIFY_DIST_TIMEOUT={t!r}: expected a number of seconds > 0.")
    _int("WORLD_SIZE", 1)
    _int("RANK", 0)
