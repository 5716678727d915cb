"""What an attention layer of a Hugging Face model computes under attnkit.

A layer runs either a :class:`~attnkit.Pattern` (softmax attention restricted to the pattern) or a
:class:`LinearAttention` spec (kernelised attention). :func:`model_pattern` derives the pattern a
layer already has from what transformers tells the attention function (``is_causal``,
``sliding_window``); :func:`swap_attention <attnkit.attn.hf.swap_attention>` overrides it, and
:mod:`~attnkit.attn.hf.persist` writes the override to the model config.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..patterns import Causal, Dense, Pattern, SlidingWindow

__all__ = ["LinearAttention", "Spec", "model_pattern", "check_spec", "FEATURE_MAP_ATTR"]

#: The attribute of an attention module that holds its learned feature map (an ``nn.Module``,
#: so its weights are part of the model's state dict and ``save_pretrained`` writes them).
FEATURE_MAP_ATTR = "attnkit_feature_map"


@dataclass(frozen=True)
class LinearAttention:
    """Swap a layer's softmax attention for linear attention (:func:`attnkit.attn.linear.linear_attention`).

    Args:
        feature_map: ``"elu1"``, ``"relu"``, ``"identity"`` or a callable ``[..., D] -> [..., F]``
            such as :class:`~attnkit.attn.HedgehogFeatureMap`. A Hedgehog map held by the layer's
            attention module as ``attnkit_feature_map`` (what ``attnkit.finetune`` attaches) is
            saved with the model's weights; any other callable is used in-process only.
        normalize, eps: as :func:`~attnkit.attn.linear.linear_attention`.
        scale: multiplies q before the feature map. ``None`` (default) keeps linear attention's
            own default of 1.0, not the model's ``head_dim ** -0.5``.
        decay: ``None`` (default), a float ``gamma`` in (0, 1], or one ``gamma`` per key/value
            head (a sequence or a 1-D tensor of ``num_key_value_heads`` values, kept as a tuple of
            floats): the state decays per token, ``S_i = gamma S_{i-1} + phi(k_i) v_i^T``
            (:func:`~attnkit.attn.linear.linear_attention`'s ``decay``). Causal layers only.
            Saved in the model config; configs written before this field load with ``None``.
        window: ``None`` (pure linear attention) or an int ``W >= 1``: the sliding-window +
            linear hybrid (:func:`~attnkit.attn.linear.linear_attention`'s ``window``): each
            query attends its last ``W`` keys (itself included) with the model's softmax
            scores (its ``scaling``) and the older keys linearly, under one normaliser; the decay
            weights only the linear part. Causal layers only. Saved in the model config.

    Causality follows the model (causal LMs stay causal, encoders stay bidirectional). Padding
    is honoured by zeroing the padded keys' features, so they add nothing to the state.
    """

    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu1"
    normalize: bool = True
    eps: float = 1e-6
    scale: float | None = None
    decay: float | tuple[float, ...] | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        from ..feature_maps import resolve_feature_map

        resolve_feature_map(self.feature_map)  # raises for an unknown name / a non-callable
        if not isinstance(self.normalize, bool):
            raise TypeError(f"LinearAttention: normalize must be a bool, got {self.normalize!r}")
        for name in ("eps", "scale"):
            value = getattr(self, name)
            if value is None and name == "scale":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"LinearAttention: {name} must be a float, got {value!r}")
        if self.eps < 0:
            raise ValueError(f"LinearAttention: eps must be >= 0, got {self.eps}")
        object.__setattr__(self, "decay", _check_decay(self.decay))
        if self.window is not None and (isinstance(self.window, bool)
                                        or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"LinearAttention: window must be None or an int >= 1 (the softmax "
                             f"window W of the hybrid), got {self.window!r}")


def _check_decay(decay):
    """``decay`` as ``None``, a float or a tuple of floats, each in (0, 1]."""
    if decay is None:
        return None
    if isinstance(decay, torch.Tensor):
        if decay.dim() > 1 or not decay.is_floating_point():
            raise ValueError(f"LinearAttention: decay must be a float or a 1-D float tensor (one "
                             f"gamma per key/value head), got {decay.dtype} {list(decay.shape)}")
        decay = decay.detach().cpu().reshape(-1).tolist()  # a tuple: hashable and JSON-able
    values = list(decay) if isinstance(decay, (list, tuple)) else [decay]
    for g in values:
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not 0 < g <= 1:
            raise ValueError(f"LinearAttention: decay must be a float in (0, 1] or a sequence of "
                             f"them (one per key/value head), got {decay!r}")
    if not values:
        raise ValueError("LinearAttention: decay must not be empty; use None for no decay")
    return tuple(float(g) for g in values) if isinstance(decay, (list, tuple)) else float(decay)


#: What one layer runs: a pattern or a linear-attention spec.
Spec = Pattern | LinearAttention


def check_spec(spec: object, arg: str = "pattern") -> Spec:
    """Return ``spec`` if it is a :class:`Pattern` or :class:`LinearAttention`, else raise."""
    if isinstance(spec, (Pattern, LinearAttention)):
        return spec
    raise TypeError(
        f"{arg} must be an attnkit pattern (Dense(), Causal(), SlidingWindow(left, right), a "
        f"BlockSparse pattern) or attnkit.hf.LinearAttention(...), got {type(spec).__name__} {spec!r}"
    )


def model_pattern(is_causal: bool, sliding_window: int | None, config_window: int | None = None) -> Pattern:
    """The pattern a transformers layer asks for.

    ``sliding_window`` is the value the layer passes to the attention interface, which transformers
    defines in flash-attention's convention: ``window_size = (w - 1, w - 1)``
    (``modeling_flash_attention_utils``). Causal, that keeps keys ``k > q - w`` (``w`` tokens
    counting the query itself): ``SlidingWindow(w - 1, 0)``.

    Bidirectional, the model's own (eager and sdpa) mask is built from ``config.sliding_window``
    (``masking_utils.create_bidirectional_sliding_window_mask``: ``|q - k| <= config.sliding_window``),
    and models disagree on how the passed value relates to it: ModernBERT passes
    ``config.sliding_window + 1`` (so that flash-attention's ``w - 1`` lands on it), T5Gemma passes
    ``config.sliding_window`` itself. ``config_window`` (the layer's ``config.sliding_window``) is
    therefore the truth when given: ``SlidingWindow(c, c)``; without it, flash-attention's
    ``SlidingWindow(w - 1, w - 1)``. (Reading the passed value as ``SlidingWindow(w, w)`` gave
    ModernBERT one extra key on each side in every local layer, without an error.)
    """
    if sliding_window is not None:
        w = int(sliding_window)
        if w < 1:
            raise ValueError(f"sliding_window must be >= 1 (or None), got {sliding_window}")
        if is_causal:
            return SlidingWindow(w - 1, 0)
        if isinstance(config_window, int) and not isinstance(config_window, bool) and config_window >= 0:
            return SlidingWindow(config_window, config_window)
        return SlidingWindow(w - 1, w - 1)
    return Causal() if is_causal else Dense()
