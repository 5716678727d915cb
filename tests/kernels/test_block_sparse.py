"""Block-sparse attention on both backends against a float64 dense-mask oracle."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import BlockSparse, Causal, SlidingWindow, from_mask_fn
from tests.conftest import DEVICE
from tests.harness import max_err, tolerance

BACKENDS = ["triton", "torch"]


def layout_mask(layout: torch.Tensor, bs: int, nq: int, nk: int, causal: bool) -> torch.Tensor:
    """The definition: query i sees key j iff layout[..., i // bs, j // bs] (and j <= i + Nk - Nq)."""
    i = torch.arange(nq)
    j = torch.arange(nk)
    mask = layout[..., i // bs, :][..., j // bs]
    if causal:
        mask = mask & (j[None, :] <= i[:, None] + nk - nq)
    return mask


def oracle(q, k, v, mask, kpm=None):
    """Naive attention with a dense ``[B or 1, Hq or 1, Nq, Nk]`` mask, in the inputs' dtype
    (pass float64 copies). Differentiable; fully masked rows give 0 and LSE = -inf."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    ok = mask.expand(s.shape)
    if kpm is not None:
        ok = ok & kpm[:, None, None, :]
    any_ok = ok.any(-1, keepdim=True)
    s = torch.where(any_ok, s.masked_fill(~ok, float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * ok
    return p @ v, torch.where(any_ok[..., 0], lse, torch.full_like(lse, float("-inf")))


def check(pattern, mask, B=2, Hq=4, Hkv=2, nq=77, nk=77, D=32, dtype=torch.float32, kpm=None,
          backend="triton", cu=None, max_seqlen=None):
    q = torch.randn(B, Hq, nq, D, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, nk, D, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, nk, D, device=DEVICE, dtype=dtype, requires_grad=True)
    o, lse = attnkit.attention(q, k, v, pattern, valid_keys=kpm, cu_seqlens=cu,
                               max_seqlen=max_seqlen, backend=backend, return_lse=True)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_o, ref_lse = oracle(q64, k64, v64, mask.to(DEVICE), kpm)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref_o, (q64, k64, v64), do.double())
    # The same naive computation in the input dtype sets the error budget (flash-attention's rule).
    ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
    low_o, _ = oracle(ql, kl, vl, mask.to(DEVICE), kpm)
    low_grads = torch.autograd.grad(low_o, (ql, kl, vl), do)
    mag = float(ref_o.abs().max())
    assert max_err(o, ref_o) <= tolerance(dtype, max_err(low_o, ref_o), mag, 2.0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert max_err(lse, ref_lse) <= (1e-4 if dtype == torch.float32 else 2e-2)
    for name, g, rg, lg in zip("qkv", grads, ref_grads, low_grads, strict=True):
        assert torch.isfinite(g).all(), name
        tol = tolerance(dtype, max_err(lg, rg), float(rg.abs().max()), 3.0)
        assert max_err(g, rg) <= tol, f"d{name}: {max_err(g, rg):.3g} > {tol:.3g}"
    return o, lse


def random_layout(heads, nq, nk, bs, density=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(heads, math.ceil(nq / bs), math.ceil(nk / bs), generator=gen) < density


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("bs", "n"), [(16, 53), (32, 77), (64, 129)], ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_random_per_head_layouts_with_empty_rows(backend, bs, n, causal):
    layout = random_layout(4, n, n, bs, seed=bs)
    layout[1, 0] = False  # an empty row of blocks: zeros and LSE = -inf
    layout[2, :, 0] = False
    pattern = BlockSparse(layout, bs, causal=causal)
    o, lse = check(pattern, layout_mask(layout, bs, n, n, causal)[None], nq=n, nk=n,
                   backend=backend)
    assert torch.equal(o[:, 1, :bs], torch.zeros_like(o[:, 1, :bs]))
    assert torch.isneginf(lse[:, 1, :bs]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_layout_gqa_padding_and_nq_ne_nk(backend):
    nq, nk, bs = 40, 90, 32
    layout = random_layout(1, nq, nk, bs, density=0.6, seed=3)
    kpm = torch.ones(3, nk, dtype=torch.bool, device=DEVICE)
    kpm[0, 70:] = False
    kpm[1, :20] = False
    kpm[2] = False
    pattern = BlockSparse(layout, bs, causal=True)
    check(pattern, layout_mask(layout, bs, nq, nk, True)[None], B=3, Hq=4, Hkv=1, nq=nq, nk=nk,
          kpm=kpm, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(backend, dtype):
    layout = random_layout(2, 70, 70, 32, seed=5)
    check(BlockSparse(layout, 32), layout_mask(layout, 32, 70, 70, False)[None], Hq=2, Hkv=2,
          nq=70, nk=70, D=64, dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_with_batch_dim(backend):
    layout = torch.stack([random_layout(2, 50, 50, 16, seed=s) for s in (7, 8)])  # [B, H, R, C]
    check(BlockSparse(layout, 16), layout_mask(layout, 16, 50, 50, False), B=2, Hq=2, Hkv=1, nq=50,
          nk=50, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_packed_sequences(backend):
    lens = [20, 45, 7]
    bs = 16
    max_n = max(lens)
    layout = random_layout(2, max_n, max_n, bs, density=0.6, seed=11)
    pattern = BlockSparse(layout, bs, causal=True)
    cu = torch.tensor([0, 20, 65, 72], dtype=torch.int32, device=DEVICE)
    total = sum(lens)
    mask = torch.zeros(1, 2, total, total, dtype=torch.bool)
    for s, n in enumerate(lens):
        a = int(cu[s])
        mask[0, :, a : a + n, a : a + n] = layout_mask(layout, bs, n, n, True)[:, :n, :n]
    check(pattern, mask, B=1, Hq=2, Hkv=2, nq=total, nk=total, cu=cu, max_seqlen=max_n,
          backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_mask_fn_matches_causal_and_sliding_window(backend):
    n, bs = 70, 16
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE) for _ in range(3))
    causal = from_mask_fn(lambda i, j: j <= i, n, n, bs)
    window = from_mask_fn(lambda i, j: (j <= i) & (j >= i - 9), n, n, bs)
    torch.testing.assert_close(attnkit.attention(q, k, v, causal, backend=backend),
                               attnkit.attention(q, k, v, Causal(), backend=backend),
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(attnkit.attention(q, k, v, window, backend=backend),
                               attnkit.attention(q, k, v, SlidingWindow(9), backend=backend),
                               atol=2e-5, rtol=1e-4)


def test_from_mask_fn_flags_only_cut_blocks_as_partial():
    n, bs = 64, 16
    p = from_mask_fn(lambda i, j: j <= i, n, n, bs)
    part, masks = p.element_masks
    r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(p.layout[0, 0], c <= r)
    assert torch.equal(part[0] >= 0, r == c)  # only the diagonal is cut by the mask
    lists = p.compile(n, n, "cpu")
    assert masks.shape[0] == 4 and lists.masks.shape[0] == 1  # identical diagonals deduplicated
    assert p.visited_pairs(n, n) == n * (n + 1) // 2


def test_work_scales_with_nonzero_blocks():
    """The kernels walk exactly the listed blocks: at ~10% density, ~10% of the dense tiles."""
    n, bs = 1024, 64
    layout = random_layout(8, n, n, bs, density=0.1, seed=1)
    lists = BlockSparse(layout, bs).compile(n, n, "cpu")
    nnz = int(layout.sum())
    assert int(lists.kv_num.sum()) == nnz == int(lists.q_num.sum())
    assert lists.visited == nnz * bs * bs
    assert 0.05 < nnz / layout.numel() < 0.15
    # every listed block really is in the layout, in increasing order
    for h in range(8):
        for r in range(layout.shape[1]):
            cols = lists.kv_idx[h, r, : lists.kv_num[h, r]].tolist()
            assert cols == layout[h, r].nonzero().flatten().tolist()


def test_compiled_lists_are_cached_on_the_pattern():
    p = BlockSparse(random_layout(1, 64, 64, 32), 32)
    assert p.compile(64, 64, "cpu") is p.compile(64, 64, "cpu")


def test_bad_layouts():
    with pytest.raises(TypeError, match=r"layout must have dtype torch.bool.*got torch.float32"):
        BlockSparse(torch.ones(1, 2, 2), 32)
    with pytest.raises(ValueError, match=r"layout must be \[H or 1, ceil\(Nq/bs\), ceil\(Nk/bs\)\]"):
        BlockSparse(torch.ones(2, 2, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match=r"block_size must be a positive multiple of 16.*got 40"):
        BlockSparse(torch.ones(1, 2, 2, dtype=torch.bool), 40)
    with pytest.raises(TypeError, match=r"block_size must be an int"):
        BlockSparse(torch.ones(1, 2, 2, dtype=torch.bool), 32.0)
    q, k, v = (torch.randn(1, 2, 100, 16, device=DEVICE) for _ in range(3))
    wrong_n = BlockSparse(torch.ones(1, 3, 3, dtype=torch.bool), 32)  # built for N <= 96
    with pytest.raises(ValueError, match=r"layout has 3 x 3 blocks but this call needs .* 4 x 4"):
        attnkit.attention(q, k, v, wrong_n)
    heads = BlockSparse(torch.ones(3, 4, 4, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match=r"layout has 3 heads; it must have 1 or Hq = 2"):
        attnkit.attention(q, k, v, heads)
    cu = torch.tensor([0, 50, 100], dtype=torch.int32, device=DEVICE)
    causal = BlockSparse(torch.ones(1, 2, 2, dtype=torch.bool), 32, causal=True)
    with pytest.raises(ValueError, match=r"causal=True\) with cu_seqlens needs one packing"):
        attnkit.attention(q, k, v, causal, cu_seqlens=(cu, cu.clone()), max_seqlen=50)
