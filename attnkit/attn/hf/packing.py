"""Packed sequences (``DataCollatorWithFlattening``): finding them and laying them out along N.

transformers marks a packed batch in one of two ways: ``cu_seq_lens_q``/``cu_seq_lens_k`` (and
``max_length_q``/``max_length_k``) keyword arguments, or ``position_ids`` that restart inside a
row while no padding mask is given. Either way the attention function runs the ``cu_seqlens``
path, so the sequences never see each other.
"""

from __future__ import annotations

import weakref

import torch

# One helper for "(q_start, q_end, k_start, k_end) of each sequence" (the torch flash path's):
# the linear-attention path walks the same segments.
from ...kernels.flash.torch_band import _segments

__all__ = ["packing", "flatten", "unflatten", "segments"]

_pack_memo: tuple | None = None  # (weakref to position_ids, B, N, result): every layer asks again


def _packing_from_position_ids(position_ids: torch.Tensor, B: int, N: int):
    """``(cu_seqlens int32 [S + 1], max_seqlen)`` over the flattened ``[B * N]`` tokens when some
    row holds several sequences (a position that does not continue the previous one starts a new
    sequence, as transformers' ``find_packed_sequence_indices``), else ``None``."""
    global _pack_memo
    memo = _pack_memo
    if memo is not None and memo[0]() is position_ids and memo[1:3] == (B, N):
        return memo[3]
    pos = position_ids.expand(B, N)
    new = torch.ones(B, N, dtype=torch.bool, device=pos.device)
    new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = new.reshape(-1).nonzero().flatten()  # one host sync per forward (memoised)
    result = None
    if starts.numel() > B:
        end = torch.tensor([B * N], device=pos.device, dtype=starts.dtype)
        cu = torch.cat([starts, end]).to(torch.int32)
        result = (cu, int((cu[1:] - cu[:-1]).max()))
    _pack_memo = (weakref.ref(position_ids), B, N, result)
    return result


def packing(kwargs: dict, B: int, nq: int, nk: int, has_mask: bool):
    """``(cu_q int32 [S + 1], cu_k int32 [S + 1], max_q, max_k)`` for a packed batch, else ``None``.

    ``kwargs`` are the attention function's extra arguments; ``B, nq, nk`` the batch size and the
    query/key lengths; ``has_mask`` whether a padding mask came (position restarts then mean
    padding, not packing)."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if B != 1:
            raise ValueError(f"cu_seq_lens_q describes packed sequences, which need batch size 1, got {B}")
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k
    position_ids = kwargs.get("position_ids")
    if has_mask or position_ids is None or nq != nk or nq < 2 or position_ids.shape[-1] != nq:
        return None
    found = _packing_from_position_ids(position_ids, B, nq)
    if found is None:
        return None
    cu, mx = found
    return cu, cu, mx, mx


def flatten(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D] -> [1, H, B * N, D]`` (a view when B == 1)."""
    B, H, N, D = x.shape
    return x[None, :, 0] if B == 1 else x.transpose(0, 1).reshape(1, H, B * N, D)


def unflatten(out: torch.Tensor, B: int) -> torch.Tensor:
    """The inverse of :func:`flatten`: ``[1, H, B * N, D] -> [B, H, N, D]``."""
    _, H, BN, D = out.shape
    return out[0].reshape(H, B, BN // B, D).transpose(0, 1)


def segments(packed, nq: int, nk: int) -> list[tuple[int, int, int, int]]:
    """``(q_start, q_end, k_start, k_end)`` of each sequence of a :func:`packing` result, along
    the flattened query/key axes of lengths ``nq``/``nk``."""
    return _segments(nq, nk, packed[0], packed[1])
