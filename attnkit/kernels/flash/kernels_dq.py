"""The flash dQ kernel: one program per query block, walking its key tiles exactly as the forward
did, through :func:`~.kernels_walk._walk_keys` (``MODE_DQ``). Conventions: :mod:`.kernels_common`."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_bwd import _load_query_tile
from .kernels_common import _query_block, _score_mods
from .kernels_walk import MODE_DQ, _walk_keys


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KPM, KV_LO, KV_HI, CU_Q, CU_K, KV_NUM, KV_NFULL, KV_IDX, KV_PART, PMASK,
    ALIBI, sm_scale, softcap, sab, sah,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    slb, slh, sln, sdqb, sdqh, sdqn, sdqd, smb, smn,
    H, GROUP, NQ, NK, WIN_L, WIN_R, N_BUCKET, LB_STRIDE, LH_STRIDE, NROWB, MAXK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KPM: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPARSE: tl.constexpr, BS: tl.constexpr, NK_ALIGN: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one head. Grid: ``(cdiv(max Nq, BLOCK_M), Hq, B or sequences)``,
    longest first with a right band limit, as in the forward."""
    b, h, q_start, nq, nk, start_m, bb, q_base, k_base, v_base, kpm_off, kv_lo, kv_hi = _query_block(
        Q, K, V, KV_LO, KV_HI, CU_Q, CU_K, sqb, sqh, sqn, skb, skh, skn, svb, svh,
        svn, smb, GROUP, NQ, NK, HAS_KPM, VARLEN, BLOCK_M, HAS_RIGHT)
    if start_m >= nq:
        return
    h64 = h.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < nq - start_m
    q, do, lse, delta = _load_query_tile(q_base, DO + bb * sdb + h64 * sdh + q_start.to(tl.int64) * sdn,
                                         LSE + bb * slb + h64 * slh + q_start.to(tl.int64) * sln,
                                         DELTA + (bb * H + h64) * NQ + q_start, start_m, nq, sqn, sqd, sdn,
                                         sdd, sln, offs_d, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lay = b * LB_STRIDE + h * LH_STRIDE
    slope, cap = _score_mods(bb, h, ALIBI, sab, sah, softcap, HAS_SOFTCAP, HAS_ALIBI)
    dq, lse, delta = _walk_keys(MODE_DQ, dq, lse, delta, q, do, k_base, v_base, KPM, kpm_off, skn, skd, svn,
                                svd, smn, start_m, nq, nk, kv_lo, kv_hi, WIN_L, WIN_R, KV_NUM, KV_NFULL,
                                KV_IDX, KV_PART, PMASK, lay, NROWB, MAXK, offs_d, qk_scale, slope, cap,
                                HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                HAS_KPM, VARLEN, SPARSE, BS, NK_ALIGN, HAS_SOFTCAP, HAS_ALIBI, PRECISION,
                                UPCAST, False)  # no TMA: the backward runs in autograd's thread
    dq = dq * sm_scale
    q_off = (q_start + start_m).to(tl.int64)
    dq_ptrs = (DQ + bb * sdqb + h64 * sdqh + q_off * sdqn
               + rows[:, None] * sdqn + offs_d[None, :] * sdqd)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
