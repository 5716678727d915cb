"""The sliding-window + linear hybrid (``window=``) and packed sequences (``cu_seqlens=``) on the
torch backend, against the float64 oracles of ``attnkit/kernels/linear/naive.py``.

Forward, the returned state and every gradient (q, k, v, the initial linear state and window,
and the gradient flowing back in through the returned state). The walk's chunk is set small
(5 tokens) through the kernel-level function so that windows straddle several chunks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from attnkit.attn.linear import HybridAttentionState, linear_attention
from attnkit.kernels.linear.feature_maps import FEATURE_MAPS
from attnkit.kernels.linear.hybrid import hybrid_attention_torch
from attnkit.kernels.linear.naive import hybrid_attention_naive, linear_attention_naive
from tests.harness import K_GRAD, K_OUT
from tests.linear_support import assert_close_to_oracle

PHI = FEATURE_MAPS["elu1"]
REL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _close(name, got, ref, dtype, factor=K_OUT):
    assert_close_to_oracle(name, got, ref, ref, dtype, factor, REL[dtype])


def _qkv(B, Hq, Hkv, N, Dk, Dv, dtype, amp=1.0):
    return (amp * torch.randn(B, Hq, N, Dk, dtype=dtype), amp * torch.randn(B, Hkv, N, Dk, dtype=dtype),
            torch.randn(B, Hkv, N, Dv, dtype=dtype))


def _state(B, Hkv, L, Dk, Dv, F, dtype):
    fk = PHI(torch.randn(B, Hkv, 6, Dk, dtype=torch.float64))
    vp = torch.randn(B, Hkv, 6, Dv, dtype=torch.float64)
    return HybridAttentionState((fk.transpose(-1, -2) @ vp).to(dtype), fk.sum(-2).to(dtype),
                                torch.randn(B, Hkv, L, Dk, dtype=dtype),
                                torch.randn(B, Hkv, L, Dv, dtype=dtype))


CASES = [  # B, Hq, Hkv, N, Dk, Dv, W, L (window tokens of the initial state or None), decay
    (2, 4, 2, 13, 8, 6, 4, None, None),
    (1, 2, 1, 17, 8, 8, 1, None, (0.8,)),
    (2, 2, 2, 12, 6, 10, 6, 5, (0.9, 0.6)),
    (1, 4, 2, 9, 8, 8, 3, 1, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"B{c[0]}-H{c[1]}kv{c[2]}-N{c[3]}-W{c[6]}-L{c[7]}-d{c[8]}")
def test_hybrid_against_oracle(case, dtype):
    B, Hq, Hkv, N, Dk, Dv, W, L, dec = case
    q, k, v = _qkv(B, Hq, Hkv, N, Dk, Dv, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    state = None
    if L is not None:
        st0 = _state(B, Hkv, L, Dk, Dv, Dk, dtype)
        state = HybridAttentionState(*(t.requires_grad_() for t in st0))
        leaves += list(state)
    decay = None if dec is None else torch.tensor(dec, dtype=torch.float64)
    kw = dict(window=W, eps=1e-6, decay=decay)
    fq, fk = PHI(q * 0.5), PHI(k)
    st = state or (None,) * 4
    got = hybrid_attention_torch(q, k, v, fq, fk, W, Dk ** -0.5, s0=st[0], z0=st[1], kw=st[2],
                                 vw=st[3], fkw=None if L is None else PHI(st[2]), eps=1e-6,
                                 decay=decay, chunk=5)[:5]
    api, api_st = linear_attention(q, k, v, scale=0.5, initial_state=state, return_state=True,
                                   backend="torch", **kw)
    ref = hybrid_attention_naive(q, k, v, PHI, W, scale=0.5, state=state, eps=1e-6, decay=decay)
    assert api.shape == (B, Hq, N, Dv) and api.dtype == dtype
    assert api_st.k.shape == (B, Hkv, min(W - 1, (L or 0) + N), Dk)
    for name, g, a, r in zip(("o", "s", "z", "k_win", "v_win"), got, (api, *api_st), ref, strict=True):
        _close(name, g, r, dtype)
        _close(f"api {name}", a, r, dtype)
    outs = (got[0], got[1], got[2])
    ups = [torch.randn_like(t) for t in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    ref_grads = torch.autograd.grad(ref[:3], leaves, [u.double() for u in ups])
    names = ("dq", "dk", "dv", "ds0", "dz0", "dk_win", "dv_win")
    for name, g, r in zip(names, grads, ref_grads, strict=False):
        assert g.shape == r.shape
        _close(name, g, r, dtype, K_GRAD)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hybrid_pieces_equal_whole(backend):
    """Prefix (return_state) + one-token steps (initial_state) == the whole sequence (Triton:
    fp32, the composed kernels; torch: fp64)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    q, k, v = _qkv(1, 2, 1, 11, 8, 8, dtype)
    kw = dict(window=4, decay=0.9, backend=backend)
    whole = linear_attention(q, k, v, **kw)
    o, st = linear_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], return_state=True, **kw)
    outs = [o]
    for t in range(2, 11):
        o, st = linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                 initial_state=st, return_state=True, **kw)
        assert st.k.shape[2] == min(3, t + 1)  # the window part never grows past W - 1
        outs.append(o)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=tol, atol=tol)


def test_hybrid_large_scores_are_stable():
    """Scores around 300 overflow exp() in fp32: the fp32 result is finite and matches the
    float64 oracle (whose exp(300) is finite), gradients too."""
    q, k, v = _qkv(1, 2, 2, 14, 8, 8, torch.float32, amp=7.0)
    q.requires_grad_()
    o = linear_attention(q, k, v, window=3, backend="torch")
    ref = hybrid_attention_naive(q, k, v, PHI, 3)[0]
    assert float((q.detach().double() @ k.double().transpose(-1, -2)).max()) * 8 ** -0.5 > 120
    _close("o", o, ref, torch.float32)
    g, = torch.autograd.grad(o.sum(), q)
    gr, = torch.autograd.grad(ref.sum(), q)
    assert torch.isfinite(g).all()
    _close("dq", g, gr, torch.float32, K_GRAD)


def test_hybrid_padding_no_nan():
    """Left-padded keys take part in neither part; a padded query row (its own key padded,
    nothing visible) gives 0 and no NaN, forward and backward."""
    q, k, v = _qkv(2, 2, 2, 9, 8, 8, torch.float64)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    q.requires_grad_()
    o, *_ = hybrid_attention_torch(q, k, v, PHI(q), PHI(k), 3, 8 ** -0.5, valid_keys=valid, chunk=4)
    ref = hybrid_attention_naive(q, k, v, PHI, 3, valid_keys=valid)[0]
    _close("o", o, ref, torch.float64)
    assert o[1, :, :4].abs().max() < 1e-6  # rows that see no key (eps alone in the denominator)
    g, = torch.autograd.grad(o.sum(), q)
    assert torch.isfinite(g).all()
    # the real tokens of row 1 equal that row alone, unpadded
    alone = linear_attention(q[1:, :, 4:], k[1:, :, 4:], v[1:, :, 4:], window=3, feature_map=PHI,
                             backend="torch")
    torch.testing.assert_close(o[1:, :, 4:], alone)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("window", [None, 3])
def test_varlen_against_oracle(window, backend):
    """Packed sequences: each one alone, from its own initial state (pure linear), with
    gradients; the states come back per sequence."""
    cu = torch.tensor([0, 5, 6, 14, 20], dtype=torch.int32)
    dtype = torch.float64 if backend == "torch" else torch.float32  # Triton: no fp64
    q, k, v = _qkv(1, 4, 2, 20, 8, 6, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    state = None
    if window is None:
        st = _state(4, 2, 0, 8, 6, 8, dtype)
        state = (st.s.requires_grad_(), st.z.requires_grad_())
        leaves += list(state)
    out = linear_attention(q, k, v, cu_seqlens=cu, window=window, decay=0.85, initial_state=state,
                           return_state=window is None, backend=backend)
    o = out[0] if window is None else out
    refs, ss, zs = [], [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        sl = (slice(None), slice(None), slice(a, b))
        g = torch.tensor([0.85, 0.85], dtype=torch.float64)
        if window is None:
            r, s, z = linear_attention_naive(q[sl], k[sl], v[sl], PHI, decay=g,
                                             state=(state[0][i:i + 1], state[1][i:i + 1]))
            ss.append(s)
            zs.append(z)
        else:
            r = hybrid_attention_naive(q[sl], k[sl], v[sl], PHI, window, decay=g)[0]
        refs.append(r)
    ref = torch.cat(refs, 2)
    _close("o", o, ref, dtype)
    outs, refs_ = [o], [ref]
    if window is None:
        for name, got, r in (("s", out[1].s, torch.cat(ss)), ("z", out[1].z, torch.cat(zs))):
            _close(name, got, r, dtype)
        outs += [out[1].s, out[1].z]
        refs_ += [torch.cat(ss), torch.cat(zs)]
    ups = [torch.randn_like(t) for t in outs]
    for i, (g, r) in enumerate(zip(torch.autograd.grad(outs, leaves, ups),
                                   torch.autograd.grad(refs_, leaves, [u.to(r.dtype) for u, r
                                                                       in zip(ups, refs_, strict=True)]),
                                   strict=True)):
        _close(f"grad {i}", g, r, dtype, K_GRAD)


def test_triton_backend_declares_the_reasons():
    """The reasons come from the backends' declared attributes (the dispatch's rule)."""
    from attnkit.kernels.linear.backends import BACKENDS, LinearAttentionCall

    q, k, v = _qkv(1, 2, 2, 8, 16, 16, torch.float32)
    call = LinearAttentionCall(q, k, v, None, None, "elu1", True, True, 1e-6, 1.0, window=2,
                               softmax_scale=0.25, q_raw=q, k_raw=k, segments=((0, 8),))
    triton, torch_ = BACKENDS
    assert triton.hybrid and triton.varlen and torch_.hybrid and torch_.varlen
    assert triton.special_reasons(call) == []
    assert torch_.special_reasons(call) == []


@pytest.mark.parametrize("kw,err,match", [
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(window=2.0), TypeError, "window must be an int"),
    (dict(window=True), TypeError, "window must be an int"),
    (dict(window=3, causal=False), ValueError, "causal only"),
    (dict(window=3, normalize=False), ValueError, "normalize=True"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7])), ValueError, "end at N = 8"),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), ValueError, "int32/int64"),
    (dict(window=3, cu_seqlens=torch.tensor([0, 8]), return_state=True), ValueError,
     "no per-sequence state"),
    (dict(window=3, initial_state=(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8))), ValueError,
     "four tensors"),
    (dict(window=3, initial_state=(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8),
                                   torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))), ValueError,
     "at most W - 1 = 2"),
])
def test_bad_arguments(kw, err, match):
    q, k, v = _qkv(1, 2, 2, 8, 8, 8, torch.float32)
    with pytest.raises(err, match=match):
        linear_attention(q, k, v, backend="torch", **kw)


def test_auto_takes_triton_for_the_hybrid_on_cuda_and_torch_past_its_limits():
    """Under "auto" a CUDA call with a window runs on Triton; one that Triton cannot take
    (q/k head dim 264: the window part's flash kernel stops at 256) goes to torch, saying so
    once. Stand-in calls: only the attributes the dispatch reads (no GPU here)."""
    from types import SimpleNamespace

    from attnkit.kernels import dispatch
    from attnkit.kernels.linear.backends import BACKENDS

    cuda_like = SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=torch.float32)

    def call(dk):
        return SimpleNamespace(tensor=cuda_like, head_dim=16, v=torch.zeros(1, 1, 1, 16),
                               window=5, segments=None, grid=(1, 2),
                               q_raw=torch.zeros(1, 2, 1, dk))

    dispatch._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select_backend(call(16), "auto", BACKENDS, op="linear_attention").name == "triton"
    with pytest.warns(UserWarning, match=r"slower 'torch' backend .*q/k head dims up to 256"):
        chosen = dispatch.select_backend(call(264), "auto", BACKENDS, op="linear_attention")
    assert chosen.name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        assert dispatch.select_backend(call(264), "auto", BACKENDS, op="linear_attention").name == "torch"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hybrid_low_precision(dtype):
    """fp16/bf16 inputs (computed in fp32): within the harness's budget of the same naive
    computation in that dtype, forward and gradients; the window comes back in that dtype."""
    q, k, v = _qkv(1, 4, 2, 21, 16, 8, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o, st = linear_attention(q, k, v, window=5, decay=0.9, return_state=True, backend="torch")
    assert o.dtype == st.k.dtype == dtype and st.s.dtype == torch.float32
    g = torch.tensor([0.9, 0.9], dtype=torch.float64)
    ref = hybrid_attention_naive(q, k, v, PHI, 5, decay=g)[0]
    low = hybrid_attention_naive(q, k, v, PHI, 5, decay=g.to(dtype), dtype=dtype)[0]
    assert_close_to_oracle("o", o, ref, low, dtype, K_OUT, 2e-2)
    do = torch.randn_like(o)
    for name, a, r, lo in zip(("dq", "dk", "dv"), torch.autograd.grad(o, leaves, do),
                              torch.autograd.grad(ref, leaves, do.double()),
                              torch.autograd.grad(low, leaves, do), strict=True):
        assert_close_to_oracle(name, a, r, lo, dtype, K_GRAD, 2e-2)
