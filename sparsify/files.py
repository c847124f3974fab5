"""Files in and out, done carefully: what sparsify reads from an artifact and how it writes outputs.

Reading (artifacts may come from anyone):

* :func:`read_regular` opens only a regular file directly inside the folder
  (``O_NOFOLLOW | O_NONBLOCK``, relative to the folder's descriptor), then
  ``fstat``\\ s the descriptor and checks it is the same regular file; symlinks,
  devices, FIFOs and sockets are refused, and so is a file larger than the limit
  given, before a byte is read.
* :func:`parse_json` checks the nesting depth with a linear scan before
  ``json.loads`` runs, refuses duplicate keys and the non-JSON constants
  ``NaN`` / ``Infinity``.

Writing (nothing a user wrote is ever replaced or deleted):

* Outputs are staged beside their destination and committed with a rename that
  never replaces anything (``renameat2(RENAME_NOREPLACE)`` where the kernel has
  it; else an exclusive ``mkdir`` / ``link`` followed by a rename that can only
  replace what this process just created).  A destination that appears while we
  work is never touched: the commit fails with a clear error instead.
* ``force`` replaces only what ``is_ours`` recognises (a previous sparsify
  output), and deletes only the files that output is known to consist of.
* Created files and folders get the mode the umask gives (``0o666`` / ``0o777``
  masked), as ``open()`` and ``mkdir`` would.
* :func:`commit_all` commits several outputs as one transaction: if one fails,
  or a signal is recorded while they are being committed, the ones already in
  place are taken back and any replaced output is restored.

The CLI installs signal handlers that consult :func:`signals_held`: while held,
SIGINT / SIGTERM are recorded instead of raising, so no cleanup or commit is cut
in half.  The design decisions are in docs/saved_models.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = [
    "read_regular", "parse_json", "sibling", "rename_noreplace", "PendingDir", "PendingFile", "commit_all",
    "held_signals", "signals_held", "record_signal", "pending_signals", "MAX_JSON_DEPTH", "check_writable",
]

#: JSON documents nested deeper than this are refused before parsing.
MAX_JSON_DEPTH = 64
_CHUNK = 1 << 20


# ------------------------------------------------------------------ signals
class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT / SIGTERM) ended the work; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: Staged outputs not yet committed or discarded (so an interrupt anywhere can still remove them).
_LIVE: list[Any] = []


def discard_live() -> None:
    """Remove every staged output of this process that was neither committed nor discarded."""
    with held_signals():
        for p in list(_LIVE):
            p.discard()


class _Signals:
    depth = 0
    pending: list[int] = []


def signals_held() -> bool:
    """True while a commit or cleanup runs: a signal handler should record, not raise."""
    return _Signals.depth > 0


def record_signal(signum: int) -> None:
    _Signals.pending.append(signum)


def pending_signals() -> list[int]:
    return list(_Signals.pending)


def clear_signals() -> None:
    _Signals.pending.clear()


@contextlib.contextmanager
def held_signals(deliver: bool = False) -> Iterator[None]:
    """Signals that arrive inside are recorded (see :func:`record_signal`), not raised.

    With ``deliver``, a signal recorded inside is raised (:class:`Interrupted`) on leaving,
    unless another exception is already on its way or an outer hold is still active.
    """
    _Signals.depth += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        _Signals.depth -= 1
    if deliver and ok and _Signals.depth == 0 and _Signals.pending:
        raise Interrupted(_Signals.pending[0])


# ------------------------------------------------------------------ reading
def _describe_kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(folder: str | os.PathLike, name: str, *, max_bytes: int, what: str, head: bool = False) -> bytes:
    """The bytes of the regular file ``folder/name`` (no symlinks, devices or FIFOs; at most ``max_bytes``).
    With ``head=True``, its first ``max_bytes`` bytes (fewer if it is shorter) however large it is, instead
    of refusing a larger file.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "a.json"), "w").write("{}")
        >>> read_regular(d, "a.json", max_bytes=10, what="test")
        b'{}'
    """
    if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
        raise InputError(f"{folder}: {what} {name!r} is not a plain file name inside the artifact.")
    where = os.path.join(os.fspath(folder), name)
    use_dirfd = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
    dfd = None
    try:
        if use_dirfd:
            try:
                dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise InputError(f"{folder}: cannot open the artifact folder ({exc.strerror}).") from None
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False) if dfd is not None else os.lstat(where)
        except FileNotFoundError:
            raise InputError(f"{where}: missing; the artifact is incomplete. Re-create it.") from None
        except OSError as exc:
            raise InputError(f"{where}: cannot read it ({exc.strerror}).") from None
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where} is {_describe_kind(st.st_mode)}, not a regular file; sparsify reads "
                             "only regular files inside an artifact. Replace it with the real file.")
        if st.st_size > max_bytes and not head:
            raise InputError(f"{where}: {st.st_size} bytes, more than the {max_bytes} a {what} may have; "
                             "refusing to read it.")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(name, flags, dir_fd=dfd) if dfd is not None else os.open(where, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InputError(f"{where} is a symbolic link; sparsify reads only regular files inside an "
                                 "artifact.") from None
            raise InputError(f"{where}: cannot open it ({exc.strerror}).") from None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
                raise InputError(f"{where} changed while it was being opened; refusing it.")
            if fst.st_size > max_bytes and not head:
                raise InputError(f"{where}: {fst.st_size} bytes, more than the {max_bytes} a {what} may have.")
            chunks, total = [], 0
            while not (head and total >= max_bytes):
                b = os.read(fd, min(_CHUNK, max_bytes + (0 if head else 1) - total))
                if not b:
                    break
                chunks.append(b)
                total += len(b)
                if total > max_bytes:
                    raise InputError(f"{where}: grew past {max_bytes} bytes while being read; refusing it.")
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        if dfd is not None:
            os.close(dfd)


def _json_depth(data: bytes) -> int:
    r"""The deepest nesting of ``[`` / ``{`` outside strings in the JSON text ``data`` (UTF-8), in linear time
    and memory (vectorized: a 100 MB safetensors header takes a fraction of a second).

    A quote ends or starts a string unless an odd run of backslashes precedes it; a bracket is structure when
    an even number of such quotes precedes it.  (Once a string is left open, as in a truncated or hostile
    file, the count is whatever it is: ``json.loads`` refuses such a text anyway.)

    Example:
        >>> _json_depth(b'{"a": [1, "]]\\\\", "[\\"[", {"b": []}]}')
        4
    """
    import numpy as np

    a = np.frombuffer(data, dtype=np.uint8)
    if a.size == 0:
        return 0
    step = np.zeros(256, dtype=np.int8)
    step[[ord("["), ord("{")]], step[[ord("]"), ord("}")]] = 1, -1
    steps = step[a]
    brackets = np.flatnonzero(steps)
    if brackets.size == 0:
        return 0
    quotes = np.flatnonzero(a == ord('"'))
    slashes = np.flatnonzero(a == ord("\\"))
    if slashes.size and quotes.size:
        # runs of consecutive backslashes: where each ends and how long it is
        breaks = np.flatnonzero(np.diff(slashes) != 1)
        ends = np.append(slashes[breaks], slashes[-1])
        starts = np.insert(slashes[breaks + 1], 0, slashes[0])
        odd_ends = ends[(ends - starts + 1) % 2 == 1]
        quotes = quotes[~np.isin(quotes - 1, odd_ends)]
    outside = np.searchsorted(quotes, brackets) % 2 == 0
    return int(max(0, steps[brackets[outside]].cumsum(dtype=np.int64).max(initial=0)))


def parse_json(data: bytes | str, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with the nesting depth checked first, no duplicate keys and no NaN / Infinity.

    Example:
        >>> parse_json(b'{"a": [1, 2]}', "x.json")
        {'a': [1, 2]}
        >>> parse_json(b"[" * 100 + b"]" * 100, "x.json")
        Traceback (most recent call last):
        ...
        sparsify.errors.InputError: x.json: nested 100 levels deep, more than the limit of 64; refusing to parse it.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: corrupted, not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    depth = _json_depth(bytes(data) if isinstance(data, (bytes, bytearray)) else text.encode("utf-8"))
    if depth > max_depth:
        raise InputError(f"{where}: nested {depth} levels deep, more than the limit of {max_depth}; refusing to "
                         "parse it.")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in items:
            if k in d:
                raise ValueError(f"duplicate key {k[:60]!r}")
            d[k] = v
        return d

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{where}: corrupted, not valid JSON ({str(exc)[:200]}).") from None


# ------------------------------------------------------------------ writing
def sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name beside ``path`` (``.NAME.kind-PID-RANDOM``), not yet created."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Any = None


def _libc_renameat2() -> Any:
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
    return _renameat2


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; raise ``FileExistsError`` if anything is at ``dst``, never replace it.

    Uses ``renameat2(RENAME_NOREPLACE)`` where available.  Elsewhere: for a file,
    ``link`` (which fails on an existing name) then ``unlink``; for a folder, an
    exclusive ``mkdir`` of ``dst`` and a rename onto that empty folder of ours.
    """
    fn = _libc_renameat2()
    if fn:
        r = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if r == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EEXIST or e == errno.ENOTEMPTY:
            raise FileExistsError(e, os.strerror(e), str(dst))
        if e not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
            raise OSError(e, os.strerror(e), str(dst))
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # exclusive: FileExistsError if anything is there
        try:
            os.rename(src, dst)  # onto our own empty folder; ENOTEMPTY if someone filled it meanwhile
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(dst)  # only if still empty: never anything of someone else's
            raise
    else:
        os.link(src, dst)
        os.unlink(src)


def umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: Path, mode: int = 0o666) -> None:
    """Give a file some other library created (with its own mode) the mode ``open()`` would have."""
    os.chmod(path, mode & ~umask())


def make_dir(path: Path) -> None:
    """Create ``path`` exclusively with the umask's mode."""
    os.mkdir(path, 0o777)


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` exclusively (mode from the umask) and write ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def not_a_file(p: str | os.PathLike) -> str:
    """Why ``p`` cannot be read as a file, for a message: ``"no such file"``, ``"is a folder, not a file"``,
    or ``"is not a regular file (a FIFO)"`` (the kind as :func:`_describe_kind` names it).

    Example:
        >>> not_a_file("/no/such/path"), not_a_file("/")
        ('no such file', 'is a folder, not a file')
    """
    try:
        mode = os.stat(p).st_mode
    except OSError:
        return "no such file"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return f"is not a regular file ({_describe_kind(mode)})"


def is_regular_file(p: Path) -> bool:
    """Whether ``p`` is a regular file itself (not a folder, a link, a FIFO or a device)."""
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


class PendingDir:
    """A folder staged beside ``out``, committed by :func:`commit_all` (or dropped).

    ``replace`` (with force) names the files of a previous sparsify output at
    ``out`` that may be deleted; anything else found there makes the commit fail.
    """

    def __init__(self, out: Path, *, force: bool = False, is_ours: Callable[[Path], list[str] | None] | None = None,
                 what: str = "output") -> None:
        self.out = Path(out)
        self.force = force
        self.is_ours = is_ours
        self.what = what
        self.tmp = sibling(self.out, "tmp")
        self._aside: Path | None = None
        self._aside_files: list[str] = []
        self._committed = False
        with held_signals(deliver=True):  # created and registered together: no interrupt in between
            make_dir(self.tmp)
            _LIVE.append(self)

    def discard(self) -> None:
        with held_signals():
            if not self._committed and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
            if self in _LIVE:
                _LIVE.remove(self)

    def commit(self) -> None:
        fsync_dir(self.tmp)
        if self.force and (self.out.exists() or self.out.is_symlink()):
            files = self.is_ours(self.out) if self.is_ours is not None else None
            if files is None:
                raise InputError(f"{self.what} {self.out} exists and is not a previous sparsify output; "
                                 "refusing to replace it even with --force.")
            aside = sibling(self.out, "old")
            rename_noreplace(self.out, aside)
            self._aside, self._aside_files = aside, files
            # Someone may have added a file between the check and the rename: check the folder we now hold.
            extra = sorted(set(os.listdir(aside)) - set(files)) if aside.is_dir() else []
            if extra:
                self._restore()
                raise InputError(f"{self.what} {self.out} holds {extra[0]!r}, which sparsify did not write; "
                                 "refusing to replace it even with --force. Move it away first.")
        try:
            rename_noreplace(self.tmp, self.out)
        except FileExistsError:
            self._restore()
            raise InputError(f"{self.what} {self.out} appeared while sparsify was working; it was left as it is "
                             "and nothing was written. Choose another path (or --force for a sparsify output).") from None
        except BaseException:
            self._restore()
            raise
        self._committed = True
        fsync_dir(self.out.parent)

    def _restore(self) -> None:
        if self._aside is not None:
            with contextlib.suppress(OSError):
                rename_noreplace(self._aside, self.out)
            self._aside = None

    def rollback(self) -> None:
        """Take a committed output back (to its staging name, then removed) and restore what it replaced."""
        if self._committed:
            with contextlib.suppress(OSError):
                os.rename(self.out, self.tmp)  # ours: we created it an instant ago
            self._committed = False
        self._restore()
        self.discard()

    def finish(self) -> list[str]:
        """Delete the replaced output's known files; returns names left behind (not ours)."""
        if self in _LIVE:
            _LIVE.remove(self)
        left: list[str] = []
        if self._aside is not None:
            aside = self._aside
            if aside.is_dir():
                for name in self._aside_files:
                    p = aside / name
                    # only files: is_ours lists regular files, so a folder here was put there since;
                    # it is left behind (and reported), never removed
                    if is_regular_file(p) or p.is_symlink():
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                left = os.listdir(aside)
                if not left:
                    os.rmdir(aside)
            else:
                aside.unlink()
            self._aside = None
        return left


class PendingFile:
    """A file staged beside ``out`` (exclusive, umask mode), committed by :func:`commit_all`."""

    def __init__(self, out: Path, data: bytes, *, force: bool = False,
                 is_ours: Callable[[Path], bool] | None = None, what: str = "output") -> None:
        self.out = Path(out)
        self.force, self.is_ours, self.what = force, is_ours, what
        self.tmp = sibling(self.out, "tmp")
        self._aside: Path | None = None
        self._committed = False
        with held_signals(deliver=True):
            _LIVE.append(self)
        try:
            write_new(self.tmp, data)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with held_signals():
            if not self._committed:
                with contextlib.suppress(OSError):
                    self.tmp.unlink()
            if self in _LIVE:
                _LIVE.remove(self)

    def commit(self) -> None:
        if self.force and (self.out.exists() or self.out.is_symlink()):
            if self.out.is_symlink() or not self.out.is_file() or self.is_ours is None or not self.is_ours(self.out):
                raise InputError(f"{self.what} {self.out} exists and was not written by sparsify; refusing to "
                                 "replace it even with --force.")
            aside = sibling(self.out, "old")
            rename_noreplace(self.out, aside)
            self._aside = aside
        try:
            rename_noreplace(self.tmp, self.out)
        except FileExistsError:
            self._restore()
            raise InputError(f"{self.what} {self.out} appeared while sparsify was working; it was left as it is "
                             "and nothing was written.") from None
        except BaseException:
            self._restore()
            raise
        self._committed = True

    def _restore(self) -> None:
        if self._aside is not None:
            with contextlib.suppress(OSError):
                rename_noreplace(self._aside, self.out)
            self._aside = None

    def rollback(self) -> None:
        if self._committed:
            with contextlib.suppress(OSError):
                os.rename(self.out, self.tmp)
            self._committed = False
        self._restore()
        self.discard()

    def finish(self) -> list[str]:
        if self in _LIVE:
            _LIVE.remove(self)
        if self._aside is not None:
            with contextlib.suppress(FileNotFoundError):
                self._aside.unlink()
            self._aside = None
        return []


def commit_all(pending: Iterable[PendingDir | PendingFile]) -> list[str]:
    """Commit every staged output, or none: on an error or a signal recorded meanwhile, roll back.

    Returns the names found in replaced outputs that sparsify did not write (left in place).
    Raises ``KeyboardInterrupt`` (after rolling back) if a signal was recorded
    during the commit; signals recorded after the point of no return stay in
    :func:`pending_signals` for the caller to report.
    """
    items = list(pending)
    done: list[PendingDir | PendingFile] = []
    with held_signals():
        try:
            for p in items:
                p.commit()
                done.append(p)
            if _Signals.pending:
                raise Interrupted(_Signals.pending[0])
        except BaseException:
            for p in reversed(done):
                p.rollback()
            for p in items:
                p.discard()
            raise
        left: list[str] = []
        for p in items:
            left += p.finish()
    return left


def discard_all(pending: Iterable[PendingDir | PendingFile | None]) -> None:
    for p in pending:
        if p is not None:
            p.discard()


def check_writable(path: Path, what: str, *, need_bytes: int = 0) -> None:
    """Refuse a destination whose folder is missing, not writable, or short of ``need_bytes`` of free space."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{what} {path}: the folder {parent} does not exist.")
    probe = sibling(path, "probe")
    try:
        write_new(probe, b"")
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write in {parent} ({exc.strerror}). Choose a writable "
                         "location.") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if need_bytes:
        try:
            free = shutil.disk_usage(parent).free
        except OSError:
            return
        if free < need_bytes:
            raise InputError(f"{what} {path}: {free / 2**20:.1f} MiB free in {parent}, and the output needs about "
                             f"{need_bytes / 2**20:.1f} MiB. Free some space or choose another location.")
