"""``@triton.jit`` building blocks of the chunked linear-attention kernels.

Each block works on one chunk of ``BT`` tokens of one head: mapping a feature tile, loading rows,
the per-query gradient factors of the backward, a block of a per-chunk state, the decay weights
of a chunk, and the program prologue (which block, chunk, head and batch row). All accumulation
is fp32; ``PRECISION``/``UPCAST`` are the launch's numerics switches (``tiles.precision`` /
``tiles.upcast``). The kernels are in ``chunk_state.py``, ``chunk_out.py`` and ``chunk_grad.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "phi", "dphi", "dot", "features", "state_offsets", "block_offsets", "chunk_rows",
    "decay_weights", "chunk_program", "load_rows", "grad_rows", "state_block", "causal_mask",
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
def state_offsets(b64, hk, HKV, F, DV):
    """Where key/value head ``hk`` of batch row ``b64`` starts in a dense ``[B, HKV, F, DV]``
    state and a ``[B, HKV, F]`` normaliser (int64)."""
    head = b64 * HKV + hk
    return head * F * DV, head * F


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
def decay_weights(LG, hk, start, arange_t, N, BT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The decay of the chunk at token ``start`` for key/value head ``hk`` (``LG [HKV]``: fp32
    ``log gamma <= 0``), local positions ``i`` (query) and ``j`` (key), ``n`` real tokens:
    ``(gamma^(i - j) [BT, BT] (rows i, 0 above the diagonal; rows j with ``TRANSPOSED``, the
    layout of the backward's key-side scores), gamma^(i + 1) [BT] (what a query reads of the
    incoming state), gamma^(n - 1 - j) [BT] (what key j adds to the outgoing state, 0 past the
    tail), gamma^n (what the incoming state keeps))``. Every exponent is >= 0: nothing
    overflows."""
    lg = tl.load(LG + hk)
    n = tl.minimum(N - start, BT).to(tl.float32)
    t = arange_t.to(tl.float32)
    if TRANSPOSED:
        gap = t[None, :] - t[:, None]
    else:
        gap = t[:, None] - t[None, :]
    w_a = tl.where(gap >= 0, tl.exp(lg * tl.maximum(gap, 0.0)), 0.0)
    w_q = tl.exp(lg * (t + 1.0))
    w_k = tl.where(t < n, tl.exp(lg * tl.maximum(n - 1.0 - t, 0.0)), 0.0)
    return w_a, w_q, w_k, tl.exp(lg * n)


@triton.jit
def chunk_program(NB):
    """The prologue of a program on grid ``(NB * chunks, heads, B)``: axis 0 packs the ``NB``
    blocks of a split dim with the chunk, blocks fastest, so the programs of one chunk run side
    by side and share its tiles in L2 (each reads the chunk's q/k/v/do rows whole); heads (y) and
    batch rows (z) keep the full 65535 each. Returns ``(block, chunk, head, b64)``."""
    pid = tl.program_id(0)
    return pid % NB, pid // NB, tl.program_id(1), tl.program_id(2).to(tl.int64)


@triton.jit
def load_rows(base, rows, mask_t, stride_n, offs, mask, stride_d):
    """A ``[BT, W]`` tile of a ``[N, D]`` head (0 outside), in the tensor's dtype."""
    return tl.load(base + rows[:, None] * stride_n + offs[None, :] * stride_d,
                   mask=mask_t[:, None] & mask[None, :], other=0.0)


@triton.jit
def grad_rows(do_base, den_base, c_base, rows, mask_t, offs_v, mask_v, sdon, sdod, eps,
              NORMALIZE: tl.constexpr):
    """The backward's per-query factors of one chunk: ``do`` ``[BT, BV]`` as stored, ``r = 1 /
    (den + eps)`` and ``c = -(do . o) r`` ``[BT]`` fp32 (``c`` from the prepass, ``chunk_grad``),
    so the gradient on the numerator is ``g = r do``. The kernels apply ``r`` to whichever
    product is smaller (a score row or column, a feature row) instead of forming ``g``: no fp32
    ``[BT, BV]`` tile, and ``do`` enters the tensor-core products unrounded. Without
    normalisation ``r = 1`` and ``c = 0``."""
    do = load_rows(do_base, rows, mask_t, sdon, offs_v, mask_v, sdod)
    if NORMALIZE:
        r = 1.0 / (tl.load(den_base + rows, mask=mask_t, other=1.0) + eps)
        c = tl.load(c_base + rows, mask=mask_t, other=0.0)
    else:
        r = tl.full([do.shape[0]], 1.0, dtype=tl.float32)
        c = tl.zeros([do.shape[0]], dtype=tl.float32)
    return do, r, c


@triton.jit
def state_block(S, Z, head, chunk, s_head, s_chunk, z_head, z_chunk, offs_f, mask_f, offs_v,
                mask_v, DV):
    """The ``[BK, BV]`` block of the dense ``[F, DV]`` fp32 state of key/value head ``head``
    (``b * HKV + hk``, int64) for ``chunk``, at ``S + head * s_head + chunk * s_chunk``, and the
    ``[BK]`` block of its normaliser likewise in ``Z`` (0 outside)."""
    s_off = head * s_head + chunk.to(tl.int64) * s_chunk
    z_off = head * z_head + chunk.to(tl.int64) * z_chunk
    s = tl.load(S + s_off + offs_f[:, None] * DV + offs_v[None, :],
                mask=mask_f[:, None] & mask_v[None, :], other=0.0)
    z = tl.load(Z + z_off + offs_f, mask=mask_f, other=0.0)
    return s, z


@triton.jit
def causal_mask(arange_t, TRANSPOSED: tl.constexpr):
    """``[BT, BT]``: query ``i`` sees key ``j <= i`` (rows = queries), or its transpose (rows =
    keys, ``TRANSPOSED``)."""
    if TRANSPOSED:
        return arange_t[:, None] <= arange_t[None, :]
    else:
        return arange_t[:, None] >= arange_t[None, :]
