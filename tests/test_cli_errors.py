"""Bad input: one line on stderr starting ``sparsify: error:``, exit code 2, no traceback, no OUT.

For any bad input listed in the CLI issue, and drawn variants of some of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsify.cli import main

ZOO = "tests/models/zoo.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def expect_bad(capsys, out: Path | None, *argv, match: str) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("sparsify: warning:")]
    assert len(lines) == 1 and lines[0].startswith("sparsify: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*")), "temporary files left behind"
    return lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "mlp"
    assert main(["convert", str(ROOT / ZOO) + ":mlp", "-o", str(out), "--density", "0.5"]) == 0
    return out


def _copy(artifact: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(artifact, dst)
    return dst


CASES = [
    # (argv after "convert MODEL -o OUT", MODEL, expected message part)
    ([], "tests/models/nope.py:mlp", "no such file"),
    ([], f"{ZOO}:nope", "has no attribute 'nope'"),
    ([], f"{ZOO}:bad_raises", "raised RuntimeError: the factory failed on purpose"),
    ([], f"{ZOO}:bad_not_module", "returned a list, expected a torch.nn.Module"),
    ([], "no_such_package.models:make", "no module named 'no_such_package'"),
    (["--factory-args", "{hidden: 3"], f"{ZOO}:mlp", "--factory-args"),
    (["--method", "magic"], f"{ZOO}:mlp", "unknown method 'magic'"),
    (["--density", "0"], f"{ZOO}:mlp", "--density"),
    (["--density", "1.5"], f"{ZOO}:mlp", "--density"),
    (["--block-size", "7"], f"{ZOO}:mlp", "--block-size"),
    (["--input-shape", "4,7"], f"{ZOO}:mlp", "does not fit"),
    (["--input-shape", "4,x"], f"{ZOO}:mlp", "comma-separated integers"),
    (["--config", "missing.toml"], f"{ZOO}:mlp", "no such file"),
    (["--weights", "missing.safetensors"], f"{ZOO}:mlp", "no such file"),
    (["--method", "block_sparse", "--rank", "4"], f"{ZOO}:mlp", "--rank: no method in use (block_sparse) takes rank"),
    (["--method", "low_rank", "--rank", "4", "--density", "0.1"], f"{ZOO}:mlp", "--density: no method in use"),
]


@pytest.mark.parametrize("extra,model,match", CASES, ids=[c[2][:30] for c in CASES])
def test_bad_convert_inputs(tmp_path, capsys, extra, model, match):
    out = tmp_path / "out"
    expect_bad(capsys, out, "convert", model, "-o", out, *extra, match=match)


def test_debug_shows_the_traceback(tmp_path, capsys):
    rc = main(["convert", f"{ZOO}:bad_raises", "-o", str(tmp_path / "o"), "--debug"])
    assert rc == 2 and "Traceback" in capsys.readouterr().err


def test_malformed_toml_and_unknown_keys_name_the_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("density = [0.5\n")
    expect_bad(capsys, tmp_path / "o", "convert", f"{ZOO}:mlp", "-o", tmp_path / "o", "--config", cfg,
               match=f"{cfg}: malformed TOML")
    cfg.write_text("densty = 0.5\n")
    line = expect_bad(capsys, tmp_path / "o", "convert", f"{ZOO}:mlp", "-o", tmp_path / "o", "--config", cfg,
                      match="unknown key 'densty'")
    assert str(cfg) in line
    cfg.write_text('[[rules]]\npattern = "0"\nskipp = true\n')
    expect_bad(capsys, tmp_path / "o", "convert", f"{ZOO}:mlp", "-o", tmp_path / "o", "--config", cfg,
               match="unknown key 'skipp' in [[rules]] #1")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(density=st.one_of(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
                         st.floats(min_value=1.0, exclude_min=True, allow_nan=False, allow_infinity=False)))
def test_any_density_outside_0_1_is_refused_before_work(tmp_path, capsys, density):
    out = tmp_path / "o"
    expect_bad(capsys, out, "convert", f"{ZOO}:bad_raises", "-o", out, f"--density={density!r}", match="--density")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True).filter(
    lambda k: k not in {"method", "rules", "min_size", "strict", "fold_batchnorm", "fuse_epilogues", "density",
                        "block_size", "rank", "tolerance", "compression", "pattern", "type", "skip"}
    and not k.startswith("n_")))
def test_any_unknown_toml_key_is_named(tmp_path, capsys, key):
    from sparsify.methods import PARAM_VALIDATORS

    if key in PARAM_VALIDATORS:  # a parameter another method registered
        return
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"{key} = 1\n")
    line = expect_bad(capsys, tmp_path / "o", "convert", f"{ZOO}:mlp", "-o", tmp_path / "o", "--config", cfg,
                      match=f"unknown key {key!r}")
    assert str(cfg) in line


def test_newer_format_version(tmp_path, capsys, artifact):
    art = _copy(artifact, tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    expect_bad(capsys, None, "verify", art, "--against", f"{ZOO}:mlp", match="format version 99")
    expect_bad(capsys, None, "inspect", art, match="Upgrade sparsify")


def test_corrupted_artifact_checksum_mismatch(tmp_path, capsys, artifact):
    art = _copy(artifact, tmp_path / "a")
    w = art / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    expect_bad(capsys, None, "verify", art, "--against", f"{ZOO}:mlp", match="checksum mismatch")
    out = tmp_path / "b"
    expect_bad(capsys, out, "bench", art, "--repeat", "1", match="checksum mismatch")


def test_truncated_safetensors(tmp_path, capsys, artifact):
    art = _copy(artifact, tmp_path / "a")
    w = art / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    expect_bad(capsys, None, "verify", art, "--against", f"{ZOO}:mlp", match="truncated")
    # a truncated --weights file (no manifest to compare against)
    out = tmp_path / "o"
    expect_bad(capsys, out, "convert", f"{ZOO}:mlp", "-o", out, "--weights", w,
               match="not a readable safetensors file")


def test_verify_against_a_different_model(tmp_path, capsys, artifact):
    expect_bad(capsys, None, "verify", artifact, "--against", f"{ZOO}:mlp", "--factory-args", '{"hidden": 128}',
               match="different")


def test_cuda_device_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    expect_bad(capsys, None, "bench", f"{ZOO}:mlp", "--device", "cuda", match="no CUDA device")


# --------------------------------------------------------------------------- issue 9 regressions
@pytest.mark.parametrize("toml,match", [
    ("block_size = 32.0\n", "block_size=32.0"),
    ("min_size = 100.0\n", "min_size=100.0"),
    ('strict = "false"\n', "strict='false'"),
    ('fold_batchnorm = "no"\n', "fold_batchnorm='no'"),
    ('[[rules]]\npattern = "0"\nskip = "no"\n', "skip='no'"),
    ("[[rules]]\npattern = 5\nskip = true\n", "pattern=5"),
    ('[[rules]]\ntype = 5\nskip = true\n', "type=5"),
    ('method = "tucker"\ncompression = inf\n', "compression=inf"),
    ("density = nan\n", "density=nan"),
    ('rules = {pattern = "0"}\n', "'rules' must be an array of tables"),
    ('strict = true\n[[rules]]\npattern = "0"\nskip = true\n[[rules]]\npattern = "0"\nskip = true\n', "shadowed"),
])
def test_config_values_have_their_types(tmp_path, capsys, toml, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    line = expect_bad(capsys, tmp_path / "o", "convert", f"{ZOO}:mlp", "-o", tmp_path / "o", "--config", cfg,
                      match=match)
    assert str(cfg) in line


@pytest.mark.parametrize("tol", ["nan", "-1", "inf"])
def test_verify_tolerance_must_be_finite_and_non_negative(capsys, artifact, tol):
    expect_bad(capsys, None, "verify", artifact, "--against", f"{ZOO}:mlp", f"--tol={tol}", match="--tol")


def test_verify_does_not_trust_the_manifests_input_shape(tmp_path, capsys, artifact):
    art = _copy(artifact, tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    m["inputs"] = [{"shape": [2**20, 2**20], "dtype": "float32"}]
    (art / "manifest.json").write_text(json.dumps(m))
    expect_bad(capsys, None, "verify", art, "--against", f"{ZOO}:mlp", match="too large")
    expect_bad(capsys, None, "bench", art, "--repeat", "1", match="too large")


def test_a_folder_or_fifo_given_as_a_file_is_said_as_such(tmp_path, capsys):
    import os

    fifo = tmp_path / "f.toml"
    os.mkfifo(fifo)  # reading it would block: refused by its type, before any open
    out = tmp_path / "o"
    for flag in ("--config", "--weights"):
        expect_bad(capsys, out, "convert", f"{ZOO}:mlp", "-o", out, flag, tmp_path, match="is a folder, not a file")
        expect_bad(capsys, out, "convert", f"{ZOO}:mlp", "-o", out, flag, fifo, match="is not a regular file")


def test_batch_is_held_to_the_input_size_limit(capsys, artifact):
    expect_bad(capsys, None, "bench", artifact, "--input-shape", "2,128", "--batch", str(2**30), "--repeat", "1",
               match="--batch 1073741824: the input would be 1073741824,128")


def test_max_shard_size_without_streaming_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    expect_bad(capsys, out, "convert", f"{ZOO}:mlp", "-o", out, "--max-shard-size", "-5",
               match="--max-shard-size -5: shards are written by streaming conversion only")


def test_inspect_shows_a_recorded_input_without_its_dtype(tmp_path, capsys, artifact):
    art = _copy(artifact, tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    m["inputs"] = [{"shape": [2, 128]}]  # the schema's dtype is optional (float32)
    (art / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(art)]) == 0
    assert "[2, 128]:float32" in capsys.readouterr().out


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["weights"].update(file=5), "field weights.file"),
    (lambda m: m.pop("weights"), "field weights: missing"),
    (lambda m: m.update(plan=[1]), "field plan"),
    (lambda m: m["plan"]["decisions"][0].pop("params_before"), "params_before: missing"),
    # what the report formats as numbers (it crashed with "Unknown format code 'g' for object of type 'str'")
    (lambda m: m["plan"]["decisions"][0]["result"].update(density="abc"), "result.density: expected a finite number"),
    (lambda m: m["plan"]["decisions"][0]["params"].update(density=[1, 2]), "params.density: expected a finite number"),
    (lambda m: m["plan"]["decisions"][0]["result"].update(output_error={}), "result.output_error: expected"),
])
def test_bad_manifests_are_one_line_for_every_command(tmp_path, capsys, artifact, edit, match):
    art = _copy(artifact, tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))
    for argv in (["inspect", art], ["verify", art, "--against", f"{ZOO}:mlp"], ["bench", art, "--repeat", "1"]):
        expect_bad(capsys, None, *argv, match=match)


def test_a_non_finite_measure_saved_as_a_string_still_loads_and_shows(tmp_path, capsys, artifact):
    # JSON has no inf: sparsify saves one as "inf" (a layer whose output is all zero on the data)
    art = _copy(artifact, tmp_path / "a")
    m = json.loads((art / "manifest.json").read_text())
    m["plan"]["decisions"][0]["result"]["output_error"] = "inf"
    m["plan"]["decisions"][0]["result"]["density"] = None  # as an empty result reads: shown as '?'
    (art / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(art)]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith(m["plan"]["decisions"][0]["name"] + " "))
    assert "density=? " in row and "inf" in row.split()


def test_bench_json_never_clobbers_an_input_or_a_users_file(tmp_path, capsys, artifact):
    src = tmp_path / "m.py"
    src.write_text((ROOT / ZOO).read_text())
    before = src.read_text()
    expect_bad(capsys, None, "bench", f"{src}:mlp", "--repeat", "1", "--json", src, "--force",
               match="never overwrites its input")
    art = _copy(artifact, tmp_path / "a")
    manifest = (art / "manifest.json").read_text()
    expect_bad(capsys, None, "bench", art, "--repeat", "1", "--json", art / "manifest.json", "--force",
               match="never overwrites its input")
    expect_bad(capsys, None, "bench", art, "--repeat", "1", "--json", art / "new.json", match="inside the input")
    assert src.read_text() == before and (art / "manifest.json").read_text() == manifest
    mine = tmp_path / "results.json"
    mine.write_text('{"mine": true}')
    expect_bad(capsys, None, "bench", f"{ZOO}:mlp", "--repeat", "1", "--json", mine, match="exists; pass --force")
    expect_bad(capsys, None, "bench", f"{ZOO}:mlp", "--repeat", "1", "--json", mine, "--force",
               match="not written by sparsify")
    assert mine.read_text() == '{"mine": true}'
    ours = tmp_path / "bench.json"
    assert main(["bench", f"{ZOO}:mlp", "--repeat", "1", "--warmup", "0", "--json", str(ours)]) == 0
    assert main(["bench", f"{ZOO}:mlp", "--repeat", "2", "--warmup", "0", "--json", str(ours), "--force"]) == 0
    assert json.loads(ours.read_text())["repeat"] == 2


def test_report_needs_force_and_force_replaces_only_our_reports(tmp_path, capsys):
    mine = tmp_path / "r.html"
    mine.write_text("<p>my notes</p>")
    out = tmp_path / "o"
    expect_bad(capsys, out, "convert", f"{ZOO}:mlp", "-o", out, "--report", mine, match="exists; pass --force")
    expect_bad(capsys, out, "convert", f"{ZOO}:mlp", "-o", out, "--report", mine, "--force",
               match="not written by sparsify")
    assert mine.read_text() == "<p>my notes</p>"
    ours = tmp_path / "ours.md"
    assert main(["convert", f"{ZOO}:mlp", "-o", str(out), "--no-export", "--report", str(ours)]) == 0
    first = ours.read_text()
    assert main(["convert", f"{ZOO}:mlp", "-o", str(out), "--no-export", "--density", "0.5", "--report", str(ours),
                 "--force"]) == 0
    assert ours.read_text() != first and "density=0.5" in ours.read_text()


def test_a_full_disk_is_found_before_the_conversion(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "o"
    expect_bad(capsys, out, "convert", f"{ZOO}:slow_mlp", "-o", out, "--factory-args", '{"seconds": 0}',
               match="MiB free")
    assert capsys.readouterr().out == ""  # no report printed: nothing was converted


def test_created_files_respect_the_umask(tmp_path, capsys):
    import os

    old = os.umask(0o077)
    try:
        assert main(["convert", f"{ZOO}:mlp", "-o", str(tmp_path / "o"), "--no-export",
                     "--report", str(tmp_path / "r.html")]) == 0
    finally:
        os.umask(old)
    for f in [tmp_path / "o", tmp_path / "r.html", *(tmp_path / "o").iterdir()]:
        assert (f.stat().st_mode & 0o077) == 0, f


def test_the_bsmm_benchmark_never_overwrites_a_file(tmp_path, capsys):
    from sparsify import bench

    mine = tmp_path / "bsmm_cpu.json"
    mine.write_text('{"mine": true}')
    for extra in ([], ["--force"]):  # --force replaces only a result of this benchmark
        with pytest.raises(SystemExit) as exc:
            bench.main(["bsmm", "--quick", "--out", str(mine), *extra])
        assert exc.value.code == 2
    assert mine.read_text() == '{"mine": true}'
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("name, value, match", [
    ("SPARSIFY_CPU_PATH", "bogus", "SPARSIFY_CPU_PATH='bogus': expected one of dense, bsr, gather"),
    ("SPARSIFY_DISABLE_CACHE", "2", "SPARSIFY_DISABLE_CACHE='2': expected 1 or 0"),
    ("SPARSIFY_AUTOTUNE", "O", "SPARSIFY_AUTOTUNE='O': expected 1 or 0"),
    ("SPARSIFY_EMULATE_CUDA", "y", "SPARSIFY_EMULATE_CUDA='y': expected 1 or 0"),
    ("SPARSIFY_DIST_TIMEOUT", "soon", "SPARSIFY_DIST_TIMEOUT='soon': expected a number of seconds > 0"),
    ("SPARSIFY_DIST_TIMEOUT", "nan", "SPARSIFY_DIST_TIMEOUT='nan'"),
    ("WORLD_SIZE", "two", "WORLD_SIZE='two': expected an integer >= 1"),
    ("RANK", "-1", "RANK='-1': expected an integer >= 0"),
])
def test_a_bad_environment_variable_is_named_before_any_work(tmp_path, capsys, monkeypatch, name, value, match):
    # each was ignored silently, failed after the conversion as "an internal error in layer '0'", or
    # crashed with an anonymous int() / float() error
    import sparsify

    monkeypatch.setenv(name, value)
    out = tmp_path / "o"
    expect_bad(capsys, out, "convert", f"{ZOO}:mlp", "-o", out, match=match)
    with pytest.raises(ValueError, match=match.split(":")[0]):
        sparsify.sparsify(torch.nn.Linear(4, 4))


def test_doctor_refuses_an_arch_nvrtc_does_not_compile_for(capsys):
    pytest.importorskip("cuda.bindings")
    rc = main(["doctor", "--compile-all", "--arch", "sm_81"])
    err = capsys.readouterr().err
    assert rc == 2 and "--arch 'sm_81'" in err and "FAILED" not in err
