"""The torch backend of linear attention: chunked PyTorch, the same definition as the kernels.

Inputs are already feature-mapped (``fq = phi(q * scale)``, ``fk = phi(k)``); autograd through
plain torch ops gives the backward. Causal attention walks the sequence in chunks of ``chunk``
tokens, with the masked quadratic term inside a chunk and the running state across chunks, so
what autograd saves is linear in N (a ``[chunk, chunk]`` score tile and one ``[F, Dv]`` state per
chunk), never ``N x N``. GQA views the queries as ``[B, Hkv, G, N, F]`` instead of expanding K/V.

fp16/bf16 inputs are computed in fp32 and the output is cast back; float64 stays float64.
"""

from __future__ import annotations

import torch

__all__ = ["linear_attention_torch", "compute_dtype", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the torch backend (and the decode step) computes and keeps its state in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_torch(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    s0: torch.Tensor | None = None,
    z0: torch.Tensor | None = None,
    causal: bool = True,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk: int = DEFAULT_CHUNK,
    out_dtype: torch.dtype | None = None,
    decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear attention on feature-mapped inputs.

    Args:
        fq: ``[B, Hq, N, F]`` mapped queries; fk: ``[B, Hkv, N, F]`` mapped keys;
            v: ``[B, Hkv, N, Dv]``; ``Hq % Hkv == 0``.
        s0, z0: initial state ``[B, Hkv, F, Dv]`` and normaliser ``[B, Hkv, F]``, or None.
        chunk: tokens per step of the causal walk.
        out_dtype: dtype of ``o`` (default ``v.dtype``).
        decay: ``[Hkv]`` per-head ``gamma`` in (0, 1] or None (causal only):
            ``S_i = gamma S_{i-1} + phi(k_i) v_i^T``. Inside a chunk the scores are weighted by
            the decay matrix ``gamma^(i - j)``; across chunks the carried state is multiplied by
            ``gamma^(i + 1)`` for the chunk's token ``i`` and by ``gamma^C`` after the chunk.

    Returns:
        ``(o [B, Hq, N, Dv], s [B, Hkv, F, Dv], z [B, Hkv, F])``; the state in
        :func:`compute_dtype` of ``v.dtype``.
    """
    out_dtype = out_dtype or v.dtype
    cdt = compute_dtype(v.dtype)
    B, Hq, N, F = fq.shape
    Hkv, Dv = fk.shape[1], v.shape[-1]
    G = Hq // Hkv
    fq = fq.to(cdt).reshape(B, Hkv, G, N, F)
    fk, v = fk.to(cdt), v.to(cdt)
    s = fq.new_zeros((B, Hkv, F, Dv)) if s0 is None else s0.to(cdt)
    z = fq.new_zeros((B, Hkv, F)) if z0 is None else z0.to(cdt)

    if decay is not None and not causal:
        raise ValueError("decay needs causal=True")
    if not causal:
        s = s + fk.transpose(-1, -2) @ v  # [B, Hkv, F, N] @ [B, Hkv, N, Dv]
        z = z + fk.sum(-2)
        num = fq @ s[:, :, None]  # [B, Hkv, G, N, F] @ [B, Hkv, 1, F, Dv]
        den = (fq @ z[:, :, None, :, None]).squeeze(-1)  # [B, Hkv, G, N]
    else:
        nums, dens = [], []
        lg = None if decay is None else torch.log(decay.to(device=fq.device, dtype=cdt))
        # split, not sliced per chunk: a slice's backward writes its gradient into a zero tensor
        # of the whole input, O(N) per chunk and O(N^2 / chunk) in all (measured: 85 % of a
        # B*H = 8, N = 4096 backward); split's backward concatenates once
        pieces = zip(fq.split(chunk, -2), fk.split(chunk, -2), v.split(chunk, -2), strict=True)
        for qc, kc, vc in pieces:
            # [B, Hkv, G, C, F] x [B, Hkv, C, F] -> [B, Hkv, G, C, C], keys j <= query i
            a = torch.einsum("bhgif,bhjf->bhgij", qc, kc).tril()
            qs = qc
            if lg is not None:
                w_a, w_q, w_k, w_s = _decay_weights(lg, qc.shape[-2])
                a = a * w_a[None, :, None]  # gamma^(i - j) on and below the diagonal
                qs = qc * w_q[None, :, None, :, None]  # token i reads gamma^(i + 1) S
            nums.append(a @ vc[:, :, None] + qs @ s[:, :, None])
            dens.append(a.sum(-1) + (qs @ z[:, :, None, :, None]).squeeze(-1))
            if lg is not None:  # the state after the chunk: old state gamma^C, key j gamma^(C-1-j)
                kc = kc * w_k[None, :, :, None]
                s, z = s * w_s[None, :, None, None], z * w_s[None, :, None]
            s = s + kc.transpose(-1, -2) @ vc
            z = z + kc.sum(-2)
        num = torch.cat(nums, -2) if nums else fq.new_zeros((B, Hkv, G, N, Dv))
        den = torch.cat(dens, -1) if dens else fq.new_zeros((B, Hkv, G, N))
    o = num / (den[..., None] + eps) if normalize else num
    o = o.reshape(B, Hq, N, Dv).to(out_dtype)
    return o, s, z


def _decay_weights(lg: torch.Tensor, c: int):
    """For ``log gamma [Hkv]`` and a chunk of ``c`` tokens: ``gamma^(i - j)`` ``[Hkv, c, c]``
    (0 above the diagonal, where the exponent is negative and could overflow), ``gamma^(i + 1)``
    ``[Hkv, c]``, ``gamma^(c - 1 - j)`` ``[Hkv, c]`` and ``gamma^c`` ``[Hkv]``."""
    pos = torch.arange(c, device=lg.device, dtype=lg.dtype)
    gap = pos[:, None] - pos[None, :]
    w_a = torch.where(gap >= 0, torch.exp(lg[:, None, None] * gap.clamp(min=0)), 0.0)
    return (w_a, torch.exp(lg[:, None] * (pos + 1)), torch.exp(lg[:, None] * (c - 1 - pos)),
            torch.exp(lg * c))
