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


def test_help_and_version(capsys):
    assert run(capsys, "--help")[0] == 0
    rc, o, _ = run(capsys, "--version")
    assert rc == 0 and o.startswith("sparsify ")
    rc, _, e = run(capsys, "frobnicate")
    assert rc == 2 and e.startswith("sparsify: error:") and len(e.strip().splitlines()) == 1
