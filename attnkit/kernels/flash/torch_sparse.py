"""The torch backend for block-sparse attention: gather only the listed key blocks.

For each query block row, the key blocks its layout lists are gathered into a ``[B, H', maxK * bs,
D]`` tile (``H' = Hkv`` when one layout serves every head, else per query head) and, on a CPU in
fp32/fp64/bf16/fp16, run through the fused CPU flash kernel with an additive mask for the partial
blocks, the sequence end and key padding (:func:`.torch_fused.fused_tile`, its own fused backward,
LSE differentiable); elsewhere scored, masked and softmaxed in fp32 (fp64 for fp64 inputs).
Autograd through the gathers scatters dK/dV back. Memory: one row's scores are ``B * Hq * bs * maxK * bs`` and
autograd keeps one such tensor per row, so the total scales with the number of non-zero blocks
(times the widest row), never with ``N^2`` for a sparse layout.
"""

from __future__ import annotations

import torch

from .spec import BlockLists
from .torch_band import _segments
from .torch_fused import fused_available, fused_tile

__all__ = ["block_sparse_attention_torch"]


def _row(q_rows, k, v, lists: BlockLists, r: int, c_rows: int, nk: int, lay_map, kpm, scale,
         fused: bool):
    """Output and LSE of one query block row. ``q_rows [B, Hq, c, D]``; ``k``/``v`` one sequence."""
    B, Hq, c, D = q_rows.shape
    Hkv = k.shape[1]
    bs = lists.block_size
    num = lists.kv_num[:, r].long()  # [L]
    # Only as wide as this row's longest list: the lists are padded to the widest row overall,
    # which a global (attend-everything) row makes the whole sequence.
    maxk = max(int(num.max()), 1)
    idx = lists.kv_idx[:, r, :maxk].long()  # [L, maxK]
    part = lists.kv_part[:, r, :maxk].long()  # [L, maxK]
    offs = torch.arange(bs, device=k.device)
    pos = (idx[..., None] * bs + offs).reshape(idx.shape[0], maxk * bs)  # [L, M]
    slot_ok = (torch.arange(maxk, device=k.device)[None, :] < num[:, None])  # [L, maxK]
    valid = slot_ok.repeat_interleave(bs, 1) & (pos < nk)  # [L, M]
    # Element masks: full blocks are all-True; partial blocks read their mask rows.
    em = lists.masks[part.clamp(min=0)][:, :, :c, :].bool()  # [L, maxK, c, bs]
    em = torch.where((part >= 0)[..., None, None], em, torch.ones_like(em))
    em = em.permute(0, 2, 1, 3).reshape(idx.shape[0], c, maxk * bs)  # [L, c, M]
    visible = em & valid[:, None, :]  # [L, c, M]

    b_idx = torch.arange(B, device=k.device)[:, None, None]
    if fused and lists.layout_batch * lists.layout_heads == 1:
        # One layout for every head: gather the blocks once per KV head (no K/V expansion; the
        # fused kernel maps query heads to KV heads itself).
        p0 = pos[0].clamp(max=nk - 1)
        ok = visible[0][None, None]  # [1, 1, c, M]
        if kpm is not None:
            ok = ok & kpm[:, p0][:, None, None, :]
        return fused_tile(q_rows, k[:, :, p0], v[:, :, p0], ok, scale)
    pos_bh = pos.clamp(max=nk - 1)[lay_map]  # [B, Hq, M]
    hk_idx = (torch.arange(Hq, device=k.device) // (Hq // Hkv))[None, :, None]
    k_sel = k[b_idx, hk_idx, pos_bh]  # [B, Hq, M, D]
    v_sel = v[b_idx, hk_idx, pos_bh]
    ok = visible[lay_map]  # [B, Hq, c, M]
    if kpm is not None:
        ok = ok & kpm[b_idx, pos_bh][:, :, None, :]
    if fused:
        return fused_tile(q_rows, k_sel, v_sel, ok, scale)
    s = torch.matmul(q_rows, k_sel.transpose(-1, -2)) * scale
    any_ok = ok.any(-1, keepdim=True)
    s = torch.where(any_ok, s.masked_fill(~ok, float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * ok
    o = torch.matmul(p, v_sel)
    lse = torch.where(any_ok[..., 0], lse, torch.full_like(lse, float("-inf")))
    return o, lse


def block_sparse_attention_torch(q, k, v, lists: BlockLists, scale: float, valid_keys=None,
                                 cu_seqlens_q=None, cu_seqlens_k=None):
    """Block-sparse attention in PyTorch. Returns ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``.

    ``lists`` come from :meth:`BlockSparse.compile` on ``q``'s device. With ``cu_seqlens_*`` the
    layout's block indices count from each sequence's start and its batch dim (if any) indexes the
    sequences.
    """
    B, Hq, Nq, D = q.shape
    # The fused CPU kernel takes the inputs' own dtype (and accumulates in fp32); the generic
    # gather path upcasts to fp32 (fp64 for fp64).
    fused = fused_available(q, k)
    cdt = q.dtype if fused else (torch.float64 if q.dtype == torch.float64 else torch.float32)
    outs, lses = [], []
    lb_stride = lists.layout_heads if lists.layout_batch > 1 else 0
    lh_stride = 1 if lists.layout_heads > 1 else 0
    heads = torch.arange(Hq, device=q.device)
    segments = _segments(Nq, k.shape[2], cu_seqlens_q, cu_seqlens_k)
    for s_i, (qs, qe, ks, ke) in enumerate(segments):
        nq, nk = qe - qs, ke - ks
        if cu_seqlens_q is None:
            batch_rows = torch.arange(B, device=q.device)
        else:
            batch_rows = torch.full((B,), s_i, device=q.device)
        lay_map = batch_rows[:, None] * lb_stride + heads[None, :] * lh_stride  # [B, Hq]
        kpm = None if valid_keys is None else valid_keys[:, ks:ke]
        seg_o, seg_lse = [], []
        for r in range(-(-nq // lists.block_size)):
            r0, r1 = r * lists.block_size, min((r + 1) * lists.block_size, nq)
            if nk == 0:
                seg_o.append(q.new_zeros(B, Hq, r1 - r0, D, dtype=cdt))
                seg_lse.append(q.new_full((B, Hq, r1 - r0), float("-inf"), dtype=cdt))
                continue
            o, lse = _row(q[:, :, qs + r0 : qs + r1].to(cdt), k[:, :, ks:ke].to(cdt),
                          v[:, :, ks:ke].to(cdt), lists, r, r1 - r0, nk, lay_map, kpm, scale, fused)
            seg_o.append(o)
            seg_lse.append(lse)
        if seg_o:
            outs.append(torch.cat(seg_o, 2))
            lses.append(torch.cat(seg_lse, 2))
    covered = sum(qe - qs for qs, qe, _, _ in segments)
    if covered < Nq:  # packed rows outside every sequence
        outs.append(q.new_zeros(B, Hq, Nq - covered, D, dtype=cdt))
        lses.append(q.new_full((B, Hq, Nq - covered), float("-inf"), dtype=cdt))
    o = torch.cat(outs, 2).to(q.dtype)
    lse = torch.cat(lses, 2).float()
    return o, lse
