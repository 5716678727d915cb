"""``@triton.jit`` building blocks of the linear-attention kernels (``op.py``).

Each block works on one chunk of ``BT`` tokens of one head: loading and mapping a feature tile,
loading a key/value chunk, the per-query quantities of the backward, the state a walk starts
from, and the program prologue (which head, where its tensors start). All accumulation is fp32;
``PRECISION``/``UPCAST`` are the launch's numerics switches (``tiles.precision``/``tiles.upcast``).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "phi", "dphi", "dot", "features", "key_chunk", "query_chunk", "start_state", "query_program",
    "state_offsets", "block_offsets", "chunk_rows", "load_state",
]


@triton.jit
def phi(x, FEATURE: tl.constexpr):
    """The fused feature map (``FEATURES`` code) on an fp32 tile."""
    if FEATURE == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def dphi(x, FEATURE: tl.constexpr):
    """``phi'(x)`` on an fp32 tile."""
    if FEATURE == 1:
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 2:
        return tl.where(x > 0, 1.0, 0.0)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with an fp32 accumulator. ``UPCAST`` (the CPU interpreter with bf16 only)
    multiplies in fp32 because the interpreter's bf16 dot is wrong; the operands' bf16 rounding,
    which is what a GPU sees, is kept."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def features(base, rows, mask_t, stride_n, offs_f, mask_f, stride_d, scale, FEATURE: tl.constexpr):
    """Load a ``[BT, BK]`` tile, scale it and apply ``phi``; padded rows/columns become 0
    (``phi(0)`` is 1 for elu1, so the mask is applied after the map). Returns ``(x, phi(x))``."""
    mask = mask_t[:, None] & mask_f[None, :]
    x = tl.load(base + rows[:, None] * stride_n + offs_f[None, :] * stride_d, mask=mask, other=0.0)
    x = x.to(tl.float32) * scale
    return x, tl.where(mask, phi(x, FEATURE), 0.0)


@triton.jit
def key_chunk(k_base, v_base, rows, mask_t, skn, skd, svn, svd, offs_f, mask_f, offs_v, mask_v,
              FEATURE: tl.constexpr):
    """``(k [BT, BK] fp32, phi(k) [BT, BK] fp32, v [BT, BV] in v's dtype)`` of one chunk."""
    xk, fk = features(k_base, rows, mask_t, skn, offs_f, mask_f, skd, 1.0, FEATURE)
    v = tl.load(v_base + rows[:, None] * svn + offs_v[None, :] * svd,
                mask=mask_t[:, None] & mask_v[None, :], other=0.0)
    return xk, fk, v


@triton.jit
def query_chunk(q_base, do_base, o_base, den_base, rows, mask_t, offs_f, mask_f, offs_v, mask_v,
                sqn, sqd, sdon, sdod, son, sod, scale, eps, FEATURE: tl.constexpr,
                NORMALIZE: tl.constexpr):
    """What the backward needs of one query head's chunk: ``(q * scale, phi(q * scale))``
    ``[BT, BK]``, ``g = do / (den + eps)`` ``[BT, BV]`` and ``c = -(do . o) / (den + eps)``
    ``[BT]`` (all fp32); without normalisation ``g = do`` and ``c = 0``."""
    xq, fq = features(q_base, rows, mask_t, sqn, offs_f, mask_f, sqd, scale, FEATURE)
    mask = mask_t[:, None] & mask_v[None, :]
    do = tl.load(do_base + rows[:, None] * sdon + offs_v[None, :] * sdod, mask=mask, other=0.0)
    g = do.to(tl.float32)
    if NORMALIZE:
        o = tl.load(o_base + rows[:, None] * son + offs_v[None, :] * sod, mask=mask, other=0.0)
        r = 1.0 / (tl.load(den_base + rows, mask=mask_t, other=1.0) + eps)
        c = -tl.sum(g * o.to(tl.float32), 1) * r
        g = g * r[:, None]
    else:
        c = tl.zeros([do.shape[0]], dtype=tl.float32)
    return xq, fq, g, c


@triton.jit
def state_offsets(b64, hk, HKV, F, DV):
    """Where key/value head ``hk`` of batch row ``b64`` starts in a dense ``[B, HKV, F, DV]``
    state and a ``[B, HKV, F]`` normaliser (int64)."""
    head = b64 * HKV + hk
    return head * F * DV, head * F


@triton.jit
def query_program(Q, K, V, OUT, DEN, sqb, sqh, skb, skh, svb, svh, sob, soh, HQ, HKV, GROUP, N, F,
                  DV):
    """The prologue of a program on grid ``(block, HQ, B)`` (heads on y, batch on z: each up to
    65535): query head ``h`` reads key/value head ``h // GROUP``. Returns ``(h, b64, q_base,
    k_base, v_base, o_base, den_base, st_off, zt_off)``, all offsets int64."""
    h = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    h64, hk64 = h.to(tl.int64), hk.to(tl.int64)
    q_base = Q + b64 * sqb + h64 * sqh
    k_base = K + b64 * skb + hk64 * skh
    v_base = V + b64 * svb + hk64 * svh
    o_base = OUT + b64 * sob + h64 * soh
    den_base = DEN + (b64 * HQ + h64) * N
    st_off, zt_off = state_offsets(b64, hk64, HKV, F, DV)
    return h, b64, q_base, k_base, v_base, o_base, den_base, st_off, zt_off


@triton.jit
def block_offsets(first_f, first_v, F, DV, BK: tl.constexpr, BV: tl.constexpr):
    """``(offs_f [BK], mask_f, offs_v [BV], mask_v)``: this program's feature and value columns."""
    offs_f = first_f + tl.arange(0, BK)
    offs_v = first_v + tl.arange(0, BV)
    return offs_f, offs_f < F, offs_v, offs_v < DV


@triton.jit
def chunk_rows(start, arange_t, N):
    """``(offs_t [BT], mask_t, rows)`` of the chunk at token ``start`` (``rows``: int64 offsets)."""
    offs_t = start + arange_t
    return offs_t, offs_t < N, offs_t.to(tl.int64)


@triton.jit
def load_state(S, Z, st_off, zt_off, offs_f, mask_f, offs_v, mask_v, DV, PRESENT: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """The ``[BK, BV]`` / ``[BK]`` fp32 block of a dense ``[B, HKV, F, DV]`` state and its
    ``[B, HKV, F]`` normaliser, or zeros when they are absent (``PRESENT`` False: ``None``)."""
    if PRESENT:
        s = tl.load(S + st_off + offs_f[:, None] * DV + offs_v[None, :],
                    mask=mask_f[:, None] & mask_v[None, :], other=0.0)
        z = tl.load(Z + zt_off + offs_f, mask=mask_f, other=0.0)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
    return s, z


@triton.jit
def start_state(S0, Z0, st_off, zt_off, k_base, v_base, skn, skd, svn, svd, N, DV,
                offs_f, mask_f, offs_v, mask_v, arange_t, FEATURE: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_S0: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """The state ``[BK, BV]`` / normaliser ``[BK]`` (fp32) a chunk walk starts from: the initial
    state (or zeros) and, non-causal, plus the whole sequence's ``phi(k)^T v`` (a first pass)."""
    s, z = load_state(S0, Z0, st_off, zt_off, offs_f, mask_f, offs_v, mask_v, DV, HAS_S0, BK, BV)
    if not CAUSAL:
        for start in range(0, N, BT):
            offs_t, mask_t, rows = chunk_rows(start, arange_t, N)
            xk, fk, v = key_chunk(k_base, v_base, rows, mask_t, skn, skd, svn, svd, offs_f, mask_f,
                                 offs_v, mask_v, FEATURE)
            s += dot(tl.trans(fk.to(v.dtype)), v, PRECISION, UPCAST)  # [BK, BT] @ [BT, BV]
            z += tl.sum(fk, 0)
    return s, z


@triton.jit
def decay_weights(LG, hk, start, arange_t, N, BT: tl.constexpr):
    """The decay of the chunk at token ``start`` for key/value head ``hk`` (``LG [HKV]``: fp32
    ``log gamma <= 0``), local positions ``i`` (query) and ``j`` (key), ``n`` real tokens:
    ``(gamma^(i - j) [BT, BT] (0 above the diagonal), gamma^(i + 1) [BT] (what a query reads of
    the incoming state), gamma^(n - 1 - j) [BT] (what key j adds to the outgoing state, 0 past
    the tail), gamma^n (what the incoming state keeps))``. Every exponent is >= 0, so nothing
    overflows."""
    lg = tl.load(LG + hk)
    n = tl.minimum(N - start, BT).to(tl.float32)
    t = arange_t.to(tl.float32)
    gap = t[:, None] - t[None, :]
    w_a = tl.where(gap >= 0, tl.exp(lg * tl.maximum(gap, 0.0)), 0.0)
    w_q = tl.exp(lg * (t + 1.0))
    w_k = tl.where(t < n, tl.exp(lg * tl.maximum(n - 1.0 - t, 0.0)), 0.0)
    return w_a, w_q, w_k, tl.exp(lg * n)
