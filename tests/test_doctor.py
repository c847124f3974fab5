"""`sparsify doctor` reports what it finds and fails loudly on anything that would break kernels."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sparsify.runtime import doctor
from sparsify.runtime.cuda import compiler, kernels

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install -e '.[cuda]')")

# NVRTC compiles are shared through the in-process memo: keep these tests on one xdist worker.
pytestmark = pytest.mark.xdist_group("nvrtc")


def test_reports_the_environment(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    major, minor = compiler.nvrtc_version()
    assert f"NVRTC              {major}.{minor}" in out
    assert "cuda_fp16.h: found" in out and "cuda_bf16.h: found" in out
    assert str(tmp_path) in out
    assert "device" in out


def test_compile_all_builds_every_kernel(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))  # (the in-process memo still serves earlier compiles)
    assert doctor.main(["--compile-all", "--arch", "sm_80", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    for p in kernels.programs():
        for k in p.kernels:
            assert k.name in out
    assert "all good" in out and "FAIL" not in out


def _fake_program(spills: int):
    def compile_program(spec, arch, target="cubin", cache=None):
        res = {k.name: compiler.KernelResources(64, spills, spills, 0, 1024) for k in spec.kernels}
        return compiler.CompiledProgram(spec.name, arch, target, b"\x7fELF", "", res, "key")

    return compile_program


def test_spills_fail_the_check(capsys, monkeypatch):
    monkeypatch.setattr(compiler, "compile_program", _fake_program(spills=8))
    assert doctor.main(["--compile-all", "--arch", "sm_80"]) == 1
    assert "<-- FAIL" in capsys.readouterr().out


def test_compile_errors_fail_the_check_and_show_the_log(capsys, monkeypatch):
    def broken(spec, arch, target="cubin", cache=None):
        raise compiler.KernelCompileError(spec.name, arch, "error: something is wrong", {"arch": arch}, "int x;")

    monkeypatch.setattr(compiler, "compile_program", broken)
    assert doctor.main(["--compile-all", "--arch", "sm_90"]) == 1
    out = capsys.readouterr().out
    assert "FAILED (KernelCompileError)" in out and "something is wrong" in out


def test_missing_nvrtc_is_reported_and_fails(capsys, monkeypatch):
    def missing():
        raise compiler.CUDAUnavailableError("libnvrtc not found")

    monkeypatch.setattr(compiler, "nvrtc_version", missing)
    assert doctor.main(["--compile-all"]) == 1
    assert "MISSING: libnvrtc not found" in capsys.readouterr().out


def test_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "sparsify.runtime.doctor"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "NVRTC" in out.stdout


def test_help_and_usage_errors_from_the_sparsify_command(capsys):
    from sparsify.cli import main

    assert main(["doctor", "--help"]) == 0
    assert "--compile-all" in capsys.readouterr().out
    assert main(["doctor", "--no-such-option"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsify doctor: error:")


def test_compile_all_reaches_the_doctor_from_the_sparsify_command(capsys, monkeypatch):
    from sparsify.cli import main

    monkeypatch.setattr(compiler, "compile_program", _fake_program(spills=0))
    assert main(["--debug", "doctor", "--compile-all", "--arch", "sm_90"]) == 0
    assert "all good" in capsys.readouterr().out
