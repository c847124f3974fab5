"""A fuzzer for saved artifacts and configs: whatever a file says, sparsify never runs code from it.

Hypothesis mutates one valid artifact (manifest values, types and keys; program nodes,
names, targets and shapes; tensor headers and bytes, with the checksums fixed up as an
attacker would; the kinds of the files) and valid configs.  For every mutation,
``load`` / ``inspect`` / ``verify`` / ``bench`` either succeed with correct results or
fail with exit 2 and one line; none runs code (the hostile strings would create a
marker file), and none takes longer than a time budget.

CI runs a few examples per strategy (the ``ci`` / ``dev`` profiles);
``HYPOTHESIS_PROFILE=thorough`` runs many more.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsify
from sparsify.cli import main
from sparsify.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
ZOO = f"{ROOT}/tests/models/zoo.py"
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
#: Seconds any one command may take on a mutated artifact of this size.
BUDGET = 30.0


def examples(n: int) -> int:
    return n * 20 if THOROUGH else n


FUZZ = dict(deadline=None, derandomize=not THOROUGH,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One valid artifact (converted by the CLI, so it records its factory and inputs) and its outputs."""
    d = tmp_path_factory.mktemp("fuzz")
    out = d / "art"
    args = ["convert", f"{ZOO}:mlp", "-o", str(out), "--density", "0.5", "--block-size", "32",
            "--factory-args", json.dumps({"hidden": 128}), "--input-shape", "2,128", "--no-progress"]
    assert main(args) == 0
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = sparsify.load(out)(x)
    return out, x, y


MARK = "FUZZ_PWNED"
CODE = [f"__import__('os').system('touch {MARK}')", "os:system", f"; touch {MARK}", "../../etc/passwd",
        f"$(touch {MARK})", "s=__import__('os')", "9**9**9**9", "u99999999999", "torch.load", "builtins.eval",
        "aten.from_file.default", "\x00", "𝕏" * 3]

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70), st.sampled_from([2**20, -1, 0, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(CODE), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["file", "shape", "dtype", "x", CODE[0]]), inner,
                                                 max_size=3)), max_leaves=6)


def _paths(o, prefix=()):
    """Every path into a JSON tree (lists by index, objects by key)."""
    yield prefix
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o[:6]):
            yield from _paths(v, prefix + (i,))


def _set(o, path, value):
    for p in path[:-1]:
        o = o[p]
    o[path[-1]] = value


def _delete(o, path):
    for p in path[:-1]:
        o = o[p]
    del o[path[-1]]


def _rehash(art: Path, name: str) -> None:
    m = json.loads((art / "manifest.json").read_text())
    entry = m.get("program") if name == "program.json" else m.get("weights")
    if isinstance(entry, dict):
        data = (art / name).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
        (art / "manifest.json").write_text(json.dumps(m))


def _copy(base_art: Path, tmp_path: Path) -> Path:
    dst = tmp_path / f"a{time.monotonic_ns()}"
    shutil.copytree(base_art, dst)
    return dst


def _check_outcome(art: Path, x, y, capsys, *, same_model: bool, full: bool) -> None:
    """load / inspect (and verify / bench when ``full``): success with correct results, or exit 2 and one line."""
    capsys.readouterr()
    t0 = time.monotonic()
    try:
        m = sparsify.load(art)
    except InputError:
        pass
    else:
        with torch.no_grad():
            if same_model:
                assert torch.equal(m(x), y)
            else:  # what a tampered file computes is its own business; it must not crash the process
                try:
                    m(x)
                except Exception:
                    pass
    assert time.monotonic() - t0 < BUDGET
    commands = [["inspect", str(art)]]
    if full:
        commands += [["verify", str(art), "--against", f"{ZOO}:mlp", "--factory-args", json.dumps({"hidden": 128})],
                     ["bench", str(art), "--repeat", "1", "--warmup", "0", "--no-progress"]]
    for argv in commands:
        t0 = time.monotonic()
        rc = main(argv)
        err = capsys.readouterr().err
        assert time.monotonic() - t0 < BUDGET, argv
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("sparsify: warning:")]
        assert rc in (0, 2, 3), (argv, rc, err)
        if rc == 2:
            assert len(lines) == 1 and lines[0].startswith("sparsify: error:"), err
        if rc == 3:  # verify: a mutated model differs from its original; never for an unchanged one
            assert not same_model and argv[0] == "verify", err
    assert not (Path.cwd() / MARK).exists() and not (art / MARK).exists()


@settings(max_examples=examples(12), **FUZZ)
@given(data=st.data())
def test_mutated_manifests(base, tmp_path, capsys, monkeypatch, data):
    art_base, x, y = base
    monkeypatch.chdir(tmp_path)
    art = _copy(art_base, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    paths = [p for p in _paths(m) if p]
    path = data.draw(st.sampled_from(paths), label="path")
    action = data.draw(st.sampled_from(["set", "delete", "deep"]), label="action")
    if action == "set":
        _set(m, path, data.draw(json_value, label="value"))
    elif action == "delete":
        _delete(m, path)
    else:
        _set(m, path, json.loads("[" * 200 + "]" * 200))  # deeper than the parser allows
    (art / "manifest.json").write_text(json.dumps(m))
    informational = path[0] in ("created", "sparsify_version", "torch_version", "layouts", "torch_threads",
                                "source_fingerprint", "program_note")
    _check_outcome(art, x, y, capsys, same_model=informational, full=data.draw(st.booleans(), label="full"))


def _program_mutation(doc: dict, data) -> None:
    kind = data.draw(st.sampled_from(["target", "arg", "kwarg", "node", "input", "symbol", "output", "drop"]),
                     label="kind")
    nodes = doc["nodes"]
    i = data.draw(st.integers(0, len(nodes) - 1), label="node")
    if kind == "target":
        nodes[i]["target"] = data.draw(st.sampled_from(CODE + ["aten.zeros.default", "operator.mul", "aten.add.Tensor",
                                                                "sparsify.bsmm.default", "aten.view.default"]))
    elif kind == "arg" and nodes[i]["args"]:
        j = data.draw(st.integers(0, len(nodes[i]["args"]) - 1))
        nodes[i]["args"][j] = data.draw(st.one_of(json_value, st.builds(lambda n: {"node": n}, st.integers(-2, 50)),
                                                  st.builds(lambda n: {"tensor": n}, st.integers(-1, 40)),
                                                  st.builds(lambda n: {"input": n}, st.integers(-1, 2))))
    elif kind == "kwarg":
        nodes[i]["kwargs"][data.draw(st.sampled_from(CODE + ["dim", "dtype", "alpha"]))] = data.draw(json_value)
    elif kind == "node":
        nodes.insert(i, {"target": data.draw(st.sampled_from(["aten.zeros.default", "aten.arange.default",
                                                              "operator.mul", "aten.repeat.default"])),
                         "args": data.draw(st.lists(json_value, max_size=3)), "kwargs": {}})
    elif kind == "input":
        doc["inputs"][0][data.draw(st.sampled_from(["shape", "dtype", "kind"]))] = data.draw(json_value)
    elif kind == "symbol":
        doc["symbols"][data.draw(st.sampled_from(["s0", "s1", "u99999999999", CODE[0]]))] = data.draw(
            st.one_of(json_value, st.fixed_dictionaries({"min": st.integers(-5, 2**40), "max": st.integers(-5, 2**70),
                                                         "example": st.integers(-5, 2**40)})))
    elif kind == "output":
        doc["outputs"] = data.draw(st.one_of(json_value, st.builds(lambda n: {"node": n}, st.integers(-2, 50))))
    else:
        del nodes[i]


@settings(max_examples=examples(15), **FUZZ)
@given(data=st.data())
def test_mutated_programs(base, tmp_path, capsys, monkeypatch, data):
    art_base, x, y = base
    monkeypatch.chdir(tmp_path)
    art = _copy(art_base, tmp_path)
    doc = json.loads((art / "program.json").read_text())
    orig = copy.deepcopy(doc)
    _program_mutation(doc, data)
    (art / "program.json").write_text(json.dumps(doc))
    _rehash(art, "program.json")
    # Any accepted mutation still computes a tensor of the right shape; an unchanged one, the same values.
    _check_outcome(art, x, y, capsys, same_model=doc == orig, full=False)


@settings(max_examples=examples(12), **FUZZ)
@given(data=st.data())
def test_mutated_tensor_files(base, tmp_path, capsys, monkeypatch, data):
    art_base, x, y = base
    monkeypatch.chdir(tmp_path)
    art = _copy(art_base, tmp_path)
    w = bytearray((art / "weights.safetensors").read_bytes())
    header = int.from_bytes(w[:8], "little") + 8
    region = data.draw(st.sampled_from(["length", "header", "body", "truncate"]), label="region")
    if region == "length":
        w[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    elif region == "truncate":
        w = w[: data.draw(st.integers(0, len(w) - 1))]
    else:
        lo, hi = (8, header) if region == "header" else (header, len(w))
        for _ in range(data.draw(st.integers(1, 4))):
            w[data.draw(st.integers(lo, hi - 1))] = data.draw(st.integers(0, 255))
    (art / "weights.safetensors").write_bytes(bytes(w))
    if data.draw(st.booleans(), label="fix checksum"):
        _rehash(art, "weights.safetensors")
    _check_outcome(art, x, y, capsys, same_model=False, full=data.draw(st.booleans(), label="full"))


@settings(max_examples=examples(8), **FUZZ)
@given(name=st.sampled_from(["manifest.json", "weights.safetensors", "program.json"]),
       kind=st.sampled_from(["symlink-outside", "symlink-dev", "fifo", "dir", "empty", "missing"]))
def test_file_kinds(base, tmp_path, capsys, monkeypatch, name, kind):
    art_base, x, y = base
    monkeypatch.chdir(tmp_path)
    art = _copy(art_base, tmp_path)
    f = art / name
    outside = tmp_path / f"outside-{time.monotonic_ns()}"
    shutil.copy(f, outside)
    f.unlink()
    if kind == "symlink-outside":
        f.symlink_to(outside)
    elif kind == "symlink-dev":
        f.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(f)
    elif kind == "dir":
        f.mkdir()
    elif kind == "empty":
        f.write_bytes(b"")
    capsys.readouterr()
    with pytest.raises(InputError):
        sparsify.load(art)
    _check_outcome(art, x, y, capsys, same_model=False, full=False)


def _controls(text: str) -> list[str]:
    import unicodedata

    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in "\u202a\u202b\u202d\u202e"]


def _first_tensor(m: dict) -> str:
    return next(iter(m["weights"]["tensors"]))


def _no_program(m: dict, text: str) -> None:
    del m["program"]
    m["program_note"] = text
    m["model"]["target"] = m["model"]["target_abs"] = text


def _replayed_layout(m: dict, text: str) -> None:
    d = next(d for d in m["plan"]["decisions"] if d["method"] == "block_sparse")
    d["params"]["layout"] = text


#: Where a manifest's text reaches an error message: a key in a field's path (checked values, unknown and
#: missing keys, aliases), the writer's version, the program note and recorded factory, a replayed parameter.
QUOTED = {
    "bad value under a key": lambda m, t: m["layouts"].__setitem__(t, "not an object"),
    "unknown key": lambda m, t: m["weights"]["tensors"][_first_tensor(m)].__setitem__(t, 1),
    "missing key under a key": lambda m, t: m["weights"]["tensors"].__setitem__(t, {"shape": [1]}),
    "alias": lambda m, t: m["weights"].setdefault("aliases", {}).__setitem__(t, "no such tensor"),
    "newer writer": lambda m, t: m.update(format_version=999, sparsify_version=t),
    "no program": _no_program,
    "replayed layout": _replayed_layout,
}
terminal_text = st.lists(st.sampled_from(["\x1b[2J", "\x1b]0;pwned\x07", "\n", "\r", "\x9b31m", "\u2028", "\u202e",
                                          "\x00", "\x7f", "fc"]) | st.text(max_size=3), min_size=1, max_size=5).map(
    lambda parts: "".join(parts) + "\x1b[2J")


@pytest.mark.parametrize("place", sorted(QUOTED))
@settings(max_examples=examples(3), **FUZZ)
@given(text=terminal_text)
def test_errors_quote_an_artifacts_text_printable(base, tmp_path, capsys, place, text):
    """Whatever text a manifest puts where an error quotes it, the error holds no control character."""
    art_base, _, _ = base
    art = _copy(art_base, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    QUOTED[place](m, text)
    (art / "manifest.json").write_text(json.dumps(m))
    factory = f"{ZOO}:mlp" if place == "replayed layout" else None
    with pytest.raises(InputError) as exc:
        sparsify.load(art, factory, factory_args={"hidden": 128} if factory else None)
    assert not _controls(str(exc.value)), str(exc.value)
    if place != "replayed layout":  # inspect reads only the manifest
        capsys.readouterr()
        assert main(["inspect", str(art)]) in (0, 2)
        assert not _controls(capsys.readouterr().err.replace("\n", ""))


toml_value = st.one_of(st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from(["false", "no", "yes", "32", "block_sparse", "low_rank", "*", CODE[0]]),
                       st.lists(st.integers(0, 64), max_size=3))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml, v)) + "]"
    return str(v)


@settings(max_examples=examples(12), **FUZZ)
@given(top=st.dictionaries(st.sampled_from(["method", "density", "block_size", "rank", "min_size", "strict",
                                            "fold_batchnorm", "fuse_epilogues", "compression", "tolerance"]),
                           toml_value, max_size=3),
       rule=st.dictionaries(st.sampled_from(["pattern", "type", "method", "skip", "density", "rank"]), toml_value,
                            max_size=3))
def test_mutated_configs(tmp_path, capsys, monkeypatch, top, rule):
    """Any config: exit 0, or exit 2 with one line naming what is wrong; never a crash or a hang."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    text = "".join(f"{k} = {_toml(v)}\n" for k, v in top.items())
    if rule:
        text += "[[rules]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in rule.items())
    cfg.write_text(text)
    out = tmp_path / f"o{time.monotonic_ns()}"
    capsys.readouterr()
    t0 = time.monotonic()
    rc = main(["inspect", f"{ZOO}:mlp", "--config", str(cfg), "--factory-args", json.dumps({"hidden": 128})])
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < BUDGET
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("sparsify: warning:")]
    assert rc in (0, 2), err
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("sparsify: error:"), err
    assert not out.exists() and not (tmp_path / MARK).exists()
