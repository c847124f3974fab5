"""The on-disk kernel cache: one checksummed file per compiled program.

Where:  ``$SPARSIFY_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/sparsify``, else
``~/.cache/sparsify``; kernels live in ``<root>/kernels/``, autotuning choices
in ``<root>/autotune/``.  ``SPARSIFY_DISABLE_CACHE=1`` turns the disk cache off
(nothing is read or written; the in-process memo in ``compiler`` still works).
Both variables are read on every call, not at import.

An entry is ``MAGIC`` + sha256 of the payload (hex) + newline + payload.  A
truncated or altered file fails the checksum and reads as a miss, with one
warning; the recompiled program then replaces it.  Writes go to a temporary
file in the same directory and land with ``os.replace``, so two processes
compiling the same kernel at once both succeed and readers never see half a
file.

Example:
    >>> import tempfile
    >>> cache = DiskCache(tempfile.mkdtemp())
    >>> cache.put("k", b"cubin"); cache.get("k")
    b'cubin'
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

__all__ = ["DiskCache", "atomic_write", "cache_disabled", "cache_root"]

MAGIC = b"SPARSIFY-KERNEL-1\n"


def cache_root() -> Path:
    """The cache root directory (not created)."""
    env = os.environ.get("SPARSIFY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sparsify"


def cache_disabled() -> bool:
    return os.environ.get("SPARSIFY_DISABLE_CACHE", "").strip().lower() in ("1", "true", "yes", "on")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class DiskCache:
    """Checksummed blobs by key under ``root`` (default: ``cache_root() / "kernels"``)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self._root = Path(root) if root is not None else None

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else cache_root() / "kernels"

    @property
    def enabled(self) -> bool:
        return not cache_disabled()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.bin"

    def get(self, key: str) -> bytes | None:
        """The payload stored under ``key``, or None (missing, unreadable, corrupt, or disabled)."""
        if not self.enabled:
            return None
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            warnings.warn(f"sparsify: cannot read kernel cache entry {path}: {exc}; recompiling.", RuntimeWarning, stacklevel=2)
            return None
        head = len(MAGIC) + 64 + 1
        payload = data[head:]
        ok = (
            data.startswith(MAGIC)
            and len(data) >= head
            and data[head - 1 : head] == b"\n"
            and hashlib.sha256(payload).hexdigest().encode() == data[len(MAGIC) : head - 1]
        )
        if not ok:
            warnings.warn(
                f"sparsify: kernel cache entry {path} is corrupt (checksum mismatch); recompiling it. "
                "If this repeats, delete the directory or set SPARSIFY_CACHE_DIR elsewhere.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        return payload

    def put(self, key: str, payload: bytes) -> None:
        """Store ``payload`` under ``key``; a failure to write only warns (the cache is an optimization)."""
        if not self.enabled:
            return
        blob = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
        try:
            atomic_write(self.path(key), blob)
        except OSError as exc:
            warnings.warn(
                f"sparsify: cannot write the kernel cache under {self.root}: {exc}. Kernels will be "
                "recompiled in each process; set SPARSIFY_CACHE_DIR to a writable directory.",
                RuntimeWarning,
                stacklevel=2,
            )
