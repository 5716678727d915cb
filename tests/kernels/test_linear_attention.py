"""Both linear attention backends against the float64 quadratic-form oracle.

Forward, the final state, and the gradients of q, k, v and the initial state (including the
gradient that flows in through the returned state). On the CPU the Triton kernels run under
TRITON_INTERPRET=1 with chunk 16 and 16-wide feature/value blocks, so N = 17, 37 and 100 span
several chunks with a ragged tail, and D = 24..40 exercises the split over blocks. Every Triton
output is filled with NaN before the kernels run (``linear.POISON_OUTPUTS``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from attnkit.attn.linear import LinearAttentionState, linear_attention
from attnkit.kernels.linear.feature_maps import FEATURE_MAPS
from attnkit.kernels.linear.naive import linear_attention_naive
from tests.conftest import DEVICE, ON_GPU
from tests.harness import K_GRAD, K_OUT
from tests.linear_support import assert_close_to_oracle, fp32_highest  # noqa: F401 (a fixture)

BACKENDS = ["triton", "torch"]
LOW = (torch.float16, torch.bfloat16)


@dataclass
class Case:
    id: str
    B: int
    Hq: int
    Hkv: int
    N: int
    Dk: int
    Dv: int
    feature: str
    causal: bool = True
    normalize: bool = True
    state: bool = False
    scale: float = 1.0
    dtypes: tuple = (torch.float32,)


CASES = [
    Case("B2-H2-N1-Dk16-Dv16-elu1-causal", 2, 2, 2, 1, 16, 16, "elu1"),
    Case("B2-H4kv2-N17-Dk24-Dv40-elu1-causal-state-gqa", 2, 4, 2, 17, 24, 40, "elu1", state=True,
         scale=0.5, dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    Case("B1-H2-N100-Dk32-Dv16-relu-causal", 1, 2, 2, 100, 32, 16, "relu"),
    Case("B1-H2-N100-Dk16-Dv32-identity-causal-nonorm", 1, 2, 2, 100, 16, 32, "identity",
         normalize=False, scale=0.25),
    Case("B1-H2-N37-Dk40-Dv24-elu1-causal-nonorm-state", 1, 2, 2, 37, 40, 24, "elu1",
         normalize=False, state=True),
    Case("B2-H4kv1-N37-Dk16-Dv24-elu1-noncausal-state-mqa", 2, 4, 1, 37, 16, 24, "elu1",
         causal=False, state=True, dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    Case("B1-H2-N17-Dk32-Dv24-relu-noncausal", 1, 2, 2, 17, 32, 24, "relu", causal=False),
    Case("B1-H2-N100-Dk16-Dv16-identity-noncausal-nonorm-state", 1, 2, 2, 100, 16, 16, "identity",
         causal=False, normalize=False, state=True, scale=0.25),
]
if ON_GPU:  # larger shapes only where they are cheap
    CASES += [
        Case("B2-H8kv2-N1000-Dk128-Dv128-elu1-causal", 2, 8, 2, 1000, 128, 128, "elu1",
             dtypes=(torch.float32, torch.bfloat16)),
        Case("B1-H4-N777-Dk64-Dv256-elu1-noncausal-state", 1, 4, 4, 777, 64, 256, "elu1",
             causal=False, state=True, dtypes=(torch.bfloat16,)),
    ]

PARAMS = [
    pytest.param(c, dt, id=f"{c.id}-{str(dt).split('.')[-1]}") for c in CASES for dt in c.dtypes
]

# This file's bounds from before the harness, relative to max(|ref|, 0.1): stricter than the
# harness rule on the CPU, so kept (``tests/linear_support.py``). fp32 follows torch's matmul
# precision, full fp32 under the default "highest"; the GPU's larger cases accumulate longer
# chunked sums in another order than the interpreter, hence a little more room there (the
# harness, 2e-5 x factor of the magnitude, is then the tighter bound).
REL_FLOOR = {torch.float32: 1e-4 if ON_GPU else 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _inputs(c: Case, dtype):
    q = torch.randn(c.B, c.Hq, c.N, c.Dk, device=DEVICE, dtype=dtype)
    k = torch.randn(c.B, c.Hkv, c.N, c.Dk, device=DEVICE, dtype=dtype)
    v = torch.randn(c.B, c.Hkv, c.N, c.Dv, device=DEVICE, dtype=dtype)
    state = None
    if c.state:  # a plausible state: what some 8-token prefix would have left behind
        fk = FEATURE_MAPS[c.feature](torch.randn(c.B, c.Hkv, 8, c.Dk, device=DEVICE))
        vp = torch.randn(c.B, c.Hkv, 8, c.Dv, device=DEVICE)
        state = LinearAttentionState(fk.transpose(-1, -2) @ vp, fk.sum(-2))
    return q, k, v, state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", PARAMS)
def test_against_oracle(case: Case, dtype, backend):
    q, k, v, state = _inputs(case, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if state is not None:
        state = LinearAttentionState(*(t.requires_grad_() for t in state))
        leaves += list(state)
    kw = dict(causal=case.causal, normalize=case.normalize, scale=case.scale)
    o, st = linear_attention(q, k, v, feature_map=case.feature, initial_state=state,
                             return_state=True, backend=backend, **kw)
    assert o.shape == (case.B, case.Hq, case.N, case.Dv) and o.dtype == dtype
    assert st.s.shape == (case.B, case.Hkv, case.Dk, case.Dv) and st.s.dtype == torch.float32
    assert st.z.shape == (case.B, case.Hkv, case.Dk) and st.z.dtype == torch.float32

    phi = FEATURE_MAPS[case.feature]
    ref = linear_attention_naive(q, k, v, phi, state=state, **kw)
    low = (linear_attention_naive(q, k, v, phi, state=state, dtype=dtype, **kw) if dtype in LOW
           else ref)
    for name, got, r, lo in zip(("o", "s", "z"), (o, *st), ref, low, strict=True):
        assert_close_to_oracle(name, got, r, lo, dtype, K_OUT, REL_FLOOR[dtype])

    # Upstream gradients on o and on the returned state (the state is what a next piece reads).
    do = torch.randn_like(o)
    ds, dz = torch.randn_like(st.s), torch.randn_like(st.z)
    grads = torch.autograd.grad((o, st.s, st.z), leaves, (do, ds, dz))
    ref_grads = torch.autograd.grad(ref, leaves, (do.double(), ds.double(), dz.double()))
    low_grads = (
        torch.autograd.grad(low, leaves, (do, ds.to(dtype), dz.to(dtype))) if dtype in LOW
        else ref_grads
    )
    names = ["dq", "dk", "dv", "ds0", "dz0"]
    for name, g, rg, lg in zip(names, grads, ref_grads, low_grads, strict=False):
        assert g.shape == rg.shape and g.dtype == (dtype if name[1] in "qkv" else torch.float32)
        assert_close_to_oracle(name, g, rg, lg, dtype, K_GRAD, REL_FLOOR[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bnhd_views_are_read_in_place(backend):
    """``[B, N, H, D]`` tensors viewed as ``[B, H, N, D]`` (non-contiguous) give the same
    result as contiguous ones."""
    B, H, N, D = 2, 2, 23, 16
    q, k, v = (torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    o = linear_attention(q, k, v, backend=backend)
    ref, _, _ = linear_attention_naive(q, k, v, FEATURE_MAPS["elu1"])
    assert_close_to_oracle("o", o, ref, ref, torch.float32, K_OUT, REL_FLOOR[torch.float32])


@pytest.mark.usefixtures("fp32_highest")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 16, 20])
def test_two_pieces_equal_whole(backend, split):
    """Prefix with ``return_state`` then the rest with ``initial_state`` == the whole sequence:
    outputs, final state and the gradients of q, k, v (which flow back through the state)."""
    B, Hq, Hkv, N, Dk, Dv = 1, 4, 2, 37, 16, 24
    q = torch.randn(B, Hq, N, Dk, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hkv, N, Dk, device=DEVICE, requires_grad=True)
    v = torch.randn(B, Hkv, N, Dv, device=DEVICE, requires_grad=True)
    o, st = linear_attention(q, k, v, return_state=True, backend=backend)
    o1, st1 = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split],
                               return_state=True, backend=backend)
    o2, st2 = linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:],
                               initial_state=st1, return_state=True, backend=backend)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(st2.s, st.s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st2.z, st.z, atol=1e-4, rtol=1e-4)
    do = torch.randn_like(o)
    whole = torch.autograd.grad(o, (q, k, v), do)
    pieces = torch.autograd.grad(torch.cat([o1, o2], 2), (q, k, v), do)
    for a, b in zip(pieces, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.usefixtures("fp32_highest")
def test_backends_agree_on_unused_state_gradient():
    """Only ``o`` used: the state outputs get no gradient and the kernels skip them; the result
    still matches the torch backend."""
    q, k, v = (torch.randn(1, 2, 33, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    grads = []
    for backend in BACKENDS:
        o, _ = linear_attention(q, k, v, return_state=True, backend=backend)
        grads.append(torch.autograd.grad(o.sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_custom_op_registration():
    """The forward op passes torch.library's checks (schema, fake tensor, autograd wiring)."""
    from attnkit.kernels.linear import op  # noqa: F401 (registers the op)
    from attnkit.kernels.linear.feature_maps import FEATURES

    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    s0 = torch.rand(1, 2, 16, 16, device=DEVICE, requires_grad=True)
    z0 = torch.rand(1, 2, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.attnkit.linear_attn_fwd.default, (q, k, v, s0, z0, FEATURES["elu1"],
                                                    True, True, 1e-6, 1.0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.usefixtures("fp32_highest")
@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_initial_state(backend):
    """One prefix state expanded over the batch (a stride-0 view) gives the same outputs and
    gradients as that state copied per row: the kernels must not index the view as dense."""
    B, H, N, D = 3, 2, 20, 16
    s = torch.randn(1, H, D, D, device=DEVICE).abs()
    z = torch.randn(1, H, D, device=DEVICE).abs() + 1
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, requires_grad=True) for _ in range(3))
    expanded = (s.expand(B, H, D, D), z.expand(B, H, D))
    copied = (s.repeat(B, 1, 1, 1), z.repeat(B, 1, 1))
    o_e = linear_attention(q, k, v, initial_state=expanded, backend=backend)
    o_c = linear_attention(q, k, v, initial_state=copied, backend=backend)
    torch.testing.assert_close(o_e, o_c)
    do = torch.randn_like(o_e)
    for a, b in zip(torch.autograd.grad(o_e, (q, k, v), do), torch.autograd.grad(o_c, (q, k, v), do),
                    strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.usefixtures("fp32_highest")
def test_op_takes_a_broadcast_state_directly():
    """The op itself (not only the API, which copies) reads a stride-0 initial state as the dense
    block it stands for, in the forward and in the backward's dq walk."""
    from attnkit.kernels.linear.op import linear_attention_triton

    B, H, N, D = 2, 2, 18, 16
    s = torch.randn(1, H, D, D, device=DEVICE).abs()
    z = torch.randn(1, H, D, device=DEVICE).abs() + 1
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, requires_grad=True) for _ in range(3))
    runs = []
    for s0, z0 in ((s.expand(B, H, D, D), z.expand(B, H, D)), (s.repeat(B, 1, 1, 1), z.repeat(B, 1, 1))):
        o, _, _ = linear_attention_triton(q, k, v, s0, z0, "elu1", True, True, 1e-6, 1.0)
        runs.append((o, *torch.autograd.grad(o.sum(), (q, k, v))))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b)
