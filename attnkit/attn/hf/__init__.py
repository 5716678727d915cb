"""Hugging Face transformers integration: ``attn_implementation="attnkit"``.

Importing this package registers the name ``"attnkit"`` with transformers'
``AttentionInterface`` (:func:`attnkit_attention_forward`) and ``AttentionMaskInterface``
(:func:`attnkit_mask`), so ``from_pretrained(..., attn_implementation="attnkit")`` and
``model.set_attn_implementation("attnkit")`` work; :func:`swap_attention` also changes what
layers compute (any :class:`~attnkit.Pattern`, or :class:`LinearAttention`), and
:func:`restore_attention` undoes it. A model saved after :func:`swap_attention` comes back with
the same attention from a plain ``from_pretrained(path)`` once this package is imported (see
:mod:`~attnkit.attn.hf.persist`; learned feature maps: :func:`from_pretrained`).

Modules: :mod:`~.interface` (the two functions transformers calls), :mod:`~.packing` (packed
sequences), :mod:`~.linear` (linear attention on transformers' cache), :mod:`~.specs` (what a
layer runs), :mod:`~.persist` (the config record), :mod:`~.surgery` (swap/restore),
:mod:`~.loading` (learned feature maps from a checkpoint), :mod:`~.runtime` (backend, warnings).
"""

from __future__ import annotations

try:
    from transformers import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "attnkit.hf needs transformers >= 4.48 (AttentionInterface): pip install 'transformers>=4.48'"
    ) from e
try:
    from transformers.masking_utils import AttentionMaskInterface
except ImportError:  # pragma: no cover - transformers < 4.53 builds 4-D masks itself
    AttentionMaskInterface = None

# the private names are for attnkit.finetune (train.py imports _base_model from here) and tests
from .interface import attnkit_attention_forward, attnkit_mask
from .linear import hf_linear_attention
from .linear_cache import LinearAttentionCache
from .loading import from_pretrained, load_learned_feature_maps
from .persist import CONFIG_KEY, SPEC_TYPES, spec_from_json, spec_to_json
from .runtime import NAME, _warned, get_backend, set_backend  # noqa: F401
from .specs import FEATURE_MAP_ATTR, LinearAttention, Spec, check_spec, model_pattern
from .surgery import _attention_modules, _base_model, restore_attention, swap_attention  # noqa: F401

__all__ = [
    "LinearAttentionCache",
    "NAME", "attnkit_attention_forward", "attnkit_mask", "swap_attention", "restore_attention",
    "LinearAttention", "set_backend", "get_backend", "register", "from_pretrained",
    "load_learned_feature_maps", "SPEC_TYPES", "CONFIG_KEY", "FEATURE_MAP_ATTR", "Spec",
    "check_spec", "model_pattern", "spec_from_json", "spec_to_json", "hf_linear_attention",
]


def register() -> None:
    """Register ``"attnkit"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, attnkit_attention_forward)
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(NAME, attnkit_mask)


register()
