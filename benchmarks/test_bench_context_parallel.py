"""Context parallelism: per-rank communication and work (any machine), timing (multi-GPU only).

``pytest benchmarks/test_bench_context_parallel.py -s`` prints the planner's table (bytes each
rank sends, (query, key) pairs it computes) for causal, window and block-sparse patterns; the
bytes are what ``python -m attnkit.distributed.report --measure`` counts at ``torch.distributed``
in gloo processes (tests/distributed checks the two agree). On a machine with two or more GPUs
the second benchmark times forward + backward over NCCL; elsewhere it is skipped.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest
import torch

from attnkit.distributed.report import comm_table, default_patterns, format_table

WORLD, N = 4, 4096


def test_context_parallel_comm_table():
    rows = comm_table(WORLD, N, batch=1, kv_heads=8, head_dim=128, element_size=2)
    print(f"\nworld = {WORLD}, N = {N}, Hkv = 8, D = 128, bf16 (planner counts)")
    print(format_table(rows))
    patterns = default_patterns(N)
    served = [r for r in rows if "error" not in r]
    for name, pattern in patterns.items():
        for layout in ("contiguous", "zigzag"):
            mine = [r for r in served if r["pattern"] == name and r["layout"] == layout]
            if mine:  # every visible pair is computed by exactly one rank
                assert abs(sum(r["pairs"] for r in mine) - pattern.visited_pairs(N, N)) < 1e-6
    window = [r for r in served if r["pattern"].startswith("window") and r["layout"] == "contiguous"]
    assert all(len(r["sends_to"]) <= 1 for r in window)  # a window sends to its right neighbour only


def _time_rank(rank, world, port, outdir, seq_len, heads, kv_heads, head_dim, reps):
    import torch.distributed as dist

    from attnkit.distributed import context_parallel_attention, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    g = torch.Generator(device="cuda").manual_seed(0)
    full = [torch.randn(1, h, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
            for h in (heads, kv_heads, kv_heads)]
    lines = []
    for name, pattern in default_patterns(seq_len).items():
        for layout in ("contiguous", "zigzag"):
            try:
                mine = [shard(t, 2, layout).requires_grad_() for t in full]
                for i in range(reps + 2):  # two warm-up runs (Triton compiles, NCCL connects)
                    if i == 2:
                        torch.cuda.synchronize()
                        dist.barrier()
                        t0 = time.perf_counter()
                    o = context_parallel_attention(*mine, pattern, layout=layout)
                    o.sum().backward()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / reps * 1e3
                lines.append(f"{name:28s} {layout:10s} rank {rank}: fwd+bwd {ms:8.2f} ms")
            except ValueError as e:
                lines.append(f"{name:28s} {layout:10s} rank {rank}: not served ({e})")
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"{rank}.txt"), "w") as f:
        f.write("\n".join(lines))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="timing context parallelism needs >= 2 GPUs")
def test_context_parallel_timing_nccl():
    import torch.multiprocessing as mp

    world = min(torch.cuda.device_count(), 8)
    seq_len = 32768
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_time_rank, args=(world, port, outdir, seq_len, 32, 8, 128, 5), nprocs=world, join=True)
        for r in range(world):
            with open(os.path.join(outdir, f"{r}.txt")) as f:
                print(f.read())
