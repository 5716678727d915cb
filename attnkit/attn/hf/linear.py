"""Linear attention inside a Hugging Face model (the :class:`LinearAttention` spec).

transformers keeps its own key/value cache whatever the attention function does, so generation
works by *recomputation*: a decoding step with ``Nq`` new queries and ``Nk`` cached keys folds the
``Nk - Nq`` earlier keys into the recurrent state ``(S, z)`` (one ``[F, Dv]`` outer-product sum,
``O(Nk * F * Dv)`` per layer and step) and then runs the new tokens from that state. A whole
generation of ``T`` tokens therefore costs ``O(T^2 * F * Dv)`` instead of the ``O(T * F * Dv)``
a carried state would, while still never forming an ``N x N`` matrix; memory is transformers'
KV cache (``O(T * D)`` per layer), not a constant-size state. The outputs are exactly those of
the parallel form.
"""

from __future__ import annotations

import torch

from ..feature_maps import FEATURE_MAPS
from ..linear import linear_attention
from .specs import LinearAttention

__all__ = ["hf_linear_attention"]


def _phi(spec: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Feature map in fp32 (as the kernels apply it), ``[..., D] -> [..., F]``."""
    fn = FEATURE_MAPS[spec.feature_map] if isinstance(spec.feature_map, str) else spec.feature_map
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return fn(x.to(cdt)) if isinstance(spec.feature_map, str) else fn(x).to(cdt)


def _bidirectional(fq, fk, v, spec, out_dtype):
    """``o = phi(q) S / (phi(q) . z + eps)`` with ``S``, ``z`` summed over every key.
    ``fq [B, Hq, Nq, F]``, ``fk [B, Hkv, Nk, F]``, ``v [B, Hkv, Nk, Dv]``."""
    B, Hq, Nq, F = fq.shape
    Hkv = fk.shape[1]
    s = torch.einsum("bhnf,bhnd->bhfd", fk, v.to(fk.dtype))
    fq = fq.reshape(B, Hkv, Hq // Hkv, Nq, F)
    o = torch.einsum("bhgnf,bhfd->bhgnd", fq, s)
    if spec.normalize:
        o = o / (torch.einsum("bhgnf,bhf->bhgn", fq, fk.sum(2))[..., None] + spec.eps)
    return o.reshape(B, Hq, Nq, -1).to(out_dtype)


def _one(q, k, v, kpm, spec: LinearAttention, causal: bool) -> torch.Tensor:
    """One batch of sequences: ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]``, ``Nq <= Nk``,
    queries bottom-right aligned, ``kpm [B, Nk]`` bool or None. Returns ``[B, Hq, Nq, Dv]``."""
    scale = 1.0 if spec.scale is None else float(spec.scale)
    nq, nk = q.shape[2], k.shape[2]
    fused = isinstance(spec.feature_map, str) and kpm is None and nq == nk and causal
    if fused:  # the whole sequence at once: the feature map runs inside the kernel
        return linear_attention(q, k, v, feature_map=spec.feature_map, causal=True,
                                normalize=spec.normalize, eps=spec.eps, scale=scale)
    fq, fk = _phi(spec, q * scale), _phi(spec, k)
    if kpm is not None:
        fk = fk * kpm[:, None, :, None].to(fk.dtype)  # a padded key adds nothing to S or z
    if not causal:
        return _bidirectional(fq, fk, v, spec, q.dtype)
    past = nk - nq
    state = None
    if past > 0:  # recomputation: fold the cached keys into the state (see the module docstring)
        vp = v[:, :, :past].to(fk.dtype)
        state = (torch.einsum("bhnf,bhnd->bhfd", fk[:, :, :past], vp), fk[:, :, :past].sum(2))
    # the features are cast to q's dtype: linear_attention takes one dtype for q, k, v
    return linear_attention(fq.to(q.dtype), fk[:, :, past:].to(q.dtype), v[:, :, past:],
                            feature_map="identity", causal=True, normalize=spec.normalize,
                            eps=spec.eps, scale=1.0, initial_state=state)


def hf_linear_attention(q, k, v, kpm, spec: LinearAttention, causal: bool, segments=None):
    """Linear attention for the Hugging Face attention function.

    ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]``; ``kpm [B, Nk]`` bool (True = attend) or
    None; ``segments``: ``(q_start, q_end, k_start, k_end)`` of packed sequences along N of a
    ``B = 1`` batch (each runs from an empty state). Returns ``o [B, Hq, Nq, Dv]``.
    """
    if segments is None:
        return _one(q, k, v, kpm, spec, causal)
    parts = [_one(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], None, spec, causal)
             for qs, qe, ks, ke in segments]
    return torch.cat(parts, dim=2)
