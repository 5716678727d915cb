"""Launchers of the flash kernels: one call's arguments (:class:`FlashArgs`), what the kernels
share for it (:class:`_Launch`), and the forward and backward launches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from .bwd_fused import _dkdv_fused, _dkdv_split, deterministic_backward
from .kernels_bwd import _bwd_preprocess
from .tiles import INTERPRET, _block_d, _dq, _fwd, _n_bucket, _precision, _tile_meta

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


def _kv_span(kpm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last attended key of each batch row (no host sync)."""
    nk = kpm.shape[1]
    idx = torch.arange(nk, device=kpm.device, dtype=torch.int32)
    hi = torch.where(kpm, idx + 1, torch.zeros_like(idx)).amax(1).to(torch.int32)
    lo = torch.where(kpm, idx, torch.full_like(idx, nk)).amin(1).to(torch.int32)
    return lo, hi


# --------------------------------------------------------------------------------------------
# One call's arguments, from the kernel spec to the custom op and back
# --------------------------------------------------------------------------------------------

_Opt = torch.Tensor | None


@dataclass(frozen=True)
class FlashArgs:
    """Everything the flash kernels take for one call, in one place.

    ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]``; ``kpm [B, Nk]`` bool (True = attend);
    ``cu_q``/``cu_k [S + 1]`` int32 with ``max_q``/``max_k`` (packed sequences); ``lists`` the
    block-sparse tensors ``(kv_num, kv_idx, kv_part, q_num, q_idx, q_part, masks)`` with
    ``block_size``/``layout_batch``/``layout_heads``; ``left``/``right`` the band (``-1`` =
    unbounded; ignored with lists). :meth:`op_args` / :meth:`from_op_args` are the only place
    that knows the custom ops' flat schema; every kernel flag derives from which fields are set.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    # tensors are left out of the repr: a FlashArgs in a log must not print megabytes
    kpm: _Opt = field(default=None, repr=False)
    cu_q: _Opt = field(default=None, repr=False)
    cu_k: _Opt = field(default=None, repr=False)
    # block-sparse lists
    block_size: int = 0
    layout_batch: int = 0
    layout_heads: int = 0
    lists: tuple[_Opt, ...] = field(default=(None,) * 7, repr=False)
    # packed sequences
    max_q: int = 0
    max_k: int = 0
    # scores
    scale: float = 1.0
    sinks: _Opt = field(default=None, repr=False)
    alibi: _Opt = field(default=None, repr=False)
    softcap: float = 0.0
    # the band (-1 = unbounded)
    left: int = -1
    right: int = -1

    #: The tensors, in schema order (autograd returns gradients for q, k, v and sinks).
    TENSORS = ("q", "k", "v", "sinks", "kpm", "cu_q", "cu_k", "alibi")

    @classmethod
    def from_call(cls, call) -> FlashArgs:
        """From a validated :class:`~attnkit.kernels.flash.call.AttentionCall`."""
        spec = call.spec
        band = {}
        if spec.kind == "block_sparse":
            band = dict(lists=(spec.kv_num, spec.kv_idx, spec.kv_part, spec.q_num, spec.q_idx,
                               spec.q_part, spec.masks), block_size=spec.block_size,
                        layout_batch=spec.layout_batch, layout_heads=spec.layout_heads)
        else:
            left, right = spec.offsets()
            band = dict(left=left, right=right)
        return cls(q=call.q, k=call.k, v=call.v, kpm=call.valid_keys, cu_q=call.cu_seqlens_q,
                   cu_k=call.cu_seqlens_k, max_q=int(call.max_seqlen_q or 0),
                   max_k=int(call.max_seqlen_k or 0), scale=float(call.scale), sinks=call.sinks,
                   alibi=call.alibi_slopes, softcap=float(call.softcap or 0.0), **band)

    def op_args(self) -> tuple:
        return (*(getattr(self, n) for n in self.TENSORS), *self.lists, self.block_size,
                self.layout_batch, self.layout_heads, self.max_q, self.max_k, self.scale,
                self.left, self.right, self.softcap)

    @classmethod
    def from_op_args(cls, args) -> FlashArgs:
        t = len(cls.TENSORS)
        tensors = dict(zip(cls.TENSORS, args[:t], strict=True))
        lists = tuple(args[t:t + 7])
        bs, lb, lh, max_q, max_k, scale, left, right, softcap = args[t + 7:]
        return cls(**tensors, lists=lists, block_size=bs, layout_batch=lb, layout_heads=lh,
                   max_q=max_q, max_k=max_k, scale=scale, left=left, right=right, softcap=softcap)

    @property
    def n_tensor_inputs(self) -> int:
        return len(self.TENSORS) + len(self.lists)

    @property
    def sparse(self) -> bool:
        return self.lists[0] is not None


class _Launch:
    """What the three kernels share for one call: grid extents, pointers, ints and flags, as
    keyword arguments named like the kernels' parameters."""

    def __init__(self, a: FlashArgs):
        q, k = a.q, a.k
        B, Hq, Nq, D = q.shape
        self.a = a
        self.Hq, self.Hkv, self.Nq, self.Nk, self.D = Hq, k.shape[1], Nq, k.shape[2], D
        self.varlen = a.cu_q is not None
        self.n_prog_b = (a.cu_q.numel() - 1) if self.varlen else B
        self.rows_q = a.max_q if self.varlen else Nq
        self.rows_k = a.max_k if self.varlen else self.Nk
        kpm = a.kpm
        kv_lo, kv_hi = _kv_span(kpm) if kpm is not None else (None, None)
        kv_num, kv_idx, kv_part, q_num, q_idx, q_part, masks = a.lists
        lb, lh = a.layout_batch, a.layout_heads
        self.common = dict(
            KPM=kpm.view(torch.uint8) if kpm is not None else None, CU_Q=a.cu_q, CU_K=a.cu_k,
            PMASK=masks, sm_scale=a.scale, ALIBI=a.alibi, softcap=a.softcap,
            sab=(a.alibi.stride(0) if a.alibi.dim() == 2 else 0) if a.alibi is not None else 0,
            sah=a.alibi.stride(-1) if a.alibi is not None else 0,
            HAS_SOFTCAP=a.softcap > 0, HAS_ALIBI=a.alibi is not None,
            smb=kpm.stride(0) if kpm is not None else 0, smn=kpm.stride(1) if kpm is not None else 0,
            GROUP=Hq // self.Hkv, NQ=Nq, NK=self.Nk,
            WIN_L=max(a.left, 0), WIN_R=max(a.right, 0), N_BUCKET=_n_bucket(self.rows_q),
            LB_STRIDE=lh if lb > 1 else 0, LH_STRIDE=1 if lh > 1 else 0,
            # flags: each derives from which inputs are present
            HEAD_DIM=D, BLOCK_D=_block_d(D), HEAD_DV=a.v.shape[-1], BLOCK_DV=_block_d(a.v.shape[-1]),
            HAS_LEFT=a.left >= 0 and not a.sparse,
            HAS_RIGHT=a.right >= 0 and not a.sparse, HAS_KPM=kpm is not None, VARLEN=self.varlen,
            PRECISION=_precision(q.dtype), UPCAST=INTERPRET and q.dtype == torch.bfloat16,
            SPARSE=a.sparse, BS=a.block_size if a.sparse else 0,
            **_tile_meta(a.block_size if a.sparse else 0),
        )
        self.rows_lists = dict(KV_LO=kv_lo, KV_HI=kv_hi, KV_NUM=kv_num, KV_IDX=kv_idx,
                               KV_PART=kv_part, NROWB=kv_num.shape[1] if a.sparse else 0,
                               MAXK=kv_idx.shape[2] if a.sparse else 0)
        self.cols_lists = dict(Q_NUM=q_num, Q_IDX=q_idx, Q_PART=q_part,
                               NCOLB=q_num.shape[1] if a.sparse else 0,
                               MAXQ=q_idx.shape[2] if a.sparse else 0)


def _strides(prefix: str, t: torch.Tensor) -> dict:
    """``{prefix}b, {prefix}h, {prefix}n, {prefix}d`` (or the first three) strides of ``t``."""
    return dict(zip((prefix + s for s in "bhnd"), t.stride(), strict=False))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _fwd_impl(a: FlashArgs):
    c = _Launch(a)
    q = a.q
    # Packed rows past the last sequence get 0 / -inf instead of uninitialised memory. The output
    # has q's layout (a [B, N, H, D] view stays one), or is contiguous when Dv differs from D.
    dv = a.v.shape[-1]
    o = _alloc(q, shape=None if dv == c.D else (*q.shape[:3], dv),
               tail=(a.cu_q, 0.0) if c.varlen else None)
    lse = _alloc(q, shape=(q.shape[0], c.Hq, c.Nq), dtype=torch.float32,
                 tail=(a.cu_q, float("-inf")) if c.varlen else None)
    grid = lambda meta: (triton.cdiv(c.rows_q, meta["BLOCK_M"]), c.Hq, c.n_prog_b)
    _fwd[grid](
        Q=q, K=a.k, V=a.v, O=o, LSE=lse, SINKS=a.sinks, HAS_SINKS=a.sinks is not None,
        **c.common, **c.rows_lists,
        **_strides("sq", q), **_strides("sk", a.k), **_strides("sv", a.v), **_strides("so", o),
        **_strides("sl", lse), H=c.Hq,
    )
    return o, lse


def _bwd_impl(do, o, lse, dlse, a: FlashArgs):
    """``(dq, dk, dv, dsinks)``. dQ is accumulated inside the dK/dV pass with fp32 atomics
    (5 matmuls per block pair), or, when :func:`~.bwd_fused.deterministic_backward` says so
    (``torch.use_deterministic_algorithms(True)`` or ``ATTNKIT_DETERMINISTIC=1``), by the
    separate dQ kernel (7 matmuls, bitwise reproducible; block-sparse calls always)."""
    c = _Launch(a)
    q, k, v = a.q, a.k, a.v
    B = q.shape[0]
    delta = _alloc(q, shape=(B, c.Hq, c.Nq), dtype=torch.float32)
    pre_block = 16 if INTERPRET else 64
    _bwd_preprocess[(triton.cdiv(c.Nq, pre_block), c.Hq, B)](
        O=o, DO=do, DLSE=dlse, DELTA=delta, **_strides("so", o), **_strides("sd", do),
        **(_strides("sg", dlse) if dlse is not None else dict(sgb=0, sgh=0, sgn=0)), H=c.Hq, N=c.Nq,
        HEAD_DIM=o.shape[-1], BLOCK_D=c.common["BLOCK_DV"], HAS_DLSE=dlse is not None,
        BLOCK_M=pre_block,
    )
    # block-sparse: the fused kernel's nested list walk spills (bwd_fused.py), so the split pair
    fused = not deterministic_backward() and not a.sparse
    # packed rows past the last sequence: 0 (the fused accumulator starts at 0 everywhere)
    dq = _alloc(q, tail=(a.cu_q, 0.0) if c.varlen and not fused else None)
    dk = _alloc(k, tail=(a.cu_k, 0.0) if c.varlen else None)
    dv = _alloc(v, tail=(a.cu_k, 0.0) if c.varlen else None)
    shared = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, **c.common, **_strides("sq", q),
                  **_strides("sk", k), **_strides("sv", v), **_strides("sd", do),
                  **_strides("sl", lse), H=c.Hq)
    grid_kv = lambda m: (triton.cdiv(c.rows_k, m["BLOCK_N"]), c.Hkv, c.n_prog_b)
    kv_args = dict(DK=dk, DV=dv, **shared, **c.cols_lists, **_strides("sdk", dk),
                   **_strides("sdv", dv), HKV=c.Hkv)
    if fused:
        # contiguous rows, and BLOCK_M (<= 128) rows of padding that a query tile hanging past the
        # last row may add its zeros to (the kernel leaves the atomics' rows unmasked)
        dq_acc = torch.zeros((B, c.Hq, c.Nq + 128, c.D), device=q.device, dtype=torch.float32)
        _dkdv_fused[grid_kv](DQ=dq_acc, sdqb=dq_acc.stride(0), sdqh=dq_acc.stride(1), FUSE_DQ=True,
                             **kv_args)
        torch.mul(dq_acc[:, :, :c.Nq], a.scale, out=dq)  # the scale and the cast in one pass
    else:
        _dkdv_split[grid_kv](DQ=None, sdqb=0, sdqh=0, FUSE_DQ=False, **kv_args)
        grid_q = lambda m: (triton.cdiv(c.rows_q, m["BLOCK_M"]), c.Hq, c.n_prog_b)
        _dq[grid_q](DQ=dq, **shared, **c.rows_lists, **_strides("sdq", dq))
    if a.sinks is None:
        return dq, dk, dv, q.new_empty(0, dtype=torch.float32)
    # d sink_h = -sum_{b, i} p_sink * delta with p_sink = exp(sink - lse): the sink's probability
    # in each row (rows that saw nothing but the sink have lse = sink, p_sink = 1).
    p_sink = torch.exp(a.sinks.float()[None, :, None] - lse)  # [B, Hq, Nq]
    return dq, dk, dv, -(p_sink * delta).sum((0, 2))
