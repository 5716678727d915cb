"""The forward / dQ code paths added for Hopper, each taken for real and checked against the
float64 oracle: the one-loop walk when Nk is a multiple of the key tile (``EVEN``), the scale
folded into exp2 with a negative scale (moved into q on the host), longest-first causal query
blocks, the block-sparse full/partial split (a layout block hanging past the sequence end), and
which tile the autotuner is offered first on each path (no compile: the prune only)."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import BlockSparse, Causal, Dense
from attnkit.kernels.flash import tiles
from attnkit.kernels.flash.launch import FlashArgs, _Launch, _nk_align
from attnkit.kernels.flash.naive import attention_naive as attention_oracle
from attnkit.kernels.flash.spec import split_full_partial
from tests.conftest import DEVICE
from tests.harness import max_err


def _check(pattern, nq, nk, scale=None, valid_keys=None, hq=2, hkv=1, d=16):
    q = torch.randn(2, hq, nq, d, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, hkv, nk, d, device=DEVICE, requires_grad=True) for _ in range(2))
    o, lse = attnkit.attention(q, k, v, pattern, backend="triton", return_lse=True, scale=scale,
                               valid_keys=valid_keys)
    ref_o, ref_lse = attention_oracle(q, k, v, pattern, scale=scale, valid_keys=valid_keys)
    assert max_err(o, ref_o) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and max_err(lse, ref_lse) < 1e-5
    do = torch.randn_like(o)
    for g, rg in zip(torch.autograd.grad(o, (q, k, v), do),
                     torch.autograd.grad(ref_o, (q, k, v), do.double()), strict=True):
        assert max_err(g, rg) < 1e-4


def test_even_walk_is_taken_and_matches_the_oracle():
    """Nk = 64, a multiple of every key tile: the kernels compile the one unmasked loop; with a key
    mask that loop still applies it (rows attend to a padded batch row's first 37 keys)."""
    nk = 64
    assert _nk_align(FlashArgs(q=torch.empty(0), k=torch.empty(0), v=torch.empty(0)), nk, False) == 64
    assert tiles._INTERPRET_TILE[1] <= 64 and 64 % tiles._INTERPRET_TILE[1] == 0
    _check(Dense(), 40, nk)
    kpm = torch.ones(2, nk, dtype=torch.bool, device=DEVICE)
    kpm[1, 37:] = False
    _check(Dense(), 40, nk, valid_keys=kpm)


def test_band_edges_and_varlen_never_take_the_even_walk():
    empty = torch.empty(1, 1, 64, 16)
    assert _nk_align(FlashArgs(q=empty, k=empty, v=empty, right=0), 64, False) == 1  # causal
    assert _nk_align(FlashArgs(q=empty, k=empty, v=empty, left=8), 64, False) == 1
    assert _nk_align(FlashArgs(q=empty, k=empty, v=empty), 64, True) == 1  # packed lengths vary
    assert _nk_align(FlashArgs(q=empty, k=empty, v=empty), 50, False) == 1


def test_negative_and_zero_scale():
    """The folded softmax tracks the max of raw scores; a negative scale's sign moves into q."""
    _check(Dense(), 37, 53, scale=-0.4)
    _check(Dense(), 21, 48, scale=0.0)  # uniform attention; also the EVEN walk


def test_causal_longest_first_order():
    """Causal grids run the last query block first: several query blocks, Nq != Nk both ways."""
    _check(Causal(), 97, 120, hq=4, hkv=2)


def test_split_full_partial_puts_full_blocks_first_and_hanging_blocks_in_partial():
    # one layout row [0, 1, 2, 3] of bs 16 over nk = 50: block 3 (keys 48-63) hangs past nk,
    # block 1 has an element mask
    num = torch.tensor([[4, 2]], dtype=torch.int32)
    idx = torch.tensor([[[0, 1, 2, 3], [1, 3, 0, 0]]], dtype=torch.int32)
    part = torch.tensor([[[-1, 0, -1, -1], [-1, -1, -1, -1]]], dtype=torch.int32)
    n_full, sidx, spart = split_full_partial(num, idx, part, 16, 50)
    assert n_full.tolist() == [[2, 1]]
    assert sidx[0, 0].tolist() == [0, 2, 1, 3] and spart[0, 0].tolist() == [-1, -1, 0, -1]
    assert sidx[0, 1, :2].tolist() == [1, 3] and spart[0, 1, :2].tolist() == [-1, -1]


def test_block_sparse_with_a_block_hanging_past_the_sequence_end():
    """Full and partial lists through the kernels: Nk not a multiple of the block, a causal
    diagonal (partial blocks), a random layout (full blocks), and the split's lists on the
    launch."""
    nq, nk, bs = 40, 77, 32
    rows, cols = -(-nq // bs), -(-nk // bs)
    gen = torch.Generator().manual_seed(3)
    layout = torch.rand(1, 2, rows, cols, generator=gen) < 0.7
    layout[..., -1] = True  # every row visits the hanging last block
    for causal in (False, True):
        pattern = BlockSparse(layout, bs, causal=causal)
        _check(pattern, nq, nk)
    q = torch.empty(1, 2, nq, 16)
    k = torch.empty(1, 1, nk, 16)
    lists = pattern.compile(nq, nk, "cpu")
    a = FlashArgs(q=q, k=k, v=k, block_size=bs, layout_batch=1, layout_heads=2,
                  lists=(lists.kv_num, lists.kv_idx, lists.kv_part, lists.q_num, lists.q_idx,
                         lists.q_part, lists.masks))
    rl = _Launch(a).rows_lists
    ends = (rl["KV_IDX"].long() + 1) * bs
    for lay in range(2):
        for r in range(rows):
            n_full, num = int(rl["KV_NFULL"][lay, r]), int(rl["KV_NUM"][lay, r])
            assert (ends[lay, r, :n_full] <= nk).all() and (rl["KV_PART"][lay, r, :n_full] < 0).all()
            hang = ends[lay, r, n_full:num] > nk
            assert ((rl["KV_PART"][lay, r, n_full:num] >= 0) | hang).all()


def _first(tile_list, **flags):
    defaults = dict(BLOCK_D=128, SPARSE=False, BS=0, NK_ALIGN=1)
    kept = tiles._prune(tiles._configs(tile_list), {"Q": torch.empty(1, dtype=torch.bfloat16)},
                        **{**defaults, **flags})
    c = kept[0]
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def test_tiles_offered_first_per_path():
    """What the compile report measured spill-free at bf16 D = 128 (NOTES: Hopper forward / dQ)."""
    fwd = tiles._FWD_TILES
    assert _first(fwd, HAS_RIGHT=True) == (128, 128, 8, 2)  # causal
    assert _first(fwd, NK_ALIGN=128) == (128, 128, 8, 3)  # dense, whole 128-key tiles
    assert _first(fwd, NK_ALIGN=64) == (128, 64, 8, 3)  # ragged for 128: 88 B with 128x128
    assert _first(fwd, HAS_RIGHT=True, VARLEN=True) == (128, 64, 8, 3)
    assert _first(fwd, HAS_LEFT=True, HAS_RIGHT=True, HAS_KPM=True) == (128, 64, 8, 3)
    assert _first(fwd, HAS_LEFT=True, HAS_RIGHT=True, HAS_ALIBI=True) == (128, 64, 8, 2)
    assert _first(tiles._BWD_DQ_TILES, HAS_ALIBI=True) == (128, 64, 8, 2)
    assert _first(tiles._BWD_DQ_TILES, HAS_RIGHT=True) == (128, 64, 8, 3)
    # fp32 never gets the predicated 128x128 tiles (measured only for 2-byte operands)
    kept = tiles._prune(tiles._configs(fwd), {"Q": torch.empty(1)}, BLOCK_D=64, SPARSE=False,
                        BS=0, NK_ALIGN=128, HAS_RIGHT=True)
    assert all(c.offer is None for c in kept)


def test_tma_walk_matches_the_oracle(monkeypatch):
    """The EVEN walk with K/V through tensor descriptors (the GPU's default where strides allow):
    the interpreter runs descriptors too; fp16, since only the GPU branch is forced here and the
    interpreter's bf16 dots need the UPCAST that branch drops."""
    from attnkit.kernels.flash import launch, tma

    if not tma.AVAILABLE:
        pytest.skip("this triton has no tl.make_tensor_descriptor")
    monkeypatch.setattr(launch, "INTERPRET", False)
    q = torch.randn(1, 2, 40, 16, dtype=torch.float16, device=DEVICE)
    k, v = (torch.randn(1, 1, 64, 16, dtype=torch.float16, device=DEVICE) for _ in range(2))
    assert tma.tma_ok(k, v)
    o = attnkit.attention(q, k, v, Dense(), backend="triton")
    ref, _ = attention_oracle(q, k, v, Dense())
    assert max_err(o, ref) < 2e-3


def test_tma_needs_aligned_strides():
    from attnkit.kernels.flash import tma

    ok = torch.empty(1, 2, 64, 16, dtype=torch.bfloat16)
    assert tma.tma_ok(ok) == tma.AVAILABLE
    assert not tma.tma_ok(torch.empty(1, 2, 64, 12, dtype=torch.bfloat16))  # 24-byte rows
    assert not tma.tma_ok(ok.transpose(-1, -2))  # last stride not 1
    assert not tma.tma_ok(torch.empty(1, 2, 64, 16))  # fp32


def test_tma_allocator_keeps_a_users_own():
    from attnkit.kernels.flash import tma

    if not tma.AVAILABLE:
        pytest.skip("this triton has no tl.make_tensor_descriptor")
    var = tma._allocation._allocator
    saved = var.get()
    try:
        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)
        tma.triton.set_allocator(mine)
        tma.ensure_allocator()
        assert var.get() is mine
        var.set(tma._allocation._NULL_ALLOCATOR) if hasattr(tma._allocation, "_NULL_ALLOCATOR") \
            else None
        tma.ensure_allocator()
        assert var.get() is tma._torch_alloc or not hasattr(tma._allocation, "_NULL_ALLOCATOR")
    finally:
        var.set(saved)
