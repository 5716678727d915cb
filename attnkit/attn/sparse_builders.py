"""Builders of :class:`~attnkit.BlockSparse` patterns: Longformer, BigBird, Sparse Transformer and
any element mask function.

Each docstring states the pattern's definition (which key ``j`` a query ``i`` sees) and its
density — the fraction of the ``N x N`` pairs it visits — as a function of ``N``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from .block_sparse import BlockSparse

__all__ = ["from_mask_fn", "longformer", "bigbird", "strided"]


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _with_causal(p: BlockSparse, causal: bool) -> BlockSparse:
    return dataclasses.replace(p, causal=True) if causal else p


def from_mask_fn(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], nq: int, nk: int,
                 block_size: int, *, causal: bool = False) -> BlockSparse:
    """Compile an element mask ``fn(q_idx, k_idx) -> bool`` into a block-sparse pattern.

    ``fn`` receives int64 index tensors that broadcast (``q_idx [bs, 1]``, ``k_idx [1, Nk']``) and
    returns a bool tensor of their broadcast shape — FlexAttention's ``mask_mod`` vocabulary
    without the batch and head arguments, e.g. ``lambda q, k: k <= q`` (causal) or
    ``lambda q, k: (q - k).abs() <= 64``. It is evaluated once, a row of blocks at a time.

    Blocks where the mask is all False are dropped; blocks where it is all True are "full" (the
    kernels apply no mask there); the rest keep their ``[bs, bs]`` element mask. Density: whatever
    ``fn`` allows; the kernels' work is the number of non-empty blocks times ``bs^2``.
    Positions are plain indices (query ``i``, key ``j``), not bottom-right aligned: to reproduce
    ``Causal()`` with ``Nq != Nk`` write ``lambda q, k: k <= q + (Nk - Nq)``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(q_idx, k_idx) -> bool tensor, got {fn!r}")
    nq = _positive_int("nq", nq)
    nk = _positive_int("nk", nk)
    bs = _positive_int("block_size", block_size, 16)
    R, C = math.ceil(nq / bs), math.ceil(nk / bs)
    layout = torch.zeros(1, R, C, dtype=torch.bool)
    part = torch.full((1, R, C), -1, dtype=torch.int32)
    masks: list[torch.Tensor] = []
    k_idx = torch.arange(C * bs)[None, :]
    k_valid = (k_idx[0] < nk).reshape(C, bs)
    for r in range(R):
        q_idx = torch.arange(r * bs, r * bs + bs)[:, None]
        m = fn(q_idx, k_idx)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(
                "fn must return a bool tensor (vectorised over its index arguments), got "
                f"{type(m).__name__}{'' if not isinstance(m, torch.Tensor) else ' ' + str(m.dtype)}"
            )
        try:
            m = torch.broadcast_to(m, (bs, C * bs))
        except RuntimeError as err:
            raise ValueError(
                f"fn returned shape {tuple(m.shape)}, which does not broadcast to the index "
                f"shape {(bs, C * bs)}"
            ) from err
        blocks = m.reshape(bs, C, bs).permute(1, 0, 2)  # [C, bs(q), bs(k)]
        # past the sequence ends the mask does not matter: the kernels bound-check there
        inside = (q_idx[:, 0] < nq)[None, :, None] & k_valid[:, None, :]  # [C, bs, bs]
        visible = blocks & inside
        any_ = visible.flatten(1).any(1)
        full = (blocks | ~inside).flatten(1).all(1)
        layout[0, r] = any_
        for c in (any_ & ~full).nonzero().flatten().tolist():
            part[0, r, c] = len(masks)
            masks.append(blocks[c].clone())
    elem = torch.stack(masks) if masks else torch.ones(0, bs, bs, dtype=torch.bool)
    return BlockSparse(layout, bs, causal=causal, element_masks=(part, elem))


def longformer(n: int, block_size: int, window: int, global_tokens: int | Sequence[int] = 0, *,
               causal: bool = False) -> BlockSparse:
    """Longformer's pattern: a sliding band plus global tokens.

    Query ``i`` sees key ``j`` iff ``|i - j| <= window // 2``, or ``i`` is global (it attends
    everywhere), or ``j`` is global (everyone attends it). ``global_tokens`` is a count (the first
    tokens, e.g. ``[CLS]``) or a list of positions. ``causal=True`` additionally keeps ``j <= i``.

    Density (non-causal, ``g`` global tokens): about ``(window + 1) / N + 2 g / N`` — linear
    work in ``N`` for fixed ``window`` and ``g``.
    """
    n = _positive_int("n", n)
    window = _positive_int("window", window, 0)
    if isinstance(global_tokens, int) and not isinstance(global_tokens, bool):
        if not 0 <= global_tokens <= n:
            raise ValueError(f"global_tokens must be in [0, n = {n}], got {global_tokens}")
        glob = torch.zeros(n, dtype=torch.bool)
        glob[:global_tokens] = True
    else:
        idx = torch.as_tensor(list(global_tokens), dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"global_tokens positions must be in [0, {n}), got {idx.tolist()}")
        glob = torch.zeros(n, dtype=torch.bool)
        glob[idx] = True
    half = window // 2
    padded = torch.cat([glob, torch.zeros(block_size, dtype=torch.bool)])

    def mask(q, k):
        gq = padded[q.clamp(max=padded.numel() - 1)]
        gk = padded[k.clamp(max=padded.numel() - 1)]
        return ((q - k).abs() <= half) | gq | gk

    return from_mask_fn(mask, n, n, block_size, causal=causal)


def bigbird(n: int, block_size: int, num_window_blocks: int = 3, num_global_blocks: int = 2,
            num_random_blocks: int = 3, seed: int = 0, *, num_heads: int = 1,
            causal: bool = False) -> BlockSparse:
    """BigBird-ITC at block granularity (``nb = ceil(N / block_size)`` block rows and columns).

    * global: blocks ``0 .. ceil(g/2) - 1`` and the last ``floor(g/2)`` blocks
      (``g = num_global_blocks``; the default 2 is BigBird's first and last block) attend every
      block and are attended by every block;
    * window: block row ``r`` attends ``r - w//2 .. r + w//2`` (``w = num_window_blocks``);
    * random: every other block row attends ``num_random_blocks`` further blocks drawn uniformly
      without replacement from those not already attended, with ``torch.Generator`` seeded by
      ``seed`` (one draw per head when ``num_heads > 1``), so the layout is reproducible.

    Density: about ``(w + 2g + num_random_blocks) / nb`` of the blocks (capped at 1) — linear work
    in ``N`` at a fixed block size.
    """
    n = _positive_int("n", n)
    bs = _positive_int("block_size", block_size, 16)
    w = _positive_int("num_window_blocks", num_window_blocks, 0)
    g = _positive_int("num_global_blocks", num_global_blocks, 0)
    rnd = _positive_int("num_random_blocks", num_random_blocks, 0)
    heads = _positive_int("num_heads", num_heads)
    nb = math.ceil(n / bs)
    r = torch.arange(nb)[:, None]
    c = torch.arange(nb)[None, :]
    glob = torch.zeros(nb, dtype=torch.bool)
    glob[: math.ceil(g / 2)] = True
    if g // 2:
        glob[nb - g // 2 :] = True
    base = ((r - c).abs() <= w // 2) | glob[:, None] | glob[None, :]
    gen = torch.Generator().manual_seed(int(seed))
    layout = base.expand(heads, nb, nb).clone()
    for h in range(heads):
        for row in range(nb):
            if glob[row]:
                continue
            free = (~layout[h, row]).nonzero().flatten()
            pick = free[torch.randperm(free.numel(), generator=gen)[:rnd]]
            layout[h, row, pick] = True
    return _with_causal(BlockSparse(layout, bs), causal)


def strided(n: int, block_size: int, local_blocks: int, stride: int, *,
            causal: bool = True) -> BlockSparse:
    """The Sparse Transformer's strided pattern (Child et al., 2019), at block granularity.

    Block row ``r`` attends block column ``c`` iff ``0 <= r - c < local_blocks`` (the local
    factor) or ``(r - c) % stride == 0`` with ``c <= r`` (the strided factor); with
    ``causal=True`` (the default: an autoregressive model) keys after the query are masked inside
    the diagonal blocks. ``causal=False`` uses ``|r - c|`` instead (both directions).

    Density: about ``(local_blocks + nb / stride) / nb`` of the lower triangle's blocks, i.e.
    ``O(N * sqrt(N))`` work for ``stride ~ sqrt(nb)``.
    """
    n = _positive_int("n", n)
    bs = _positive_int("block_size", block_size, 16)
    local = _positive_int("local_blocks", local_blocks)
    stride = _positive_int("stride", stride)
    nb = math.ceil(n / bs)
    d = torch.arange(nb)[:, None] - torch.arange(nb)[None, :]
    if causal:
        layout = (d >= 0) & ((d < local) | (d % stride == 0))
    else:
        layout = (d.abs() < local) | (d.abs() % stride == 0)
    return BlockSparse(layout[None], bs, causal=causal)
