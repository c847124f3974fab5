"""Distributed conversion (issue 14 part 3): each rank converts its share of the layers and rank 0 writes
one artifact identical to the single-process streaming conversion.

Two gloo ranks are spawned once (``torch.multiprocessing``) and call the API with ``distributed=True``;
one ``torchrun --standalone`` run covers the command line (``--distributed``).  Identical means: every
weights file byte for byte, and the manifest except its creation time and the process count.  Both
sides convert with one thread per process: LAPACK / BLAS results depend on the thread count, and
torchrun sets ``OMP_NUM_THREADS=1`` (docs/distributed.md).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytestmark = pytest.mark.xdist_group(name="streaming-distributed")

WORLD = 2
SPAWN_TIMEOUT_S = 600


def _build() -> nn.Module:
    """Eight layers of four methods, so both ranks get several."""
    layers = []
    for _ in range(4):
        layers += [nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 96), nn.Tanh()]
    return nn.Sequential(*layers)


def _config():
    from sparsify import Rule, SparsifyConfig

    return SparsifyConfig(method="tucker", rank=0.5, min_size=0, rules=[
        Rule("0", method="block_sparse", density=0.5, block_size=16), Rule("2", method="low_rank", rank=12),
        Rule("4", method="tt", rank=0.5), Rule("10", method="cp", rank=4), Rule("14", skip=True)])


def _checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _build().state_dict().items()}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def _worker(rank: int, root: str, init_file: str) -> None:
    import torch.distributed as dist

    from sparsify.errors import InputError
    from sparsify.streaming import convert_checkpoint

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        ckpt = Path(root) / "ckpt" / "model.safetensors"
        info: dict = {}
        # rank 0 cannot write OUT (it exists): every rank is told before any work, none waits
        try:
            convert_checkpoint(_build, ckpt, Path(root) / "taken", _config(), distributed=True)
            info["taken"] = None
        except InputError as exc:
            info["taken"] = str(exc)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = convert_checkpoint(_build, ckpt, Path(root) / "dist", _config(), distributed=True,
                                   max_shard_size="60kB")
        info["seconds"] = time.perf_counter() - t0
        info["returned"] = None if r is None else {"units": r.units, "processes": r.processes}
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(info))
    finally:
        dist.destroy_process_group()


def _spawn(root: Path) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(str(root), str(root / "init-store")), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} conversion ranks did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(10)


def _same_artifact(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        if n != "manifest.json":
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("created")
        m["streamed"].pop("processes")
        m.pop("torch_threads", None)
    assert ma == mb


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dconv")
    ckpt = _checkpoint(root / "ckpt")
    (root / "taken").mkdir()
    (root / "taken" / "mine.txt").write_text("not sparsify's")
    _spawn(root)
    from sparsify.streaming import convert_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank converts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            convert_checkpoint(_build, ckpt, root / "single", _config(), max_shard_size="60kB")
            (root / "single.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    finally:
        torch.set_num_threads(threads)
    return root


def test_distributed_conversion_writes_the_single_process_artifact(runs):
    infos = [json.loads((runs / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert infos[0]["returned"] == {"units": 7, "processes": 2} and infos[1]["returned"] is None
    _same_artifact(runs / "dist", runs / "single")
    import sparsify

    m = sparsify.io.read_manifest(runs / "dist")
    assert len(m["weights"]["shards"]) > 1  # sharded output, identical shard by shard
    methods = {d["method"] for d in m["plan"]["decisions"]}
    assert {"block_sparse", "low_rank", "tt", "cp", "tucker", "dense"} <= methods
    model = sparsify.load(runs / "dist", factory=_build)
    torch.manual_seed(0)
    ref = sparsify.sparsify(_build(), _config())
    x = torch.randn(3, 96)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)  # float32: different thread counts


def test_every_rank_is_refused_when_rank_0_cannot_write(runs):
    for r in range(WORLD):
        msg = json.loads((runs / f"rank{r}.json").read_text())["taken"]
        assert msg is not None and "taken" in msg
        assert ("not a sparsify artifact" in msg or "exists" in msg) if r == 0 else "rank 0 cannot write it" in msg
    assert sorted(os.listdir(runs / "taken")) == ["mine.txt"]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_command_line(runs, tmp_path):
    """``torchrun --standalone --nproc_per_node 2 -m sparsify convert ... --distributed``."""
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(WORLD), "-m", "sparsify", "convert",
           "tests.test_streaming_distributed:_build", "--weights", str(runs / "ckpt" / "model.safetensors"),
           "-o", str(tmp_path / "out"), "--method", "tt", "--rank", "0.5", "--min-size", "0", "--distributed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.count("wrote ") == 1 and "2 processes" in p.stdout  # rank 0 alone prints and writes
    import sparsify

    m = sparsify.io.read_manifest(tmp_path / "out")
    assert m["streamed"]["processes"] == 2 and m["torch_threads"] == 1
    assert sum(d["method"] == "tt" for d in m["plan"]["decisions"]) == 8
