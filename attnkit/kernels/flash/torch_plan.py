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
#: Query rows per chunk of a stacked band (half as many for bands narrower than this), by
#: executor (``torch_stack``). Each chunk computes ``n + width`` keys per row for ``width + 1``
#: visible ones. The matmul forward ran N = 4096, width 255 in 14.6 / 14.4 / 14.9 / 14.5 ms at
#: n = 32 / 40 / 48 / 64 (fp32, 2 threads, side by side); the fused kernel ran alike at 32 and
#: 64, but its backward's dK/dV per call grow with ``L / n``, so it keeps 64.
STACK_CHUNK_MATMUL, STACK_CHUNK_FUSED = 32, 64


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


def _plan(pattern: Band, qs: int, nq: int, ks: int, nk: int, chunk: int = STACK_CHUNK_FUSED):
    """Yield the pieces of one sequence (rows ``qs + [0, nq)``, keys ``ks + [0, nk)``); a bounded
    band's stack chunks have ``chunk`` rows (:func:`_stack_chunk`)."""
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
        yield from _plan_stacked(pattern, qs, nq, ks, nk, width, chunk)
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


def _stack_chunk(width: int, chunk: int) -> int:
    """Query rows per chunk of a stacked band of ``width`` (= left + right) keys beyond the
    diagonal: a chunk computes ``n + width`` keys per row for ``width + 1`` visible ones."""
    return chunk if width >= chunk else max(8, chunk // 2)


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


def _plan_stacked(pattern: Band, qs: int, nq: int, ks: int, nk: int, width: int, chunk: int):
    """A bounded band as chunks of ``n`` rows, each over its ``L = n + width`` keys.

    * rows whose window starts at or before key 0 (``i + shift - left <= 0``):
      :func:`_plan_prefix` (no mask, the kernel's causal flag);
    * whole chunks whose keys lie inside the sequence: one ``stack`` piece (chunks stacked on the
      batch axis, keys as overlapping strided windows, one shared ``[n, L]`` band, no copy of
      q/k/v; ``torch_stack`` runs it in slabs);
    * the rest (the last rows, windows cut by the sequence end): one masked rectangle per chunk.

    Stack rows are disjoint from every other piece, so nothing is merged there. Work is
    ``L / (width + 1)`` of the visited pairs: 1.25x for width 255 and ``n = 64``. Measured side
    by side at N = 4096, width 255, fp32, 2 threads (fused-kernel calls only): n = 32 / 64 / 128 /
    256 ran 4.4-4.9x / 4.4-4.8x / 4.1x / 3.1x faster than SDPA causal (the matmul executor:
    ``STACK_CHUNK_MATMUL``)."""
    n = _stack_chunk(width, chunk)
    L = n + width
    shift = nk - nq
    head = min(nq, max(0, pattern.left - shift + 1))  # rows whose window starts at key <= 0
    yield from _plan_prefix(qs, head, ks, nk, shift + pattern.right)
    # whole chunks from ``head`` on whose window ends inside the keys: c0 + n + shift + right <= nk
    stop = min(nq, nk - shift - pattern.right)
    c0 = head
    if c0 + n <= stop:
        m = (stop - c0) // n
        a0 = c0 + shift - pattern.left
        band = pattern.block(c0, c0 + n, a0, a0 + L, nq, nk)  # the same [n, L] for every chunk
        yield _Piece(qs + c0, qs + c0 + m * n, ks + a0, ks + a0 + L + (m - 1) * n, "stack", band)
        c0 += m * n
    for r0 in range(c0, nq, n):
        r1 = min(r0 + n, nq)
        lo, hi = pattern.key_range(r0, r1, nq, nk)
        piece = _rect(pattern, qs, ks, r0, r1, lo, hi, nq, nk)
        if piece is not None:
            yield piece


def _pieces(pattern, nq, nk, cu_q, cu_k, chunk: int = STACK_CHUNK_FUSED):
    for qs, qe, ks, ke in _segments(nq, nk, cu_q, cu_k):
        yield from _plan(pattern, qs, qe - qs, ks, ke - ks, chunk)



