"""Split-KV decoding attention (forward only): a few queries against a long key/value cache.

The flash forward gives each program ``BLOCK_M`` (32..128) queries of one head; with ``Nq = 1``
that tile is almost all padding and only ``B * Hq`` programs run, each walking the whole cache.
Decoding wants the opposite shape, which is what this kernel does (flash-decoding's idea):

* **GQA packing**: one program takes every query row of one KV head, ``R = (Hq / Hkv) * Nq`` rows
  (row ``r`` is query head ``hk * G + r // Nq``, query ``r % Nq``), so each K/V tile is loaded
  once for the whole group and the ``[R, D] @ [D, BLOCK_N]`` product has real rows;
* **split-KV**: the keys a KV head's rows can see (the band of the pattern, clipped to the
  attended span of the padding mask) are cut into ``NSPLIT`` chunks handled by separate programs
  (grid ``(B * Hkv, NSPLIT, row tiles)``), each writing a partial output normalised by its own
  softmax sum plus its log-sum-exp;
* **merge**: a second kernel combines the partials of each row with weights
  ``exp(lse_s - lse)``, ``lse = log(sum_s exp(lse_s))``.

Semantics are those of :func:`attnkit.attention` for band patterns (``Dense``, ``Causal``,
``SlidingWindow``): bottom-right aligned positions, ``[B, Nk]`` key padding mask, fully masked
rows give ``o = 0`` and ``lse = -inf``. Scores accumulate in fp32 for fp16/bf16/fp32 inputs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .kernels_common import _dot, _score  # the flash kernels' dot and score slot
from .launch import _kv_span
from .spec import Band
from .tiles import _precision

__all__ = ["decode_attention", "num_splits"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Tests set this to fill every buffer with NaN before the kernels run (see flash.POISON_OUTPUTS).
POISON_OUTPUTS = False

_MAX_SPLITS = 64


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    Q, K, V, KPM, KV_LO, KV_HI, OP, LP, ALIBI, sm_scale, softcap, sab, sah,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
    HKV, GROUP, NQ, NK, R, NSPLIT, WIN_L, WIN_R,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Partial attention of rows ``[pid_r * BLOCK_R, +BLOCK_R)`` of KV head ``(b, hk)`` over key
    chunk ``pid_s``. Writes ``OP [B*Hkv, NSPLIT, R, HEAD_DIM]`` (fp32, normalised within the
    chunk) and ``LP [B*Hkv, NSPLIT, R]`` (natural-log LSE of the chunk; -inf if it saw no key)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    zero = pid_bh * 0  # keep NQ/NK tensors (an int argument equal to 1 is a constant on GPU)
    nq = zero + NQ
    nk = zero + NK
    n_rows = zero + R

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    g = rows // nq
    i = rows % nq
    h = hk * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh
              + i.to(tl.int64)[:, None] * sqn + offs_d[None, :] * sqd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BR, BD]

    # Keys any row of this KV head can see: the band of queries 0..nq-1, within the padding span.
    shift = nk - nq
    pos = i + shift  # [BR]
    lo = zero
    hi = nk
    if HAS_KPM:
        lo = tl.load(KV_LO + b)
        hi = tl.load(KV_HI + b)
    if HAS_LEFT:
        lo = tl.maximum(lo, shift - WIN_L)
    if HAS_RIGHT:
        hi = tl.minimum(hi, nq - 1 + shift + WIN_R + 1)
    lo = tl.maximum(lo, 0)
    hi = tl.maximum(hi, lo)
    chunk = tl.cdiv(tl.cdiv(hi - lo, NSPLIT), BLOCK_N) * BLOCK_N
    c_lo = tl.minimum(lo + pid_s * chunk, hi)
    c_hi = tl.minimum(c_lo + chunk, hi)

    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    qk_scale = sm_scale * 1.4426950408889634  # log2 domain: exp2 in the softmax
    # the flash kernels' score slot (_score), with a slope per row: rows mix the group's heads
    slope = tl.zeros([BLOCK_R, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b.to(tl.int64) * sab + h.to(tl.int64) * sah, mask=row_ok,
                        other=0.0)[:, None] * 1.4426950408889634
    cap = softcap * 1.4426950408889634
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    arange_n = tl.arange(0, BLOCK_N)
    for start_n in range(c_lo, c_hi, BLOCK_N):
        offs_n = start_n + arange_n
        n_ok = offs_n < c_hi
        n64 = offs_n.to(tl.int64)
        k = tl.load(k_base + n64[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
        qk = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BR, BD] @ [BD, BN]
        qk = _score(qk, pos[:, None], offs_n[None, :], slope, cap, HAS_SOFTCAP, HAS_ALIBI)
        ok = n_ok[None, :] & row_ok[:, None]
        if HAS_LEFT:
            ok = ok & (offs_n[None, :] >= pos[:, None] - WIN_L)
        if HAS_RIGHT:
            ok = ok & (offs_n[None, :] <= pos[:, None] + WIN_R)
        if HAS_KPM:
            keep = tl.load(KPM + b.to(tl.int64) * smb + n64 * smn, mask=n_ok, other=0)
            ok = ok & (keep[None, :] != 0)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf on empty rows
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n64[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)  # [BR, BN] @ [BN, BD]
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    part = (pid_bh.to(tl.int64) * NSPLIT + pid_s) * R + rows  # [BR] row index into OP / LP
    tl.store(OP + part[:, None] * HEAD_DIM + offs_d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LP + part, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    OP, LP, O, LSE, SINKS, sob, soh, son, sod, slb, slh, sln,
    HKV, GROUP, NQ, R, NSPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """Combine the ``NSPLIT`` partials of one row (and, with sinks, the row's head's sink logit,
    which joins the denominator without a value). Grid: ``(B * Hkv * R,)``."""
    pid = tl.program_id(0)
    zero = pid * 0
    n_rows = zero + R
    nq = zero + NQ
    bh = pid // n_rows
    r = pid % n_rows
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < NSPLIT
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    part = (bh.to(tl.int64) * NSPLIT + splits) * R + r  # [BS]
    lse_s = tl.load(LP + part, mask=s_ok, other=float("-inf"))
    h = ((bh % HKV) * GROUP + r // nq).to(tl.int64)
    m = tl.max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for chunks that saw nothing
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total = total + tl.exp(sink - m_safe)
    o_s = tl.load(OP + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)  # [BS, BD]
    w = tl.where(s_ok, w, 0.0)
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
    b = (bh // HKV).to(tl.int64)
    i = (r % nq).to(tl.int64)
    tl.store(O + b * sob + h * soh + i * son + offs_d * sod, o.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + b * slb + h * slh + i * sln, lse)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _alloc(shape, device, dtype) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _tiles(head_dim: int, rows: int) -> tuple[int, int, int, int]:
    """``(BLOCK_D, BLOCK_R, BLOCK_N, num_warps)``; every dot dimension is >= 16."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_r = min(max(16, triton.next_power_of_2(rows)), 64)
    if INTERPRET:
        return block_d, block_r, 16, 4
    block_n = 64 if block_d <= 128 else 32
    return block_d, block_r, block_n, 4


def num_splits(batch_kv_heads: int, band_keys: int, block_n: int, device: torch.device) -> int:
    """How many programs share one KV head's keys: enough to fill the GPU about twice, never
    fewer than 1 key block each (nor more than 64 splits)."""
    blocks = max(1, triton.cdiv(max(band_keys, 1), block_n))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, max(batch_kv_heads, 1))
    else:  # the interpreter: a few splits, so that the tests exercise the merge
        want = 3
    return int(max(1, min(want, blocks, _MAX_SPLITS)))


def _band_keys(nq: int, nk: int, left: int, right: int) -> int:
    if left >= 0 and right >= 0:
        return min(nk, left + right + nq)
    return nk


def _decode_impl(q, k, v, kpm, scale, window_left, window_right, n_split, sinks=None, alibi=None,
                 softcap=0.0):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    R = group * Nq
    block_d, block_r, block_n, warps = _tiles(D, R)
    if n_split <= 0:
        n_split = num_splits(B * Hkv, _band_keys(Nq, Nk, window_left, window_right), block_n, q.device)
    o = _alloc(q.shape, q.device, q.dtype)
    lse = _alloc((B, Hq, Nq), q.device, torch.float32)
    op = _alloc((B * Hkv, n_split, R, D), q.device, torch.float32)
    lp = _alloc((B * Hkv, n_split, R), q.device, torch.float32)
    if kpm is not None:
        kv_lo, kv_hi = _kv_span(kpm)
        kpm_u8, smb, smn = kpm.view(torch.uint8), kpm.stride(0), kpm.stride(1)
    else:
        kv_lo = kv_hi = kpm_u8 = q
        smb = smn = 0
    upcast = INTERPRET and q.dtype == torch.bfloat16
    grid = (B * Hkv, n_split, triton.cdiv(R, block_r))
    sab = (alibi.stride(0) if alibi.dim() == 2 else 0) if alibi is not None else 0
    sah = alibi.stride(-1) if alibi is not None else 0
    _decode_split_kernel[grid](
        q, k, v, kpm_u8, kv_lo, kv_hi, op, lp, alibi, scale, softcap, sab, sah,
        *q.stride(), *k.stride(), *v.stride(), smb, smn,
        Hkv, group, Nq, Nk, R, n_split, max(window_left, 0), max(window_right, 0),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_KPM=kpm is not None,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
        PRECISION=_precision(q.dtype), UPCAST=upcast, num_warps=warps,
    )
    _decode_merge_kernel[(B * Hkv * R,)](
        op, lp, o, lse, sinks, *o.stride(), *lse.stride(), Hkv, group, Nq, R, n_split,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(n_split),
        HAS_SINKS=sinks is not None, num_warps=warps,
    )
    return o, lse


@torch.library.custom_op("attnkit::decode_attn_fwd", mutates_args=())
def decode_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
    scale: float, window_left: int, window_right: int, n_split: int,
    sinks: torch.Tensor | None, alibi_slopes: torch.Tensor | None, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode forward: ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``. ``n_split <= 0``
    picks the number of key chunks from the device; ``softcap = 0`` means none."""
    return _decode_impl(q, k, v, key_mask, scale, window_left, window_right, n_split, sinks,
                        alibi_slopes, softcap)


@decode_attn_fwd.register_fake
def _(q, k, v, key_mask, scale, window_left, window_right, n_split, sinks, alibi_slopes, softcap):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: Band,
    scale: float,
    valid_keys: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few queries against a long cache, forward only (no autograd).

    Args:
        q: ``[B, Hq, Nq, D]`` (small ``Nq``: decoding steps, speculative verification); any strides.
        k, v: ``[B, Hkv, Nk, D]``, ``Hq % Hkv == 0``; any strides (a ``[B, N, H, D]`` cache view
            is read in place).
        spec: a :class:`~attnkit.kernels.flash.spec.Band` (what Dense, Causal and SlidingWindow
            compile to); query ``i`` sits at key position ``i + Nk - Nq``.
        scale: multiplies ``q k^T``.
        valid_keys: ``[B, Nk]`` bool, True = attend.
        num_splits: key chunks per KV head (``None``: from the device's SM count).
        softcap, sinks (``[Hq]`` fp32), alibi_slopes (``[Hq]`` or ``[B, Hq]`` fp32): the score
            modifications of :func:`attnkit.attention` (validated there).

    Returns:
        ``o [B, Hq, Nq, D]`` in q's dtype and ``lse [B, Hq, Nq]`` float32 (natural log); a row
        that sees no key gets ``o = 0``, ``lse = -inf`` (``lse = sink`` with sinks).

    The arguments are assumed validated by :func:`attnkit.attention`'s checks and by the
    ``TritonDecodeBackend`` declarations (band specs, dtypes, ``D <= 256``).
    """
    if not isinstance(spec, Band):
        raise TypeError(f"decode_attention takes a Band spec, got {type(spec).__name__}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    left, right = spec.offsets()
    return torch.ops.attnkit.decode_attn_fwd(
        q, k, v, valid_keys, float(scale), left, right, int(num_splits or 0), sinks, alibi_slopes,
        float(softcap or 0.0),
    )
