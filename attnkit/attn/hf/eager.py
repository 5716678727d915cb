"""``output_attentions=True`` under attnkit: the same attention computed the eager way, so the
weights come back (transformers' callers expect ``(out, weights)``).

attnkit's kernels never form the ``[B, Hq, Nq, Nk]`` probability matrix; when a model asks for it,
this computes exactly what the kernels compute — the layer's pattern, the key mask, soft-capping
and sinks — in plain PyTorch, once, with a warning (O(N^2) memory).
"""

from __future__ import annotations

import torch

from .packing import packing

__all__ = ["eager_with_weights", "plain_attention"]


def eager_with_weights(module, query, key, value, key_mask, pattern, scaling, softcap, sinks,
                       kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``query [B, Hq, Nq, D]``, ``key [B, Hkv, Nk, D]``, ``value [B, Hkv, Nk, Dv]``, ``key_mask``
    ``[B, L]`` bool (True = attend) or None -> ``(out [B, Nq, Hq, Dv], weights [B, Hq, Nq, Nk])``
    in the query's dtype (a row that sees no key has zero weights). ``key_mask`` may instead be
    a dense ``[B or 1, Hq or 1, Nq, L]`` mask (bool, True = attend, or additive float), which
    then replaces ``pattern``: it already holds the layer's whole pattern (transformers' sdpa
    reads it the same way)."""
    B, Nq = query.shape[0], query.shape[2]
    if key_mask is not None and key_mask.dim() == 4:
        # a static cache's mask spans the whole cache; sdpa cuts it to the keys the same way
        dense = key_mask[..., : key.shape[2]]
        return _with_dense_mask(query, key, value, dense, scaling, softcap, sinks)
    if key_mask is not None and key_mask.shape[1] < key.shape[2]:  # static cache: unfilled slots
        key, value = key[:, :, : key_mask.shape[1]], value[:, :, : key_mask.shape[1]]
    elif key_mask is not None and key_mask.shape[1] > key.shape[2]:
        key_mask = key_mask[:, -key.shape[2]:]
    Nk = key.shape[2]
    if packing(kwargs, B, Nq, Nk, key_mask is not None) is not None:
        raise ValueError("output_attentions=True with packed sequences is not supported by "
                         "attnkit; pass a padded batch, or load with attn_implementation='eager'")
    out, w = plain_attention(query, key, value, key_mask, pattern, scaling, softcap, sinks)
    return out.transpose(1, 2), w


def _with_dense_mask(query, key, value, mask, scaling, softcap, sinks):
    if mask.dim() != 4 or mask.shape[-2] != query.shape[2] or mask.shape[-1] != key.shape[2]:
        raise ValueError(f"output_attentions=True: attnkit takes a dense attention mask of shape "
                         f"[B, 1 or Hq, Nq={query.shape[2]}, Nk={key.shape[2]}], got "
                         f"{tuple(mask.shape)}")
    out, w = plain_attention(query, key, value, None, None, scaling, softcap, sinks, dense=mask)
    return out.transpose(1, 2), w


def plain_attention(query, key, value, key_mask, pattern, scaling, softcap, sinks, dense=None):
    """attnkit's attention written with plain tensor ops, in fp32: ``query [B, Hq, Nq, D]``,
    ``key [B, Hkv, Nk, D]``, ``value [B, Hkv, Nk, Dv]``, ``key_mask [B, Nk]`` bool or None ->
    ``(out [B, Hq, Nq, Dv], weights [B, Hq, Nq, Nk])`` in the query's dtype. Forms the whole score
    matrix (O(N^2) memory); every op traces under ``torch.compile`` (band patterns). ``dense``
    (``[B or 1, Hq or 1, Nq, Nk]``, bool True = attend or additive float) replaces ``pattern`` and
    ``key_mask``."""
    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    g = Hq // key.shape[1]
    k = key.repeat_interleave(g, 1).float()
    v = value.repeat_interleave(g, 1).float()
    scale = float(scaling) if scaling is not None else D ** -0.5
    s = query.float() @ k.transpose(-1, -2) * scale  # [B, Hq, Nq, Nk]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if dense is not None and dense.dtype != torch.bool:
        s = s + dense.float()  # additive, as eager adds it (after soft-capping)
    else:
        if dense is not None:
            ok = dense.to(query.device)
        else:
            spec = pattern.compile(Nq, Nk, "cpu")
            lb, lh = getattr(spec, "layout_batch", 1), getattr(spec, "layout_heads", 1)
            ok = spec.visible(Nq, Nk).reshape(lb, lh, Nq, Nk).to(query.device)
            if key_mask is not None:
                ok = ok & key_mask[:, None, None, :].to(query.device)
        s = s.masked_fill(~ok.expand(B, Hq, Nq, Nk), float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, Hq, 1, 1).expand(B, Hq, Nq, 1)
        w = torch.softmax(torch.cat((s, sink), -1), -1)[..., :-1]
    else:
        w = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see nothing: all -inf -> zeros
    return (w @ v).to(query.dtype), w.to(query.dtype)
