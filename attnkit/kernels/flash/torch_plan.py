"""The piece planner of the fused CPU path (:mod:`.torch_fused`): which (query rows, key range)
rectangles a band is cut into, and in which mode each one runs. Pure index arithmetic on the
band's definition; no kernel is called here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import Band
from .torch_band import _segments

__all__: list[str] = []  # private to torch_fused.py (and its tests)

#: Query rows per chunk of a bounded band. The CPU kernel picks 64-row query tiles from 192 rows
#: on (32 below): a chunk as wide as the band keeps the three edge pieces large.
_MAX_CHUNK, _MIN_BAND = 512, 32
#: Rows of one stacked kernel call: bounds the gathered copies of q/k/v (and the flip's).
_MAX_STACK_ROWS = 4096
#: Most query rows per chunk of a stacked band.
_STACK_CHUNK = 512


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
        t = shift + right  # query i sees keys j <= i + t
        first = max(0, -t)  # rows before it see nothing
        if first >= nq:
            return
        if t > 0:
            yield _Piece(qs + first, qs + nq, ks, ks + min(t, nk), "full")
        if max(t, 0) < nk:
            yield _Piece(qs + first, qs + nq, ks + max(t, 0), ks + nk, "causal")
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


def _plan_stacked(pattern: Band, qs: int, nq: int, ks: int, nk: int, width: int):
    """A bounded band as chunks of ``n`` rows, each over its ``n + width`` keys. The chunks whose
    keys lie inside the sequence are one ``stack`` piece (a single kernel call: rows stacked on
    the batch axis, keys as overlapping strided windows, one shared ``[n, n + width]`` mask);
    the rest are masked rectangles. Work is ``(n + width) / (width + 1)`` of the visited pairs
    (3 for width 255 and n = 512) with no merge or flip. The kernel packs the overlapping windows
    (``L / n`` times the keys), so a call takes at most ``_MAX_STACK_ROWS`` rows. Measured on
    the loaded 2-core machine, the earlier flip/causal/interior pieces with LSE merges ran at
    0.6-1.3x SDPA causal, this 1.4-2.7x (benchmarks/NOTES.md)."""
    # twice the band's power of two, 32..512 rows: measured side by side at N = 4096, width 255
    # (2 cores, loaded): 64-row chunks 1.7-2.0x SDPA causal, 256 2.2-2.4x, 512 2.7x; fewer,
    # larger windows pack fewer duplicated keys than they waste on masked pairs
    n = min(_STACK_CHUNK, max(32, 2 ** int(math.log2(width + 1)) * 2))
    L = n + width
    shift = nk - nq
    run: list[int] = []

    def flush():
        if run:
            c0, a0 = run[0], run[0] + shift - pattern.left
            band = _rect(pattern, 0, 0, c0, c0 + n, a0, a0 + L, nq, nk).band
            yield _Piece(qs + c0, qs + run[-1] + n, ks + a0, ks + a0 + L + (len(run) - 1) * n,
                         "stack", band)
            run.clear()

    for c0 in range(0, nq, n):
        c1 = min(c0 + n, nq)
        a0 = c0 + shift - pattern.left  # row 0's first key; row a sees keys a0 + a .. + width
        if c1 - c0 == n and a0 >= 0 and a0 + L <= nk:
            run.append(c0)
            if len(run) * n >= _MAX_STACK_ROWS:  # the kernel packs the windows: bound the copy
                yield from flush()
            continue
        yield from flush()
        piece = _rect(pattern, qs, ks, c0, c1, a0, a0 + L, nq, nk)
        if piece is not None:
            yield piece
    yield from flush()


def _pieces(pattern, nq, nk, cu_q, cu_k):
    for qs, qe, ks, ke in _segments(nq, nk, cu_q, cu_k):
        yield from _plan(pattern, qs, qe - qs, ks, ke - ks)



