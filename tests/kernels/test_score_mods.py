"""Score modifications — soft-capping, attention sinks, ALiBi — and values with their own head
dim, on the Triton kernels and the torch path, against the float64 oracle.

Forward (o, lse) and every gradient (q, k, v and the sinks), alone and combined, on band and
block-sparse patterns, GQA, ``Nq != Nk``, key padding (a fully padded row too) and packed
sequences. The Triton kernels run under the interpreter on the CPU (tests/conftest.py), with every
output NaN-poisoned first."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import BlockSparse, Causal, Dense, SlidingWindow
from attnkit.kernels.flash.naive import attention_naive
from tests.conftest import DEVICE
from tests.harness import K_GRAD, K_OUT, max_err, padding_mask, tolerance

MODS = {
    "softcap": dict(softcap=2.5),
    "sinks": dict(sinks=True),
    "alibi": dict(alibi=True),
    "all": dict(softcap=4.0, sinks=True, alibi=True),
}


def _sparse(nq, nk, heads=2, bs=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(heads, math.ceil(nq / bs), math.ceil(nk / bs), generator=g) < 0.6
    return BlockSparse(layout, bs, causal=True)


CASES = [
    # id, B, Hq, Hkv, Nq, Nk, D, pattern factory, padding, packed
    ("B2-H4kv2-N37-D32-causal", 2, 4, 2, 37, 37, 32, lambda nq, nk: Causal(), False, None),
    ("B3-H2-N40-D32-window5x2-padded", 3, 2, 2, 40, 40, 32, lambda nq, nk: SlidingWindow(5, 2), True,
     None),
    ("B1-H2-Nq17-Nk45-D32-dense", 1, 2, 1, 17, 45, 32, lambda nq, nk: Dense(), False, None),
    ("B1-H2-N50-D32-sparse16-causal", 1, 2, 2, 50, 50, 32, lambda nq, nk: _sparse(nq, nk), False,
     None),
    ("varlen-5,30,0,12-D32-window6", 1, 2, 2, 47, 47, 32, lambda nq, nk: SlidingWindow(6), False,
     [5, 30, 0, 12]),
]


def _inputs(B, Hq, Hkv, Nq, Nk, D, mods, dtype):
    def t(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=True)

    q, k, v = t(B, Hq, Nq, D), t(B, Hkv, Nk, D), t(B, Hkv, Nk, D)
    kw = {}
    if "softcap" in mods:
        kw["softcap"] = mods["softcap"]
    if mods.get("sinks"):
        kw["sinks"] = (torch.randn(Hq, device=DEVICE) * 2).requires_grad_()
    if mods.get("alibi"):
        kw["alibi_slopes"] = torch.rand(B, Hq, device=DEVICE) * 0.5
    return q, k, v, kw


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mod", list(MODS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_score_mods_match_the_oracle_forward_and_every_gradient(case, mod, backend):
    _, B, Hq, Hkv, Nq, Nk, D, make, padded, seqlens = case
    dtype = torch.float32
    q, k, v, kw = _inputs(B, Hq, Hkv, Nq, Nk, D, MODS[mod], dtype)
    pattern = make(Nq, Nk)
    call_kw = dict(kw)
    if padded:
        call_kw["valid_keys"] = padding_mask(B, Nk, DEVICE)  # row 2 sees nothing
    if seqlens is not None:
        cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32,
                          device=DEVICE)
        call_kw.update(cu_seqlens=cu, max_seqlen=max(seqlens))
    o, lse = attnkit.attention(q, k, v, pattern, backend=backend, return_lse=True, **call_kw)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()

    leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])
    oracle_kw = dict(softcap=kw.get("softcap"), sinks=kw.get("sinks"),
                     alibi_slopes=kw.get("alibi_slopes"), valid_keys=call_kw.get("valid_keys"),
                     cu_seqlens=call_kw.get("cu_seqlens"))

    def oracle(dt):
        xs = [t.detach().to(dt).requires_grad_() for t in leaves]
        ref = dict(oracle_kw)
        if "sinks" in kw:
            ref["sinks"] = xs[3]
        ro, rl = attention_naive(*xs[:3], pattern, dtype=dt, **ref)
        return xs, ro, rl

    x64, ref_o, ref_lse = oracle(torch.float64)
    xlow, low_o, _ = oracle(dtype)
    do = torch.randn_like(o)
    dl = torch.randn_like(lse).masked_fill(torch.isinf(lse), 0.0)
    grads = torch.autograd.grad((o * do).sum() + (lse.masked_fill(torch.isinf(lse), 0) * dl).sum(),
                                leaves)
    ref_grads = torch.autograd.grad(
        (ref_o * do.double()).sum() + (ref_lse.masked_fill(torch.isinf(ref_lse), 0) * dl.double()).sum(),
        x64)
    low_grads = torch.autograd.grad((low_o * do).sum(), xlow)  # sets the error budget only

    mag = float(ref_o.abs().max()) if ref_o.numel() else 1.0
    assert max_err(o, ref_o) <= tolerance(dtype, max_err(low_o, ref_o), mag, K_OUT)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert max_err(lse, ref_lse) <= 1e-4 * (1 + float(ref_lse[torch.isfinite(ref_lse)].abs().max()))
    if "sinks" in kw and padded:  # a row that sees no key: o = 0, lse = sink
        torch.testing.assert_close(lse[2], kw["sinks"].detach()[:, None].expand(Hq, Nq))
        assert (o[2] == 0).all()
    for name, g, rg, lg in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, low_grads,
                               strict=False):
        assert torch.isfinite(g).all(), name
        tol = tolerance(dtype, max_err(lg, rg), float(rg.abs().max()), K_GRAD)
        assert max_err(g, rg) <= tol, f"{name}: {max_err(g, rg):.3g} > {tol:.3g}"


def test_softcap_really_caps_and_alibi_really_biases():
    """Guards against a slot that silently does nothing: large scores are capped, far keys are
    penalised, sinks take probability mass."""
    q = torch.randn(1, 2, 9, 16, device=DEVICE) * 10
    k, v = torch.randn(1, 2, 9, 16, device=DEVICE) * 10, torch.randn(1, 2, 9, 16, device=DEVICE)
    plain = attnkit.attention(q, k, v, Causal(), backend="triton")
    for kw in (dict(softcap=1.0), dict(alibi_slopes=torch.ones(2, device=DEVICE)),
               dict(sinks=torch.full((2,), 5.0, device=DEVICE))):
        out = attnkit.attention(q, k, v, Causal(), backend="triton", **kw)
        assert max_err(out, plain) > 1e-2, kw
        ref, _ = attention_naive(q, k, v, Causal(), **kw)
        assert max_err(out, ref) < 1e-4, kw


def test_bad_score_mod_arguments_are_refused_by_name():
    q = torch.randn(1, 2, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"softcap must be a finite float > 0.*got -1.0"):
        attnkit.attention(q, q, q, softcap=-1.0)
    with pytest.raises(TypeError, match=r"softcap must be a float > 0 or None, got str"):
        attnkit.attention(q, q, q, softcap="3")
    with pytest.raises(ValueError, match=r"sinks must have shape \[2\].*got \[3\]"):
        attnkit.attention(q, q, q, sinks=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[2\] or \[1, 2\].*got \[2, 2\]"):
        attnkit.attention(q, q, q, alibi_slopes=torch.zeros(2, 2, device=DEVICE))
    with pytest.raises(TypeError, match=r"sinks must be a floating tensor"):
        attnkit.attention(q, q, q, sinks=torch.zeros(2, dtype=torch.int64, device=DEVICE))


def test_backends_without_a_score_mod_say_so():
    """The CUDA decode kernel has no score slot: it declines by name, and the Triton decode
    kernel (which has one) takes the call."""
    from attnkit.attn.inputs import validate
    from attnkit.kernels.flash.backends import TritonDecode
    from attnkit.kernels.flash.cuda import CudaDecodeBackend

    q, kv = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 20, 16)
    with torch.no_grad():
        call = validate(q, kv, kv, Causal(), None, None, None, None, False, 3.0, None, None)
    assert any("softcap not supported by the 'cuda' CudaDecodeBackend backend" in r
               for r in CudaDecodeBackend().not_supported_reasons(call))
    assert not any("softcap" in r for r in TritonDecode().not_supported_reasons(call))


@pytest.mark.parametrize("mod", list(MODS))
@pytest.mark.parametrize("nq", [1, 3])
def test_decode_kernel_score_mods_match_the_oracle(mod, nq):
    """The Triton split-KV decode kernel (forward only) with each modification: several key
    splits (the merge carries the sinks), GQA, a window, key padding with a fully padded row."""
    from attnkit.kernels.flash.decode import decode_attention

    B, Hq, Hkv, Nk, D = 3, 4, 2, 45, 32
    q, k, v, kw = _inputs(B, Hq, Hkv, nq, Nk, D, MODS[mod], torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].detach()
    vk = padding_mask(B, Nk, DEVICE)
    pattern = SlidingWindow(20)
    o, lse = decode_attention(q, k, v, pattern.compile(), D ** -0.5, vk, num_splits=3, **kw)
    ref_o, ref_lse = attention_naive(q, k, v, pattern, valid_keys=vk, **kw)
    low_o, _ = attention_naive(q, k, v, pattern, valid_keys=vk, dtype=torch.float32, **kw)
    assert not o.isnan().any() and not lse.isnan().any()
    assert max_err(o, ref_o) <= tolerance(torch.float32, max_err(low_o, ref_o),
                                          float(ref_o.abs().max()), K_OUT)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert max_err(lse, ref_lse) <= 1e-4 * (1 + float(ref_lse[torch.isfinite(ref_lse)].abs().max()))


DV_CASES = [
    ("B2-H4kv2-N37-D32-Dv16-causal", 2, 4, 2, 37, 37, 32, 16, Causal(), False),
    ("B3-H2-N40-D16-Dv40-window5-padded", 3, 2, 2, 40, 40, 16, 40, SlidingWindow(5), True),
    ("B1-H2-Nq17-Nk45-D48-Dv32-sparse", 1, 2, 1, 17, 45, 48, 32, None, False),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", DV_CASES, ids=[c[0] for c in DV_CASES])
def test_values_with_their_own_head_dim(case, backend):
    """``v [B, Hkv, Nk, Dv]`` with ``Dv != D`` (DeepSeek-style 192/128 head dims): o is ``Dv``
    wide; forward, lse and every gradient against the oracle, with a softcap on top."""
    _, B, Hq, Hkv, Nq, Nk, D, Dv, pattern, padded = case
    pattern = pattern if pattern is not None else _sparse(Nq, Nk, heads=Hq)
    q = torch.randn(B, Hq, Nq, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, Dv, device=DEVICE, requires_grad=True)
    vk = padding_mask(B, Nk, DEVICE) if padded else None
    o, lse = attnkit.attention(q, k, v, pattern, valid_keys=vk, softcap=5.0, backend=backend,
                               return_lse=True)
    assert o.shape == (B, Hq, Nq, Dv)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_o, ref_lse = attention_naive(*x64, pattern, valid_keys=vk, softcap=5.0)
    xl = [t.detach().requires_grad_() for t in (q, k, v)]
    low_o, _ = attention_naive(*xl, pattern, valid_keys=vk, softcap=5.0, dtype=torch.float32)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref_o, x64, do.double())
    low_grads = torch.autograd.grad(low_o, xl, do)
    assert max_err(o, ref_o) <= tolerance(torch.float32, max_err(low_o, ref_o),
                                          float(ref_o.abs().max()), K_OUT)
    assert max_err(lse, ref_lse) <= 1e-4 * (1 + float(ref_lse[torch.isfinite(ref_lse)].abs().max()))
    for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads, strict=True):
        assert g.shape == rg.shape, name
        tol = tolerance(torch.float32, max_err(lg, rg), float(rg.abs().max()), K_GRAD)
        assert max_err(g, rg) <= tol, f"{name}: {max_err(g, rg):.3g} > {tol:.3g}"


def test_backends_without_their_own_value_head_dim_decline_by_name():
    from attnkit.attn.inputs import validate
    from attnkit.kernels.flash.backends import TritonDecode

    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 8)
    with torch.no_grad():
        call = validate(q, k, v, Causal(), None, None, None, None, False)
    assert any("Dv = 8, D = 16" in r for r in TritonDecode().not_supported_reasons(call))
    with pytest.raises(ValueError, match=r"k and v must share \[B, Hkv, Nk\]"):
        attnkit.attention(q, k, v[:, :, :5])
