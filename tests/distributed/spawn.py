"""Run a worker in ``world`` gloo processes on localhost and collect what each rank reports.

Spawning costs seconds (every process imports torch), so each test runs many cases in one spawn;
a worker returns a list of failure messages instead of raising at the first one, so one run
reports every broken case.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, fn, args) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run(fn, world: int, *args) -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own gloo process."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_entry, args=(world, _free_port(), outdir, fn, args), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results
