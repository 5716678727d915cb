"""Launchers, autotuning and the ``torch.library`` ops around the Triton flash kernels.

``torch.ops.attnkit.flash_attn_fwd`` and ``torch.ops.attnkit.flash_attn_bwd`` are custom ops with
fake (meta) implementations and a registered autograd formula, so ``torch.compile`` traces through
:func:`flash_attention` without a graph break (the kernels stay opaque to Inductor, as
flash-attention's own ops do).
"""

from __future__ import annotations

import os

import torch
import triton

from ..autotune import first_only_if_asked
from . import kernels as kt

__all__ = ["flash_attention", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Tests set this to fill every output with NaN before a kernel runs, so that an element a kernel
#: forgets to write shows up as NaN instead of as stale memory that happens to look right.
POISON_OUTPUTS = False


def _alloc(like: torch.Tensor, shape=None, dtype=None, tail=None) -> torch.Tensor:
    """An output buffer like ``like`` (same strides unless ``shape`` is given).

    ``tail = (cu_seqlens, value)``: packed rows past the last sequence (``N > cu_seqlens[-1]``)
    belong to no sequence and no kernel writes them; they get ``value`` (a device-side mask, no
    host sync). Everything else is left to the kernels (NaN under the tests' poisoning).
    """
    if shape is None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    if tail is not None:
        cu, value = tail
        rows = torch.arange(out.shape[2], device=out.device) >= cu[-1]
        out.masked_fill_(rows.view(-1, *([1] * (out.dim() - 3))), value)
    return out


# --------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest BLOCK_D the tile is offered for).
# Chosen from Hopper compiles (`python -m attnkit.kernels.compile_check`): the first tile of each
# list compiles for sm_90 at its largest head dim with no register spill and within shared
# memory, which tests/kernels/test_compile_check.py asserts; the others are alternatives for the
# autotuner (some spill a little, which only costs speed). Timings: benchmarks/NOTES.md.
_FWD_TILES = [
    (128, 64, 8, 3, 128), (128, 128, 8, 3, 64), (128, 128, 8, 2, 64), (128, 64, 8, 4, 64),
    (128, 64, 4, 3, 64), (64, 64, 4, 3, 128), (128, 32, 8, 3, 128), (64, 32, 8, 2, 256),
    (32, 32, 4, 2, 256),
]
_BWD_DKDV_TILES = [  # BLOCK_M is the inner (query) loop here, BLOCK_N the program's key block
    (16, 128, 8, 2, 128), (32, 128, 8, 3, 128), (32, 128, 8, 2, 128), (32, 64, 4, 3, 128),
    (64, 64, 8, 3, 64), (64, 128, 8, 3, 64), (16, 32, 8, 2, 256), (16, 64, 4, 2, 256),
]
_BWD_DQ_TILES = [
    (128, 64, 8, 3, 128), (128, 128, 8, 3, 64), (64, 64, 4, 3, 128), (128, 32, 8, 3, 128),
    (32, 32, 4, 2, 256), (64, 32, 8, 2, 256),
]
# Offered only to block-sparse calls whose layout block size the larger tiles do not divide
# (16, 48, 80, ...): a tile must never straddle two layout blocks.
_SPARSE_SMALL_TILES = [(16, 16, 4, 2, 256), (32, 16, 4, 2, 256), (16, 32, 4, 2, 256)]
# Under TRITON_INTERPRET (CPU tests) one small tile, with BLOCK_M != BLOCK_N so that the tests
# exercise blocks that straddle the band's diagonal differently for rows and columns.
_INTERPRET_TILE = (32, 16, 4, 1)

_AUTOTUNE_KEY = [
    "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_KPM", "VARLEN", "N_BUCKET", "PRECISION", "SPARSE", "BS",
]


def _prune(configs, named_args, **kwargs):
    """Offer each tile only up to its head dim (bigger head dims overflow registers/shared memory;
    fp32 operands take twice the shared memory, so they get the tiles of twice the head dim), and
    to a block-sparse call only tiles that divide its layout block size."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    q = named_args.get("Q")
    if q is not None and q.element_size() == 4:
        block_d *= 2
    bs = kwargs.get("BS", 0) if kwargs.get("SPARSE", False) else 0
    if bs:
        fitting = [c for c in configs
                   if bs % c.kwargs["BLOCK_M"] == 0 and bs % c.kwargs["BLOCK_N"] == 0]
    else:
        fitting = [c for c in configs if not c.sparse_only]
    keep = [c for c in fitting if block_d <= c.max_block_d]
    # Past every tile's head-dim limit (fp32 at D = 256) the smallest fitting tile still runs.
    return keep or [min(fitting, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _make(kernel, tiles):
    if INTERPRET:
        return kernel, True
    configs = []
    for i, (bm, bn, w, s, max_d) in enumerate(tiles + _SPARSE_SMALL_TILES):
        config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        config.max_block_d = max_d
        config.sparse_only = i >= len(tiles)
        configs.append(config)
    tuned = triton.autotune(configs, key=_AUTOTUNE_KEY,
                            prune_configs_by={"early_config_prune": first_only_if_asked(_prune)})
    return tuned(kernel), False


_fwd, _ = _make(kt._fwd_kernel, _FWD_TILES)
_dkdv, _ = _make(kt._bwd_dkdv_kernel, _BWD_DKDV_TILES)
_dq, _ = _make(kt._bwd_dq_kernel, _BWD_DQ_TILES)


def _tile_meta(block_size: int) -> dict:
    """Explicit tiles under the interpreter (no autotuning there); a block-sparse layout's block
    size must be a multiple of both tile sides."""
    if not INTERPRET:
        return {}
    bm, bn = _INTERPRET_TILE[:2]
    if block_size:
        bm, bn = (bm if block_size % bm == 0 else 16), (bn if block_size % bn == 0 else 16)
    return {"BLOCK_M": bm, "BLOCK_N": bn}


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's matmul precision setting (TF32 unless "highest"), like torch.matmul."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _n_bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), 64), 1 << 17)


def _kv_span(kpm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last attended key of each batch row (no host sync)."""
    nk = kpm.shape[1]
    idx = torch.arange(nk, device=kpm.device, dtype=torch.int32)
    hi = torch.where(kpm, idx + 1, torch.zeros_like(idx)).amax(1).to(torch.int32)
    lo = torch.where(kpm, idx, torch.full_like(idx, nk)).amin(1).to(torch.int32)
    return lo, hi


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class _Launch:
    """Everything the three kernels share for one call: grid extents, masks, sparse lists."""

    def __init__(self, q, k, kpm, cu_q, cu_k, max_q, max_k, window_left, window_right, sparse):
        B, Hq, Nq, D = q.shape
        self.Hq, self.Hkv, self.Nq, self.Nk, self.D = Hq, k.shape[1], Nq, k.shape[2], D
        self.group = Hq // self.Hkv
        self.varlen = cu_q is not None
        self.n_prog_b = (cu_q.numel() - 1) if self.varlen else B
        self.rows_q = max_q if self.varlen else Nq
        self.rows_k = max_k if self.varlen else self.Nk
        self.cu = (cu_q, cu_k) if self.varlen else (q, q)  # unused pointers must still be tensors
        if kpm is not None:
            self.kv_lo, self.kv_hi = _kv_span(kpm)
            self.kpm, self.kpm_strides = kpm.view(torch.uint8), kpm.stride()
        else:
            self.kv_lo = self.kv_hi = self.kpm = q
            self.kpm_strides = (0, 0)
        kv_num, kv_idx, kv_part, q_num, q_idx, q_part, masks, bs, lb, lh = sparse
        self.sparse = kv_num is not None
        if self.sparse:
            self.kv_lists = (kv_num, kv_idx, kv_part, masks)
            self.q_lists = (q_num, q_idx, q_part, masks)
            self.layout_ints = (lh if lb > 1 else 0, 1 if lh > 1 else 0)
            self.rows_cols = (kv_num.shape[1], kv_idx.shape[2], q_num.shape[1], q_idx.shape[2])
        else:
            self.kv_lists = self.q_lists = (q, q, q, q)
            self.layout_ints = (0, 0)
            self.rows_cols = (0, 0, 0, 0)
        self.meta = dict(
            HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_LEFT=window_left >= 0,
            HAS_RIGHT=window_right >= 0, HAS_KPM=kpm is not None, VARLEN=self.varlen,
            PRECISION=_precision(q.dtype), UPCAST=INTERPRET and q.dtype == torch.bfloat16,
            SPARSE=self.sparse, BS=bs if self.sparse else 0,
            **_tile_meta(bs if self.sparse else 0),
        )
        self.window = (max(window_left, 0), max(window_right, 0))
        self.bucket = _n_bucket(self.rows_q)

    def ints(self, rows_cols: tuple[int, int]) -> tuple:
        return (*self.window, self.bucket, *self.layout_ints, *rows_cols)


def _fwd_impl(q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, sparse):
    c = _Launch(q, k, kpm, cu_q, cu_k, max_q, max_k, window_left, window_right, sparse)
    # Packed rows past the last sequence get 0 / -inf instead of uninitialised memory.
    o = _alloc(q, tail=(cu_q, 0.0) if c.varlen else None)
    lse = _alloc(q, shape=(q.shape[0], c.Hq, c.Nq), dtype=torch.float32,
                 tail=(cu_q, float("-inf")) if c.varlen else None)
    grid = lambda meta: (triton.cdiv(c.rows_q, meta["BLOCK_M"]), c.Hq, c.n_prog_b)
    _fwd[grid](
        q, k, v, o, lse, c.kpm, c.kv_lo, c.kv_hi, *c.cu, *c.kv_lists, scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(), *c.kpm_strides,
        c.Hq, c.group, c.Nq, c.Nk, *c.ints(c.rows_cols[:2]), **c.meta,
    )
    return o, lse


def _bwd_impl(do, q, k, v, o, lse, dlse, kpm, cu_q, cu_k, max_q, max_k, scale, window_left,
              window_right, sparse):
    c = _Launch(q, k, kpm, cu_q, cu_k, max_q, max_k, window_left, window_right, sparse)
    B = q.shape[0]
    delta = _alloc(q, shape=(B, c.Hq, c.Nq), dtype=torch.float32)
    pre_block = 16 if INTERPRET else 64
    dlse_ = dlse if dlse is not None else lse
    kt._bwd_preprocess[(triton.cdiv(c.Nq, pre_block), c.Hq, B)](
        o, do, dlse_, delta, *o.stride(), *do.stride(), *dlse_.stride(), c.Hq, c.Nq,
        HEAD_DIM=c.D, BLOCK_D=c.meta["BLOCK_D"], HAS_DLSE=dlse is not None, BLOCK_M=pre_block,
    )
    dq = _alloc(q, tail=(cu_q, 0.0) if c.varlen else None)
    dk = _alloc(k, tail=(cu_k, 0.0) if c.varlen else None)
    dv = _alloc(v, tail=(cu_k, 0.0) if c.varlen else None)
    grid_kv = lambda m: (triton.cdiv(c.rows_k, m["BLOCK_N"]), c.Hkv, c.n_prog_b)
    _dkdv[grid_kv](
        q, k, v, do, lse, delta, dk, dv, c.kpm, *c.cu, *c.q_lists, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dk.stride(),
        *dv.stride(), *c.kpm_strides,
        c.Hq, c.Hkv, c.group, c.Nq, c.Nk, *c.ints(c.rows_cols[2:]), **c.meta,
    )
    grid_q = lambda m: (triton.cdiv(c.rows_q, m["BLOCK_M"]), c.Hq, c.n_prog_b)
    _dq[grid_q](
        q, k, v, do, lse, delta, dq, c.kpm, c.kv_lo, c.kv_hi, *c.cu, *c.kv_lists, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dq.stride(),
        *c.kpm_strides, c.Hq, c.group, c.Nq, c.Nk, *c.ints(c.rows_cols[:2]), **c.meta,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


# The block-sparse lists travel as seven optional tensors plus three ints (see BlockLists):
# kv_num, kv_idx, kv_part, q_num, q_idx, q_part, block_masks, block_size, layout_batch,
# layout_heads. All None / 0 for band patterns.
_Opt = torch.Tensor | None


@torch.library.custom_op("attnkit::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: _Opt, cu_seqlens_q: _Opt, cu_seqlens_k: _Opt,
    kv_num: _Opt, kv_idx: _Opt, kv_part: _Opt, q_num: _Opt, q_idx: _Opt, q_part: _Opt,
    block_masks: _Opt, block_size: int, layout_batch: int, layout_heads: int,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward. Returns ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``."""
    sparse = (kv_num, kv_idx, kv_part, q_num, q_idx, q_part, block_masks, block_size,
              layout_batch, layout_heads)
    return _fwd_impl(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, scale, window_left, window_right, sparse)


@flash_attn_fwd.register_fake
def _(q, k, v, *args):
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("attnkit::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, dlse: _Opt, key_padding_mask: _Opt, cu_seqlens_q: _Opt, cu_seqlens_k: _Opt,
    kv_num: _Opt, kv_idx: _Opt, kv_part: _Opt, q_num: _Opt, q_idx: _Opt, q_part: _Opt,
    block_masks: _Opt, block_size: int, layout_batch: int, layout_heads: int,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward: ``(dq, dk, dv)``; ``dlse`` is the gradient on the LSE output."""
    sparse = (kv_num, kv_idx, kv_part, q_num, q_idx, q_part, block_masks, block_size,
              layout_batch, layout_heads)
    return _bwd_impl(do, q, k, v, o, lse, dlse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, scale, window_left, window_right, sparse)


@flash_attn_bwd.register_fake
def _(do, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_N_TENSOR_INPUTS = 13  # q, k, v, kpm, cu_q, cu_k and the seven block-sparse tensors


def _setup_context(ctx, inputs, output):
    o, lse = output
    ctx.save_for_backward(*inputs[:_N_TENSOR_INPUTS], o, lse)
    ctx.rest = inputs[_N_TENSOR_INPUTS:]
    ctx.set_materialize_grads(False)  # an unused LSE output then costs nothing in backward


def _backward(ctx, do, dlse):
    q, k, v, *masks, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = torch.ops.attnkit.flash_attn_bwd(do, q, k, v, o, lse, dlse, *masks, *ctx.rest)
    return (dq, dk, dv) + (None,) * (_N_TENSOR_INPUTS - 3 + len(ctx.rest))


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(call):
    """Triton flash attention of a validated :class:`~attnkit.kernels.flash.call.AttentionCall`:
    ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``. Band specs pass their two offsets; block lists
    pass their index tensors."""
    spec = call.spec
    if spec.kind == "block_sparse":
        b = spec
        left = right = -1
        sparse = (b.kv_num, b.kv_idx, b.kv_part, b.q_num, b.q_idx, b.q_part, b.masks,
                  b.block_size, b.layout_batch, b.layout_heads)
    else:
        left = -1 if spec.left is None else spec.left
        right = -1 if spec.right is None else spec.right
        sparse = (None,) * 7 + (0, 0, 0)
    return torch.ops.attnkit.flash_attn_fwd(
        call.q, call.k, call.v, call.valid_keys, call.cu_seqlens_q, call.cu_seqlens_k, *sparse,
        int(call.max_seqlen_q or 0), int(call.max_seqlen_k or 0), float(call.scale), left, right,
    )
