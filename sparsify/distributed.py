"""Converted models across processes: the same block patterns on every rank, and conversion split across ranks.

Training a converted model data-parallel needs nothing of ours: its parameters
(block ``values``, factors, biases) are ordinary tensors that
``DistributedDataParallel`` all-reduces and FSDP2's ``fully_shard`` shards and
reduce-scatters, and ``torch.distributed.checkpoint`` saves them sharded (see
docs/distributed.md).  What torch cannot know is that a block-sparse layer's
integer buffers (``row_offsets``, ``col_indices`` and the metadata derived from
them) say which blocks the ``values`` hold: they must be identical on every
rank and are never reduced.  DDP broadcasts buffers from rank 0 at
construction; FSDP2 does not touch them, so a rank that built a different
pattern (an unseeded random layout, a different checkpoint) would silently
train blocks of one pattern with gradients of another.
:func:`check_layouts_replicated` compares them across ranks before that can happen.

Distributed conversion (``torchrun --nproc_per_node N sparsify convert ...
--distributed``): every rank builds the same skeleton and plan
(``sparsify.streaming``), :func:`assign_units` gives each rank a share of the
units balanced by estimated cost, and each rank converts its own units from the
checkpoint.  Rank 0 writes the artifact in order: it converts its units itself
and receives the others' (tensors and decisions) over the process group with
``torch.distributed`` point-to-point sends, a unit at a time, so rank 0 holds at
most one received unit.  The artifact is identical to a single-process streaming
conversion run with the same number of threads per process (LAPACK / BLAS results
depend on the thread count: torchrun sets ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["assign_units", "check_layouts_replicated", "conversion_group", "pattern_buffers", "unit_cost",
           "unit_results"]


def pattern_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every integer or boolean buffer of ``model`` by qualified name: the block patterns and their metadata.

    Example:
        >>> import torch, sparsify
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(128, 128)), density=0.5, block_size=32)
        >>> sorted(pattern_buffers(m))[:2]
        ['0.col_indices', '0.row_indices']
    """
    return {name: b for name, b in model.named_buffers()
            if not b.is_floating_point() and not b.is_complex()}


def _digest(name: str, t: torch.Tensor) -> bytes:
    h = hashlib.sha256(name.encode())
    h.update(repr((str(t.dtype), tuple(t.shape))).encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def _comm_device(group) -> torch.device:
    """Where tensors for a collective on ``group`` must live (NCCL needs the current CUDA device)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_layouts_replicated(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Raise on every rank unless every rank of ``group`` holds the same block patterns; return how many.

    Compares the integer buffers of ``model`` (:func:`pattern_buffers`: the
    block-sparse layers' ``row_offsets`` / ``col_indices`` and derived metadata)
    by SHA-256 digests gathered from all ranks, so it moves 32 bytes per buffer,
    not the buffers.  Call it after building or loading the converted model on
    every rank and before ``fully_shard`` (FSDP2 does not synchronize buffers),
    and after anything that changes patterns.  Every rank gets the same answer,
    so no rank is left waiting in a later collective.  Returns the number of
    buffers compared.

    Example:
        >>> import torch, sparsify
        >>> from sparsify.distributed import check_layouts_replicated
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(128, 128)), density=0.5, block_size=32)
        >>> check_layouts_replicated(m)  # without a process group: one rank, nothing to compare
        6
    """
    buffers = pattern_buffers(model)
    if not dist.is_available() or not dist.is_initialized():
        return len(buffers)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = _comm_device(group)
    names = sorted(buffers)
    mine = torch.tensor([list(_digest(n, buffers[n])) for n in names], dtype=torch.uint8,
                        device=device).reshape(len(names), 32)
    count = torch.tensor([len(names)], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    if len(set(counts)) != 1:
        raise ValueError(
            f"check_layouts_replicated: the ranks hold different numbers of pattern buffers "
            f"(by rank: {counts}; this is rank {rank}): they did not build the same converted model. Build it "
            f"identically on every rank (same config, same seed) or load it from one artifact.")
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    for r, theirs in enumerate(gathered):
        differs = (theirs.cpu() != gathered[0].cpu()).any(dim=1)
        if bool(differs.any()):
            first = names[int(differs.nonzero()[0])]
            raise ValueError(
                f"check_layouts_replicated: buffer {first!r} differs between rank 0 and rank {r} (this is rank "
                f"{rank}): the ranks hold different block patterns, so their block values do not line up. Build "
                f"the model identically on every rank (a seeded pattern, the same config and weights), load it from "
                f"one artifact, or copy rank 0's state with torch.distributed.checkpoint.state_dict."
                f"set_model_state_dict(..., options=StateDictOptions(full_state_dict=True, "
                f"broadcast_from_rank0=True)) before sharding.")
    return len(names)


# ------------------------------------------------------------------ distributed conversion
#: Relative cost of converting one weight byte, by method (a 1024 x 1024 Linear on the CPU, one thread,
#: unloaded: block_sparse ~0.04 s, tt 0.3 s, low_rank 0.5 s, tucker at rank 0.25 0.75 s, cp at rank 64
#: 2.4 s; CP grows quickly with the rank).  Only the balance between ranks depends on it, never the result.
METHOD_COST = {"block_sparse": 1.0, "tt": 8.0, "low_rank": 12.0, "tucker": 20.0, "cp": 60.0}


def unit_cost(unit: Any) -> float:
    """Estimated conversion time of a unit (arbitrary units): its bytes times its method's cost."""
    return max(1, unit.nbytes) * METHOD_COST.get(unit.method, 20.0)


def assign_units(units: list, world: int, *, writer_share: float = 0.0) -> list[int]:
    """The rank that converts each unit: in order, each to the rank with the least work so far.

    Greedy in the units' order (not longest-first) so every rank's units spread
    along the order rank 0 writes in, and a rank converts ahead while rank 0
    catches up.  ``writer_share`` is the extra work rank 0 starts with (it also reads
    and writes every tensor).  Deterministic: every rank computes the same answer.

    Example:
        >>> from types import SimpleNamespace as U
        >>> assign_units([U(nbytes=4, method="cp"), U(nbytes=4, method="tt"), U(nbytes=4, method="tt")], 2)
        [0, 1, 1]
    """
    if world < 1:
        raise ValueError(f"assign_units: world must be >= 1. Got {world}.")
    load = [0.0] * world
    load[0] = writer_share
    out = []
    for u in units:
        r = min(range(world), key=lambda i: (load[i], i))
        out.append(r)
        load[r] += unit_cost(u)
    return out


def conversion_group(timeout_s: float | None = None) -> dist.ProcessGroup | None:
    """The gloo process group conversion talks over (tensors stay on the CPU).

    Inside ``torchrun`` (``WORLD_SIZE`` set) without a default group, one is
    initialized from the environment (gloo); with a default group of another
    backend (NCCL), a gloo group over the same ranks is created.  Returns None
    outside a distributed launch.  ``timeout_s`` (default: 2 hours, or
    ``SPARSIFY_DIST_TIMEOUT`` seconds) bounds the wait for a rank's slowest unit.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("SPARSIFY_DIST_TIMEOUT", 7200))
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        dist.init_process_group("gloo", timeout=timeout)
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timeout)


def _isend(t: torch.Tensor, dst: int, group, tag: int, inflight: list) -> None:
    inflight.append((dist.isend(t, dst=dst, group=group, tag=tag), t))  # the tensor lives until sent


def _send_bytes(data: bytes, dst: int, group, tag: int, inflight: list) -> None:
    _isend(torch.tensor([len(data)], dtype=torch.int64), dst, group, tag, inflight)
    if data:
        _isend(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, group, tag, inflight)


def _recv_bytes(src: int, group, tag: int, n: torch.Tensor | None = None) -> bytes:
    if n is None:
        n = torch.empty(1, dtype=torch.int64)
        dist.recv(n, src=src, group=group, tag=tag)
    buf = torch.empty(int(n), dtype=torch.uint8)
    if int(n):
        dist.recv(buf, src=src, group=group, tag=tag)
    return buf.numpy().tobytes()


def _decision_doc(d: Any) -> dict:
    from .io import _jsonable

    return _jsonable(d.to_dict())


def _decision_of(doc: dict) -> Any:
    from .decision import Decision

    doc = dict(doc)
    doc["weight_shape"] = tuple(doc["weight_shape"])
    doc["input_shape"] = None if doc.get("input_shape") is None else tuple(doc["input_shape"])
    return Decision(**{k: v for k, v in doc.items() if k in Decision.__dataclass_fields__})


def canonical(result: Any) -> Any:
    """``result`` with its decisions as they read back from JSON: what a result sent between ranks
    becomes, so that one process and many produce the same artifact."""
    result.decisions = [_decision_of(json.loads(json.dumps(_decision_doc(d)))) for d in result.decisions]
    return result


def _send_result(res: Any, dst: int, group, tag: int) -> list:
    """Start sending ``res`` to ``dst``; the returned handles complete when rank ``dst`` has received it."""
    inflight: list = []
    names = list(res.tensors)
    header = {"index": res.index, "names": names,
              "dtypes": [str(res.tensors[n].dtype).removeprefix("torch.") for n in names],
              "shapes": [list(res.tensors[n].shape) for n in names],
              "decisions": [_decision_doc(d) for d in res.decisions], "layouts": res.layouts, "notes": res.notes,
              "aliases": res.aliases}
    _send_bytes(json.dumps(header).encode(), dst, group, tag, inflight)
    for n in names:
        t = res.tensors[n].detach().contiguous()
        if t.numel():
            _isend(t.view(-1).view(torch.uint8), dst, group, tag, inflight)
    return inflight


def _recv_result(src: int, group, tag: int, unit: Any, length: torch.Tensor | None = None) -> Any:
    """Receive ``unit``'s result from ``src`` (``length``: its header's length, if already received)."""
    from .streaming import UnitResult

    header = json.loads(_recv_bytes(src, group, tag, length))
    if header["index"] != unit.index:
        raise RuntimeError(f"distributed conversion: rank {src} sent unit {header['index']}, expected "
                           f"{unit.index} ({unit.name}); the ranks planned differently.")
    tensors = {}
    for n, dt, shape in zip(header["names"], header["dtypes"], header["shapes"]):
        dtype = getattr(torch, dt)
        numel = 1
        for s in shape:
            numel *= s
        buf = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
        if numel:
            dist.recv(buf, src=src, group=group, tag=tag)
        tensors[n] = buf.view(dtype).reshape(shape)
    return UnitResult(unit.index, tensors, [_decision_of(d) for d in header["decisions"]], header["layouts"],
                      header["notes"], header["aliases"])


def _plan_digest(sp: Any) -> torch.Tensor:
    h = hashlib.sha256()
    for u in sp.units:
        h.update(json.dumps([u.name, u.keys, u.tensors, u.method]).encode())
    h.update(json.dumps(sp.state_keys).encode())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def unit_results(sp: Any, reader: Any, group, *, on_convert: Callable[[Any], None] | None = None,
                 ahead: int = 4) -> Callable[[Any], Any] | None:
    """Split ``sp``'s units across the ranks of ``group``.

    On rank 0: returns ``result_of(unit)`` for :func:`sparsify.streaming.ordered_tensors`, which
    converts rank 0's units and receives the others' in order, converting up to ``ahead`` of its
    own units ahead while another rank's is not in yet.  On every other rank: converts
    its units, sends each to rank 0 (converting up to ``ahead`` units before rank 0 takes them),
    and returns None when all are received.  Every rank must call it with the same plan (checked
    by digest first).
    """
    from .streaming import convert_unit

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = _plan_digest(sp)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if any(not torch.equal(e, every[0]) for e in every):
        raise ValueError("distributed conversion: the ranks built different plans (a different model, config "
                         "or sparsify version per rank); run the same command on every rank.")
    owners = assign_units(sp.units, world, writer_share=sum(u.nbytes for u in sp.units) / max(1, world) * 0.05)
    if rank == 0:
        mine_in_order = [u for u in sp.units if owners[u.index] == 0]
        ready: dict[int, Any] = {}   # rank 0's own units, converted ahead while another rank's was not in
        state = {"next": 0}          # position in mine_in_order of the next own unit not yet converted

        def convert_own(unit):
            if on_convert is not None:
                on_convert(unit)
            state["next"] += 1
            return canonical(convert_unit(sp, unit, reader))

        def result_of(unit):
            src = owners[unit.index]
            if src == 0:
                hit = ready.pop(unit.index, None)
                return hit if hit is not None else convert_own(unit)
            # Wait for another rank's unit by converting rank 0's next own ones meanwhile (at most
            # ``ahead`` of them held), so rank 0 is never idle while it could work.
            length = torch.empty(1, dtype=torch.int64)
            work = dist.irecv(length, src=src, group=group, tag=unit.index)
            while not work.is_completed() and len(ready) < ahead and state["next"] < len(mine_in_order):
                own = mine_in_order[state["next"]]
                ready[own.index] = convert_own(own)
            work.wait()
            return _recv_result(src, group, unit.index, unit, length)
        return result_of
    pending: list[list] = []
    for unit in sp.units:
        if owners[unit.index] != rank:
            continue
        if on_convert is not None:
            on_convert(unit)
        pending.append(_send_result(convert_unit(sp, unit, reader), 0, group, unit.index))
        while len(pending) > ahead:  # at most ``ahead`` converted units wait for rank 0
            for work, _ in pending.pop(0):
                work.wait()
    for sends in pending:
        for work, _ in sends:
            work.wait()
    return None
