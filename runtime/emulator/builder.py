"""Building kernel sources for the host: the toolchain, the cache, kernel discovery.

A *program* is one shared library built from a CUDA source string (plus its
include directories), like one NVRTC program.  The build:

1. preprocesses the source with the shim (``csrc/emu_shim.h``, force-included)
   and finds every ``__global__`` kernel and ``extern __shared__`` array by the
   markers the shim's macros leave (``__sparsify_emu_kernel__`` ...);
2. compiles the source and a generated registry (one entry per kernel: its
   parameter types, read off the C++ declaration by templates, an invoker that
   unpacks the launch arguments, and its ``__launch_bounds__``) as one
   translation unit;
3. compiles the module file: dynamic shared memory (one thread-local buffer;
   every ``extern __shared__`` array is an alias of it, found with ``nm``), the
   module descriptor, and an ``__assert_fail`` that turns ``assert`` into an
   error of the launch;
4. links against the runtime library (``csrc/emu_runtime.cpp``, built once).

Results are cached under ``<cache root>/emulator/`` (the kernel cache's root,
``SPARSIFY_CACHE_DIR``), keyed by everything that changes the binary: the
compiler's version, flags, the shim and runtime sources, the source and every
header it includes.  Writes are atomic (temporary directory, ``os.replace``),
builds of one key are serialized with a file lock, and a library whose sha256
does not match its record is rebuilt.

Example:
    >>> find_kernels('extern "C" __attribute__((__sparsify_emu_kernel__)) void '
    ...              '__attribute__((__sparsify_emu_launch_bounds__((4) * 32))) k(int* p) {}')
    [('k', 128)]
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

__all__ = [
    "CSRC",
    "DEFAULT_DYNAMIC_SHARED_BYTES",
    "EmulatorBuildError",
    "EmulatorUnavailableError",
    "BuildResult",
    "build_library",
    "compiler",
    "cuda_include_dirs",
    "find_extern_shared",
    "find_kernels",
    "runtime_library",
]

CSRC = Path(__file__).resolve().parent / "csrc"
FORMAT = "sparsify-emulator-1"
#: Flags of every host build.  -fno-strict-aliasing: kernels reinterpret shared
#: memory freely (as CUDA allows); -ffp-contract=off: no a*b+c fusion that the
#: source did not ask for (nvcc fuses by default: see docs/cuda_runtime.md).
#: -fstack-clash-protection: a frame larger than a page touches every page, so a thread that
#: overflows its stack faults on the guard page below it instead of writing into the next stack.
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-ffp-contract=off", "-Wno-attributes",
         "-fstack-clash-protection")
#: Dynamic shared memory per thread block when a build does not say (the CUDA
#: default without the opt-in attribute).
DEFAULT_DYNAMIC_SHARED_BYTES = 48 * 1024
_RUNTIME_SOURCES = ("emu_api.h", "emu_runtime.cpp")
_SHIM_SOURCES = ("emu_api.h", "emu_shim.h")


class EmulatorUnavailableError(RuntimeError):
    """The host toolchain or the CUDA headers the kernels include are missing."""


class EmulatorBuildError(RuntimeError):
    """The host compiler rejected a program.  Carries ``log``, ``command`` and ``source``."""

    def __init__(self, name: str, step: str, log: str, command: list[str], source: str) -> None:
        self.name, self.step, self.log, self.command, self.source = name, step, log, command, source
        numbered = "\n".join(f"{i:4d} | {line}" for i, line in enumerate(source.splitlines(), 1))
        super().__init__(
            f"sparsify emulator: building program {name!r} failed at the {step} step.\n"
            f"--- compiler output ---\n{log.strip()}\n"
            f"--- command ---\n{' '.join(command)}\n"
            f"--- source ({name}) ---\n{numbered}\n"
            "The emulator builds CUDA sources with the host C++ compiler and the shim "
            f"{CSRC / 'emu_shim.h'}; a CUDA feature it lacks shows up as an undeclared name "
            "(see 'what is supported' in docs/cuda_runtime.md)."
        )


# ------------------------------------------------------------------ toolchain
@cache
def compiler() -> tuple[str, str]:
    """``(path, version line)`` of the host C++ compiler: ``$SPARSIFY_EMULATOR_CXX``, else ``g++``."""
    name = os.environ.get("SPARSIFY_EMULATOR_CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise EmulatorUnavailableError(
            f"the CUDA emulator needs a C++17 compiler; {name!r} is not on PATH. Install g++ "
            "(apt-get install g++) or point SPARSIFY_EMULATOR_CXX at one."
        )
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    version = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "unknown"
    return path, version


@cache
def cuda_include_dirs() -> tuple[str, ...]:
    """The CUDA headers the kernels include in host mode (cuda_fp16.h, cuda_bf16.h, vector_types.h)
    and the CCCL headers they include (``nv/target``), found with ``cuda.pathfinder`` as
    ``runtime/cuda/compiler.py`` finds them."""
    from ..cuda import compiler as nvrtc_compiler

    try:
        cudart = nvrtc_compiler.include_dirs()[1]
    except nvrtc_compiler.CUDAUnavailableError as exc:
        raise EmulatorUnavailableError(f"the CUDA emulator needs the CUDA headers: {exc}") from exc
    from cuda import pathfinder

    cccl = pathfinder.find_nvidia_header_directory("cccl")
    if not cccl or not (Path(cccl) / "nv" / "target").is_file():
        raise EmulatorUnavailableError(
            "the CUDA emulator needs the CCCL headers (nv/target, which cuda_fp16.h includes outside "
            "NVRTC); install them with pip install 'sparsify[cuda]' (nvidia-cuda-cccl)."
        )
    return (cudart, str(cccl))


def _hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _file_hashes(names: tuple[str, ...]) -> list[str]:
    return [hashlib.sha256((CSRC / n).read_bytes()).hexdigest() for n in names]


_PRIVATE_FALLBACK: list[Path] = []


def cache_dir() -> Path:
    """``<cache root>/emulator``, made private (its libraries are code that ``ctypes`` loads: see
    ``runtime.cuda.cache``).  A cache that is not private to this user is not used: the builds go to a
    fresh private folder of this process instead (one warning)."""
    from ..cuda.cache import CacheUnsafe, cache_root, private_dir, warn_unsafe

    try:
        top = cache_root()
        private_dir(top / "emulator", top)
        return top / "emulator"
    except CacheUnsafe as exc:
        warn_unsafe(exc, "emulator")
        if not _PRIVATE_FALLBACK:
            import atexit

            d = Path(tempfile.mkdtemp(prefix="sparsify-emulator-"))  # mode 0700
            atexit.register(shutil.rmtree, d, True)
            _PRIVATE_FALLBACK.append(d)
        return _PRIVATE_FALLBACK[0]


def _run(cmd: list[str], cwd: Path, name: str, step: str, source: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise EmulatorBuildError(name, step, out.stderr + out.stdout, cmd, source)
    return out.stdout


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (builds of one key by several processes happen once)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def _valid(lib: Path, record: Path) -> bool:
    """Whether ``lib`` is a finished build: both files regular, ours, writable by nobody else (the folder
    is private too: ``cache_dir``), and the library's sha256 the one its record holds."""
    from ..cuda.cache import read_private

    try:
        meta = json.loads(read_private(record, 1 << 20))
        return hashlib.sha256(read_private(lib)).hexdigest() == meta.get("sha256")
    except (OSError, ValueError, AttributeError):
        return False


@cache
def _runtime_key() -> str:
    cxx, version = compiler()
    return _hash(FORMAT, version, " ".join(FLAGS), *_file_hashes(_RUNTIME_SOURCES))[:24]


def runtime_library() -> Path:
    """The runtime shared library (fibers, scheduler, PTX semantics), built once per compiler and source."""
    key = _runtime_key()
    root = cache_dir()
    lib = root / f"libsparsify_emu_rt-{key}.so"
    record = root / f"libsparsify_emu_rt-{key}.json"
    if lib.is_file() and _valid(lib, record):
        return lib
    with _locked(root / f"rt-{key}.lock"):
        if lib.is_file() and _valid(lib, record):
            return lib
        cxx, version = compiler()
        with tempfile.TemporaryDirectory(prefix=".rt-", dir=root) as tmp:
            t = Path(tmp)
            cmd = [cxx, *FLAGS, "-shared", f"-Wl,-soname,{lib.name}", "-o", str(t / lib.name),
                   str(CSRC / "emu_runtime.cpp"), "-ldl"]
            _run(cmd, t, "emulator runtime", "compile", (CSRC / "emu_runtime.cpp").read_text())
            digest = hashlib.sha256((t / lib.name).read_bytes()).hexdigest()
            (t / "record.json").write_text(json.dumps({"sha256": digest, "compiler": version}))
            _publish(t / lib.name, lib)
            _publish(t / "record.json", record)
    return lib


def _shim_pch(cxx: str, version: str, flags: list[str], cuda_dirs: tuple[str, ...]) -> Path:
    """The shim to force-include: a copy next to its precompiled header (``.gch``) when one can be
    built for ``flags`` (a third of a kernel's compile time is the CUDA headers), else the source.
    The compiler ignores a PCH built with other flags and reads the copy, so this is only a speedup."""
    from ..cuda.compiler import header_closure

    closure = header_closure('#include "emu_shim.h"\n', (str(CSRC), *cuda_dirs))
    key = _hash(FORMAT, version, " ".join(flags), json.dumps(closure))[:24]
    root = cache_dir()
    final = root / f"pch-{key}"
    if (final / "emu_shim.h.gch").is_file():
        return final / "emu_shim.h"
    with _locked(root / f"pch-{key}.lock"):
        if (final / "emu_shim.h.gch").is_file():
            return final / "emu_shim.h"
        tmp = Path(tempfile.mkdtemp(prefix=".pch-", dir=root))
        try:
            shutil.copyfile(CSRC / "emu_shim.h", tmp / "emu_shim.h")
            cmd = [cxx, "-x", "c++-header", *flags, f"-I{CSRC}", *[f"-I{d}" for d in cuda_dirs],
                   str(tmp / "emu_shim.h"), "-o", str(tmp / "emu_shim.h.gch")]
            if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
                return CSRC / "emu_shim.h"
            try:
                os.replace(tmp, final)
            except OSError:  # another process published it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "emu_shim.h" if (final / "emu_shim.h.gch").is_file() else CSRC / "emu_shim.h"


# ------------------------------------------------------------------ discovery
_MARK_KERNEL = re.compile(r"__attribute__\s*\(\(\s*__sparsify_emu_kernel__\s*\)\)")
_BOUNDS = re.compile(r"__sparsify_emu_launch_bounds__\s*\(")
_EXTERN_SHARED = re.compile(
    r"extern\s+thread_local\s+__attribute__\s*\(\(\s*__sparsify_emu_shared__\s*\)\)[^;{}]*?([A-Za-z_]\w*)\s*\[\s*\]"
)
_IDENT = re.compile(r"[A-Za-z_]\w*")


def _balanced(text: str, i: int) -> int:
    """Index just past the parenthesis group that starts at ``text[i] == '('``."""
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def _int_expr(expr: str) -> int | None:
    """The value of a constant integer expression of literals (a macro-expanded launch bound), or None.

    Parsed with ``ast`` and evaluated node by node: nothing is executed."""
    expr = re.sub(r"\b(\d+)[uUlL]+\b", r"\1", expr.strip())
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.Div: lambda: int(a / b), ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b,
                   ast.LShift: lambda: a << b, ast.RShift: lambda: a >> b}
            f = ops.get(type(n.op))
            if f is None:
                raise ValueError
            return f()
        raise ValueError

    try:
        return int(ev(tree))
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def find_kernels(preprocessed: str) -> list[tuple[str, int | None]]:
    """``(name, maxThreadsPerBlock or None)`` of every non-template ``__global__`` function in
    preprocessed source (see the module docstring)."""
    out: list[tuple[str, int | None]] = []
    for m in _MARK_KERNEL.finditer(preprocessed):
        start = max(preprocessed.rfind(c, 0, m.start()) for c in ";{}")
        context = preprocessed[start + 1 : m.start()]
        if re.search(r"\btemplate\b", context):
            continue  # a template kernel needs template arguments to be launched by name
        i = m.end()
        name = None
        bounds = None
        text = preprocessed
        while i < len(text):
            while i < len(text) and text[i].isspace():
                i += 1
            if text.startswith("__attribute__", i):
                j = text.index("(", i)
                end = _balanced(text, j)
                b = _BOUNDS.search(text, j, end)
                if b is not None:
                    args = text[b.end() : _balanced(text, b.end() - 1) - 1]
                    bounds = _int_expr(args.split(",")[0])
                i = end
                continue
            idm = _IDENT.match(text, i)
            if idm is None:
                break
            k = idm.end()
            while k < len(text) and text[k].isspace():
                k += 1
            if k < len(text) and text[k] == "(":
                name = idm.group(0)
                break
            i = idm.end()
        if name is not None and name not in [n for n, _ in out]:
            b = _BOUNDS.search(context)
            if bounds is None and b is not None:
                bounds = _int_expr(context[b.end() : _balanced(context, b.end() - 1) - 1].split(",")[0])
            out.append((name, bounds))
    return out


def find_extern_shared(preprocessed: str) -> list[str]:
    """Names of the ``extern __shared__`` (dynamic shared memory) arrays in preprocessed source."""
    return sorted(set(_EXTERN_SHARED.findall(preprocessed)))


# ------------------------------------------------------------------ generated code
_REGISTRY = r"""
// ---- generated by sparsify.runtime.emulator: the kernel registry ----
#include <cstring>
#include <utility>
namespace sparsify_emu_gen {
template <class T>
constexpr sparsify_emu_param describe() {
  typedef typename std::remove_cv<T>::type U;
  static_assert(std::is_trivially_copyable<U>::value, "kernel parameters must be trivially copyable");
  if constexpr (std::is_pointer<U>::value) {
    return {SPARSIFY_EMU_PARAM_PTR, int(sizeof(U)), int(std::is_const<typename std::remove_pointer<U>::type>::value)};
  } else if constexpr (std::is_floating_point<U>::value) {
    return {SPARSIFY_EMU_PARAM_FLOAT, int(sizeof(U)), 0};
  } else if constexpr (std::is_enum<U>::value) {
    return {std::is_signed<typename std::underlying_type<U>::type>::value ? SPARSIFY_EMU_PARAM_INT
                                                                          : SPARSIFY_EMU_PARAM_UINT,
            int(sizeof(U)), 0};
  } else if constexpr (std::is_integral<U>::value) {
    return {std::is_signed<U>::value ? SPARSIFY_EMU_PARAM_INT : SPARSIFY_EMU_PARAM_UINT, int(sizeof(U)), 0};
  } else {
    return {SPARSIFY_EMU_PARAM_BYTES, int(sizeof(U)), 0};
  }
}
template <class T>
static T load(void* p) {
  typename std::remove_cv<T>::type v;
  std::memcpy(static_cast<void*>(&v), p, sizeof(v));
  return v;
}
template <class... A, std::size_t... I>
static void call(void (*fn)(A...), void* const* argv, std::index_sequence<I...>) {
  fn(load<A>(argv[I])...);
}
template <class... A>
static void call(void (*fn)(A...), void* const* argv) {
  call(fn, argv, std::index_sequence_for<A...>{});
}
template <class... A>
static constexpr int count(void (*)(A...)) { return int(sizeof...(A)); }
template <class... A>
static const sparsify_emu_param* table(void (*)(A...)) {
  static const sparsify_emu_param t[] = {describe<A>()..., {-1, 0, 0}};
  return t;
}
}  // namespace sparsify_emu_gen
"""

_MODULE = r"""
// ---- generated by sparsify.runtime.emulator: the module descriptor ----
#include <stdio.h>
#include "emu_api.h"
extern "C" {
extern const sparsify_emu_kernel sparsify_emu_kernel_table[];
extern const int sparsify_emu_kernel_count;
// Dynamic shared memory: every extern __shared__ array is an alias of this buffer.
__attribute__((visibility("hidden"), aligned(128))) thread_local unsigned char sparsify_emu_dyn_smem[@ALLOC@];
static void* sparsify_emu_tls_probe(void) { return sparsify_emu_dyn_smem; }
// assert() in a kernel: an error of the launch that names the kernel, block and thread.
__attribute__((visibility("hidden"))) void __assert_fail(const char* expr, const char* file, unsigned line,
                                                         const char* fn) {
  char buf[768];
  snprintf(buf, sizeof buf, "assertion failed in %s: %s", fn, expr);
  sparsify_emu_trap(buf, file, int(line));
}
__attribute__((visibility("default"))) const sparsify_emu_module* sparsify_emu_get_module(void) {
  static const sparsify_emu_module m = {SPARSIFY_EMU_ABI, sparsify_emu_kernel_count, sparsify_emu_kernel_table,
                                        sparsify_emu_tls_probe, @CAP@};
  return &m;
}
}
"""


def _registry(kernels: list[tuple[str, int | None]]) -> str:
    lines = [_REGISTRY]
    for i, (name, _) in enumerate(kernels):
        lines.append(f"static void sparsify_emu_invoke_{i}(void* const* argv) {{ sparsify_emu_gen::call(&{name}, argv); }}")
    entries = ",\n".join(
        f'  {{"{name}", &sparsify_emu_invoke_{i}, sparsify_emu_gen::count(&{name}), '
        f"sparsify_emu_gen::table(&{name}), {bounds or 0}}}"
        for i, (name, bounds) in enumerate(kernels)
    )
    lines.append(f'extern "C" const sparsify_emu_kernel sparsify_emu_kernel_table[] = {{\n{entries}\n}};')
    lines.append(f'extern "C" const int sparsify_emu_kernel_count = {len(kernels)};')
    return "\n".join(lines) + "\n"


def _module(capacity: int, aliases: list[str]) -> str:
    text = _MODULE.replace("@ALLOC@", str(max(capacity, 16))).replace("@CAP@", str(capacity))
    for i, sym in enumerate(aliases):
        text += (
            f'extern thread_local unsigned char sparsify_emu_alias_{i}[{max(capacity, 16)}] __asm__("{sym}") '
            '__attribute__((alias("sparsify_emu_dyn_smem")));\n'
        )
    return text


def _undefined_symbols(obj: Path, cwd: Path) -> list[tuple[str, str]]:
    """``(mangled, demangled)`` of the undefined symbols of an object file."""
    nm = shutil.which("nm")
    cxxfilt = shutil.which("c++filt")
    if nm is None or cxxfilt is None:
        raise EmulatorUnavailableError("the CUDA emulator needs binutils (nm, c++filt): apt-get install binutils")
    out = subprocess.run([nm, "-u", str(obj)], cwd=cwd, capture_output=True, text=True, check=True).stdout
    syms = [line.split()[-1] for line in out.splitlines() if line.strip()]
    if not syms:
        return []
    dem = subprocess.run([cxxfilt], input="\n".join(syms), capture_output=True, text=True, check=True).stdout
    return list(zip(syms, dem.splitlines()))


class BuildResult:
    """A built program: the shared library, its runtime library, the discovered kernels, the log."""

    def __init__(self, key: str, library: Path, runtime: Path, record: dict) -> None:
        self.key, self.library, self.runtime, self.record = key, library, runtime, record


def build_library(source: str, *, name: str = "program", include_dirs: tuple[str, ...] = (),
                  defines: dict[str, str] | None = None, options: tuple[str, ...] = (),
                  max_dynamic_shared_bytes: int = DEFAULT_DYNAMIC_SHARED_BYTES) -> BuildResult:
    """Build (or find in the cache) the host library of ``source``; see :func:`sparsify.runtime.emulator.build`."""
    from ..cuda.compiler import header_closure

    if not isinstance(source, str) or not source.strip():
        raise ValueError("sparsify emulator: expected CUDA source text (a non-empty str).")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name):
        raise ValueError(f"sparsify emulator: program name {name!r} must be 1-100 characters of [A-Za-z0-9_.-].")
    if not 0 <= int(max_dynamic_shared_bytes) <= 227 * 1024:
        raise ValueError(
            f"sparsify emulator: max_dynamic_shared_bytes={max_dynamic_shared_bytes} is outside [0, 232448] "
            "(227 KiB, the most a thread block can have on sm_90)."
        )
    for opt in options:
        if not isinstance(opt, str) or not opt.startswith("-"):
            raise ValueError(f"sparsify emulator: compiler option {opt!r} must be a string starting with '-'.")
    defines = dict(defines or {})
    for k in defines:
        if not re.fullmatch(r"[A-Za-z_]\w*", k):
            raise ValueError(f"sparsify emulator: define {k!r} is not a C identifier.")
    cxx, version = compiler()
    dirs = tuple(str(Path(d).resolve()) for d in include_dirs) + (str(CSRC),) + cuda_include_dirs()
    runtime = runtime_library()
    define_flags = [f"-D{k}={v}" if v != "" else f"-D{k}" for k, v in sorted(defines.items())]
    # Hidden symbols and -Bsymbolic: each module keeps its own copy of every __shared__ variable
    # (function-local statics of inline functions are weak globals that the dynamic linker would
    # otherwise bind to the first loaded module that defines them, e.g. an unmodified build).
    flags = [*FLAGS, "-fvisibility=hidden", "-DSPARSIFY_EMULATOR=1", *define_flags, *options]
    key = _hash(
        FORMAT, version, _runtime_key(), " ".join(flags), str(int(max_dynamic_shared_bytes)),
        *_file_hashes(_SHIM_SOURCES), source, json.dumps(header_closure(source, dirs)),
    )[:32]
    root = cache_dir()
    lib = root / f"{name}-{key}.so"
    record_path = root / f"{name}-{key}.json"
    if lib.is_file() and _valid(lib, record_path):
        return BuildResult(key, lib, runtime, json.loads(record_path.read_text()))
    with _locked(root / f"{name}-{key}.lock"):
        if lib.is_file() and _valid(lib, record_path):
            return BuildResult(key, lib, runtime, json.loads(record_path.read_text()))
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:
            t = Path(tmp)
            (t / "program.cu").write_text(source)
            inc = [f"-I{d}" for d in dirs]
            shim = _shim_pch(cxx, version, flags, cuda_include_dirs())
            base = [cxx, "-x", "c++", *flags, "-include", str(shim), *inc]
            pre = _run([*base, "-E", "-P", "program.cu"], t, name, "preprocess", source)
            kernels = find_kernels(pre)
            if not kernels:
                raise EmulatorBuildError(
                    name, "discovery", 'no non-template __global__ kernel found (kernels are launched by name: '
                    'declare them extern "C" __global__ at global scope)', [], source)
            shared_names = find_extern_shared(pre)
            (t / "main.cpp").write_text('#include "program.cu"\n' + _registry(kernels))
            compile_log = _run_log([*base, "-c", "main.cpp", "-o", "main.o"], t, name, "compile", source)
            aliases = []
            if shared_names:
                for mangled, demangled in _undefined_symbols(t / "main.o", t):
                    if demangled.split("::")[-1] in shared_names:
                        aliases.append(mangled)
            (t / "module.cpp").write_text(_module(int(max_dynamic_shared_bytes), aliases))
            _run([cxx, "-x", "c++", *FLAGS, "-fvisibility=hidden", f"-I{CSRC}", "-c", "module.cpp", "-o", "module.o"], t, name,
                 "module", source)
            _run([cxx, "-shared", "-o", lib.name, "main.o", "module.o", str(runtime),
                  f"-Wl,-rpath,{runtime.parent}", "-Wl,--no-undefined", "-Wl,-Bsymbolic", "-lm"], t, name, "link",
                 source)
            digest = hashlib.sha256((t / lib.name).read_bytes()).hexdigest()
            record = {
                "name": name, "key": key, "sha256": digest, "compiler": version, "flags": flags,
                "kernels": [{"name": n, "max_threads": b} for n, b in kernels],
                "extern_shared": shared_names, "log": compile_log,
            }
            (t / "record.json").write_text(json.dumps(record, indent=1))
            _publish(t / lib.name, lib)
            _publish(t / "record.json", record_path)
    return BuildResult(key, lib, runtime, record)


def _run_log(cmd: list[str], cwd: Path, name: str, step: str, source: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise EmulatorBuildError(name, step, out.stderr + out.stdout, cmd, source)
    return out.stderr
