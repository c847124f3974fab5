"""Converted models across processes: checks that every rank holds the same block patterns.

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
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["check_layouts_replicated", "pattern_buffers"]


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
