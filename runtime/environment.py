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

__all__ = ["check_environment", "switch", "SWITCHES", "TRUE", "FALSE"]

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")
#: The on / off switches.
SWITCHES = ("SPARSIFY_DISABLE_CACHE", "SPARSIFY_AUTOTUNE", "SPARSIFY_EMULATE_CUDA")


def switch(name: str, default: bool) -> bool:
    """The on / off switch ``name`` (read on every call): ``default`` when unset, empty or not a word of
    ``TRUE`` / ``FALSE`` (:func:`check_environment` refuses those before any work).

    Example:
        >>> switch("SPARSIFY_NO_SUCH_SWITCH", True)
        True
    """
    v = os.environ.get(name, "").strip().lower()
    return True if v in TRUE else False if v and v in FALSE else default


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
    from .executors.cpu import PATHS

    path = os.environ.get("SPARSIFY_CPU_PATH")
    if path and path not in PATHS:
        raise ValueError(f"SPARSIFY_CPU_PATH={path!r}: expected one of {', '.join(PATHS)} (or unset, to let "
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
