"""The torch path for calls the fused torch kernels cannot take: score modifications (soft-capping,
sinks, ALiBi) and values with their own head dim.

Chunk by chunk of query rows, exactly what the Triton kernels compute: scores against the keys the
chunk's spec touches (a band's key range, or a block-list row's listed blocks), soft-cap, ALiBi,
the mask (pattern, key padding), a softmax whose denominator includes the sink. Each chunk runs
under ``torch.utils.checkpoint``, so autograd keeps only the chunk's inputs and recomputes its
scores in the backward: extra memory is one chunk's ``[B, Hq, chunk, keys]`` scores, never
``N x N``. GQA folds the query-head group into the chunk (``[B, Hkv, G, c, D]`` against
``[B, Hkv, 1, L, D]``), so K/V are not expanded. Slower than the fused path (the scores are
formed in eager ops), which is why the dispatch only sends these calls here.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .spec import Band, BlockLists

__all__ = ["scored_attention_torch"]

#: Elements of one chunk's score matrix (fp32): 2^24 = 64 MiB.
_SCORE_BUDGET = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_mask(spec, r0: int, r1: int, lo: int, hi: int, nq: int, nk: int, device,
                masks=None) -> torch.Tensor:
    """Bool ``[L, r1 - r0, hi - lo]``: which keys ``[lo, hi)`` each query row of ``[r0, r1)`` sees.
    Block lists come on the host (their indices are read here); ``masks``: their element masks as
    bool on ``device``."""
    if isinstance(spec, Band):
        return spec.block(r0, r1, lo, hi, nq, nk, device)[None]
    bs = spec.block_size
    num, idx, part = spec.kv_num, spec.kv_idx, spec.kv_part
    out = torch.zeros(num.shape[0], r1 - r0, hi - lo, dtype=torch.bool, device=device)
    row = r0 // bs  # chunks are layout block rows
    for lay in range(num.shape[0]):
        for e in range(int(num[lay, row])):
            c, p = int(idx[lay, row, e]), int(part[lay, row, e])
            c0, c1 = c * bs - lo, min(c * bs + bs, hi) - lo
            blk = out[lay, :, c0:c1]
            blk |= True if p < 0 else masks[p][: r1 - r0, : c1 - c0]
    return out


def _chunk(q, k, v, mask, key_ok, sinks, slopes, softcap, scale, r0, lo, nq, nk):
    """One chunk: ``q [B, Hkv, G, c, D]``, ``k [B, Hkv, 1, L, D]``, ``v [B, Hkv, 1, L, Dv]``;
    ``mask [Lb|1, Lh|1 -> Hkv, G, c, L]`` broadcastable; returns ``(o [B, Hkv, G, c, Dv],
    lse [B, Hkv, G, c])`` in the compute dtype."""
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:  # [B|1, Hkv, G, 1, 1]
        c, L = s.shape[-2], s.shape[-1]
        pos = torch.arange(r0, r0 + c, device=s.device)[:, None] + (nk - nq)
        dist = (pos - torch.arange(lo, lo + L, device=s.device)[None, :]).abs().to(s.dtype)
        s = s - slopes * dist
    ok = mask if key_ok is None else mask & key_ok
    s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:  # [1, Hkv, G, 1]: one more always-visible logit, with no value
        sink = sinks.expand(*s.shape[:-1])[..., None]
        lse = torch.logsumexp(torch.cat((s, sink), -1), -1)
    else:
        lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe[..., None])  # masked -> exp(-inf) = 0; empty rows -> all 0
    return p @ v, lse


def _one_sequence(q, k, v, spec, scale, key_ok, sinks, slopes, softcap, cdt, layout_row=None):
    """``q [B, Hq, nq, D]``, ``k [B, Hkv, nk, D]``, ``v [B, Hkv, nk, Dv]`` of one (packed)
    sequence -> ``(o [B, Hq, nq, Dv], lse [B, Hq, nq])``."""
    B, Hq, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    o = q.new_zeros((B, Hq, nq, Dv), dtype=cdt)
    lse = q.new_full((B, Hq, nq), float("-inf"), dtype=cdt)
    if sinks is not None:  # a row that sees no key: lse = sink
        lse = sinks.to(cdt).view(1, Hq, 1).expand(B, Hq, nq).clone()
    if nq == 0:
        return o, lse
    qg = q.to(cdt).view(B, Hkv, G, nq, D)
    kg, vg = k.to(cdt)[:, :, None], v.to(cdt)[:, :, None]
    sk = None if sinks is None else sinks.to(cdt).view(1, Hkv, G, 1)
    sl = None if slopes is None else slopes.to(cdt).view(-1, Hkv, G, 1, 1)
    masks = None
    if isinstance(spec, BlockLists):
        chunk = spec.block_size
        lb, lh = spec.layout_batch, spec.layout_heads
        masks = spec.masks.to(device=q.device, dtype=torch.bool)  # once, not per chunk
        spec = spec if spec.kv_num.device.type == "cpu" else spec.to(torch.device("cpu"))
    else:
        band = nk if spec.left is None or spec.right is None else min(nk, spec.left + spec.right + 1)
        rows = _SCORE_BUDGET // max(1, B * Hq * max(band, 1))
        chunk = int(min(512, max(16, 2 ** int(math.log2(max(rows, 1))))))
        lb = lh = 1
    outs, lses = [], []
    for r0 in range(0, nq, chunk):
        r1 = min(r0 + chunk, nq)
        lo, hi = spec.key_range(r0, r1, nq, nk)
        if hi <= lo:
            outs.append(o[:, :, r0:r1])
            lses.append(lse[:, :, r0:r1])
            continue
        m = _chunk_mask(spec, r0, r1, lo, hi, nq, nk, q.device, masks)  # [L, c, keys]
        m = m.view(lb, lh, r1 - r0, hi - lo)
        if layout_row is not None and lb > 1:  # packed: the layout's batch dim counts sequences
            m = m[layout_row:layout_row + 1]
            lb = 1
        m = m.view(lb, Hkv, G, r1 - r0, hi - lo) if lh > 1 else m[:, :, None]
        kok = None if key_ok is None else key_ok[:, None, None, None, lo:hi]
        args = (qg[:, :, :, r0:r1], kg[:, :, :, lo:hi], vg[:, :, :, lo:hi], m, kok, sk, sl, softcap,
                scale, r0, lo, nq, nk)
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, sinks))
        oc, lc = checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args)
        outs.append(oc.reshape(B, Hq, r1 - r0, Dv))
        lses.append(lc.reshape(B, Hq, r1 - r0))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def scored_attention_torch(call) -> tuple[torch.Tensor, torch.Tensor]:
    """A validated :class:`~attnkit.kernels.flash.call.AttentionCall` with score modifications or
    ``Dv != D``: ``(o [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] fp32)``, differentiable in q, k,
    v and the sinks."""
    q, k, v = call.q, call.k, call.v
    cdt = _compute_dtype(q.dtype)
    kw = dict(scale=call.scale, sinks=call.sinks, softcap=call.softcap, cdt=cdt)
    if call.cu_seqlens_q is None:
        o, lse = _one_sequence(q, k, v, call.spec, key_ok=call.valid_keys,
                               slopes=call.alibi_slopes, **kw)
        return o.to(q.dtype), lse.float()
    cu_q, cu_k = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        # block lists are compiled for the longest sequence and index blocks from each
        # sequence's start, as in the Triton kernels
        o, lse = _one_sequence(q[:, :, cu_q[s]:cu_q[s + 1]], k[:, :, cu_k[s]:cu_k[s + 1]],
                               v[:, :, cu_k[s]:cu_k[s + 1]], call.spec, key_ok=None,
                               slopes=call.alibi_slopes, layout_row=s, **kw)
        outs.append(o)
        lses.append(lse)
    tail = q.shape[2] - cu_q[-1]  # packed rows past the last sequence: 0 and -inf
    if tail:
        outs.append(q.new_zeros((1, q.shape[1], tail, v.shape[-1]), dtype=cdt))
        lses.append(q.new_full((1, q.shape[1], tail), float("-inf"), dtype=cdt))
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2).float()
