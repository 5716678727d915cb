"""Process-group helpers for ``attnkit finetune`` under ``torchrun`` (no-ops for one process)."""

from __future__ import annotations

import os

import torch

__all__ = ["rank_and_world", "distributed", "barrier", "init_distributed", "from_rank0"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment (``(0, 1)`` for a single process)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if distributed():
        torch.distributed.barrier()


def init_distributed(world: int) -> None:
    """Set up the process group before anything touches ``--out`` (so rank 0 can decide and the
    others wait), the way the Trainer will (accelerate's ``PartialState``; it keeps a group that
    exists)."""
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return
    cpu = not torch.cuda.is_available()
    try:
        from accelerate import PartialState

        PartialState(cpu=True, backend="gloo") if cpu else PartialState()
    except (ImportError, TypeError):  # no accelerate, or one that takes other arguments
        pass
    if not torch.distributed.is_initialized():
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="gloo" if cpu else "nccl")


def from_rank0(fn):
    """``fn()`` on rank 0, its result (or its ``ValueError``) on every rank."""
    result, error = None, None
    if rank_and_world()[0] == 0:
        try:
            result = fn()
        except ValueError as e:
            error = str(e)
    if distributed():
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise ValueError(error)
    return result
