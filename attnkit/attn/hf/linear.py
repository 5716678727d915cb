"""Linear attention inside a Hugging Face model (the :class:`LinearAttention` spec).

Generation has two paths:

* with :class:`~attnkit.attn.hf.linear_cache.LinearAttentionCache` (pass ``cache=`` to
  ``generate``), a swapped layer's cache holds the recurrent state ``(S, z)`` only: the key tensor
  the cache returns carries its layer (``STATE_TAG``), and the new tokens run from the stored
  state, ``O(F * Dv)`` per head and token, constant memory;
* with transformers' own KV cache (the default ``DynamicCache``), the state is *recomputed*: a step
  with ``Nq`` new queries and ``Nk`` cached keys folds the ``Nk - Nq`` earlier keys into ``(S, z)``
  (``O(Nk * F * Dv)`` per layer and step, so ``O(T^2)`` for ``T`` tokens, and an ``O(T)`` cache),
  then runs the new tokens from it. A one-time warning points to the cache above.

Both give the outputs of the parallel form (up to rounding). ``LinearAttention(window=W)`` (the
sliding-window + linear hybrid) takes the same two paths (:mod:`.linear_hybrid`); its cache
layer also keeps the last ``W - 1`` keys/values. Packed batches run
:func:`~attnkit.attn.linear.linear_attention`'s ``cu_seqlens`` path.
"""

from __future__ import annotations

import torch

from ..feature_maps import FEATURE_MAPS
from ..linear import linear_attention, linear_attention_step
from .linear_cache import STATE_TAG
from .linear_hybrid import hybrid_attention, pad_window
from .runtime import _warn_once
from .specs import LinearAttention

__all__ = ["hf_linear_attention"]


def _phi(spec: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Feature map in fp32 (as the kernels apply it), ``[..., D] -> [..., F]``."""
    fn = FEATURE_MAPS[spec.feature_map] if isinstance(spec.feature_map, str) else spec.feature_map
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return fn(x.to(cdt)) if isinstance(spec.feature_map, str) else fn(x).to(cdt)


def _decay(spec: LinearAttention, k: torch.Tensor):
    """The spec's ``decay`` as :func:`linear_attention` takes it (a float, or ``[Hkv]``)."""
    if isinstance(spec.decay, tuple) and len(spec.decay) not in (1, k.shape[1]):
        raise ValueError(f"{spec!r}: decay has {len(spec.decay)} values but this layer has "
                         f"{k.shape[1]} key/value heads; give one gamma per key/value head")
    if isinstance(spec.decay, tuple):  # built on the CPU: validated there without a device sync
        return torch.tensor(spec.decay, dtype=torch.float64)
    return spec.decay


def _check_causal(spec: LinearAttention, causal: bool) -> None:
    if not causal and spec.window is not None:
        raise ValueError(f"{spec!r}: the sliding-window + linear hybrid (window=) needs a causal "
                         "(decoder) layer; this layer is bidirectional (use window=None)")
    if not causal and spec.decay is not None and spec.decay not in (1.0, (1.0,)):
        raise ValueError(f"{spec!r}: decay needs a causal (decoder) layer; this layer is "
                         "bidirectional (use decay=None)")


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


def _hybrid_one(q, k, v, kpm, spec: LinearAttention, scaling) -> torch.Tensor:
    """:func:`_one` for the hybrid: the cached keys (``Nk > Nq``) are run first to rebuild the
    state (the linear state of the keys that left the window, and the window itself)."""
    past = k.shape[2] - q.shape[2]
    state = valid = None
    if past > 0:
        _warn_once("hybrid-recompute", "a layer swapped to LinearAttention(window=...) is decoding "
                   "from transformers' KV cache, recomputing its state from every cached key each "
                   "step; pass cache=LinearAttentionCache(model) (attnkit.attn.hf.linear_cache) to "
                   "generate for O(1) steps and a constant-size cache")
        # the past's outputs are not needed, only its state: any queries of the right shape do
        _, state, valid = hybrid_attention(
            q.new_zeros(q.shape[:2] + (past, q.shape[-1])), k[:, :, :past], v[:, :, :past],
            None if kpm is None else kpm[:, :past], spec, _phi, scaling)
    o, _, _ = hybrid_attention(q, k[:, :, past:], v[:, :, past:],
                               None if kpm is None else kpm[:, past:], spec, _phi, scaling, state,
                               valid)
    return o


def _one(q, k, v, kpm, spec: LinearAttention, causal: bool, scaling=None) -> torch.Tensor:
    """One batch of sequences: ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]``, ``Nq <= Nk``,
    queries bottom-right aligned, ``kpm [B, Nk]`` bool or None. Returns ``[B, Hq, Nq, Dv]``."""
    _check_causal(spec, causal)
    if spec.window is not None:
        return _hybrid_one(q, k, v, kpm, spec, scaling)
    scale = 1.0 if spec.scale is None else float(spec.scale)
    nq, nk = q.shape[2], k.shape[2]
    decay = _decay(spec, k)
    fused = isinstance(spec.feature_map, str) and kpm is None and nq == nk and causal
    if fused:  # the whole sequence at once: the feature map runs inside the kernel
        return linear_attention(q, k, v, feature_map=spec.feature_map, causal=True,
                                normalize=spec.normalize, eps=spec.eps, scale=scale, decay=decay)
    fq, fk = _phi(spec, q * scale), _phi(spec, k)
    if kpm is not None:
        fk = fk * kpm[:, None, :, None].to(fk.dtype)  # a padded key adds nothing to S or z
    if not causal:
        return _bidirectional(fq, fk, v, spec, q.dtype)
    past = nk - nq
    state = None
    if past > 0:  # recomputation: fold the cached keys into the state (see the module docstring)
        _warn_once("linear-recompute", "a layer swapped to LinearAttention is decoding from "
                   "transformers' KV cache, recomputing its state from every cached key each "
                   "step; pass cache=LinearAttentionCache(model) (attnkit.attn.hf.linear_cache) "
                   "to generate for O(1) steps and a constant-size cache")
        vp, kp = v[:, :, :past].to(fk.dtype), fk[:, :, :past]
        if decay is not None:  # key j of the past enters the state as gamma^(past - 1 - j)
            g = torch.as_tensor(decay, dtype=fk.dtype, device=fk.device).reshape(-1)
            ages = torch.arange(past - 1, -1, -1, device=fk.device, dtype=fk.dtype)
            kp = kp * (g[:, None] ** ages)[None, :, :, None]  # [1, Hkv (or 1), past, 1]
        state = (torch.einsum("bhnf,bhnd->bhfd", kp, vp), kp.sum(2))
    # the features are cast to q's dtype: linear_attention takes one dtype for q, k, v
    return linear_attention(fq.to(q.dtype), fk[:, :, past:].to(q.dtype), v[:, :, past:],
                            feature_map="identity", causal=True, normalize=spec.normalize,
                            eps=spec.eps, scale=1.0, initial_state=state, decay=decay)


def _from_state(q, k, v, kpm, spec: LinearAttention, causal: bool, layer,
                scaling=None) -> torch.Tensor:
    """The new tokens ``q``/``k``/``v [B, H, Nq, D]`` of a layer whose cache is the
    :class:`~attnkit.attn.hf.linear_cache.RecurrentStateLayer` ``layer``: run them from its state
    and store the state after them. ``kpm [B, Nq]`` (True = attend) or None."""
    state = layer.take()
    if not causal:
        raise ValueError("LinearAttentionCache serves causal (decoder) layers only; this layer is "
                         "bidirectional, run it without a cache")
    _check_causal(spec, causal)
    if k.shape[2] != q.shape[2]:
        raise RuntimeError(f"LinearAttentionCache: the layer got {q.shape[2]} queries but "
                           f"{k.shape[2]} keys; its cache returns exactly the new tokens' keys")
    if spec.window is not None:  # the hybrid: state + a W - 1-slot window, a fixed layout
        o, st, valid = hybrid_attention(q, k, v, kpm, spec, _phi, scaling, state,
                                        layer.window_valid)
        layer.state, layer.window_valid = pad_window(st, valid, spec.window)
        return o
    scale = 1.0 if spec.scale is None else float(spec.scale)
    kw = dict(normalize=spec.normalize, eps=spec.eps, decay=_decay(spec, k))
    if isinstance(spec.feature_map, str) and kpm is None:  # the map runs inside the kernels
        kw.update(feature_map=spec.feature_map, scale=scale)
    else:  # map outside, so that padded keys can be zeroed: they must add nothing to S or z
        fq, fk = _phi(spec, q * scale), _phi(spec, k)
        if kpm is not None:
            fk = fk * kpm[:, None, :, None].to(fk.dtype)
        q, k = fq.to(q.dtype), fk.to(q.dtype)
        kw.update(feature_map="identity", scale=1.0)
    if q.shape[2] == 1:  # a decoding step: the recurrent form (the CUDA step kernel on GPU)
        o, layer.state = linear_attention_step(q, k, v, state, **kw)
    else:  # prefill (or several new tokens): the parallel form, keeping the final state
        o, layer.state = linear_attention(q, k, v, causal=True, initial_state=state,
                                          return_state=True, **kw)
    return o


def hf_linear_attention(q, k, v, kpm, spec: LinearAttention, causal: bool, segments=None,
                        state_layer=None, scaling=None):
    """Linear attention for the Hugging Face attention function.

    ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]``; ``kpm [B, Nk]`` bool (True = attend) or
    None; ``segments``: ``(q_start, q_end, k_start, k_end)`` of packed sequences along N of a
    ``B = 1`` batch (each runs from an empty state). Returns ``o [B, Hq, Nq, Dv]``.

    A ``k`` tagged by a :class:`~attnkit.attn.hf.linear_cache.RecurrentStateLayer` holds only the
    new tokens: they run from that layer's stored state (see the module docstring);
    ``state_layer`` is that layer when the caller read the tag before re-laying ``k`` out.
    ``scaling``: the model's softmax scale, for the hybrid's window scores (``D ** -0.5`` when
    None).
    """
    layer = state_layer if state_layer is not None else getattr(k, STATE_TAG, None)
    if layer is not None:
        if segments is not None:
            raise ValueError("LinearAttentionCache cannot serve packed sequences "
                             "(cu_seq_lens / restarting position_ids); run packed batches "
                             "without a cache (use_cache=False)")
        return _from_state(q, k, v, kpm, spec, causal, layer, scaling)
    if segments is None:
        return _one(q, k, v, kpm, spec, causal, scaling)
    if all((qs, qe) == (ks, ke) for qs, qe, ks, ke in segments):  # packed: the varlen path
        return _packed(q, k, v, spec, causal, tuple((qs, qe) for qs, qe, _, _ in segments),
                       scaling)
    parts = [_one(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], None, spec, causal, scaling)
             for qs, qe, ks, ke in segments]
    return torch.cat(parts, dim=2)


def _packed(q, k, v, spec: LinearAttention, causal: bool, segs, scaling) -> torch.Tensor:
    """Packed sequences along N of a ``B = 1`` batch, each from an empty state, in one varlen
    call (:func:`~attnkit.attn.linear.linear_attention`'s ``cu_seqlens``)."""
    _check_causal(spec, causal)
    if spec.window is not None:
        return hybrid_attention(q, k, v, None, spec, _phi, scaling, segments=segs)[0]
    cu = torch.tensor([0] + [e for _, e in segs], dtype=torch.int32)
    return linear_attention(q, k, v, feature_map=spec.feature_map, causal=causal,
                            normalize=spec.normalize, eps=spec.eps,
                            scale=1.0 if spec.scale is None else float(spec.scale),
                            decay=_decay(spec, k), cu_seqlens=cu)
