"""Chunked linear attention in Triton: the kernels, their launchers and the ``torch.library`` ops.

Definition (``phi`` = the feature map; ``fq = phi(q * scale)``, ``fk = phi(k)``, both ``[N, F]``)::

    S_i = S0 + sum_{j <= i} fk_j v_j^T      [F, Dv]     (non-causal: the sum runs over all j)
    z_i = z0 + sum_{j <= i} fk_j            [F]
    o_i = fq_i S_i / (fq_i . z_i + eps)      (normalize=False: o_i = fq_i S_i)

``HAS_DECAY`` (causal; ``LG = log gamma [HKV]``): ``S_i = gamma S_{i-1} + fk_i v_i^T``, so in a
chunk of ``n`` tokens the scores take ``gamma^(i - j)``, query ``i`` reads ``gamma^(i + 1)`` of
the incoming state and key ``j`` enters the outgoing one as ``gamma^(n - 1 - j)`` (the incoming
one keeps ``gamma^n``); the backward weights the same terms (``blocks.decay_weights``).

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

Built-in feature maps are fused (``FEATURE``, the codes of ``feature_maps.FEATURES``): the kernels
load raw q/k and apply ``phi`` and ``phi'`` in fp32. Any other map is applied outside by autograd and
the kernels run with the identity.

Numerics: states, denominators and all accumulators are fp32. Intra-chunk products take fp16/bf16
operands (tensor cores) with fp32 accumulation; the inter-chunk product with the state takes fp32
operands (TF32 unless ``torch.get_float32_matmul_precision() == "highest"``), so the state is never
rounded to 16 bits (fp16 would overflow on long sequences). Base offsets are int64.

Layout of the folder: the shared ``@triton.jit`` pieces are in ``blocks.py``, the tile tables and
autotuning in ``tiles.py``; this module holds the three kernels (their module is what the launch
dry run and the compile check name), the launchers, which allocate every output (hence
``POISON_OUTPUTS`` here), and the custom ops. An absent initial state, or an absent gradient on
the final state, is passed as ``None`` and its ``HAS_*`` flag derived from that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .blocks import (
    block_offsets,
    chunk_rows,
    decay_weights,
    dot,
    dphi,
    features,
    key_chunk,
    load_state,
    query_chunk,
    query_program,
    start_state,
    state_offsets,
)
from .feature_maps import FEATURES
from .tiles import INTERPRET, MAX_DIM, pow2
from .tiles import dense_state as _dense
from .tiles import launch_flags as _flags
from .tiles import launch_sizes as _sizes
from .tiles import launch_strides as _strides

__all__ = ["linear_attention_triton", "FEATURES", "INTERPRET", "MAX_DIM"]

#: Tests set this to fill every output with NaN before the kernels run (unwritten -> fails).
POISON_OUTPUTS = False

# The tile selection under the names the compile check and its tests read (``tiles.py``).
_fwd_tiles, _bwd_tiles, _pow2 = tiles.fwd_tiles, tiles.bwd_tiles, pow2
_dq_bk, _dkdv_bk = tiles.dq_block, tiles.dkdv_block
_DQ_TILES, _DKDV_TILES = tiles.DQ_TILES, tiles.DKDV_TILES


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, DEN, S0, Z0, ST, ZT, LG,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    scale, eps, HQ, HKV, GROUP, N, F, DV,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S0: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(DV, BV), HQ, B)``. Writes ``o``, the denominator ``den [B, HQ, N]`` (fp32,
    value block 0 only) and the final state ``ST [B, HKV, F, DV]`` / ``ZT [B, HKV, F]``."""
    i_v = tl.program_id(0)
    h, b64, q_base, k_base, v_base, o_base, den_base, st_off, zt_off = query_program(
        Q, K, V, OUT, DEN, sqb, sqh, skb, skh, svb, svh, sob, soh, HQ, HKV, GROUP, N, F, DV)

    offs_f, mask_f, offs_v, mask_v = block_offsets(0, i_v * BV, F, DV, BK, BV)
    mask_fv = mask_f[:, None] & mask_v[None, :]
    s_ptrs = offs_f[:, None] * DV + offs_v[None, :]
    arange_t = tl.arange(0, BT)

    # Non-causal: pass 1 builds the whole sequence's state; pass 2 below reads it for every chunk.
    s, z = start_state(S0, Z0, st_off, zt_off, k_base, v_base, skn, skd, svn, svd, N, DV,
                       offs_f, mask_f, offs_v, mask_v, arange_t, FEATURE, CAUSAL, HAS_S0,
                       PRECISION, UPCAST, BK, BT, BV)

    for start in range(0, N, BT):
        offs_t, mask_t, rows = chunk_rows(start, arange_t, N)
        xq, fq = features(q_base, rows, mask_t, sqn, offs_f, mask_f, sqd, scale, FEATURE)
        # inter-chunk term with the fp32 state: [BT, BK] @ [BK, BV] -> [BT, BV]
        num = dot(fq, s, PRECISION, False)
        if NORMALIZE:
            den = tl.sum(fq * z[None, :], 1)  # [BT]
        if HAS_DECAY:  # (causal only) query i reads gamma^(i + 1) of the incoming state
            w_a, w_q, w_k, w_s = decay_weights(LG, h // GROUP, start, arange_t, N, BT)
            num = num * w_q[:, None]
            if NORMALIZE:
                den = den * w_q
        if CAUSAL:
            xk, fk, v = key_chunk(k_base, v_base, rows, mask_t, skn, skd, svn, svd, offs_f, mask_f,
                                 offs_v, mask_v, FEATURE)
            # intra-chunk term: [BT, BK] @ [BK, BT] -> [BT, BT], lower triangle (j <= i)
            a = dot(fq.to(v.dtype), tl.trans(fk.to(v.dtype)), PRECISION, UPCAST)
            a = tl.where(arange_t[:, None] >= arange_t[None, :], a, 0.0)
            if HAS_DECAY:
                a = a * w_a
                s, z, fk = s * w_s, z * w_s, fk * w_k[:, None]  # the outgoing state's weights
            num += dot(a.to(v.dtype), v, PRECISION, UPCAST)  # [BT, BT] @ [BT, BV]
            if NORMALIZE:
                den += tl.sum(a, 1)
            s += dot(tl.trans(fk.to(v.dtype)), v, PRECISION, UPCAST)  # [BK, BT] @ [BT, BV]
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
def _bwd_dq_kernel(
    Q, K, V, OUT, DO, DEN, S0, Z0, DQ, LG,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    scale, eps, HQ, HKV, GROUP, N, F, DV,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S0: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(F, BK), HQ, B)``: ``dq[:, kblock] = phi'(q) * scale * (S g + z c)``,
    recomputing ``S[kblock, :]`` chunk by chunk."""
    i_k = tl.program_id(0)
    h, b64, q_base, k_base, v_base, o_base, den_base, st_off, zt_off = query_program(
        Q, K, V, OUT, DEN, sqb, sqh, skb, skh, svb, svh, sob, soh, HQ, HKV, GROUP, N, F, DV)
    do_base = DO + b64 * sdob + h.to(tl.int64) * sdoh
    dq_base = DQ + b64 * sdqb + h.to(tl.int64) * sdqh

    offs_f, mask_f, offs_v, mask_v = block_offsets(i_k * BK, 0, F, DV, BK, BV)
    arange_t = tl.arange(0, BT)

    s, z = start_state(S0, Z0, st_off, zt_off, k_base, v_base, skn, skd, svn, svd, N, DV,
                       offs_f, mask_f, offs_v, mask_v, arange_t, FEATURE, CAUSAL, HAS_S0,
                       PRECISION, UPCAST, BK, BT, BV)

    for start in range(0, N, BT):
        offs_t, mask_t, rows = chunk_rows(start, arange_t, N)
        xq, fq, g, c = query_chunk(q_base, do_base, o_base, den_base, rows, mask_t, offs_f, mask_f,
                                  offs_v, mask_v, sqn, sqd, sdon, sdod, son, sod, scale, eps,
                                  FEATURE, NORMALIZE)
        # inter-chunk: [BT, BV] @ [BV, BK] -> [BT, BK]
        dfq = dot(g, tl.trans(s), PRECISION, False) + c[:, None] * z[None, :]
        if HAS_DECAY:
            w_a, w_q, w_k, w_s = decay_weights(LG, h // GROUP, start, arange_t, N, BT)
            dfq = dfq * w_q[:, None]
        if CAUSAL:
            xk, fk, v = key_chunk(k_base, v_base, rows, mask_t, skn, skd, svn, svd, offs_f, mask_f,
                                 offs_v, mask_v, FEATURE)
            # dA_ij = g_i . v_j + c_i: [BT, BV] @ [BV, BT] -> [BT, BT], lower triangle
            da = dot(g.to(v.dtype), tl.trans(v), PRECISION, UPCAST) + c[:, None]
            da = tl.where(arange_t[:, None] >= arange_t[None, :], da, 0.0)
            if HAS_DECAY:
                da = da * w_a
            dfq += dot(da.to(v.dtype), fk.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BK]
            if HAS_DECAY:
                s, z, fk = s * w_s, z * w_s, fk * w_k[:, None]
            s += dot(tl.trans(fk.to(v.dtype)), v, PRECISION, UPCAST)
            z += tl.sum(fk, 0)
        dq = dfq * dphi(xq, FEATURE) * scale
        tl.store(dq_base + rows[:, None] * sdqn + offs_f[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=mask_t[:, None] & mask_f[None, :])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, OUT, DO, DEN, DST, DZT, DK, DV_, DS0, DZ0, LG,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvk, sdvb, sdvh, sdvn, sdvd,
    scale, eps, HQ, HKV, GROUP, N, F, DV,
    FEATURE: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DST: tl.constexpr, WRITE_DS0: tl.constexpr, HAS_DECAY: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(F, BK), HKV, B)``: a reverse walk carrying ``dS[kblock, :]`` / ``dz[kblock]``
    over the chunks and, inside each chunk, over the ``GROUP`` query heads of this key/value head.
    Writes ``dk[:, kblock]``, the ``kblock`` partial of ``dv`` (plane ``i_k`` of ``DV_``, the
    ``[planes, B, HKV, N, DV]`` buffer) and, at the start of the sequence, ``dS0`` / ``dz0``."""
    i_k = tl.program_id(0)
    hk = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    k_base = K + b64 * skb + hk.to(tl.int64) * skh
    v_base = V + b64 * svb + hk.to(tl.int64) * svh
    dk_base = DK + b64 * sdkb + hk.to(tl.int64) * sdkh
    dv_base = DV_ + i_k.to(tl.int64) * sdvk + b64 * sdvb + hk.to(tl.int64) * sdvh
    st_off, zt_off = state_offsets(b64, hk.to(tl.int64), HKV, F, DV)

    offs_f, mask_f, offs_v, mask_v = block_offsets(i_k * BK, 0, F, DV, BK, BV)
    mask_fv = mask_f[:, None] & mask_v[None, :]
    s_ptrs = offs_f[:, None] * DV + offs_v[None, :]
    arange_t = tl.arange(0, BT)
    n_chunks = tl.cdiv(N, BT)

    # the gradient on the returned final state (zeros when unused) seeds the reverse walk
    ds, dz = load_state(DST, DZT, st_off, zt_off, offs_f, mask_f, offs_v, mask_v, DV, HAS_DST, BK,
                        BV)

    if not CAUSAL:
        # Pass 1: every key sees every query, so dS is the same total for all of them.
        for start in range(0, N, BT):
            offs_t, mask_t, rows = chunk_rows(start, arange_t, N)
            for hh in range(0, GROUP):
                h = (hk * GROUP + hh).to(tl.int64)
                xq, fq, g, c = query_chunk(
                    Q + b64 * sqb + h * sqh, DO + b64 * sdob + h * sdoh, OUT + b64 * sob + h * soh,
                    DEN + (b64 * HQ + h) * N, rows, mask_t, offs_f, mask_f, offs_v, mask_v,
                    sqn, sqd, sdon, sdod, son, sod, scale, eps, FEATURE, NORMALIZE)
                ds += dot(tl.trans(fq), g, PRECISION, False)  # [BK, BT] @ [BT, BV]
                dz += tl.sum(fq * c[:, None], 0)

    for i in range(0, n_chunks):
        start = (n_chunks - 1 - i) * BT  # reverse: dS must hold the chunks after this one
        offs_t, mask_t, rows = chunk_rows(start, arange_t, N)
        xk, fk, v = key_chunk(k_base, v_base, rows, mask_t, skn, skd, svn, svd, offs_f, mask_f,
                              offs_v, mask_v, FEATURE)
        # inter-chunk: [BT, BV] @ [BV, BK] -> [BT, BK] and [BT, BK] @ [BK, BV] -> [BT, BV]
        dfk = dot(v.to(tl.float32), tl.trans(ds), PRECISION, False) + dz[None, :]
        dv = dot(fk, ds, PRECISION, False)
        if HAS_DECAY:
            # key j entered the outgoing state as gamma^(n-1-j); the incoming one kept gamma^n,
            # so dS now passes gamma^n back before this chunk's queries add theirs
            w_a, w_q, w_k, w_s = decay_weights(LG, hk, start, arange_t, N, BT)
            dfk, dv = dfk * w_k[:, None], dv * w_k[:, None]
            ds, dz = ds * w_s, dz * w_s
            w_at = tl.trans(w_a)  # [key j, query i]: gamma^(i - j)
        if CAUSAL:
            upper = arange_t[:, None] <= arange_t[None, :]  # key j (row) seen by query i (col)
            for hh in range(0, GROUP):
                h = (hk * GROUP + hh).to(tl.int64)
                xq, fq, g, c = query_chunk(
                    Q + b64 * sqb + h * sqh, DO + b64 * sdob + h * sdoh, OUT + b64 * sob + h * soh,
                    DEN + (b64 * HQ + h) * N, rows, mask_t, offs_f, mask_f, offs_v, mask_v,
                    sqn, sqd, sdon, sdod, son, sod, scale, eps, FEATURE, NORMALIZE)
                # P_ji = v_j . g_i + c_i: [BT, BV] @ [BV, BT] -> [BT, BT]
                p = dot(v, tl.trans(g.to(v.dtype)), PRECISION, UPCAST) + c[None, :]
                p = tl.where(upper, p, 0.0)
                if HAS_DECAY:
                    p = p * w_at
                dfk += dot(p.to(v.dtype), fq.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BK]
                # A^T_ji = fk_j . fq_i over this feature block: [BT, BK] @ [BK, BT] -> [BT, BT]
                at = dot(fk.to(v.dtype), tl.trans(fq.to(v.dtype)), PRECISION, UPCAST)
                at = tl.where(upper, at, 0.0)
                if HAS_DECAY:
                    at = at * w_at
                    fq = fq * w_q[:, None]  # query i read gamma^(i + 1) of the incoming state
                dv += dot(at.to(v.dtype), g.to(v.dtype), PRECISION, UPCAST)  # [BT, BT] @ [BT, BV]
                # the inter-chunk terms above already read dS, so this chunk joins it now
                ds += dot(tl.trans(fq), g, PRECISION, False)  # [BK, BT] @ [BT, BV]
                dz += tl.sum(fq * c[:, None], 0)
        dk = dfk * dphi(xk, FEATURE)
        tl.store(dk_base + rows[:, None] * sdkn + offs_f[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=mask_t[:, None] & mask_f[None, :])
        tl.store(dv_base + rows[:, None] * sdvn + offs_v[None, :] * sdvd,
                 dv.to(DV_.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])

    if WRITE_DS0:
        tl.store(DS0 + st_off + s_ptrs, ds, mask=mask_fv)
        tl.store(DZ0 + zt_off + offs_f, dz, mask=mask_f)


_fwd, _FWD_META = tiles.autotuned(_fwd_kernel, "fwd")
_dq, _DQ_META = tiles.autotuned(_bwd_dq_kernel, "dq")
_dkdv, _DKDV_META = tiles.autotuned(_bwd_dkdv_kernel, "dkdv")


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output buffer (NaN-filled when the tests poison outputs)."""
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


def _fwd_impl(q, k, v, s0, z0, feature, causal, normalize, eps, scale, lg=None):
    B, Hq, N, F = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    o = _empty((B, Hq, N, Dv), q)
    # without normalisation there is no denominator, but backward still takes the saved tensor
    den = (_empty((B, Hq, N), q, torch.float32) if normalize
           else q.new_zeros((B, Hq, N), dtype=torch.float32))
    st = _empty((B, Hkv, F, Dv), q, torch.float32)
    zt = _empty((B, Hkv, F), q, torch.float32)
    s0, z0 = _dense(s0, z0)
    grid = lambda meta: (triton.cdiv(Dv, meta["BV"]), Hq, B)
    _fwd[grid](
        Q=q, K=k, V=v, OUT=o, DEN=den, S0=s0, Z0=z0, ST=st, ZT=zt, LG=lg,
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("so", o),
        scale=float(scale), eps=float(eps), **_sizes(q, k, v),
        HAS_S0=s0 is not None, HAS_DECAY=lg is not None, BK=pow2(F),
        **_flags(q, feature, causal, normalize), **_FWD_META,
    )
    return o, den, st, zt


def _bwd_impl(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale,
              lg=None):
    B, Hq, N, F = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    common = dict(scale=float(scale), eps=float(eps), **_sizes(q, k, v), BV=pow2(Dv),
                  LG=lg, HAS_DECAY=lg is not None,
                  **_flags(q, feature, causal, normalize))
    do = do if do.stride(-1) == 1 else do.contiguous()
    s0, z0 = _dense(s0, z0)
    dq = _empty(q.shape, q)
    dk = _empty(k.shape, k)
    block = tiles.feature_block(tiles.dq_block, F, Dv)
    _dq[(triton.cdiv(F, block), Hq, B)](
        Q=q, K=k, V=v, OUT=o, DO=do, DEN=den, S0=s0, Z0=z0, DQ=dq,
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("so", o),
        **_strides("sdo", do), **_strides("sdq", dq),
        HAS_S0=s0 is not None, BK=block, **common, **_DQ_META,
    )
    # dv is linear in the split over F: with one feature block it is written in place, with more
    # each block writes an fp32 plane that is summed here (deterministic, unlike atomics).
    block = tiles.feature_block(tiles.dkdv_block, F, Dv)
    planes = triton.cdiv(F, block)
    if planes == 1:
        dv_parts = _empty(v.shape, v).unsqueeze(0)
    else:
        dv_parts = _empty((planes, *v.shape), v, torch.float32)
    ds0 = _empty((B, Hkv, F, Dv), q, torch.float32) if s0 is not None else None
    dz0 = _empty((B, Hkv, F), q, torch.float32) if s0 is not None else None
    if dst is not None or dzt is not None:  # one of the two unused: its gradient is zero
        dst = dst.contiguous() if dst is not None else q.new_zeros((B, Hkv, F, Dv),
                                                                  dtype=torch.float32)
        dzt = dzt.contiguous() if dzt is not None else q.new_zeros((B, Hkv, F),
                                                                  dtype=torch.float32)
    _dkdv[(planes, Hkv, B)](
        Q=q, K=k, V=v, OUT=o, DO=do, DEN=den, DST=dst, DZT=dzt, DK=dk, DV_=dv_parts,
        DS0=ds0, DZ0=dz0,
        **_strides("sq", q), **_strides("sk", k), **_strides("sv", v), **_strides("so", o),
        **_strides("sdo", do), **_strides("sdk", dk), **_strides("sdv", dv_parts),
        HAS_DST=dst is not None, WRITE_DS0=ds0 is not None, BK=block, **common, **_DKDV_META,
    )
    dv = dv_parts[0] if planes == 1 else dv_parts.sum(0).to(v.dtype)
    if s0 is None:  # two tensors: outputs of a custom op must not alias each other
        ds0, dz0 = (q.new_empty((0,), dtype=torch.float32) for _ in range(2))
    return dq, dk, dv, ds0, dz0


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::linear_attn_fwd", mutates_args=())
def linear_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s0: torch.Tensor | None,
    z0: torch.Tensor | None, feature: int, causal: bool, normalize: bool, eps: float, scale: float,
    lg: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention forward: ``(o [B, Hq, N, Dv], den [B, Hq, N] fp32, s [B, Hkv, F, Dv] fp32,
    z [B, Hkv, F] fp32)``; ``den`` is saved for backward (zeros when ``normalize`` is False).
    ``lg``: ``log gamma [Hkv]`` fp32 of a decaying state (causal only), or None."""
    return _fwd_impl(q, k, v, s0, z0, feature, causal, normalize, eps, scale, lg)


@linear_attn_fwd.register_fake
def _(q, k, v, s0, z0, feature, causal, normalize, eps, scale, lg=None):
    B, Hq, N, F = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
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
    normalize: bool, eps: float, scale: float, lg: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention backward: ``(dq, dk, dv, ds0, dz0)``; ``ds0``/``dz0`` are empty when
    there is no initial state. ``dst``/``dzt`` are the gradients on the returned final state."""
    return _bwd_impl(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale,
                     lg)


@linear_attn_bwd.register_fake
def _(do, q, k, v, o, den, s0, z0, dst, dzt, feature, causal, normalize, eps, scale, lg=None):
    if s0 is None:
        ds0, dz0 = (q.new_empty((0,), dtype=torch.float32) for _ in range(2))
    else:
        ds0, dz0 = torch.empty_like(s0), torch.empty_like(z0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0, dz0


_NON_TENSOR_ARGS = ("feature", "causal", "normalize", "eps", "scale")


def _setup_context(ctx, inputs, output):
    q, k, v, s0, z0, *rest = inputs
    lg = rest[len(_NON_TENSOR_ARGS)] if len(rest) > len(_NON_TENSOR_ARGS) else None
    o, den, _, _ = output
    ctx.save_for_backward(q, k, v, o, den, s0, z0, lg)
    ctx.args = dict(zip(_NON_TENSOR_ARGS, rest[:len(_NON_TENSOR_ARGS)], strict=True))
    ctx.n_inputs = len(inputs)
    ctx.set_materialize_grads(False)  # unused state outputs then cost nothing in backward


def _backward(ctx, do, dden, dst, dzt):
    q, k, v, o, den, s0, z0, lg = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, ds0, dz0 = torch.ops.attnkit.linear_attn_bwd(
        do, q, k, v, o, den, s0, z0, dst, dzt, *ctx.args.values(), lg
    )
    if s0 is None:
        ds0 = dz0 = None
    # no gradient for the flags, nor for the decay (gamma is a fixed rate)
    return (dq, dk, dv, ds0, dz0) + (None,) * (ctx.n_inputs - 5)


linear_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_attention_triton(fq, fk, v, s0, z0, feature: str, causal: bool, normalize: bool,
                            eps: float, scale: float, decay: torch.Tensor | None = None):
    """Run the Triton op. ``fq [B, Hq, N, F]``, ``fk [B, Hkv, N, F]``, ``v [B, Hkv, N, Dv]``:
    raw q/k when ``feature`` is a fused map, already mapped features when it is ``"identity"``;
    ``s0 [B, Hkv, F, Dv]`` / ``z0 [B, Hkv, F]`` fp32 or both None; ``decay`` ``[Hkv]`` gamma
    in (0, 1] (causal only) or None. Returns ``(o, s, z)``."""
    lg = None if decay is None else torch.log(decay.to(device=fq.device, dtype=torch.float32))
    o, _, s, z = torch.ops.attnkit.linear_attn_fwd(
        fq, fk, v, s0, z0, FEATURES[feature], bool(causal), bool(normalize), float(eps),
        float(scale), None if lg is None else lg.contiguous(),
    )
    return o, s, z
