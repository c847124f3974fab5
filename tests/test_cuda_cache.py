"""The kernel cache, the autotuner's memory, the launch ABI and the no-driver path (no GPU needed).

Properties:
* the cache key changes when the source, an included header, the options, the
  arch, the NVRTC version or the package version change, and only then;
* a corrupt or truncated entry is recompiled with one warning and replaced;
* concurrent compiles of the same kernel (threads and processes) all succeed
  and leave one valid entry;
* SPARSIFY_DISABLE_CACHE / SPARSIFY_CACHE_DIR are honoured;
* an entry is code: only a cache private to this user is read (folders made 0700; a folder
  or entry that is a link, a FIFO, another user's, or writable by others is not used, with
  one warning), and an entry for another request is never loaded;
* the autotuner remembers a choice across instances and skips timing when
  SPARSIFY_AUTOTUNE=0;
* the executor passes exactly the kernel's parameter list, with explicit types;
* without a driver, CUDA tensors go to the reference executor with one warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify.runtime.cuda import autotune, cache, compiler, kernels

HAVE_CUDA_PYTHON = True
try:
    import cuda.core  # noqa: F401
except ImportError:
    HAVE_CUDA_PYTHON = False
needs_nvrtc = pytest.mark.skipif(not HAVE_CUDA_PYTHON, reason="cuda-python is not installed")

SMALL_SOURCE = '#include "probe.cuh"\nextern "C" __global__ void probe(float* y) { y[threadIdx.x] = PROBE_VALUE; }\n'


@pytest.fixture
def headers(tmp_path):
    d = tmp_path / "include"
    d.mkdir()
    (d / "probe.cuh").write_text('#pragma once\n#include "probe_inner.cuh"\n')
    (d / "probe_inner.cuh").write_text("#define PROBE_VALUE 1.0f\n")
    return d


@pytest.fixture(autouse=True)
def _fresh_memo():
    compiler.clear_memo()  # each test sees its own disk cache, not an earlier test's compile
    yield
    compiler.clear_memo()


def _key(source, dirs, options=None, arch="sm_80", nvrtc=(13, 0)):
    return compiler.cache_key(source, options or {"std": "c++17"}, arch, "cubin", (str(dirs),), nvrtc)


# ------------------------------------------------------------------ the key
def test_key_changes_with_every_input(headers, monkeypatch):
    base = _key(SMALL_SOURCE, headers)
    assert base == _key(SMALL_SOURCE, headers), "the key is deterministic"
    assert _key(SMALL_SOURCE + "\n", headers) != base
    assert _key(SMALL_SOURCE, headers, options={"std": "c++20"}) != base
    assert _key(SMALL_SOURCE, headers, arch="sm_90") != base
    assert _key(SMALL_SOURCE, headers, nvrtc=(13, 1)) != base
    monkeypatch.setattr(compiler, "_package_version", lambda: "99.0")
    assert _key(SMALL_SOURCE, headers) != base


def test_key_changes_when_a_nested_header_changes(headers):
    base = _key(SMALL_SOURCE, headers)
    inner = headers / "probe_inner.cuh"
    inner.write_text("#define PROBE_VALUE 2.0f\n")
    os.utime(inner, ns=(1, 1))  # a different mtime, as an edit would give
    assert _key(SMALL_SOURCE, headers) != base


def test_key_does_not_depend_on_where_the_headers_live(headers, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(headers, moved)
    assert _key(SMALL_SOURCE, headers) == _key(SMALL_SOURCE, moved)


@needs_nvrtc
def test_real_key_covers_the_cuda_headers():
    spec = kernels.program_for("f16", 32)
    closure = dict(compiler.header_closure(spec.source(), compiler.include_dirs()))
    for name in ("bsmm.cuh", "bsmm_common.cuh", "bsmm_dsd.cuh", "bsmm_sdd.cuh", "cuda_fp16.h", "cuda_bf16.h"):
        assert name in closure, f"{name} is not part of the cache key"


# ----------------------------------------------------------- the disk cache
@given(payload=st.binary(max_size=4096), key=st.text("0123456789abcdef", min_size=1, max_size=64))
@settings(max_examples=25)
def test_put_then_get_round_trips(tmp_path_factory, payload, key):
    c = cache.DiskCache(tmp_path_factory.mktemp("c"))
    c.put(key, payload)
    assert c.get(key) == payload
    assert not [p for p in c.root.iterdir() if p.suffix == ".tmp"], "no temporary file is left behind"


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_damaged_entries_read_as_a_miss_with_a_warning(tmp_path, damage):
    c = cache.DiskCache(tmp_path)
    c.put("k", b"x" * 100)
    p = c.path("k")
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[-1] ^= 1
    elif damage == "truncate":
        data = data[:-10]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a cache entry at all")
    p.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert c.get("k") is None


def test_environment_moves_and_disables_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.DiskCache().root == tmp_path / "mine" / "kernels"
    monkeypatch.delenv("SPARSIFY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "sparsify"
    monkeypatch.setenv("SPARSIFY_DISABLE_CACHE", "1")
    c = cache.DiskCache(tmp_path / "off")
    c.put("k", b"data")
    assert c.get("k") is None and not (tmp_path / "off").exists()


def test_the_cache_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path / "c"))
    c = cache.DiskCache()
    c.put("k", b"cubin")
    for d in (tmp_path / "c", tmp_path / "c" / "kernels"):
        assert (d.stat().st_mode & 0o777) == 0o700
    assert (c.path("k").stat().st_mode & 0o077) == 0
    assert c.get("k") == b"cubin"


def test_a_folder_of_ours_that_others_may_write_is_tightened_and_used(tmp_path):
    # an older version created the folders under the umask (0775 under umask 002): ours, so made 0700
    top = tmp_path / "top"
    top.mkdir(mode=0o700)
    c = cache.DiskCache(top / "kernels")
    c.put("k", b"ours")
    os.chmod(c.root, 0o777)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.get("k") == b"ours"
    assert (c.root.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("attack", ["folder_other_owner", "entry_writable", "entry_link", "entry_fifo", "folder_link",
                                    "other_owner", "parent_writable"])
def test_a_cache_others_can_write_is_not_used(tmp_path, attack):
    # A checksum stored beside an entry proves nothing about who wrote it: whoever can write the
    # folder can plant a valid one.  Such a cache is not read (one warning), and nothing blocks.
    top = tmp_path / "top"
    top.mkdir(mode=0o700)
    c = cache.DiskCache(top / "kernels")
    c.put("k", b"ours")
    entry = c.path("k")
    if attack == "folder_other_owner":
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(c.root, 65534, 65534)
    elif attack == "entry_writable":
        os.chmod(entry, 0o666)
    elif attack == "entry_link":
        planted = tmp_path / "planted.bin"
        shutil.copy(entry, planted)
        entry.unlink()
        entry.symlink_to(planted)
    elif attack == "entry_fifo":
        entry.unlink()
        os.mkfifo(entry)  # reading it would block forever
    elif attack == "folder_link":
        shutil.move(str(c.root), str(tmp_path / "elsewhere"))
        c.root.symlink_to(tmp_path / "elsewhere")
    elif attack == "other_owner":
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(entry, 65534, 65534)
    elif attack == "parent_writable":
        c = cache.DiskCache(top)  # the user's own root: its parent is checked
        c.put("k", b"ours")
        os.chmod(tmp_path, 0o777)
    with pytest.warns(RuntimeWarning, match="not using the kernel cache"):
        assert c.get("k") is None
    os.chmod(tmp_path, 0o700)


@needs_nvrtc
def test_an_entry_for_another_request_is_never_loaded(tmp_path, headers):
    c = cache.DiskCache(tmp_path / "cache")
    ours = compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),))
    other = compiler.compile_source("probe", SMALL_SOURCE, "sm_90", cache=c, dirs=(str(headers),))
    # the sm_90 entry, with its valid checksum, put where the sm_80 one is looked up
    shutil.copy(c.path(other.key), c.path(ours.key))
    compiler.clear_memo()
    again = compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),))
    assert again.arch == "sm_80" and again.key == ours.key and again.binary == ours.binary


def test_cache_locations_from_the_environment_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSIFY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG rule: a relative value is ignored
    assert cache.cache_root() == Path.home() / ".cache" / "sparsify"
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", "~no_such_user_sparsify/x")
    with pytest.raises(cache.CacheUnsafe, match="SPARSIFY_CACHE_DIR"):
        cache.cache_root()
    c = cache.DiskCache()
    with pytest.warns(RuntimeWarning, match="not using the kernel cache"):
        c.put("k", b"x")
    assert c.get("k") is None  # (warned once: the same reason is not repeated)


@needs_nvrtc
def test_corrupt_entry_is_recompiled_once_and_replaced(tmp_path, headers, recwarn):
    c = cache.DiskCache(tmp_path / "cache")
    first = compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),))
    entry = c.path(first.key)
    entry.write_bytes(entry.read_bytes()[:-7])
    compiler.clear_memo()
    with pytest.warns(RuntimeWarning, match="corrupt") as caught:
        second = compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),))
    assert len([w for w in caught if "corrupt" in str(w.message)]) == 1
    assert second.binary[:4] == b"\x7fELF" and second.resources["probe"].spill_stores == 0
    compiler.clear_memo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),))
    assert third == second, "the replaced entry is valid and read back as it was written"


@needs_nvrtc
def test_memo_and_disk_hits_skip_nvrtc(tmp_path, headers, monkeypatch):
    c = cache.DiskCache(tmp_path / "cache")
    first = compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),))

    def no_compile(*a, **k):
        raise AssertionError("NVRTC ran on a cache hit")

    monkeypatch.setattr(compiler, "_nvrtc_compile", no_compile)
    assert compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),)) is first
    compiler.clear_memo()
    assert compiler.compile_source("probe", SMALL_SOURCE, "sm_80", cache=c, dirs=(str(headers),)) == first


@needs_nvrtc
def test_concurrent_threads_compile_the_same_kernel(tmp_path, headers):
    c = cache.DiskCache(tmp_path / "cache")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda _: compiler.compile_source("probe", SMALL_SOURCE, "sm_90", cache=c, dirs=(str(headers),)),
            range(4),
        ))
    assert all(r.binary == results[0].binary for r in results)
    assert c.get(results[0].key) is not None


@needs_nvrtc
def test_concurrent_processes_compile_the_same_kernel(tmp_path, headers):
    script = textwrap.dedent(f"""
        import sys
        from sparsify.runtime.cuda import compiler
        from sparsify.runtime.cuda.cache import DiskCache
        src = {SMALL_SOURCE!r}
        r = compiler.compile_source("probe", src, "sm_80", cache=DiskCache(sys.argv[1]), dirs=({str(headers)!r},))
        assert r.binary[:4] == b"\\x7fELF"
        print(r.key)
    """)
    root = tmp_path / "shared"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()
    keys = {out.decode().strip() for out, _ in outs}
    assert len(keys) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.DiskCache(root).get(keys.pop()) is not None


# ---------------------------------------------------------------- autotuner
class _Cand(SimpleNamespace):
    pass


def test_autotuner_times_once_and_remembers(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSIFY_AUTOTUNE", "1")
    cands = [_Cand(name="a"), _Cand(name="b"), _Cand(name="c")]
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def timer(fn):
        fn()
        return cost[timed[-1]]

    tuner = autotune.Autotuner("NVIDIA Test GPU / 80GB", timer=timer)
    assert tuner.choose("fwd|k", cands, lambda c: timed.append(c.name), cands[0]).name == "b"
    assert sorted(timed) == ["a", "b", "c"]
    data = json.loads(tuner.path.read_text())
    assert data["choices"] == {"fwd|k": "b"} and data["device"] == "NVIDIA Test GPU / 80GB"

    def no_timer(fn):
        raise AssertionError("a remembered choice is not timed again")

    again = autotune.Autotuner("NVIDIA Test GPU / 80GB", timer=no_timer)
    assert again.choose("fwd|k", cands, lambda c: None, cands[0]).name == "b"
    other_device = autotune.Autotuner("Another GPU", timer=timer)
    assert other_device.lookup("fwd|k") is None


def test_autotune_off_uses_the_heuristic(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SPARSIFY_AUTOTUNE", "0")
    cands = [_Cand(name="a"), _Cand(name="b")]
    tuner = autotune.Autotuner("gpu", timer=lambda fn: pytest.fail("timed with SPARSIFY_AUTOTUNE=0"))
    assert tuner.choose("k", cands, lambda c: None, cands[1]).name == "b"
    assert not tuner.path.exists()


def test_unreadable_autotune_file_is_ignored_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    tuner = autotune.Autotuner("gpu", timer=lambda fn: 1.0)
    tuner.path.parent.mkdir(parents=True)
    tuner.path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring the autotuning file"):
        assert tuner.lookup("k") is None


@given(st.integers(1, 1 << 20))
def test_m_bucket_is_a_power_of_two_at_least_m(m):
    b = autotune.m_bucket(m)
    assert b & (b - 1) == 0 and (b >= m or b == 16384) and (b == 1 or b // 2 < m)


# ------------------------------------------------------------- launch ABI
def _param_kinds(macro: str) -> list[str]:
    text = (Path(compiler.SRC_DIR) / "bsmm.cuh").read_text()
    body = re.search(rf"#define {macro}\s*\\\n(.*?)\n\n", text, re.S).group(1).replace("\\", " ")
    return ["ptr" if "*" in p else "int" for p in body.split(",")]


class _Recorder:
    def __init__(self):
        self.calls = []

    def launch(self, spec, grid, args):
        self.calls.append((spec, grid, args))

    def empty(self, *shape, dtype):  # the runtime allocates outputs and workspaces (KernelRuntime.empty)
        return torch.empty(*shape, dtype=dtype)


def _fake_executor():
    from sparsify.runtime.cuda.executor import CUDAExecutor

    ex = object.__new__(CUDAExecutor)
    ex.runtime = _Recorder()
    ex.sm_count = 132
    return ex


def _check_args(args, kinds):
    assert len(args) == len(kinds), "argument count differs from the kernel's parameter list"
    for a, kind in zip(args, kinds):
        assert isinstance(a, np.uint64 if kind == "ptr" else np.int32), (a, kind)


@pytest.mark.parametrize("op", ["fwd", "dx"])
@pytest.mark.parametrize("kind", ["tiled", "small"])
def test_dsd_launch_passes_the_kernel_parameter_list(op, kind):
    from sparsify.runtime.layout import BlockSparseLayout

    spec = next(k for k in kernels.program_for("f16", 32).kernels if k.op == op and k.kind == kind)
    layout = BlockSparseLayout.from_block_mask(torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool),
                                               shape=(60, 90), block_size=32)
    meta = SimpleNamespace(**layout.metadata())
    ex = _fake_executor()
    x = torch.zeros(100, 90, dtype=torch.float16)
    values = torch.zeros(layout.nnz, 32, 32, dtype=torch.float16)
    y = torch.empty(100, 60, dtype=torch.float16)
    bias = torch.zeros(60, dtype=torch.float32)
    ex._dsd(spec, x, values, meta.row_offsets, meta.col_indices, None, meta.row_offsets[:-1], bias, None,
            y, 100, 90, 60, "gelu", torch.float16)
    _, grid, args = ex.runtime.calls[0]
    _check_args(args, _param_kinds("SPARSIFY_DSD_PARAMS"))
    assert args[4] == 0 and args[7] == 0, "absent ids / residual are null pointers"
    assert args[14] == kernels.ACT_CODES["gelu"] and args[15] == kernels.DTYPE_CODES[torch.float32]
    assert args[18] == 2, "x rows of 90 halves are not 16-byte multiples; values are"
    rows = kernels.SMALL_ROWS if kind == "small" else spec.config.bm
    assert grid[0] * grid[1] == 2 * -(-100 // rows)
    if HAVE_CUDA_PYTHON:
        from cuda.core._kernel_arg_handler import ParamHolder

        assert ParamHolder(args).ptr != 0


@pytest.mark.parametrize("m,nnz,splits", [(4096, 4, 8), (4096, 1000, 1), (40, 4, 1)])
def test_dw_launch_passes_the_kernel_parameter_list_and_splits_m(m, nnz, splits):
    spec = kernels.program_for("bf16", 16).kernels[-2]
    assert spec.op == "dw"
    ex = _fake_executor()
    meta = SimpleNamespace(row_indices=torch.zeros(nnz, dtype=torch.int32), col_indices=torch.zeros(nnz, dtype=torch.int32))
    dy = torch.zeros(m, 16, dtype=torch.bfloat16)
    x = torch.zeros(m, 16, dtype=torch.bfloat16)
    out = torch.empty(nnz, 16, 16, dtype=torch.bfloat16)
    ex._dw(spec, dy, x, meta, out, m, 16, 16, nnz)
    _, grid, args = ex.runtime.calls[0]
    _check_args(args, _param_kinds("SPARSIFY_DW_PARAMS"))
    assert grid == (nnz, splits, 1)
    rows_per_split = int(args[10])
    assert rows_per_split % spec.config.bkm == 0 and rows_per_split * splits >= m
    assert (args[5] != 0) == (splits > 1), "a workspace exactly when M is split"


# ------------------------------------------------------------ no driver
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_no_driver_falls_back_to_the_reference_with_one_warning(monkeypatch):
    from sparsify.runtime import executors
    from sparsify.runtime.cuda import cuda_executor_factory

    monkeypatch.setattr(executors, "_WARNED", set())
    monkeypatch.setattr(executors, "_CACHE", {})
    executors.register_executor("cuda", cuda_executor_factory)
    with pytest.warns(RuntimeWarning, match="reference") as caught:
        ex = executors.executor_for(torch.device("cuda", 0))
        again = executors.executor_for(torch.device("cuda", 1))
    assert ex is again and ex.name == "cpu"
    assert len([w for w in caught if "reference" in str(w.message)]) == 1
    assert "CUDA" in str(caught[0].message) or "cuda" in str(caught[0].message)


def test_import_never_needs_cuda_python(tmp_path):
    script = textwrap.dedent("""
        import sys, warnings
        for name in ("cuda", "cuda.core", "cuda.bindings", "cuda.pathfinder"):
            sys.modules[name] = None  # makes every import of them fail
        import torch
        import sparsify
        from sparsify.runtime import executors
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ex = executors.executor_for(torch.device("cuda", 0))
        assert ex.name == "cpu", ex
        assert len(w) == 1 and "reference" in str(w[0].message), [str(x.message) for x in w]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_emulator_builds_elsewhere_when_the_cache_is_not_private(tmp_path, monkeypatch):
    # its libraries are loaded with ctypes: a planted one must never be, so a shared cache is not used
    from sparsify.runtime.emulator import builder

    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)  # anyone may replace what is in it (no sticky bit)
    shared = parent / "cache"
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(shared))
    monkeypatch.setattr(builder, "_PRIVATE_FALLBACK", [])
    with pytest.warns(RuntimeWarning, match="not using the kernel cache"):
        d = builder.cache_dir()
    assert shared not in d.parents and (d.stat().st_mode & 0o777) == 0o700
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path / "private"))
    assert builder.cache_dir() == tmp_path / "private" / "emulator"
    assert ((tmp_path / "private" / "emulator").stat().st_mode & 0o777) == 0o700
    # a library whose file is writable by others is not a valid build, whatever its record says
    lib, rec = tmp_path / "private" / "emulator" / "x.so", tmp_path / "private" / "emulator" / "x.json"
    lib.write_bytes(b"\x7fELF")
    import hashlib

    rec.write_text(json.dumps({"sha256": hashlib.sha256(b"\x7fELF").hexdigest()}))
    assert builder._valid(lib, rec)
    os.chmod(lib, 0o666)
    assert not builder._valid(lib, rec)
