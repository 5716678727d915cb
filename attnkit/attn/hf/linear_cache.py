"""A transformers ``Cache`` that keeps a recurrent state for the layers swapped to linear attention.

transformers' default :class:`~transformers.DynamicCache` stores every key and value, so a model
whose layers run :class:`~attnkit.attn.hf.LinearAttention` would rebuild the state from a cache
that grows with the sequence. :class:`LinearAttentionCache` is a ``DynamicCache`` whose linear
layers hold only ``(S [B, Hkv, F, Dv], z [B, Hkv, F])`` instead (the sliding-window + linear
hybrid also the last ``W - 1`` keys/values): each decoding step costs ``O(F * Dv)`` per head
(``O(W * D + F * Dv)`` for the hybrid) and the cache's size does not depend on the number of
tokens. The other
layers (softmax attention in a partly swapped model) keep transformers' own layers (full or
sliding window, from the config), so one cache serves both kinds.

Use it by passing it to ``generate`` (or to a forward call), the mechanism transformers provides
for a model-specific cache (``GenerationMixin._prepare_cache_for_generation`` uses a
user-supplied ``cache`` as it is)::

    out = model.generate(ids, attention_mask=mask, cache=LinearAttentionCache(model))

(``past_key_values=`` is the older name of the same argument.) Without it, ``generate`` builds a
``DynamicCache`` and the linear layers fall back to recomputing their state from all cached keys
(correct, but ``O(T)`` per step; a one-time warning says so).

How the state reaches the layer: transformers' attention modules call ``cache.update(k, v,
layer_idx)`` and hand what it returns to the attention function. A :class:`RecurrentStateLayer`
returns the new tokens' ``k``/``v`` unchanged and tags the returned key tensor with itself
(:data:`STATE_TAG`); :func:`attnkit.attn.hf.linear.hf_linear_attention` finds the tag, runs the
new tokens from the stored state (prefill: :func:`~attnkit.attn.linear.linear_attention` with
``return_state=True``; one token: :func:`~attnkit.attn.linear.linear_attention_step`, the CUDA
step kernel on GPU) and stores the new state. No transformers code is patched.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache

__all__ = ["LinearAttentionCache", "RecurrentStateLayer", "STATE_TAG"]

#: The attribute :meth:`RecurrentStateLayer.update` sets on the key tensor it returns.
STATE_TAG = "_attnkit_state_layer"


class RecurrentStateLayer(CacheLayerMixin):
    """One linear-attention layer's cache: the state ``(s, z)`` after the tokens seen so far.

    ``s [B, Hkv, F, Dv]``, ``z [B, Hkv, F]`` (a :class:`~attnkit.attn.linear.LinearAttentionState`,
    float32; ``None`` before the first forward) and the number of tokens seen, which is what
    transformers asks a layer for (``get_seq_length``, mask sizes, positions).

    For the hybrid (``LinearAttention(window=W)``) the state is a
    :class:`~attnkit.attn.linear.HybridAttentionState`: ``(s, z)`` of the keys that have left
    the window plus the last keys/values in exactly ``W - 1`` slots ``[B, Hkv, W - 1, D]``
    (a fixed-size window, left-filled with invalid slots until ``W - 1`` tokens were seen), and
    ``window_valid [B, W - 1]`` (False = a padded token or an unfilled slot).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False  # a sum of outer products cannot forget its last tokens
    supports_early_init = False  # nothing of [B, H, N, D] shape to pre-allocate

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None
        self.window_valid = None  # the hybrid's window slots: [B, W - 1] bool
        self.seen = 0
        self.device = None
        # True between update() and the attention function taking the state: if the next update
        # finds it still set, the layer no longer runs attnkit linear attention (see update).
        self.pending = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Count the new tokens and return ``(key_states, value_states)`` as they are, the key
        tagged with this layer; the state itself is advanced by the attention function."""
        if self.pending:
            raise RuntimeError(
                "LinearAttentionCache: the previous forward did not run attnkit's linear attention "
                "on this layer, so its state is stale; build the cache after swap_attention(model, "
                "LinearAttention(...)) with attn_implementation='attnkit', and do not reuse it "
                "after restore_attention"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        self.pending = True
        setattr(key_states, STATE_TAG, self)
        return key_states, value_states

    def take(self):
        """The state before this forward's tokens (``None`` at the start); clears ``pending``."""
        self.pending = False
        return self.state

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # As a DynamicLayer: the mask covers every token seen (the padding of the prompt stays
        # visible to the mask function, which cuts the new tokens' columns from it).
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = type(self.state)(*(fn(t) for t in self.state))
        if self.window_valid is not None:
            self.window_valid = fn(self.window_valid)

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.device is not None:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.state, self.window_valid, self.seen, self.pending = None, None, 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError(
            f"LinearAttentionCache cannot crop {tokens_to_remove} tokens: a linear-attention layer "
            "keeps a running sum, not the tokens (assisted generation and other rollbacks need "
            "the DynamicCache)"
        )

    @property
    def nbytes(self) -> int:
        held = [*(self.state or ()), *([] if self.window_valid is None else [self.window_valid])]
        return sum(t.numel() * t.element_size() for t in held)


class LinearAttentionCache(DynamicCache):
    """A ``DynamicCache`` for ``model`` in which every layer swapped to
    :class:`~attnkit.attn.hf.LinearAttention` keeps a :class:`RecurrentStateLayer`.

    Args:
        model: a transformers model after ``swap_attention(model, LinearAttention(...))`` (or
            loaded with saved linear overrides). The layers are chosen when the cache is built.

    Raises:
        ValueError: the model has no attention layer with an ``int`` ``layer_idx``.
    """

    def __init__(self, model):
        from .persist import layer_spec
        from .specs import LinearAttention
        from .surgery import _attention_modules, _base_model

        super().__init__(config=model.config)
        modules = _attention_modules(_base_model(model))
        if not modules:
            raise ValueError(
                f"LinearAttentionCache: {type(model).__name__} has no attention module with an int "
                "layer_idx; pass a transformers model whose layers were swapped with swap_attention"
            )
        self.linear_layers = sorted({m.layer_idx for m in modules
                                     if isinstance(layer_spec(m), LinearAttention)})
        for idx in self.linear_layers:
            while len(self.layers) <= idx:  # configs without per-layer types: fill as DynamicCache
                self.layers.append(_dynamic_layer())
            self.layers[idx] = RecurrentStateLayer()

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' tensors (states, keys, values)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentStateLayer):
                total += layer.nbytes
            else:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)
                             if isinstance(t, torch.Tensor))
        return total


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer()
