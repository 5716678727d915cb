"""Triton kernels of the flash attention family (FlashAttention-2 style), forward and backward.

One kernel family serves dense, causal and sliding-window attention. A query block never loops
over all keys: it visits only the key blocks ``[lo, hi)`` its band touches, in three phases

    [lo, full_lo)       partial blocks on the band's left edge   -> element mask
    [full_lo, full_hi)  blocks every query of the block fully sees -> no mask at all
    [full_hi, hi)       partial blocks on the right edge / tail   -> element mask

so the masking cost is paid only on the diagonal blocks (FlexAttention's full/partial split).
The dK/dV kernel does the transpose: per key block it visits only the query blocks that see it.

Conventions (all kernels):
* positions are bottom-right aligned: query ``i`` sits at key position ``i + nk - nq`` of its own
  sequence; ``HAS_LEFT``/``HAS_RIGHT`` switch the two band limits ``WIN_L``/``WIN_R`` on;
* scores live in the log2 domain (``qk_scale = scale * log2(e)``) so the softmax uses ``exp2``;
  the LSE the kernels read and write is in natural-log units;
* a row that sees no key keeps ``m = -inf`` and ``l = 0``: it writes ``o = 0`` and ``lse = -inf``,
  and the backward maps ``lse = -inf`` to ``+inf`` so its probabilities are exactly 0;
* base offsets are int64 (``B*H*N*D`` may pass 2^31); offsets inside a tile stay int32;
* ``VARLEN``: ``B == 1`` and the program's batch index is a sequence index into ``CU_Q``/``CU_K``;
* ``HAS_KPM``: a ``[B, Nk]`` uint8 key mask is applied in every phase, and ``KV_LO``/``KV_HI``
  (first and one-past-last attended key per batch row) shrink the loop to the unpadded span.

Nothing here is heavy at import time for the package: this module is imported on first use of the
Triton backend.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, NQ, NK, VARLEN: tl.constexpr):
    """(q_start, nq, k_start, nk) of batch/sequence ``b``."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        nq = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        nk = tl.load(CU_K + b + 1) - k_start
    else:
        # keep these tensors, not Python ints (NQ == 1 is specialised to a constant)
        zero = tl.program_id(0) * 0
        q_start = zero
        nq = zero + NQ
        k_start = zero
        nk = zero + NK
    return q_start, nq, k_start, nk


@triton.jit
def _key_blocks(start_m, nq, nk, WIN_L, WIN_R, kv_lo, kv_hi,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key phases ``lo <= full_lo <= full_hi <= hi`` of the query block at ``start_m``."""
    shift = nk - nq
    m_last = tl.minimum(start_m + BLOCK_M, nq) - 1
    lo = kv_lo
    hi = kv_hi
    full_lo = 0
    full_hi = nk
    if HAS_LEFT:
        lo = tl.maximum(lo, start_m + shift - WIN_L)
        # every row of the block sees key j iff j >= m_last + shift - WIN_L
        full_lo = tl.maximum(m_last + shift - WIN_L, 0)
    if HAS_RIGHT:
        hi = tl.minimum(hi, m_last + shift + WIN_R + 1)
        full_hi = tl.minimum(tl.maximum(start_m + shift + WIN_R + 1, 0), nk)
    lo = tl.maximum(lo, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


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
def _visible(q_idx, k_idx, shift, nk, WIN_L, WIN_R,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Band and sequence-end mask; ``q_idx``/``k_idx`` come pre-shaped for broadcasting
    (``[BM, 1]`` and ``[1, BN]``, or transposed)."""
    pos = q_idx + shift
    # `q_idx >= 0` is always true: it gives the mask the tile's full 2-D shape even without a band
    # (a branch that refines the mask must not change its shape).
    ok = (k_idx < nk) & (q_idx >= 0)
    if HAS_LEFT:
        ok = ok & (k_idx >= pos - WIN_L)
    if HAS_RIGHT:
        ok = ok & (k_idx <= pos + WIN_R)
    return ok


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b (+ acc)``. ``UPCAST`` (set only under the CPU interpreter for bf16) multiplies in
    fp32: triton's interpreter computes bf16 dots wrongly (numpy has no bf16), while the operands'
    bf16 rounding, which is what the GPU sees, is kept."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(base, offs_r, n_rows, stride_r, offs_d, stride_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_MASK: tl.constexpr):
    """Load a ``[R, BLOCK_D]`` tile of rows ``offs_r`` (zero past ``n_rows`` / ``HEAD_DIM``)."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if ROW_MASK:
        mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
        return tl.load(ptrs, mask=mask, other=0.0)
    elif BLOCK_D != HEAD_DIM:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _key_tile(k_base, v_base, kpm_base, skn, skd, svn, svd, smn, start_n, q_idx, shift, nk,
              WIN_L, WIN_R, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, ROW_MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr):
    """``k``, ``v [BN, BD]`` of the key tile at ``start_n`` and its mask ``[BM, BN]`` for query
    rows ``q_idx [BM]``: band, sequence end and key padding (the caller applies it or not)."""
    arange_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + arange_n
    n64 = tl.cast(start_n, tl.int64)
    k = _load_rows(k_base + n64 * skn, arange_n, nk - start_n, skn, offs_d, skd,
                   HEAD_DIM, BLOCK_D, ROW_MASK)
    v = _load_rows(v_base + n64 * svn, arange_n, nk - start_n, svn, offs_d, svd,
                   HEAD_DIM, BLOCK_D, ROW_MASK)
    ok = _visible(q_idx[:, None], offs_n[None, :], shift, nk, WIN_L, WIN_R, HAS_LEFT, HAS_RIGHT)
    if HAS_KPM:
        keep = tl.load(kpm_base + offs_n * smn, mask=offs_n < nk, other=0)
        ok = ok & (keep[None, :] != 0)
    return k, v, ok


@triton.jit
def _block_mask(PMASK, part, rows_in, cols_in, BS: tl.constexpr):
    """Element mask of a partial layout block, indexed ``[rows_in, cols_in]`` (pre-shaped)."""
    return tl.load(PMASK + part.to(tl.int64) * (BS * BS) + rows_in * BS + cols_in) != 0


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_update(acc, l_i, m_i, qk, v, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update of one tile: ``qk [BM, BN]`` masked scores (log2 units)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row with nothing visible so far has m = -inf; subtract 0 instead (no inf - inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)  # [BM, BN] @ [BN, BD]
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base,
               skn, skd, svn, svd, smn, lo, hi,
               offs_m, offs_d, shift, nk, WIN_L, WIN_R, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    """Key tiles ``[lo, hi)`` of a band pattern; ``MASKED`` only on the band's edge tiles."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, ok = _key_tile(k_base, v_base, kpm_base, skn, skd, svn, svd, smn, start_n, offs_m,
                             shift, nk, WIN_L, WIN_R, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED,
                             HAS_LEFT, HAS_RIGHT, HAS_KPM)  # [BN, BD] x2, [BM, BN]
        qk = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BM, BD] @ [BD, BN]
        if MASKED or HAS_KPM:
            qk = tl.where(ok, qk, float("-inf"))
        acc, l_i, m_i = _fwd_update(acc, l_i, m_i, qk, v, PRECISION, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _fwd_sparse(acc, l_i, m_i, q, k_base, v_base, kpm_base, skn, skd, svn, svd, smn,
                KV_NUM, KV_IDX, KV_PART, PMASK, lay, NROWB, MAXK, start_m, offs_d, nk, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BS: tl.constexpr, HAS_KPM: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Key tiles of a block-sparse pattern: only the layout blocks listed for this query block
    row; an element mask is read only for partial blocks (``part >= 0``)."""
    arange_n = tl.arange(0, BLOCK_N)
    row = start_m // BS
    r_in = start_m - row * BS + tl.arange(0, BLOCK_M)  # rows inside the layout block
    entry = (lay * NROWB + row).to(tl.int64) * MAXK
    num = tl.load(KV_NUM + lay * NROWB + row)
    for i in range(num):
        kb = tl.load(KV_IDX + entry + i)
        part = tl.load(KV_PART + entry + i)
        for t in range(BS // BLOCK_N):
            start_n = kb * BS + t * BLOCK_N
            if start_n < nk:  # the last layout block may hang past the sequence end
                k, v, ok = _key_tile(k_base, v_base, kpm_base, skn, skd, svn, svd, smn, start_n,
                                     r_in, 0, nk, 0, 0, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                                     False, False, HAS_KPM)
                qk = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BM, BN]
                if part >= 0:
                    ok = ok & _block_mask(PMASK, part, r_in[:, None],
                                          (t * BLOCK_N + arange_n)[None, :], BS)
                qk = tl.where(ok, qk, float("-inf"))
                acc, l_i, m_i = _fwd_update(acc, l_i, m_i, qk, v, PRECISION, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KPM, KV_LO, KV_HI, CU_Q, CU_K, KV_NUM, KV_IDX, KV_PART, PMASK, sm_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    slb, slh, sln, smb, smn,
    H, GROUP, NQ, NK, WIN_L, WIN_R, N_BUCKET, LB_STRIDE, LH_STRIDE, NROWB, MAXK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPARSE: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O[b, h, i] = softmax(q_i K^T * scale, masked) V; LSE[b, h, i] = logsumexp of the scores.

    Grid: ``(cdiv(max Nq, BLOCK_M), Hq, B)``.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # heads on y, batch rows (sequences) on z: each up to 65535
    b = tl.program_id(2)
    hk = h // GROUP
    q_start, nq, k_start, nk = _seq_bounds(b, CU_Q, CU_K, NQ, NK, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= nq:
        return
    bb = b.to(tl.int64)
    if VARLEN:
        bb = bb * 0  # one packed batch row; b indexes the sequence
    q_base = Q + bb * sqb + h.to(tl.int64) * sqh + (q_start + start_m).to(tl.int64) * sqn
    o_base = O + bb * sob + h.to(tl.int64) * soh + (q_start + start_m).to(tl.int64) * son
    lse_base = LSE + bb * slb + h.to(tl.int64) * slh + (q_start + start_m).to(tl.int64) * sln
    k_base = K + bb * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skn
    v_base = V + bb * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svn
    kpm_base = KPM + bb * smb

    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, rows, nq - start_m, sqn, offs_d, sqd, HEAD_DIM, BLOCK_D, True)

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPARSE:
        lay = b * LB_STRIDE + h * LH_STRIDE
        acc, l_i, m_i = _fwd_sparse(acc, l_i, m_i, q, k_base, v_base, kpm_base, skn, skd, svn,
                                    svd, smn, KV_NUM, KV_IDX, KV_PART, PMASK, lay, NROWB, MAXK,
                                    start_m, offs_d, nk, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                    BLOCK_N, BS, HAS_KPM, PRECISION, UPCAST)
    else:
        kv_lo = nk * 0
        kv_hi = nk
        if HAS_KPM:
            kv_lo = tl.load(KV_LO + b)
            kv_hi = tl.load(KV_HI + b)
        lo, full_lo, full_hi, hi = _key_blocks(start_m, nq, nk, WIN_L, WIN_R, kv_lo, kv_hi,
                                               BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        shift = nk - nq
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, skn, skd, svn, svd,
                                   smn, lo, full_lo, offs_m, offs_d, shift, nk, WIN_L, WIN_R,
                                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                                   HAS_KPM, PRECISION, UPCAST)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, skn, skd, svn, svd,
                                   smn, full_lo, full_hi, offs_m, offs_d, shift, nk, WIN_L, WIN_R,
                                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_LEFT,
                                   HAS_RIGHT, HAS_KPM, PRECISION, UPCAST)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, skn, skd, svn, svd,
                                   smn, full_hi, hi, offs_m, offs_d, shift, nk, WIN_L, WIN_R,
                                   qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                                   HAS_KPM, PRECISION, UPCAST)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row_ok = rows < nq - start_m
    o_ptrs = o_base + rows[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(lse_base + rows * sln, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


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
def _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, ok_t, USE_MASK: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dK/dV contribution of one query tile: ``q``/``do [BM, BD]``, ``lse``/``delta [BM]``."""
    s_t = _dot(k, tl.trans(q), None, PRECISION, UPCAST) * qk_scale  # [BN, BD] @ [BD, BM]
    p_t = tl.exp2(s_t - lse[None, :])
    if USE_MASK:
        p_t = tl.where(ok_t, p_t, 0.0)
    dv = _dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)  # [BN, BM] @ [BM, BD]
    dp_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST)  # [BN, BD] @ [BD, BM]
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q.dtype), q, dk, PRECISION, UPCAST)  # [BN, BM] @ [BM, BD]
    return dk, dv


@triton.jit
def _load_query_tile(q_base, do_base, lse_base, delta_base, start_m, nq, sqn, sqd, sdn, sdd, sln,
                     offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """q, dO, LSE (log2 units; rows that saw nothing -> +inf so P = 0) and delta of a query tile."""
    arange_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + arange_m
    row_ok = offs_m < nq
    m64 = tl.cast(start_m, tl.int64)
    q = _load_rows(q_base + m64 * sqn, arange_m, nq - start_m, sqn, offs_d, sqd,
                   HEAD_DIM, BLOCK_D, True)  # [BM, BD]
    do = _load_rows(do_base + m64 * sdn, arange_m, nq - start_m, sdn, offs_d, sdd,
                    HEAD_DIM, BLOCK_D, True)  # [BM, BD]
    lse = tl.load(lse_base + offs_m * sln, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                    sqn, sqd, sdn, sdd, sln, lo, hi,
                    offs_n, offs_d, shift, nq, nk, WIN_L, WIN_R, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Query tiles ``[lo, hi)`` that see this key tile (band patterns)."""
    arange_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        q, do, lse, delta = _load_query_tile(q_base, do_base, lse_base, delta_base, start_m, nq,
                                             sqn, sqd, sdn, sdd, sln, offs_d, HEAD_DIM, BLOCK_D,
                                             BLOCK_M)
        ok_t = _visible((start_m + arange_m)[None, :], offs_n[:, None], shift, nk, WIN_L, WIN_R,
                        HAS_LEFT, HAS_RIGHT)
        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, ok_t, MASKED,
                              PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_sparse(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                     sqn, sqd, sdn, sdd, sln, Q_NUM, Q_IDX, Q_PART, PMASK, lay, NCOLB, MAXQ,
                     start_n, offs_d, nq, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BS: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Query tiles of the layout blocks listed for this key block column (block-sparse)."""
    col = start_n // BS
    c_in = start_n - col * BS + tl.arange(0, BLOCK_N)  # keys inside the layout block
    entry = (lay * NCOLB + col).to(tl.int64) * MAXQ
    num = tl.load(Q_NUM + lay * NCOLB + col)
    for i in range(num):
        qb = tl.load(Q_IDX + entry + i)
        part = tl.load(Q_PART + entry + i)
        for t in range(BS // BLOCK_M):
            start_m = qb * BS + t * BLOCK_M
            if start_m < nq:
                q, do, lse, delta = _load_query_tile(q_base, do_base, lse_base, delta_base,
                                                     start_m, nq, sqn, sqd, sdn, sdd, sln, offs_d,
                                                     HEAD_DIM, BLOCK_D, BLOCK_M)
                if part >= 0:
                    em_t = _block_mask(PMASK, part, (t * BLOCK_M + tl.arange(0, BLOCK_M))[None, :],
                                       c_in[:, None], BS)  # [BN, BM]
                    dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, em_t,
                                          True, PRECISION, UPCAST)
                else:
                    dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, None,
                                          False, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPM, CU_Q, CU_K, Q_NUM, Q_IDX, Q_PART, PMASK, sm_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    slb, slh, sln, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smn,
    H, HKV, GROUP, NQ, NK, WIN_L, WIN_R, N_BUCKET, LB_STRIDE, LH_STRIDE, NCOLB, MAXQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPARSE: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the ``GROUP`` query heads sharing it
    (GQA without atomics: the backward is deterministic). Grid: ``(cdiv(max Nk, BLOCK_N), Hkv, B)``.
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
    v = _load_rows(V + bb * svb + hk.to(tl.int64) * svh + k_off * svn, rows, nk - start_n, svn,
                   offs_d, svd, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    shift = nk - nq
    qk_scale = sm_scale * 1.4426950408889634
    for g in range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q + bb * sqb + h * sqh + q_start.to(tl.int64) * sqn
        do_base = DO + bb * sdb + h * sdh + q_start.to(tl.int64) * sdn
        lse_base = LSE + bb * slb + h * slh + q_start.to(tl.int64) * sln
        # DELTA is contiguous [B, Hq, N] (or [1, Hq, N] packed)
        delta_base = DELTA + (bb * H + h) * NQ + q_start
        if SPARSE:
            lay = b * LB_STRIDE + (hk * GROUP + g) * LH_STRIDE
            dk, dv = _bwd_dkdv_sparse(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      sqn, sqd, sdn, sdd, sln, Q_NUM, Q_IDX, Q_PART, PMASK, lay,
                                      NCOLB, MAXQ, start_n, offs_d, nq, qk_scale, HEAD_DIM,
                                      BLOCK_D, BLOCK_M, BLOCK_N, BS, PRECISION, UPCAST)
        else:
            lo, full_lo, full_hi, hi = _query_blocks(start_n, nq, nk, WIN_L, WIN_R, BLOCK_M,
                                                     BLOCK_N, HAS_LEFT, HAS_RIGHT)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     sqn, sqd, sdn, sdd, sln, lo, full_lo, offs_n, offs_d, shift,
                                     nq, nk, WIN_L, WIN_R, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                     True, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     sqn, sqd, sdn, sdd, sln, full_lo, full_hi, offs_n, offs_d,
                                     shift, nq, nk, WIN_L, WIN_R, qk_scale, HEAD_DIM, BLOCK_D,
                                     BLOCK_M, False, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     sqn, sqd, sdn, sdd, sln, full_hi, hi, offs_n, offs_d, shift,
                                     nq, nk, WIN_L, WIN_R, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                                     True, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST)
    dk = dk * sm_scale
    row_ok = rows < nk - start_n
    if HAS_KPM:
        # padded keys were masked in the forward: their scores never reached the output
        keep = tl.load(KPM + bb * smb + offs_n * smn, mask=row_ok, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    st_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = (DK + bb * sdkb + hk.to(tl.int64) * sdkh + k_off * sdkn
               + rows[:, None] * sdkn + offs_d[None, :] * sdkd)
    dv_ptrs = (DV + bb * sdvb + hk.to(tl.int64) * sdvh + k_off * sdvn
               + rows[:, None] * sdvn + offs_d[None, :] * sdvd)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _dq_update(dq, q, do, lse, delta, k, v, qk_scale, ok, USE_MASK: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dQ contribution of one key tile: ``k``/``v [BN, BD]``."""
    s = _dot(q, tl.trans(k), None, PRECISION, UPCAST) * qk_scale  # [BM, BN]
    p = tl.exp2(s - lse[:, None])
    if USE_MASK:
        p = tl.where(ok, p, 0.0)
    dp = _dot(do, tl.trans(v), None, PRECISION, UPCAST)  # [BM, BD] @ [BD, BN]
    ds = p * (dp - delta[:, None])
    dq = _dot(ds.to(k.dtype), k, dq, PRECISION, UPCAST)  # [BM, BN] @ [BN, BD]
    return dq


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base,
                  skn, skd, svn, svd, smn, lo, hi,
                  offs_m, offs_d, shift, nk, WIN_L, WIN_R, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Key tiles ``[lo, hi)`` of a band pattern (as the forward)."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, ok = _key_tile(k_base, v_base, kpm_base, skn, skd, svn, svd, smn, start_n, offs_m,
                             shift, nk, WIN_L, WIN_R, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, MASKED,
                             HAS_LEFT, HAS_RIGHT, HAS_KPM)
        dq = _dq_update(dq, q, do, lse, delta, k, v, qk_scale, ok, MASKED or HAS_KPM,
                        PRECISION, UPCAST)
    return dq


@triton.jit
def _bwd_dq_sparse(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd, smn,
                   KV_NUM, KV_IDX, KV_PART, PMASK, lay, NROWB, MAXK, start_m, offs_d, nk,
                   qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
                   HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Key tiles of the layout blocks listed for this query block row (block-sparse)."""
    arange_n = tl.arange(0, BLOCK_N)
    row = start_m // BS
    r_in = start_m - row * BS + tl.arange(0, BLOCK_M)
    entry = (lay * NROWB + row).to(tl.int64) * MAXK
    num = tl.load(KV_NUM + lay * NROWB + row)
    for i in range(num):
        kb = tl.load(KV_IDX + entry + i)
        part = tl.load(KV_PART + entry + i)
        for t in range(BS // BLOCK_N):
            start_n = kb * BS + t * BLOCK_N
            if start_n < nk:
                k, v, ok = _key_tile(k_base, v_base, kpm_base, skn, skd, svn, svd, smn, start_n,
                                     r_in, 0, nk, 0, 0, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                                     False, False, HAS_KPM)
                if part >= 0:
                    ok = ok & _block_mask(PMASK, part, r_in[:, None],
                                          (t * BLOCK_N + arange_n)[None, :], BS)
                dq = _dq_update(dq, q, do, lse, delta, k, v, qk_scale, ok, True, PRECISION,
                                UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, KV_LO, KV_HI, CU_Q, CU_K, KV_NUM, KV_IDX, KV_PART, PMASK,
    sm_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    slb, slh, sln, sdqb, sdqh, sdqn, sdqd, smb, smn,
    H, GROUP, NQ, NK, WIN_L, WIN_R, N_BUCKET, LB_STRIDE, LH_STRIDE, NROWB, MAXK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPARSE: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one head. Grid: ``(cdiv(max Nq, BLOCK_M), Hq, B)``."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # heads on y, batch rows (sequences) on z: each up to 65535
    b = tl.program_id(2)
    hk = h // GROUP
    q_start, nq, k_start, nk = _seq_bounds(b, CU_Q, CU_K, NQ, NK, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= nq:
        return
    bb = b.to(tl.int64)
    if VARLEN:
        bb = bb * 0
    h64 = h.to(tl.int64)
    q_off = (q_start + start_m).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < nq - start_m
    q, do, lse, delta = _load_query_tile(
        Q + bb * sqb + h64 * sqh + q_start.to(tl.int64) * sqn,
        DO + bb * sdb + h64 * sdh + q_start.to(tl.int64) * sdn,
        LSE + bb * slb + h64 * slh + q_start.to(tl.int64) * sln,
        DELTA + (bb * H + h64) * NQ + q_start,
        start_m, nq, sqn, sqd, sdn, sdd, sln, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M)
    k_base = K + bb * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skn
    v_base = V + bb * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svn
    kpm_base = KPM + bb * smb
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPARSE:
        lay = b * LB_STRIDE + h * LH_STRIDE
        dq = _bwd_dq_sparse(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd,
                            smn, KV_NUM, KV_IDX, KV_PART, PMASK, lay, NROWB, MAXK, start_m, offs_d,
                            nk, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, BS, HAS_KPM,
                            PRECISION, UPCAST)
    else:
        kv_lo = nk * 0
        kv_hi = nk
        if HAS_KPM:
            kv_lo = tl.load(KV_LO + b)
            kv_hi = tl.load(KV_HI + b)
        lo, full_lo, full_hi, hi = _key_blocks(start_m, nq, nk, WIN_L, WIN_R, kv_lo, kv_hi,
                                               BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        shift = nk - nq
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd,
                           smn, lo, full_lo, offs_m, offs_d, shift, nk, WIN_L, WIN_R, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_KPM,
                           PRECISION, UPCAST)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd,
                           smn, full_lo, full_hi, offs_m, offs_d, shift, nk, WIN_L, WIN_R,
                           qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_LEFT, HAS_RIGHT,
                           HAS_KPM, PRECISION, UPCAST)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, skn, skd, svn, svd,
                           smn, full_hi, hi, offs_m, offs_d, shift, nk, WIN_L, WIN_R, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, HAS_KPM,
                           PRECISION, UPCAST)
    dq = dq * sm_scale
    dq_ptrs = (DQ + bb * sdqb + h64 * sdqh + q_off * sdqn
               + rows[:, None] * sdqn + offs_d[None, :] * sdqd)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
