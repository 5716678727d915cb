"""Triton helpers shared by the flash kernels: bounds, masks, tile loads and the score slot. The
key walk that the forward and the dQ kernels both run is in :mod:`.kernels_walk`; the dK/dV
kernel walks the transpose (``kernels_bwd.py``).

Conventions (all kernels):
* positions are bottom-right aligned: query ``i`` sits at key position ``i + nk - nq`` of its own
  sequence; ``HAS_LEFT``/``HAS_RIGHT`` switch the two band limits ``WIN_L``/``WIN_R`` on;
* scores live in the log2 domain (``qk_scale = scale * log2(e)``) so the softmax uses ``exp2``;
  the LSE the kernels read and write is in natural-log units;
* a row that sees no key keeps ``m = -inf`` and ``l = 0``: it writes ``o = 0`` and ``lse = -inf``,
  and the backward maps ``lse = -inf`` to ``+inf`` so its probabilities are exactly 0;
* base offsets are int64 (``B*H*N*D`` may pass 2^31); offsets inside a tile stay int32;
* optional inputs are ``None`` pointers with a flag derived from them by the launcher
  (``VARLEN``: ``CU_Q``/``CU_K``; ``HAS_KPM``: the ``[B, Nk]`` uint8 key mask ``KPM`` and its
  span ``KV_LO``/``KV_HI``, which shrinks the loop to the unpadded keys; ``SPARSE``: the lists).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, NQ, NK, VARLEN: tl.constexpr):
    """(q_start, nq, k_start, nk) of batch row / packed sequence ``b``."""
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
def _list_row(NUM, lay, n_blocks, max_entries, start, BS: tl.constexpr, BLOCK: tl.constexpr):
    """Where the block list of the layout block holding position ``start`` begins: ``(entry, num,
    offsets [BLOCK] of the tile inside its layout block)`` for block lists ``NUM [L, n_blocks]``,
    ``IDX``/``PART [L, n_blocks, max_entries]``."""
    blk = start // BS
    entry = (lay * n_blocks + blk).to(tl.int64) * max_entries
    num = tl.load(NUM + lay * n_blocks + blk)
    return entry, num, start - blk * BS + tl.arange(0, BLOCK)


@triton.jit
def _list_entry(IDX, PART, entry, i):
    """The ``i``-th listed layout block and its element mask (``-1``: a full block)."""
    return tl.load(IDX + entry + i), tl.load(PART + entry + i)


@triton.jit
def _block_mask(PMASK, part, rows_in, cols_in, BS: tl.constexpr):
    """Element mask of a partial layout block, indexed ``[rows_in, cols_in]`` (pre-shaped)."""
    return tl.load(PMASK + part.to(tl.int64) * (BS * BS) + rows_in * BS + cols_in) != 0


# --------------------------------------------------------------------------------------------
# The score slot: the one place where a score modification enters each kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh from exp2 (the interpreter and every Triton version have exp2), through
    ``e^(-2|x|)`` so that nothing overflows at large |x|."""
    t = tl.exp2(tl.abs(x) * -2.8853900817779268)  # e^(-2|x|): 2 * log2(e)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _score(s, q_pos, k_pos, slope, cap, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scaled scores ``s = scale * log2(e) * q.k`` (a ``[BM, BN]`` tile or its transpose) -> the
    scores the softmax sees, in the same log2 units:

    * soft-capping (Gemma 2): ``cap * tanh(s / cap)`` with ``cap = softcap * log2(e)``;
    * ALiBi, after it: ``- slope * |q_pos - k_pos|`` with ``slope`` in log2 units and ``q_pos`` the
      query's aligned key position (``i + nk - nq``), pre-shaped against ``k_pos`` like ``s``.

    Every kernel (forward, dQ, dK/dV) calls this one function, and :func:`_dscore` for the chain
    rule, so a new modification is added here and nowhere else in the kernels."""
    if HAS_SOFTCAP:
        s = cap * _tanh(s / cap)
    if HAS_ALIBI:
        s = s - slope * tl.abs(q_pos - k_pos).to(tl.float32)
    return s


@triton.jit
def _dscore(ds, s, cap, HAS_SOFTCAP: tl.constexpr):
    """Chain rule through :func:`_score`: the gradient on the raw score ``s`` from the gradient
    ``ds`` on the modified one (ALiBi is additive: nothing to do)."""
    if HAS_SOFTCAP:
        t = _tanh(s / cap)
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _query_block(Q, K, V, KV_LO, KV_HI, CU_Q, CU_K, sqb, sqh, sqn, skb, skh,
                 skn, svb, svh, svn, smb, GROUP, NQ, NK,
                 HAS_KPM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
                 LONGEST_FIRST: tl.constexpr):
    """:func:`_query_block_at` for this program's query block: in grid order, or with
    ``LONGEST_FIRST`` (a right band limit: causal, windows) the last query block first, as FA2/FA3
    schedule causal work, so that no long programs are left for the end of the grid."""
    pid_m = tl.program_id(0)
    if LONGEST_FIRST:
        pid_m = tl.num_programs(0) - 1 - pid_m
    return _query_block_at(pid_m, Q, K, V, KV_LO, KV_HI, CU_Q, CU_K, sqb, sqh, sqn, skb,
                           skh, skn, svb, svh, svn, smb, GROUP, NQ, NK, HAS_KPM, VARLEN, BLOCK_M)


@triton.jit
def _query_block_at(pid_m, Q, K, V, KV_LO, KV_HI, CU_Q, CU_K, sqb, sqh, sqn, skb, skh,
                    skn, svb, svh, svn, smb, GROUP, NQ, NK,
                    HAS_KPM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    """What the forward and dQ programs share before they walk: the program's batch row ``b`` and
    head ``h``, the sequence bounds, the start of query block ``pid_m``, int64 base pointers of its
    sequence's q rows and of K/V, the key mask's row offset, and the unpadded key span.
    ``bb`` is 0 when packed (one batch row; ``b`` then indexes the sequence)."""
    h = tl.program_id(1)  # heads on y, batch rows (or packed sequences) on z: 65535 each
    b = tl.program_id(2)
    q_start, nq, k_start, nk = _seq_bounds(b, CU_Q, CU_K, NQ, NK, VARLEN)
    start_m = pid_m * BLOCK_M
    bb = b.to(tl.int64)
    if VARLEN:
        bb = bb * 0
    hk = h // GROUP
    q_base = Q + bb * sqb + h.to(tl.int64) * sqh + q_start.to(tl.int64) * sqn
    k_base = K + bb * skb + hk.to(tl.int64) * skh + k_start.to(tl.int64) * skn
    v_base = V + bb * svb + hk.to(tl.int64) * svh + k_start.to(tl.int64) * svn
    kv_lo = nk * 0
    kv_hi = nk
    if HAS_KPM:
        kv_lo = tl.load(KV_LO + b)
        kv_hi = tl.load(KV_HI + b)
    return b, h, q_start, nq, nk, start_m, bb, q_base, k_base, v_base, bb * smb, kv_lo, kv_hi


@triton.jit
def _score_mods(bb, h, ALIBI, sab, sah, softcap, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """``(slope, cap)`` of this batch row and query head in log2 units (0 when unused): the ALiBi
    slope from ``ALIBI [B or 1, Hq]`` fp32 and the soft-cap ``softcap * log2(e)``."""
    slope = 0.0
    cap = 1.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + bb * sab + h.to(tl.int64) * sah) * 1.4426950408889634
    if HAS_SOFTCAP:
        cap = softcap * 1.4426950408889634
    return slope, cap
