"""Both attention backends against the float64 oracle: forward, LSE and all three gradients.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same
cases run natively, plus larger shapes marked ``slow``. Every Triton output buffer is filled with
NaN before the kernel runs (``flash.POISON_OUTPUTS``), so an element a kernel forgets to write
fails the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import attnkit
from attnkit import Causal, Dense, SlidingWindow
from attnkit.kernels.flash.naive import attention_naive as attention_oracle
from tests.conftest import DEVICE, ON_GPU
from tests.harness import max_err, tolerance

BACKENDS = ["triton", "torch"]


@dataclass
class Case:
    id: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    D: int
    pattern: object
    Nk: int | None = None
    padding: bool = False  # one right-padded, one left-padded and one fully padded row
    seqlens: list[int] | None = None  # packed sequences (cu_seqlens), B must be 1
    seqlens_k: list[int] | None = None
    bnhd: bool = False  # q/k/v are [B, N, H, D] tensors viewed as [B, H, N, D]
    dtypes: tuple = field(default=(torch.float32,))


CASES = [
    Case("B2-H4-N1-D64-dense", 2, 4, 4, 1, 64, Dense()),
    Case("B2-H4-N17-D40-causal", 2, 4, 4, 17, 40, Causal()),
    Case("B1-H2-N113-D80-window16", 1, 2, 2, 113, 80, SlidingWindow(16)),
    Case("B1-H2-N257-D128-causal", 1, 2, 2, 257, 128, Causal()),
    Case("B2-H4kv2-N113-D64-dense-gqa", 2, 4, 2, 113, 64, Dense(),
         dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    Case("B1-H4kv1-N65-D64-window8x8-mqa", 1, 4, 1, 65, 64, SlidingWindow(8, 8)),
    Case("B1-H2-Nq17-Nk113-D64-causal", 1, 2, 2, 17, 64, Causal(), Nk=113),
    Case("B1-H2-Nq17-Nk113-D64-window20", 1, 2, 2, 17, 64, SlidingWindow(20), Nk=113),
    Case("B1-H2-Nq113-Nk17-D64-causal", 1, 2, 2, 113, 64, Causal(), Nk=17),  # 96 empty rows
    Case("B1-H2-Nq113-Nk17-D40-dense", 1, 2, 2, 113, 40, Dense(), Nk=17),
    Case("B1-H2-N50-D64-window0", 1, 2, 2, 50, 64, SlidingWindow(0)),
    Case("B1-H2-N50-D64-window0x3", 1, 2, 1, 50, 64, SlidingWindow(0, 3)),
    Case("B1-H2-N50-D64-window300", 1, 2, 2, 50, 64, SlidingWindow(300)),
    Case("B3-H2-N40-D64-causal-padded", 3, 2, 2, 40, 64, Causal(), padding=True,
         dtypes=(torch.float32, torch.bfloat16)),
    Case("B3-H4kv2-N40-D80-dense-padded", 3, 4, 2, 40, 80, Dense(), padding=True),
    Case("B3-H2-N40-D64-window5x2-padded", 3, 2, 2, 40, 64, SlidingWindow(5, 2), padding=True),
    Case("varlen-5,40,0,17-D64-causal", 1, 2, 2, 62, 64, Causal(), seqlens=[5, 40, 0, 17],
         dtypes=(torch.float32, torch.float16)),
    Case("varlen-5,40,0,17-D40-dense-gqa", 1, 4, 2, 62, 40, Dense(), seqlens=[5, 40, 0, 17]),
    Case("varlen-5,40,0,17-D64-window6", 1, 2, 2, 62, 64, SlidingWindow(6), seqlens=[5, 40, 0, 17]),
    Case("varlen-q3,1,9-k20,5,9-D64-causal", 1, 2, 2, 13, 64, Causal(), Nk=34,
         seqlens=[3, 1, 9], seqlens_k=[20, 5, 9]),
    Case("varlen-5,40-tail17-D64-window6", 1, 4, 2, 62, 64, SlidingWindow(6), seqlens=[5, 40]),
    Case("varlen-q3,9-tail5-k20,9-tail3-D40-dense", 1, 2, 2, 17, 40, Dense(), Nk=32,
         seqlens=[3, 9], seqlens_k=[20, 9]),
    Case("B2-H4kv2-N70-D64-causal-bnhd", 2, 4, 2, 70, 64, Causal(), bnhd=True),
    Case("B2-H2-N33-D128-window4-bnhd", 2, 2, 2, 33, 128, SlidingWindow(4), bnhd=True),
]

SLOW_CASES = [  # only on a GPU: the interpreter would take minutes
    Case("B2-H8kv2-N1031-D128-causal", 2, 8, 2, 1031, 128, Causal(),
         dtypes=(torch.float16, torch.bfloat16)),
    Case("B1-H4-N2049-D64-window256", 1, 4, 4, 2049, 64, SlidingWindow(256),
         dtypes=(torch.bfloat16,)),
    Case("B2-H4-N777-D96-dense-padded", 2, 4, 4, 777, 96, Dense(), padding=True,
         dtypes=(torch.bfloat16,)),
    Case("B1-H2-N513-D256-causal", 1, 2, 2, 513, 256, Causal(), dtypes=(torch.bfloat16,)),
]


def _params():
    for case in CASES:
        for dtype in case.dtypes:
            for backend in BACKENDS:
                yield pytest.param(case, dtype, backend,
                                   id=f"{case.id}-{str(dtype)[6:]}-{backend}")
    for case in SLOW_CASES:
        for dtype in case.dtypes:
            yield pytest.param(case, dtype, "triton", id=f"{case.id}-{str(dtype)[6:]}-triton",
                               marks=pytest.mark.skipif(not ON_GPU, reason="GPU-sized case"))


def _make_inputs(case: Case, dtype):
    nk = case.Nk or case.Nq

    def rand(h, n):
        if case.bnhd:
            return torch.randn(case.B, n, h, case.D, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(case.B, h, n, case.D, device=DEVICE, dtype=dtype)

    q, k, v = rand(case.Hq, case.Nq), rand(case.Hkv, nk), rand(case.Hkv, nk)
    kpm = None
    if case.padding:
        kpm = torch.ones(case.B, nk, dtype=torch.bool, device=DEVICE)
        kpm[0, nk - nk // 3 :] = False  # right padding
        kpm[1, : nk // 4] = False  # left padding
        kpm[2:] = False  # a sequence that is all padding
    cu = None
    if case.seqlens is not None:
        def cum(lens):
            return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                                device=DEVICE)
        cu = cum(case.seqlens) if case.seqlens_k is None else (cum(case.seqlens),
                                                               cum(case.seqlens_k))
    return [t.requires_grad_() for t in (q, k, v)], kpm, cu


@pytest.mark.parametrize(("case", "dtype", "backend"), list(_params()))
def test_attention_matches_oracle(case: Case, dtype, backend):
    (q, k, v), kpm, cu = _make_inputs(case, dtype)
    max_seqlen = None
    if cu is not None:
        lens = case.seqlens if case.seqlens_k is None else (case.seqlens, case.seqlens_k)
        max_seqlen = max(case.seqlens) if case.seqlens_k is None else tuple(max(x) for x in lens)
    o, lse = attnkit.attention(q, k, v, case.pattern, valid_keys=kpm, cu_seqlens=cu,
                               max_seqlen=max_seqlen, backend=backend, return_lse=True)
    assert o.shape == q.shape and o.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.isfinite(o).all(), "non-finite output (unwritten element or NaN from masking)"
    assert not torch.isnan(lse).any()

    ref_o, ref_lse = attention_oracle(q, k, v, case.pattern, valid_keys=kpm, cu_seqlens=cu)
    low_o, _ = attention_oracle(q, k, v, case.pattern, valid_keys=kpm, cu_seqlens=cu,
                                dtype=dtype)
    mag = float(ref_o.abs().max()) if ref_o.numel() else 1.0
    assert max_err(o, ref_o) <= tolerance(dtype, max_err(low_o, ref_o), mag, 2.0)
    # LSE is fp32 in every dtype; rows that see no key must be exactly -inf in both.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert max_err(lse, ref_lse) <= (1e-4 if dtype == torch.float32 else 2e-2)

    # Gradients through O and through the LSE (finite rows).
    do = torch.randn_like(o)
    dlse = torch.randn_like(lse)

    def loss(out, out_lse):
        finite = torch.isfinite(out_lse)
        return (out.double() * do.double()).sum() + (
            torch.where(finite, out_lse.double(), 0.0) * dlse.double()
        ).sum()

    grads = torch.autograd.grad(loss(o, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_o, ref_lse), (q, k, v))
    low_grads = torch.autograd.grad(loss(*attention_oracle(
        q, k, v, case.pattern, valid_keys=kpm, cu_seqlens=cu, dtype=dtype)), (q, k, v))
    for name, g, rg, lg in zip("qkv", grads, ref_grads, low_grads, strict=True):
        assert g.shape == rg.shape and g.dtype == dtype
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
        mag = float(rg.abs().max()) if rg.numel() else 1.0
        tol = tolerance(dtype, max_err(lg, rg), mag, 3.0)
        assert max_err(g, rg) <= tol, f"d{name}: {max_err(g, rg):.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_window_equals_dense_and_causal(backend):
    q, k, v = (torch.randn(1, 2, 45, 64, device=DEVICE) for _ in range(3))
    dense = attnkit.attention(q, k, v, Dense(), backend=backend)
    causal = attnkit.attention(q, k, v, Causal(), backend=backend)
    torch.testing.assert_close(attnkit.attention(q, k, v, SlidingWindow(500, 500), backend=backend),
                               dense)
    torch.testing.assert_close(attnkit.attention(q, k, v, SlidingWindow(44), backend=backend), causal)


def test_backends_agree_and_backward_is_deterministic(monkeypatch):
    """Bitwise-repeatable backward in the deterministic mode (``ATTNKIT_DETERMINISTIC=1``: no
    atomics; the default fuses dQ with atomics, see test_flash_bwd_modes.py). Under the sequential
    CPU interpreter this only checks repeatability; on a GPU it would catch a race or atomics."""
    monkeypatch.setenv("ATTNKIT_DETERMINISTIC", "1")
    q, k, v = (torch.randn(2, 4, 57, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 4, 57, 64, device=DEVICE)
    runs = []
    for _ in range(2):
        o = attnkit.attention(q, k, v, SlidingWindow(9, 2), backend="triton")
        runs.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b), "two identical Triton calls differ: a race or atomics"
    o_t = attnkit.attention(q, k, v, SlidingWindow(9, 2), backend="torch")
    torch.testing.assert_close(runs[0][0], o_t, atol=2e-5, rtol=1e-4)


def test_compile_traces_without_graph_break():
    """The Triton path is a torch.library op with a fake impl: fullgraph compile succeeds and
    gives the eager result, forward and backward."""
    q, k, v = (torch.randn(1, 2, 33, 64, device=DEVICE, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return attnkit.attention(q, k, v, Causal(), backend="triton", return_lse=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    o_c, lse_c = compiled(q, k, v)
    o_e, lse_e = f(q, k, v)
    torch.testing.assert_close(o_c, o_e)
    torch.testing.assert_close(lse_c, lse_e)
    g_c = torch.autograd.grad(o_c.sum(), (q, k, v))
    g_e = torch.autograd.grad(o_e.sum(), (q, k, v))
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_batch_gives_zeros_and_zero_grads(backend):
    q, k, v = (torch.randn(2, 2, 20, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    kpm = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    kpm[0, :7] = True
    o, lse = attnkit.attention(q, k, v, valid_keys=kpm, backend=backend, return_lse=True)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))
    assert torch.equal(dk[0, :, 7:], torch.zeros_like(dk[0, :, 7:]))  # padded keys get no grad
    assert torch.equal(dv[1], torch.zeros_like(dv[1]))


def _band_sweep():
    """Random band geometries: the block-phase arithmetic (which key blocks are skipped, full or
    partial) has edge cases at every alignment of the band to the 32x16 interpreter tiles."""
    rng = torch.Generator().manual_seed(1234)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    for i in range(48):
        nq, nk = pick(1, 96), pick(1, 96)
        if i % 3 == 0:
            nk = nq
        kind = i % 4
        if kind == 0:
            pattern = SlidingWindow(pick(0, 70), pick(0, 70))
        elif kind == 1:
            pattern = SlidingWindow(pick(0, 40))
        elif kind == 2:
            pattern = Causal()
        else:
            pattern = SlidingWindow(pick(16, 64), pick(0, 3))
        yield pytest.param(nq, nk, pattern, id=f"{i}-Nq{nq}-Nk{nk}-{pattern}")


@pytest.mark.parametrize(("nq", "nk", "pattern"), list(_band_sweep()))
def test_band_geometry_sweep(nq, nk, pattern):
    q = torch.randn(1, 2, nq, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, 1, nk, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    o, lse = attnkit.attention(q, k, v, pattern, backend="triton", return_lse=True)
    ref_o, ref_lse = attention_oracle(q, k, v, pattern)
    assert max_err(o, ref_o) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and max_err(lse, ref_lse) < 1e-5
    do = torch.randn_like(o)
    for g, rg in zip(torch.autograd.grad(o, (q, k, v), do),
                     torch.autograd.grad(ref_o, (q, k, v), do.double()), strict=True):
        assert max_err(g, rg) < 1e-4


@pytest.mark.parametrize("block_size", [16, 48, 64, 80, 128, 256])
def test_autotuner_offers_sparse_calls_only_tiles_that_divide_the_block(block_size):
    """A GPU tile straddling two layout blocks would skip or mix keys (the interpreter runs its
    own tile, so this checks the GPU configuration directly)."""
    from attnkit.kernels.flash import tiles as flash

    for tiles in (flash._FWD_TILES, flash._BWD_DKDV_TILES, flash._BWD_DQ_TILES):
        configs = flash._configs(tiles)
        for head_dim, dtype in ((64, torch.bfloat16), (128, torch.float16), (256, torch.float32)):
            args = {"Q": torch.empty(1, dtype=dtype)}
            kept = flash._prune(configs, args, BLOCK_D=head_dim, SPARSE=True, BS=block_size)
            assert kept and all(block_size % c.kwargs["BLOCK_M"] == 0 and
                                block_size % c.kwargs["BLOCK_N"] == 0 for c in kept)
            dense = flash._prune(configs, args, BLOCK_D=head_dim, SPARSE=False, BS=0)
            assert dense and not any(c.sparse_only for c in dense)


def test_torch_backend_float64_is_exact():
    """fp64 inputs stay fp64 end to end on the torch backend (scores, LSE, probabilities in the
    backward), so it can serve as a reference itself."""
    q, k, v = (torch.randn(2, 4, 50, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
               for _ in range(3))
    kv = [t[:, ::2].detach().requires_grad_() for t in (k, v)]  # GQA: 2 KV heads
    o = attnkit.attention(q, *kv, SlidingWindow(7), backend="torch")
    ref, _ = attention_oracle(q, *kv, SlidingWindow(7))
    assert max_err(o, ref) < 1e-12
    do = torch.randn_like(o)
    for g, rg in zip(torch.autograd.grad(o, (q, *kv), do), torch.autograd.grad(ref, (q, *kv), do),
                     strict=True):
        assert max_err(g, rg) < 1e-12
