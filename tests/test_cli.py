"""The ``sparsify`` command end to end, in-process (``sparsify.cli.main`` returns the exit code).

Models come from ``tests/models/zoo.py``; the Hugging Face case builds a tiny
BERT from ``tests/models/hf_tiny_bert/config.json`` when transformers is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sparsify.cli import main

ZOO = "tests/models/zoo.py"
HF_CONFIG = "tests/models/hf_tiny_bert/config.json"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # MODEL strings are relative to the repository


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_mlp_convert_inspect_verify_bench(tmp_path, capsys):
    out = tmp_path / "mlp.sparsify"
    rc, o, e = run(capsys, "convert", f"{ZOO}:mlp", "-o", out, "--density", "0.5", "--block-size", "32")
    assert rc == 0, e
    assert "block_sparse" in o and "total" in o and f"wrote {out}" in o
    assert sorted(os.listdir(out)) == ["manifest.json", "program.json", "weights.safetensors"]

    rc, o, e = run(capsys, "inspect", f"{ZOO}:mlp")
    assert rc == 0, e
    assert "would do" in o and "4x128" in o and "3 of 3 candidate layers" in o

    rc, o, e = run(capsys, "inspect", out)
    assert rc == 0, e
    assert "stored program: yes" in o and "density=0.5" in o

    rc, o, e = run(capsys, "verify", out, "--against", f"{ZOO}:mlp")
    assert rc == 0, e
    assert "equals its dense reference: yes" in o
    assert "stored program vs rebuilt model" in o and "(equal)" in o

    bench_json = tmp_path / "bench.json"
    rc, o, e = run(capsys, "bench", out, "--factory", f"{ZOO}:mlp", "--repeat", "3", "--warmup", "1",
                   "--batch", "8", "--json", bench_json)
    assert rc == 0, e
    doc = json.loads(bench_json.read_text())
    assert set(doc["results"]) == {"dense", "converted"} and len(doc["results"]["dense"]["times_ms"]) == 3
    assert doc["inputs"] == [{"shape": [8, 128], "dtype": "float32"}]


def test_cnn_and_transformer_block_with_a_toml_config_and_reports(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('method = "block_sparse"\ndensity = 0.5\nblock_size = 32\n\n'
                   '[[rules]]\npattern = "fc2"\nmethod = "low_rank"\nrank = 16\n\n'
                   '[[rules]]\npattern = "proj"\nskip = true\n')
    out = tmp_path / "tb"
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    rc, o, e = run(capsys, "convert", f"{ZOO}:transformer_block", "-o", out, "--config", cfg, "--report", html)
    assert rc == 0, e
    assert "low_rank" in o and "skipped by" in o
    text = html.read_text()
    assert "<table>" in text and "fc1" in text
    assert text.count("data:image/png;base64,") == 3  # qkv and fc1 layouts + the bar chart
    rc, o, e = run(capsys, "verify", out, "--against", f"{ZOO}:transformer_block")
    assert rc == 0, e

    out2 = tmp_path / "cnn"
    rc, o, e = run(capsys, "convert", f"{ZOO}:cnn", "-o", out2, "--report", md)
    assert rc == 0, e
    assert "conv1" in o and "Conv2d" in o
    assert "![block layout of fc1" in md.read_text()
    assert (tmp_path / "r_files" / "layout_fc1.png").read_bytes()[:4] == b"\x89PNG"
    rc, o, e = run(capsys, "verify", out2, "--against", f"{ZOO}:cnn")
    assert rc == 0, e


def test_report_without_matplotlib_says_how_to_get_pictures(tmp_path, capsys, monkeypatch):
    import sparsify.html_report as hr

    monkeypatch.setattr(hr, "_figure", lambda: None)
    rc, o, e = run(capsys, "convert", f"{ZOO}:mlp", "-o", tmp_path / "o", "--no-export",
                   "--report", tmp_path / "r.html")
    assert rc == 0, e
    assert "pip install &#x27;sparsify[report]&#x27;" in (tmp_path / "r.html").read_text()
    assert "no program" in o


def test_hugging_face_model_from_config(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "bert"
    rc, o, e = run(capsys, "convert", HF_CONFIG, "--hf", "-o", out, "--density", "0.5")
    assert rc == 0, e
    assert "encoder.layer.0.attention.self.query" in o
    rc, o, e = run(capsys, "verify", out, "--against", HF_CONFIG, "--hf")
    assert rc == 0, e
    assert "last_hidden_state" in o and "pooler_output" in o


def test_hf_without_the_flag_is_a_clear_error(tmp_path, capsys):
    rc, o, e = run(capsys, "convert", HF_CONFIG, "-o", tmp_path / "o")
    assert rc == 2 and "add --hf" in e


def test_force_replaces_an_artifact_but_never_other_files(tmp_path, capsys):
    out = tmp_path / "o"
    assert run(capsys, "convert", f"{ZOO}:mlp", "-o", out, "--no-export")[0] == 0
    before = (out / "manifest.json").read_text()
    rc, _, e = run(capsys, "convert", f"{ZOO}:mlp", "-o", out, "--no-export")
    assert rc == 2 and "exists; pass --force" in e
    rc, _, e = run(capsys, "convert", f"{ZOO}:mlp", "-o", out, "--density", "0.5", "--force")
    assert rc == 0, e
    assert (out / "manifest.json").read_text() != before and (out / "program.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp or backup folders left

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    rc, _, e = run(capsys, "convert", f"{ZOO}:mlp", "-o", precious, "--force")
    assert rc == 2 and "not a sparsify artifact" in e
    assert (precious / "notes.txt").read_text() == "keep me"


def test_force_keeps_a_folder_named_like_a_report_picture(tmp_path, capsys):
    md = tmp_path / "r.md"
    assert run(capsys, "convert", f"{ZOO}:mlp", "-o", tmp_path / "a", "--no-export", "--report", md)[0] == 0
    pics = tmp_path / "r_files"
    (pics / "holiday.png").mkdir()
    (pics / "holiday.png" / "photo1.jpg").write_bytes(b"jpeg")
    rc, _, e = run(capsys, "convert", f"{ZOO}:mlp", "-o", tmp_path / "b", "--no-export", "--report", md, "--force")
    assert rc == 2 and "did not write" in e
    assert (pics / "holiday.png" / "photo1.jpg").read_bytes() == b"jpeg"
    assert not (tmp_path / "b").exists()


def test_output_equal_to_an_input_is_refused(tmp_path, capsys):
    src = tmp_path / "m.py"
    src.write_text((ROOT / ZOO).read_text())
    for out in (src, tmp_path):
        rc, _, e = run(capsys, "convert", f"{src}:mlp", "-o", out, "--force")
        assert rc == 2 and "never overwrites its input" in e
    assert src.read_text() == (ROOT / ZOO).read_text()


def test_doctor_runs(capsys):
    rc, o, e = run(capsys, "doctor")
    assert rc == 0, e
    assert o.strip()


@pytest.mark.parametrize("argv", [("doctor", "--debug"), ("--debug", "doctor")])
def test_doctor_takes_debug_before_or_after_its_name(capsys, monkeypatch, argv):
    rc, o, e = run(capsys, *argv)
    assert rc == 0 and o.strip() and "unrecognized" not in e, e

    from sparsify.runtime import doctor

    def broken(argv, prog):
        raise RuntimeError("doctor broke")

    monkeypatch.setattr(doctor, "main", broken)
    rc, _, e = run(capsys, *argv)
    assert rc == 1 and "Traceback" in e and "doctor broke" in e, e  # --debug reached main(): a traceback
    rc, _, e = run(capsys, "doctor")
    assert rc == 1 and "Traceback" not in e and len(e.strip().splitlines()) == 1, e


def test_help_and_version(capsys):
    assert run(capsys, "--help")[0] == 0
    rc, o, _ = run(capsys, "--version")
    assert rc == 0 and o.startswith("sparsify ")
    rc, _, e = run(capsys, "frobnicate")
    assert rc == 2 and e.startswith("sparsify: error:") and len(e.strip().splitlines()) == 1


# ------------------------------------------------------------- the console script, as a user runs it
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

SCRIPT = shutil.which("sparsify")
needs_script = pytest.mark.skipif(SCRIPT is None, reason="the sparsify console script is not installed "
                                                         "(pip install -e .)")


def _env(cwd: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(cwd), SPARSIFY_NO_TTY="1")


def _readme_commands() -> list[str]:
    """Every ``sparsify ...`` line of the README's command-line block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line and saved models", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip().startswith("sparsify ")]


#: The README's placeholders, made real in a scratch folder (a new placeholder fails the test until added here).
SUBSTITUTE = {"my_pkg.models:resnet": "tests.models.zoo:cnn", "8,3,224,224": "2,3,16,16", "--batch 64": "--batch 8"}


def _workspace(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    (tmp_path / "tests").symlink_to(ROOT / "tests")
    (tmp_path / "cfg.toml").write_text('density = 0.5\n[[rules]]\npattern = "fc2"\nskip = true\n')
    bert = tmp_path / "bert"
    bert.mkdir()
    shutil.copy(ROOT / HF_CONFIG, bert / "config.json")
    import transformers

    cfg = json.loads((bert / "config.json").read_text())
    model = transformers.BertModel(transformers.AutoConfig.for_model(**cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bert / "model.safetensors"))
    return tmp_path


@needs_script
def test_every_readme_command_runs_through_the_console_script(tmp_path):
    pytest.importorskip("transformers")
    cmds = _readme_commands()
    assert len(cmds) >= 6 and any(c.startswith("sparsify doctor") for c in cmds)
    ws = _workspace(tmp_path)
    for cmd in cmds:
        for a, b in SUBSTITUTE.items():
            cmd = cmd.replace(a, b)
        argv = shlex.split(cmd)
        r = subprocess.run([SCRIPT, *argv[1:]], cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert (ws / "mlp.sparsify" / "manifest.json").is_file() and (ws / "report.html").is_file()
    assert json.loads((ws / "bench.json").read_text())["inputs"][0]["shape"][0] == 8


@needs_script
def test_doctor_options_reach_the_doctor_from_the_console_script(tmp_path):
    r = subprocess.run([SCRIPT, "doctor", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--compile-all" in r.stdout, r.stderr
    pytest.importorskip("cuda.core", reason="--compile-all needs cuda-python")
    # An arch NVRTC does not compile for is refused before any compile, naming it: proof that
    # --compile-all and --arch arrived (a full compile for sm_80 is tested in-process in test_doctor.py;
    # cold it takes minutes).
    r = subprocess.run([SCRIPT, "doctor", "--compile-all", "--arch", "sm_10", "--jobs", "2"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, SPARSIFY_CACHE_DIR=str(tmp_path)))
    assert r.returncode == 2 and "--arch 'sm_10'" in r.stderr and "kernels x" not in r.stdout, r.stderr[-2000:]
    assert "unrecognized arguments" not in r.stderr
    r = subprocess.run([SCRIPT, "doctor", "--bogus"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@needs_script
@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_startup_imports_is_one_line(tmp_path, sig, code, word):
    p = subprocess.Popen([SCRIPT, "convert", f"{ROOT / ZOO}:mlp", "-o", str(tmp_path / "o")], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The script may start through a shim (pyenv) that execs Python: wait until the process is Python
    # and its entry point has installed its handlers (SIGTERM caught), then signal at once, well inside
    # `import torch`, which takes seconds.
    status = Path(f"/proc/{p.pid}/status")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and p.poll() is None:
        try:
            caught = int(next(ln for ln in status.read_text().splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
        except (OSError, StopIteration):
            break
        if caught & (1 << (signal.SIGTERM - 1)) and "python" in Path(f"/proc/{p.pid}/exe").resolve().name:
            break
        time.sleep(0.002)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err.strip().splitlines() == [err.strip()] and word in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _interrupt_when(args, cwd: Path, ready, sig) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, "-m", "sparsify", *args], cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not ready() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(sig)
    out, err = p.communicate(timeout=90)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_saving_with_a_report_leaves_nothing_and_says_so(tmp_path, sig, code):
    work = tmp_path / "w"
    work.mkdir()
    r = _interrupt_when(["convert", f"{ROOT / ZOO}:transformer_block", "-o", str(work / "o"), "--report",
                         str(work / "r.html")], work,
                        lambda: any(p.name.startswith(".o.tmp-") for p in work.iterdir()), sig)
    if r.returncode == 0:
        pytest.skip("the save finished before the signal arrived")
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no output was written" in lines[0], r.stderr
    assert list(work.iterdir()) == [], "OUT, the report or temporary files left behind"
