"""Linear attention with a decaying state (``decay=gamma``) against the float64 oracle.

``S_i = gamma S_{i-1} + phi(k_i) v_i^T`` per key/value head. Forward, final state and the
gradients of q, k, v and the initial state, by tests/harness.py's rule, on both backends (the
Triton kernels under the interpreter on the CPU: chunk 16 and 16-wide blocks, so N = 37..131
spans several chunks with a ragged tail and Dk = 24 splits the features; outputs NaN-poisoned
by conftest); odd N, GQA/MQA, chunk boundaries of the torch path (64 tokens, and 1/5/16
directly), the decode step and the errors.
"""

from __future__ import annotations

import pytest
import torch

from attnkit.attn.linear import LinearAttentionState, linear_attention, linear_attention_step
from attnkit.kernels.linear.feature_maps import FEATURE_MAPS
from attnkit.kernels.linear.naive import linear_attention_naive
from attnkit.kernels.linear.torch_impl import linear_attention_torch
from tests.conftest import DEVICE
from tests.harness import K_GRAD, K_OUT, assert_close_to_oracle

LOW = (torch.float16, torch.bfloat16)

# (id, B, Hq, Hkv, N, Dk, Dv, feature, normalize, state, gamma)
CASES = [
    ("N1-elu1-state", 2, 2, 2, 1, 16, 16, "elu1", True, True, 0.7),
    ("N37-gqa-elu1-state-per-head", 2, 4, 2, 37, 24, 40, "elu1", True, True, (0.95, 0.5)),
    ("N100-mqa-relu-nonorm", 1, 4, 1, 100, 16, 24, "relu", False, False, 0.9),
    ("N131-elu1-state-slow-fast", 1, 2, 2, 131, 16, 16, "elu1", True, True, (0.999, 0.2)),
]
PARAMS = [pytest.param(c, dt, id=f"{c[0]}-{str(dt).split('.')[-1]}")
          for c in CASES for dt in (torch.float32, torch.float16, torch.bfloat16)]


def _gamma(g, Hkv):
    return g if isinstance(g, float) else torch.tensor(g[:Hkv], device=DEVICE)


def _inputs(B, Hq, Hkv, N, Dk, Dv, feature, state, dtype):
    q = torch.randn(B, Hq, N, Dk, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, N, Dk, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, N, Dv, device=DEVICE, dtype=dtype)
    st = None
    if state:  # what an 8-token prefix would leave
        fk = FEATURE_MAPS[feature](torch.randn(B, Hkv, 8, Dk, device=DEVICE))
        vp = torch.randn(B, Hkv, 8, Dv, device=DEVICE)
        st = LinearAttentionState(fk.transpose(-1, -2) @ vp, fk.sum(-2))
    return q, k, v, st


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case,dtype", PARAMS)
def test_decay_against_oracle(case, dtype, backend):
    _, B, Hq, Hkv, N, Dk, Dv, feature, normalize, state, g = case
    q, k, v, st = _inputs(B, Hq, Hkv, N, Dk, Dv, feature, state, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if st is not None:
        st = LinearAttentionState(*(t.requires_grad_() for t in st))
        leaves += list(st)
    gamma = _gamma(g, Hkv)
    o, out_st = linear_attention(q, k, v, feature_map=feature, normalize=normalize, decay=gamma,
                                 initial_state=st, return_state=True, backend=backend)
    assert o.shape == (B, Hq, N, Dv) and o.dtype == dtype and out_st.s.dtype == torch.float32
    g64 = torch.full((Hkv,), gamma) if isinstance(gamma, float) else gamma
    kw = dict(normalize=normalize, state=st, decay=g64)
    phi = FEATURE_MAPS[feature]
    ref = linear_attention_naive(q, k, v, phi, **kw)
    low = linear_attention_naive(q, k, v, phi, dtype=dtype, **kw) if dtype in LOW else ref
    for name, got, r, lo in zip(("o", "s", "z"), (o, *out_st), ref, low, strict=True):
        assert_close_to_oracle(name, got, r, lo, dtype, K_OUT)
    do = torch.randn_like(o)
    ds, dz = torch.randn_like(out_st.s), torch.randn_like(out_st.z)
    grads = torch.autograd.grad((o, *out_st), leaves, (do, ds, dz))
    ref_grads = torch.autograd.grad(ref, leaves, (do.double(), ds.double(), dz.double()))
    low_grads = (torch.autograd.grad(low, leaves, (do, ds.to(dtype), dz.to(dtype)))
                 if dtype in LOW else ref_grads)
    for name, gr, rg, lg in zip(("dq", "dk", "dv", "ds0", "dz0"), grads, ref_grads, low_grads,
                                strict=False):
        assert gr.shape == rg.shape and not torch.isnan(gr).any()
        assert_close_to_oracle(name, gr, rg, lg, dtype, K_GRAD)


def test_decay_actually_decays():
    """A key's weight falls as gamma^(i - j): with one key and a large gap the output is
    exactly gamma^gap times the output right after the key (normalize=False)."""
    k = torch.zeros(1, 1, 9, 4, dtype=torch.float64)
    v = torch.zeros(1, 1, 9, 4, dtype=torch.float64)
    k[..., 0, :], v[..., 0, :] = 1.0, 2.0
    q = torch.ones(1, 1, 9, 4, dtype=torch.float64)
    o = linear_attention(q, k, v, feature_map="identity", normalize=False, decay=0.5)
    expect = 8.0 * 0.5 ** torch.arange(9, dtype=torch.float64)  # phi(q).phi(k) = 4, v = 2
    torch.testing.assert_close(o[0, 0, :, 0], expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_torch_chunks_agree_with_oracle(chunk):
    B, Hq, Hkv, N, F, Dv = 2, 6, 3, 41, 8, 5
    fq, fk = torch.rand(B, Hq, N, F, dtype=torch.float64), torch.rand(B, Hkv, N, F, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, Dv, dtype=torch.float64)
    s0, z0 = torch.rand(B, Hkv, F, Dv, dtype=torch.float64), torch.rand(B, Hkv, F, dtype=torch.float64)
    g = torch.tensor([0.9, 0.3, 1.0], dtype=torch.float64)
    ref = linear_attention_naive(fq, fk, v, lambda x: x, state=(s0, z0), decay=g)
    got = linear_attention_torch(fq, fk, v, s0, z0, decay=g, chunk=chunk)
    for r, x in zip(ref, got, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-12)


def test_pieces_and_steps_equal_whole():
    """The state carries the decay: prefix + suffix from its state, and prefix + steps, both
    reproduce the whole sequence (per-head gamma, GQA, float64)."""
    torch.manual_seed(0)
    B, Hq, Hkv, N, D = 2, 4, 2, 23, 8
    q = torch.randn(B, Hq, N, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, N, D, dtype=torch.float64), torch.randn(B, Hkv, N, D, dtype=torch.float64)
    g = torch.tensor([0.8, 0.6], dtype=torch.float64)
    whole, st_whole = linear_attention(q, k, v, decay=g, return_state=True)
    head, st = linear_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], decay=g,
                                return_state=True)
    tail, st2 = linear_attention(q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], decay=g,
                                 initial_state=st, return_state=True)
    torch.testing.assert_close(torch.cat([head, tail], 2), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st2.s, st_whole.s, rtol=1e-12, atol=1e-12)
    outs = []
    for t in range(10, N):
        o_t, st = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, decay=g)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 2), whole[:, :, 10:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.z, st_whole.z, rtol=1e-12, atol=1e-12)


def test_step_gradients_match_oracle():
    B, Hq, Hkv, D = 2, 4, 2, 8
    q, k, v = (torch.randn(B, h, D, dtype=torch.float64, requires_grad=True)
               for h in (Hq, Hkv, Hkv))
    s0 = torch.rand(B, Hkv, D, D, dtype=torch.float64, requires_grad=True)
    z0 = torch.rand(B, Hkv, D, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.7, 0.4], dtype=torch.float64)
    o, st = linear_attention_step(q, k, v, (s0, z0), decay=g)
    ref = linear_attention_naive(q[:, :, None], k[:, :, None], v[:, :, None],
                                 FEATURE_MAPS["elu1"], state=(s0, z0), decay=g)
    torch.testing.assert_close(o, ref[0][:, :, 0], rtol=1e-12, atol=1e-12)
    leaves = (q, k, v, s0, z0)
    seeds = (torch.randn_like(o), torch.randn_like(st.s), torch.randn_like(st.z))
    got = torch.autograd.grad((o, *st), leaves, seeds)
    want = torch.autograd.grad((ref[0][:, :, 0], ref[1], ref[2]), leaves, seeds)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_decay_one_is_no_decay():
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    for causal in (True, False):
        assert torch.equal(linear_attention(q, k, v, causal=causal, decay=1.0),
                           linear_attention(q, k, v, causal=causal))


def _qkv():
    return (torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(decay=0.5, causal=False), ValueError, r"decay=0\.5 needs causal=True"),
    (dict(decay=torch.full((4,), 0.5)), ValueError, r"shape \[Hkv\] = \[2\].*got shape \[4\]"
     r".*per key/value head"),
    (dict(decay=torch.full((2, 1), 0.5)), ValueError, r"got shape \[2, 1\]"),
    (dict(decay=0.0), ValueError, r"\(0, 1\].*got 0\.0"),
    (dict(decay=torch.tensor([0.5, 1.5])), ValueError, r"\(0, 1\].*\[0\.5, 1\.5\]"),
    (dict(decay=float("nan")), ValueError, "decay must be finite"),
    (dict(decay="0.5"), TypeError, "decay must be a real number"),
    (dict(decay=torch.tensor([1, 1])), TypeError, "floating-point tensor, got torch.int64"),
    (dict(decay=torch.full((2,), 0.5, requires_grad=True)), ValueError, "no gradient"),
], ids=["bidirectional", "per-query-head", "2d", "zero", "above-one", "nan", "str", "int",
        "requires-grad"])
def test_decay_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        linear_attention(*_qkv(), **kw)


def test_step_refuses_bad_decay():
    q, k, v = (t[:, :, 0] for t in _qkv())
    with pytest.raises(ValueError, match="per key/value head"):
        linear_attention_step(q, k, v, None, decay=torch.full((4,), 0.5))


def test_custom_op_with_decay_registration():
    """The forward op with ``lg`` (log gamma) passes torch.library's checks."""
    from attnkit.kernels.linear import op  # noqa: F401 (registers the op)
    from attnkit.kernels.linear.feature_maps import FEATURES

    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    s0 = torch.rand(1, 2, 16, 16, device=DEVICE, requires_grad=True)
    z0 = torch.rand(1, 2, 16, device=DEVICE, requires_grad=True)
    lg = torch.log(torch.tensor([0.9, 0.5], device=DEVICE))
    torch.library.opcheck(
        torch.ops.attnkit.linear_attn_fwd.default,
        (q, k, v, s0, z0, FEATURES["elu1"], True, True, 1e-6, 1.0, lg),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA decode step needs a GPU")
def test_cuda_step_with_decay_matches_torch():
    """No-grad CUDA steps (the kernel, when the extension is built) decay the incoming state
    first: they must give the torch step's output and state."""
    B, Hq, Hkv, D = 3, 8, 2, 64
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    st = (torch.rand(B, Hkv, D, D, device="cuda"), torch.rand(B, Hkv, D, device="cuda"))
    g = torch.tensor([0.9, 0.3], device="cuda")
    with torch.no_grad():
        o, new = linear_attention_step(q, k, v, st, decay=g)
    ref = linear_attention_naive(q[:, :, None].cpu(), k[:, :, None].cpu(), v[:, :, None].cpu(),
                                 FEATURE_MAPS["elu1"], state=tuple(t.cpu() for t in st),
                                 decay=g.cpu())
    torch.testing.assert_close(o.double().cpu(), ref[0][:, :, 0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(new.s.double().cpu(), ref[1], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(new.z.double().cpu(), ref[2], atol=1e-2, rtol=1e-3)
