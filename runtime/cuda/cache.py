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

An entry is code (a cubin, PTX, or the emulator's shared library), and a
checksum kept beside it proves nothing about who wrote it.  So the cache is
private: its folders are created mode 0700 (a folder of ours that others may
write, as an older version made under umask 002, is tightened to 0700), and a
folder or entry is used only if it is a real folder / regular file (no link,
FIFO or device) owned by this user and writable by nobody else, under a root
whose parent others cannot write (or that has the sticky bit, as ``/tmp``).  A cache that fails this is
not used at all (one warning says why and what to do; kernels are then
compiled in each process).  ``XDG_CACHE_HOME`` counts only if absolute (the
XDG rule).

Example:
    >>> import tempfile
    >>> cache = DiskCache(tempfile.mkdtemp())
    >>> cache.put("k", b"cubin"); cache.get("k")
    b'cubin'
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import warnings
from pathlib import Path

__all__ = ["DiskCache", "atomic_write", "cache_disabled", "cache_root", "private_dir", "read_private",
           "CacheUnsafe"]

MAGIC = b"SPARSIFY-KERNEL-1\n"
#: The largest cache entry read (a cubin of every kernel is a few MiB).
MAX_ENTRY_BYTES = 512 << 20
_WARNED: set[str] = set()


class CacheUnsafe(OSError):
    """The cache (or an entry) is not private to this user: it is not used."""


def cache_root() -> Path:
    """The cache root directory (not created).  Raises :class:`CacheUnsafe` for a
    ``SPARSIFY_CACHE_DIR`` that cannot be expanded (``~nosuchuser/x``)."""
    env = os.environ.get("SPARSIFY_CACHE_DIR")
    try:
        if env:
            return Path(env).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    except RuntimeError as exc:  # expanduser / home of an unknown user
        raise CacheUnsafe(f"SPARSIFY_CACHE_DIR={env!r}: {str(exc).rstrip('.')}") from None
    return base / "sparsify"


def cache_disabled() -> bool:
    from ..environment import switch

    return switch("SPARSIFY_DISABLE_CACHE", False)


def _not_private(st: os.stat_result, what: str, path: Path) -> str | None:
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is not None and st.st_uid != uid:
        return f"{what} {path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_dir(path: Path, root: Path, *, create: bool = True) -> None:
    """Make (mode 0700) and check the folders from ``root`` down to ``path``: each a real folder, ours,
    writable by nobody else, and ``root``'s parent not writable by others unless sticky.  Raises
    :class:`CacheUnsafe` saying why not; FileNotFoundError when ``create=False`` and one is missing."""
    path, root = Path(path), Path(root)
    rel = path.relative_to(root)
    try:
        pst = os.stat(root.parent)
    except FileNotFoundError:
        if not create:
            raise
        root.parent.mkdir(parents=True, exist_ok=True)
        pst = os.stat(root.parent)
    if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
        raise CacheUnsafe(f"the cache's parent folder {root.parent} is writable by everyone (without the sticky bit)")
    d = root
    for part in ("", *rel.parts):
        d = d / part if part else d
        if create:
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise CacheUnsafe(f"cache folder {d} is not a folder (a link or a file)")
        uid = os.geteuid() if hasattr(os, "geteuid") else None
        if st.st_mode & 0o022 and (uid is None or st.st_uid == uid):
            # Ours, made group-writable by an older version under umask 002: tighten it.  Entries stay
            # checked one by one (another user's file, or one others can write, is still refused).
            os.chmod(d, 0o700)
            st = os.lstat(d)
        why = _not_private(st, "cache folder", d)
        if why:
            raise CacheUnsafe(why)


def read_private(path: Path, max_bytes: int = MAX_ENTRY_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file (no link followed), ours, writable by nobody else and
    at most ``max_bytes``; FileNotFoundError if missing, :class:`CacheUnsafe` saying why not otherwise.
    Opened non-blocking, so a FIFO never hangs the read."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CacheUnsafe(f"cache entry {path} cannot be opened as a file ({exc.strerror}; a link?)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CacheUnsafe(f"cache entry {path} is not a regular file")
        why = _not_private(st, "cache entry", path)
        if why:
            raise CacheUnsafe(why)
        if st.st_size > max_bytes:
            raise CacheUnsafe(f"cache entry {path} is {st.st_size} bytes, more than {max_bytes}")
        chunks, left = [], st.st_size + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > st.st_size:
            raise CacheUnsafe(f"cache entry {path} grew while it was read")
        return data
    finally:
        os.close(fd)


def warn_unsafe(exc: Exception, root: Path | str) -> None:
    """One warning per cache root that is not used, saying why and what to do."""
    key = f"{root}:{exc}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"sparsify: not using the kernel cache ({exc}): an entry there is code, so only a cache "
                  "private to this user is trusted. Kernels are compiled in each process; fix the ownership / "
                  "mode (chmod 700), or set SPARSIFY_CACHE_DIR to a private folder.", RuntimeWarning, stacklevel=3)


def atomic_write(path: Path, data: bytes, root: Path | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``
    (the folders from ``root`` down made private first: :func:`private_dir`)."""
    if root is not None:
        private_dir(path.parent, root)
    else:
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
    def _top(self) -> Path:
        """The folder privacy is checked from: the user's root, or the cache root for the default."""
        return self._root if self._root is not None else cache_root()

    @property
    def enabled(self) -> bool:
        return not cache_disabled()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.bin"

    def get(self, key: str) -> bytes | None:
        """The payload stored under ``key``, or None (missing, unreadable, corrupt, or disabled)."""
        if not self.enabled:
            return None
        try:
            root = self.root
            path = self.path(key)
            private_dir(root, self._top, create=False)
            data = read_private(path)
        except FileNotFoundError:
            return None
        except CacheUnsafe as exc:
            warn_unsafe(exc, self._root or "")
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
            atomic_write(self.path(key), blob, root=self._top)
        except CacheUnsafe as exc:  # (cache_root() raises it too, for a SPARSIFY_CACHE_DIR it cannot expand)
            warn_unsafe(exc, self._root or "")
        except OSError as exc:
            warnings.warn(
                f"sparsify: cannot write the kernel cache under {self.root}: {exc}. Kernels will be "
                "recompiled in each process; set SPARSIFY_CACHE_DIR to a writable directory.",
                RuntimeWarning,
                stacklevel=2,
            )
