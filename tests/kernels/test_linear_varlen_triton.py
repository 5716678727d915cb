"""Packed sequences (``cu_seqlens``) in the chunked Triton linear attention, against the oracle.

``linear_attention_triton(..., cu_seqlens=...)`` takes ``B = 1`` tensors holding ``S`` sequences
concatenated along N (flash-attention's varlen layout); every sequence runs from its own initial
state (``s0 [S, Hkv, F, Dv]``) and returns its own final state. The reference is the float64
quadratic form (``naive.py``) run on each sequence alone. On the CPU the kernels run under the
interpreter with chunk 16 and 16-wide blocks, so lengths like 17 and 33 cross chunk boundaries
with a ragged tail, 16 ends exactly on one, 0 is an empty sequence (first, inside, last) and
Dk = 24 / Dv = 40 split the feature and value blocks. Every output is NaN-poisoned first
(``linear.POISON_OUTPUTS``, tests/conftest.py): a row, state or gradient the kernels forget to
write fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from attnkit.kernels.linear.feature_maps import FEATURE_MAPS
from attnkit.kernels.linear.naive import linear_attention_naive
from tests.conftest import DEVICE
from tests.harness import K_GRAD, K_OUT, bnhd
from tests.linear_support import assert_close_to_oracle, fp32_highest  # noqa: F401 (a fixture)

pytest.importorskip("triton")

from attnkit.kernels.linear.op import linear_attention_triton  # noqa: E402

LOW = (torch.float16, torch.bfloat16)
# as tests/kernels/test_linear_attention.py (relative to max(|ref|, 0.1)); on a GPU fp32 follows
# torch's matmul precision and the harness's bound is the tighter one
REL_FLOOR = {torch.float32: 1e-4 if DEVICE == "cuda" else 2e-5, torch.float16: 2e-3,
             torch.bfloat16: 1.5e-2}


@dataclass
class Case:
    id: str
    lens: tuple
    Hq: int
    Hkv: int
    Dk: int
    Dv: int
    feature: str
    causal: bool = True
    normalize: bool = True
    state: bool = False
    decay: tuple | None = None  # gamma per key/value head
    scale: float = 1.0
    max_seqlen: int | None = None  # None: the entry point reads it from cu_seqlens
    layout: str = "bhnd"  # "bnhd": [1, N, H, D] memory viewed as [1, H, N, D]
    dtypes: tuple = (torch.float32,)


CASES = [
    Case("5-0-17-1-gqa-elu1-state", (5, 0, 17, 1), 4, 2, 24, 40, "elu1", state=True, scale=0.5,
         dtypes=(torch.float32, torch.float16, torch.bfloat16)),
    # 16 ends on a chunk boundary, 33 crosses two (tail of 1), 15 stays inside one
    Case("16-33-15-decay-state", (16, 33, 15), 2, 2, 16, 16, "elu1", state=True,
         decay=(0.9, 0.5), max_seqlen=40, dtypes=(torch.float32, torch.bfloat16)),
    Case("0-40-3-mqa-relu-decay-nonorm", (0, 40, 3), 4, 1, 16, 24, "relu", normalize=False,
         decay=(0.8,), layout="bnhd"),
    Case("7-20-0-noncausal-mqa-state", (7, 20, 0), 4, 1, 16, 24, "elu1", causal=False,
         state=True, dtypes=(torch.float32, torch.float16)),
    Case("17-1-noncausal-identity-nonorm", (17, 1), 2, 2, 32, 16, "identity", causal=False,
         normalize=False, scale=0.25, layout="bnhd"),
]
PARAMS = [pytest.param(c, dt, id=f"{c.id}-{str(dt).split('.')[-1]}")
          for c in CASES for dt in c.dtypes]


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEVICE)


def _inputs(c: Case, dtype):
    """Packed ``q [1, Hq, N, Dk]``, ``k``, ``v`` and (``c.state``) ``(s0 [S, Hkv, Dk, Dv],
    z0 [S, Hkv, Dk])``, all leaves requiring grad."""
    N, S = sum(c.lens), len(c.lens)
    q = torch.randn(1, c.Hq, N, c.Dk, device=DEVICE, dtype=dtype)
    k = torch.randn(1, c.Hkv, N, c.Dk, device=DEVICE, dtype=dtype)
    v = torch.randn(1, c.Hkv, N, c.Dv, device=DEVICE, dtype=dtype)
    if c.layout == "bnhd":
        q, k, v = (bnhd(t) for t in (q, k, v))
        assert not q.is_contiguous()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    state = None
    if c.state:  # what some 8-token prefix of each sequence would have left behind
        fk = FEATURE_MAPS[c.feature](torch.randn(S, c.Hkv, 8, c.Dk, device=DEVICE))
        vp = torch.randn(S, c.Hkv, 8, c.Dv, device=DEVICE)
        state = ((fk.transpose(-1, -2) @ vp).requires_grad_(), fk.sum(-2).requires_grad_())
    return q, k, v, state


def _oracle(c: Case, q, k, v, state, dtype=torch.float64):
    """Each sequence alone through the quadratic form: ``(o [1, Hq, N, Dv], s [S, ...], z)``;
    an empty sequence keeps its initial state (or zeros)."""
    phi = FEATURE_MAPS[c.feature]
    decay = None if c.decay is None else torch.tensor(c.decay, dtype=torch.float64)
    outs, ss, zs = [], [], []
    bounds = _cu(c.lens).tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        st = None if state is None else (state[0][i:i + 1], state[1][i:i + 1])
        o, s, z = linear_attention_naive(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], phi,
                                         causal=c.causal, normalize=c.normalize, scale=c.scale,
                                         state=st, decay=decay, dtype=dtype)
        outs.append(o)
        ss.append(s)
        zs.append(z)
    return torch.cat(outs, 2), torch.cat(ss), torch.cat(zs)


def _run(c: Case, q, k, v, state):
    s0, z0 = (None, None) if state is None else state
    decay = None if c.decay is None else torch.tensor(c.decay, device=DEVICE)
    return linear_attention_triton(q, k, v, s0, z0, c.feature, c.causal, c.normalize, 1e-6,
                                   c.scale, decay=decay, cu_seqlens=_cu(c.lens),
                                   max_seqlen=c.max_seqlen)


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_packed_against_oracle(case: Case, dtype):
    """Output, per-sequence final state, and the gradients of q, k, v and the initial state
    (with upstream gradients on the output and on the returned state), per sequence against the
    float64 oracle by the harness's rule."""
    q, k, v, state = _inputs(case, dtype)
    leaves = [q, k, v, *(state or ())]
    o, s, z = _run(case, q, k, v, state)
    S, N = len(case.lens), sum(case.lens)
    assert o.shape == (1, case.Hq, N, case.Dv) and o.dtype == dtype
    assert s.shape == (S, case.Hkv, case.Dk, case.Dv) and s.dtype == torch.float32
    assert z.shape == (S, case.Hkv, case.Dk) and z.dtype == torch.float32

    ref = _oracle(case, q, k, v, state)
    low = _oracle(case, q, k, v, state, dtype=dtype) if dtype in LOW else ref
    for name, got, r, lo in zip(("o", "s", "z"), (o, s, z), ref, low, strict=True):
        assert_close_to_oracle(name, got, r, lo, dtype, K_OUT, REL_FLOOR[dtype])

    seeds = (torch.randn_like(o), torch.randn_like(s), torch.randn_like(z))
    grads = torch.autograd.grad((o, s, z), leaves, seeds)
    ref_grads = torch.autograd.grad(ref, leaves, tuple(t.double() for t in seeds))
    low_grads = (torch.autograd.grad(low, leaves, tuple(t.to(dtype) for t in seeds))
                 if dtype in LOW else ref_grads)
    for name, g, rg, lg in zip(("dq", "dk", "dv", "ds0", "dz0"), grads, ref_grads, low_grads,
                               strict=False):
        assert g.shape == rg.shape and g.dtype == (dtype if name[1] in "qkv" else torch.float32)
        assert_close_to_oracle(name, g, rg, lg, dtype, K_GRAD, REL_FLOOR[dtype])


def test_empty_sequences_return_their_state():
    """An empty sequence's final state is its initial state (zeros without one), its gradient
    the upstream one; a pack of only empty sequences launches no chunk and still returns the
    states."""
    Hkv, D = 2, 16
    q = torch.randn(1, 2, 6, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(1, Hkv, 6, D, device=DEVICE, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 0, 6, 6], dtype=torch.int32, device=DEVICE)
    _, s, z = linear_attention_triton(q, k, v, None, None, "elu1", True, True, 1e-6, 1.0,
                                      cu_seqlens=cu)
    assert torch.equal(s[0], torch.zeros_like(s[0])) and torch.equal(s[2], torch.zeros_like(s[2]))
    assert torch.equal(z[0], torch.zeros_like(z[0])) and torch.equal(z[2], torch.zeros_like(z[2]))
    assert float(z[1].detach().abs().min()) > 0  # elu1 > 0: the one real sequence adds to every feature

    empty = [torch.randn(1, h, 0, D, device=DEVICE, requires_grad=True) for h in (2, Hkv, Hkv)]
    s0 = torch.rand(2, Hkv, D, D, device=DEVICE, requires_grad=True)
    z0 = torch.rand(2, Hkv, D, device=DEVICE, requires_grad=True)
    cu0 = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    o, s, z = linear_attention_triton(*empty, s0, z0, "elu1", True, True, 1e-6, 1.0,
                                      decay=torch.tensor([0.5, 0.9], device=DEVICE),
                                      cu_seqlens=cu0)
    assert o.shape == (1, 2, 0, D) and torch.equal(s, s0) and torch.equal(z, z0)
    ds, dz = torch.randn_like(s), torch.randn_like(z)
    g = torch.autograd.grad((s, z), (s0, z0), (ds, dz))
    assert torch.equal(g[0], ds) and torch.equal(g[1], dz)


@pytest.mark.usefixtures("fp32_highest")
@pytest.mark.parametrize("causal,decay", [(True, None), (True, (0.7, 0.95)), (False, None)],
                         ids=["causal", "causal-decay", "noncausal"])
def test_packed_equals_sequences_run_alone(causal, decay):
    """The packed call gives what the unpacked Triton path gives for each sequence on its own
    (outputs, states, and every gradient): the packing changes where rows are read, never the
    arithmetic."""
    lens, Hq, Hkv, D = (9, 17, 0, 32, 1), 4, 2, 16
    c = Case("alone", lens, Hq, Hkv, D, D, "elu1", causal=causal, state=True, decay=decay)
    q, k, v, state = _inputs(c, torch.float32)
    leaves = [q, k, v, *state]
    o, s, z = _run(c, q, k, v, state)
    seeds = (torch.randn_like(o), torch.randn_like(s), torch.randn_like(z))
    packed = torch.autograd.grad((o, s, z), leaves, seeds)

    bounds = _cu(lens).tolist()
    g = torch.tensor(decay, device=DEVICE) if decay else None
    grads = [torch.zeros_like(t) for t in leaves]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if a == b:  # nothing to run: the state passes through (test_empty_sequences_...)
            torch.testing.assert_close(s[i], state[0][i], rtol=0, atol=0)
            continue
        cut = [t[:, :, a:b] for t in (q, k, v)]
        st = (state[0][i:i + 1], state[1][i:i + 1])
        oi, si, zi = linear_attention_triton(*cut, *st, "elu1", causal, True, 1e-6, 1.0, decay=g)
        torch.testing.assert_close(o[:, :, a:b], oi, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s[i:i + 1], si, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(z[i:i + 1], zi, rtol=1e-6, atol=1e-6)
        gi = torch.autograd.grad((oi, si, zi), leaves,
                                 (seeds[0][:, :, a:b], seeds[1][i:i + 1], seeds[2][i:i + 1]),
                                 allow_unused=True)
        grads = [acc + (0 if x is None else x) for acc, x in zip(grads, gi, strict=True)]
    # the empty sequence's state gradient is its upstream gradient
    grads[3][2], grads[4][2] = seeds[1][2], seeds[2][2]
    for name, a, b in zip(("dq", "dk", "dv", "ds0", "dz0"), packed, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_packed_custom_op_registration():
    """The forward op with ``cu``/``max_seqlen`` passes torch.library's checks (schema, fake
    tensor with per-sequence states, autograd wiring)."""
    from attnkit.kernels.linear.feature_maps import FEATURES

    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    s0 = torch.rand(3, 2, 16, 16, device=DEVICE, requires_grad=True)
    z0 = torch.rand(3, 2, 16, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEVICE)
    lg = torch.log(torch.tensor([0.9, 0.5], device=DEVICE))
    torch.library.opcheck(
        torch.ops.attnkit.linear_attn_fwd.default,
        (q, k, v, s0, z0, FEATURES["elu1"], True, True, 1e-6, 1.0, lg, cu, 5),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def _qkv(B=1, N=6):
    return [torch.randn(B, 2, N, 16, device=DEVICE) for _ in range(3)]


@pytest.mark.parametrize("kw,args,exc,match", [
    (dict(cu_seqlens=[0, 6]), {}, TypeError, r"cu_seqlens must be an int32/int64 torch\.Tensor"
     r".*got list"),
    (dict(cu_seqlens=torch.tensor([0.0, 6.0])), {}, ValueError, r"1-D int32/int64.*float32"),
    (dict(cu_seqlens=torch.tensor([6])), {}, ValueError, r"S >= 1, got torch\.int64 \[1\]"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6])), dict(B=2), ValueError, r"B = 1.*B = 2"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6]), max_seqlen=7), {}, ValueError,
     r"max_seqlen must be an int in \[0, N = 6\].*got 7"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6]), max_seqlen=3.0), {}, ValueError,
     r"max_seqlen.*got 3\.0"),
], ids=["list", "float", "one-bound", "batch-2", "max-above-N", "max-float"])
def test_packing_errors(kw, args, exc, match):
    q, k, v = _qkv(**args)
    if isinstance(kw["cu_seqlens"], torch.Tensor):
        kw["cu_seqlens"] = kw["cu_seqlens"].to(DEVICE)
    with pytest.raises(exc, match=match):
        linear_attention_triton(q, k, v, None, None, "elu1", True, True, 1e-6, 1.0, **kw)


def test_initial_state_rows_must_match_sequences():
    q, k, v = _qkv()
    s0, z0 = torch.rand(1, 2, 16, 16, device=DEVICE), torch.rand(1, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"s0 must have one row per packed sequence.*S = 2.*"
                                         r"\[1, 2, 16, 16\]"):
        linear_attention_triton(q, k, v, s0, z0, "elu1", True, True, 1e-6, 1.0, cu_seqlens=cu)
