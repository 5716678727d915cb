"""The state side of the chunked linear attention: per-chunk local states, then their scan.

With chunks of ``BT`` tokens (``NT`` of them) and decay ``gamma`` (1 without), the state entering
chunk ``c`` is ``S_c = gamma^n S_{c-1} + U_{c-1}`` (``n`` the previous chunk's tokens) with the
local state ``U_c = sum_j gamma^(n-1-j) fk_j v_j^T`` over the chunk's keys. The backward carries
``dS`` the same way in reverse: the gradient on the state leaving chunk ``c`` is
``dS_c = gamma^n' dS_{c+1} + V_{c+1}``, ``V_c = sum_i gamma^(i+1) fq_i g_i^T`` over the chunk's
queries (of every query head of the group), seeded by the gradient on the final state.

* :func:`_chunk_state_kernel` computes every ``U_c`` (or ``V_c``) and its normaliser at once,
  parallel over (feature block x value block x chunk, key/value head, batch row), and writes them
  to ``HS [B*HKV, NT, F, DV]`` / ``HZ [B*HKV, NT, F]`` fp32.
* :func:`_state_scan_kernel` turns them, in place, into the states each chunk reads (exclusive
  scan, forward or reverse) and writes the last one (``S_N`` / ``dS0``). It is elementwise over
  the ``F * DV + F`` numbers of a head's state, so it is parallel over small flat blocks of them
  and sequential only over chunks (a load, a multiply-add and a store per chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .blocks import (
    block_offsets,
    chunk_program,
    chunk_rows,
    decay_weights,
    dot,
    features,
    grad_rows,
    load_rows,
)

__all__ = ["_chunk_state_kernel", "_state_scan_kernel", "packed_sequence"]


@triton.jit
def packed_sequence(CU, seq):
    """``(first token (int64), length)`` of packed sequence ``seq``: ``CU [S + 1]`` int32
    cumulative lengths (flash-attention's ``cu_seqlens``)."""
    first = tl.load(CU + seq)
    return first.to(tl.int64), tl.load(CU + seq + 1) - first


@triton.jit
def _chunk_state_kernel(
    X, Y, DEN, C, HS, HZ, LG, CU,
    sxb, sxh, sxn, sxd, syb, syh, syn, syd,
    scale, eps, HX, HKV, GROUP, N, F, DV, NT,
    FEATURE: tl.constexpr, BACKWARD: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    """Grid ``(cdiv(F, BK) * cdiv(DV, BV) * NT, HKV, B)``: the ``[BK, BV]`` block of chunk ``c``'s
    local state and (value block 0) its ``[BK]`` normaliser.

    Forward: ``X = k [B, HKV, N, F]``, ``Y = v``: ``U = sum_j w_j phi(k_j) v_j^T``,
    ``z = sum_j w_j phi(k_j)`` (``w_j = gamma^(n-1-j)``). Backward: ``X = q [B, HQ, N, F]``
    (``HX = HQ``), ``Y = do``, over the ``GROUP`` query heads of the key/value head:
    ``V = sum_i w_i phi(q_i) g_i^T``, ``dz = sum_i w_i phi(q_i) c_i`` (``w_i = gamma^(i+1)``;
    ``g``, ``c`` from ``do``, ``den`` and the prepass ``C [B, HQ, N]``).

    ``VARLEN``: the batch axis is the ``S`` packed sequences of ``B = 1`` tensors (``CU [S + 1]``
    int32 ``cu_seqlens``): ``N`` is the packed length (the row stride of ``DEN``/``C``), the
    sequence's own length masks the rows, and a chunk past its end exits at once."""
    n_v = tl.cdiv(DV, BV)
    blk, i_c, hk, b64 = chunk_program(tl.cdiv(F, BK) * n_v)
    i_k, i_v = blk // n_v, blk % n_v
    offs_f, mask_f, offs_v, mask_v = block_offsets(i_k * BK, i_v * BV, F, DV, BK, BV)
    arange_t = tl.arange(0, BT)
    start = i_c * BT
    seq = b64  # the state's row: the batch row, or the packed sequence
    n = N
    if VARLEN:
        first, n = packed_sequence(CU, seq)
        if start >= n:
            return
        X += first * sxn
        Y += first * syn
        if BACKWARD:
            DEN += first
            C += first
        b64 = 0  # the tensors have one batch row
    offs_t, mask_t, rows = chunk_rows(start, arange_t, n)
    if HAS_DECAY:
        w_a, w_q, w_k, w_s = decay_weights(LG, hk, start, arange_t, n, BT, False)
    u = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    n_heads = 1
    if BACKWARD:
        n_heads = GROUP
    for hh in range(0, n_heads):
        h = hk.to(tl.int64)
        if BACKWARD:
            h = (hk * GROUP + hh).to(tl.int64)
        x_base = X + b64 * sxb + h * sxh
        y_base = Y + b64 * syb + h * syh
        xx, fx = features(x_base, rows, mask_t, sxn, offs_f, mask_f, sxd, scale, FEATURE)
        if BACKWARD:
            y, r, c = grad_rows(y_base, DEN + (b64 * HX + h) * N, C + (b64 * HX + h) * N, rows,
                                mask_t, offs_v, mask_v, syn, syd, eps, NORMALIZE)
            if HAS_DECAY:
                fx = fx * w_q[:, None]
            z += tl.sum(fx * c[:, None], 0)
            if NORMALIZE:  # phi(q_i) g_i^T = (r_i phi(q_i)) do_i^T
                fx = fx * r[:, None]
        else:
            y = load_rows(y_base, rows, mask_t, syn, offs_v, mask_v, syd)
            if HAS_DECAY:
                fx = fx * w_k[:, None]
            z += tl.sum(fx, 0)
        # [BK, BT] @ [BT, BV]: 16-bit operands for 16-bit inputs (tensor cores), fp32 sums
        u += dot(tl.trans(fx.to(X.dtype.element_ty)), y.to(X.dtype.element_ty), PRECISION, UPCAST)
    head = seq * HKV + hk
    s_off = (head * NT + i_c) * F * DV
    tl.store(HS + s_off + offs_f[:, None] * DV + offs_v[None, :], u,
             mask=mask_f[:, None] & mask_v[None, :])
    # (scalar conditions broadcast to tiles: the interpreter rejects scalar-and-tile masks)
    tl.store(HZ + (head * NT + i_c) * F + offs_f, z, mask=mask_f & ((offs_f * 0 + i_v) == 0))


@triton.jit
def _compose(d1, v1, d2, v2):
    """Two scan steps ``R -> d R + v``, first ``(d1, v1)`` then ``(d2, v2)``, as one."""
    return d1 * d2, v1 * d2 + v2


@triton.jit
def _walk_decay(LG, hk, pos, NT, N, REVERSE: tl.constexpr, BT: tl.constexpr):
    """``gamma^n`` of the chunk at walk position ``pos`` (``n`` its tokens: ``BT`` but for the
    last chunk), and that chunk's index."""
    if REVERSE:
        c = NT - 1 - pos
    else:
        c = pos
    return tl.exp(tl.load(LG + hk) * tl.minimum(N - c * BT, BT).to(tl.float32)), c


@triton.jit
def _state_scan_kernel(
    HS, HZ, S_IN, Z_IN, S_OUT, Z_OUT, LG, CU,
    HKV, N, NT, F, DV,
    HAS_IN: tl.constexpr, REVERSE: tl.constexpr, HAS_DECAY: tl.constexpr, STORE: tl.constexpr,
    VARLEN: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(cdiv(F * DV + F, BLOCK), HKV, B)``: ``BLOCK`` of the flat ``F * DV + F`` numbers
    (state then normaliser) of one head. Walks the chunks (``REVERSE``: last to first) carrying
    ``R`` (from ``S_IN [B, HKV, F, DV]`` / ``Z_IN [B, HKV, F]``, or 0): chunk ``c``'s slot of
    ``HS``/``HZ`` is replaced by ``R`` (``STORE``), then ``R = gamma^n R + (old slot)``; the last
    ``R`` goes to ``S_OUT`` / ``Z_OUT``. Forward this leaves the state entering each chunk and
    ``S_N``; reverse the gradient on the state leaving each chunk and ``dS0``.

    ``BC`` chunks per step: their slots are loaded at once (one memory latency per step, not per
    chunk) and the recurrence inside the step is an associative scan over the pairs
    ``(gamma^n, slot)`` (:func:`_compose`: products of decays, never their quotients, so a fast
    decay underflows to 0 instead of dividing by it).

    ``VARLEN``: the batch axis is the packed sequences (``CU [S + 1]``): the walk covers the
    sequence's own ``nt = cdiv(n, BT)`` chunks (none for an empty one: the carry goes straight
    to ``S_OUT``) of its slots, ``NT`` (the longest sequence's) apart."""
    hk = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64) * HKV + hk
    n = N
    nt = NT
    if VARLEN:
        n = packed_sequence(CU, tl.program_id(2))[1]
        nt = tl.cdiv(n, BT)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    is_s = e < F * DV
    is_z = (e >= F * DV) & (e < F * DV + F)
    ez = tl.where(is_z, e - F * DV, 0)
    if HAS_IN:
        r = tl.load(S_IN + head * F * DV + e, mask=is_s, other=0.0)
        r += tl.load(Z_IN + head * F + ez, mask=is_z, other=0.0)
    else:
        r = tl.zeros([BLOCK], dtype=tl.float32)
    step = tl.arange(0, BC)
    for p0 in range(0, nt, BC):
        # the walk positions of this step, each paired with the slot of the position before it
        # (the first one with the carry), so the inclusive scan gives the state entering each
        pos = p0 + step
        prev = pos - 1
        has_prev = (prev >= p0) & (prev < nt)
        d_prev = tl.full([BC], 1.0, dtype=tl.float32)
        if HAS_DECAY:
            d_prev = tl.where(has_prev, _walk_decay(LG, hk, prev, nt, n, REVERSE, BT)[0], 1.0)
        if REVERSE:
            c_prev = tl.where(has_prev, nt - 1 - prev, 0)
        else:
            c_prev = tl.where(has_prev, prev, 0)
        row = (head * NT + c_prev)[:, None]
        u_prev = tl.load(HS + row * F * DV + e[None, :], mask=has_prev[:, None] & is_s[None, :],
                         other=0.0)
        u_prev += tl.load(HZ + row * F + ez[None, :], mask=has_prev[:, None] & is_z[None, :],
                          other=0.0)
        d_all = tl.broadcast_to(d_prev[:, None], [BC, BLOCK])
        d_acc, s_acc = tl.associative_scan((d_all, u_prev), 0, _compose)
        into = d_acc * r[None, :] + s_acc  # [BC, BLOCK]: the state entering each position
        # the last position of the step: its slot, decay and entering state give the next carry
        last = tl.minimum(p0 + BC, nt) - 1
        if REVERSE:
            c_last = nt - 1 - last
        else:
            c_last = last
        u_last = tl.load(HS + (head * NT + c_last) * F * DV + e, mask=is_s, other=0.0)
        u_last += tl.load(HZ + (head * NT + c_last) * F + ez, mask=is_z, other=0.0)
        into_last = tl.sum(tl.where((pos == last)[:, None], into, 0.0), 0)
        if HAS_DECAY:
            into_last = into_last * _walk_decay(LG, hk, last, nt, n, REVERSE, BT)[0]
        if STORE:
            valid = (pos < nt)[:, None]
            if REVERSE:
                c_all = tl.where(pos < nt, nt - 1 - pos, 0)
            else:
                c_all = tl.where(pos < nt, pos, 0)
            row = (head * NT + c_all)[:, None]
            tl.store(HS + row * F * DV + e[None, :], into, mask=valid & is_s[None, :])
            tl.store(HZ + row * F + ez[None, :], into, mask=valid & is_z[None, :])
        r = into_last + u_last
    tl.store(S_OUT + head * F * DV + e, r, mask=is_s)
    tl.store(Z_OUT + head * F + ez, r, mask=is_z)
