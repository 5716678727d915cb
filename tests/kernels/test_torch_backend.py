"""The torch backend's fused CPU path (``torch_fused.py``) against the float64 oracle.

Cases are chosen to reach every piece the planner makes: the left edge run flipped, the right
edge on the kernel's causal flag, the mask-free interior, masked rectangles at sequence ends,
narrow bands, ``Nq != Nk`` both ways (rows that see nothing), key padding with a fully padded
row, varlen with an empty sequence and a packed tail, GQA/MQA, fp32/bf16/fp16/fp64. Gradients
are checked both through ``O`` only (the plain fused backward) and through ``O`` and the LSE (the
extra-column path), and a fully masked row must give zeros, LSE = -inf and finite gradients.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import BlockSparse, Causal, Dense, SlidingWindow
from attnkit.kernels.flash import torch_fused, torch_plan, torch_stack
from attnkit.kernels.flash.naive import attention_naive
from tests.harness import assert_close_to_oracle, cpu_qkv, max_err, padding_mask

# (id, B, Hq, Hkv, Nq, Nk, D, pattern, padding, seqlens)
CASES = [
    ("dense-odd", 2, 4, 2, 77, 77, 40, Dense(), False, None),
    ("causal-nq<nk", 1, 4, 1, 37, 150, 64, Causal(), False, None),
    ("causal-nq>nk", 1, 2, 2, 150, 37, 64, Causal(), False, None),  # 113 rows see nothing
    ("window40", 1, 2, 2, 301, 301, 64, SlidingWindow(40), False, None),  # flip + causal + mask
    ("window33x9", 2, 4, 2, 210, 210, 32, SlidingWindow(33, 9), False, None),  # interior too
    ("window70x0-nq<nk", 1, 2, 1, 130, 260, 64, SlidingWindow(70), False, None),
    ("window50-nq>nk", 1, 2, 2, 260, 120, 48, SlidingWindow(50, 3), False, None),
    ("window3x2", 1, 2, 2, 90, 90, 64, SlidingWindow(3, 2), False, None),  # narrow: masked
    ("window0x40", 1, 2, 2, 150, 150, 64, SlidingWindow(0, 40), False, None),  # anti-causal
    ("causal-padded", 3, 4, 2, 100, 100, 64, Causal(), True, None),
    ("window40-padded", 3, 2, 1, 180, 180, 64, SlidingWindow(40), True, None),
    ("dense-padded", 3, 2, 2, 65, 65, 64, Dense(), True, None),
    ("varlen-causal", 1, 4, 2, 210, 210, 64, Causal(), False, [70, 0, 120]),  # + tail of 20
    ("varlen-window", 1, 2, 2, 230, 230, 64, SlidingWindow(35), False, [100, 0, 130]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


_inputs = cpu_qkv


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused kernel's forward calls, so a case cannot pass on the generic path."""
    calls = []
    real = torch_fused._ops

    def counting():
        op = real()
        return lambda *a, **kw: calls.append(1) or op(*a, **kw)

    monkeypatch.setattr(torch_fused, "_ops", counting)
    return calls


@pytest.mark.parametrize("with_lse", [False, True], ids=["grad-o", "grad-o-lse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_path_matches_oracle(case, dtype, with_lse, fused_calls):
    _, B, Hq, Hkv, Nq, Nk, D, pattern, padded, seqlens = case
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype)
    kpm = padding_mask(B, Nk, "cpu") if padded else None
    cu = None
    if seqlens is not None:
        cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    o, lse = attnkit.attention(q, k, v, pattern, valid_keys=kpm, cu_seqlens=cu,
                               max_seqlen=max(seqlens) if seqlens else None, backend="torch",
                               return_lse=True)
    assert fused_calls, "the fused CPU kernel was not used"
    ref_o, ref_lse = attention_naive(q, k, v, pattern, valid_keys=kpm, cu_seqlens=cu)
    low_o, low_lse = attention_naive(q, k, v, pattern, valid_keys=kpm, cu_seqlens=cu,
                                     dtype=dtype)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "empty rows must be -inf"
    assert_close_to_oracle("o", o, ref_o, low_o, dtype, 2.0)
    assert max_err(lse, ref_lse) <= (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2)

    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2))

    def loss(out, out_lse):
        total = (out.double() * do.double()).sum()
        if with_lse:
            finite = torch.isfinite(out_lse)
            total = total + (torch.where(finite, out_lse.double(), 0.0) * dlse.double()).sum()
        return total

    grads = torch.autograd.grad(loss(o, lse), (q, k, v))
    ref = torch.autograd.grad(loss(ref_o, ref_lse), (q, k, v))
    low = torch.autograd.grad(loss(low_o, low_lse), (q, k, v))
    for name, g, rg, lg in zip("qkv", grads, ref, low, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all(), f"d{name} not finite"
        assert_close_to_oracle(f"d{name}", g, rg, lg, dtype, 3.0)


def test_fully_masked_rows_are_zero_with_finite_zero_gradients():
    q, k, v = _inputs(3, 2, 2, 40, 40, 64, torch.float32)
    kpm = padding_mask(3, 40, "cpu")  # row 2 fully padded
    o, lse = attnkit.attention(q, k, v, Causal(), valid_keys=kpm, backend="torch",
                               return_lse=True)
    assert torch.equal(o[2], torch.zeros_like(o[2]))
    assert torch.isneginf(lse[2]).all()
    gq, gk, gv = torch.autograd.grad(o.sum(), (q, k, v))
    for g in (gq, gk, gv):
        assert torch.isfinite(g).all()
    assert torch.equal(gq[2], torch.zeros_like(gq[2]))
    assert torch.equal(gv[2], torch.zeros_like(gv[2]))


@pytest.mark.parametrize("chunk", [torch_plan.STACK_CHUNK_MATMUL, torch_plan.STACK_CHUNK_FUSED])
def test_window_plan_visits_each_pair_once(chunk):
    """The pieces of a band tile exactly its visible pairs: no pair twice, none missed (a piece
    is counted by its visible pairs: causal/flip triangles, full rectangles, masks), with the
    stack chunks of either executor."""
    for pattern, nq, nk in [(SlidingWindow(255), 4096, 4096), (SlidingWindow(40, 9), 301, 333),
                            (Causal(), 300, 200), (SlidingWindow(3, 2), 90, 90)]:
        spec = pattern.compile(nq, nk, "cpu")
        seen = torch.zeros(nq, nk, dtype=torch.int32)
        for p in torch_plan._plan(spec, 0, nq, 0, nk, chunk):
            r, c = p.r1 - p.r0, p.k1 - p.k0
            if p.mode == "full":
                m = torch.ones(r, c, dtype=torch.bool)
            elif p.mode == "causal":
                m = torch.ones(r, c, dtype=torch.bool).tril()
            elif p.mode == "flip":
                m = torch.ones(r, c, dtype=torch.bool).triu()
            elif p.mode == "stack":  # chunks of n rows over overlapping windows of L keys
                n, L = p.band.shape
                for i in range((p.r1 - p.r0) // n):
                    r, k0 = p.r0 + i * n, p.k0 + i * n
                    seen[r:r + n, k0:k0 + L] += p.band.int()
                continue
            else:
                m = p.band
            seen[p.r0:p.r1, p.k0:p.k1] += m.int()
        assert torch.equal(seen.bool(), spec.visible(nq, nk)[0]), pattern
        assert int(seen.max()) <= 1, f"{pattern}: a pair visited twice"


def test_generic_path_serves_what_the_fused_kernel_cannot(monkeypatch):
    """A dtype or device the CPU kernel does not take runs the chunked generic path."""
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    assert torch_fused.fused_available(q, k)
    assert not torch_fused.fused_available(q.to(torch.int32), k)
    assert not torch_fused.fused_available(q.to("meta"), k.to("meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_sparse_fused_matches_oracle(dtype):
    torch.manual_seed(0)
    bs, n = 32, 150
    layout = torch.rand(2, -(-n // bs), -(-n // bs)) < 0.5
    layout[:, :, 0] = True
    layout[1, 2] = False  # an empty block row
    pattern = BlockSparse(layout, bs, causal=True)
    q, k, v = _inputs(2, 2, 1, n, n, 64, dtype)
    kpm = padding_mask(2, n, "cpu")
    o, lse = attnkit.attention(q, k, v, pattern, valid_keys=kpm, backend="torch",
                               return_lse=True)
    mask = pattern.compile(n, n, "cpu").visible(n, n).reshape(1, 2, n, n)
    ref_o, ref_lse = attention_naive(q, k, v, mask=mask, valid_keys=kpm)
    low_o, _ = attention_naive(q, k, v, mask=mask, valid_keys=kpm, dtype=dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert_close_to_oracle("o", o, ref_o, low_o, dtype, 2.0)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = torch.autograd.grad(ref_o, (q, k, v), do.double())
    low = torch.autograd.grad(attention_naive(q, k, v, mask=mask, valid_keys=kpm,
                                              dtype=dtype)[0], (q, k, v), do)
    for name, g, rg, lg in zip("qkv", grads, ref, low, strict=True):
        assert torch.isfinite(g).all()
        assert_close_to_oracle(f"d{name}", g, rg, lg, dtype, 3.0)


def test_window_split_into_many_stack_calls(monkeypatch):
    """A window cut into several stack calls (forward 2 chunks, backward 1 chunk per call) and key
    padding that hides whole windows: the same answer as the oracle, forward and gradients, no
    NaN on rows that see nothing."""
    monkeypatch.setattr(torch_stack, "_FWD_STACK_ROWS", 64)
    monkeypatch.setattr(torch_stack, "_BWD_STACK_ROWS", 32)
    monkeypatch.setattr(torch_stack, "_SLAB_BYTES", 1)  # one chunk per matmul slab
    pattern = SlidingWindow(20, 3)
    q, k, v = _inputs(3, 4, 2, 200, 200, 32, torch.float32, seed=3)
    kpm = padding_mask(3, 200, "cpu")
    kpm[0, 90:130] = False  # a gap wider than the window inside the stacked rows
    spec = pattern.compile(200, 200, "cpu")
    stacks = [p for p in torch_plan._plan(spec, 0, 200, 0, 200) if p.mode == "stack"]
    assert len(stacks) == 1 and len(list(torch_stack._sub_pieces(stacks[0], 64))) > 2, (
        "the case must reach several stack calls")
    o, lse = attnkit.attention(q, k, v, pattern, valid_keys=kpm, backend="torch", return_lse=True)
    ref_o, ref_lse = attention_naive(q, k, v, pattern, valid_keys=kpm)
    low_o, _ = attention_naive(q, k, v, pattern, valid_keys=kpm, dtype=torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.isinf(lse[0, :, 115]).all(), "row 115 of batch 0 sees only padded keys"
    assert_close_to_oracle("o", o, ref_o, low_o, torch.float32, 2.0)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = torch.autograd.grad(ref_o, (q, k, v), do.double())
    low = torch.autograd.grad(low_o, (q, k, v), do)
    for name, g, rg, lg in zip("qkv", grads, ref, low, strict=True):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert_close_to_oracle(f"d{name}", g, rg, lg, torch.float32, 3.0)
