"""The forward output of the chunked linear attention: every chunk at once.

Chunk ``c`` (tokens ``t0 .. t0 + BT``) reads the state ``S_c`` / ``z_c`` entering it
(``chunk_state``: the scan's per-chunk slots; non-causal: the whole sequence's state for every
chunk, chunk stride 0) and adds its own keys through the masked quadratic term::

    num_i = w_i fq_i S_c + sum_{j <= i} gamma^(i-j) (fq_i . fk_j) v_j
    den_i = w_i fq_i . z_c + sum_{j <= i} gamma^(i-j) (fq_i . fk_j)       (w_i = gamma^(i+1))
    o_i = num_i / (den_i + eps)                                        (normalize=False: num_i)
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
    features,
    load_rows,
    state_block,
)
from .chunk_state import packed_sequence

__all__ = ["_chunk_out_kernel"]


@triton.jit
def _chunk_out_kernel(
    Q, K, V, OUT, DEN, HS, HZ, LG, CU,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    hs_head, hs_chunk, hz_head, hz_chunk,
    scale, eps, HQ, HKV, GROUP, N, F, DV, NT,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(DV, BV) * NT, HQ, B)``; ``BK`` holds all of ``F`` (the denominator needs it).
    Writes ``o [B, HQ, N, DV]`` and (value block 0) ``den [B, HQ, N]`` fp32. The state of key/value
    head ``head = b * HKV + h // GROUP`` for chunk ``c`` is at ``HS + head * hs_head + c *
    hs_chunk`` (``[F, DV]`` dense), its normaliser likewise in ``HZ``. ``VARLEN``: ``b`` is a
    packed sequence (``CU [S + 1]``, as in ``chunk_state``)."""
    i_v, i_c, h, b64 = chunk_program(tl.cdiv(DV, BV))
    hk = h // GROUP
    h64, hk64 = h.to(tl.int64), hk.to(tl.int64)
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
        V += first * svn
        OUT += first * son
        DEN += first
        b64 = 0
    offs_t, mask_t, rows = chunk_rows(start, arange_t, n)

    xq, fq = features(Q + b64 * sqb + h64 * sqh, rows, mask_t, sqn, offs_f, mask_f, sqd, scale,
                      FEATURE)
    head = seq * HKV + hk64
    s, z = state_block(HS, HZ, head, i_c, hs_head, hs_chunk, hz_head, hz_chunk,
                       offs_f, mask_f, offs_v, mask_v, DV)
    # inter-chunk term with the fp32 state: [BT, BK] @ [BK, BV] (TF32 or IEEE, never 16-bit)
    num = dot(fq, s, PRECISION, False)
    den = tl.sum(fq * z[None, :], 1)
    if HAS_DECAY:  # (causal only) query i reads gamma^(i + 1) of the incoming state
        w_a, w_q, w_k, w_s = decay_weights(LG, hk, start, arange_t, n, BT, False)
        num = num * w_q[:, None]
        den = den * w_q
    if CAUSAL:
        xk_unused, fk = features(K + b64 * skb + hk64 * skh, rows, mask_t, skn, offs_f,
                                 mask_f, skd, 1.0, FEATURE)
        v = load_rows(V + b64 * svb + hk64 * svh, rows, mask_t, svn, offs_v, mask_v, svd)
        # intra-chunk term: [BT, BK] @ [BK, BT] -> [BT, BT], lower triangle (j <= i)
        a = dot(fq.to(v.dtype), tl.trans(fk.to(v.dtype)), PRECISION, UPCAST)
        a = tl.where(causal_mask(arange_t, False), a, 0.0)
        if HAS_DECAY:
            a = a * w_a
        num += dot(a.to(v.dtype), v, PRECISION, UPCAST)  # [BT, BT] @ [BT, BV]
        den += tl.sum(a, 1)
    if NORMALIZE:
        num = num / (den + eps)[:, None]
        tl.store(DEN + (b64 * HQ + h64) * N + offs_t, den, mask=mask_t & ((arange_t * 0 + i_v) == 0))
    tl.store(OUT + b64 * sob + h64 * soh + rows[:, None] * son + offs_v[None, :] * sod,
             num.to(OUT.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])
