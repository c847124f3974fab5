"""Converted models train data-parallel as they train in one process (issue 14, part 1).

Two ranks (gloo, CPU) are spawned ONCE for this module by ``torch.multiprocessing``;
one worker function runs every case in turn and writes what each rank saw
(parameters after training, gradients after the first backward, buffers, eval
outputs, the tensors DDP reduced) to files.  The tests below compare those files
with single-process training on the concatenated batches, computed here.

For every model kind we produce (block-sparse Linear / Conv1d / Conv2d / LSTM,
low-rank, CP / Tucker / TT Linear and Conv, block-sparse attention projections, a
functionally used weight) under ``DistributedDataParallel`` and FSDP2
``fully_shard``:

* after ``STEPS`` SGD steps the parameters equal those of one process trained on
  the concatenated batches, and the gradients after the first backward equal the
  full-batch gradients (the reduction is an average of equal-sized local means);
* the block-index buffers are identical on every rank, equal to the converted
  model's (a sum-reduction would double them), never among the tensors DDP
  reduces, and never sharded by FSDP2 (they stay plain tensors while every
  parameter becomes a DTensor);
* eval passes between steps see the current weights (no cached weight goes stale
  when FSDP2 refills its parameters);
* dynamic sparsity (SET, RigL) changes layouts identically on every rank;
* a ``torch.distributed.checkpoint`` of the sharded model and optimizer restores
  exactly, and loads into one process without a process group.

Tolerance: float32 (eps 1.2e-7).  The distributed and single-process runs differ
only in how the batch gradient is summed (two local means averaged vs one mean),
a few eps relative per gradient entry, carried through 3 SGD steps on parameters
of size ~0.1-1: ~1e-7 absolute.  ``rtol=1e-5, atol=1e-6`` leaves a 10x margin;
each test also checks that training on one rank's half of the batch (a missing
reduction) misses the reference by far more than the tolerance.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

#: One xdist worker runs the whole module, so the ranks are spawned once (CI: pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group(name="distributed")

WORLD = 2
STEPS = 3
BATCH = 4  # per rank and step
LR, MOMENTUM = 0.05, 0.9
RTOL, ATOL = 1e-5, 1e-6  # float32, see the module docstring
#: Generous: the workers import torch and convert models on a shared, loaded machine.
SPAWN_TIMEOUT_S = 900
COLLECTIVE_TIMEOUT_S = 120


# ----------------------------------------------------------------------------- models
class Owner(nn.Module):
    """A layer whose weight the model's own code uses functionally (``F.linear(x, self.w, self.b)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(96, 64) / 8)
        self.b = nn.Parameter(torch.zeros(96))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b)


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Owner()
        self.head = nn.Linear(96, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


class SeqNet(nn.Module):
    """Block-sparse Conv1d -> block-sparse LSTM -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 24, 3, padding=1)
        self.lstm = nn.LSTM(24, 32, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x):  # x [N, 12, T]
        h = torch.relu(self.conv(x)).transpose(1, 2)
        out, _ = self.lstm(h)
        return self.head(out[:, -1])


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(self.block(x).mean(1))


def _build_linear() -> nn.Module:
    import sparsify
    from sparsify import Rule

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(100, 96), nn.GELU(), nn.Linear(96, 160), nn.Tanh(), nn.Linear(160, 128), nn.Tanh(),
                      nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8))
    # 96x100 in 32-blocks is 3x4 blocks with padding; density 0.4 keeps 5 of 12 (an odd count: FSDP2's
    # shards of values are uneven); rank 1 gives V a single row (one rank's shard is empty).
    return sparsify.sparsify(m, method="block_sparse", density=0.4, block_size=32, min_size=0, rules=[
        Rule("2", method="low_rank", rank=1), Rule("4", method="cp", rank=6),
        Rule("6", method="tucker", rank=0.5), Rule("8", method="tt", rank=0.5), Rule("10", skip=True)])


def _build_conv() -> nn.Module:
    import sparsify
    from sparsify import Rule
    from sparsify.modules import BlockSparseConv2d

    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8))
    out = sparsify.sparsify(m, min_size=0, rules=[
        Rule("2", method="cp", rank=8), Rule("4", method="tucker", rank=0.5), Rule("6", method="tt", rank=0.5),
        Rule("0", skip=True), Rule("10", skip=True)])
    out[0] = BlockSparseConv2d.from_dense(out[0], density=0.5, block_size=8)  # 2x3 channel blocks, 3 kept
    return out


def _build_seq() -> nn.Module:
    from sparsify.modules import BlockSparseConv1d, BlockSparseLSTM

    torch.manual_seed(2)
    m = SeqNet()
    m.conv = BlockSparseConv1d.from_dense(m.conv, density=0.5, block_size=8)
    m.lstm = BlockSparseLSTM.from_dense(m.lstm, density=0.5, block_size=8)
    return m


def _build_attention() -> nn.Module:
    import sparsify

    torch.manual_seed(3)
    return sparsify.sparsify(AttnNet(), method="block_sparse", density=0.5, block_size=16, min_size=0)


def _build_functional() -> nn.Module:
    import sparsify

    torch.manual_seed(4)
    return sparsify.sparsify(FunctionalNet(), method="block_sparse", density=0.5, block_size=16, min_size=0,
                             example_inputs=torch.randn(2, 64))


def _rewritten(m: nn.Module) -> bool:
    return callable(getattr(m, "to_dense_module", None))


def _shard_layers(model: nn.Module) -> None:
    """FSDP2 the conventional way: each rewritten layer (innermost first), then the root."""
    from torch.distributed.fsdp import fully_shard

    for _, mod in reversed(list(model.named_modules())):
        if mod is not model and _rewritten(mod):
            fully_shard(mod)
    fully_shard(model)


def _shard_owner(model: nn.Module) -> None:
    """The module whose forward uses the weight functionally is sharded, with the layer inside it."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.a)
    fully_shard(model)


def _shard_leaf_registered(model: nn.Module) -> None:
    """The rewritten layer alone, with its weight product registered as an FSDP forward method."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    fully_shard(model.a.w_rewritten)
    register_fsdp_forward_method(model.a.w_rewritten, "weight_product")
    fully_shard(model)


#: name -> (builder, input shape of one sample, output features, FSDP policies)
CASES: dict[str, tuple] = {
    "linear": (_build_linear, (100,), 8, {"layers": _shard_layers}),
    "conv": (_build_conv, (16, 8, 8), 8, {"layers": _shard_layers}),
    "seq": (_build_seq, (12, 6), 8, {"layers": _shard_layers}),
    "attention": (_build_attention, (5, 64), 8, {"layers": _shard_layers}),
    "functional": (_build_functional, (64,), 8, {"owner": _shard_owner, "leaf": _shard_leaf_registered}),
}
RUNS = [(case, "ddp") for case in CASES] + [(case, f"fsdp-{p}") for case, c in CASES.items() for p in c[3]]


def _dataset(case: str) -> torch.utils.data.TensorDataset:
    _, shape, out, _ = CASES[case]
    g = torch.Generator().manual_seed(100 + sorted(CASES).index(case))
    n = WORLD * BATCH * STEPS
    return torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g), torch.randn(n, out, generator=g))


def _eval_input(case: str) -> torch.Tensor:
    _, shape, _, _ = CASES[case]
    return torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))


def _sampler(case: str, rank: int):
    return torch.utils.data.DistributedSampler(_dataset(case), num_replicas=WORLD, rank=rank, shuffle=True, seed=11)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered if FSDP2 holds it as a sharded DTensor."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().contiguous()


def _index_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    from sparsify.distributed import pattern_buffers

    return {k: v.detach().clone().contiguous() for k, v in pattern_buffers(model).items()}


# ----------------------------------------------------------------------------- the workers
def _save(path: Path, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path) + ".safetensors")
    if info is not None:
        Path(str(path) + ".json").write_text(json.dumps(info))


def _run(case: str, mode: str, base: nn.Module, rank: int, out: Path) -> None:
    """Train a copy of ``base`` under ``mode`` for STEPS steps; write what this rank saw."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = copy.deepcopy(base)
    info: dict = {}
    if mode == "ddp":
        names = {id(p): n for n, p in model.named_parameters()}
        reduced: list[str] = []

        def recording_allreduce(state, bucket):
            reduced.extend(names[id(p)] for p in bucket.parameters())
            t = bucket.buffer() / WORLD
            return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

        wrapped = DDP(model)
        wrapped.register_comm_hook(None, recording_allreduce)
    else:
        CASES[case][3][mode.split("-", 1)[1]](model)
        wrapped = model
        info["dtensor_params"] = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
        info["dtensor_buffers"] = sorted(n for n, b in model.named_buffers() if isinstance(b, DTensor))
    cached: set[str] = set()
    if mode != "ddp":
        # FSDP2 refills parameters with their version counters preserved: no weight form may be cached
        # (seen at the start of each call, after FSDP2's own pre-forward gathered the parameters).
        def saw_cache(mod, args, name):
            v = mod.__dict__.get("_parameters", {}).get("values")
            if (v is not None and hasattr(v, "_sparsify_cache")) or "_weight_cache" in mod.__dict__:
                cached.add(name)

        for n, m in model.named_modules():
            if _rewritten(m):
                m.register_forward_pre_hook(lambda mod, args, n=n: saw_cache(mod, args, n))
    opt = _optimizer(model.parameters())
    loader = torch.utils.data.DataLoader(_dataset(case), batch_size=BATCH, sampler=_sampler(case, rank))
    x_eval = _eval_input(case)
    tensors: dict[str, torch.Tensor] = {}
    for step, (x, y) in enumerate(loader):
        wrapped.train()
        loss = _loss(wrapped(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                tensors[f"grad/{n}"] = _full(p.grad)
        opt.step()
        wrapped.eval()
        with torch.no_grad():  # a validation pass: must see this step's weights
            tensors[f"eval/{step}"] = wrapped(x_eval).clone()
    for n, p in model.named_parameters():
        tensors[f"final/{n}"] = _full(p)
    for n, b in _index_buffers(model).items():
        tensors[f"buffer/{n}"] = b
    if mode == "ddp":
        info["reduced"] = sorted(set(reduced))
    else:
        info["cached_weight_forms"] = sorted(cached)
    _save(out / f"{case}-{mode}-rank{rank}", tensors, info)
    if case == "linear" and mode == "fsdp-layers":
        _checkpoint(case, base, model, opt, rank, out)


def _checkpoint(case: str, base: nn.Module, model: nn.Module, opt, rank: int, out: Path) -> None:
    """DCP save of the sharded model + optimizer; one more step; restore into a fresh model; the same step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = out / "dcp"
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    saved = {f"saved/{n}": _full(p) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(99)
    x = torch.randn(WORLD * BATCH, *CASES[case][1], generator=g)[rank::WORLD]
    y = torch.randn(WORLD * BATCH, CASES[case][2], generator=g)[rank::WORLD]

    def one_step(m, o):
        m.train()
        o.zero_grad()
        _loss(m(x), y).backward()
        o.step()

    one_step(model, opt)
    after = {f"continued/{n}": _full(p) for n, p in model.named_parameters()}

    fresh = copy.deepcopy(base)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    CASES[case][3]["layers"](fresh)
    opt2 = _optimizer(fresh.parameters())
    msd2, osd2 = get_state_dict(fresh, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(fresh, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    restored = {f"restored/{n}": _full(p) for n, p in fresh.named_parameters()}
    one_step(fresh, opt2)
    resumed = {f"resumed/{n}": _full(p) for n, p in fresh.named_parameters()}
    _save(out / f"dcp-rank{rank}", {**saved, **after, **restored, **resumed})


def _dynamic(mode: str, rank: int, out: Path) -> None:
    """SET and RigL under DDP / FSDP2: every rank must adopt the same layouts at every update."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsify.dynamic as dyn

    for kind in ("set", "rigl"):
        model = _build_dynamic()
        if mode == "ddp":
            wrapped = DDP(model)
        else:
            _shard_layers(model)
            wrapped = model
        opt = _optimizer(model.parameters())
        helper = dyn.DynamicSparsity(model, opt, mode=kind, update_every=1, drop_fraction=0.3, seed=5)
        loader = torch.utils.data.DataLoader(_dataset("dynamic"), batch_size=BATCH, sampler=_sampler("dynamic", rank))
        tensors: dict[str, torch.Tensor] = {}
        for step, (x, y) in enumerate(loader):
            wrapped.train()
            loss = _loss(wrapped(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            helper.step()
            for n, b in _index_buffers(model).items():
                if n.endswith("col_indices") or n.endswith("row_offsets"):
                    tensors[f"layout/{step}/{n}"] = b
        for n, p in model.named_parameters():
            tensors[f"final/{n}"] = _full(p)
        if kind == "set":
            tensors.update(_resume_changed_layouts(mode, wrapped, model, opt, rank, out))
        _save(out / f"dynamic-{kind}-{mode}-rank{rank}", tensors)


def _resume_changed_layouts(mode: str, wrapped, model: nn.Module, opt, rank: int, out: Path) -> dict:
    """Checkpoint a model whose layouts dynamic sparsity changed; restore it into a freshly built (wrapped)
    model that still has the original layouts; the next step must equal the uninterrupted run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    ckpt = out / f"dcp-dynamic-{mode}"
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    fresh = _build_dynamic()
    fresh_wrapped = DDP(fresh) if mode == "ddp" else fresh
    if mode != "ddp":
        _shard_layers(fresh)
    opt2 = _optimizer(fresh.parameters())
    msd2, osd2 = get_state_dict(fresh, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(fresh, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    g = torch.Generator().manual_seed(98)
    x = torch.randn(WORLD * BATCH, 64, generator=g)[rank::WORLD]
    y = torch.randn(WORLD * BATCH, 8, generator=g)[rank::WORLD]
    result = {}
    for tag, (w, m, o) in {"continued": (wrapped, model, opt), "resumed": (fresh_wrapped, fresh, opt2)}.items():
        w.train()
        o.zero_grad()
        _loss(w(x), y).backward()
        o.step()
        result.update({f"{tag}/{n}": _full(p) for n, p in m.named_parameters()})
        result.update({f"{tag}/{n}": b for n, b in _index_buffers(m).items()})
    return result


def _build_dynamic() -> nn.Module:
    import sparsify

    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 8))
    return sparsify.sparsify(m, method="block_sparse", density=0.5, block_size=16, min_size=0,
                             rules=[sparsify.Rule("4", skip=True)])


CASES["dynamic"] = (_build_dynamic, (64,), 8, {})


def _checks(rank: int, out: Path) -> None:
    """Refusals: a layer sharded alone whose weight is used functionally; ranks with different patterns."""
    from torch.distributed.fsdp import fully_shard

    from sparsify.distributed import check_layouts_replicated
    from sparsify.modules import BlockSparseLinear
    from sparsify.patterns import random_layout

    info: dict = {"replicated_count": check_layouts_replicated(_build_linear())}
    model = _build_functional()
    fully_shard(model.a.w_rewritten)
    fully_shard(model)
    try:
        model(torch.randn(2, 64))
        info["leaf_error"] = None
    except ValueError as exc:
        info["leaf_error"] = str(exc)
    # Ranks that drew their patterns with different seeds must be told so, all of them.
    mixed = nn.Sequential(nn.Linear(8, 8), BlockSparseLinear(64, 64, random_layout((64, 64), 16, 0.5, seed=rank)))
    try:
        check_layouts_replicated(mixed)
        info["mismatch_error"] = None
    except ValueError as exc:
        info["mismatch_error"] = str(exc)
    Path(out / f"checks-rank{rank}.json").write_text(json.dumps(info))


def _worker(rank: int, out: str, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on two shared cores
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this host
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        outdir = Path(out)
        timings = {}
        for case in [c for c in CASES if c != "dynamic"]:
            t0 = time.perf_counter()
            base = CASES[case][0]()
            _save(outdir / f"{case}-base-rank{rank}", _index_buffers(base))
            for c, mode in RUNS:
                if c == case:
                    _run(case, mode, base, rank, outdir)
            timings[case] = time.perf_counter() - t0
        for mode in ("ddp", "fsdp-layers"):
            _dynamic(mode, rank, outdir)
        _checks(rank, outdir)
        (outdir / f"timings-rank{rank}.json").write_text(json.dumps(timings))
    finally:
        dist.destroy_process_group()


def spawn(fn, args: tuple, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` on WORLD spawned processes; fail (never hang) past ``timeout_s``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):  # raises ProcessRaisedException / ProcessExitedException on failure
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} distributed workers did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(10)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    t0 = time.perf_counter()
    spawn(_worker, (str(out), str(out / "init-store")), SPAWN_TIMEOUT_S)
    (out / "wall.txt").write_text(f"{time.perf_counter() - t0:.1f}")
    return out


def _load(results: Path, stem: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(results / f"{stem}.safetensors"))


def _info(results: Path, stem: str) -> dict:
    return json.loads((results / f"{stem}.json").read_text())


# ----------------------------------------------------------------------------- references
_REF_CACHE: dict = {}


def _reference(case: str, ranks: tuple[int, ...] = tuple(range(WORLD))) -> dict[str, torch.Tensor]:
    """One process, trained on the batches of ``ranks`` concatenated (all ranks: the reference)."""
    key = (case, ranks)
    if key in _REF_CACHE:
        return _REF_CACHE[key]
    model = CASES[case][0]()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _optimizer(model.parameters())
    ds = _dataset(case)
    per_rank = [list(_sampler(case, r)) for r in ranks]
    x_eval = _eval_input(case)
    ref: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        idx = [i for r in per_rank for i in r[step * BATCH:(step + 1) * BATCH]]
        x, y = ds[idx]
        model.train()
        loss = _loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            ref.update({f"grad/{n}": p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        model.eval()
        with torch.no_grad():
            ref[f"eval/{step}"] = model(x_eval).clone()
    ref.update({f"final/{n}": p.detach().clone() for n, p in model.named_parameters()})
    ref.update({f"init/{n}": t for n, t in init.items()})
    ref["__model__"] = model  # type: ignore[assignment]
    _REF_CACHE[key] = ref
    return ref


def _max_diff(a: dict, b: dict, prefix: str) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k.startswith(prefix))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case,mode", RUNS)
def test_parameters_equal_single_process_training(results, case, mode):
    ref = _reference(case)
    for rank in range(WORLD):
        got = _load(results, f"{case}-{mode}-rank{rank}")
        names = [k for k in ref if k.startswith("final/")]
        assert sorted(names) == sorted(k for k in got if k.startswith("final/"))
        for k in names:
            torch.testing.assert_close(got[k], ref[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k, r=rank: f"{k}, rank {r}: {m}")
        for step in range(STEPS):  # validation between steps saw that step's weights
            torch.testing.assert_close(got[f"eval/{step}"], ref[f"eval/{step}"], rtol=RTOL, atol=ATOL)
    # The check can fail: training moved the parameters, and one rank's half of the batches alone
    # (no reduction) ends far outside the tolerance.
    moved = max(float((ref[k] - ref["init/" + k[6:]]).abs().max()) for k in ref if k.startswith("final/"))
    assert moved > 100 * ATOL
    assert _max_diff(_reference(case, (0,)), ref, "final/") > 100 * ATOL


@pytest.mark.parametrize("case,mode", RUNS)
def test_gradients_are_the_full_batch_gradients(results, case, mode):
    ref = _reference(case)
    grads = [_load(results, f"{case}-{mode}-rank{r}") for r in range(WORLD)]
    for k in (k for k in ref if k.startswith("grad/")):
        for r in range(1, WORLD):  # one reduction: every rank holds the same gradient, bit for bit
            assert torch.equal(grads[r][k], grads[0][k]), k
        scale = float(ref[k].abs().max())
        torch.testing.assert_close(grads[0][k], ref[k], rtol=RTOL, atol=ATOL * max(1.0, scale), msg=lambda m, k=k: f"{k}: {m}")
    assert _max_diff(_reference(case, (0,)), ref, "grad/") > 100 * ATOL


@pytest.mark.parametrize("case,mode", RUNS)
def test_index_buffers_identical_and_never_reduced(results, case, mode):
    base = _load(results, f"{case}-base-rank0")
    assert any(k.endswith("col_indices") for k in base), "the case has no block-sparse layer"
    ref_model = _reference(case)["__model__"]
    converted_here = {k: v for k, v in _index_buffers(ref_model).items()}
    for rank in range(WORLD):
        got = _load(results, f"{case}-{mode}-rank{rank}")
        bufs = {k[len("buffer/"):]: v for k, v in got.items() if k.startswith("buffer/")}
        assert bufs.keys() == base.keys() == converted_here.keys()
        for k, v in bufs.items():  # unchanged by training: not summed, not averaged, not sharded
            assert torch.equal(v, base[k]) and torch.equal(v, converted_here[k]), (k, rank)
        info = _info(results, f"{case}-{mode}-rank{rank}")
        params = sorted(k[len("final/"):] for k in got if k.startswith("final/"))
        if mode == "ddp":
            assert info["reduced"] == params  # every parameter, and nothing else, went through the all-reduce
        else:
            assert info["dtensor_params"] == params  # FSDP2 shards (and reduce-scatters) every parameter
            assert info["dtensor_buffers"] == []  # and never a buffer


@pytest.mark.parametrize("case,mode", [r for r in RUNS if r[1] != "ddp"])
def test_no_weight_form_is_cached_under_fsdp2(results, case, mode):
    """FSDP2 refills parameters in place with their version counters preserved, so a cached dense or
    reconstructed weight keyed by (version, data_ptr) could be stale after an update of the shards."""
    for rank in range(WORLD):
        assert _info(results, f"{case}-{mode}-rank{rank}")["cached_weight_forms"] == []


def test_distributed_checkpoint_restores_sharded_model_and_optimizer(results):
    for rank in range(WORLD):
        got = _load(results, f"dcp-rank{rank}")
        names = [k[len("saved/"):] for k in got if k.startswith("saved/")]
        assert names
        for n in names:
            assert torch.equal(got[f"restored/{n}"], got[f"saved/{n}"]), n  # from zeros back to the saved shards
            # the momentum buffers came back too: the next step matches the uninterrupted run bit for bit
            assert torch.equal(got[f"resumed/{n}"], got[f"continued/{n}"]), n
        assert any(not torch.equal(got[f"continued/{n}"], got[f"saved/{n}"]) for n in names)


def test_distributed_checkpoint_loads_in_one_process(results):
    """The sharded checkpoint, read without a process group into a freshly converted model."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    assert not dist.is_initialized()
    model = _build_linear()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(results / "dcp"))
    model.load_state_dict(state["model"])
    ref = _reference("linear")
    saved = _load(results, "dcp-rank0")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[f"saved/{n}"]), n
        torch.testing.assert_close(p.detach(), ref[f"final/{n}"], rtol=RTOL, atol=ATOL)
    assert all(torch.equal(b, _index_buffers(ref["__model__"])[k]) for k, b in _index_buffers(model).items())


@pytest.mark.parametrize("mode", ["ddp", "fsdp-layers"])
@pytest.mark.parametrize("kind", ["set", "rigl"])
def test_dynamic_sparsity_changes_layouts_identically_on_every_rank(results, kind, mode):
    import sparsify.dynamic as dyn

    runs = [_load(results, f"dynamic-{kind}-{mode}-rank{r}") for r in range(WORLD)]
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k  # layouts at every step, and the trained parameters
    initial = _index_buffers(_build_dynamic())
    last = {k.split("/", 2)[2]: v for k, v in runs[0].items() if k.startswith(f"layout/{STEPS - 1}/")}
    changed = [k for k, v in last.items() if k.endswith("col_indices") and not torch.equal(v, initial[k])]
    assert changed, "no layout changed: the test would not see a divergence"
    for k, v in last.items():  # density is fixed: the same block count
        assert v.shape == initial[k].shape, k
    if kind == "set":  # a checkpoint of the changed layouts resumes exactly in a model built with the old ones
        resumed = [k for k in runs[0] if k.startswith("resumed/")]
        assert resumed
        for r in range(WORLD):
            for k in resumed:
                assert torch.equal(runs[r][k], runs[r]["continued/" + k[len("resumed/"):]]), (r, k)
    if kind == "set":
        # SET's decisions depend on the (replicated) values and a seed only: one process on the
        # concatenated batches makes the same ones and ends at the same parameters.
        model = _build_dynamic()
        opt = _optimizer(model.parameters())
        helper = dyn.DynamicSparsity(model, opt, mode="set", update_every=1, drop_fraction=0.3, seed=5)
        ds, per_rank = _dataset("dynamic"), [list(_sampler("dynamic", r)) for r in range(WORLD)]
        for step in range(STEPS):
            x, y = ds[[i for r in per_rank for i in r[step * BATCH:(step + 1) * BATCH]]]
            loss = _loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            helper.step()
            for n, b in _index_buffers(model).items():
                if f"layout/{step}/{n}" in runs[0]:
                    assert torch.equal(b, runs[0][f"layout/{step}/{n}"]), (step, n)
        for n, p in model.named_parameters():
            torch.testing.assert_close(runs[0][f"final/{n}"], p.detach(), rtol=RTOL, atol=ATOL)


def test_refusals_name_the_problem(results):
    infos = [_info(results, f"checks-rank{r}") for r in range(WORLD)]
    for info in infos:
        assert info["replicated_count"] == len(_index_buffers(_build_linear())) > 0
        assert info["leaf_error"] is not None and "register_fsdp_forward_method" in info["leaf_error"]
        assert "fully_shard" in info["leaf_error"] and "BlockSparseLinear" in info["leaf_error"]
        # every rank refuses (none is left waiting), naming the buffer and the ranks
        assert info["mismatch_error"] is not None and "1.col_indices" in info["mismatch_error"]
        assert "rank 1" in info["mismatch_error"]



# ----------------------------------------------------------------------------- one process
@pytest.mark.parametrize("kind", ["linear", "conv", "lstm"])
def test_a_pattern_written_in_place_is_adopted_with_its_metadata(kind):
    """What ``torch.distributed.checkpoint.load`` does to a module: it writes the checkpoint's pattern and
    values into the module's own tensors, then ``load_state_dict`` runs on them.  The derived metadata
    must follow, and with the same block count the ``values`` parameter keeps its identity (optimizers,
    DDP and FSDP2 hold it)."""
    from sparsify.dynamic import sparse_weight_modules
    from sparsify.modules import BlockSparseConv2d, BlockSparseLinear, BlockSparseLSTM
    from sparsify.patterns import random_layout

    def build(seed):
        torch.manual_seed(0)
        if kind == "linear":
            return BlockSparseLinear(48, 40, random_layout((40, 48), 8, 0.5, seed=seed))
        if kind == "conv":
            return BlockSparseConv2d(24, 16, 3, random_layout((16, 24), 8, 0.5, seed=seed), padding=1)
        return BlockSparseLSTM(16, 16, density=0.5, block_size=8, pattern="random", seed=seed)

    source, target = build(1), build(2)
    assert any(not torch.equal(a, b) for a, b in zip(source.buffers(), target.buffers()))
    ids = {n: id(m.values) for n, m in sparse_weight_modules(target)}
    state = target.state_dict()
    with torch.no_grad():  # the in-place write
        for k, v in source.state_dict().items():
            state[k].copy_(v)
    target.load_state_dict(state)
    for (n, m), (_, ref) in zip(sparse_weight_modules(target), sparse_weight_modules(source)):
        assert id(m.values) == ids[n]
        for name, buf in ref.named_buffers():
            assert torch.equal(getattr(m, name), buf), (n, name)
        assert m.layout == ref.layout
    x = torch.randn(2, 5, 16) if kind == "lstm" else torch.randn(3, 48) if kind == "linear" else torch.randn(2, 24, 6, 6)
    out_t, out_s = target(x), source(x)
    torch.testing.assert_close(out_t[0] if kind == "lstm" else out_t, out_s[0] if kind == "lstm" else out_s,
                               rtol=0, atol=0)
