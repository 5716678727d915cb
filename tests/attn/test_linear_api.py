"""The linear attention API: learnable and custom feature maps, the decode step, backend choice,
the state container and the errors bad input raises."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from attnkit.attn.feature_maps import FEATURE_MAPS, HedgehogFeatureMap
from attnkit.attn.linear import LinearAttentionState, linear_attention, linear_attention_step
from attnkit.kernels.linear.naive import linear_attention_naive
from tests.conftest import DEVICE
from tests.harness import K_GRAD, K_OUT, max_err
from tests.linear_support import assert_close_to_oracle, fp32_highest  # noqa: F401 (a fixture)

BACKENDS = ["triton", "torch"]


def _qkv(B=2, Hq=4, Hkv=2, N=17, Dk=16, Dv=24, dtype=torch.float32, grad=False):
    q = torch.randn(B, Hq, N, Dk, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, N, Dk, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, N, Dv, device=DEVICE, dtype=dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _squared_plus(x):
    """A custom map with F != D: [x^2, softplus(x)] (positive, so normalisation is safe)."""
    return torch.cat([x * x, torch.nn.functional.softplus(x)], -1)


# --------------------------------------------------------------------------------------------
# Learnable and custom feature maps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["hedgehog", "hedgehog-per-head", "callable"])
def test_learnable_and_custom_maps(kind, backend, causal):
    """Forward and the gradients of q, k, v and the map's parameters against the oracle
    (N = 37: several interpreter chunks; F = 24 or 32 != Dk)."""
    q, k, v = _qkv(N=37, grad=True)
    if kind == "callable":
        phi, params = _squared_plus, []
        phi64 = _squared_plus
    else:
        phi = HedgehogFeatureMap(16, 12, num_heads=4 if kind == "hedgehog-per-head" else None)
        if kind == "hedgehog-per-head":  # the per-head map only sees query heads: use MHA
            k, v = (t.detach().repeat_interleave(2, 1).requires_grad_() for t in (k, v))
        with torch.no_grad():  # move off the identity init so the projection matters
            phi.weight.add_(0.3 * torch.randn_like(phi.weight))
            phi.bias.add_(0.1 * torch.randn_like(phi.bias))
        phi = phi.to(DEVICE)
        params = list(phi.parameters())
        phi64 = copy.deepcopy(phi).double()
    o = linear_attention(q, k, v, feature_map=phi, causal=causal, scale=0.7, backend=backend)
    ref, _, _ = linear_attention_naive(q, k, v, phi64, causal=causal, scale=0.7)
    # fp32: the harness rule, and this test's older bounds relative to max(|ref|, 0.1) where
    # they are tighter (the CPU; the GPU's 5e-3 / 1e-2 leave the harness as the bound there)
    on_gpu = DEVICE == "cuda"
    assert_close_to_oracle("o", o, ref, ref, torch.float32, K_OUT, 5e-3 if on_gpu else 2e-5)

    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, [q, k, v, *params], do)
    ref_grads = torch.autograd.grad(
        ref, [q, k, v, *phi64.parameters()] if params else [q, k, v], do.double()
    )
    names = ["dq", "dk", "dv"] + (["dweight", "dbias"] if params else [])
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close_to_oracle(name, g, rg, rg, torch.float32, K_GRAD, 1e-2 if on_gpu else 3e-5)


def test_hedgehog_shapes_and_errors():
    phi = HedgehogFeatureMap(8, 5)
    x = torch.randn(2, 3, 7, 8)
    y = phi(x)
    assert y.shape == (2, 3, 7, 10) and phi.output_dim == 10
    torch.testing.assert_close(y.sum(-1), torch.full((2, 3, 7), 2.0))  # two softmaxes
    assert (y > 0).all()
    with pytest.raises(ValueError, match=r"head_dim=8.*last dim 6"):
        phi(torch.randn(2, 3, 7, 6))
    with pytest.raises(ValueError, match=r"feature_dim must be a positive int, got 0"):
        HedgehogFeatureMap(8, 0)
    with pytest.raises(ValueError, match=r"num_heads=4.*H = 4, got shape \(2, 3, 7, 8\)"):
        HedgehogFeatureMap(8, 5, num_heads=4)(x)


# --------------------------------------------------------------------------------------------
# Decode step
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fp32_highest")
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity", "hedgehog"])
def test_step_reproduces_parallel_form(feature_map):
    """Prefill 9 tokens with the Triton kernels, then decode the other 12 one at a time: every
    output and the final state match the parallel form over the whole sequence."""
    normalize = feature_map != "identity"
    phi = HedgehogFeatureMap(16, 8).to(DEVICE) if feature_map == "hedgehog" else feature_map
    q, k, v = _qkv(N=21)
    kw = dict(feature_map=phi, normalize=normalize, scale=0.5)
    whole, st_whole = linear_attention(q, k, v, return_state=True, backend="triton", **kw)
    _, st = linear_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], return_state=True,
                             backend="triton", **kw)
    outs = []
    for t in range(9, 21):
        o_t, st = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, **kw)
        assert o_t.shape == (2, 4, 24)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 2), whole[:, :, 9:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st.s, st_whole.s, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(st.z, st_whole.z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_from_empty_state_with_4d_tokens(dtype):
    """``state=None`` starts from zeros; ``[B, H, 1, D]`` tokens give ``[B, H, 1, Dv]``; the
    decode matches the torch backend's parallel form token by token."""
    q, k, v = _qkv(N=6, dtype=dtype)
    ref = linear_attention(q, k, v, backend="torch")
    st = None
    for t in range(6):
        o_t, st = linear_attention_step(q[:, :, t : t + 1], k[:, :, t : t + 1],
                                        v[:, :, t : t + 1], st)
        assert o_t.shape == (2, 4, 1, 24) and o_t.dtype == dtype
        assert st.s.dtype == torch.float32 and isinstance(st, LinearAttentionState)
        torch.testing.assert_close(o_t[:, :, 0], ref[:, :, t], atol=1e-5, rtol=1e-4)


def test_step_gradients_match_parallel_form():
    q, k, v = _qkv(B=1, N=5, grad=True)
    st, outs = None, []
    for t in range(5):
        o_t, st = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st)
        outs.append(o_t)
    do = torch.randn(1, 4, 5, 24)
    g_step = torch.autograd.grad(torch.stack(outs, 2), (q, k, v), do)
    g_par = torch.autograd.grad(linear_attention(q, k, v, backend="torch"), (q, k, v), do)
    for a, b in zip(g_step, g_par, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Backend choice and state container
# --------------------------------------------------------------------------------------------


def test_auto_uses_torch_on_cpu_and_tuple_state(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CPU dispatch")

    def refuse(call):
        raise AssertionError("auto picked the Triton backend for CPU tensors")

    from attnkit.kernels.linear.backends import TritonLinear

    monkeypatch.setattr(TritonLinear, "run", refuse)
    monkeypatch.delenv("ATTNKIT_BACKEND", raising=False)
    q, k, v = _qkv()
    o, st = linear_attention(q, k, v, return_state=True)
    s, z = st  # a NamedTuple unpacks like a tuple, and a plain tuple is accepted back
    o2 = linear_attention(q, k, v, initial_state=(s.clone(), z.clone()))
    ref, _, _ = linear_attention_naive(q, k, v, FEATURE_MAPS["elu1"], state=(s, z))
    assert_close_to_oracle("o", o2, ref, ref, torch.float32, K_OUT, 2e-5)
    assert max_err(o, o2) > 1e-3 * max(float(o2.abs().max()), 0.1)  # the state was used


def test_float64_runs_on_torch_and_is_refused_by_triton():
    q, k, v = _qkv(dtype=torch.float64)
    o, st = linear_attention(q, k, v, return_state=True, backend="torch")
    assert o.dtype == torch.float64 and st.s.dtype == torch.float64
    ref, _, _ = linear_attention_naive(q, k, v, FEATURE_MAPS["elu1"])
    assert_close_to_oracle("o", o, ref, ref, torch.float64, K_OUT, 1e-12)
    with pytest.raises(ValueError, match=r"'triton' backend cannot run.*dtype torch.float64"):
        linear_attention(q, k, v, backend="triton")


def test_triton_refuses_feature_dim_above_limit():
    q, k, v = _qkv(Dk=4, N=3)
    wide = lambda x: x.repeat(1, 1, 1, 65).abs()  # F = 260
    with pytest.raises(ValueError, match=r"feature dim 260 is above the maximum of 256"):
        linear_attention(q, k, v, feature_map=wide, backend="triton")
    assert linear_attention(q, k, v, feature_map=wide, backend="torch").shape == (2, 4, 3, 24)
    wide_v = v.repeat(1, 1, 1, 11)[..., :260]  # Dv = 260
    with pytest.raises(ValueError, match=r"value head dim 260 is above the maximum of 256"):
        linear_attention(q, k, wide_v, backend="triton")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _bad_calls():
    q, k, v = _qkv()
    s = torch.zeros(2, 2, 16, 24)
    z = torch.zeros(2, 2, 16)
    return [
        ("mismatched-N", lambda: linear_attention(q, k[:, :, :5], v[:, :, :5]), ValueError,
         r"q has N = 17, k 5, v 5"),
        ("negative-eps", lambda: linear_attention(q, k, v, eps=-1e-3), ValueError,
         r"eps must be >= 0.0, got -0.001"),
        ("unknown-map", lambda: linear_attention(q, k, v, feature_map="softmax"), ValueError,
         r"feature_map must be one of 'elu1', 'relu', 'identity'.*got 'softmax'"),
        ("map-type", lambda: linear_attention(q, k, v, feature_map=3), TypeError,
         r"feature_map must be a str .* or a callable, got int"),
        ("state-shape", lambda: linear_attention(q, k, v, initial_state=(s[:, :, :8], z)),
         ValueError, r"initial_state.s must have shape \[2, 2, 16, 24\].*got \[2, 2, 8, 24\]"),
        ("state-z-shape", lambda: linear_attention(q, k, v, initial_state=(s, z[:, :1])),
         ValueError, r"initial_state.z must have shape \[2, 2, 16\].*got \[2, 1, 16\]"),
        ("state-type", lambda: linear_attention(q, k, v, initial_state=s), TypeError,
         r"initial_state must be a LinearAttentionState\(s, z\) or a tuple \(s, z\), got Tensor"),
        # a tuple, but of one tensor: the message must not say "must be a tuple, got tuple"
        ("state-one-tensor", lambda: linear_attention(q, k, v, initial_state=(s,)), ValueError,
         r"initial_state must hold two tensors \(s \[B, Hkv, F, Dv\], z \[B, Hkv, F\]\), got a "
         r"tuple of 1"),
        ("step-state-shape", lambda: linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                                           (s[..., :3], z)),
         ValueError, r"state.s must have shape \[2, 2, 16, 24\]"),
        ("gqa-heads", lambda: linear_attention(q[:, :3], k, v), ValueError,
         r"q has 3 heads and k/v have 2"),
        ("dk-mismatch", lambda: linear_attention(q, k[..., :8], v), ValueError,
         r"k has head dim 8 but q has 16"),
        ("dtype-mismatch", lambda: linear_attention(q, k.half(), v), TypeError,
         r"k has dtype torch.float16 but q has torch.float32"),
        ("rank", lambda: linear_attention(q[0], k, v), ValueError,
         r"q must be \[B, Hq, N, Dk\], got shape \(4, 17, 16\)"),
        ("int-dtype", lambda: linear_attention(q.long(), k.long(), v.long()), TypeError,
         r"q has dtype torch.int64; float16, bfloat16, float32 or float64 are accepted"),
        ("causal-type", lambda: linear_attention(q, k, v, causal="yes"), TypeError,
         r"causal must be a bool, got 'yes'"),
        ("scale-nan", lambda: linear_attention(q, k, v, scale=float("nan")), ValueError,
         r"scale must be finite, got nan"),
        ("scale-type", lambda: linear_attention(q, k, v, scale="0.5"), TypeError,
         r"scale must be a real number, got str '0.5'"),
        ("backend-name", lambda: linear_attention(q, k, v, backend="cuda"), ValueError,
         r"backend must be one of 'auto', 'triton', 'torch', got 'cuda'"),
        ("step-seq", lambda: linear_attention_step(q[:, :, :2], k[:, :, :2], v[:, :, :2]),
         ValueError, r"q must hold one token"),
        ("map-shape", lambda: linear_attention(q, k, v, feature_map=lambda x: x.sum(-2)),
         ValueError, r"feature_map must map q \[..., D\] to \[..., F\]"),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_clear_errors(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_no_warning_on_cpu_auto():
    """The CPU taking the torch backend is the normal path: no slower-path warning."""
    q, k, v = _qkv(N=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_attention(q, k, v)
