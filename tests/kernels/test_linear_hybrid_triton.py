"""The sliding-window + linear hybrid on the Triton backend (``kernels/linear/hybrid_triton.py``:
the flash kernel's window part and the linear kernel's shifted part, merged per row), against
the float64 oracle of ``attnkit/kernels/linear/naive.py``: forward, the returned state, and
every gradient (q, k, v, the initial linear state and window, and the gradient flowing back in
through the returned state); key padding, large scores, low precision (prefill + one-token
steps on both backends: test_linear_hybrid.py).
Under the interpreter on the CPU (kernel outputs poisoned by tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from attnkit.attn.linear import HybridAttentionState, linear_attention
from attnkit.kernels.linear.backends import BACKENDS, LinearAttentionCall
from attnkit.kernels.linear.feature_maps import FEATURE_MAPS
from attnkit.kernels.linear.naive import hybrid_attention_naive
from tests.harness import K_GRAD, K_OUT
from tests.linear_support import assert_close_to_oracle

PHI = FEATURE_MAPS["elu1"]
TRITON = BACKENDS[0]


def _close(name, got, ref, factor=K_OUT, dtype=torch.float32, low=None):
    assert_close_to_oracle(name, got, ref, ref if low is None else low, dtype, factor,
                           2e-5 if dtype == torch.float32 else 2e-2)


def _qkv(B, Hq, Hkv, N, Dk, Dv, dtype=torch.float32, amp=1.0):
    return (amp * torch.randn(B, Hq, N, Dk, dtype=dtype), amp * torch.randn(B, Hkv, N, Dk, dtype=dtype),
            torch.randn(B, Hkv, N, Dv, dtype=dtype))


def _state(B, Hkv, L, Dk, Dv):
    fk = PHI(torch.randn(B, Hkv, 6, Dk))
    vp = torch.randn(B, Hkv, 6, Dv)
    return HybridAttentionState(fk.transpose(-1, -2) @ vp, fk.sum(-2), torch.randn(B, Hkv, L, Dk),
                                torch.randn(B, Hkv, L, Dv))


CASES = [  # B, Hq, Hkv, N, Dk, Dv, W, L (window tokens of the initial state or None), decay
    (2, 4, 2, 13, 8, 6, 4, None, None),
    (1, 2, 1, 17, 8, 8, 1, None, (0.8,)),      # W = 1: only the diagonal is softmax
    (2, 2, 2, 12, 6, 10, 6, 5, (0.9, 0.6)),    # a full window state, per-head decay
    (1, 4, 2, 9, 8, 8, 3, 1, None),
    (1, 2, 2, 20, 16, 16, 40, None, (0.7, 0.5)),  # W > N: no key leaves the window
    (1, 2, 2, 37, 8, 5, 7, 2, (0.95, 0.9)),    # several linear chunks (16 under the interpreter)
]


@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"B{c[0]}-H{c[1]}kv{c[2]}-N{c[3]}-W{c[6]}-L{c[7]}-d{c[8]}")
def test_hybrid_triton_against_oracle(case):
    B, Hq, Hkv, N, Dk, Dv, W, L, dec = case
    q, k, v = _qkv(B, Hq, Hkv, N, Dk, Dv)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    state = None
    if L is not None:
        state = HybridAttentionState(*(t.requires_grad_() for t in _state(B, Hkv, L, Dk, Dv)))
        leaves += list(state)
    decay = None if dec is None else torch.tensor(dec, dtype=torch.float64)
    o, st = linear_attention(q, k, v, scale=0.5, window=W, initial_state=state, decay=decay,
                             return_state=True, backend="triton")
    ref = hybrid_attention_naive(q, k, v, PHI, W, scale=0.5, state=state, eps=1e-6, decay=decay)
    assert o.shape == (B, Hq, N, Dv) and o.dtype == torch.float32
    assert st.k.shape == (B, Hkv, min(W - 1, (L or 0) + N), Dk) and st.s.dtype == torch.float32
    for name, got, r in zip(("o", "s", "z", "k_win", "v_win"), (o, *st), ref, strict=True):
        _close(name, got, r)
    outs = (o, st.s, st.z)
    ups = [torch.randn_like(t) for t in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    refs = torch.autograd.grad(ref[:3], leaves, [u.double() for u in ups])
    for name, g, r in zip(("dq", "dk", "dv", "ds0", "dz0", "dk_win", "dv_win"), grads, refs,
                          strict=False):
        assert g.shape == r.shape
        _close(name, g, r, K_GRAD)


def test_hybrid_triton_matches_torch_with_a_callable_map():
    """A callable feature map (mapped outside the kernels, the window keys too): the Triton
    composition equals the torch path."""
    from attnkit.attn import HedgehogFeatureMap

    phi = HedgehogFeatureMap(8, 6)
    q, k, v = _qkv(1, 2, 2, 11, 8, 8)
    state = _state(1, 2, 3, 12, 8)
    state = HybridAttentionState(state.s[:, :, :12], state.z[:, :, :12], state.k[..., :8], state.v)
    kw = dict(window=4, feature_map=phi, initial_state=state, return_state=True)
    got = linear_attention(q, k, v, backend="triton", **kw)
    ref = linear_attention(q, k, v, backend="torch", **kw)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-5, atol=2e-5)
    for a, b in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_hybrid_triton_padding_no_nan():
    """Key padding (the HF path's ``valid_keys``, and an invalid window slot): padded keys take
    part in neither part; a row that sees nothing gives 0 and no NaN, forward and backward."""
    q, k, v = _qkv(2, 2, 2, 9, 8, 8)
    q.requires_grad_()
    st = _state(2, 2, 2, 8, 8)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    wvalid = torch.tensor([[True, False], [False, False]])
    call = LinearAttentionCall(q, k, v, None, None, "elu1", True, True, 1e-6, 1.0, window=3,
                               softmax_scale=8 ** -0.5, q_raw=q, k_raw=k, kw=st.k, vw=st.v,
                               valid_keys=valid, window_valid=wvalid)
    o, s, z, kwin, vwin, vwin_valid = TRITON.run(call)
    o_t, s_t, z_t, kwin_t, vwin_t, vwin_valid_t = BACKENDS[1].run(call)
    # invalid window slots: against the torch path (checked against the oracle in
    # test_linear_hybrid.py); row 0 without a state against the oracle below
    torch.testing.assert_close(o, o_t, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s, s_t, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(z, z_t, rtol=2e-5, atol=2e-5)
    assert torch.equal(kwin, kwin_t) and torch.equal(vwin, vwin_t)
    assert torch.equal(vwin_valid, vwin_valid_t) and vwin_valid.shape == (2, 2)
    assert o[1, :, :4].abs().max() < 1e-5  # rows that see no key at all
    g, = torch.autograd.grad(o.sum(), q)
    assert torch.isfinite(g).all()
    ref = hybrid_attention_naive(q[:1], k[:1], v[:1], PHI, 3, valid_keys=valid[:1])[0]
    _close("o (row 0, no state)", TRITON.run(LinearAttentionCall(
        q[:1], k[:1], v[:1], None, None, "elu1", True, True, 1e-6, 1.0, window=3,
        softmax_scale=8 ** -0.5, q_raw=q[:1], k_raw=k[:1], valid_keys=valid[:1]))[0], ref)


def test_hybrid_triton_large_scores_are_stable():
    """Scores above 120 overflow exp() in fp32: the result and gradient are finite and match
    the float64 oracle."""
    q, k, v = _qkv(1, 2, 2, 14, 8, 8, amp=7.0)
    q.requires_grad_()
    o = linear_attention(q, k, v, window=3, backend="triton")
    ref = hybrid_attention_naive(q, k, v, PHI, 3)[0]
    assert float((q.detach().double() @ k.double().transpose(-1, -2)).max()) * 8 ** -0.5 > 120
    _close("o", o, ref)
    g, = torch.autograd.grad(o.sum(), q)
    gr, = torch.autograd.grad(ref.sum(), q)
    assert torch.isfinite(g).all()
    _close("dq", g, gr, K_GRAD)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hybrid_triton_low_precision(dtype):
    """fp16/bf16 inputs: within the harness's budget of the same naive computation in that
    dtype, forward and gradients."""
    q, k, v = _qkv(1, 4, 2, 21, 16, 8, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o, st = linear_attention(q, k, v, window=5, decay=0.9, return_state=True, backend="triton")
    assert o.dtype == st.k.dtype == dtype and st.s.dtype == torch.float32
    g = torch.tensor([0.9, 0.9], dtype=torch.float64)
    ref = hybrid_attention_naive(q, k, v, PHI, 5, decay=g)[0]
    low = hybrid_attention_naive(q, k, v, PHI, 5, decay=g.to(dtype), dtype=dtype)[0]
    _close("o", o, ref, K_OUT, dtype, low)
    do = torch.randn_like(o)
    for name, a, r, lo in zip(("dq", "dk", "dv"), torch.autograd.grad(o, leaves, do),
                              torch.autograd.grad(ref, leaves, do.double()),
                              torch.autograd.grad(low, leaves, do), strict=True):
        _close(name, a, r, K_GRAD, dtype, lo)


def test_hybrid_triton_refuses_what_it_cannot_run():
    """q/k head dims above 256 (the flash kernel's window part), even when a callable map gives
    few features: a clear reason, and "auto" would take torch."""
    from attnkit.attn import HedgehogFeatureMap

    q, k, v = _qkv(1, 2, 2, 4, 264, 8)
    with pytest.raises(ValueError, match="window part .the flash kernel. takes q/k head dims up "
                                         "to 256, got 264"):
        linear_attention(q, k, v, window=2, feature_map=HedgehogFeatureMap(264, 8),
                         backend="triton")


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_kernel_returns_a_differentiable_denominator(normalize):
    """``linear_attention_triton(..., return_den=True)``: ``den = phi(q) . z`` (no eps) against
    the float64 oracle, and a gradient through ``den`` alone reaches q and k (the hybrid's merge
    relies on it); without normalisation ``den`` is zeros and carries no gradient."""
    from attnkit.kernels.linear.op import linear_attention_triton

    q, k, v = _qkv(1, 4, 2, 21, 8, 6)
    q.requires_grad_()
    k.requires_grad_()
    decay = torch.tensor([0.9, 0.7], dtype=torch.float64)
    o, den, s, z = linear_attention_triton(q, k, v, None, None, "elu1", True, normalize, 1e-6,
                                           0.5, decay=decay, return_den=True)
    if not normalize:
        assert den.abs().max() == 0
        return
    fq, fk = PHI(q.double() * 0.5), PHI(k.double())
    g = torch.exp(torch.log(decay)[:, None, None] * (torch.arange(21.0)[:, None]
                                                      - torch.arange(21.0)[None, :]).double())
    w = torch.tril(g).repeat_interleave(2, 0)  # [Hq, N, N] decay weights, causal
    ref = torch.einsum("bhnf,bhmf,hnm->bhn", fq, fk.repeat_interleave(2, 1), w)
    _close("den", den, ref)
    up = torch.randn_like(den)
    got = torch.autograd.grad(den, (q, k), up)
    want = torch.autograd.grad(ref, (q, k), up.double())
    for name, a, b in zip(("dq", "dk"), got, want, strict=True):
        _close(name, a, b, K_GRAD)
