"""Argument checks of :func:`attnkit.attn.linear.linear_attention`'s hybrid and varlen options:
``window``, ``cu_seqlens`` and the hybrid's state."""

from __future__ import annotations

import torch

__all__ = ["check_window", "check_cu_seqlens", "split_hybrid_state"]


def check_window(window: object, causal: bool, normalize: bool) -> int | None:
    """``window`` as an int ``>= 1`` (or ``None``); the hybrid is causal and normalised."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1 (the softmax window W, keys (i - W, i]) or "
                        f"None, got {type(window).__name__} {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (W = 1: only the diagonal is softmax), got {window}")
    if not causal:
        raise ValueError(f"window={window} (the sliding-window + linear hybrid) is causal only; "
                         "pass causal=True, or window=None for bidirectional linear attention")
    if not normalize:
        raise ValueError(f"window={window}: the hybrid shares one normaliser between its softmax "
                         "and linear parts, so normalize=False has no meaning; pass "
                         "normalize=True")
    return window


def check_cu_seqlens(cu: object, q: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
    """``cu_seqlens [S + 1]`` (flash-attention's layout along N of ``B = 1`` tensors) as host
    ``(start, end)`` pairs (one device-to-host copy), or ``None``."""
    if cu is None:
        return None
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor [S + 1] or None, got "
                        f"{type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [S + 1] with S >= 1, got "
                         f"{cu.dtype} {list(cu.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs the sequences along N of B = 1 tensors; q has "
                         f"B = {q.shape[0]} (flatten the batch to [1, H, total, D])")
    bounds = [int(x) for x in cu.tolist()]
    n = q.shape[2]
    if bounds[0] != 0 or bounds[-1] != n or any(b < a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0, not decrease and end at N = {n} (q's "
                         f"packed length), got {bounds}")
    return tuple(zip(bounds[:-1], bounds[1:], strict=True))


def split_hybrid_state(state: object, q, k, v, window: int):
    """A hybrid ``initial_state`` ``(s, z, k_win, v_win)`` -> ``((s, z), (k_win, v_win))``, the
    window part checked (``[B, Hkv, L, Dk]`` / ``[B, Hkv, L, Dv]``, ``L <= W - 1``) and cast to
    q's dtype; the ``(s, z)`` part is checked by the caller as a linear state."""
    if not isinstance(state, tuple):
        raise TypeError(f"initial_state with window={window} must be a HybridAttentionState(s, z, "
                        f"k, v) or a tuple of four tensors, got {type(state).__name__}")
    if len(state) != 4:
        raise ValueError(f"initial_state with window={window} must hold four tensors (s, z, "
                         f"k [B, Hkv, L, Dk], v [B, Hkv, L, Dv]: the linear state and the last "
                         f"L <= W - 1 keys/values), got a tuple of {len(state)}")
    s, z, kw, vw = state
    B, Hkv = k.shape[:2]
    for name, t, d in (("k", kw, k.shape[-1]), ("v", vw, v.shape[-1])):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"initial_state.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or tuple(t.shape[:2]) != (B, Hkv) or t.shape[-1] != d:
            raise ValueError(f"initial_state.{name} must be [B, Hkv, L, {'Dk' if name == 'k' else 'Dv'}]"
                             f" = [{B}, {Hkv}, L, {d}], got {list(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"initial_state.{name} is on {t.device} but q is on {q.device}")
    if kw.shape[2] != vw.shape[2]:
        raise ValueError(f"initial_state.k holds {kw.shape[2]} tokens but initial_state.v holds "
                         f"{vw.shape[2]}; they must be equal")
    if kw.shape[2] > window - 1:
        raise ValueError(f"initial_state holds {kw.shape[2]} window tokens but window={window} "
                         f"keeps at most W - 1 = {window - 1} (the query's own key is the W-th)")
    return (s, z), (kw.to(q.dtype), vw.to(q.dtype))
