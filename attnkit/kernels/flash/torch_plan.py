"""The piece planner of the fused CPU path (:mod:`.torch_fused`): which (query rows, key range)
rectangles a band is cut into, and in which mode each one runs. Pure index arithmetic on the
band's definition; no kernel is called here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import Band
from .torch_band import _segments

__all__: list[str] = []  # private to torch_fused.py (and its tests)

#: Query rows per chunk of a bounded band. The CPU kernel picks 64-row query tiles from 192 rows
#: on (32 below): a chunk as wide as the band keeps the three edge pieces large.
_MAX_CHUNK, _MIN_BAND = 512, 32
#: Rows of pieces stacked into one kernel call (``torch_fused._batches``): bounds the gathered
#: copies of q/k/v (and the flip's).
_MAX_BATCH_ROWS = 4096
#: Rows of one ``stack`` piece (one forward kernel call): its output is copied into the result,
#: so this bounds the extra memory (512 rows: 1 MiB at H = 8, D = 64, fp32; measured peak at
#: N = 4096 SDPA-flash's within 1 MiB) against the number of calls (each a parallel region, which
#: costs milliseconds on a loaded machine).
_MAX_STACK_ROWS = 512
#: Query rows per chunk of a stacked band (32 for bands narrower than this).
_STACK_CHUNK = 64


@dataclass
class _Piece:
    """Query rows ``[r0, r1)`` x keys ``[k0, k1)`` (absolute indices along N)."""

    r0: int
    r1: int
    k0: int
    k1: int
    mode: str  # "full" | "causal" | "flip" | "mask"
    band: torch.Tensor | None = None  # bool [c, L] for "mask"


def _rect(pattern: Band, qs: int, ks: int, c0: int, c1: int, lo: int, hi: int, nq: int, nk: int):
    """A ``mask``/``full`` piece for rows ``[c0, c1)`` x keys ``[lo, hi)`` of one sequence (keys
    clipped to it), or ``None`` when no pair of it is visible."""
    lo, hi = max(lo, 0), min(hi, nk)
    if hi <= lo or c1 <= c0:
        return None
    # the band's definition on this rectangle only (Band.visible would be N x N)
    pos = torch.arange(c0, c1)[:, None] + (nk - nq)
    j = torch.arange(lo, hi)[None, :]
    ok = torch.ones(c1 - c0, hi - lo, dtype=torch.bool)
    if pattern.left is not None:
        ok &= j >= pos - pattern.left
    if pattern.right is not None:
        ok &= j <= pos + pattern.right
    if not ok.any():
        return None
    if ok.all():
        return _Piece(qs + c0, qs + c1, ks + lo, ks + hi, "full")
    return _Piece(qs + c0, qs + c1, ks + lo, ks + hi, "mask", ok)


def _plan(pattern: Band, qs: int, nq: int, ks: int, nk: int):
    """Yield the pieces of one sequence (rows ``qs + [0, nq)``, keys ``ks + [0, nk)``)."""
    if nq == 0 or nk == 0:
        return
    shift, left, right = nk - nq, pattern.left, pattern.right
    if left is None:
        if right is None:
            yield _Piece(qs, qs + nq, ks, ks + nk, "full")
            return
        yield from _plan_prefix(qs, nq, ks, nk, shift + right)  # row i sees j <= i + t
        return
    width = left + (right if right is not None else nk)
    if right is not None:
        yield from _plan_stacked(pattern, qs, nq, ks, nk, width)
        return
    if width < _MIN_BAND:  # narrow band: one masked rectangle per chunk
        c = 64
        for c0 in range(0, nq, c):
            c1 = min(c0 + c, nq)
            lo, hi = pattern.key_range(c0, c1, nq, nk)
            piece = _rect(pattern, qs, ks, c0, c1, lo, hi, nq, nk)
            if piece is not None:
                yield piece
        return
    c = min(_MAX_CHUNK, width)
    for c0 in range(0, nq, c):
        c1 = min(c0 + c, nq)
        n = c1 - c0
        a0 = c0 + shift - left  # row 0's first key; row a sees keys a0 + a ...
        # left edge [a0, a0 + n): visible iff offset >= row (n <= width keeps the right bound)
        if a0 >= 0 and a0 + n <= nk:
            yield _Piece(qs + c0, qs + c1, ks + a0, ks + a0 + n, "flip")
        else:
            piece = _rect(pattern, qs, ks, c0, c1, a0, a0 + n, nq, nk)
            if piece is not None:
                yield piece
        if right is None:
            piece = _rect(pattern, qs, ks, c0, c1, a0 + n, nk, nq, nk)
            if piece is not None:
                yield piece
            continue
        b0 = c0 + shift + right  # row 0's last key; row a sees keys ... b0 + a
        piece = _rect(pattern, qs, ks, c0, c1, a0 + n, b0, nq, nk)  # interior: full
        if piece is not None:
            yield piece
        if b0 >= 0 and b0 + n <= nk and b0 >= a0 + n:
            yield _Piece(qs + c0, qs + c1, ks + b0, ks + b0 + n, "causal")
        else:
            piece = _rect(pattern, qs, ks, c0, c1, max(b0, a0 + n), b0 + n, nq, nk)
            if piece is not None:
                yield piece


def _stack_chunk(width: int) -> int:
    """Query rows per chunk of a stacked band of ``width`` (= left + right) keys beyond the
    diagonal: a chunk computes ``n + width`` keys per row for ``width + 1`` visible ones."""
    return _STACK_CHUNK if width >= _STACK_CHUNK else max(16, _STACK_CHUNK // 2)


def _plan_prefix(qs: int, r1: int, ks: int, nk: int, t: int):
    """Rows ``[0, r1)`` of one sequence where row ``i`` sees keys ``[0, i + t]`` (clipped to
    ``nk``): a mask-free ``full`` piece for keys ``[0, t)`` and a top-left ``causal`` one for the
    rest (the causal band's whole plan, and a bounded band's first rows)."""
    first = max(0, -t)  # rows before it see nothing
    if first >= r1 or nk == 0:
        return
    if t > 0:
        yield _Piece(qs + first, qs + r1, ks, ks + min(t, nk), "full")
    # keys up to the last row's reach only: the backward allocates dK/dV for every key it is
    # given (a window's first rows over all N keys cost two [B, H, N, D] buffers, measured)
    k1 = min(nk, r1 + t)
    if max(t, 0) < k1:
        yield _Piece(qs + first, qs + r1, ks + max(t, 0), ks + k1, "causal")


def _plan_stacked(pattern: Band, qs: int, nq: int, ks: int, nk: int, width: int):
    """A bounded band as chunks of ``n`` rows, each over its ``L = n + width`` keys.

    * rows whose window starts at or before key 0 (``i + shift - left <= 0``):
      :func:`_plan_prefix` (no mask, the kernel's causal flag);
    * whole chunks whose keys lie inside the sequence: ``stack`` pieces of at most
      ``_MAX_STACK_ROWS`` rows (one kernel call each: chunks stacked on the batch axis, keys as
      overlapping strided windows, one shared ``[n, L]`` mask, no copy of q/k/v);
    * the rest (the last rows, windows cut by the sequence end): one masked rectangle per chunk.

    Stack rows are disjoint from every other piece, so nothing is merged there. Work is
    ``L / (width + 1)`` of the visited pairs: 1.25x for width 255 and ``n = 64``. Measured side
    by side at N = 4096, width 255, fp32, 2 threads (kernel calls only): n = 32 / 64 / 128 /
    256 ran 4.4-4.9x / 4.4-4.8x / 4.1x / 3.1x faster than SDPA causal; the kernel keeps its
    small tiles in cache (2x the pair rate of one N = 4096 call)."""
    n = _stack_chunk(width)
    L = n + width
    shift = nk - nq
    head = min(nq, max(0, pattern.left - shift + 1))  # rows whose window starts at key <= 0
    yield from _plan_prefix(qs, head, ks, nk, shift + pattern.right)
    # whole chunks from ``head`` on whose window ends inside the keys: c0 + n + shift + right <= nk
    stop = min(nq, nk - shift - pattern.right)
    per_call = max(1, _MAX_STACK_ROWS // n)
    c0 = head
    band = None
    while c0 + n <= stop:
        m = min(per_call, (stop - c0) // n)
        if band is None:  # the same [n, L] mask for every chunk
            band = pattern.block(c0, c0 + n, c0 + shift - pattern.left,
                                 c0 + shift - pattern.left + L, nq, nk)
        a0 = c0 + shift - pattern.left
        yield _Piece(qs + c0, qs + c0 + m * n, ks + a0, ks + a0 + L + (m - 1) * n, "stack", band)
        c0 += m * n
    for r0 in range(c0, nq, n):
        r1 = min(r0 + n, nq)
        lo, hi = pattern.key_range(r0, r1, nq, nk)
        piece = _rect(pattern, qs, ks, r0, r1, lo, hi, nq, nk)
        if piece is not None:
            yield piece


def _pieces(pattern, nq, nk, cu_q, cu_k):
    for qs, qe, ks, ke in _segments(nq, nk, cu_q, cu_k):
        yield from _plan(pattern, qs, qe - qs, ks, ke - ks)



