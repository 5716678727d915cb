"""The flash backward kernels: ``DELTA`` (preprocess) and dK/dV (one program per key block, summed
over the query heads that share it: GQA without atomics, so the backward is deterministic). The
dQ kernel is in :mod:`.kernels_dq`. Conventions: :mod:`.kernels_common`."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import (
    _block_mask,
    _dot,
    _dscore,
    _list_entry,
    _list_row,
    _load_rows,
    _score,
    _score_mods,
    _seq_bounds,
    _visible,
)


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, sgb, sgh, sgn,
                    H, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """DELTA[b, h, i] = sum_d O * dO - dLSE (fp32, contiguous ``[B, H, N]``).

    A gradient on the LSE enters the score gradient as ``dS += P * dLSE``, which is the same as
    lowering delta by dLSE. Grid: ``(cdiv(N, BLOCK_M), H, B)``.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh + start.to(tl.int64) * son, rows, N - start, son,
                   offs_d, sod, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * sdb + h * sdh + start.to(tl.int64) * sdn, rows, N - start, sdn,
                    offs_d, sdd, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_ok = rows < N - start
    if HAS_DLSE:
        g_ptrs = DLSE + b * sgb + h * sgh + (start + rows).to(tl.int64) * sgn
        delta -= tl.load(g_ptrs, mask=row_ok, other=0.0)
    tl.store(DELTA + ((b * H + h) * N + start + rows), delta, mask=row_ok)


@triton.jit
def _query_blocks(start_n, nq, nk, WIN_L, WIN_R,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query phases ``lo <= full_lo <= full_hi <= hi`` that see the key block at ``start_n``."""
    shift = nk - nq
    n_last = tl.minimum(start_n + BLOCK_N, nk) - 1
    lo = 0
    hi = nq
    full_lo = 0
    full_hi = nq
    if HAS_RIGHT:
        # key j is seen by query i iff i >= j - shift - WIN_R
        lo = tl.maximum(start_n - shift - WIN_R, 0)
        full_lo = tl.maximum(n_last - shift - WIN_R, 0)
    if HAS_LEFT:
        # ... and iff i <= j - shift + WIN_L
        hi = tl.minimum(n_last - shift + WIN_L + 1, nq)
        full_hi = tl.maximum(start_n - shift + WIN_L + 1, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
    full_hi = (full_hi // BLOCK_M) * BLOCK_M
    if not HAS_LEFT:
        full_hi = hi  # rows past nq read dO = 0 and lse = +inf: they contribute nothing
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, ok_t, q_pos, k_pos, slope, cap,
                 USE_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV contribution of one query tile: ``q``/``do [BM, BD]``, ``lse``/``delta [BM]``;
    ``q_pos [BM]`` the rows' aligned key positions, ``k_pos [BN]`` the keys'."""
    s_t = _dot(k, tl.trans(q), None, PRECISION, UPCAST) * qk_scale  # [BN, BD] @ [BD, BM]
    qk_t = _score(s_t, q_pos[None, :], k_pos[:, None], slope, cap, HAS_SOFTCAP, HAS_ALIBI)
    p_t = tl.exp2(qk_t - lse[None, :])
    if USE_MASK:
        p_t = tl.where(ok_t, p_t, 0.0)
    dv = _dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)  # [BN, BM] @ [BM, BD]
    dp_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST)  # [BN, BD] @ [BD, BM]
    ds_t = _dscore(p_t * (dp_t - delta[None, :]), s_t, cap, HAS_SOFTCAP)
    dk = _dot(ds_t.to(q.dtype), q, dk, PRECISION, UPCAST)  # [BN, BM] @ [BM, BD]
    return dk, dv


@triton.jit
def _load_query_tile(q_base, do_base, lse_base, delta_base, start_m, nq, sqn, sqd, sdn, sdd, sln,
                     offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                     BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """q, dO, LSE (log2 units; rows that saw nothing -> +inf so P = 0) and delta of a query tile."""
    arange_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + arange_m
    row_ok = offs_m < nq
    m64 = tl.cast(start_m, tl.int64)
    q = _load_rows(q_base + m64 * sqn, arange_m, nq - start_m, sqn, offs_d, sqd,
                   HEAD_DIM, BLOCK_D, True)  # [BM, BD]
    do = _load_rows(do_base + m64 * sdn, arange_m, nq - start_m, sdn, tl.arange(0, BLOCK_DV), sdd,
                    HEAD_DV, BLOCK_DV, True)  # [BM, BDV]
    lse = tl.load(lse_base + offs_m * sln, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd, sln,
                 lo, hi, offs_n, offs_d, shift, nq, nk, WIN_L, WIN_R, qk_scale, slope, cap,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                 MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Query tiles ``[lo, hi)`` of one band phase that see this key tile."""
    arange_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        q, do, lse, delta = _load_query_tile(q_base, do_base, lse_base, delta_base, start_m, nq, sqn, sqd,
                                             sdn, sdd, sln, offs_d, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV,
                                             BLOCK_M)
        ok_t = _visible((start_m + arange_m)[None, :], offs_n[:, None], shift, nk, WIN_L, WIN_R,
                        HAS_LEFT, HAS_RIGHT)
        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, ok_t, start_m + arange_m + shift,
                              offs_n, slope, cap, MASKED, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _walk_queries(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd, sln,
                  start_n, nq, nk, WIN_L, WIN_R, Q_NUM, Q_IDX, Q_PART, PMASK, lay, NCOLB, MAXQ,
                  offs_d, qk_scale, slope, cap, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, SPARSE: tl.constexpr, BS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Every query tile that sees the key block at ``start_n``: the band's three phases, or the
    layout blocks listed for its block column (the transpose of :func:`_walk_keys`)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    shift = nk - nq
    if SPARSE:
        entry, num, c_in = _list_row(Q_NUM, lay, NCOLB, MAXQ, start_n, BS, BLOCK_N)  # keys in it
        for i in range(num):
            qb, part = _list_entry(Q_IDX, Q_PART, entry, i)
            for t in range(BS // BLOCK_M):
                start_m = qb * BS + t * BLOCK_M
                if start_m < nq:
                    q, do, lse, delta = _load_query_tile(q_base, do_base, lse_base, delta_base, start_m, nq,
                                                         sqn, sqd, sdn, sdd, sln, offs_d, HEAD_DIM, BLOCK_D,
                                                         HEAD_DV, BLOCK_DV, BLOCK_M)
                    if part >= 0:
                        em_t = _block_mask(PMASK, part,
                                           (t * BLOCK_M + tl.arange(0, BLOCK_M))[None, :],
                                           c_in[:, None], BS)  # [BN, BM]
                        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, em_t,
                                              start_m + tl.arange(0, BLOCK_M) + shift, offs_n, slope, cap,
                                              True, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
                    else:
                        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, None,
                                              start_m + tl.arange(0, BLOCK_M) + shift, offs_n, slope, cap,
                                              False, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    else:
        lo, full_lo, full_hi, hi = _query_blocks(start_n, nq, nk, WIN_L, WIN_R, BLOCK_M, BLOCK_N,
                                                 HAS_LEFT, HAS_RIGHT)
        dk, dv = _query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd, sln,
                              lo, full_lo, offs_n, offs_d, shift, nq, nk, WIN_L, WIN_R, qk_scale, slope, cap,
                              HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, True, HAS_LEFT, HAS_RIGHT,
                              HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
        dk, dv = _query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd, sln,
                              full_lo, full_hi, offs_n, offs_d, shift, nq, nk, WIN_L, WIN_R, qk_scale, slope,
                              cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, False, HAS_LEFT, HAS_RIGHT,
                              HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
        dk, dv = _query_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd, sln,
                              full_hi, hi, offs_n, offs_d, shift, nq, nk, WIN_L, WIN_R, qk_scale, slope, cap,
                              HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, True, HAS_LEFT, HAS_RIGHT,
                              HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU_Q, CU_K, Q_NUM, Q_IDX, Q_PART, PMASK, ALIBI, sm_scale,
    softcap, sab, sah,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    slb, slh, sln, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smn,
    H, HKV, GROUP, NQ, NK, WIN_L, WIN_R, N_BUCKET, LB_STRIDE, LH_STRIDE, NCOLB, MAXQ,
    # the program's key block (BLOCK_N) and the inner loop's query tile (BLOCK_M) first: the
    # transpose of the forward's and dQ's tiling
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    SPARSE: tl.constexpr, BS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the ``GROUP`` query heads sharing it.
    Grid: ``(cdiv(max Nk, BLOCK_N), Hkv, B or sequences)``.
    """
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, nq, k_start, nk = _seq_bounds(b, CU_Q, CU_K, NQ, NK, VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= nk:
        return
    bb = b.to(tl.int64)
    if VARLEN:
        bb = bb * 0
    rows = tl.arange(0, BLOCK_N)
    offs_n = start_n + rows
    offs_d = tl.arange(0, BLOCK_D)
    k_off = (k_start + start_n).to(tl.int64)
    k = _load_rows(K + bb * skb + hk.to(tl.int64) * skh + k_off * skn, rows, nk - start_n, skn,
                   offs_d, skd, HEAD_DIM, BLOCK_D, True)
    offs_dv = tl.arange(0, BLOCK_DV)
    v = _load_rows(V + bb * svb + hk.to(tl.int64) * svh + k_off * svn, rows, nk - start_n, svn,
                   offs_dv, svd, HEAD_DV, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for g in range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q + bb * sqb + h * sqh + q_start.to(tl.int64) * sqn
        do_base = DO + bb * sdb + h * sdh + q_start.to(tl.int64) * sdn
        lse_base = LSE + bb * slb + h * slh + q_start.to(tl.int64) * sln
        # DELTA is contiguous [B, Hq, N] (or [1, Hq, N] packed)
        delta_base = DELTA + (bb * H + h) * NQ + q_start
        lay = b * LB_STRIDE + (hk * GROUP + g) * LH_STRIDE
        slope, cap = _score_mods(bb, h, ALIBI, sab, sah, softcap, HAS_SOFTCAP, HAS_ALIBI)
        dk, dv = _walk_queries(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sqd, sdn, sdd, sln,
                               start_n, nq, nk, WIN_L, WIN_R, Q_NUM, Q_IDX, Q_PART, PMASK, lay, NCOLB, MAXQ,
                               offs_d, qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M,
                               BLOCK_N, HAS_LEFT, HAS_RIGHT, SPARSE, BS, HAS_SOFTCAP, HAS_ALIBI, PRECISION,
                               UPCAST)
    dk = dk * sm_scale
    row_ok = rows < nk - start_n
    if HAS_KPM:
        # padded keys were masked in the forward: their scores never reached the output
        keep = tl.load(KPM + bb * smb + offs_n * smn, mask=row_ok, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    st_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    st_mask_v = row_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    dk_ptrs = (DK + bb * sdkb + hk.to(tl.int64) * sdkh + k_off * sdkn
               + rows[:, None] * sdkn + offs_d[None, :] * sdkd)
    dv_ptrs = (DV + bb * sdvb + hk.to(tl.int64) * sdvh + k_off * sdvn
               + rows[:, None] * sdvn + offs_dv[None, :] * sdvd)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=st_mask_v)
