"""The Triton flash kernels' autograd: a ``torch.autograd.Function`` in eager mode, ``torch.library``
custom ops under ``torch.compile`` (launchers: ``.launch``; tiles: ``.tiles``).

``torch.ops.attnkit.flash_attn_fwd`` and ``torch.ops.attnkit.flash_attn_bwd`` are custom ops with
fake (meta) implementations and a registered autograd formula, so ``torch.compile`` traces through
:func:`flash_attention` without a graph break (the kernels stay opaque to Inductor, as
flash-attention's own ops do).

Eager calls do not go through them. A grad-enabled call of a custom op with ``setup_context``
runs torch's ``_library.utils.fill_defaults``, which re-reads the schema once per argument:
with the 24-argument schema, a training forward cost 406 us of host time with kernel launches
stubbed, ~300 us of it in the custom op and its autograd (``attnkit bench --host-overhead``, on a
shared 2-core CPU; 110 us after). Eager calls take :class:`_FlashFunction` (the same launchers,
the same saved tensors) or, without grad, the launcher directly, both through the call
signature's :class:`~.launch.FlashPlan` when ``attnkit.attention`` cached one (31 - 32 us for a
training forward, 18.5 - 20.5 us without grad, same benchmark).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import launch
from .launch import FlashArgs, FlashPlan, _bwd_impl, _fwd_impl, _Opt
from .tiles import INTERPRET

__all__ = ["flash_attention", "FlashArgs", "INTERPRET"]


# --------------------------------------------------------------------------------------------
# torch.library ops (torch.compile)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: _Opt,
    key_mask: _Opt, cu_seqlens_q: _Opt, cu_seqlens_k: _Opt, alibi_slopes: _Opt,
    kv_lo: _Opt, kv_hi: _Opt,
    kv_num: _Opt, kv_idx: _Opt, kv_part: _Opt, q_num: _Opt, q_idx: _Opt, q_part: _Opt,
    block_masks: _Opt, block_size: int, layout_batch: int, layout_heads: int,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward (the flat schema of :class:`FlashArgs`). Returns
    ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``."""
    return _fwd_impl(FlashArgs.from_op_args((
        q, k, v, sinks, key_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, kv_lo, kv_hi, kv_num,
        kv_idx, kv_part, q_num, q_idx, q_part, block_masks, block_size, layout_batch,
        layout_heads, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)))


@flash_attn_fwd.register_fake
def _(q, k, v, *args):
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    o = torch.empty_like(q) if v.shape[-1] == q.shape[-1] else q.new_empty((*q.shape[:3], v.shape[-1]))
    return o, lse


@torch.library.custom_op("attnkit::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    do: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, dlse: _Opt,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: _Opt,
    key_mask: _Opt, cu_seqlens_q: _Opt, cu_seqlens_k: _Opt, alibi_slopes: _Opt,
    kv_lo: _Opt, kv_hi: _Opt,
    kv_num: _Opt, kv_idx: _Opt, kv_part: _Opt, q_num: _Opt, q_idx: _Opt, q_part: _Opt,
    block_masks: _Opt, block_size: int, layout_batch: int, layout_heads: int,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward: ``(dq, dk, dv, dsinks)`` (``dsinks`` fp32 ``[Hq]``, empty without
    sinks); ``dlse`` is the gradient on the LSE output."""
    return _bwd_impl(do, o, lse, dlse, FlashArgs.from_op_args((
        q, k, v, sinks, key_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, kv_lo, kv_hi, kv_num,
        kv_idx, kv_part, q_num, q_idx, q_part, block_masks, block_size, layout_batch,
        layout_heads, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)))


@flash_attn_bwd.register_fake
def _(do, o, lse, dlse, q, k, v, sinks, *args):
    ds = q.new_empty(0 if sinks is None else sinks.shape[0], dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds


def _setup_context(ctx, inputs, output):
    o, lse = output
    n = len(FlashArgs.TENSORS) + 7  # the tensors, then the seven block lists
    ctx.save_for_backward(*inputs[:n], o, lse)
    ctx.rest = inputs[n:]
    ctx.set_materialize_grads(False)  # an unused LSE output then costs nothing in backward


def _backward(ctx, do, dlse):
    *tensors, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, dsinks = torch.ops.attnkit.flash_attn_bwd(do, o, lse, dlse, *tensors, *ctx.rest)
    sinks = tensors[3]
    dsinks = dsinks.to(sinks.dtype) if sinks is not None else None
    return (dq, dk, dv, dsinks) + (None,) * (len(tensors) - 4 + len(ctx.rest))


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Eager autograd
# --------------------------------------------------------------------------------------------


_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


class _FlashFunction(torch.autograd.Function):
    """The eager twin of the custom ops' autograd: ``apply(plan, extra, q, k, v, sinks)`` with
    ``plan`` the call signature's :class:`~.launch.FlashPlan` and ``extra = (kpm, kv_lo, kv_hi,
    alibi, cu_q, cu_k)`` (``q``/``k``/``v``/``sinks`` apart so autograd sees them)."""

    @staticmethod
    def forward(ctx, plan: FlashPlan, extra: tuple, q, k, v, sinks):
        o, lse = plan.forward(q, k, v, sinks, *extra)
        # q, k, v, sinks, o, lse through save_for_backward (version-checked, no reference cycle
        # through o); the masks, packing and the key span ride along in ``extra``, the shapes,
        # strides and flags in the plan (built once per signature: nothing is recomputed here).
        ctx.save_for_backward(q, k, v, sinks, o, lse)
        ctx.plan, ctx.extra = plan, extra
        ctx.set_materialize_grads(False)  # an unused LSE output then costs nothing in backward
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, sinks, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dsinks = ctx.plan.backward(do, o, lse, dlse, q, k, v, sinks, *ctx.extra)
        return None, None, dq, dk, dv, dsinks.to(sinks.dtype) if sinks is not None else None


#: ``torch.autograd.Function.apply`` less its Python wrapper (~3 us of the ~9 us that apply costs
#: here, measured with launches stubbed): that wrapper binds defaults only for a Function with
#: ``setup_context`` (this one has none), unwraps dead functorch wrappers (done below, per
#: tensor) and sends calls under functorch transforms to ``custom_function_call``; those calls
#: take ``_FlashFunction.apply`` itself, so they fail as before.
_apply_c = super(torch.autograd.Function, _FlashFunction).apply


def _apply(plan, extra, q, k, v, sinks):
    if torch._C._are_functorch_transforms_active():
        return _FlashFunction.apply(plan, extra, q, k, v, sinks)
    if sinks is not None:
        sinks = _unwrap_if_dead(sinks)
    return _apply_c(plan, extra, _unwrap_if_dead(q), _unwrap_if_dead(k), _unwrap_if_dead(v), sinks)


def flash_attention(call, *, use_op: bool | None = None):
    """Triton flash attention of a validated :class:`~attnkit.kernels.flash.call.AttentionCall`:
    ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``.

    ``use_op``: go through the ``torch.library`` ops (default: only while ``torch.compile``
    traces; tests set it to compare both paths). A call that ``attnkit.attention`` made for a
    cached signature carries a :class:`~attnkit.kernels.flash.call.LaunchSlot`: its
    :class:`~.launch.FlashPlan` is built on the first call and reused after."""
    if use_op is None:
        use_op = torch.compiler.is_compiling()
    slot = call.launch_slot
    if use_op:
        return torch.ops.attnkit.flash_attn_fwd(*FlashArgs.from_call(call).op_args())
    plan = slot.plan if slot is not None else None
    if plan is not None and plan.valid():
        kpm = call.valid_keys
        lo, hi = launch._kv_span(kpm) if kpm is not None else (None, None)
        extra = (kpm, lo, hi, call.alibi_slopes, call.cu_seqlens_q, call.cu_seqlens_k)
    else:
        a = FlashArgs.from_call(call)  # the key span, once for the forward and the backward
        plan = FlashPlan(a)
        if slot is not None:
            slot.plan = plan
        extra = (a.kpm, a.kv_lo, a.kv_hi, a.alibi, a.cu_q, a.cu_k)
    if call.needs_grad:
        return _apply(plan, extra, call.q, call.k, call.v, call.sinks)
    return plan.forward(call.q, call.k, call.v, call.sinks, *extra)
