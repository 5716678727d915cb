"""The `torch.library` ops around the Triton flash kernels (launchers: `.launch`; tiles: `.tiles`).

``torch.ops.attnkit.flash_attn_fwd`` and ``torch.ops.attnkit.flash_attn_bwd`` are custom ops with
fake (meta) implementations and a registered autograd formula, so ``torch.compile`` traces through
:func:`flash_attention` without a graph break (the kernels stay opaque to Inductor, as
flash-attention's own ops do).
"""

from __future__ import annotations

import torch

from .launch import FlashArgs, _bwd_impl, _fwd_impl, _Opt
from .tiles import INTERPRET

__all__ = ["flash_attention", "FlashArgs", "INTERPRET"]


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: _Opt,
    key_mask: _Opt, cu_seqlens_q: _Opt, cu_seqlens_k: _Opt, alibi_slopes: _Opt,
    kv_num: _Opt, kv_idx: _Opt, kv_part: _Opt, q_num: _Opt, q_idx: _Opt, q_part: _Opt,
    block_masks: _Opt, block_size: int, layout_batch: int, layout_heads: int,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward (the flat schema of :class:`FlashArgs`). Returns
    ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``."""
    return _fwd_impl(FlashArgs.from_op_args((
        q, k, v, sinks, key_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, kv_num, kv_idx,
        kv_part, q_num, q_idx, q_part, block_masks, block_size, layout_batch, layout_heads,
        max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)))


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
    kv_num: _Opt, kv_idx: _Opt, kv_part: _Opt, q_num: _Opt, q_idx: _Opt, q_part: _Opt,
    block_masks: _Opt, block_size: int, layout_batch: int, layout_heads: int,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward: ``(dq, dk, dv, dsinks)`` (``dsinks`` fp32 ``[Hq]``, empty without
    sinks); ``dlse`` is the gradient on the LSE output."""
    return _bwd_impl(do, o, lse, dlse, FlashArgs.from_op_args((
        q, k, v, sinks, key_mask, cu_seqlens_q, cu_seqlens_k, alibi_slopes, kv_num, kv_idx,
        kv_part, q_num, q_idx, q_part, block_masks, block_size, layout_batch, layout_heads,
        max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap)))


@flash_attn_bwd.register_fake
def _(do, o, lse, dlse, q, k, v, sinks, *args):
    ds = q.new_empty(0 if sinks is None else sinks.shape[0], dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds


def _setup_context(ctx, inputs, output):
    o, lse = output
    a = FlashArgs.from_op_args(inputs)
    n = a.n_tensor_inputs
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


def flash_attention(call):
    """Triton flash attention of a validated :class:`~attnkit.kernels.flash.call.AttentionCall`:
    ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``."""
    return torch.ops.attnkit.flash_attn_fwd(*FlashArgs.from_call(call).op_args())
