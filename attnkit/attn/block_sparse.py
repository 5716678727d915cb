"""Block-sparse attention patterns: a block layout, optional element masks inside blocks.

``BlockSparse(layout, block_size)``: query ``i`` attends key ``j`` iff
``layout[h, i // block_size, j // block_size]`` (per head, or one layout for all heads, optionally
per batch row). ``causal=True`` also requires ``j <= i + Nk - Nq`` element-wise (bottom-right
aligned, as every attnkit pattern). Patterns built by :func:`~attnkit.from_mask_fn` carry an
element mask for the blocks the mask cuts through ("partial" blocks); every other non-empty block
is "full" and the kernels skip its mask, as FlexAttention does.

For the kernels a pattern is compiled once per ``(device, Nq, Nk)`` into :class:`BlockLists`:
per query block row the sorted list of key blocks it visits (and, transposed, per key block
column the query blocks that visit it, for the dK/dV backward), each entry tagged full (-1) or
with the index of its ``[block_size, block_size]`` element mask. The lists are cached on the
pattern object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels.flash.spec import BlockLists
from .patterns import Pattern

__all__ = ["BlockSparse", "BlockLists"]  # BlockLists lives in kernels/flash/spec.py


def _as_layout(layout: object) -> torch.Tensor:
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"BlockSparse: layout must be a bool torch.Tensor, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise TypeError(
            f"BlockSparse: layout must have dtype torch.bool (True = attend), got {layout.dtype}"
        )
    if layout.dim() not in (3, 4):
        raise ValueError(
            "BlockSparse: layout must be [H or 1, ceil(Nq/bs), ceil(Nk/bs)] or "
            f"[B or 1, H or 1, ceil(Nq/bs), ceil(Nk/bs)], got shape {tuple(layout.shape)}"
        )
    layout = layout if layout.dim() == 4 else layout[None]
    if min(layout.shape) < 1:
        raise ValueError(f"BlockSparse: layout has an empty dimension: {tuple(layout.shape)}")
    return layout.detach().to("cpu").contiguous()


@dataclass(frozen=True, eq=False)
class BlockSparse(Pattern):
    """Attention restricted to a block layout.

    Args:
        layout: bool ``[H or 1, ceil(Nq/bs), ceil(Nk/bs)]``, optionally with a leading batch dim
            ``[B or 1, H or 1, ...]`` (with ``cu_seqlens`` the batch dim counts sequences, and
            block indices count from each sequence's start). ``H`` is the number of query heads.
        block_size: a multiple of 16 (the smallest kernel tile); 64 and 128 suit GPUs.
        causal: also mask ``j > i + Nk - Nq`` inside the blocks.

    A query whose row of blocks is empty gets ``o = 0`` and ``lse = -inf``. Patterns compare by
    identity (layouts are tensors); build one per layout and reuse it, so its compiled block lists
    are reused too.
    """

    layout: torch.Tensor
    block_size: int
    causal: bool = False
    #: Element masks of partial blocks (from :func:`from_mask_fn`): ``(part [L, R, C] int32 with
    #: -1 = full block, masks [P, bs, bs] bool)``, or ``None``.
    element_masks: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int):
            raise TypeError(f"BlockSparse: block_size must be an int, got {type(bs).__name__} {bs!r}")
        if bs < 16 or bs % 16:
            raise ValueError(
                f"BlockSparse: block_size must be a positive multiple of 16 (the smallest kernel "
                f"tile), got {bs}"
            )
        if not isinstance(self.causal, bool):
            raise TypeError(f"BlockSparse: causal must be a bool, got {self.causal!r}")
        object.__setattr__(self, "layout", _as_layout(self.layout))
        if self.element_masks is not None:
            part, masks = self.element_masks
            lb, lh, r, c = self.layout.shape
            if tuple(part.shape) != (lb * lh, r, c) or masks.dim() != 3 or masks.shape[1:] != (bs, bs):
                raise ValueError("BlockSparse: element_masks do not match the layout and block size")

    @property
    def kind(self) -> str:
        return "block_sparse"

    def __repr__(self) -> str:
        lb, lh, r, c = self.layout.shape
        density = float(self.layout.float().mean())
        return (
            f"BlockSparse(layout=[{lb}, {lh}, {r}, {c}], block_size={self.block_size}, "
            f"causal={self.causal}, block density={density:.3f})"
        )

    # ---------------------------------------------------------------------------------------
    # Shape checks against a call
    # ---------------------------------------------------------------------------------------

    def check_call(self, batch: int, q_heads: int, nq: int, nk: int, same_packing: bool = True) -> None:
        """Raise ``ValueError`` if the layout does not fit a call (``nq``/``nk``: per sequence)."""
        if self.causal and not same_packing:
            raise ValueError(
                "BlockSparse(causal=True) with cu_seqlens needs one packing for queries and "
                "keys (pass a single cu_seqlens tensor)"
            )
        lb, lh, r, c = self.layout.shape
        bs = self.block_size
        want = (math.ceil(nq / bs), math.ceil(nk / bs))
        if (r, c) != want:
            raise ValueError(
                f"BlockSparse: the layout has {r} x {c} blocks but this call needs "
                f"ceil(Nq/bs) x ceil(Nk/bs) = {want[0]} x {want[1]} (Nq = {nq}, Nk = {nk}, "
                f"block_size = {bs}); build the layout for this sequence length"
            )
        if lh not in (1, q_heads):
            raise ValueError(
                f"BlockSparse: the layout has {lh} heads; it must have 1 or Hq = {q_heads}"
            )
        if lb not in (1, batch):
            raise ValueError(
                f"BlockSparse: the layout has batch size {lb}; it must be 1 or {batch} "
                "(the number of sequences with cu_seqlens)"
            )

    # ---------------------------------------------------------------------------------------
    # Pattern interface
    # ---------------------------------------------------------------------------------------

    def dense_mask(self, nq: int, nk: int) -> torch.Tensor:
        """Bool ``[L, nq, nk]`` element mask straight from the layout's definition (tests check
        the compiled lists against it; small problems only)."""
        lb, lh, r, c = self.layout.shape
        bs = self.block_size
        lay = self.layout.reshape(lb * lh, r, c)
        mask = lay.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :nq, :nk].clone()
        if self.element_masks is not None:
            part, masks = self.element_masks
            for l_, rr, cc in (part >= 0).nonzero().tolist():
                blk = masks[part[l_, rr, cc]]
                rows = slice(rr * bs, min(rr * bs + bs, nq))
                cols = slice(cc * bs, min(cc * bs + bs, nk))
                mask[l_, rows, cols] &= blk[: rows.stop - rows.start, : cols.stop - cols.start]
        if self.causal:
            i = torch.arange(nq)[:, None] + (nk - nq)
            mask &= torch.arange(nk)[None, :] <= i
        return mask

    # ---------------------------------------------------------------------------------------
    # Compilation into block lists
    # ---------------------------------------------------------------------------------------

    def compile(self, nq: int, nk: int, device: torch.device | str = "cpu") -> BlockLists:
        """The block lists for ``(nq, nk)`` on ``device`` (built once, then cached)."""
        device = torch.device(device)
        key = (nq, nk, str(device))
        hit = self._cache.get(key)
        if hit is None:
            cpu = self._cache.get((nq, nk, "cpu")) or _compile(self, nq, nk)
            self._cache[(nq, nk, "cpu")] = cpu
            hit = cpu if device.type == "cpu" else cpu.to(device)
            self._cache[key] = hit
        return hit


def _causal_partial(bs: int, nq: int, nk: int, r: torch.Tensor, c: torch.Tensor):
    """For blocks ``(r, c)``: 0 = no visible element, 1 = full, 2 = cut by the causal diagonal."""
    shift = nk - nq
    q_lo = r * bs
    q_hi = torch.clamp(r * bs + bs, max=nq) - 1
    k_lo = c * bs
    k_hi = torch.clamp(c * bs + bs, max=nk) - 1
    empty = k_lo > q_hi + shift
    full = k_hi <= q_lo + shift
    return torch.where(empty, 0, torch.where(full, 1, 2))


def _compile(p: BlockSparse, nq: int, nk: int) -> BlockLists:
    bs = p.block_size
    lb, lh, R, C = p.layout.shape
    L = lb * lh
    lay = p.layout.reshape(L, R, C).clone()
    part = torch.full((L, R, C), -1, dtype=torch.int64)
    masks: list[torch.Tensor] = []
    if p.element_masks is not None:
        epart, emasks = p.element_masks
        part = epart.to(torch.int64).clone()
        masks = [m.to(torch.bool) for m in emasks]
    # Edge blocks past nq/nk are cut by the kernels' bounds checks, not by element masks.
    if p.causal:
        rr, cc = torch.meshgrid(torch.arange(R), torch.arange(C), indexing="ij")
        state = _causal_partial(bs, nq, nk, rr, cc)
        lay &= (state > 0)[None]
        i = torch.arange(bs)[:, None]
        j = torch.arange(bs)[None, :]
        shift = nk - nq
        for l_, r_, c_ in (lay & (state == 2)[None]).nonzero().tolist():
            diag = (c_ * bs + j) <= (r_ * bs + i) + shift
            if part[l_, r_, c_] >= 0:
                diag = diag & masks[int(part[l_, r_, c_])]
            part[l_, r_, c_] = len(masks)
            masks.append(diag)
    # A block whose element mask is empty is no block at all; drop it from the lists.
    for l_, r_, c_ in (part >= 0).nonzero().tolist():
        blk = masks[int(part[l_, r_, c_])]
        rows, cols = min(bs, nq - r_ * bs), min(bs, nk - c_ * bs)
        if not bool(blk[:rows, :cols].any()):
            lay[l_, r_, c_] = False
    part = torch.where(lay, part, torch.full_like(part, -1))
    # Deduplicate element masks (causal diagonal blocks repeat across rows and heads).
    if masks:
        stacked = torch.stack(masks).reshape(len(masks), -1)
        used = part[part >= 0].unique()
        uniq, inverse = torch.unique(stacked[used], dim=0, return_inverse=True)
        remap = torch.full((len(masks),), -1, dtype=torch.int64)
        remap[used] = inverse
        part = torch.where(part >= 0, remap[part.clamp(min=0)], part)
        mask_t = uniq.reshape(-1, bs, bs).to(torch.uint8)
    else:
        mask_t = torch.ones(1, bs, bs, dtype=torch.uint8)  # a valid pointer for the kernels

    kv_num, kv_idx, kv_part = _lists(lay, part)
    q_num, q_idx, q_part = _lists(lay.transpose(1, 2), part.transpose(1, 2))
    visited = _count_pairs(lay, part, mask_t, bs, nq, nk)
    return BlockLists(kv_num, kv_idx, kv_part, q_num, q_idx, q_part, mask_t.contiguous(),
                      lb, lh, bs, visited)


def _lists(lay: torch.Tensor, part: torch.Tensor):
    """Compact per-row lists of the True columns of ``lay [L, R, C]``, in increasing order."""
    L, R, C = lay.shape
    num = lay.sum(-1).to(torch.int32)
    width = max(int(num.max()) if num.numel() else 0, 1)
    # Stable sort puts True columns first, in column order.
    order = torch.sort((~lay).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    idx = order.to(torch.int32)
    sel_part = torch.gather(part, -1, order).to(torch.int32)
    valid = torch.arange(width)[None, None, :] < num[..., None]
    idx = torch.where(valid, idx, torch.zeros_like(idx)).contiguous()
    sel_part = torch.where(valid, sel_part, torch.full_like(sel_part, -1)).contiguous()
    return num.contiguous(), idx, sel_part


def _count_pairs(lay, part, masks, bs, nq, nk) -> int:
    R, C = lay.shape[1:]
    rows = torch.clamp(nq - torch.arange(R) * bs, max=bs)
    cols = torch.clamp(nk - torch.arange(C) * bs, max=bs)
    area = rows[:, None] * cols[None, :]
    full = (lay & (part < 0)) * area[None]
    total = int(full.sum())
    for l_, r_, c_ in (lay & (part >= 0)).nonzero().tolist():
        blk = masks[int(part[l_, r_, c_])]
        total += int(blk[: int(rows[r_]), : int(cols[c_])].sum())
    return total
