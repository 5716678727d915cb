"""The flash forward kernel (FlashAttention-2 style): ``O = softmax(Q K^T * scale, masked) V`` and
the log-sum-exp of every row. The walk over key tiles lives in :mod:`.kernels_walk`
(:func:`_walk_keys`, shared with the dQ kernel); conventions: :mod:`.kernels_common`."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import _load_rows, _query_block, _score_mods
from .kernels_walk import MODE_FWD, _walk_keys


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KPM, KV_LO, KV_HI, CU_Q, CU_K, KV_NUM, KV_NFULL, KV_IDX, KV_PART, PMASK, SINKS, ALIBI,
    sm_scale, softcap, sab, sah,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    slb, slh, sln, smb, smn,
    H, GROUP, NQ, NK, WIN_L, WIN_R, N_BUCKET, LB_STRIDE, LH_STRIDE, NROWB, MAXK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPARSE: tl.constexpr, BS: tl.constexpr, NK_ALIGN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O[b, h, i] = softmax(q_i K^T * scale, masked) V; LSE[b, h, i] = logsumexp of the scores.

    ``Q [B, Hq, Nq, D]``, ``K [B, Hkv, Nk, D]``, ``V [B, Hkv, Nk, Dv]``, ``O [B, Hq, Nq, Dv]``
    (any strides; ``HEAD_DV`` = Dv may differ from ``HEAD_DIM`` = D), ``LSE [B, Hq, Nq]``
    fp32. ``N_BUCKET`` only keys the autotuner (the next power of two of the query rows). Score
    modifications: ``softcap``, ``ALIBI [B or 1, Hq]`` slopes, ``SINKS [Hq]`` logits (fp32) that
    join every row's softmax denominator without a value (a row that sees no key then gets
    ``o = 0``, ``lse = sink``).
    Grid: ``(cdiv(max Nq, BLOCK_M), Hq, B or sequences)``: heads on y, batch rows on z. With a
    right band limit (causal) the last query block, which sees the most keys, runs first
    (longest-first, as FA2/FA3 schedule: no tail of long programs at the end of the grid).
    """
    b, h, q_start, nq, nk, start_m, bb, q_base, k_base, v_base, kpm_off, kv_lo, kv_hi = _query_block(
        Q, K, V, KV_LO, KV_HI, CU_Q, CU_K, sqb, sqh, sqn, skb, skh, skn, svb, svh,
        svn, smb, GROUP, NQ, NK, HAS_KPM, VARLEN, BLOCK_M, HAS_RIGHT)
    if start_m >= nq:
        return
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m64 = start_m.to(tl.int64)
    q = _load_rows(q_base + m64 * sqn, rows, nq - start_m, sqn, offs_d, sqd, HEAD_DIM, BLOCK_D,
                   True)  # [BM, BD]

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the softmax runs on exp2
    # Without score mods the update tracks the max of RAW scores (kernels_walk._fwd_update_folded),
    # which needs sm_scale >= 0: the launcher moves a negative scale's sign into q on the host
    # (flipping it here puts q in registers: +30 registers measured at 128x64).
    if HAS_SINKS:  # the sink starts the online softmax: m = sink, l = exp2(sink - m) = 1
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKS + h) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    slope, cap = _score_mods(bb, h, ALIBI, sab, sah, softcap, HAS_SOFTCAP, HAS_ALIBI)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lay = b * LB_STRIDE + h * LH_STRIDE
    acc, l_i, m_i = _walk_keys(MODE_FWD, acc, l_i, m_i, q, q, k_base, v_base, KPM, kpm_off, skn, skd, svn,
                               svd, smn, start_m, nq, nk, kv_lo, kv_hi, WIN_L, WIN_R, KV_NUM, KV_NFULL,
                               KV_IDX, KV_PART, PMASK, lay, NROWB, MAXK, offs_d, qk_scale, slope, cap,
                               HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                               HAS_KPM, VARLEN, SPARSE, BS, NK_ALIGN, HAS_SOFTCAP, HAS_ALIBI, PRECISION,
                               UPCAST, USE_TMA)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row_ok = rows < nq - start_m
    row64 = (q_start + start_m).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = (O + bb * sob + h.to(tl.int64) * soh + row64 * son
              + rows[:, None] * son + offs_dv[None, :] * sod)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    lse_ptrs = LSE + bb * slb + h.to(tl.int64) * slh + row64 * sln + rows * sln
    tl.store(lse_ptrs, lse, mask=row_ok)
