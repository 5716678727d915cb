"""The flash kernels' two autograd paths give the same results: eager calls take
``op._FlashFunction`` (or the launcher directly without grad), ``torch.compile`` the
``torch.library`` ops; ``use_op=True`` forces the latter in eager mode so both can be compared.
The key-padding span is computed once per call and shared by the forward and the backward."""

from __future__ import annotations

import torch

import attnkit
from attnkit import Causal, SlidingWindow
from attnkit.attn.inputs import validate
from attnkit.kernels.flash import launch
from attnkit.kernels.flash.launch import FlashArgs
from attnkit.kernels.flash.op import flash_attention
from tests.conftest import DEVICE


def _inputs(B=2, H=2, N=21, D=16, padding=True, sinks=True):
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, requires_grad=True) for _ in range(3))
    kpm = None
    if padding:
        kpm = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
        kpm[0, N - 5:] = False
        kpm[1, :3] = False
    s = torch.randn(H, device=DEVICE, requires_grad=True) if sinks else None
    return q, k, v, kpm, s


def _run(call, use_op, do, dlse, leaves):
    o, lse = flash_attention(call, use_op=use_op)
    grads = torch.autograd.grad((o, lse), leaves, (do, dlse))
    return o, lse, grads


def test_eager_function_and_custom_op_agree():
    q, k, v, kpm, s = _inputs()
    call = validate(q, k, v, Causal(), None, kpm, None, None, True, sinks=s)
    do, dlse = torch.randn_like(q), torch.randn(q.shape[:3], device=DEVICE)
    leaves = (q, k, v, s)
    eager = _run(call, False, do, dlse, leaves)
    op = _run(call, True, do, dlse, leaves)
    assert type(eager[0].grad_fn).__name__ == "_FlashFunctionBackward"
    assert type(op[0].grad_fn).__name__ != "_FlashFunctionBackward"
    for a, b in zip((*eager[:2], *eager[2]), (*op[:2], *op[2]), strict=True):
        assert torch.equal(a, b)


def test_varlen_paths_agree_and_no_grad_skips_autograd():
    q, k, v = (torch.randn(1, 2, 30, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 25], dtype=torch.int32, device=DEVICE)  # rows 25.. are a tail
    call = validate(q, k, v, SlidingWindow(4, 2), None, None, cu, None, True)
    do, dlse = torch.randn_like(q), torch.zeros(q.shape[:3], device=DEVICE)
    eager, op = (_run(call, use_op, do, dlse, (q, k, v)) for use_op in (False, True))
    for a, b in zip((*eager[:2], *eager[2]), (*op[:2], *op[2]), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        o, lse = flash_attention(call)
    assert o.grad_fn is None and torch.equal(o, eager[0])


def test_key_span_is_computed_once_per_forward_and_backward(monkeypatch):
    calls = []
    real = launch._kv_span

    def counted(kpm):
        calls.append(kpm.shape)
        return real(kpm)

    monkeypatch.setattr(launch, "_kv_span", counted)
    q, k, v, kpm, _ = _inputs(sinks=False)
    o = attnkit.attention(q, k, v, Causal(), valid_keys=kpm, backend="triton")
    o.sum().backward()
    assert len(calls) == 1
    # a FlashArgs built by hand (no span) still gets one from _Launch
    launch._Launch(FlashArgs(q=q.detach(), k=k.detach(), v=v.detach(), kpm=kpm))
    assert len(calls) == 2


def test_flash_args_round_trip_through_the_op_schema():
    q, k, v, kpm, s = _inputs()
    a = FlashArgs.from_call(validate(q, k, v, SlidingWindow(3), 0.5, kpm, None, None, False,
                                     softcap=20.0, sinks=s))
    args = a.op_args()
    assert len(args) == len(FlashArgs.TENSORS) + 7 + 9
    b = FlashArgs.from_op_args(args)
    assert all(x is y or x == y for x, y in zip(b.op_args(), args, strict=True))
    assert (b.left, b.right, b.scale, b.softcap) == (3, 0, 0.5, 20.0)
    assert b.kv_lo is a.kv_lo and b.kv_hi is a.kv_hi and b.kpm is kpm
