"""The flash backward's two dQ modes against the float64 oracle (forward and every gradient).

* fused (the default): dQ accumulated inside the dK/dV kernel with fp32 atomics;
* deterministic (``torch.use_deterministic_algorithms(True)`` or ``ATTNKIT_DETERMINISTIC=1``): the
  separate dQ kernel, bitwise reproducible.

The rest of the suite (test_flash, test_block_sparse, test_score_mods) runs the default mode; here
both modes see the same small cases, each combining several features (GQA, ``Nq != Nk``, key
padding with a fully padded row, packed sequences with an empty one, windows, block-sparse with
partial blocks, soft-capping, ALiBi, sinks), so that the whole file stays a few seconds long
under the interpreter. Outputs are NaN-poisoned first (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import BlockSparse, Causal, Dense, SlidingWindow
from attnkit.kernels.flash import bwd_fused
from attnkit.kernels.flash.naive import attention_naive
from tests.conftest import DEVICE
from tests.harness import K_GRAD, K_OUT, max_err, padding_mask, tolerance


def _sparse(nq, nk, bs=16):
    g = torch.Generator().manual_seed(5)
    layout = torch.rand(2, math.ceil(nq / bs), math.ceil(nk / bs), generator=g) < 0.6
    return BlockSparse(layout, bs, causal=True)  # causal: the diagonal blocks are partial


# id, B, Hq, Hkv, Nq, Nk, D, pattern, padded, seqlens, score mods
CASES = [
    ("gqa-Nq23-Nk37-causal-padded", 3, 4, 2, 23, 37, 40, Causal(), True, None, {}),
    ("varlen-5,20,0,9-window4x1-gqa", 1, 4, 2, 34, 34, 32, SlidingWindow(4, 1), False, [5, 20, 0, 9],
     {}),
    ("sparse16-gqa-padded", 3, 2, 1, 37, 37, 32, "sparse", True, None, {}),
    ("Nq13-Nk29-window6-softcap-alibi-sinks", 2, 2, 2, 13, 29, 32, SlidingWindow(6), False, None,
     dict(softcap=3.0, alibi=True, sinks=True)),
    ("dense-D24-softcap", 1, 2, 1, 19, 19, 24, Dense(), False, None, dict(softcap=2.0)),
]


@pytest.fixture(params=["fused", "deterministic"])
def mode(request, monkeypatch):
    if request.param == "deterministic":
        monkeypatch.setenv(bwd_fused.ENV, "1")
    else:
        monkeypatch.delenv(bwd_fused.ENV, raising=False)
    assert bwd_fused.deterministic_backward() == (request.param == "deterministic")
    return request.param


def _inputs(case):
    _, B, Hq, Hkv, Nq, Nk, D, pattern, padded, seqlens, mods = case

    def t(*shape):
        return torch.randn(*shape, device=DEVICE, requires_grad=True)

    q, k, v = t(B, Hq, Nq, D), t(B, Hkv, Nk, D), t(B, Hkv, Nk, D)
    kw = {}
    if "softcap" in mods:
        kw["softcap"] = mods["softcap"]
    if mods.get("alibi"):
        kw["alibi_slopes"] = torch.rand(Hq, device=DEVICE) * 0.5
    if mods.get("sinks"):
        kw["sinks"] = torch.randn(Hq, device=DEVICE).requires_grad_()
    if padded:
        kw["valid_keys"] = padding_mask(B, Nk, DEVICE)  # row 2 sees nothing
    if seqlens is not None:
        kw["cu_seqlens"] = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()],
                                        dtype=torch.int32, device=DEVICE)
        kw["max_seqlen"] = max(seqlens)
    if pattern == "sparse":
        pattern = _sparse(Nq, Nk)
    return q, k, v, pattern, kw


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_both_dq_modes_match_the_oracle(case, mode):
    check_against_oracle(case, mode)


def check_against_oracle(case, mode):
    """Forward, LSE and every gradient (loss on both outputs) of ``case`` against the float64
    oracle, within the float32 oracle's own error (also used by test_flash_bwd_tma.py)."""
    q, k, v, pattern, kw = _inputs(case)
    o, lse = attnkit.attention(q, k, v, pattern, backend="triton", return_lse=True, **kw)
    leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    ref_kw = {n: kw.get(n) for n in ("softcap", "alibi_slopes", "valid_keys", "cu_seqlens")}

    def oracle(dt):
        xs = [x.detach().to(dt).requires_grad_() for x in leaves]
        ro, rl = attention_naive(*xs[:3], pattern, dtype=dt, sinks=xs[3] if len(xs) > 3 else None,
                                 **ref_kw)
        return xs, ro, rl

    x64, ref_o, ref_lse = oracle(torch.float64)
    xlow, low_o, low_lse = oracle(torch.float32)
    do = torch.randn_like(o)
    dl = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)

    def loss(out, out_lse, cast):
        return (out * cast(do)).sum() + (out_lse.masked_fill(torch.isinf(out_lse), 0) * cast(dl)).sum()

    grads = torch.autograd.grad(loss(o, lse, lambda t: t), leaves)
    ref_grads = torch.autograd.grad(loss(ref_o, ref_lse, torch.Tensor.double), x64)
    low_grads = torch.autograd.grad(loss(low_o, low_lse, lambda t: t), xlow)
    assert max_err(o, ref_o) <= tolerance(torch.float32, max_err(low_o, ref_o),
                                          float(ref_o.detach().abs().max()), K_OUT)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    for name, g, rg, lg in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, low_grads,
                               strict=False):
        assert torch.isfinite(g).all(), f"{mode} {name}: non-finite (unwritten or NaN)"
        tol = tolerance(torch.float32, max_err(lg, rg), float(rg.abs().max()), K_GRAD)
        assert max_err(g, rg) <= tol, f"{mode} {name}: {max_err(g, rg):.3g} > {tol:.3g}"


def test_deterministic_mode_is_bitwise_repeatable_and_agrees_with_fused(monkeypatch):
    """Deterministic mode: two runs, the same bits (on a GPU this catches any atomic or race).
    The fused mode gives the same dK, dV (one program writes each) and a dQ equal up to the order
    of its fp32 sums. The mode follows ``torch.use_deterministic_algorithms`` too."""
    q, k, v = (torch.randn(1, 2, 33, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, 33, 32, device=DEVICE)
    pattern = SlidingWindow(9, 2)

    def run():
        o = attnkit.attention(q, k, v, pattern, backend="triton")
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    monkeypatch.delenv(bwd_fused.ENV, raising=False)
    fused = run()
    torch.use_deterministic_algorithms(True)
    try:
        assert bwd_fused.deterministic_backward()
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(("o", "dq", "dk", "dv"), first, second, strict=True):
        assert torch.equal(a, b), f"deterministic mode: two runs differ in {name}"
    for name, a, b in zip(("o", "dq", "dk", "dv"), first, fused, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"modes differ in {name}")


def test_mode_switch_refuses_unknown_values(monkeypatch):
    monkeypatch.setenv(bwd_fused.ENV, "yes")
    with pytest.raises(ValueError, match=r"ATTNKIT_DETERMINISTIC='yes': accepted are '1'"):
        bwd_fused.deterministic_backward()
    monkeypatch.setenv(bwd_fused.ENV, "0")
    assert bwd_fused.deterministic_backward() is torch.are_deterministic_algorithms_enabled()
