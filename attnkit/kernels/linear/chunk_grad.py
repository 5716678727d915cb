"""The backward of the chunked linear attention: dq, dk and dv, every chunk at once.

With ``r_i = 1 / (den_i + eps)``, ``g_i = do_i r_i`` and ``c_i = -(do_i . o_i) r_i`` (the
normaliser is one more value column, whose gradient is ``c``; :func:`_bwd_prep_kernel` computes
``c`` once), the state ``S_c``/``z_c`` entering chunk ``c`` and the gradient ``dS_c``/``dz_c``
on the state leaving it (``chunk_state``), decay ``w_q = gamma^(i+1)``, ``w_k = gamma^(n-1-j)``::

    dfq_i = w_q (S_c g_i + z_c c_i) + sum_{j <= i} gamma^(i-j) (g_i . v_j + c_i) fk_j
    dfk_j = w_k (dS_c v_j + dz_c)   + sum_{i >= j} gamma^(i-j) (g_i . v_j + c_i) fq_i
    dv_j  = w_k dS_c^T fk_j         + sum_{i >= j} gamma^(i-j) (fq_i . fk_j) g_i

(the key-side sums run over every query head of the group). Non-causal: the whole sequence's
state / state gradient for every chunk and no sums. dq and dk split ``F`` and hold all of ``DV``
(their scores contract over ``DV``), dv splits ``DV`` and holds all of ``F`` (its scores
contract over ``F``), so every output block is complete in one program: no partial planes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .blocks import (
    block_offsets,
    causal_mask,
    chunk_program,
    chunk_rows,
    decay_weights,
    dot,
    dphi,
    features,
    grad_rows,
    load_rows,
    state_block,
)
from .chunk_state import packed_sequence

__all__ = ["_bwd_prep_kernel", "_chunk_dq_kernel", "_chunk_dk_kernel", "_chunk_dv_kernel"]


@triton.jit
def _bwd_prep_kernel(
    DO, OUT, DEN, DDEN, C, CU, sdob, sdoh, sdon, sdod, sob, soh, son, sod, eps, HQ, N, DV,
    VARLEN: tl.constexpr, HAS_DDEN: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(N, BT), HQ, B)``: ``C [B, HQ, N] = -(do . o) / (den + eps)`` fp32 (``BV``
    holds all of ``DV``): the gradient on the denominator, which every later kernel uses as
    such. ``HAS_DDEN``: ``DDEN [B, HQ, N]`` fp32, a gradient on the returned denominator itself
    (the hybrid's merge reads it), is added. ``VARLEN``: grid ``(chunks of the longest, HQ, S)``
    over the packed sequences (``CU [S + 1]``)."""
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    start = tl.program_id(0) * BT
    n = N
    if VARLEN:
        first, n = packed_sequence(CU, b64)
        if start >= n:
            return
        DO += first * sdon
        OUT += first * son
        DEN += first
        C += first
        if HAS_DDEN:
            DDEN += first
        b64 = 0
    offs_t, mask_t, rows = chunk_rows(start, tl.arange(0, BT), n)
    offs_v = tl.arange(0, BV)
    mask_v = offs_v < DV
    do = load_rows(DO + b64 * sdob + h64 * sdoh, rows, mask_t, sdon, offs_v, mask_v, sdod)
    o = load_rows(OUT + b64 * sob + h64 * soh, rows, mask_t, son, offs_v, mask_v, sod)
    row = (b64 * HQ + h64) * N
    r = 1.0 / (tl.load(DEN + row + rows, mask=mask_t, other=1.0) + eps)
    c = -tl.sum(do.to(tl.float32) * o.to(tl.float32), 1) * r
    if HAS_DDEN:
        c += tl.load(DDEN + row + rows, mask=mask_t, other=0.0)
    tl.store(C + row + rows, c, mask=mask_t)


@triton.jit
def _chunk_dq_kernel(
    Q, K, V, DO, DEN, C, HS, HZ, DQ, LG, CU,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, hs_head, hs_chunk, hz_head, hz_chunk,
    scale, eps, HQ, HKV, GROUP, N, F, DV, NT,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(F, BK) * NT, HQ, B)``, ``BV`` holds all of ``DV``: ``dq[:, kblock]`` of one
    chunk of one query head. ``HS``/``HZ``: the forward states (addressed as in
    ``chunk_out``; ``VARLEN`` as there)."""
    i_k, i_c, h, b64 = chunk_program(tl.cdiv(F, BK))
    hk = h // GROUP
    h64, hk64 = h.to(tl.int64), hk.to(tl.int64)
    offs_f, mask_f, offs_v, mask_v = block_offsets(i_k * BK, 0, F, DV, BK, BV)
    arange_t = tl.arange(0, BT)
    start = i_c * BT
    seq = b64
    n = N
    if VARLEN:
        first, n = packed_sequence(CU, seq)
        if start >= n:
            return
        Q += first * sqn
        K += first * skn
        V += first * svn
        DO += first * sdon
        DQ += first * sdqn
        DEN += first
        C += first
        b64 = 0
    offs_t, mask_t, rows = chunk_rows(start, arange_t, n)
    row = (b64 * HQ + h64) * N
    do, r, c = grad_rows(DO + b64 * sdob + h64 * sdoh, DEN + row, C + row, rows, mask_t, offs_v,
                         mask_v, sdon, sdod, eps, NORMALIZE)
    head = seq * HKV + hk64
    s, z = state_block(HS, HZ, head, i_c, hs_head, hs_chunk, hz_head, hz_chunk,
                       offs_f, mask_f, offs_v, mask_v, DV)
    # inter-chunk: [BT, BV] @ [BV, BK] with the fp32 state
    dfq = (dot(do.to(tl.float32), tl.trans(s), PRECISION, False) * r[:, None]
           + c[:, None] * z[None, :])
    if HAS_DECAY:
        w_a, w_q, w_k, w_s = decay_weights(LG, hk, start, arange_t, n, BT, False)
        dfq = dfq * w_q[:, None]
    if CAUSAL:
        xk_unused, fk = features(K + b64 * skb + hk64 * skh, rows, mask_t, skn, offs_f,
                                 mask_f, skd, 1.0, FEATURE)
        v = load_rows(V + b64 * svb + hk64 * svh, rows, mask_t, svn, offs_v, mask_v, svd)
        # dA_ij = r_i (do_i . v_j) + c_i: [BT, BV] @ [BV, BT], lower triangle
        da = dot(do, tl.trans(v), PRECISION, UPCAST) * r[:, None] + c[:, None]
        da = tl.where(causal_mask(arange_t, False), da, 0.0)
        if HAS_DECAY:
            da = da * w_a
        dfq += dot(da.to(v.dtype), fk.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BK]
    xq, fq_unused = features(Q + b64 * sqb + h64 * sqh, rows, mask_t, sqn, offs_f, mask_f, sqd,
                             scale, 0)
    dq = dfq * dphi(xq, FEATURE) * scale
    tl.store(DQ + b64 * sdqb + h64 * sdqh + rows[:, None] * sdqn + offs_f[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=mask_t[:, None] & mask_f[None, :])


@triton.jit
def _chunk_dk_kernel(
    Q, K, V, DO, DEN, C, HS, HZ, DK, LG, CU,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd, hs_head, hs_chunk, hz_head, hz_chunk,
    scale, eps, HQ, HKV, GROUP, N, F, DV, NT,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(F, BK) * NT, HKV, B)``, ``BV`` holds all of ``DV``: ``dk[:, kblock]`` of one
    chunk of one key/value head. ``HS``/``HZ``: the state gradients (reverse scan).
    ``VARLEN`` as in ``chunk_out``."""
    i_k, i_c, hk, b64 = chunk_program(tl.cdiv(F, BK))
    hk64 = hk.to(tl.int64)
    offs_f, mask_f, offs_v, mask_v = block_offsets(i_k * BK, 0, F, DV, BK, BV)
    arange_t = tl.arange(0, BT)
    start = i_c * BT
    seq = b64
    n = N
    if VARLEN:
        first, n = packed_sequence(CU, seq)
        if start >= n:
            return
        Q += first * sqn
        K += first * skn
        V += first * svn
        DO += first * sdon
        DK += first * sdkn
        DEN += first
        C += first
        b64 = 0
    offs_t, mask_t, rows = chunk_rows(start, arange_t, n)
    xk, fk = features(K + b64 * skb + hk64 * skh, rows, mask_t, skn, offs_f, mask_f, skd, 1.0,
                      FEATURE)
    v = load_rows(V + b64 * svb + hk64 * svh, rows, mask_t, svn, offs_v, mask_v, svd)
    head = seq * HKV + hk64
    ds, dz = state_block(HS, HZ, head, i_c, hs_head, hs_chunk, hz_head, hz_chunk,
                         offs_f, mask_f, offs_v, mask_v, DV)
    # inter-chunk: [BT, BV] @ [BV, BK] with the fp32 state gradient
    dfk = dot(v.to(tl.float32), tl.trans(ds), PRECISION, False) + dz[None, :]
    if CAUSAL:
        if HAS_DECAY:
            w_k = decay_weights(LG, hk, start, arange_t, n, BT, True)[2]
            dfk = dfk * w_k[:, None]
        upper = causal_mask(arange_t, True)  # key j (row) seen by query i (column)
        for hh in range(0, GROUP):
            h64 = (hk * GROUP + hh).to(tl.int64)
            row = (b64 * HQ + h64) * N
            do, r, c = grad_rows(DO + b64 * sdob + h64 * sdoh, DEN + row, C + row, rows, mask_t,
                                 offs_v, mask_v, sdon, sdod, eps, NORMALIZE)
            xq_unused, fq = features(Q + b64 * sqb + h64 * sqh, rows, mask_t, sqn, offs_f, mask_f,
                                     sqd, scale, FEATURE)
            # P_ji = r_i (v_j . do_i) + c_i: [BT, BV] @ [BV, BT]
            p = dot(v, tl.trans(do), PRECISION, UPCAST) * r[None, :] + c[None, :]
            p = tl.where(upper, p, 0.0)
            if HAS_DECAY:  # (made here, not before the loop: one tile fewer live across it)
                p = p * decay_weights(LG, hk, start, arange_t, n, BT, True)[0]
            dfk += dot(p.to(v.dtype), fq.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BK]
    dk = dfk * dphi(xk, FEATURE)
    tl.store(DK + b64 * sdkb + hk64 * sdkh + rows[:, None] * sdkn + offs_f[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=mask_t[:, None] & mask_f[None, :])


@triton.jit
def _chunk_dv_kernel(
    Q, K, DO, DEN, HS, HZ, DV_, LG, CU,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, sdob, sdoh, sdon, sdod,
    sdvb, sdvh, sdvn, sdvd, hs_head, hs_chunk, hz_head, hz_chunk,
    scale, eps, HQ, HKV, GROUP, N, F, DV, NT,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(DV, BV) * NT, HKV, B)``, ``BK`` holds all of ``F``: ``dv[:, vblock]`` of one
    chunk of one key/value head, complete (``dS[:, vblock]`` needs only ``g[:, vblock]``).
    ``VARLEN`` as in ``chunk_out``."""
    i_v, i_c, hk, b64 = chunk_program(tl.cdiv(DV, BV))
    hk64 = hk.to(tl.int64)
    offs_f, mask_f, offs_v, mask_v = block_offsets(0, i_v * BV, F, DV, BK, BV)
    arange_t = tl.arange(0, BT)
    start = i_c * BT
    seq = b64
    n = N
    if VARLEN:
        first, n = packed_sequence(CU, seq)
        if start >= n:
            return
        Q += first * sqn
        K += first * skn
        DO += first * sdon
        DV_ += first * sdvn
        DEN += first
        b64 = 0
    offs_t, mask_t, rows = chunk_rows(start, arange_t, n)
    xk_unused, fk = features(K + b64 * skb + hk64 * skh, rows, mask_t, skn, offs_f, mask_f,
                             skd, 1.0, FEATURE)
    head = seq * HKV + hk64
    ds, dz_unused = state_block(HS, HZ, head, i_c, hs_head, hs_chunk, hz_head, hz_chunk,
                                offs_f, mask_f, offs_v, mask_v, DV)
    dv = dot(fk, ds, PRECISION, False)  # [BT, BK] @ [BK, BV], fp32 state gradient
    if CAUSAL:
        if HAS_DECAY:
            w_k = decay_weights(LG, hk, start, arange_t, n, BT, True)[2]
            dv = dv * w_k[:, None]
        upper = causal_mask(arange_t, True)
        for hh in range(0, GROUP):
            h64 = (hk * GROUP + hh).to(tl.int64)
            row = (b64 * HQ + h64) * N
            do, r, c_unused = grad_rows(DO + b64 * sdob + h64 * sdoh, DEN + row, DEN + row, rows,
                                        mask_t, offs_v, mask_v, sdon, sdod, eps, NORMALIZE)
            xq_unused, fq = features(Q + b64 * sqb + h64 * sqh, rows, mask_t, sqn, offs_f, mask_f,
                                     sqd, scale, FEATURE)
            # A^T_ji r_i = (fk_j . fq_i) r_i: [BT, BK] @ [BK, BT], so that dv += A^T diag(r) do
            at = dot(fk.to(do.dtype), tl.trans(fq.to(do.dtype)), PRECISION, UPCAST) * r[None, :]
            at = tl.where(upper, at, 0.0)
            if HAS_DECAY:  # (made here, not before the loop: one tile fewer live across it)
                at = at * decay_weights(LG, hk, start, arange_t, n, BT, True)[0]
            dv += dot(at.to(do.dtype), do, PRECISION, UPCAST)
    tl.store(DV_ + b64 * sdvb + hk64 * sdvh + rows[:, None] * sdvn + offs_v[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])
