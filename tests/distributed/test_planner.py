"""The planner's algebra, in one process: every rank's pairs, run with the public
:func:`attnkit.attention` and merged by LSE, must reproduce the whole-sequence result rows; the
send lists and pair counts must be what the pattern implies."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.distributed import merge_partial, plan, shard
from attnkit.distributed.planner import take_rows
from attnkit.distributed.ring import attend_pair


def _simulate(q, k, v, pattern, world, layout, valid=None):
    """What every rank computes, without communication: ``[(o, lse)]`` per rank."""
    p = plan(pattern, q.shape[2], world, layout)
    out = []
    for r in range(world):
        qs = shard(q, 2, layout, rank=r, world_size=world)
        o = torch.zeros_like(qs)
        lse = torch.full(qs.shape[:3], float("-inf"), dtype=torch.float64)
        for pair in p.pairs[r]:
            pieces = p.ranges[r][pair.src]  # the rows of the source shard that travel

            def sent(x, dim, src=pair.src, pieces=pieces):
                return take_rows(shard(x, dim, layout, rank=src, world_size=world), pieces, dim)

            ks, vs = sent(k, 2), sent(v, 2)
            (q0, q1), (k0, k1) = pair.q_rows, pair.k_cols
            m = None if valid is None else sent(valid, 1)[:, k0:k1]
            o_i, lse_i = attend_pair(qs[:, :, q0:q1], ks[:, :, k0:k1], vs[:, :, k0:k1], pair.pattern,
                                     None, m, "torch")
            merge_partial(o[:, :, q0:q1], lse[:, :, q0:q1], o_i, lse_i)
        out.append((o, lse))
    return p, out


def _compare(q, k, v, pattern, world, layout, valid=None):
    o_ref, lse_ref = attend_pair(q, k, v, pattern, None, valid, "torch")  # the whole sequence
    p, out = _simulate(q, k, v, pattern, world, layout, valid)
    for r, (o, lse) in enumerate(out):
        want_o = shard(o_ref, 2, layout, rank=r, world_size=world)
        want_l = shard(lse_ref, 2, layout, rank=r, world_size=world)
        assert not torch.isnan(o).any() and not torch.isnan(lse).any()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_l)), (pattern, world, layout, r)
        torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-6, msg=f"{pattern} {world} {layout} {r}")
        fin = torch.isfinite(want_l)
        torch.testing.assert_close(lse[fin], want_l[fin].double(), rtol=1e-5, atol=1e-6)
    return p


WINDOWS = [(0, 0), (1, 0), (3, 0), (5, 0), (6, 0), (7, 0), (13, 0), (40, 0), (0, 2), (2, 2), (0, 7),
           (5, 6), (6, 11), (1, 30)]


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (2, "contiguous"), (3, "contiguous"),
                                          (4, "contiguous"), (2, "zigzag"), (3, "zigzag"), (4, "zigzag")])
def test_band_patterns_every_window_match_one_process(world, layout):
    N = 24 if world != 3 else 18  # shards of 6..24 rows, chunks of 3..12: windows cross 0..4 chunks
    q = torch.randn(1, 2, N, 3, dtype=torch.float64)
    k, v = torch.randn(2, 1, 1, N, 3, dtype=torch.float64)
    pats = [attnkit.Dense(), attnkit.Causal()] + [attnkit.SlidingWindow(a, b) for a, b in WINDOWS]
    for pat in pats:
        p = _compare(q, k, v, pat, world, layout)
        # no pair is computed twice, none is missed: the per-rank counts add up to the pattern's
        assert sum(p.pairs_computed(r) for r in range(world)) == pat.visited_pairs(N, N)


def test_odd_shards_and_padding():
    world, N = 3, 15  # shards of 5
    q, k, v = torch.randn(3, 2, 4, N, 3, dtype=torch.float64)
    valid = torch.rand(2, N) < 0.6
    valid[1, :7] = False  # rows of the first shards see nothing under a short window
    for pat in (attnkit.Causal(), attnkit.SlidingWindow(1, 0), attnkit.SlidingWindow(2, 4), attnkit.Dense()):
        _compare(q, k[:, :2], v[:, :2], pat, world, "contiguous", valid)


def _sparse_patterns(N):
    g = torch.Generator().manual_seed(3)
    lay = torch.rand(2, 2, N // 16, N // 16, generator=g) < 0.35
    return [attnkit.bigbird(N, 16, num_heads=2), attnkit.bigbird(N, 16, num_heads=2, causal=True),
            attnkit.BlockSparse(lay, 16), attnkit.BlockSparse(lay, 16, causal=True),
            attnkit.longformer(N, 16, window=9, global_tokens=[2, 40]),
            attnkit.from_mask_fn(lambda i, j: (i - j).abs() % 7 < 2, N, N, 16, causal=True),
            attnkit.strided(N, 16, local_blocks=2, stride=3)]


@pytest.mark.parametrize("world,layout", [(2, "contiguous"), (4, "contiguous"), (2, "zigzag"),
                                          (4, "zigzag")])
def test_block_sparse_matches_one_process(world, layout):
    N = 128
    q = torch.randn(2, 2, N, 3, dtype=torch.float64)
    k, v = torch.randn(2, 2, 1, N, 3, dtype=torch.float64)
    for pat in _sparse_patterns(N):
        p = _compare(q, k, v, pat, world, layout)
        total = sum(p.pairs_computed(r) for r in range(world))
        assert abs(total - pat.visited_pairs(N, N)) < 1e-9, pat


def test_short_window_plans_neighbour_sends_only():
    N, world = 64, 4  # shards of 16, window of 3
    p = plan(attnkit.SlidingWindow(2, 0), N, world, "contiguous")
    assert p.sends == ((1,), (2,), (3,), ())
    assert p.recvs == ((), (0,), (1,), (2,))
    assert p.rounds[1] == {1: (2, 0)} and p.rounds[0] == {1: (1, None)}
    # queries of rank r reach only the last 2 keys of rank r - 1, and only those travel
    assert p.ranges[1] == {1: ((0, 16),), 0: ((14, 16),)}
    assert [(x.src, x.q_rows, x.k_cols) for x in p.pairs[1]] == [(1, (0, 16), (0, 16)), (0, (0, 2), (0, 2))]
    kw = dict(batch=2, kv_heads=4, head_dim=8, element_size=2)
    assert p.bytes_sent(0, **kw) == 2 * 2 * 4 * 2 * 8 * 2  # k and v, B = 2, Hkv = 4, 2 rows, D = 8, bf16
    assert p.bytes_sent(3, **kw) == 0
    # backward: the 2 rows again, plus rank 1's fp32 gradients of rank 0's 2 rows back to rank 0
    assert p.bytes_sent(1, backward=True, **kw) == 2 * (2 * 2 * 4 * 2 * 8 * 2) + 2 * 2 * 4 * 2 * 8 * 4
    two_sided = plan(attnkit.SlidingWindow(2, 2), N, world, "contiguous")
    assert two_sided.sends == ((1,), (0, 2), (1, 3), (2,))
    # zigzag, two-sided: rank 1 (chunks 1, 6 of 8) needs the head of chunk 2 and the tail of
    # chunk 5, both on rank 2 (chunks 2, 5): two pieces, not the 16 rows between them
    z = plan(attnkit.SlidingWindow(2, 2), N, world, "zigzag")
    assert z.ranges[1][2] == ((0, 2), (14, 16))
    # rank 3 (chunks 3, 4) needs chunk 2's tail and chunk 5's head: adjacent in rank 2's shard
    assert z.ranges[3][2] == ((6, 10),)
    # rank 2 sends 4 rows to rank 1 and 4 to rank 3, k and v of one byte each
    assert z.bytes_sent(2, batch=1, kv_heads=1, head_dim=1, element_size=1) == 2 * (4 + 4)


def test_causal_plans():
    p = plan(attnkit.Causal(), 32, 4, "contiguous")
    assert p.recvs == ((), (0,), (0, 1), (0, 1, 2))
    assert p.sends == ((1, 2, 3), (2, 3), (3,), ())
    z = plan(attnkit.Causal(), 32, 4, "zigzag")
    # zigzag: everyone needs everyone, but the work is balanced
    counts = [z.pairs_computed(r) for r in range(4)]
    assert max(counts) == min(counts)
    assert [p.pairs_computed(r) for r in range(4)] == [36, 100, 164, 228]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="layout must be one of"):
        plan(attnkit.Causal(), 32, 4, "ring")
    with pytest.raises(ValueError, match="seq_len.*multiple of 8"):
        plan(attnkit.Causal(), 36, 4, "zigzag")
    with pytest.raises(ValueError, match="block_size = 16 must divide the chunk length 8"):
        plan(attnkit.bigbird(64, 16), 64, 4, "zigzag")
    with pytest.raises(ValueError, match="layout of the whole sequence"):
        plan(attnkit.bigbird(64, 16), 128, 2, "contiguous")
    with pytest.raises(TypeError, match="pattern must be"):
        plan("causal", 32, 2)

    class Custom(attnkit.Pattern):
        pass

    with pytest.raises(TypeError, match="Custom"):
        plan(Custom(), 32, 2)
    with pytest.raises(ValueError, match="world"):
        plan(attnkit.Causal(), 32, 0)
    with pytest.raises(ValueError, match="rank and world_size go together"):
        shard(torch.zeros(1, 1, 8, 1), rank=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        shard(torch.zeros(1, 1, 6, 1), 2, "zigzag", rank=0, world_size=2)


def test_merge_of_empty_partials_is_nan_free():
    o = torch.zeros(1, 1, 3, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    merge_partial(o, lse, torch.zeros(1, 1, 3, 2), torch.full((1, 1, 3), float("-inf")))
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    merge_partial(o, lse, torch.ones(1, 1, 3, 2), torch.tensor([[[0.0, float("-inf"), 1.0]]]))
    assert torch.equal(o[0, 0, :, 0], torch.tensor([1.0, 0.0, 1.0]))
    assert lse[0, 0, 1] == float("-inf") and lse[0, 0, 0] == 0.0


def test_shard_layouts():
    x = torch.arange(16).view(1, 1, 16, 1)
    got = [shard(x, 2, "zigzag", rank=r, world_size=4).flatten().tolist() for r in range(4)]
    assert got == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    got = [shard(x, 2, "contiguous", rank=r, world_size=2).flatten().tolist() for r in range(2)]
    assert got == [list(range(8)), list(range(8, 16))]
