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

from . import flash_triton as kt

__all__ = ["flash_attention", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Tests set this to fill every output with NaN before a kernel runs, so that an element a kernel
#: forgets to write shows up as NaN instead of as stale memory that happens to look right.
POISON_OUTPUTS = False


def _alloc(like: torch.Tensor, fill: float | None = None, shape=None, dtype=None) -> torch.Tensor:
    """An output buffer like ``like`` (same strides unless ``shape`` is given).

    ``fill`` is the value rows outside every packed sequence keep (``None`` = uninitialised).
    """
    if shape is None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    elif fill is not None:
        out.fill_(fill)
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
    (64, 32, 8, 2, 256), (32, 32, 4, 2, 256),
]
# Under TRITON_INTERPRET (CPU tests) one small tile, with BLOCK_M != BLOCK_N so that the tests
# exercise blocks that straddle the band's diagonal differently for rows and columns.
_INTERPRET_TILE = (32, 16, 4, 1)

_AUTOTUNE_KEY = ["HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_KPM", "VARLEN", "N_BUCKET", "PRECISION"]


def _prune(configs, named_args, **kwargs):
    """Offer each tile only up to its head dim (bigger head dims overflow registers/shared memory);
    fp32 operands take twice the shared memory, so they get the tiles of twice the head dim."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    q = named_args.get("Q")
    if q is not None and q.element_size() == 4:
        block_d *= 2
    keep = [c for c in configs if block_d <= c.max_block_d]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _make(kernel, tiles):
    if INTERPRET:
        return kernel, dict(zip(("BLOCK_M", "BLOCK_N"), _INTERPRET_TILE[:2], strict=True))
    configs = []
    for bm, bn, w, s, max_d in tiles:
        config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        config.max_block_d = max_d
        configs.append(config)
    tuned = triton.autotune(configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})
    return tuned(kernel), {}


_fwd, _FWD_META = _make(kt._fwd_kernel, _FWD_TILES)
_dkdv, _DKDV_META = _make(kt._bwd_dkdv_kernel, _BWD_DKDV_TILES)
_dq, _DQ_META = _make(kt._bwd_dq_kernel, _BWD_DQ_TILES)


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


def _common(q, k, kpm, cu_q, max_q, window_left, window_right):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_q is not None
    return dict(
        n_prog_b=(cu_q.numel() - 1) if varlen else B,
        Hq=Hq, Hkv=Hkv, group=Hq // Hkv, Nq=Nq, Nk=Nk, D=D,
        meta=dict(
            HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
            HAS_KPM=kpm is not None, VARLEN=varlen, PRECISION=_precision(q.dtype),
            UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        ),
        wl=max(window_left, 0), wr=max(window_right, 0),
        bucket=_n_bucket(max_q if varlen else Nq),
    )


def _fwd_impl(q, k, v, kpm, cu_q, cu_k, max_q, max_k, scale, window_left, window_right):
    c = _common(q, k, kpm, cu_q, max_q, window_left, window_right)
    varlen = cu_q is not None
    # Packed rows outside every sequence keep 0 / -inf instead of uninitialised memory.
    o = _alloc(q, 0.0 if varlen else None)
    lse = _alloc(q, float("-inf") if varlen else None, shape=(q.shape[0], c["Hq"], c["Nq"]),
                 dtype=torch.float32)
    if kpm is not None:
        kv_lo, kv_hi = _kv_span(kpm)
        kpm_u8, smb, smn = kpm.view(torch.uint8), kpm.stride(0), kpm.stride(1)
    else:
        kv_lo = kv_hi = kpm_u8 = q
        smb = smn = 0
    cu_q_, cu_k_ = (cu_q, cu_k) if varlen else (q, q)
    rows = max_q if varlen else c["Nq"]
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), c["n_prog_b"] * c["Hq"])
    _fwd[grid](
        q, k, v, o, lse, kpm_u8, kv_lo, kv_hi, cu_q_, cu_k_, scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *lse.stride(), smb, smn,
        c["Hq"], c["group"], c["Nq"], c["Nk"], c["wl"], c["wr"], c["bucket"],
        **c["meta"], **_FWD_META,
    )
    return o, lse


def _bwd_impl(do, q, k, v, o, lse, dlse, kpm, cu_q, cu_k, max_q, max_k, scale, window_left,
              window_right):
    c = _common(q, k, kpm, cu_q, max_q, window_left, window_right)
    varlen = cu_q is not None
    B = q.shape[0]
    meta = c["meta"]
    delta = _alloc(q, shape=(B, c["Hq"], c["Nq"]), dtype=torch.float32)
    pre_block = 16 if INTERPRET else 64
    dlse_ = dlse if dlse is not None else lse
    kt._bwd_preprocess[(triton.cdiv(c["Nq"], pre_block), B * c["Hq"])](
        o, do, dlse_, delta, *o.stride(), *do.stride(), *dlse_.stride(), c["Hq"], c["Nq"],
        HEAD_DIM=c["D"], BLOCK_D=meta["BLOCK_D"], HAS_DLSE=dlse is not None, BLOCK_M=pre_block,
    )
    fill = 0.0 if varlen else None
    dq, dk, dv = _alloc(q, fill), _alloc(k, fill), _alloc(v, fill)
    if kpm is not None:
        kv_lo, kv_hi = _kv_span(kpm)
        kpm_u8, smb, smn = kpm.view(torch.uint8), kpm.stride(0), kpm.stride(1)
    else:
        kv_lo = kv_hi = kpm_u8 = q
        smb = smn = 0
    cu_q_, cu_k_ = (cu_q, cu_k) if varlen else (q, q)
    rows_q = max_q if varlen else c["Nq"]
    rows_k = max_k if varlen else c["Nk"]
    nb = c["n_prog_b"]
    grid_kv = lambda m: (triton.cdiv(rows_k, m["BLOCK_N"]), nb * c["Hkv"])
    _dkdv[grid_kv](
        q, k, v, do, lse, delta, dk, dv, kpm_u8, cu_q_, cu_k_, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dk.stride(),
        *dv.stride(), smb, smn,
        c["Hq"], c["Hkv"], c["group"], c["Nq"], c["Nk"], c["wl"], c["wr"], c["bucket"],
        **meta, **_DKDV_META,
    )
    grid_q = lambda m: (triton.cdiv(rows_q, m["BLOCK_M"]), nb * c["Hq"])
    _dq[grid_q](
        q, k, v, do, lse, delta, dq, kpm_u8, kv_lo, kv_hi, cu_q_, cu_k_, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dq.stride(), smb, smn,
        c["Hq"], c["group"], c["Nq"], c["Nk"], c["wl"], c["wr"], c["bucket"],
        **meta, **_DQ_META,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    scale: float, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward. Returns ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``."""
    return _fwd_impl(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, scale, window_left, window_right)


@flash_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right):
    lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("attnkit::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, dlse: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward: ``(dq, dk, dv)``; ``dlse`` is the gradient on the LSE output."""
    return _bwd_impl(do, q, k, v, o, lse, dlse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, scale, window_left, window_right)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, dlse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, scale, window_left, window_right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_NON_TENSOR_ARGS = ("max_seqlen_q", "max_seqlen_k", "scale", "window_left", "window_right")


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, cu_q, cu_k, *rest = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kpm, cu_q, cu_k)
    ctx.args = dict(zip(_NON_TENSOR_ARGS, rest, strict=True))
    ctx.set_materialize_grads(False)  # an unused LSE output then costs nothing in backward


def _backward(ctx, do, dlse):
    q, k, v, o, lse, kpm, cu_q, cu_k = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = torch.ops.attnkit.flash_attn_bwd(
        do, q, k, v, o, lse, dlse, kpm, cu_q, cu_k, *ctx.args.values()
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, pattern, scale, key_padding_mask=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Triton flash attention. Shapes as :func:`attnkit.attention`; returns ``(o, lse)``."""
    left, right = pattern.window()
    return torch.ops.attnkit.flash_attn_fwd(
        q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
        int(max_seqlen_q or 0), int(max_seqlen_k or 0), float(scale), left, right,
    )
