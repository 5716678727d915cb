"""Host-side planning of context-parallel attention: which (query chunk, key chunk) pairs a
pattern touches, how each pair is expressed as one :func:`attnkit.attention` call, and which ranks
must send their keys/values to which.

Vocabulary. The global sequence of ``N`` tokens is cut into equal *chunks*:

* ``layout="contiguous"``: ``world`` chunks of ``n = N / world``; rank ``r`` holds chunk ``r``;
* ``layout="zigzag"``: ``2 * world`` chunks of ``n / 2``; rank ``r`` holds chunks ``r`` and
  ``2 * world - 1 - r`` (in that order inside its shard), which balances causal work.

A rank's *shard* is the concatenation of its chunks (``[B, H, n, D]``). Context parallelism is
self-attention over the whole sequence, so globally ``Nq = Nk = N`` and query ``i`` sits at key
position ``i``: a pattern's offsets are relative to the diagonal.

Expressing a chunk pair. For query chunk ``a`` and key chunk ``b`` of length ``c`` let
``d = (a - b) * c`` (how far the queries sit past the keys). A band pattern ``(left, right)``
lets local query ``i`` see local key ``j`` iff ``d - left <= j - i <= d + right``. attnkit's band
patterns with ``Nq = Nk`` express exactly ``-L <= j - i <= R`` with ``L, R >= 0`` (or unbounded),
so when the visible band ``[lo, hi] = [d - left, d + right]`` contains the diagonal the pair is
one call on the whole chunks. When it lies strictly right of the diagonal (``lo > 0``), queries
``i >= c - lo`` and keys ``j < lo`` see nothing: dropping them re-centres the band on the diagonal
of the ``(c - lo) x (c - lo)`` sub-block, ``SlidingWindow(0, hi - lo)``. Strictly left (``hi < 0``)
is the mirror image: queries ``[-hi, c)`` against keys ``[0, c + hi)`` with
``SlidingWindow(hi - lo, 0)``. Rows cut off get no contribution from that pair (the LSE merge
treats them as ``lse = -inf``). BlockSparse pairs take the layout's block rows/columns of the two
chunks; with ``causal=True`` a key chunk before the query chunk is fully visible, the same chunk
keeps ``causal=True`` (its own diagonal) and a later chunk is empty.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, replace

from .. import BlockSparse, Causal, Dense, Pattern, SlidingWindow  # attnkit's public API only

__all__ = ["LAYOUTS", "Pair", "Plan", "plan", "chunks_of", "check_layout", "take_rows"]

#: The shard layouts :func:`plan` accepts.
LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: object) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout  # type: ignore[return-value]


def chunks_of(rank: int, world: int, layout: str) -> tuple[int, ...]:
    """Global chunk ids held by ``rank``, in the order they sit in its shard."""
    if layout == "contiguous":
        return (rank,)
    return (rank, 2 * world - 1 - rank)


def _owner(chunk: int, world: int, layout: str) -> tuple[int, int]:
    """``(rank, index inside that rank's shard)`` of a global chunk."""
    if layout == "contiguous":
        return chunk, 0
    return (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)


@dataclass(frozen=True)
class Pair:
    """One :func:`attnkit.attention` call of a rank: its queries ``q_rows`` (positions inside its
    own shard) against ``k_cols`` of the rows of rank ``src``'s shard it receives (its own shard
    when ``src`` is itself; else positions in :func:`take_rows` of ``Plan.ranges[rank][src]``),
    under ``pattern``.

    ``visited`` is the number of (query, key) pairs the call computes per (batch row, head).
    """

    src: int
    q_rows: tuple[int, int]
    k_cols: tuple[int, int]
    pattern: Pattern
    visited: float


def _band(lo: int | None, hi: int | None, c: int) -> Pattern:
    """The attnkit pattern for ``lo <= j - i <= hi`` on an ``Nq = Nk <= c`` block
    (``lo <= 0 <= hi``; ``None`` = unbounded)."""
    if lo is None and hi is None:
        return Dense()
    if lo is None and hi == 0:
        return Causal()
    # An unbounded side becomes a window of the chunk length: wide enough, and a small int for
    # the kernels' window arguments.
    return SlidingWindow(c if lo is None else -lo, c if hi is None else hi)


def _band_pair(pattern: Pattern, a: int, b: int, c: int):
    """``(q0, q1, k0, k1, pattern)`` inside chunk ``a`` (queries) and ``b`` (keys), or ``None``."""
    d = (a - b) * c
    lo = None if pattern.left is None else d - pattern.left
    hi = None if pattern.right is None else d + pattern.right
    if (hi is not None and hi < -(c - 1)) or (lo is not None and lo > c - 1):
        return None  # the band misses the c x c block
    # A bound beyond the block is no bound: the cheaper Dense/Causal kernels then apply.
    if lo is not None and lo <= -(c - 1):
        lo = None
    if hi is not None and hi >= c - 1:
        hi = None
    if lo is not None and lo > 0:  # strictly right of the diagonal: drop keys < lo, queries >= c - lo
        return 0, c - lo, lo, c, _band(0, None if hi is None else hi - lo, c)
    if hi is not None and hi < 0:  # strictly left: drop queries < -hi, keys >= c + hi
        return -hi, c, 0, c + hi, _band(None if lo is None else lo - hi, 0, c)
    return 0, c, 0, c, _band(lo, hi, c)


# Sub-patterns of a BlockSparse pattern, per (chunk size, a, b): built once per pattern object so
# their compiled block lists are reused across calls (and across layers).
_SUB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sparse_pair(pattern: BlockSparse, a: int, b: int, c: int):
    key = (c, a, b)
    cache = _SUB.setdefault(pattern, {})
    if key in cache:
        return cache[key]
    bs = pattern.block_size
    if pattern.causal and b > a:
        cache[key] = None
        return None
    rows = slice(a * c // bs, (a + 1) * c // bs)
    cols = slice(b * c // bs, (b + 1) * c // bs)
    layout = pattern.layout[:, :, rows, cols]
    out = None
    if bool(layout.any()):
        masks = None
        if pattern.element_masks is not None:
            part, emasks = pattern.element_masks
            masks = (part[:, rows, cols].contiguous(), emasks)
        sub = BlockSparse(layout.contiguous(), bs, causal=pattern.causal and a == b, element_masks=masks)
        if sub.visited_pairs(c, c) > 0:  # element masks may empty a block row set entirely
            out = (0, c, 0, c, sub)
    cache[key] = out
    return out


def _check_pattern(pattern: object, seq_len: int, chunk: int, world: int, layout: str) -> Pattern:
    if pattern is None:
        return Dense()
    if isinstance(pattern, BlockSparse):
        bs = pattern.block_size
        if chunk % bs:
            raise ValueError(
                f"pattern: BlockSparse block_size = {bs} must divide the chunk length {chunk} "
                f"(N = {seq_len}, world = {world}, layout = {layout!r}: chunks of N / "
                f"{'world' if layout == 'contiguous' else '(2 * world)'})"
            )
        r, c = pattern.layout.shape[-2:]
        if (r, c) != (seq_len // bs, seq_len // bs):
            raise ValueError(
                f"pattern: the BlockSparse layout has {r} x {c} blocks; context parallelism needs the "
                f"layout of the whole sequence, {seq_len // bs} x {seq_len // bs} (N = {seq_len}, "
                f"block_size = {bs})"
            )
        return pattern
    if type(pattern) in (Dense, Causal, SlidingWindow):
        return pattern  # type: ignore[return-value]
    raise TypeError(
        "pattern must be attnkit.Dense(), Causal(), SlidingWindow(left, right) or BlockSparse(...) "
        f"(linear attention and other patterns are not supported), got {type(pattern).__name__} "
        f"{pattern!r}"
    )


@dataclass(frozen=True)
class Plan:
    """What every rank computes and sends for one ``(pattern, N, world, layout)``.

    * ``pairs[r]``: the :class:`Pair` calls of rank ``r`` (its own shard first);
    * ``recvs[r]`` / ``sends[r]``: the ranks whose keys/values ``r`` receives / the ranks it sends
      its own keys/values to (point-to-point, nothing for shards the pattern never touches);
    * ``ranges[r][s]``: the row ranges ``((lo, hi), ...)`` of rank ``s``'s shard that rank ``r``
      needs (the union of its pairs' key columns, merged): only those rows travel, concatenated
      (:func:`take_rows`), so a window shorter than a shard moves just the keys within the window;
    * ``rounds[r]``: ``{k: (send_to or None, recv_from or None)}`` for ``k = 1 .. world - 1``
      where rank ``r`` sends to ``(r + k) % world`` and receives from ``(r - k) % world``; only
      rounds with something to do are listed. Every rank walks the rounds in increasing ``k``.
    """

    seq_len: int
    world: int
    layout: str
    shard_len: int
    chunk_len: int
    pairs: tuple[tuple[Pair, ...], ...]
    recvs: tuple[tuple[int, ...], ...]
    sends: tuple[tuple[int, ...], ...]
    ranges: tuple[dict, ...]
    rounds: tuple[dict, ...]

    def pairs_computed(self, rank: int) -> float:
        """(query, key) pairs rank ``rank`` computes per (batch row, head) in the forward."""
        return sum(p.visited for p in self.pairs[rank])

    def bytes_sent(self, rank: int, *, batch: int, kv_heads: int, head_dim: int, element_size: int,
                   padding: bool = False, backward: bool = False, grad_element_size: int = 4) -> int:
        """Bytes rank ``rank`` sends: the rows ``ranges[dst][rank]`` of its ``[2, B, Hkv, n, D]``
        keys/values to each ``dst`` of ``sends`` (plus those rows of the ``[B, n]`` uint8 key mask
        with ``padding``). With ``backward``, the backward pass on top: the same rows again (they
        are re-fetched, not kept) and the key/value gradients (``grad_element_size``, fp32 by
        default) of every slice it received back to its owner."""
        row = 2 * batch * kv_heads * head_dim
        kv_row = row * element_size + (batch if padding else 0)
        rows_out = sum(self._rows(dst, rank) for dst in self.sends[rank])
        total = kv_row * rows_out
        if backward:
            rows_in = sum(self._rows(rank, src) for src in self.recvs[rank])
            total += kv_row * rows_out + row * grad_element_size * rows_in
        return total

    def _rows(self, dst: int, src: int) -> int:
        return sum(hi - lo for lo, hi in self.ranges[dst][src])


def _union(cols: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged ``[lo, hi)`` intervals covering ``cols`` (touching ones merge)."""
    out: list[list[int]] = []
    for lo, hi in sorted(cols):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _remap(cols: tuple[int, int], pieces) -> tuple[int, int]:
    """Shard columns ``cols`` (inside one piece) as positions in the concatenated pieces."""
    offset = 0
    for lo, hi in pieces:
        if lo <= cols[0] and cols[1] <= hi:
            return cols[0] - lo + offset, cols[1] - lo + offset
        offset += hi - lo
    raise AssertionError(f"{cols} is not inside {pieces}")  # _union covers every pair


def take_rows(x, pieces, dim: int):
    """The rows ``pieces = ((lo, hi), ...)`` of ``x`` along ``dim``, concatenated (no copy when
    they are all of ``x``): what a rank sends of its shard."""
    import torch

    if x is None:
        return None
    if len(pieces) == 1 and pieces[0] == (0, x.shape[dim]):
        return x
    return torch.cat([x.narrow(dim, lo, hi - lo) for lo, hi in pieces], dim).contiguous()


@functools.lru_cache(maxsize=256)
def _plan(pattern: Pattern, seq_len: int, world: int, layout: str) -> Plan:
    nchunks = world if layout == "contiguous" else 2 * world
    c = seq_len // nchunks
    n = seq_len // world
    pairs: list[list[Pair]] = []
    for r in range(world):
        mine: list[Pair] = []
        for qi, a in enumerate(chunks_of(r, world, layout)):
            for b in range(nchunks):
                spec = (_sparse_pair(pattern, a, b, c) if isinstance(pattern, BlockSparse)
                        else _band_pair(pattern, a, b, c))
                if spec is None:
                    continue
                q0, q1, k0, k1, pat = spec
                src, ki = _owner(b, world, layout)
                visited = pat.visited_pairs(q1 - q0, k1 - k0)
                mine.append(Pair(src, (qi * c + q0, qi * c + q1), (ki * c + k0, ki * c + k1), pat,
                                 visited))
        mine.sort(key=lambda p: p.src != r)  # local work first: it hides the first transfer
        pairs.append(mine)
    recvs = [tuple(sorted({p.src for p in pairs[r]} - {r})) for r in range(world)]
    sends = [tuple(d for d in range(world) if r in recvs[d]) for r in range(world)]
    ranges = []
    for r in range(world):
        mine_ranges = {r: ((0, n),)}
        for s in recvs[r]:
            pieces = _union([p.k_cols for p in pairs[r] if p.src == s])
            mine_ranges[s] = pieces
            pairs[r] = [p if p.src != s else replace(p, k_cols=_remap(p.k_cols, pieces)) for p in pairs[r]]
        ranges.append(mine_ranges)
    rounds = []
    for r in range(world):
        mine_rounds = {}
        for k in range(1, world):
            to, frm = (r + k) % world, (r - k) % world
            step = (to if to in sends[r] else None, frm if frm in recvs[r] else None)
            if step != (None, None):
                mine_rounds[k] = step
        rounds.append(mine_rounds)
    return Plan(seq_len, world, layout, n, c, tuple(tuple(p) for p in pairs), tuple(recvs),
                tuple(sends), tuple(ranges), tuple(rounds))


def plan(pattern: Pattern | None, seq_len: int, world: int, layout: str = "contiguous") -> Plan:
    """The :class:`Plan` of ``pattern`` over a global sequence of ``seq_len`` tokens cut over
    ``world`` ranks in ``layout``. Pure host work, cached; raises ``ValueError``/``TypeError`` for
    a layout, length or pattern context parallelism cannot serve."""
    check_layout(layout)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world!r}")
    nchunks = world if layout == "contiguous" else 2 * world
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1 or seq_len % nchunks:
        raise ValueError(
            f"seq_len: the sequence length N = {seq_len!r} must be a positive multiple of "
            f"{nchunks} ({'world' if layout == 'contiguous' else '2 * world'} for layout {layout!r})"
        )
    pattern = _check_pattern(pattern, seq_len, seq_len // nchunks, world, layout)
    return _plan(pattern, seq_len, world, layout)

