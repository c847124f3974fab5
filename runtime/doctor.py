"""``sparsify doctor``: what the CUDA runtime finds here, and whether every kernel builds.

Prints the NVRTC version and arches, the headers found, the device (if any),
the cache directory and the executor CUDA tensors would get.  With
``--compile-all`` it compiles every kernel instantiation for sm_80 and sm_90
(or ``--arch``) and prints registers, spills, stack and shared memory per
kernel.  Exits non-zero when something needed is missing or any kernel fails
to compile, spills, uses stack or exceeds the static shared-memory limit.

Example:
    $ python -m sparsify.runtime.doctor --compile-all
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["main"]


def _line(label: str, value: str) -> None:
    print(f"{label:<18} {value}")


def _cache_state(cache_root, cache_disabled) -> str:
    """The kernel cache's folder and whether it is used (a cache not private to this user is not)."""
    from .cuda.cache import CacheUnsafe, private_dir

    if cache_disabled():
        try:
            return f"{cache_root()} (disabled by SPARSIFY_DISABLE_CACHE)"
        except CacheUnsafe as exc:
            return f"(disabled by SPARSIFY_DISABLE_CACHE; {exc})"
    try:
        root = cache_root()
        try:
            private_dir(root, root, create=False)
        except FileNotFoundError:
            return f"{root} (not created yet)"
        return f"{root} (private: used)"
    except CacheUnsafe as exc:
        return f"NOT USED: {exc}; kernels are compiled in each process (chmod 700 it, or set SPARSIFY_CACHE_DIR)"


def _environment() -> bool:
    """Print what is found; False when kernels cannot be compiled here."""
    from .cuda import compiler
    from .cuda.autotune import autotune_enabled
    from .cuda.cache import cache_disabled, cache_root  # noqa: F401  (passed to _cache_state)

    ok = True
    try:
        major, minor = compiler.nvrtc_version()
        _line("NVRTC", f"{major}.{minor}, arches sm_{', sm_'.join(map(str, compiler.supported_archs()))}")
    except Exception as exc:
        _line("NVRTC", f"MISSING: {exc}")
        ok = False
    try:
        dirs = compiler.include_dirs()
        _line("headers", dirs[1])
        for h in compiler.CUDA_HEADERS:
            _line("", f"{h}: {'found' if os.path.isfile(os.path.join(dirs[1], h)) else 'MISSING'}")
        _line("kernel sources", dirs[0])
    except Exception as exc:
        _line("headers", f"MISSING: {exc}")
        ok = False
    _line("cache", _cache_state(cache_root, cache_disabled))
    _line("autotune", "on" if autotune_enabled() else "off (SPARSIFY_AUTOTUNE=0): heuristic choices")
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                try:
                    arch = " -> ".join(compiler.arch_for((p.major, p.minor)))
                except Exception as exc:
                    arch = f"no arch: {exc}"
                _line(f"device {i}", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, compiles for {arch}")
        else:
            _line("device", "none (torch sees no CUDA device): CUDA tensors are impossible, CPU executor only")
        from .executors import executor_for

        if torch.cuda.is_available():
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ex = executor_for(torch.device("cuda"))
            _line("executor (cuda)", ex.name + "".join(f"  [{w.message}]" for w in caught))
    except Exception as exc:  # the doctor reports, it does not crash
        _line("device", f"error while probing: {exc}")
    return ok


def _compile_all(archs: list[str], jobs: int) -> bool:
    from .cuda import compiler, kernels

    work = [(p, a) for a in archs for p in kernels.programs()]

    def one(job):
        p, a = job
        t = time.perf_counter()
        try:
            return p, a, compiler.compile_program(p, a), time.perf_counter() - t, None
        except Exception as exc:
            return p, a, None, time.perf_counter() - t, exc

    ok = True
    print(f"\n{'kernel':<52} {'arch':<7} {'regs':>4} {'spill':>7} {'stack':>5} {'smem':>6}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for p, a, result, secs, exc in pool.map(one, work):
            if exc is not None:
                ok = False
                print(f"{p.name:<52} {a:<7} FAILED ({type(exc).__name__})\n{exc}")
                continue
            for k in p.kernels:
                r = result.resources.get(k.name)
                if r is None:
                    ok = False
                    print(f"{k.name:<52} {a:<7} MISSING from the ptxas report")
                    continue
                bad = r.spill_stores or r.spill_loads or r.stack_bytes or r.smem_bytes > kernels.SMEM_LIMIT
                ok = ok and not bad
                print(
                    f"{k.name:<52} {a:<7} {r.registers:>4} {r.spill_stores:>3}/{r.spill_loads:<3} "
                    f"{r.stack_bytes:>5} {r.smem_bytes:>6}{'  <-- FAIL' if bad else ''}"
                )
            print(f"{'':<52} {a:<7} ({p.name}: {secs:.1f} s)")
    n = sum(len(p.kernels) for p in kernels.programs())
    print(f"\n{n} kernels x {len(archs)} arches: {'all good' if ok else 'FAILURES above'}")
    return ok


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and exit status 2, as everywhere in the ``sparsify`` command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None, prog: str = "sparsify doctor") -> int:
    """Run the doctor; returns the exit status (0 when everything needed is there and builds).

    ``sparsify doctor ARGS`` and ``python -m sparsify.runtime.doctor ARGS`` both land here;
    ``--help`` prints the usage and returns 0.
    """
    ap = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile-all", action="store_true", help="compile every kernel instantiation and report resources")
    ap.add_argument("--arch", action="append", help="arch for --compile-all (repeatable; default sm_80 and sm_90)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 0
    ok = _environment()
    if args.compile_all:
        if not ok:
            print("\ncannot compile: NVRTC or the headers are missing (pip install 'sparsify[cuda]').")
            return 1
        from .cuda import compiler

        known = [f"sm_{a}" for a in compiler.supported_archs()]
        bad = [a for a in (args.arch or []) if a not in known]
        if bad:
            print(f"doctor: --arch {bad[0]!r}: this NVRTC compiles for {', '.join(known)}.", file=sys.stderr)
            return 2
        ok = _compile_all(args.arch or ["sm_80", "sm_90"], max(1, args.jobs))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
