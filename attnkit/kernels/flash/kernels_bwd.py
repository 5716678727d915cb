"""The flash backward kernels: ``DELTA`` (preprocess) and dK/dV (one program per key block, summed
over the query heads that share it: GQA without atomics).

Two ways to get dQ (the launcher picks one, :mod:`.bwd_fused`):

* ``FUSE_DQ`` (the default): each dK/dV program also adds its ``dS @ K`` contribution to an fp32
  dQ accumulator ``[B, Hq, Nq, D]`` with ``tl.atomic_add``: 5 matmuls per (query tile, key block)
  pair, as FlashAttention-2/3 do. Float addition in the order the programs happen to run: not
  bitwise reproducible.
* deterministic: dK/dV only, then the separate dQ kernel (:mod:`.kernels_dq`), which recomputes
  ``Q K^T`` and ``dO V^T``: 7 matmuls per pair, and the same bits on every run.

Either way, band walks on descriptor-addressable 2-byte tensors (``USE_TMA``, set per call by
:func:`.bwd_fused.use_tma`) load q/dO through TMA and, fused, add dQ with one TMA reduce per
tile: what lets the 64-query-row tile fit sm_90's registers (:func:`_band_walk`).

Conventions: :mod:`.kernels_common`."""

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

#: What :func:`_target_has_tma` answers under the interpreter (which runs descriptor loads; the
#: TMA reduce-add it lacks is stood in for by tests/kernels/test_flash_bwd_tma.py). A test sets it
#: False to run the pre-Hopper fallback.
INTERPRET_HAS_TMA = True


def _target_has_tma(_semantic=None):
    """Compile-time ``tl.constexpr``: whether the target being compiled for has TMA (sm_90 or
    newer), read from the compile options (``sm80``, ``sm90a``...); False when they cannot be
    read, so that an unknown target takes the pointer loads. The launcher's ``USE_TMA`` only
    says that the tensors are descriptor-addressable (as the forward's does, device unchecked:
    the compile report compiles one captured launch for several targets), so the kernel itself
    must not emit TMA for sm_80."""
    if _semantic is None:  # the interpreter calls it as plain Python
        return tl.constexpr(INTERPRET_HAS_TMA)
    try:
        arch = str(_semantic.builder.options.arch)
        return tl.constexpr(int(arch.removeprefix("sm").rstrip("a")) >= 90)
    except (AttributeError, ValueError):
        return tl.constexpr(False)


_target_has_tma.__triton_builtin__ = True  # called with the code generator's `_semantic`


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
    """Query tiles ``[lo, hi)`` (``lo`` a multiple of ``BLOCK_M``) that see the key block at
    ``start_n``."""
    shift = nk - nq
    n_last = tl.minimum(start_n + BLOCK_N, nk) - 1
    lo = 0
    hi = nq
    if HAS_RIGHT:
        # key j is seen by query i iff i >= j - shift - WIN_R
        lo = tl.maximum(start_n - shift - WIN_R, 0)
    if HAS_LEFT:
        # ... and iff i <= j - shift + WIN_L
        hi = tl.minimum(n_last - shift + WIN_L + 1, nq)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, ok_t, q_pos, k_pos, slope, cap,
                 dq_base, start_m, keep, dq_desc, h, USE_TMA: tl.constexpr, USE_MASK: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FUSE_DQ: tl.constexpr,
                 HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """dK/dV contribution of one query tile: ``q``/``do [BM, BD]``, ``lse``/``delta [BM]``;
    ``q_pos [BM]`` the rows' aligned key positions, ``k_pos [BN]`` the keys'. ``FUSE_DQ``: also
    add the tile's ``dS @ K`` (unscaled) to the dQ accumulator, with padded keys (``keep [BN]``
    false) left out: their dK/dV are zeroed at the end, but their dS must not reach dQ. The sum
    goes through :func:`_dq_atomic` (pointer atomics), or with ``USE_TMA`` through ``dq_desc``
    (a ``[Hq, nq, D]`` fp32 descriptor: one TMA reduce-add of the tile at query head ``h``)."""
    s_t = _dot(k, tl.trans(q), None, PRECISION, UPCAST) * qk_scale  # [BN, BD] @ [BD, BM]
    qk_t = _score(s_t, q_pos[None, :], k_pos[:, None], slope, cap, HAS_SOFTCAP, HAS_ALIBI)
    p_t = tl.exp2(qk_t - lse[None, :])
    if USE_MASK:
        p_t = tl.where(ok_t, p_t, 0.0)
    if FUSE_DQ and HAS_KPM:
        p_t = tl.where(keep[:, None], p_t, 0.0)
    dv = _dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)  # [BN, BM] @ [BM, BD]
    dp_t = _dot(v, tl.trans(do), None, PRECISION, UPCAST)  # [BN, BD] @ [BD, BM]
    ds_t = _dscore(p_t * (dp_t - delta[None, :]), s_t, cap, HAS_SOFTCAP).to(q.dtype)
    dk = _dot(ds_t, q, dk, PRECISION, UPCAST)  # [BN, BM] @ [BM, BD]
    if FUSE_DQ:
        if USE_TMA:
            # the tile goes through shared memory to one bulk reduce (UTMAREDG): no per-thread
            # addresses, and rows past nq are clipped by the descriptor's shape
            dq = _dot(tl.trans(ds_t), k, None, PRECISION, UPCAST)  # [BM, BN] @ [BN, BD]
            dq_desc.atomic_add([h, start_m, 0], dq.reshape([1, dq.shape[0], dq.shape[1]]))
        else:
            _dq_atomic(dq_base, start_m, ds_t, k, HEAD_DIM, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _dq_atomic(dq_base, start_m, ds_t, k, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr):
    """Add ``dS @ K`` (``ds_t [BN, BM]``, ``k [BN, BD]``) to the fp32 dQ accumulator rows of the
    query tile at ``start_m`` (rows of ``HEAD_DIM``, contiguous, from ``dq_base``).

    Rows past the sequence are not masked: their dS is exactly 0 (``dO = 0``, ``P = 0``), so they
    add 0 to the next packed sequence's rows or to the ``BLOCK_M`` padding rows the launcher
    allocates. A constant row stride and no row mask keep every address an immediate offset of
    one base register (the tile's 64 x 128 atomics would otherwise hold their own addresses)."""
    dq = _dot(tl.trans(ds_t), k, None, PRECISION, UPCAST)  # [BM, BN] @ [BN, BD]
    rows = tl.arange(0, ds_t.shape[1])
    cols = tl.arange(0, k.shape[1])
    ptrs = dq_base + tl.cast(start_m, tl.int64) * HEAD_DIM + (rows[:, None] * HEAD_DIM + cols[None, :])
    if k.shape[1] == HEAD_DIM:
        tl.atomic_add(ptrs, dq, sem="relaxed")
    else:
        tl.atomic_add(ptrs, dq, mask=(rows[:, None] >= 0) & (cols[None, :] < HEAD_DIM), sem="relaxed")


@triton.jit
def _load_query_tile(q_base, do_base, lse_base, delta_base, start_m, nq, sqn, sqd, sdn, sdd, sln,
                     offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr,
                     BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """q, dO (pointer loads, rows past ``nq`` zero), LSE and delta (:func:`_load_stats`) of a
    query tile."""
    arange_m = tl.arange(0, BLOCK_M)
    m64 = tl.cast(start_m, tl.int64)
    q = _load_rows(q_base + m64 * sqn, arange_m, nq - start_m, sqn, offs_d, sqd,
                   HEAD_DIM, BLOCK_D, True)  # [BM, BD]
    do = _load_rows(do_base + m64 * sdn, arange_m, nq - start_m, sdn, tl.arange(0, BLOCK_DV), sdd,
                    HEAD_DV, BLOCK_DV, True)  # [BM, BDV]
    lse, delta = _load_stats(lse_base, delta_base, start_m, nq, sln, BLOCK_M)
    return q, do, lse, delta


@triton.jit
def _load_stats(lse_base, delta_base, start_m, nq, sln, BLOCK_M: tl.constexpr):
    """LSE (log2 units; rows that saw nothing or lie past ``nq`` -> +inf so P = 0) and delta of
    the query tile at ``start_m``."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < nq
    lse = tl.load(lse_base + offs_m * sln, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _walk_queries(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqn, sqd, sdn, sdd, sln,
                  start_n, nq, nk, Q_NUM, Q_IDX, Q_PART, PMASK, lay, NCOLB, MAXQ,
                  offs_d, qk_scale, slope, cap, keep, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, BS: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FUSE_DQ: tl.constexpr,
                  HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Block-sparse: every query tile of the layout blocks listed for the block column of the key
    block at ``start_n`` (the transpose of :func:`_walk_keys`), for one query head."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    shift = nk - nq
    if SPARSE:
        arange_m = tl.arange(0, BLOCK_M)
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
                        em_t = _block_mask(PMASK, part, (t * BLOCK_M + arange_m)[None, :], c_in[:, None],
                                           BS)  # [BN, BM]
                        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, em_t,
                                              start_m + arange_m + shift, offs_n, slope, cap, dq_base,
                                              start_m, keep, None, 0, False, True, HAS_SOFTCAP, HAS_ALIBI,
                                              FUSE_DQ, HAS_KPM, HEAD_DIM, PRECISION, UPCAST)
                    else:
                        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, None,
                                              start_m + arange_m + shift, offs_n, slope, cap, dq_base,
                                              start_m, keep, None, 0, False, False, HAS_SOFTCAP, HAS_ALIBI,
                                              FUSE_DQ, HAS_KPM, HEAD_DIM, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _band_walk(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, ALIBI, bb, hk, q_start, sqb, sqh, sqn, sqd, sdb, sdh,
               sdn, sdd, slb, slh, sln, sdqb, sdqh, sab, sah, softcap, H, GROUP, NQ, start_n, nq, nk,
               WIN_L, WIN_R, offs_d, qk_scale, keep, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FUSE_DQ: tl.constexpr,
               HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               USE_TMA: tl.constexpr):
    """A band: the query tiles ``[lo, hi)`` that see the key block at ``start_n``, for each of the
    ``GROUP`` query heads, as ONE flat loop over (head, tile) pairs.

    Measured (sm_90, bf16, D = 128, 64 x 128 tile, 8 warps, 2 stages, dQ fused): the per-head
    loop around three per-phase loops (left edge / interior / right edge, the forward's split)
    spilled 392 B (dense) and 688 B (causal); one flat loop with the band mask on every tile of a
    band (none at all for dense: rows past ``nq`` read ``dO = 0``, ``lse = +inf``; keys past
    ``nk`` are zero rows of K/V whose dK/dV are never stored) spills 296 / 232 B.

    ``USE_TMA``: q and dO come through 3-D tensor descriptors over this sequence's ``[Hq, nq, D]``
    rows (rows past ``nq`` read as zero, as the masked pointer loads give), and the fused dQ
    goes out as one TMA reduce-add per tile (:func:`_dkdv_update`). The descriptors are built once
    per program. Measured (sm_90a, bf16, D = 128, fused, 64 x 128 w8/s1): 255 regs / 64 B spill
    (dense) and 120 B (causal) with pointers -> 247 / 0 and 254 / 0 (benchmarks/NOTES.md).
    Compiled for a target without TMA (sm_80: :func:`_target_has_tma`), a ``USE_TMA`` launch
    takes the pointer loads, and a 64-row tile walks as 32-row steps (``STEP_M``), which is
    what mma.sync's registers hold (sm_80 fused 64 x 128 w8/s1 with a window and key mask
    spills 160 B at 64 rows, 96 B at 32)."""
    TMA: tl.constexpr = USE_TMA and _target_has_tma()
    STEP_M: tl.constexpr = BLOCK_M if TMA or not USE_TMA or BLOCK_M <= 32 else 32
    shift = nk - nq
    lo, hi = _query_blocks(start_n, nq, nk, WIN_L, WIN_R, STEP_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    n_tiles = tl.cdiv(hi - lo, STEP_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    arange_m = tl.arange(0, STEP_M)
    q64 = q_start.to(tl.int64)
    q_desc = None
    do_desc = None
    dq_desc = None
    if TMA:
        q_desc = tl.make_tensor_descriptor(Q + bb * sqb + q64 * sqn, shape=[H, nq, HEAD_DIM],
                                           strides=[sqh, sqn, 1], block_shape=[1, STEP_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DO + bb * sdb + q64 * sdn, shape=[H, nq, HEAD_DV],
                                            strides=[sdh, sdn, 1], block_shape=[1, STEP_M, BLOCK_DV])
        if FUSE_DQ:
            dq_desc = tl.make_tensor_descriptor(DQ + bb * sdqb + q64 * HEAD_DIM, shape=[H, nq, HEAD_DIM],
                                                strides=[sdqh, HEAD_DIM, 1],
                                                block_shape=[1, STEP_M, BLOCK_D])
    for i in range(GROUP * n_tiles):
        g = i // n_tiles
        start_m = lo + (i - g * n_tiles) * STEP_M
        h32 = hk * GROUP + g
        h = h32.to(tl.int64)
        dq_base = DQ
        if FUSE_DQ and not TMA:
            dq_base = DQ + bb * sdqb + h * sdqh + q64 * HEAD_DIM
        slope, cap = _score_mods(bb, h, ALIBI, sab, sah, softcap, HAS_SOFTCAP, HAS_ALIBI)
        lse_base = LSE + bb * slb + h * slh + q64 * sln
        delta_base = DELTA + (bb * H + h) * NQ + q_start  # contiguous
        if TMA:
            q = q_desc.load([h32, start_m, 0]).reshape([STEP_M, BLOCK_D])
            do = do_desc.load([h32, start_m, 0]).reshape([STEP_M, BLOCK_DV])
            lse, delta = _load_stats(lse_base, delta_base, start_m, nq, sln, STEP_M)
        else:
            q, do, lse, delta = _load_query_tile(Q + bb * sqb + h * sqh + q64 * sqn,
                                                 DO + bb * sdb + h * sdh + q64 * sdn, lse_base, delta_base,
                                                 start_m, nq, sqn, sqd, sdn, sdd, sln, offs_d, HEAD_DIM,
                                                 BLOCK_D, HEAD_DV, BLOCK_DV, STEP_M)
        ok_t = _visible((start_m + arange_m)[None, :], offs_n[:, None], shift, nk, WIN_L, WIN_R,
                        HAS_LEFT, HAS_RIGHT)
        dk, dv = _dkdv_update(dk, dv, k, v, q, do, lse, delta, qk_scale, ok_t, start_m + arange_m + shift,
                              offs_n, slope, cap, dq_base, start_m, keep, dq_desc, h32, TMA,
                              HAS_LEFT or HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI, FUSE_DQ, HAS_KPM, HEAD_DIM,
                              PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, KPM, CU_Q, CU_K, Q_NUM, Q_IDX, Q_PART, PMASK, ALIBI,
    sm_scale, softcap, sab, sah,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    slb, slh, sln, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdqb, sdqh, smb, smn,
    H, HKV, GROUP, NQ, NK, WIN_L, WIN_R, N_BUCKET, LB_STRIDE, LH_STRIDE, NCOLB, MAXQ,
    # the program's key block (BLOCK_N) and the inner loop's query tile (BLOCK_M) first: the
    # transpose of the forward's and dQ's tiling
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr, VARLEN: tl.constexpr,
    SPARSE: tl.constexpr, BS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    FUSE_DQ: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """dK, dV of one key block of one KV head, summed over the ``GROUP`` query heads sharing it;
    with ``FUSE_DQ`` also each query head's dQ rows, added (unscaled) into ``DQ`` fp32
    ``[B or 1, Hq, Nq + BLOCK_M at least, D]`` (contiguous rows; strides ``sdqb``, ``sdqh``;
    the caller zeroes it and applies the scale). ``USE_TMA`` (band walks only; the launcher
    checks that q, dO and the accumulator are descriptor-addressable and installs Triton's
    allocator): q/dO loads and the dQ sums through TMA (:func:`_band_walk`).
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
    row_ok = rows < nk - start_n
    k_off = (k_start + start_n).to(tl.int64)
    k = _load_rows(K + bb * skb + hk.to(tl.int64) * skh + k_off * skn, rows, nk - start_n, skn,
                   offs_d, skd, HEAD_DIM, BLOCK_D, True)
    offs_dv = tl.arange(0, BLOCK_DV)
    v = _load_rows(V + bb * svb + hk.to(tl.int64) * svh + k_off * svn, rows, nk - start_n, svn,
                   offs_dv, svd, HEAD_DV, BLOCK_DV, True)
    keep = row_ok
    if HAS_KPM:
        # padded keys were masked in the forward: their scores never reached the output
        keep = tl.load(KPM + bb * smb + offs_n * smn, mask=row_ok, other=0) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if SPARSE:
        for g in range(GROUP):
            h = (hk * GROUP + g).to(tl.int64)
            q_base = Q + bb * sqb + h * sqh + q_start.to(tl.int64) * sqn
            do_base = DO + bb * sdb + h * sdh + q_start.to(tl.int64) * sdn
            lse_base = LSE + bb * slb + h * slh + q_start.to(tl.int64) * sln
            # DELTA is contiguous [B, Hq, N] (or [1, Hq, N] packed)
            delta_base = DELTA + (bb * H + h) * NQ + q_start
            dq_base = DQ
            if FUSE_DQ:
                dq_base = DQ + bb * sdqb + h * sdqh + q_start.to(tl.int64) * HEAD_DIM
            lay = b * LB_STRIDE + (hk * GROUP + g) * LH_STRIDE
            slope, cap = _score_mods(bb, h, ALIBI, sab, sah, softcap, HAS_SOFTCAP, HAS_ALIBI)
            dk, dv = _walk_queries(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqn, sqd,
                                   sdn, sdd, sln, start_n, nq, nk, Q_NUM, Q_IDX, Q_PART, PMASK, lay, NCOLB,
                                   MAXQ, offs_d, qk_scale, slope, cap, keep, HEAD_DIM, BLOCK_D, HEAD_DV,
                                   BLOCK_DV, BLOCK_M, BLOCK_N, SPARSE, BS, HAS_SOFTCAP, HAS_ALIBI, FUSE_DQ,
                                   HAS_KPM, PRECISION, UPCAST)
    else:
        dk, dv = _band_walk(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, ALIBI, bb, hk, q_start, sqb, sqh, sqn,
                            sqd, sdb, sdh, sdn, sdd, slb, slh, sln, sdqb, sdqh, sab, sah, softcap, H, GROUP,
                            NQ, start_n, nq, nk, WIN_L, WIN_R, offs_d, qk_scale, keep, HEAD_DIM, BLOCK_D,
                            HEAD_DV, BLOCK_DV, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HAS_ALIBI,
                            FUSE_DQ, HAS_KPM, PRECISION, UPCAST, USE_TMA)
    dk = dk * sm_scale
    if HAS_KPM:
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
