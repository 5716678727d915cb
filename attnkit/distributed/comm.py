"""Process groups, point-to-point batches, and :func:`shard` / :func:`unshard`.

Transfers are posted with :func:`torch.distributed.batch_isend_irecv`, one batch per round (a
round pairs every rank ``r`` with ``r + k`` and ``r - k``). Every rank posts its rounds in
increasing order and only waits on a round after posting the next one, so the peers of a round
have always posted it too: no deadlock on gloo, and on NCCL each batch is one grouped launch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .planner import check_layout, chunks_of

__all__ = ["group_info", "check_backend", "P2PBatch", "shard", "unshard"]


def group_info(group) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (``None`` = the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "group: torch.distributed is not initialized; call torch.distributed.init_process_group "
            "(backend 'nccl' for CUDA tensors, 'gloo' for CPU tensors) on every rank first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def check_backend(group, device: torch.device) -> None:
    """ValueError unless the group's backend can move tensors on ``device``."""
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cuda":
        if "nccl" not in backend:
            raise ValueError(
                f"group: CUDA tensors need an 'nccl' process group, this one is {backend!r}"
            )
    elif device.type == "cpu":
        if "gloo" not in backend:
            raise ValueError(f"group: CPU tensors need a 'gloo' process group, this one is {backend!r}")
    else:
        raise ValueError(f"q: context parallelism serves CPU (gloo) or CUDA (nccl) tensors, got {device}")


def _global(group, rank: int) -> int:
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


class P2PBatch:
    """One posted batch of sends and receives; :meth:`wait` blocks until all completed.

    Sent tensors are referenced until then, so they are not freed mid-transfer."""

    def __init__(self, group, sends: list[tuple[torch.Tensor, int, int]],
                 recvs: list[tuple[torch.Tensor, int, int]]):
        ops = [dist.P2POp(dist.isend, t, _global(group, peer), group, tag) for t, peer, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, _global(group, peer), group, tag) for t, peer, tag in recvs]
        self._keep = [t for t, _, _ in sends]
        self._works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []
        self._keep = []


def _pieces(full_len: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    nchunks = world if layout == "contiguous" else 2 * world
    if full_len % nchunks:
        raise ValueError(
            f"x: the sequence length {full_len} must be a multiple of {nchunks} to shard over "
            f"world = {world} ranks with layout {layout!r}"
        )
    c = full_len // nchunks
    return [(ch * c, ch * c + c) for ch in chunks_of(rank, world, layout)]


def _resolve(group, rank, world_size) -> tuple[int, int]:
    if rank is None and world_size is None:
        return group_info(group)
    if rank is None or world_size is None:
        raise ValueError("rank and world_size go together: give both, or neither (then group's)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    return rank, world_size


def shard(x: torch.Tensor, dim: int = 2, layout: str = "contiguous", *, group=None,
          rank: int | None = None, world_size: int | None = None) -> torch.Tensor:
    """This rank's piece of a full-sequence tensor ``x`` (sequence along ``dim``; ``dim = 2`` for
    ``[B, H, N, D]``, ``dim = 1`` for ``[B, N]`` ids or masks): ``[..., N / world, ...]``.

    ``rank``/``world_size`` default to this process's in ``group`` (so no process group is needed
    when both are given)."""
    layout = check_layout(layout)
    rank, world = _resolve(group, rank, world_size)
    parts = [x.narrow(dim, lo, hi - lo) for lo, hi in _pieces(x.shape[dim], world, rank, layout)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()


def unshard(x: torch.Tensor, dim: int = 2, layout: str = "contiguous", *, group=None) -> torch.Tensor:
    """All-gather every rank's shard ``x`` and put the pieces back in sequence order: the inverse
    of :func:`shard` (a collective: every rank of ``group`` must call it). Not differentiable."""
    layout = check_layout(layout)
    rank, world = group_info(group)
    src = x.detach().contiguous()
    is_bool = src.dtype == torch.bool
    if is_bool:  # not every backend reduces/gathers bool
        src = src.to(torch.uint8)
    gathered = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(gathered, src, group=group)
    n = src.shape[dim]
    full = [None] * (world if layout == "contiguous" else 2 * world)
    for r, piece in enumerate(gathered):
        chunks = chunks_of(r, world, layout)
        c = n // len(chunks)
        for i, ch in enumerate(chunks):
            full[ch] = piece.narrow(dim, i * c, c)
    out = torch.cat(full, dim)
    return out.to(torch.bool) if is_bool else out
