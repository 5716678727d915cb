"""Communication and work per rank of context-parallel attention: a table from the planner, and
optionally the bytes counted at ``torch.distributed`` in real gloo processes on this machine.

    python -m attnkit.distributed.report --world 4 --seq 4096
    python -m attnkit.distributed.report --world 4 --seq 1024 --measure   # spawns 4 gloo ranks

Columns: the ranks a rank sends its keys/values to, the bytes it sends in the forward and in
forward + backward (keys/values are re-fetched in the backward, and key/value gradients of the
shards it received go back to their owners in fp32), and the (query, key) pairs it computes per
(batch row, head), also as a share of what dense attention over its queries would compute.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile

import torch

from .. import Causal, Dense, SlidingWindow, bigbird, strided  # attnkit's public API only
from .planner import LAYOUTS, plan

__all__ = ["default_patterns", "comm_table", "format_table", "measure"]


def default_patterns(seq_len: int, block_size: int = 64) -> dict:
    """The patterns of the report: dense, causal, a 128-token causal window, BigBird, strided."""
    return {
        "dense": Dense(),
        "causal": Causal(),
        "window(127,0)": SlidingWindow(127, 0),
        f"bigbird(bs={block_size})": bigbird(seq_len, block_size),
        f"strided(bs={block_size},causal)": strided(seq_len, block_size, local_blocks=2, stride=8),
    }


def comm_table(world: int, seq_len: int, *, batch: int = 1, kv_heads: int = 8, head_dim: int = 128,
               element_size: int = 2, patterns: dict | None = None, layouts=LAYOUTS) -> list[dict]:
    """One row per (pattern, layout, rank) with the planner's sends, bytes and pair counts."""
    patterns = patterns if patterns is not None else default_patterns(seq_len)
    rows = []
    for name, pattern in patterns.items():
        for layout in layouts:
            try:
                p = plan(pattern, seq_len, world, layout)
            except ValueError as e:  # e.g. a block size that does not divide zigzag's chunks
                rows.append({"pattern": name, "layout": layout, "rank": "-", "error": str(e)})
                continue
            kw = dict(batch=batch, kv_heads=kv_heads, head_dim=head_dim, element_size=element_size)
            n = p.shard_len
            for r in range(world):
                pairs = p.pairs_computed(r)
                rows.append({
                    "pattern": name, "layout": layout, "rank": r, "sends_to": list(p.sends[r]),
                    "fwd_bytes": p.bytes_sent(r, **kw),
                    "fwd_bwd_bytes": p.bytes_sent(r, backward=True, **kw),
                    "pairs": pairs, "pairs_vs_dense": pairs / (n * seq_len),
                })
    return rows


def _mib(x: int) -> str:
    return f"{x / 2**20:.2f}"


def format_table(rows: list[dict], measured: dict | None = None) -> str:
    """A markdown table of :func:`comm_table` rows (and measured bytes, when given)."""
    head = ["pattern", "layout", "rank", "sends to", "fwd MiB", "fwd+bwd MiB", "pairs (k)", "% of dense"]
    if measured:
        head += ["measured fwd / fwd+bwd MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['pattern']} | {row['layout']} | - | not served: {row['error']} |")
            continue
        cells = [row["pattern"], row["layout"], str(row["rank"]), str(row["sends_to"]) or "[]",
                 _mib(row["fwd_bytes"]), _mib(row["fwd_bwd_bytes"]), f"{row['pairs'] / 1e3:.1f}",
                 f"{100 * row['pairs_vs_dense']:.1f}"]
        if measured:
            m = measured.get((row["pattern"], row["layout"], row["rank"]))
            cells.append("-" if m is None else f"{_mib(m[0])} / {_mib(m[0] + m[1])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _measure_rank(rank, world, port, outdir, seq_len, batch, heads, kv_heads, head_dim, names):
    import pickle

    import torch.distributed as dist

    from .comm import shard
    from .ring import context_parallel_attention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    real = dist.batch_isend_irecv
    sent = {"fwd": 0, "bwd": 0}
    phase = ["fwd"]

    def counting(ops):
        sent[phase[0]] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops
                              if op.op is dist.isend)
        return real(ops)

    dist.batch_isend_irecv = counting
    out = {}
    patterns = default_patterns(seq_len)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, seq_len, head_dim, generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_heads, seq_len, head_dim, generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    for name in names:
        for layout in LAYOUTS:
            try:
                plan(patterns[name], seq_len, world, layout)
            except ValueError:
                continue
            sent.update(fwd=0, bwd=0)
            mine = [shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
            phase[0] = "fwd"
            o = context_parallel_attention(*mine, patterns[name], layout=layout)
            phase[0] = "bwd"
            o.float().sum().backward()
            out[(name, layout, rank)] = (sent["fwd"], sent["bwd"])
    dist.batch_isend_irecv = real
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)


def measure(world: int, seq_len: int, *, batch: int = 1, heads: int = 2, kv_heads: int = 2,
            head_dim: int = 64) -> dict:
    """Bytes each rank posts with ``isend`` in one forward and one backward (bf16 keys/values),
    counted in ``world`` gloo processes on this machine: ``{(pattern, layout, rank): (fwd, bwd)}``."""
    import pickle

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names = list(default_patterns(seq_len))
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_measure_rank, args=(world, port, outdir, seq_len, batch, heads, kv_heads, head_dim, names),
                 nprocs=world, join=True)
        merged = {}
        for r in range(world):
            with open(os.path.join(outdir, f"{r}.pkl"), "rb") as f:
                merged.update(pickle.load(f))
    return merged


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--measure", action="store_true",
                    help="also count the bytes in real gloo processes (CPU; small heads, bf16)")
    args = ap.parse_args(argv)
    measured = None
    if args.measure:
        # The measured run uses 2 KV heads of 64 (CPU-sized); the table is then planned the same way.
        args.kv_heads, args.head_dim = 2, 64
        measured = measure(args.world, args.seq, batch=args.batch, kv_heads=args.kv_heads,
                           head_dim=args.head_dim)
    rows = comm_table(args.world, args.seq, batch=args.batch, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, element_size=2)
    print(f"world = {args.world}, N = {args.seq}, B = {args.batch}, Hkv = {args.kv_heads}, "
          f"D = {args.head_dim}, bf16 keys/values, fp32 gradients")
    print(format_table(rows, measured))


if __name__ == "__main__":
    main()
