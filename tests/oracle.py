"""Float64 oracles: the definitions the kernels are checked against, written the naive way."""

from __future__ import annotations

import torch


def visible_mask(pattern, nq: int, nk: int) -> torch.Tensor:
    """Bool ``[nq, nk]`` straight from the pattern's definition (bottom-right aligned)."""
    pos = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    ok = torch.ones(nq, nk, dtype=torch.bool)
    if pattern.left is not None:
        ok &= j >= pos - pattern.left
    if pattern.right is not None:
        ok &= j <= pos + pattern.right
    return ok


def attention_oracle(q, k, v, pattern, scale=None, valid_keys=None, cu_seqlens=None,
                     dtype=torch.float64):
    """Naive attention with a dense mask. Returns ``(o, lse)`` in ``dtype``.

    Fully masked rows give ``o = 0`` and ``lse = -inf``. With ``cu_seqlens`` (``B == 1``) each
    packed sequence is attended on its own.
    """
    if cu_seqlens is not None:
        cu_q, cu_k = cu_seqlens if isinstance(cu_seqlens, tuple) else (cu_seqlens, cu_seqlens)
        outs, lses = [], []
        bq, bk = cu_q.tolist(), cu_k.tolist()
        for s in range(len(bq) - 1):
            o, lse = attention_oracle(
                q[:, :, bq[s] : bq[s + 1]], k[:, :, bk[s] : bk[s + 1]], v[:, :, bk[s] : bk[s + 1]],
                pattern, scale, dtype=dtype,
            )
            outs.append(o)
            lses.append(lse)
        tail = q.shape[2] - bq[-1]  # packed rows past the last sequence: 0 and -inf
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
    ok = visible_mask(pattern, Nq, Nk).to(q.device)[None, None]
    if valid_keys is not None:
        ok = ok & valid_keys[:, None, None, :]
    ok = ok.expand(s.shape)
    # Rows that see no key are scored as all-zero and then zeroed, so that autograd through the
    # oracle stays finite there (a logsumexp over only -inf has a NaN gradient).
    any_ok = ok.any(-1, keepdim=True)
    s = torch.where(any_ok, s.masked_fill(~ok, float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * ok
    lse = torch.where(any_ok[..., 0], lse, torch.full_like(lse, float("-inf")))
    return p @ v, lse


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, treating matching infinities as equal (LSE = -inf rows)."""
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def tolerance(dtype, lowp_err: float, ref_mag: float, factor: float) -> float:
    """flash-attention's rule: at most ``factor`` x the error of the naive computation in the same
    dtype (``lowp_err``, both measured against float64), plus a few ulps of the result's magnitude;
    fp32 (TF32 off) gets a tight absolute bound."""
    if dtype == torch.float32:
        return 2e-5 * max(1.0, ref_mag) * factor
    eps = torch.finfo(dtype).eps
    return factor * lowp_err + 4 * eps * max(1.0, ref_mag)
