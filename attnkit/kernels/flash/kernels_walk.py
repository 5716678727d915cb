"""The one key walker that the forward and the dQ kernels both run (:func:`_walk_keys`).

A query block never loops over all keys. Band specs visit only the key tiles ``[lo, hi)`` the
band touches, in three phases

    [lo, full_lo)       partial tiles on the band's left edge   -> element mask
    [full_lo, full_hi)  tiles every query of the block fully sees -> no mask at all
    [full_hi, hi)       partial tiles on the right edge / tail    -> element mask

so the masking cost is paid only on the diagonal tiles (FlexAttention's full/partial split). With
no band edge and ``Nk`` a multiple of the key tile (``NK_ALIGN``) the interior covers everything
and only that one loop is compiled (``EVEN``: measured 30-40 fewer registers, see NOTES).

Block lists are walked as two flat single loops over key tiles (``BLOCK_N`` keys each), with no
runtime branch, so Triton's pipeliner treats them like the band loop: first the row's FULL layout
blocks (no mask of any kind), then its PARTIAL ones (an element mask, or a block that hangs past
the sequence end, which the host's split puts there; :func:`~.spec.split_full_partial`).

``MODE`` picks what each tile does (forward: online softmax; dQ: the dQ update), so the forward
and the backward can never disagree on which keys a query sees. Conventions:
:mod:`.kernels_common`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import _dot, _dscore, _key_blocks, _list_row, _load_rows, _score, _visible

#: ``MODE`` of :func:`_walk_keys`.
MODE_FWD = tl.constexpr(0)
MODE_DQ = tl.constexpr(1)


@triton.jit
def _key_tile(k_base, v_base, KPM, kpm_off, skn, skd, svn, svd, smn, start_n, q_idx, shift, nk,
              WIN_L, WIN_R, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, ROW_MASK: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr):
    """``k [BN, BD]``, ``v [BN, BDV]`` of the key tile at ``start_n`` and its mask ``[BM, BN]`` for
    rows ``q_idx [BM]``: band, sequence end and key padding (the caller applies it or not)."""
    arange_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + arange_n
    n64 = tl.cast(start_n, tl.int64)
    k = _load_rows(k_base + n64 * skn, arange_n, nk - start_n, skn, offs_d, skd,
                   HEAD_DIM, BLOCK_D, ROW_MASK)
    v = _load_rows(v_base + n64 * svn, arange_n, nk - start_n, svn, tl.arange(0, BLOCK_DV), svd,
                   HEAD_DV, BLOCK_DV, ROW_MASK)  # values have their own head dim Dv
    ok = _visible(q_idx[:, None], offs_n[None, :], shift, nk, WIN_L, WIN_R, HAS_LEFT, HAS_RIGHT)
    if HAS_KPM:
        keep = tl.load(KPM + kpm_off + offs_n * smn, mask=offs_n < nk, other=0)
        ok = ok & (keep[None, :] != 0)
    return k, v, ok


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
def _fwd_update_folded(acc, l_i, m_i, s, qk_scale, v, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """:func:`_fwd_update` of an unmasked tile of RAW scores ``s = q.k``: the max is tracked on the
    raw scores and the scale enters the exp2 argument, one FFMA per score (``qk_scale >= 0``: the
    forward flips q's sign for a negative scale). Review 2.2(b): 636 -> 557 SASS per 128 keys."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _tile_step(MODE: tl.constexpr, acc, a, b, q, do, k, v, ok, qk_scale, q_pos, start_n,
               slope, cap, USE_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of a query block. Forward: ``(acc, a, b) = (o accumulator, l, m)``; dQ:
    ``(acc, a, b) = (dq accumulator, lse in log2 units, delta)`` with ``a``, ``b`` read only.
    ``q_pos [BM]``: the rows' aligned key positions; the tile's keys start at ``start_n``
    (int32: fp32 positions, one FADD with an abs operand, measured 16 B more dQ stack with ALiBi)."""
    s = _dot(q, tl.trans(k), None, PRECISION, UPCAST)  # raw q.k, [BM, BD] @ [BD, BN]
    if HAS_SOFTCAP or HAS_ALIBI:
        s = s * qk_scale
        qk = _score(s, q_pos[:, None], (start_n + tl.arange(0, BLOCK_N))[None, :], slope, cap,
                    HAS_SOFTCAP, HAS_ALIBI)
        if MODE == 0:
            if USE_MASK:
                qk = tl.where(ok, qk, float("-inf"))
            acc, a, b = _fwd_update(acc, a, b, qk, v, PRECISION, UPCAST)
        else:
            p = tl.exp2(qk - a[:, None])
            if USE_MASK:
                p = tl.where(ok, p, 0.0)
            dp = _dot(do, tl.trans(v), None, PRECISION, UPCAST)  # [BM, BD] @ [BD, BN]
            ds = _dscore(p * (dp - b[:, None]), s, cap, HAS_SOFTCAP)
            acc = _dot(ds.to(k.dtype), k, acc, PRECISION, UPCAST)  # [BM, BN] @ [BN, BD]
    else:  # no score modification: the scale folds into the exp2 argument
        if MODE == 0:
            if USE_MASK:  # edge tiles: mask the scaled scores (a raw -inf * 0 would be NaN)
                acc, a, b = _fwd_update(acc, a, b, tl.where(ok, s * qk_scale, float("-inf")), v,
                                        PRECISION, UPCAST)
            else:
                acc, a, b = _fwd_update_folded(acc, a, b, s, qk_scale, v, PRECISION, UPCAST)
        else:
            p = tl.exp2(s * qk_scale - a[:, None])
            if USE_MASK:
                p = tl.where(ok, p, 0.0)
            dp = _dot(do, tl.trans(v), None, PRECISION, UPCAST)
            acc = _dot((p * (dp - b[:, None])).to(k.dtype), k, acc, PRECISION, UPCAST)
    return acc, a, b


@triton.jit
def _band_tiles(MODE: tl.constexpr, acc, a, b, q, do, k_base, v_base, KPM, kpm_off,
                skn, skd, svn, svd, smn, lo, hi, offs_m, q_pos, offs_d, shift, nk, WIN_L, WIN_R,
                qk_scale, slope, cap, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                HAS_KPM: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Key tiles ``[lo, hi)`` of one band phase; ``MASKED`` only on the band's edge tiles."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v, ok = _key_tile(k_base, v_base, KPM, kpm_off, skn, skd, svn, svd, smn, start_n, offs_m, shift,
                             nk, WIN_L, WIN_R, offs_d, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, MASKED,
                             HAS_LEFT, HAS_RIGHT, HAS_KPM)  # [BN, BD|BDV], [BM, BN]
        acc, a, b = _tile_step(MODE, acc, a, b, q, do, k, v, ok, qk_scale, q_pos, start_n, slope,
                               cap, MASKED or HAS_KPM, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    return acc, a, b


@triton.jit
def _tma_tiles(MODE: tl.constexpr, acc, a, b, q, do, k_base, v_base, skn, svn, lo, hi, nk, q_pos,
               qk_scale, slope, cap, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The EVEN walk (whole key tiles, no mask) with K/V loaded by TMA: 2-D descriptors over this
    program's ``[nk, D]`` keys (columns past D read as zero). Measured (sm_90, bf16, D = 128):
    128x128 w8 s3 254 -> 196 registers, 128x64 182 -> 144, UTMALDG instead of LDGSTS."""
    k_desc = tl.make_tensor_descriptor(k_base, shape=[nk, HEAD_DIM], strides=[skn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(v_base, shape=[nk, HEAD_DV], strides=[svn, 1],
                                       block_shape=[BLOCK_N, BLOCK_DV])
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        acc, a, b = _tile_step(MODE, acc, a, b, q, do, k, v, None, qk_scale, q_pos, start_n, slope, cap,
                               False, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    return acc, a, b


@triton.jit
def _list_tile(MODE: tl.constexpr, acc, a, b, q, do, k_base, v_base, KPM, kpm_off,
               skn, skd, svn, svd, smn, KV_PART, PMASK, entry, e, start_n, col0, r_in, q_pos, nk,
               offs_d, qk_scale, slope, cap, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               BS: tl.constexpr, PARTIAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of list entry ``e``: columns ``col0 ...`` of its layout block. A FULL tile
    loads no mask (with ``VARLEN`` it still checks the sequence end: a packed sequence may be
    shorter than the layout); a PARTIAL one reads its element mask, predicated on ``part >= 0``
    (``-1``: a full block that hangs past the sequence end) instead of branching."""
    masked = PARTIAL or VARLEN
    k, v, ok = _key_tile(k_base, v_base, KPM, kpm_off, skn, skd, svn, svd, smn, start_n, r_in, 0, nk, 0,
                         0, offs_d, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, masked, False, False,
                         HAS_KPM)
    if PARTIAL:
        part = tl.load(KV_PART + entry + e)
        cols = col0 + tl.arange(0, BLOCK_N)
        has_mask = (r_in[:, None] * 0 + part) >= 0  # [BM, 1]: a tensor (the interpreter wants one)
        pm = tl.load(PMASK + tl.maximum(part, 0).to(tl.int64) * (BS * BS) + r_in[:, None] * BS
                     + cols[None, :], mask=has_mask, other=1)
        ok = ok & (pm != 0)
    return _tile_step(MODE, acc, a, b, q, do, k, v, ok, qk_scale, q_pos, start_n, slope, cap,
                      masked or HAS_KPM, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)


@triton.jit
def _list_tiles(MODE: tl.constexpr, acc, a, b, q, do, k_base, v_base, KPM, kpm_off,
                skn, skd, svn, svd, smn, KV_IDX, KV_PART, PMASK, entry, t_lo, t_hi, r_in, q_pos, nk,
                offs_d, qk_scale, slope, cap, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                BS: tl.constexpr, PARTIAL: tl.constexpr, VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Key tiles ``[t_lo, t_hi)`` of a row's list, ``BS // BLOCK_N`` tiles per entry: one flat
    loop (index load -> tile load), which the pipeliner can run ahead like the band loop."""
    TPB: tl.constexpr = BS // BLOCK_N
    for t in range(t_lo, t_hi):
        e = t // TPB
        col0 = (t - e * TPB) * BLOCK_N
        start_n = tl.load(KV_IDX + entry + e) * BS + col0
        if VARLEN:  # a packed sequence shorter than the layout: skip tiles past its end
            if start_n < nk:
                acc, a, b = _list_tile(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn,
                                       svd, smn, KV_PART, PMASK, entry, e, start_n, col0, r_in, q_pos, nk,
                                       offs_d, qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV,
                                       BLOCK_N, BS, PARTIAL, VARLEN, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI,
                                       PRECISION, UPCAST)
        else:
            acc, a, b = _list_tile(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn, svd,
                                   smn, KV_PART, PMASK, entry, e, start_n, col0, r_in, q_pos, nk, offs_d,
                                   qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, BS,
                                   PARTIAL, VARLEN, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    return acc, a, b


@triton.jit
def _walk_keys(MODE: tl.constexpr, acc, a, b, q, do, k_base, v_base, KPM, kpm_off,
               skn, skd, svn, svd, smn, start_m, nq, nk, kv_lo, kv_hi, WIN_L, WIN_R,
               KV_NUM, KV_NFULL, KV_IDX, KV_PART, PMASK, lay, NROWB, MAXK, offs_d, qk_scale, slope,
               cap, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               HAS_KPM: tl.constexpr, VARLEN: tl.constexpr, SPARSE: tl.constexpr, BS: tl.constexpr,
               NK_ALIGN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """Every key tile the query block at ``start_m`` sees: the band's phases, or the layout blocks
    listed for its block row (``lay``: the layout slice of this batch row and head), full ones
    first. ``KV_NUM``/``KV_NFULL [L, R]``: entries / full entries per row; ``KV_IDX``/``KV_PART
    [L, R, MAXK]``: the entries, full first (:func:`~.spec.split_full_partial`). ``NK_ALIGN``: a
    power of two dividing every sequence's Nk (1 when unknown or when the band has an edge).
    ``USE_TMA``: the EVEN walk loads K/V through tensor descriptors (no key mask; the launcher
    checks the strides and alignment and sets Triton's allocator)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    shift = nk - nq
    q_pos = offs_m + shift
    if SPARSE:
        TPB: tl.constexpr = BS // BLOCK_N
        entry, num, r_in = _list_row(KV_NUM, lay, NROWB, MAXK, start_m, BS, BLOCK_M)
        n_full = tl.load(KV_NFULL + lay * NROWB + start_m // BS)
        acc, a, b = _list_tiles(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn, svd, smn,
                                KV_IDX, KV_PART, PMASK, entry, 0, n_full * TPB, r_in, q_pos, nk, offs_d,
                                qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, BS,
                                False, VARLEN, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
        acc, a, b = _list_tiles(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn, svd, smn,
                                KV_IDX, KV_PART, PMASK, entry, n_full * TPB, num * TPB, r_in, q_pos, nk,
                                offs_d, qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N,
                                BS, True, VARLEN, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    else:
        lo, full_lo, full_hi, hi = _key_blocks(start_m, nq, nk, WIN_L, WIN_R, kv_lo, kv_hi,
                                               BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        if NK_ALIGN % BLOCK_N == 0 and USE_TMA:  # EVEN with tensor-descriptor (TMA) loads
            acc, a, b = _tma_tiles(MODE, acc, a, b, q, do, k_base, v_base, skn, svn, lo, hi, nk, q_pos,
                                   qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N,
                                   HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
        elif NK_ALIGN % BLOCK_N == 0:  # EVEN: no band edge, whole tiles: the interior is everything
            acc, a, b = _band_tiles(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn, svd,
                                    smn, lo, hi, offs_m, q_pos, offs_d, shift, nk, WIN_L, WIN_R, qk_scale,
                                    slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, False, False,
                                    False, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
        else:
            # three phases: left edge (masked), interior (no mask), right edge / tail (masked)
            acc, a, b = _band_tiles(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn, svd,
                                    smn, lo, full_lo, offs_m, q_pos, offs_d, shift, nk, WIN_L, WIN_R,
                                    qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True,
                                    HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
            acc, a, b = _band_tiles(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn, svd,
                                    smn, full_lo, full_hi, offs_m, q_pos, offs_d, shift, nk, WIN_L, WIN_R,
                                    qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N,
                                    False, HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, PRECISION,
                                    UPCAST)
            acc, a, b = _band_tiles(MODE, acc, a, b, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn, svd,
                                    smn, full_hi, hi, offs_m, q_pos, offs_d, shift, nk, WIN_L, WIN_R,
                                    qk_scale, slope, cap, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_N, True,
                                    HAS_LEFT, HAS_RIGHT, HAS_KPM, HAS_SOFTCAP, HAS_ALIBI, PRECISION, UPCAST)
    return acc, a, b
