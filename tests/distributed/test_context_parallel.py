"""Multi-process context parallelism (gloo on localhost, float64) against one-process attnkit.

One spawn per world size runs every case (spawning dominates the cost); see workers.py.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import attnkit
from attnkit.distributed import plan

from .spawn import run
from .workers import count_sends, hf_llama, rejected, run_cases

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _band_cases(world: int, n: int, seed: int) -> list:
    """Band patterns, both layouts, GQA, padding; windows shorter and longer than a shard."""
    N = n * world
    shape = (2, 4, 2, N, 4)  # B, Hq, Hkv (GQA 2:1), N, D
    pats = {
        "dense": attnkit.Dense(),
        "causal": attnkit.Causal(),
        "window1": attnkit.SlidingWindow(1, 0),
        "window_gt_shard": attnkit.SlidingWindow(n + 3, 0),
        "window_2sided": attnkit.SlidingWindow(2, 3),
        "window_right_only": attnkit.SlidingWindow(0, n + 1),
    }
    cases = []
    for layout in ("contiguous", "zigzag"):
        for i, (name, pat) in enumerate(pats.items()):
            cases.append((name, pat, layout, shape, 0, seed + i))
            if name == "causal":
                # the last batch row's keys all padded on the first shard: its queries see nothing
                cases.append((name + "+pad_shard", pat, layout, shape, n, seed + 50 + i))
            if name in ("causal", "window1", "dense"):
                # pad = n // 2 keys at the start of the last batch row: with the 1-token window its
                # first rows see nothing (lse = -inf, o = 0, no NaN in the merge or the gradients).
                cases.append((name + "+pad", pat, layout, shape, max(n // 2, 1), seed + 100 + i))
    # An odd shard length (contiguous only: zigzag needs an even shard).
    odd = n + 1 if n % 2 == 0 else n
    for name, pat in (("causal_odd", attnkit.Causal()), ("window_odd", attnkit.SlidingWindow(2, 1)),
                      ("dense_odd", attnkit.Dense())):
        cases.append((name, pat, "contiguous", (1, 2, 1, odd * world, 3), 1, seed + 200, 0.7))
    return cases


def _sparse_cases(world: int, seed: int) -> list:
    N = 32 * world  # chunks of 16 (zigzag) / 32 (contiguous): block size 16 divides both
    import torch

    g = torch.Generator().manual_seed(seed)
    rand_layout = torch.rand(2, 4, N // 16, N // 16, generator=g) < 0.3  # per batch row and head
    return [
        ("bigbird", attnkit.bigbird(N, 16, num_heads=4), "contiguous", (1, 4, 2, N, 4), 0, seed),
        ("bigbird_causal", attnkit.bigbird(N, 16, num_heads=4, causal=True), "zigzag",
         (1, 4, 2, N, 4), 0, seed + 1),
        ("random+pad", attnkit.BlockSparse(rand_layout, 16), "zigzag", (2, 4, 4, N, 4), 5, seed + 2),
        ("random_causal", attnkit.BlockSparse(rand_layout, 16, causal=True), "contiguous",
         (2, 4, 4, N, 4), 0, seed + 3),
        ("longformer_masks", attnkit.longformer(N, 16, window=5, global_tokens=[3]), "zigzag",
         (1, 2, 1, N, 4), 0, seed + 4),
        ("strided_causal", attnkit.strided(N, 16, local_blocks=1, stride=3), "contiguous",
         (1, 2, 2, N, 4), 0, seed + 5),
    ]


def test_two_ranks_every_pattern_matches_one_process():
    errors = run(run_cases, 2, _band_cases(2, 6, 0) + _sparse_cases(2, 1))
    flat = [e for rank_errors in errors for e in rank_errors]
    assert not flat, "\n".join(flat)


def test_four_ranks_every_pattern_matches_one_process():
    # Ranks 1 and 3 also run through a group of their own (its ranks 0 and 1: peers are translated).
    subgroup = [("sub_causal", attnkit.Causal(), "zigzag", (1, 2, 1, 16, 4), 0, 30),
                ("sub_window", attnkit.SlidingWindow(3, 1), "contiguous", (1, 2, 2, 12, 4), 2, 31, 0.3)]
    # zigzag chunks of 4 under a +-1 window: rank 1 receives rank 2's rows 0 and 7 only (two
    # pieces of its shard), and sends their gradients back into those two places
    pieces = [("window_pieces", attnkit.SlidingWindow(1, 1), "zigzag", (1, 2, 1, 32, 4), 2, 40)]
    assert plan(pieces[0][1], 32, 4, "zigzag").ranges[1][2] == ((0, 1), (7, 8))
    errors = run(run_cases, 4, _band_cases(4, 4, 10) + _sparse_cases(4, 11) + pieces, subgroup)
    flat = [e for rank_errors in errors for e in rank_errors]
    assert not flat, "\n".join(flat)


def test_short_window_sends_to_its_neighbour_only():
    # A 2-token causal window over shards of 16: rank r needs the keys of rank r - 1 only.
    world, N = 4, 64
    results = run(count_sends, world, attnkit.SlidingWindow(2, 0), "contiguous", (1, 2, 1, N, 4), 3)
    # Only the 2 rows the window reaches travel: k, v fp64 [B = 1, Hkv = 1, 2, D = 4] + uint8 mask.
    kv_bytes = 2 * 1 * 1 * 2 * 4 * 8 + 1 * 2
    for rank, r in enumerate(results):
        want_peers = {rank + 1} if rank + 1 < world else set()
        assert r["plan_sends"] == want_peers
        assert r["peers_fwd"] == want_peers, (rank, r)
        # backward: the keys/values again to rank + 1, their gradients back from rank to rank - 1
        assert r["peers_bwd"] == want_peers | ({rank - 1} if rank > 0 else set()), (rank, r)
        assert r["counted_fwd"] == r["plan_fwd"] == kv_bytes * len(want_peers), (rank, r)
        grad_back = 2 * 1 * 1 * 2 * 4 * 8 if rank > 0 else 0  # dk, dv of those rows to rank - 1
        assert r["counted_bwd"] == r["plan_bwd"] == kv_bytes * len(want_peers) + grad_back, (rank, r)


def test_unservable_calls_are_rejected_on_every_rank():
    for unequal, mixed_mask, device in run(rejected, 2):
        assert "different shapes" in unequal and "equal-length shards" in unequal, unequal
        assert "valid_keys: some ranks pass a key mask and others do not" in mixed_mask, mixed_mask
        assert "CPU (gloo) or CUDA (nccl) tensors, got meta" in device, device


def test_tiny_llama_under_context_parallelism_matches_one_process():
    pytest.importorskip("transformers")
    errors = run(hf_llama, 2)
    flat = [e for rank_errors in errors for e in rank_errors]
    assert not flat, "\n".join(flat)
