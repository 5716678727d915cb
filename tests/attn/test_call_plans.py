"""The per-signature cache of ``attnkit.attention`` (``attn/functional.py``): a call whose signature
was seen skips validation, replays the dispatch and reuses the flash launch plan, swapping in only
its tensors. These tests change one thing at a time between calls of one shape (strides, pattern,
scale, masks, score modifications, dtype, grad mode, the environment) and check that no stale plan
is used: the kernel arguments equal a fresh build's, the results equal the torch backend's, and
every bad input still raises its error."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import attnkit
from attnkit import Causal, Dense, SlidingWindow
from attnkit.attn import functional
from attnkit.attn.inputs import call_signature, validate
from attnkit.attn.patterns import Pattern
from attnkit.kernels import dispatch as bk
from attnkit.kernels.flash import launch
from attnkit.kernels.flash.backends import TorchAttention
from attnkit.kernels.flash.op import flash_attention
from attnkit.kernels.flash.spec import Band
from tests.conftest import DEVICE
from tests.harness import max_err

B, H, N, D = 2, 2, 24, 16


def _qkv(dtype=torch.float32, grad=False):
    return tuple(torch.randn(B, H, N, D, dtype=dtype, device=DEVICE, requires_grad=grad)
                 for _ in range(3))


class _Recorder:
    """Stands in for a kernel: records its keyword arguments and the grid (in ``log``)."""

    def __init__(self, log=None, name="fwd"):
        self.calls = [] if log is None else log
        self.name = name

    def run(self, *args, grid, warmup, **kwargs):
        assert not args and not warmup
        if callable(grid):
            grid = grid({"BLOCK_M": 16, "BLOCK_N": 16})
        self.calls.append((grid, {"kernel": self.name, **kwargs}))

    def __getitem__(self, grid):
        return lambda **kwargs: self.run(grid=grid, warmup=False, **kwargs)


def _normal(grid_kwargs):
    grid, kwargs = grid_kwargs
    out = {"grid": grid}
    for name, x in kwargs.items():
        if isinstance(x, torch.Tensor):
            # outputs are fresh (and NaN-poisoned): their layout only; inputs: their values too
            x = (tuple(x.shape), x.stride(), x.dtype,
                 None if name in _OUTPUTS else x.float().tolist())
        out[name] = x
    return out


_OUTPUTS = ("O", "LSE", "DELTA", "DQ", "DK", "DV", "DO", "DLSE")


def _variants():
    q, k, v = _qkv()
    big = torch.randn(B, H, N, 2 * D, device=DEVICE)
    qt = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)  # same shape, other strides
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[0, -5:] = False
    wide = torch.ones(B, 2 * N, dtype=torch.bool, device=DEVICE)
    wide[1, :7] = False
    sinks = torch.randn(H, device=DEVICE)
    slopes = torch.rand(H, device=DEVICE)
    return [
        dict(q=q, k=k, v=v, pattern=Causal()),
        dict(q=qt, k=k, v=v, pattern=Causal()),
        dict(q=q, k=big[..., :D], v=v, pattern=Causal()),  # k: a narrower row stride
        dict(q=q, k=k, v=v, pattern=SlidingWindow(3, 1)),
        dict(q=q, k=k, v=v, pattern=SlidingWindow(5, 0)),
        dict(q=q, k=k, v=v, pattern=None),
        dict(q=q, k=k, v=v, pattern=Dense(), scale=0.3),
        dict(q=q, k=k, v=v, pattern=Dense(), scale=-0.5),
        dict(q=q, k=k, v=v, pattern=Causal(), valid_keys=mask),
        dict(q=q, k=k, v=v, pattern=Causal(), valid_keys=wide[:, ::2]),  # strided mask
        dict(q=q, k=k, v=v, pattern=Causal(), sinks=sinks),
        dict(q=q, k=k, v=v, pattern=Causal(), alibi_slopes=slopes),
        dict(q=q, k=k, v=v, pattern=Causal(), alibi_slopes=slopes.expand(B, H)),
        dict(q=q, k=k, v=v, pattern=Causal(), softcap=5.0),
        dict(q=q.half(), k=k.half(), v=v.half(), pattern=Causal()),
        dict(q=q, k=k, v=v[..., :8].contiguous(), pattern=Causal()),  # Dv != D
    ]


def test_kernel_arguments_equal_a_fresh_build(monkeypatch):
    """Every variant twice (the second call takes the cached plan), then all again in another
    order: the forward kernel gets exactly what a plan built for that call alone passes."""
    rec = _Recorder()
    monkeypatch.setattr(launch, "_fwd", rec)
    variants = _variants()
    with torch.no_grad():
        for spec in variants + variants[::-1] + variants:
            kwargs = dict(spec)
            q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
            pattern = kwargs.pop("pattern")
            attnkit.attention(q, k, v, pattern, backend="triton", **kwargs)
            call = validate(q, k, v, pattern, kwargs.get("scale"), kwargs.get("valid_keys"),
                            None, None, False, kwargs.get("softcap"), kwargs.get("sinks"),
                            kwargs.get("alibi_slopes"))
            assert call.launch_slot is None
            flash_attention(call)  # no slot: a plan built for this call only
            planned, fresh = rec.calls[-2:]
            assert _normal(planned) == _normal(fresh), spec


@pytest.mark.parametrize("deterministic", ["0", "1"])
def test_backward_arguments_equal_a_fresh_build(monkeypatch, deterministic):
    """The backward kernels (preprocess, dK/dV fused or split, dQ) of a cached plan get what a
    one-call backward (``_bwd_impl``) passes, for every variant, twice."""
    from attnkit.kernels.flash.launch import FlashArgs, _bwd_impl

    monkeypatch.setenv("ATTNKIT_DETERMINISTIC", deterministic)
    log = []
    for name in ("_fwd", "_bwd_preprocess", "_dkdv_fused", "_dkdv_split", "_dq"):
        monkeypatch.setattr(launch, name, _Recorder(log, name))
    for spec in _variants() * 2:
        kwargs = dict(spec)
        q, k, v = (kwargs.pop(n).detach().requires_grad_(True) for n in ("q", "k", "v"))
        pattern = kwargs.pop("pattern")
        o, lse = attnkit.attention(q, k, v, pattern, backend="triton", return_lse=True, **kwargs)
        do = torch.randn_like(o)
        dlse = torch.randn_like(lse)
        del log[:]
        torch.autograd.grad((o, lse), (q, k, v), (do, dlse))
        planned = [_normal(c) for c in log]
        del log[:]
        call = validate(q, k, v, pattern, kwargs.get("scale"), kwargs.get("valid_keys"),
                        None, None, True, kwargs.get("softcap"), kwargs.get("sinks"),
                        kwargs.get("alibi_slopes"))
        _bwd_impl(do, o.detach(), lse.detach(), dlse, FlashArgs.from_call(call))
        fresh = [_normal(c) for c in log]
        assert [c["kernel"] for c in planned] == (
            ["_bwd_preprocess", "_dkdv_fused"] if deterministic == "0"
            else ["_bwd_preprocess", "_dkdv_split", "_dq"])
        assert planned == fresh, spec


def test_fp32_precision_setting_is_read_per_call(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(launch, "_fwd", rec)
    q, k, v = _qkv()
    saved = torch.get_float32_matmul_precision()
    try:
        for setting in ("high", "highest", "high"):
            torch.set_float32_matmul_precision(setting)
            attnkit.attention(q, k, v, Causal(), backend="triton")
            assert rec.calls[-1][1]["PRECISION"] == ("ieee" if setting == "highest" else "tf32")
    finally:
        torch.set_float32_matmul_precision(saved)


def test_results_follow_strides_pattern_and_scale():
    """The real kernels (interpreter on the CPU): each call of one shape that differs in strides,
    pattern or scale from the one before still matches the torch backend."""
    q, k, v = _qkv()
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    for qq, pattern, scale in ((q, Causal(), None), (qt, Causal(), None), (q, Causal(), None),
                               (q, SlidingWindow(4, 2), None), (q, Causal(), 0.2),
                               (q, Causal(), None)):
        for _ in range(2):
            o = attnkit.attention(qq, k, v, pattern, scale=scale, backend="triton")
            ref = attnkit.attention(qq, k, v, pattern, scale=scale, backend="torch")
            assert max_err(o, ref) < 1e-4, (pattern, scale, qq.stride())


def test_grad_mode_changes_take_their_own_plan():
    q, k, v = _qkv(grad=True)
    with torch.no_grad():
        o = attnkit.attention(q, k, v, Causal(), backend="triton")
    assert o.grad_fn is None
    grads = []
    for backend in ("triton", "triton", "torch"):
        o = attnkit.attention(q, k, v, Causal(), backend=backend)
        assert o.grad_fn is not None
        grads.append(torch.autograd.grad(o, (q, k, v), torch.ones_like(o)))
    for got, ref in zip(grads[1], grads[2], strict=True):
        assert max_err(got, ref) < 1e-4
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b)
    # decode shapes: without grad the Triton decode kernel takes them, with grad the flash one
    qd = torch.randn(B, H, 1, D, device=DEVICE, requires_grad=True)
    for _ in range(2):
        with torch.no_grad():
            assert attnkit.attention(qd, k, v, Causal(), backend="triton").grad_fn is None
    o = attnkit.attention(qd, k, v, Causal(), backend="triton")
    assert type(o.grad_fn).__name__ == "_FlashFunctionBackward"
    # sinks alone asking for a gradient
    qd, kd, vd = (t.detach() for t in (q, k, v))
    s = torch.randn(H, device=DEVICE)
    attnkit.attention(qd, kd, vd, Causal(), sinks=s, backend="triton")
    s.requires_grad_(True)
    o = attnkit.attention(qd, kd, vd, Causal(), sinks=s, backend="triton")
    (ds,) = torch.autograd.grad(o.sum(), (s,))
    o_ref = attnkit.attention(qd, kd, vd, Causal(), sinks=s, backend="torch")
    (ds_ref,) = torch.autograd.grad(o_ref.sum(), (s,))
    assert max_err(ds, ds_ref) < 1e-4


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(scale=True), TypeError, "scale must be a float or None, got bool"),
    (dict(scale=1), None, None),  # an int scale is fine (and takes the full path)
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool, got int"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite float > 0"),
    (dict(softcap=True), TypeError, "softcap must be a float > 0 or None, got bool"),
    (dict(valid_keys=torch.ones(B, N)), TypeError, "valid_keys must be a bool tensor"),
    (dict(valid_keys=torch.ones(B, N + 1, dtype=torch.bool)), ValueError,
     r"valid_keys must have shape \[B, Nk\]"),
    (dict(sinks=torch.zeros(H + 1)), ValueError, "sinks must have shape"),
    (dict(sinks=torch.zeros(H, dtype=torch.int32)), TypeError, "sinks must be a floating tensor"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(backend=3), TypeError, "backend must be a str, got int"),
    (dict(key_padding_mask=None), TypeError, "key_padding_mask is not accepted"),
    (dict(max_seqlen=4), ValueError, "max_seqlen is only meaningful together with cu_seqlens"),
    (dict(pattern="causal"), TypeError, "pattern must be an attnkit pattern"),
])
def test_bad_inputs_raise_after_a_signature_is_cached(kwargs, exc, match):
    q, k, v = _qkv()
    kwargs = dict(kwargs)
    for key in ("valid_keys", "sinks"):
        if key in kwargs:
            kwargs[key] = kwargs[key].to(DEVICE)
    pattern = kwargs.pop("pattern", Causal())
    backend = kwargs.pop("backend", "triton")
    for _ in range(2):  # the signature is cached now
        attnkit.attention(q, k, v, Causal(), backend="triton")
    if exc is None:
        attnkit.attention(q, k, v, pattern, backend=backend, **kwargs)
        return
    with pytest.raises(exc, match=match):
        attnkit.attention(q, k, v, pattern, backend=backend, **kwargs)


def test_dispatch_is_replayed_against_the_environment(monkeypatch):
    """What a signature's dispatch depends on besides the call is asked again per call: the
    interpreter switch (CPU tensors), the grid limit, ATTNKIT_BACKEND under "auto", a patched
    backend's run."""
    q, k, v = _qkv()
    for _ in range(2):
        attnkit.attention(q, k, v, Causal(), backend="triton")
        attnkit.attention(q, k, v, Causal())
    monkeypatch.setattr(bk, "GRID_AXIS_MAX", 1)
    with pytest.raises(ValueError, match="above CUDA's grid limit of 1"):
        attnkit.attention(q, k, v, Causal(), backend="triton")
    monkeypatch.undo()
    if q.device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="tensors are on cpu"):
            attnkit.attention(q, k, v, Causal(), backend="triton")
        monkeypatch.undo()
    ran = []
    real = TorchAttention.run
    monkeypatch.setattr(TorchAttention, "run", lambda self, call: ran.append(1) or real(self, call))
    monkeypatch.setenv("ATTNKIT_BACKEND", "torch")
    attnkit.attention(q, k, v, Causal())
    assert ran == [1]
    monkeypatch.setenv("ATTNKIT_BACKEND", "triton")
    attnkit.attention(q, k, v, Causal())
    assert ran == [1]  # now the Triton flash kernel


def test_cache_pins_no_tensors_and_is_bounded(monkeypatch):
    q, k, v = _qkv()
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    refs = [weakref.ref(t) for t in (q, k, v, mask)]
    with torch.no_grad():
        o = attnkit.attention(q, k, v, Causal(), valid_keys=mask, backend="triton")
        o = attnkit.attention(q, k, v, Causal(), valid_keys=mask, backend="triton")
    del q, k, v, mask, o
    gc.collect()
    assert all(r() is None for r in refs)
    monkeypatch.setattr(functional, "_MAX_PLANS", 3)
    for n in range(8, 14):
        qs = torch.randn(1, 1, n, 16, device=DEVICE)
        attnkit.attention(qs, qs, qs, backend="torch")
        assert len(functional._PLANS) <= 3


def test_plans_are_rebuilt_when_what_they_baked_in_changes(monkeypatch):
    """A block list written in place (its version moves) or the interpreter switch flipped."""
    from attnkit import BlockSparse

    q, k, v = _qkv()
    pattern = BlockSparse(torch.ones(1, 2, 2, dtype=torch.bool), block_size=16)
    attnkit.attention(q, k, v, pattern, backend="triton")
    key = functional.plan_key(q, k, v, pattern, None, None, False, None, None, None, "triton")
    slot = functional._PLANS[key].fields["launch_slot"]
    first = slot.plan
    attnkit.attention(q, k, v, pattern, backend="triton")
    assert slot.plan is first
    pattern.compile(N, N, q.device).kv_idx.add_(0)  # same values, a new version
    attnkit.attention(q, k, v, pattern, backend="triton")
    assert slot.plan is not first
    second = slot.plan
    monkeypatch.setattr(launch, "INTERPRET", not launch.INTERPRET)
    assert not second.valid()


def test_only_immutable_patterns_and_plain_floats_are_keyed():
    q, k, v = _qkv()

    class Mutable(Pattern):
        def __init__(self):
            self.right = 0

        def compile(self, nq, nk, device="cpu"):
            return Band(None, self.right)

    p = Mutable()
    assert call_signature(q, k, v, p, None, None, False, None, None, None) is None
    o1 = attnkit.attention(q, k, v, p, backend="triton")
    p.right = None  # now dense: a cached plan would still be causal
    o2 = attnkit.attention(q, k, v, p, backend="triton")
    assert max_err(o1, attnkit.attention(q, k, v, Causal(), backend="torch")) < 1e-4
    assert max_err(o2, attnkit.attention(q, k, v, Dense(), backend="torch")) < 1e-4
    assert call_signature(q, k, v, Causal(), 1, None, False, None, None, None) is None
    assert call_signature(q, k, v, Causal(), None, None, 0, None, None, None) is None
    assert call_signature(q, k, v, Causal(), 0.5, None, False, None, None, None) is not None
    sub = torch.nn.Parameter(q)
    assert call_signature(sub, k, v, Causal(), None, None, False, None, None, None) is None
