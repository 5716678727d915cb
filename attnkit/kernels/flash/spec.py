"""The one contract between patterns and the flash kernel family: a kernel spec.

Every attention pattern compiles (``pattern.compile(nq, nk, device)``) to one of two specs, and
everything below the public API consumes only these: the Triton launcher, the torch path, the
decode kernels, the benchmark builders and the float64 oracle (:mod:`.naive`).

* :class:`Band` — two optional offsets around each query's bottom-right aligned position
  ``p = i + nk - nq``: key ``j`` is visible iff ``p - left <= j <= p + right`` (``None`` = no
  limit on that side). Dense, Causal and SlidingWindow compile to it.
* :class:`BlockLists` — a block-sparse layout compiled for one ``(nq, nk)``: per query block row
  the key blocks it visits (and the transpose, for dK/dV), each full or with an element mask.

Score modifications (soft-capping, sinks, ALiBi) travel beside the spec, not inside it: they
change what a visible pair scores, not which pairs are visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Band", "BlockLists", "KernelSpec", "SPEC_KINDS", "split_full_partial"]

SPEC_KINDS = ("band", "block_sparse")


@dataclass(frozen=True)
class Band:
    """Keys ``p - left <= j <= p + right`` around ``p = i + nk - nq`` (``None``: unbounded)."""

    left: int | None
    right: int | None

    kind = "band"

    def key_range(self, q_start: int, q_end: int, nq: int, nk: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` touched by queries ``[q_start, q_end)`` (``q_end > q_start``); the
        range is empty (``lo >= hi``) when every query of the block sees no key."""
        shift = nk - nq
        lo = 0 if self.left is None else max(q_start + shift - self.left, 0)
        hi = nk if self.right is None else min(q_end - 1 + shift + self.right + 1, nk)
        return lo, max(hi, lo)

    def visited_pairs(self, nq: int, nk: int) -> int:
        """Visible (query, key) pairs; drives FLOP counts."""
        total = 0
        shift = nk - nq
        for i in range(nq):  # a closed form is easy to get wrong at the clipped edges
            p = i + shift
            lo = 0 if self.left is None else max(p - self.left, 0)
            hi = nk - 1 if self.right is None else min(p + self.right, nk - 1)
            total += max(hi - lo + 1, 0)
        return total

    def block(self, r0: int, r1: int, lo: int, hi: int, nq: int, nk: int, device=None) -> torch.Tensor:
        """Bool ``[r1 - r0, hi - lo]``: which keys ``[lo, hi)`` queries ``[r0, r1)`` see."""
        pos = torch.arange(r0, r1, device=device)[:, None] + (nk - nq)
        j = torch.arange(lo, hi, device=device)[None, :]
        ok = torch.ones(r1 - r0, hi - lo, dtype=torch.bool, device=device)
        if self.left is not None:
            ok &= j >= pos - self.left
        if self.right is not None:
            ok &= j <= pos + self.right
        return ok

    def visible(self, nq: int, nk: int, device=None) -> torch.Tensor:
        """Bool ``[1, nq, nk]``: the definition, element by element (oracle and baselines)."""
        return self.block(0, nq, 0, nk, nq, nk, device)[None]

    def offsets(self) -> tuple[int, int]:
        """``(left, right)`` as the kernels take them: ``-1`` for an unbounded side."""
        return (-1 if self.left is None else self.left, -1 if self.right is None else self.right)

    @property
    def is_dense(self) -> bool:
        return self.left is None and self.right is None


@dataclass(frozen=True)
class BlockLists:
    """A block-sparse pattern compiled for one ``(Nq, Nk)`` on one device.

    ``L = layout batch x layout heads``; ``R = ceil(Nq / bs)``, ``C = ceil(Nk / bs)``.

    * ``kv_num [L, R]`` int32, ``kv_idx [L, R, maxK]`` int32: key blocks of each query block row;
      ``kv_part [L, R, maxK]`` int32: -1 for a full block, else an index into ``masks``.
    * ``q_num [L, C]``, ``q_idx [L, C, maxQ]``, ``q_part [L, C, maxQ]``: the transpose.
    * ``masks [P, bs, bs]`` uint8: element masks of partial blocks (rows = queries).
    * ``layout_batch``, ``layout_heads``: the layout's batch and head extents (1 = broadcast).
    * ``visited``: the number of visible (query, key) pairs over all layouts (FLOP counts).
    """

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    kv_part: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor
    q_part: torch.Tensor
    masks: torch.Tensor
    layout_batch: int
    layout_heads: int
    block_size: int
    visited: int

    kind = "block_sparse"

    @property
    def max_kv_blocks(self) -> int:
        return self.kv_idx.shape[-1]

    def layout_index(self, b: int, h: int) -> int:
        """The layout slice ``l`` that batch row (or sequence) ``b`` and query head ``h`` read."""
        return (b if self.layout_batch > 1 else 0) * self.layout_heads + (
            h if self.layout_heads > 1 else 0)

    def visible(self, nq: int, nk: int, device=None) -> torch.Tensor:
        """Bool ``[L, nq, nk]`` built from the lists (oracle and baselines; small problems)."""
        bs = self.block_size
        num, idx, part = self.kv_num.cpu(), self.kv_idx.cpu(), self.kv_part.cpu()
        masks = self.masks.cpu().bool()
        L, R = num.shape
        C = self.q_num.shape[1]
        out = torch.zeros(L, R * bs, C * bs, dtype=torch.bool)
        for lay in range(L):
            for r in range(R):
                for e in range(int(num[lay, r])):
                    c, p = int(idx[lay, r, e]), int(part[lay, r, e])
                    blk = out[lay, r * bs:(r + 1) * bs, c * bs:(c + 1) * bs]
                    blk |= True if p < 0 else masks[p]
        return out[:, :nq, :nk].to(device)

    def key_range(self, q_start: int, q_end: int, nq: int, nk: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` spanned by the blocks that queries ``[q_start, q_end)`` visit, over
        every layout slice (``(0, 0)`` when none)."""
        bs = self.block_size
        num, idx = self.kv_num.cpu(), self.kv_idx.cpu()
        cols = [c for row in range(q_start // bs, (q_end - 1) // bs + 1)
                for lay in range(num.shape[0]) for c in idx[lay, row, : int(num[lay, row])].tolist()]
        if not cols:
            return 0, 0
        return min(cols) * bs, min(max(cols) * bs + bs, nk)

    def visited_pairs(self, nq: int, nk: int) -> float:
        """Visible pairs per (batch row, head): the mean over the layout's slices."""
        slices = self.layout_batch * self.layout_heads
        return self.visited / slices if self.visited % slices else self.visited // slices

    def to(self, device: torch.device) -> BlockLists:
        moved = {name: getattr(self, name).to(device)
                 for name in ("kv_num", "kv_idx", "kv_part", "q_num", "q_idx", "q_part", "masks")}
        return BlockLists(**moved, layout_batch=self.layout_batch, layout_heads=self.layout_heads,
                          block_size=self.block_size, visited=self.visited)


def split_full_partial(kv_num: torch.Tensor, kv_idx: torch.Tensor, kv_part: torch.Tensor,
                       block_size: int, nk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder each query block row's key list so that its FULL blocks come first.

    Returns ``(n_full [L, R], idx [L, R, maxK], part [L, R, maxK])`` int32 on ``kv_idx``'s
    device (a few small tensor ops, no host sync). A block is FULL when it has no element mask
    and ends inside the ``nk`` keys; the kernels walk those tiles with no mask load at all. The
    other listed blocks follow (PARTIAL: an element mask, or ``part = -1`` for a full block that
    hangs past ``nk``, which only the sequence-end check cuts); each group keeps its column
    order. The layout's block size is the unit, not the kernel's key tile: the autotuner picks
    ``BLOCK_N`` (a divisor of the block size) after the lists are built, and each entry is
    ``block_size // BLOCK_N`` tiles of one flat loop. Tiles of a hanging block that lie wholly
    past ``nk`` (at most ``block_size // BLOCK_N - 1`` per row) still run, fully masked."""
    L, R, M = kv_idx.shape
    entry = torch.arange(M, device=kv_idx.device)
    listed = entry < kv_num[..., None]
    full = listed & (kv_part < 0) & ((kv_idx.to(torch.int64) + 1) * block_size <= nk)
    group = torch.where(full, 0, torch.where(listed, 1, 2))  # full, partial, unused
    order = torch.argsort(group * M + entry, dim=-1)
    idx = torch.gather(kv_idx, -1, order).to(torch.int32).contiguous()
    part = torch.gather(kv_part, -1, order).to(torch.int32).contiguous()
    return full.sum(-1).to(torch.int32).contiguous(), idx, part


#: What a pattern compiles to.
KernelSpec = Band | BlockLists
