"""NVRTC compilation: the one module that knows CUDA versions, arches and headers.

* Compiles C++ straight to a cubin with ``cuda.core`` ``Program`` (no device
  needed), for the device's ``sm_XX`` clamped to ``nvrtcGetSupportedArchs``
  (``sm_90a`` when a kernel asks for Hopper-only instructions).  A device newer
  than every arch NVRTC knows gets PTX for the newest one, which the driver
  compiles at load time.
* Headers: ``cuda_src/`` (package data) and the CUDA headers (cuda_fp16.h,
  cuda_bf16.h and what they include) found with ``cuda.pathfinder`` in the pip
  wheels of the ``cuda`` extra, a conda environment or a CUDA toolkit, or in
  ``$SPARSIFY_CUDA_INCLUDE`` when set (checked to hold cuda_fp16.h).
* The cache key hashes the source and every header it reaches, the options,
  the arch, the NVRTC version and the sparsify version.  Results are memoized
  in-process and stored in the :class:`~.cache.DiskCache`.
* ``ptxas -v`` output is kept: registers, spills, stack and shared memory per
  kernel are known without a GPU (cuFuncGetAttribute would need a driver).
* A compile failure raises :class:`KernelCompileError` with the NVRTC log, the
  options and the numbered source.

Example:
    >>> from sparsify.runtime.cuda import kernels
    >>> prog = compile_program(kernels.program_for("f16", 32), "sm_80")  # doctest: +SKIP
    >>> prog.resources["bsmm_fwd_small_f16_b32_k16w4s3"].spill_stores  # doctest: +SKIP
    0
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from .cache import DiskCache

__all__ = [
    "CUDAUnavailableError",
    "CompiledProgram",
    "KernelCompileError",
    "KernelResources",
    "arch_for",
    "cache_key",
    "compile_program",
    "compile_source",
    "header_closure",
    "include_dirs",
    "nvrtc_version",
    "parse_ptxas_log",
    "supported_archs",
]

#: Options every program is compiled with (the arch and include paths are added per compile).
BASE_OPTIONS = {"std": "c++17", "ptxas_options": ["-v"]}
#: Headers the kernels include from the CUDA toolkit (for `sparsify doctor`).
CUDA_HEADERS = ("cuda_fp16.h", "cuda_bf16.h")
SRC_DIR = Path(__file__).resolve().parent.parent.parent / "cuda_src"


class CUDAUnavailableError(RuntimeError):
    """cuda-python, NVRTC or the CUDA headers are missing: kernels cannot be built here."""


class KernelCompileError(RuntimeError):
    """NVRTC rejected a program.  Carries ``log``, ``options`` and ``source``."""

    def __init__(self, name: str, arch: str, log: str, options: dict, source: str) -> None:
        self.name, self.arch, self.log, self.options, self.source = name, arch, log, options, source
        numbered = "\n".join(f"{i:4d} | {line}" for i, line in enumerate(source.splitlines(), 1))
        super().__init__(
            f"NVRTC failed to compile program {name!r} for {arch}.\n"
            f"--- NVRTC log ---\n{log.strip()}\n"
            f"--- options ---\n{json.dumps(options, indent=1, default=str)}\n"
            f"--- source ({name}) ---\n{numbered}\n"
            "The log names the file and line (headers are in sparsify/cuda_src). Run "
            "`python -m sparsify.runtime.doctor --compile-all` to check every kernel; report the "
            "log with `sparsify doctor` output if this is an unmodified install."
        )


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    smem_bytes: int


@dataclass(frozen=True)
class CompiledProgram:
    """A compiled program: the binary (cubin or PTX), the NVRTC log and per-kernel resources."""

    name: str
    arch: str
    target: str  # "cubin" | "ptx"
    binary: bytes
    log: str
    resources: dict[str, KernelResources]
    key: str

    def to_bytes(self) -> bytes:
        head = {
            "name": self.name, "arch": self.arch, "target": self.target, "log": self.log, "key": self.key,
            "resources": {k: asdict(v) for k, v in self.resources.items()},
        }
        return json.dumps(head, sort_keys=True).encode() + b"\n" + self.binary

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledProgram:
        head_raw, _, binary = data.partition(b"\n")
        head = json.loads(head_raw)
        res = {k: KernelResources(**v) for k, v in head["resources"].items()}
        return cls(head["name"], head["arch"], head["target"], binary, head["log"], res, head["key"])


# ------------------------------------------------------------------ versions
def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise CUDAUnavailableError(
            f"cuda-python is not installed ({exc}). Install the CUDA extra: pip install 'sparsify[cuda]'."
        ) from exc
    return nvrtc


def _check(result, what: str):
    err, *rest = result
    if int(err) != 0:
        raise CUDAUnavailableError(f"{what} failed with {err!r}; is libnvrtc installed (pip install 'sparsify[cuda]')?")
    return rest[0] if len(rest) == 1 else tuple(rest)


@cache
def nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor)."""
    nvrtc = _nvrtc()
    try:
        major, minor = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except RuntimeError as exc:  # the library itself failed to load
        raise CUDAUnavailableError(f"NVRTC cannot be loaded: {exc}") from exc
    return int(major), int(minor)


@cache
def supported_archs() -> tuple[int, ...]:
    """The ``sm_XX`` numbers this NVRTC can compile for, ascending."""
    archs = _check(_nvrtc().nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    return tuple(sorted(int(a) for a in archs))


def arch_for(compute_capability: tuple[int, int], *, arch_specific: bool = False) -> tuple[str, str]:
    """``(arch, target)`` for a device: its own ``sm_XX`` when NVRTC supports it, else the newest
    supported arch of the same major (a cubin runs on later minors), else PTX for the newest arch.
    ``arch_specific`` adds the ``a`` suffix (``sm_90a``) for kernels with Hopper-only instructions.

    Example:
        >>> arch_for((8, 6))  # doctest: +SKIP
        ('sm_86', 'cubin')
    """
    cc = compute_capability[0] * 10 + compute_capability[1]
    archs = supported_archs()
    same_major = [a for a in archs if a // 10 == cc // 10 and a <= cc]
    if same_major:
        arch = max(same_major)
        suffix = "a" if arch_specific and arch == cc and arch >= 90 else ""
        return f"sm_{arch}{suffix}", "cubin"
    older = [a for a in archs if a <= cc]
    if not older:
        raise CUDAUnavailableError(
            f"NVRTC {nvrtc_version()} supports sm_{archs[0]} and newer; this device is sm_{cc}. "
            "Install an NVRTC that still supports it (nvidia-cuda-nvrtc of an older CUDA)."
        )
    return f"compute_{max(older)}", "ptx"


# ------------------------------------------------------------------- headers
@cache
def _cuda_include_dir() -> str:
    override = os.environ.get("SPARSIFY_CUDA_INCLUDE")
    if override:  # a toolkit whose headers pathfinder does not find first (e.g. /usr/local/cuda/include)
        if not (Path(override) / "cuda_fp16.h").is_file():
            raise CUDAUnavailableError(
                f"SPARSIFY_CUDA_INCLUDE={override!r} has no cuda_fp16.h: point it at a CUDA include directory "
                "(the one holding cuda_fp16.h and cuda_bf16.h) or unset it to use cuda.pathfinder's."
            )
        return str(Path(override))
    try:
        from cuda import pathfinder
    except ImportError as exc:
        raise CUDAUnavailableError(
            f"cuda-pathfinder is not installed ({exc}). Install the CUDA extra: pip install 'sparsify[cuda]'."
        ) from exc
    found = pathfinder.find_nvidia_header_directory("cudart")
    if not found or not (Path(found) / "cuda_fp16.h").is_file():
        raise CUDAUnavailableError(
            "cannot find the CUDA headers (cuda_fp16.h, cuda_bf16.h) with cuda.pathfinder. Install them "
            "with pip install 'sparsify[cuda]' (nvidia-cuda-runtime, nvidia-cuda-crt), or set CUDA_HOME "
            "to a CUDA toolkit."
        )
    return str(found)


def include_dirs() -> tuple[str, ...]:
    """Include path for the kernels: ``cuda_src`` first, then the CUDA headers."""
    return (str(SRC_DIR), _cuda_include_dir())


_INCLUDE_RE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]*[<"]([^>"]+)[>"]', re.M)
_FILE_MEMO: dict[tuple[str, int, int], tuple[str, tuple[str, ...]]] = {}


def _scan(path: Path) -> tuple[str, tuple[str, ...]]:
    """sha256 and #include names of one file, memoized by (path, mtime, size)."""
    st = path.stat()
    memo_key = (str(path), st.st_mtime_ns, st.st_size)
    hit = _FILE_MEMO.get(memo_key)
    if hit is None:
        data = path.read_bytes()
        hit = (hashlib.sha256(data).hexdigest(), tuple(m.decode() for m in _INCLUDE_RE.findall(data)))
        _FILE_MEMO[memo_key] = hit
    return hit


def header_closure(source: str, dirs: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(name, sha256)`` of every header ``source`` reaches through #include, found in ``dirs``
    (and next to the including header).  Headers found nowhere (NVRTC's built-ins) are covered by
    the NVRTC version in the key.  Conditional includes are followed too: hashing a header that
    is not used only costs a spurious miss."""
    seen: dict[str, str] = {}
    todo: list[tuple[str, Path | None]] = [
        (m.decode(), None) for m in _INCLUDE_RE.findall(source.encode())
    ]
    while todo:
        name, parent = todo.pop()
        places = ([parent] if parent is not None else []) + [Path(d) for d in dirs]
        for base in places:
            path = (base / name).resolve()
            if path.is_file():
                break
        else:
            continue
        if str(path) in seen:
            continue
        digest, includes = _scan(path)
        seen[str(path)] = digest
        todo += [(inc, path.parent) for inc in includes]
    # Key by the name relative to its include dir, so two installs of the same headers share entries.
    out = []
    for p, d in seen.items():
        rel = next((os.path.relpath(p, base) for base in dirs if p.startswith(str(Path(base).resolve()))), Path(p).name)
        out.append((rel, d))
    return sorted(out)


def _package_version() -> str:
    try:
        from sparsify import __version__

        return __version__
    except Exception:  # the package is half-imported while it imports the runtime
        return "unknown"


def cache_key(source: str, options: dict, arch: str, target: str, dirs: tuple[str, ...] | None = None,
              nvrtc: tuple[int, int] | None = None) -> str:
    """The hash of everything that changes the binary."""
    dirs = include_dirs() if dirs is None else dirs
    nvrtc = nvrtc_version() if nvrtc is None else nvrtc
    h = hashlib.sha256()
    for part in (
        b"sparsify-kernel-v1",
        _package_version().encode(),
        f"nvrtc {nvrtc[0]}.{nvrtc[1]}".encode(),
        f"{arch} {target}".encode(),
        json.dumps(options, sort_keys=True).encode(),
        source.encode(),
        json.dumps(header_closure(source, dirs)).encode(),
    ):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


# ------------------------------------------------------------------ ptxas log
_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_PROPS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, KernelResources]:
    """Per-kernel resources from ``ptxas -v`` output (the NVRTC log of a compile with it)."""
    out: dict[str, KernelResources] = {}
    parts = _ENTRY_RE.split(log)
    for name, body in zip(parts[1::2], parts[2::2]):
        props, used, smem = _PROPS_RE.search(body), _USED_RE.search(body), _SMEM_RE.search(body)
        if props is None or used is None:
            continue
        out[name] = KernelResources(
            registers=int(used.group(1)),
            spill_stores=int(props.group(2)),
            spill_loads=int(props.group(3)),
            stack_bytes=int(props.group(1)),
            smem_bytes=int(smem.group(1)) if smem else 0,
        )
    return out


# ------------------------------------------------------------------- compile
_MEMO: dict[str, CompiledProgram] = {}
_MEMO_LOCK = threading.Lock()
_DEFAULT_CACHE = DiskCache()


def compile_source(name: str, source: str, arch: str, target: str = "cubin", *,
                   cache: DiskCache | None = None, dirs: tuple[str, ...] | None = None) -> CompiledProgram:
    """Compile ``source`` (or fetch it from the memo / disk cache) for ``arch``."""
    dirs = include_dirs() if dirs is None else dirs
    options = dict(BASE_OPTIONS)
    if target == "ptx":  # no ptxas run, so nothing to report
        options.pop("ptxas_options")
    key = cache_key(source, options, arch, target, dirs)
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
    if hit is not None:
        return hit
    cache = _DEFAULT_CACHE if cache is None else cache
    blob = cache.get(key)
    prog = None
    if blob is not None:
        try:
            prog = CompiledProgram.from_bytes(blob)
        except (ValueError, KeyError, TypeError, AttributeError):
            prog = None  # a valid checksum over an old format: recompile
        if prog is not None and (prog.key, prog.arch, prog.target) != (key, arch, target):
            prog = None  # an entry for another request under this name: never load it
    if prog is None:
        prog = _nvrtc_compile(name, source, arch, target, options, dirs, key)
        cache.put(key, prog.to_bytes())
    with _MEMO_LOCK:
        _MEMO[key] = prog
    return prog


def compile_program(spec, arch: str, target: str = "cubin", *, cache: DiskCache | None = None) -> CompiledProgram:
    """Compile a :class:`~.kernels.ProgramSpec` for ``arch``."""
    return compile_source(spec.name, spec.source(), arch, target, cache=cache)


_IMPORT_LOCK = threading.Lock()


@cache
def _cuda_core_program():
    # cuda.core picks its cu12/cu13 flavour at import; importing it from two
    # threads at once can see a half-built module, so one thread imports it.
    with _IMPORT_LOCK:
        try:
            from cuda.core import Program, ProgramOptions
        except ImportError as exc:
            raise CUDAUnavailableError(
                f"cuda-core is not installed ({exc}). Install the CUDA extra: pip install 'sparsify[cuda]'."
            ) from exc
    return Program, ProgramOptions


def _nvrtc_compile(name: str, source: str, arch: str, target: str, options: dict,
                   dirs: tuple[str, ...], key: str) -> CompiledProgram:
    Program, ProgramOptions = _cuda_core_program()
    opts = ProgramOptions(name=f"{name}.cu", arch=arch, include_path=list(dirs), **options)
    log = io.StringIO()
    try:
        code = Program(source, "c++", opts).compile(target, logs=log)
    except Exception as exc:
        full = log.getvalue() or str(exc)
        raise KernelCompileError(name, arch, full, {**options, "arch": arch, "include_path": list(dirs)}, source) from exc
    text = log.getvalue().replace("\x00", "")
    binary = bytes(code.code) if not isinstance(code.code, str) else code.code.encode()
    return CompiledProgram(name, arch, target, binary, text, parse_ptxas_log(text), key)


def clear_memo() -> None:
    """Forget in-process compile results (tests use it to reach the disk cache)."""
    with _MEMO_LOCK:
        _MEMO.clear()
