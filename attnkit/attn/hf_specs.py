"""What an attention layer of a Hugging Face model computes under attnkit, and how that is saved.

A layer runs either a :class:`~attnkit.Pattern` (softmax attention restricted to the pattern) or a
:class:`LinearAttention` spec (kernelised attention). :func:`model_pattern` derives the pattern a
layer already has from what transformers tells the attention function (``is_causal``,
``sliding_window``); :func:`swap_attention <attnkit.attn.hf.swap_attention>` overrides it.

Overrides are recorded in the model config as plain JSON (``config.attnkit_attention``) so that
``save_pretrained`` writes them to ``config.json`` and ``from_pretrained`` reads them back::

    {"default": SPEC | null, "layers": {"3": SPEC, ...}}
    SPEC = {"class": "attnkit.attn.patterns.SlidingWindow", "fields": {"left": 1023, "right": 0}}

Only classes from the ``attnkit`` package are rebuilt from a config (a config file never makes
us import arbitrary modules). Tensors in pattern fields (a block-sparse layout) are stored as
nested lists with their dtype. A spec that cannot be written as JSON (a callable feature map, a
mask function) is stored as ``{"unsaved": "<repr>"}``: loading such a config raises a clear error.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .patterns import Causal, Dense, Pattern, SlidingWindow

__all__ = [
    "LinearAttention", "Spec", "model_pattern", "spec_to_json", "spec_from_json", "check_spec",
    "CONFIG_KEY",
]

#: The config attribute that records the overrides.
CONFIG_KEY = "attnkit_attention"


@dataclass(frozen=True)
class LinearAttention:
    """Swap a layer's softmax attention for linear attention (:func:`attnkit.attn.linear.linear_attention`).

    Args:
        feature_map: ``"elu1"``, ``"relu"``, ``"identity"`` or a callable ``[..., D] -> [..., F]``
            (a callable is used in-process but cannot be saved in the config).
        normalize, eps: as :func:`~attnkit.attn.linear.linear_attention`.
        scale: multiplies q before the feature map. ``None`` (default) keeps linear attention's
            own default of 1.0, not the model's ``head_dim ** -0.5``.

    Causality follows the model (causal LMs stay causal, encoders stay bidirectional). Padding
    is honoured by zeroing the padded keys' features, so they add nothing to the state.
    """

    feature_map: str | Callable[[torch.Tensor], torch.Tensor] = "elu1"
    normalize: bool = True
    eps: float = 1e-6
    scale: float | None = None

    def __post_init__(self) -> None:
        from .feature_maps import resolve_feature_map

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


# --------------------------------------------------------------------------------------------
# JSON round trip
# --------------------------------------------------------------------------------------------


class _Unsaveable(Exception):
    pass


def _value_to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return [_value_to_json(v) for v in value]
    raise _Unsaveable(type(value).__name__)


def _value_from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tensor", "dtype"}:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, list):
        return tuple(_value_from_json(v) for v in value)
    return value


def spec_to_json(spec: Spec | None) -> dict | None:
    """A JSON-able description of ``spec`` (``None`` = the model's own pattern)."""
    if spec is None:
        return None
    cls = type(spec)
    try:
        if not dataclasses.is_dataclass(spec):
            raise _Unsaveable(cls.__name__)
        fields = {f.name: _value_to_json(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                  if f.init}
    except _Unsaveable:
        return {"unsaved": repr(spec)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}


def spec_from_json(data: object, where: str) -> Spec | None:
    """Rebuild a spec written by :func:`spec_to_json`; ``where`` names it in errors."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a pattern description (a dict), got {data!r}")
    if "unsaved" in data:
        raise ValueError(
            f"{where}: the config records an attnkit pattern that could not be saved as JSON "
            f"({data['unsaved']}); call attnkit.hf.swap_attention(model, ...) again after loading"
        )
    path, fields = data.get("class"), data.get("fields", {})
    if not isinstance(path, str) or not path.startswith("attnkit.") or "." not in path:
        raise ValueError(f"{where}: expected a class from the attnkit package, got {path!r}")
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot find {path} in this attnkit version ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, (Pattern, LinearAttention))):
        raise ValueError(f"{where}: {path} is not an attnkit pattern")
    try:
        return cls(**{k: _value_from_json(v) for k, v in fields.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot rebuild {path} from {fields!r}: {e}") from None
