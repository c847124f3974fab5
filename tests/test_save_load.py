"""``sparsify.save`` / ``sparsify.load``: round trips, a fresh process, no pickle, atomic writes, SIGINT."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsify
from sparsify.errors import InputError
from tests.models import zoo

ROOT = Path(__file__).resolve().parent.parent


def _converted(factory=zoo.mlp, **kw):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*factory.input_shape) if isinstance(factory.input_shape[0], int) else None
    return model, sparsify.sparsify(model, example_inputs=(x,), **kw), x


def _rehash(art: Path, name: str) -> None:
    """What an attacker can do: edit a file and fix its checksum in the manifest."""
    m = json.loads((art / "manifest.json").read_text())
    entry = m["exported"] if name == "program.json" else m["weights"]
    data = (art / name).read_bytes()
    entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (art / "manifest.json").write_text(json.dumps(m))


def test_round_trip_exported_and_factory(tmp_path):
    cfg = sparsify.SparsifyConfig(density=0.5, rules=[sparsify.Rule("4", method="low_rank", tolerance=0.3)])
    model, conv, x = _converted(config=cfg)
    out = sparsify.save(conv, tmp_path / "m", example_inputs=(x,), config=cfg)
    y = conv(x)
    exported = sparsify.load(out)
    assert torch.equal(exported(x), y)
    assert exported(torch.randn(9, 128)).shape == (9, 128)  # the batch dimension is dynamic
    rebuilt = sparsify.load(out, factory=zoo.mlp)  # a fresh random model: all weights come from the file
    assert torch.equal(rebuilt(x), y)
    assert torch.allclose(sparsify.densify(rebuilt)(x), y, atol=1e-5)
    rows = sparsify.report(rebuilt).rows
    assert [r["method"] for r in rows] == ["block_sparse", "block_sparse", "low_rank"]
    assert rows[2]["reason"].startswith("low_rank by rule")  # the original decisions, not the replay's


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = zoo.tied().eval()
    ids = torch.randint(0, 200, (2, 6))
    conv = sparsify.sparsify(model, example_inputs=(ids,))
    out = sparsify.save(conv, tmp_path / "t", example_inputs=(ids,))
    m = json.loads((out / "manifest.json").read_text())
    assert m["weights"]["aliases"] == {"head.weight": "emb.weight"}
    back = sparsify.load(out, factory=zoo.tied)
    assert back.head.weight is back.emb.weight
    assert torch.equal(back(ids), conv(ids)) and torch.equal(sparsify.load(out)(ids), conv(ids))


def test_load_never_unpickles(tmp_path, monkeypatch):
    model, conv, x = _converted()
    out = sparsify.save(conv, tmp_path / "m", example_inputs=(x,))

    def refuse(*a, **k):
        raise AssertionError("load unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch._C, "_pickle_load_obj", refuse, raising=False)
    assert torch.equal(sparsify.load(out)(x), conv(x))
    assert torch.equal(sparsify.load(out, factory=zoo.mlp)(x), conv(x))


@pytest.mark.parametrize("attack,match", [
    (lambda d: d.update(guards_code=["__import__('os').system('touch PWNED')"]), "guards_code"),
    (lambda d: d["graph_module"]["graph"]["nodes"][0].update(target="torch.load"), "torch.load"),
    (lambda d: d["graph_module"]["graph"]["nodes"][0].update(target="builtins.eval"), "builtins.eval"),
    (lambda d: next(v for v in d["graph_module"]["graph"]["tensor_values"].values()
                    if "as_expr" in json.dumps(v["sizes"]))["sizes"][0]["as_expr"].update(
        expr_str="__import__('os').system('touch PWNED')"), "shape expression"),
    (lambda d: d["graph_module"]["graph"]["nodes"][0].update(name="x; import os"), "name"),
])
def test_a_tampered_program_is_rejected_before_torch_sees_it(tmp_path, monkeypatch, attack, match):
    model, conv, x = _converted()
    out = sparsify.save(conv, tmp_path / "m", example_inputs=(x,))
    doc = json.loads((out / "program.json").read_text())
    attack(doc)
    (out / "program.json").write_text(json.dumps(doc))
    _rehash(out, "program.json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=match):
        sparsify.load(out)
    assert not (tmp_path / "PWNED").exists()


def test_the_recorded_factory_is_not_run_without_being_asked(tmp_path):
    model, conv, x = _converted()
    out = sparsify.save(conv, tmp_path / "m", model_spec={"kind": "factory", "target": "os:system"})
    with pytest.raises(InputError, match="no exported program.*if you trust this artifact"):
        sparsify.load(out)


def test_a_crash_while_saving_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model, conv, x = _converted()

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        sparsify.save(conv, tmp_path / "m", example_inputs=(x,))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    model, conv, x = _converted()
    out = sparsify.save(conv, tmp_path / "m")
    with pytest.raises(InputError, match="exists"):
        sparsify.save(conv, out)
    sparsify.save(conv, out, overwrite=True, example_inputs=(x,))
    assert (out / "program.json").exists()


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def test_load_in_a_fresh_process_gives_equal_outputs(tmp_path):
    from safetensors.torch import save_file

    model, conv, x = _converted(zoo.transformer_block)
    out = sparsify.save(conv, tmp_path / "tb", example_inputs=(x,))
    save_file({"x": x, "y": conv(x).detach()}, str(tmp_path / "io.safetensors"))
    code = (
        "import sys, torch, sparsify\n"
        "from safetensors.torch import load_file\n"
        f"d = load_file({str(tmp_path / 'io.safetensors')!r})\n"
        f"for m in (sparsify.load({str(out)!r}), sparsify.load({str(out)!r}, factory='tests/models/zoo.py:transformer_block')):\n"
        "    assert torch.equal(m(d['x']), d['y']), (m(d['x']) - d['y']).abs().max()\n"
        "print('ok')\n"
    )
    r = _run(["-c", code], timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _interrupt(args, out: Path, when) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "sparsify", *args], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not when() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def test_sigint_while_building_the_model(tmp_path):
    out = tmp_path / "o"
    ready = tmp_path.parent / f"{tmp_path.name}.ready"
    r = _interrupt(["convert", "tests/models/zoo.py:slow_mlp", "-o", str(out),
                    "--factory-args", json.dumps({"ready": str(ready)})], out, ready.exists)
    assert r.returncode == 130, r.stderr
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigint_while_writing_the_artifact(tmp_path):
    out = tmp_path / "o"
    r = _interrupt(["convert", "tests/models/zoo.py:transformer_block", "-o", str(out)], out,
                   lambda: any(p.name.startswith(".o.tmp-") for p in tmp_path.iterdir()))
    if r.returncode == 0:
        pytest.skip("the save finished before the signal arrived")
    assert r.returncode == 130, r.stderr
    assert list(tmp_path.iterdir()) == [], "OUT or temporary files left behind"


@pytest.mark.parametrize("method", sorted(set(sparsify.METHODS) - {"block_sparse"}))
def test_every_factorization_round_trips_through_both_load_paths(tmp_path, method):
    torch.manual_seed(0)
    model, x = zoo.cnn().eval(), torch.randn(*zoo.cnn.input_shape)
    conv = sparsify.sparsify(model, method=method, rank=4, min_size=1, example_inputs=(x,))
    out = sparsify.save(conv, tmp_path / "m", example_inputs=(x,))
    y = conv(x)
    assert torch.equal(sparsify.load(out, factory=zoo.cnn)(x), y)
    if json.loads((out / "manifest.json").read_text())["exported"]:
        assert torch.equal(sparsify.load(out)(x), y)
