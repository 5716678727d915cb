"""The float64 oracle of the flash family: attention written the naive way, with a dense mask.

Tests compare every backend against :func:`attention_naive` (in float64, and in the inputs' own
dtype to set the error budget: flash-attention's rule, ``tests/harness.py``). The mask comes
from the pattern's kernel spec (:meth:`Band.visible` / :meth:`BlockLists.visible`, the one
contract every backend consumes) or is given explicitly (the block-sparse tests build theirs from
the layout's definition, independently of the compiled lists).
"""

from __future__ import annotations

import torch

__all__ = ["visible_mask", "visible_mask_4d", "attention_naive"]


def visible_mask(pattern, nq: int, nk: int) -> torch.Tensor:
    """Bool ``[L, nq, nk]`` of a pattern (``L = 1`` for bands, layout batch x heads for block
    lists), from its compiled kernel spec."""
    spec = pattern.compile(nq, nk, "cpu") if hasattr(pattern, "compile") else pattern
    return spec.visible(nq, nk)


def visible_mask_4d(pattern, nq: int, nk: int, device=None) -> torch.Tensor:
    """Bool ``[Lb or 1, Lh or 1, nq, nk]`` of a pattern, broadcastable over ``[B, Hq]`` (for
    baselines that take an explicit mask, and for the oracle)."""
    spec = pattern.compile(nq, nk, "cpu")
    return _as_4d(spec.visible(nq, nk), spec).to(device)


def _as_4d(mask: torch.Tensor, spec_like) -> torch.Tensor:
    """``[L, nq, nk]`` -> ``[Lb or 1, Lh or 1, nq, nk]`` for broadcasting over ``[B, Hq]``."""
    if mask.dim() == 4:
        return mask
    lb = getattr(spec_like, "layout_batch", 1)
    lh = getattr(spec_like, "layout_heads", 1)
    return mask.reshape(lb, lh, *mask.shape[-2:])


def attention_naive(q, k, v, pattern=None, scale=None, valid_keys=None, cu_seqlens=None,
                    dtype=torch.float64, mask=None, softcap=None, sinks=None, alibi_slopes=None):
    """``(o [B, Hq, Nq, D], lse [B, Hq, Nq])`` in ``dtype``, differentiable.

    ``pattern`` (or an explicit bool ``mask [.., Nq, Nk]``) decides visibility; ``valid_keys``
    ``[B, Nk]`` (True = attend) removes padded keys. A row that sees no key gives ``o = 0`` and
    ``lse = -inf``. With ``cu_seqlens`` (``B == 1``; a tensor or a ``(q, k)`` pair) each packed
    sequence is attended on its own; packed rows past the last sequence are 0 / -inf.
    Score modifications, in this order: ``softcap * tanh(s / softcap)``, then
    ``- slope * |i + Nk - Nq - j|`` (``alibi_slopes [Hq]`` or ``[B, Hq]``); ``sinks [Hq]`` join
    every row's denominator (a row that sees no key then has ``o = 0``, ``lse = sink``).
    """
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    if cu_seqlens is not None:
        cu_q, cu_k = cu_seqlens if isinstance(cu_seqlens, tuple) else (cu_seqlens, cu_seqlens)
        outs, lses = [], []
        bq, bk = cu_q.tolist(), cu_k.tolist()
        for s in range(len(bq) - 1):
            o, lse = attention_naive(
                q[:, :, bq[s]:bq[s + 1]], k[:, :, bk[s]:bk[s + 1]], v[:, :, bk[s]:bk[s + 1]],
                pattern, scale, dtype=dtype, **mods,
            )
            outs.append(o)
            lses.append(lse)
        tail = q.shape[2] - bq[-1]
        if tail:
            outs.append(torch.zeros_like(q[:, :, bq[-1]:], dtype=dtype))
            lses.append(torch.full(q[:, :, bq[-1]:, 0].shape, float("-inf"), dtype=dtype,
                                   device=q.device))
        return torch.cat(outs, 2), torch.cat(lses, 2)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    k = k.repeat_interleave(Hq // Hkv, 1)
    v = v.repeat_interleave(Hq // Hkv, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dtype).reshape(-1 if alibi_slopes.dim() == 2 else 1, Hq)
        dist = (torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)
                - torch.arange(Nk, device=q.device)[None, :]).abs().to(dtype)
        s = s - slopes[:, :, None, None] * dist
    if mask is None:
        from ...attn.patterns import as_pattern

        mask = visible_mask_4d(as_pattern(pattern), Nq, Nk)
    ok = mask.to(q.device)
    if ok.dim() == 2:
        ok = ok[None, None]
    if valid_keys is not None:
        ok = ok & valid_keys[:, None, None, :]
    ok = ok.expand(s.shape)
    # Rows that see no key are scored as all-zero and then zeroed, so that autograd through the
    # oracle stays finite there (a logsumexp over only -inf has a NaN gradient).
    any_ok = ok.any(-1, keepdim=True)
    if sinks is not None:  # one more logit per row, always visible, with no value
        sink = sinks.to(dtype)[None, :, None, None].expand(B, Hq, Nq, 1)
        s_all = torch.cat((s.masked_fill(~ok, float("-inf")), sink), -1)
        lse = torch.logsumexp(s_all, -1)
        p = torch.exp(s - lse[..., None]) * ok
        return p @ v, lse
    s = torch.where(any_ok, s.masked_fill(~ok, float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * ok
    lse = torch.where(any_ok[..., 0], lse, torch.full_like(lse, float("-inf")))
    return p @ v, lse
