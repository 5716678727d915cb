"""Chunked linear attention in Triton: forward, backward, launchers and ``torch.library`` ops.

Definition (``phi`` = the feature map; ``fq = phi(q * scale)``, ``fk = phi(k)``, both ``[N, F]``)::

    S_i = S0 + sum_{j <= i} fk_j v_j^T      [F, Dv]     (non-causal: the sum runs over all j)
    z_i = z0 + sum_{j <= i} fk_j            [F]
    o_i = fq_i S_i / (fq_i . z_i + eps)      (normalize=False: o_i = fq_i S_i)

Chunkwise-parallel form (chunk ``BT``, 64 on a GPU, 16 under the interpreter): within a chunk the
masked quadratic term ``(fq fk^T * M) v``, across chunks the state ``S`` (and normaliser ``z``)
carried in fp32 registers. One program walks the whole sequence of one head, so per-token states
are never stored and memory stays O(N*D + F*Dv) per head. Backward recomputes the state in the
same walk (forward direction for dq, reverse for dk/dv) instead of saving it.

Gradients. With ``r_i = 1 / (fq_i . z_i + eps)`` and upstream ``do_i``::

    g_i = do_i * r_i                 [Dv]  gradient on the numerator fq_i S_i
    c_i = -(do_i . o_i) * r_i        []    gradient on the denominator fq_i . z_i

so the normaliser is just one more value column whose gradient is ``c``::

    dfq_i = S_i g_i + z_i c_i
    dfk_j = dS_j v_j + dz_j,   dv_j = dS_j^T fk_j,   dS_j = sum_{i >= j} fq_i g_i^T (+ dS_N),
                                                     dz_j = sum_{i >= j} fq_i c_i   (+ dz_N)
    dS0 = dS_1, dz0 = dz_1

Work split (why the tiles look the way they do):

* forward: one program per ``(value block, b, query head)`` holds the full ``F`` (``BK`` = F padded
  to a power of two) and a ``BV`` slice of ``Dv``; the denominator needs all of ``F``, and the
  output columns are independent across value blocks.
* dq: one program per ``(feature block, b, query head)`` holds all of ``Dv``; ``dfq[:, kblock]``
  only needs ``S[kblock, :]``.
* dk/dv: one program per ``(feature block, b, key/value head)`` walks the chunks backwards and,
  inside each chunk, the ``Hq / Hkv`` query heads of its group, so GQA never expands K/V and dk/dv
  need no reduction over heads. ``dk[:, kblock]`` is complete in one program; ``dv`` is linear in
  the ``F`` split, so with more than one feature block each writes an fp32 partial that the
  launcher sums.
* GQA forward: each query head recomputes the state of its key/value head (the state costs as
  much as the output's inter-chunk term, so this is at most a 2x on that term, and it keeps
  programs independent). The first query head of each group writes the final state.

Built-in feature maps are fused (``FEATURE``: 0 identity, 1 elu(x)+1, 2 relu): the kernels load
raw q/k and apply ``phi`` and ``phi'`` in fp32. Any other map is applied outside by autograd and
the kernels run with the identity.

Numerics: states, denominators and all accumulators are fp32. Intra-chunk products take fp16/bf16
operands (tensor cores) with fp32 accumulation; the inter-chunk product with the state takes fp32
operands (TF32 unless ``torch.get_float32_matmul_precision() == "highest"``), so the state is never
rounded to 16 bits (fp16 would overflow on long sequences). Base offsets are int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..autotune import first_only_if_asked

__all__ = ["linear_attention_triton", "FEATURES", "INTERPRET", "MAX_DIM"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Tests set this to fill every output with NaN before the kernels run (unwritten -> fails).
POISON_OUTPUTS = False
#: Fused feature maps: name -> the ``FEATURE`` constexpr of the kernels.
FEATURES = {"identity": 0, "elu1": 1, "relu": 2}
#: The forward holds all of F in one tile and the backward all of Dv: both are capped here.
MAX_DIM = 256


# --------------------------------------------------------------------------------------------
# Kernel helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _phi(x, FEATURE: tl.constexpr):
    """The fused feature map on an fp32 tile."""
    if FEATURE == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _dphi(x, FEATURE: tl.constexpr):
    """``phi'(x)`` on an fp32 tile."""
    if FEATURE == 1:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with an fp32 accumulator. ``UPCAST`` (the CPU interpreter with bf16 only)
    multiplies in fp32 because the interpreter's bf16 dot is wrong; the operands' bf16 rounding,
    which is what a GPU sees, is kept."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _features(base, rows, mask_t, stride_n, offs_f, mask_f, stride_d, scale, FEATURE: tl.constexpr):
    """Load a ``[BT, BF]`` tile, scale it and apply ``phi``; padded rows/columns become 0
    (``phi(0)`` is 1 for elu1, so the mask is applied after the map). Returns ``(x, phi(x))``."""
    mask = mask_t[:, None] & mask_f[None, :]
    x = tl.load(base + rows[:, None] * stride_n + offs_f[None, :] * stride_d, mask=mask, other=0.0)
    x = x.to(tl.float32) * scale
    return x, tl.where(mask, _phi(x, FEATURE), 0.0)


@triton.jit
def _start_state(S0, Z0, st_off, zt_off, k_base, v_base, skn, skd, svn, svd, N, DV,
                 offs_f, mask_f, offs_v, mask_v, arange_t, FEATURE: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_S0: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                 BV: tl.constexpr):
    """The state ``[BK, BV]`` / normaliser ``[BK]`` (fp32) a chunk walk starts from: the initial
    state (or zeros) and, non-causal, plus the whole sequence's ``phi(k)^T v`` (a first pass)."""
    if HAS_S0:
        s = tl.load(S0 + st_off + offs_f[:, None] * DV + offs_v[None, :],
                    mask=mask_f[:, None] & mask_v[None, :], other=0.0)  # [BK, BV] fp32
        z = tl.load(Z0 + zt_off + offs_f, mask=mask_f, other=0.0)  # [BK] fp32
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    if not CAUSAL:
        for start in range(0, N, BT):
            offs_t = start + arange_t
            mask_t = offs_t < N
            rows = offs_t.to(tl.int64)
            _, fk = _features(k_base, rows, mask_t, skn, offs_f, mask_f, skd, 1.0, FEATURE)
            v = tl.load(v_base + rows[:, None] * svn + offs_v[None, :] * svd,
                        mask=mask_t[:, None] & mask_v[None, :], other=0.0)
            s += _dot(tl.trans(fk.to(v.dtype)), v, PRECISION, UPCAST)  # [BK, BT] @ [BT, BV]
            z += tl.sum(fk, 0)
    return s, z


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, DEN, S0, Z0, ST, ZT,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    scale, eps, HQ, HKV, GROUP, N, F, DV,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S0: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(DV, BV), HQ, B)``. Writes ``o``, the denominator ``den [B, HQ, N]`` (fp32,
    value block 0 only) and the final state ``ST [B, HKV, F, DV]`` / ``ZT [B, HKV, F]``."""
    i_v = tl.program_id(0)
    h = tl.program_id(1)  # heads on y, batch on z: each up to 65535
    b = tl.program_id(2)
    hk = h // GROUP
    b64 = b.to(tl.int64)
    q_base = Q + b64 * sqb + h.to(tl.int64) * sqh
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh
    o_base = OUT + b64 * sob + h.to(tl.int64) * soh
    den_base = DEN + (b.to(tl.int64) * HQ + h) * N
    st_off = (b64 * HKV + hk) * F * DV
    zt_off = (b64 * HKV + hk) * F

    offs_f = tl.arange(0, BK)
    mask_f = offs_f < F
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    mask_fv = mask_f[:, None] & mask_v[None, :]
    s_ptrs = offs_f[:, None] * DV + offs_v[None, :]
    arange_t = tl.arange(0, BT)

    # Non-causal: pass 1 builds the whole sequence's state; pass 2 below reads it for every chunk.
    s, z = _start_state(S0, Z0, st_off, zt_off, k_base, v_base, skn, skd, svn, svd, N, DV,
                        offs_f, mask_f, offs_v, mask_v, arange_t, FEATURE, CAUSAL, HAS_S0,
                        PRECISION, UPCAST, BK, BT, BV)

    for start in range(0, N, BT):
        offs_t = start + arange_t
        mask_t = offs_t < N
        rows = offs_t.to(tl.int64)
        _, fq = _features(q_base, rows, mask_t, sqn, offs_f, mask_f, sqd, scale, FEATURE)
        # inter-chunk term with the fp32 state: [BT, BK] @ [BK, BV] -> [BT, BV]
        num = _dot(fq, s, PRECISION, False)
        if NORMALIZE:
            den = tl.sum(fq * z[None, :], 1)  # [BT]
        if CAUSAL:
            _, fk = _features(k_base, rows, mask_t, skn, offs_f, mask_f, skd, 1.0, FEATURE)
            v = tl.load(v_base + rows[:, None] * svn + offs_v[None, :] * svd,
                        mask=mask_t[:, None] & mask_v[None, :], other=0.0)
            # intra-chunk term: [BT, BK] @ [BK, BT] -> [BT, BT], lower triangle (j <= i)
            a = _dot(fq.to(v.dtype), tl.trans(fk.to(v.dtype)), PRECISION, UPCAST)
            a = tl.where(arange_t[:, None] >= arange_t[None, :], a, 0.0)
            num += _dot(a.to(v.dtype), v, PRECISION, UPCAST)  # [BT, BT] @ [BT, BV]
            if NORMALIZE:
                den += tl.sum(a, 1)
            s += _dot(tl.trans(fk.to(v.dtype)), v, PRECISION, UPCAST)  # [BK, BT] @ [BT, BV]
            z += tl.sum(fk, 0)
        if NORMALIZE:
            num = num / (den + eps)[:, None]
            tl.store(den_base + offs_t, den, mask=mask_t & ((arange_t * 0 + i_v) == 0))
        tl.store(o_base + rows[:, None] * son + offs_v[None, :] * sod,
                 num.to(OUT.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])

    # The first query head of each group writes its key/value head's final state.
    # (scalar conditions are broadcast to tiles: the interpreter rejects scalar-and-tile masks)
    first = (offs_f * 0 + h % GROUP) == 0  # [BK]
    tl.store(ST + st_off + s_ptrs, s, mask=mask_fv & first[:, None])
    tl.store(ZT + zt_off + offs_f, z, mask=mask_f & first & ((offs_f * 0 + i_v) == 0))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _out_grads(do_base, o_base, den_base, rows, mask_t, offs_v, mask_v,
               sdon, sdod, son, sod, eps, NORMALIZE: tl.constexpr):
    """``(do, g, c)`` of one chunk: ``g = do / (den + eps)`` ``[BT, BV]`` (fp32) and
    ``c = -(do . o) / (den + eps)`` ``[BT]``; without normalisation ``g = do`` and ``c = 0``."""
    mask = mask_t[:, None] & mask_v[None, :]
    do = tl.load(do_base + rows[:, None] * sdon + offs_v[None, :] * sdod, mask=mask, other=0.0)
    g = do.to(tl.float32)
    if NORMALIZE:
        o = tl.load(o_base + rows[:, None] * son + offs_v[None, :] * sod, mask=mask, other=0.0)
        r = 1.0 / (tl.load(den_base + rows, mask=mask_t, other=1.0) + eps)
        g = g * r[:, None]
        c = -tl.sum(do.to(tl.float32) * o.to(tl.float32), 1) * r
    else:
        c = tl.zeros([do.shape[0]], dtype=tl.float32)
    return do, g, c


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, OUT, DO, DEN, S0, Z0, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    scale, eps, HQ, HKV, GROUP, N, F, DV,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S0: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(F, BK), HQ, B)``: ``dq[:, kblock] = phi'(q) * scale * (S g + z c)``,
    recomputing ``S[kblock, :]`` chunk by chunk."""
    i_k = tl.program_id(0)
    h = tl.program_id(1)  # heads on y, batch on z: each up to 65535
    b = tl.program_id(2)
    hk = h // GROUP
    b64 = b.to(tl.int64)
    q_base = Q + b64 * sqb + h.to(tl.int64) * sqh
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh
    o_base = OUT + b64 * sob + h.to(tl.int64) * soh
    do_base = DO + b64 * sdob + h.to(tl.int64) * sdoh
    dq_base = DQ + b64 * sdqb + h.to(tl.int64) * sdqh
    den_base = DEN + (b.to(tl.int64) * HQ + h) * N
    st_off = (b64 * HKV + hk) * F * DV
    zt_off = (b64 * HKV + hk) * F

    offs_f = i_k * BK + tl.arange(0, BK)
    mask_f = offs_f < F
    offs_v = tl.arange(0, BV)
    mask_v = offs_v < DV
    arange_t = tl.arange(0, BT)

    s, z = _start_state(S0, Z0, st_off, zt_off, k_base, v_base, skn, skd, svn, svd, N, DV,
                        offs_f, mask_f, offs_v, mask_v, arange_t, FEATURE, CAUSAL, HAS_S0,
                        PRECISION, UPCAST, BK, BT, BV)

    for start in range(0, N, BT):
        offs_t = start + arange_t
        mask_t = offs_t < N
        rows = offs_t.to(tl.int64)
        xq, _ = _features(q_base, rows, mask_t, sqn, offs_f, mask_f, sqd, scale, FEATURE)
        do, g, c = _out_grads(do_base, o_base, den_base, rows, mask_t, offs_v, mask_v,
                              sdon, sdod, son, sod, eps, NORMALIZE)
        # inter-chunk: [BT, BV] @ [BV, BK] -> [BT, BK]
        dfq = _dot(g, tl.trans(s), PRECISION, False) + c[:, None] * z[None, :]
        if CAUSAL:
            _, fk = _features(k_base, rows, mask_t, skn, offs_f, mask_f, skd, 1.0, FEATURE)
            v = tl.load(v_base + rows[:, None] * svn + offs_v[None, :] * svd,
                        mask=mask_t[:, None] & mask_v[None, :], other=0.0)
            # dA_ij = g_i . v_j + c_i: [BT, BV] @ [BV, BT] -> [BT, BT], lower triangle
            da = _dot(g.to(v.dtype), tl.trans(v), PRECISION, UPCAST) + c[:, None]
            da = tl.where(arange_t[:, None] >= arange_t[None, :], da, 0.0)
            dfq += _dot(da.to(v.dtype), fk.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BK]
            s += _dot(tl.trans(fk.to(v.dtype)), v, PRECISION, UPCAST)
            z += tl.sum(fk, 0)
        dq = dfq * _dphi(xq, FEATURE) * scale
        tl.store(dq_base + rows[:, None] * sdqn + offs_f[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=mask_t[:, None] & mask_f[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, OUT, DO, DEN, DST, DZT, DK, DV_, DS0, DZ0,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvk, sdvb, sdvh, sdvn, sdvd,
    scale, eps, HQ, HKV, GROUP, N, F, DV,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DST: tl.constexpr, WRITE_DS0: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(F, BK), HKV, B)``: a reverse walk carrying ``dS[kblock, :]`` / ``dz[kblock]``
    over the chunks and, inside each chunk, over the ``GROUP`` query heads of this key/value head.
    Writes ``dk[:, kblock]``, the ``kblock`` partial of ``dv`` (plane ``i_k`` of ``DV_``) and, at
    the start of the sequence, ``dS0`` / ``dz0``."""
    i_k = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh
    dk_base = DK + b64 * sdkb + hk.to(tl.int64) * sdkh
    dv_base = DV_ + i_k.to(tl.int64) * sdvk + b64 * sdvb + hk.to(tl.int64) * sdvh
    st_off = (b.to(tl.int64) * HKV + hk) * F * DV
    zt_off = (b.to(tl.int64) * HKV + hk) * F

    offs_f = i_k * BK + tl.arange(0, BK)
    mask_f = offs_f < F
    offs_v = tl.arange(0, BV)
    mask_v = offs_v < DV
    mask_fv = mask_f[:, None] & mask_v[None, :]
    s_ptrs = offs_f[:, None] * DV + offs_v[None, :]
    arange_t = tl.arange(0, BT)
    n_chunks = tl.cdiv(N, BT)

    if HAS_DST:  # gradient on the returned final state seeds the reverse walk
        ds = tl.load(DST + st_off + s_ptrs, mask=mask_fv, other=0.0)  # [BK, BV] fp32
        dz = tl.load(DZT + zt_off + offs_f, mask=mask_f, other=0.0)  # [BK] fp32
    else:
        ds = tl.zeros([BK, BV], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)

    if not CAUSAL:
        # Pass 1: every key sees every query, so dS is the same total for all of them.
        for start in range(0, N, BT):
            offs_t = start + arange_t
            mask_t = offs_t < N
            rows = offs_t.to(tl.int64)
            for hh in range(0, GROUP):
                h = (hk * GROUP + hh).to(tl.int64)
                _, fq = _features(Q + b64 * sqb + h * sqh, rows, mask_t, sqn, offs_f, mask_f,
                                  sqd, scale, FEATURE)
                do, g, c = _out_grads(DO + b64 * sdob + h * sdoh, OUT + b64 * sob + h * soh,
                                      DEN + (b64 * HQ + h) * N, rows, mask_t, offs_v, mask_v,
                                      sdon, sdod, son, sod, eps, NORMALIZE)
                ds += _dot(tl.trans(fq), g, PRECISION, False)  # [BK, BT] @ [BT, BV]
                dz += tl.sum(fq * c[:, None], 0)

    for i in range(0, n_chunks):
        start = (n_chunks - 1 - i) * BT  # reverse: dS must hold the chunks after this one
        offs_t = start + arange_t
        mask_t = offs_t < N
        rows = offs_t.to(tl.int64)
        xk, fk = _features(k_base, rows, mask_t, skn, offs_f, mask_f, skd, 1.0, FEATURE)
        v = tl.load(v_base + rows[:, None] * svn + offs_v[None, :] * svd,
                    mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        # inter-chunk: [BT, BV] @ [BV, BK] -> [BT, BK] and [BT, BK] @ [BK, BV] -> [BT, BV]
        dfk = _dot(v.to(tl.float32), tl.trans(ds), PRECISION, False) + dz[None, :]
        dv = _dot(fk, ds, PRECISION, False)
        if CAUSAL:
            upper = arange_t[:, None] <= arange_t[None, :]  # key j (row) seen by query i (col)
            for hh in range(0, GROUP):
                h = (hk * GROUP + hh).to(tl.int64)
                _, fq = _features(Q + b64 * sqb + h * sqh, rows, mask_t, sqn, offs_f, mask_f,
                                  sqd, scale, FEATURE)
                do, g, c = _out_grads(DO + b64 * sdob + h * sdoh, OUT + b64 * sob + h * soh,
                                      DEN + (b64 * HQ + h) * N, rows, mask_t, offs_v, mask_v,
                                      sdon, sdod, son, sod, eps, NORMALIZE)
                # P_ji = v_j . g_i + c_i: [BT, BV] @ [BV, BT] -> [BT, BT]
                p = _dot(v, tl.trans(g.to(v.dtype)), PRECISION, UPCAST) + c[None, :]
                p = tl.where(upper, p, 0.0)
                dfk += _dot(p.to(v.dtype), fq.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BK]
                # A^T_ji = fk_j . fq_i over this feature block: [BT, BK] @ [BK, BT] -> [BT, BT]
                at = _dot(fk.to(v.dtype), tl.trans(fq.to(v.dtype)), PRECISION, UPCAST)
                at = tl.where(upper, at, 0.0)
                dv += _dot(at.to(v.dtype), g.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BV]
                # the inter-chunk terms above already read dS, so this chunk joins it now
                ds += _dot(tl.trans(fq), g, PRECISION, False)  # [BK, BT] @ [BT, BV]
                dz += tl.sum(fq * c[:, None], 0)
        dk = dfk * _dphi(xk, FEATURE)
        tl.store(dk_base + rows[:, None] * sdkn + offs_f[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=mask_t[:, None] & mask_f[None, :])
        tl.store(dv_base + rows[:, None] * sdvn + offs_v[None, :] * sdvd,
                 dv.to(DV_.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])

    if WRITE_DS0:
        tl.store(DS0 + st_off + s_ptrs, ds, mask=mask_fv)
        tl.store(DZ0 + zt_off + offs_f, dz, mask=mask_f)


# --------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------

# Tiles by size class: each entry ends with the largest padded width it is meant for (``BK`` =
# pow2(F) in the forward, ``BV`` = pow2(Dv) in the backward); a launch is offered the entries of
# the smallest class that holds it, in order, so the first entry is the primary config. Chosen
# from ahead-of-time sm_90 compiles (``python -m attnkit.kernels.compile_check --module linear``,
# bf16, numbers in the comments: registers / stack bytes): the fp32 state, the fp32 feature tiles
# and the chunk products are all register-resident, so the wide tiles of the first version
# (chunk 64 x value block 64 at 4 warps, backward chunk 64) spilled 360 B (forward) to 1.9 KB
# (dk/dv) per thread at D = 128. Not yet timed on a GPU (benchmarks/NOTES.md).
# Forward (BT, BV, num_warps, num_stages, class of BK).
_FWD_TILES = [
    # F <= 64: 240/0, 208/0, 215/0, 252/0
    (64, 64, 4, 2, 64), (64, 64, 8, 2, 64), (64, 32, 4, 2, 64), (32, 64, 4, 2, 64),
    (64, 128, 8, 2, 64),
    # F = 128: 235/0, 237/0, 242/0, 250/0 (64x64 at 4 warps: 360 B of stack)
    (64, 32, 8, 2, 128), (64, 32, 8, 1, 128), (16, 64, 8, 2, 128), (64, 16, 4, 2, 128),
    # F = 256: all spill a little (smallest: 32 B at 16x16)
    (16, 16, 8, 2, 256), (16, 32, 8, 2, 256), (32, 16, 8, 2, 256),
]
# dq (BT, num_warps, num_stages, class of BV); feature block ``_dq_bk``.
_DQ_TILES = [
    (32, 4, 2, 64), (32, 8, 2, 64), (64, 8, 2, 64), (16, 8, 2, 64),  # 189/0 132/0 250/0 126/0
    (32, 8, 2, 128), (16, 8, 2, 128),  # 171/0 134/0 (chunk 64: 144 B of stack)
    (16, 8, 2, 256), (32, 8, 2, 256),  # 200 B, 408 B of stack
]
# dk/dv (BT, num_warps, num_stages, class of BV); feature block ``_dkdv_bk``. The reverse walk
# holds dS [BK, BV], the dk and dv accumulators and four chunk products at once, so it takes
# chunk 16 and a narrower feature block as Dv grows (chunk 64 at BK 64 spilled 1.9 KB at D = 128).
_DKDV_TILES = [
    (16, 8, 1, 64), (16, 8, 2, 64), (16, 4, 2, 64),  # BK 64: 214/0 216/0 254/0
    (16, 8, 2, 128), (16, 8, 1, 128), (16, 4, 1, 128),  # BK 32: 232/0 220/0 254/0
    (16, 8, 1, 256), (16, 8, 2, 256),  # BK 16: 8 B, 24 B of stack
]
# Under the interpreter one small tile: chunk 16 so that N = 17 or 100 spans several chunks, and
# 16-wide blocks so that F or Dv = 24 or 32 exercises the split over value/feature blocks.
_INTERPRET_BT = 16
_INTERPRET_BLOCK = 16
_KEY = ["F", "DV", "FEATURE", "CAUSAL", "NORMALIZE", "PRECISION", "GROUP"]


def _size_class(width: int, tiles) -> int:
    """The smallest class (last field of a tile) that holds ``width`` (the largest if none)."""
    classes = sorted({t[-1] for t in tiles})
    return next((c for c in classes if width <= c), classes[-1])


def _fwd_tiles(F: int, Dv: int) -> list[tuple]:
    """Forward tiles offered at ``(F, Dv)``: the class of ``BK = pow2(F)``, ``BV <= pow2(Dv)``."""
    cls = _size_class(_pow2(F), _FWD_TILES)
    tiles = [t for t in _FWD_TILES if t[-1] == cls]
    return [t for t in tiles if t[1] <= _pow2(Dv)] or tiles[-1:]


def _bwd_tiles(tiles, Dv: int) -> list[tuple]:
    """Backward tiles offered at ``Dv`` (the class of ``BV = pow2(Dv)``)."""
    cls = _size_class(_pow2(Dv), tiles)
    return [t for t in tiles if t[-1] == cls]


def _dq_bk(F: int, Dv: int) -> int:
    """dq's feature block on a GPU (F above it is split over programs)."""
    return min(_pow2(F), 64 if _pow2(Dv) <= 128 else 32)


def _dkdv_bk(F: int, Dv: int) -> int:
    """dk/dv's feature block on a GPU; with more than one block dv sums fp32 partials."""
    bv = _pow2(Dv)
    return min(_pow2(F), 64 if bv <= 64 else 32 if bv <= 128 else 16)


def _cfg_tile(c) -> tuple:
    return tuple(c.kwargs[k] for k in ("BT", "BV") if k in c.kwargs) + (c.num_warps, c.num_stages)


def _prune_fwd(configs, named_args, **kwargs):
    keep = {t[:-1] for t in _fwd_tiles(named_args["F"], named_args["DV"])}
    return [c for c in configs if _cfg_tile(c) in keep] or configs[-1:]


def _prune_dq(configs, named_args, **kwargs):
    keep = {t[:-1] for t in _bwd_tiles(_DQ_TILES, named_args["DV"])}
    return [c for c in configs if _cfg_tile(c) in keep] or configs[-1:]


def _prune_dkdv(configs, named_args, **kwargs):
    keep = {t[:-1] for t in _bwd_tiles(_DKDV_TILES, named_args["DV"])}
    return [c for c in configs if _cfg_tile(c) in keep] or configs[-1:]


def _make(kernel, tiles, prune, names):
    if INTERPRET:
        small = (_INTERPRET_BT, _INTERPRET_BLOCK)[: len(names)]
        return kernel, dict(zip(names, small, strict=True))
    configs = [
        triton.Config(dict(zip(names, t[: len(names)], strict=True)), num_warps=t[len(names)],
                      num_stages=t[len(names) + 1])
        for t in dict.fromkeys(t[:-1] for t in tiles)
    ]
    tuned = triton.autotune(configs, key=_KEY,
                            prune_configs_by={"early_config_prune": first_only_if_asked(prune)})
    return tuned(kernel), {}


_fwd, _FWD_META = _make(_fwd_kernel, _FWD_TILES, _prune_fwd, ("BT", "BV"))
_dq, _DQ_META = _make(_bwd_dq_kernel, _DQ_TILES, _prune_dq, ("BT",))
_dkdv, _DKDV_META = _make(_bwd_dkdv_kernel, _DKDV_TILES, _prune_dkdv, ("BT",))


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's matmul precision (TF32 unless "highest"), like torch.matmul."""
    if INTERPRET or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _sizes(q, k, v):
    B, Hq, N, F = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    return B, Hq, Hkv, Hq // Hkv, N, F, Dv


def _flags(q, feature, causal, normalize):
    return dict(
        FEATURE=feature, CAUSAL=causal, NORMALIZE=normalize, PRECISION=_precision(q.dtype),
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
    )


def _fwd_impl(q, k, v, s0, z0, feature, causal, normalize, eps, scale):
    B, Hq, Hkv, group, N, F, Dv = _sizes(q, k, v)
    o = _empty(q.shape[:3] + (Dv,), q)
    den = _empty((B, Hq, N), q, torch.float32) if normalize else q.new_zeros((B, Hq, N),
                                                                            dtype=torch.float32)
    st = _empty((B, Hkv, F, Dv), q, torch.float32)
    zt = _empty((B, Hkv, F), q, torch.float32)
    has_s0 = s0 is not None
    s0_, z0_ = (s0.contiguous(), z0.contiguous()) if has_s0 else (st, zt)
    grid = lambda m: (triton.cdiv(Dv, m["BV"]), Hq, B)
    _fwd[grid](
        q, k, v, o, den, s0_, z0_, st, zt,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        float(scale), float(eps), Hq, Hkv, group, N, F, Dv,
        HAS_S0=has_s0, BK=_pow2(F), **_flags(q, feature, causal, normalize), **_FWD_META,
    )
    return o, den, st, zt


def _bwd_impl(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale):
    B, Hq, Hkv, group, N, F, Dv = _sizes(q, k, v)
    flags = _flags(q, feature, causal, normalize)
    has_s0 = s0 is not None
    do = do if do.stride(-1) == 1 else do.contiguous()
    dq = _empty(q.shape, q)
    dk = _empty(k.shape, k)
    BV = _pow2(Dv)
    BK = min(_pow2(F), _INTERPRET_BLOCK) if INTERPRET else _dq_bk(F, Dv)
    _dq[(triton.cdiv(F, BK), Hq, B)](
        q, k, v, o, do, den, s0 if has_s0 else den, z0 if has_s0 else den, dq,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        float(scale), float(eps), Hq, Hkv, group, N, F, Dv,
        HAS_S0=has_s0, BK=BK, BV=BV, **flags, **_DQ_META,
    )
    # dv is linear in the split over F: with one feature block it is written in place, with more
    # each block writes an fp32 plane that is summed here (deterministic, unlike atomics).
    BK = min(_pow2(F), _INTERPRET_BLOCK) if INTERPRET else _dkdv_bk(F, Dv)
    n_k = triton.cdiv(F, BK)
    if n_k == 1:
        dv_buf = _empty(v.shape, v).unsqueeze(0)
    else:
        dv_buf = _empty((n_k,) + tuple(v.shape), v, torch.float32)
    ds0 = _empty((B, Hkv, F, Dv), q, torch.float32) if has_s0 else den
    dz0 = _empty((B, Hkv, F), q, torch.float32) if has_s0 else den
    has_dst = dst is not None or dzt is not None
    if has_dst:
        dst = dst.contiguous() if dst is not None else q.new_zeros((B, Hkv, F, Dv),
                                                                  dtype=torch.float32)
        dzt = dzt.contiguous() if dzt is not None else q.new_zeros((B, Hkv, F),
                                                                  dtype=torch.float32)
    _dkdv[(n_k, Hkv, B)](
        q, k, v, o, do, den, dst if has_dst else den, dzt if has_dst else den, dk, dv_buf,
        ds0, dz0,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dk.stride(),
        *dv_buf.stride(),
        float(scale), float(eps), Hq, Hkv, group, N, F, Dv,
        HAS_DST=has_dst, WRITE_DS0=has_s0, BK=BK, BV=BV, **flags, **_DKDV_META,
    )
    dv = dv_buf[0] if n_k == 1 else dv_buf.sum(0).to(v.dtype)
    if not has_s0:  # two tensors: outputs of a custom op must not alias each other
        ds0, dz0 = (q.new_empty((0,), dtype=torch.float32) for _ in range(2))
    return dq, dk, dv, ds0, dz0


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::linear_attn_fwd", mutates_args=())
def linear_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s0: torch.Tensor | None,
    z0: torch.Tensor | None, feature: int, causal: bool, normalize: bool, eps: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention forward: ``(o [B, Hq, N, Dv], den [B, Hq, N] fp32, s [B, Hkv, F, Dv] fp32,
    z [B, Hkv, F] fp32)``; ``den`` is saved for backward (zeros when ``normalize`` is False)."""
    return _fwd_impl(q, k, v, s0, z0, feature, causal, normalize, eps, scale)


@linear_attn_fwd.register_fake
def _(q, k, v, s0, z0, feature, causal, normalize, eps, scale):
    B, Hq, Hkv, _, N, F, Dv = _sizes(q, k, v)
    return (
        q.new_empty((B, Hq, N, Dv)), q.new_empty((B, Hq, N), dtype=torch.float32),
        q.new_empty((B, Hkv, F, Dv), dtype=torch.float32),
        q.new_empty((B, Hkv, F), dtype=torch.float32),
    )


@torch.library.custom_op("attnkit::linear_attn_bwd", mutates_args=())
def linear_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    den: torch.Tensor, s0: torch.Tensor | None, z0: torch.Tensor | None,
    dst: torch.Tensor | None, dzt: torch.Tensor | None, feature: int, causal: bool,
    normalize: bool, eps: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention backward: ``(dq, dk, dv, ds0, dz0)``; ``ds0``/``dz0`` are empty when
    there is no initial state. ``dst``/``dzt`` are the gradients on the returned final state."""
    return _bwd_impl(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale)


@linear_attn_bwd.register_fake
def _(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale):
    if s0 is None:
        ds0, dz0 = (q.new_empty((0,), dtype=torch.float32) for _ in range(2))
    else:
        ds0, dz0 = torch.empty_like(s0), torch.empty_like(z0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0, dz0


_NON_TENSOR_ARGS = ("feature", "causal", "normalize", "eps", "scale")


def _setup_context(ctx, inputs, output):
    q, k, v, s0, z0, *rest = inputs
    o, den, _, _ = output
    ctx.save_for_backward(q, k, v, o, den, s0, z0)
    ctx.args = dict(zip(_NON_TENSOR_ARGS, rest, strict=True))
    ctx.set_materialize_grads(False)  # unused state outputs then cost nothing in backward


def _backward(ctx, do, dden, dst, dzt):
    q, k, v, o, den, s0, z0 = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, ds0, dz0 = torch.ops.attnkit.linear_attn_bwd(
        do, q, k, v, o, den, s0, z0, dst, dzt, *ctx.args.values()
    )
    if s0 is None:
        ds0 = dz0 = None
    return dq, dk, dv, ds0, dz0, None, None, None, None, None


linear_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_attention_triton(fq, fk, v, s0, z0, feature: str, causal: bool, normalize: bool,
                            eps: float, scale: float):
    """Run the Triton op. ``fq [B, Hq, N, F]``, ``fk [B, Hkv, N, F]``, ``v [B, Hkv, N, Dv]``:
    raw q/k when ``feature`` is a fused map, already mapped features when it is ``"identity"``;
    ``s0 [B, Hkv, F, Dv]`` / ``z0 [B, Hkv, F]`` fp32 or both None. Returns ``(o, s, z)``."""
    o, _, s, z = torch.ops.attnkit.linear_attn_fwd(
        fq, fk, v, s0, z0, FEATURES[feature], bool(causal), bool(normalize), float(eps),
        float(scale),
    )
    return o, s, z
