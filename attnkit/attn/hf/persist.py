"""The attnkit record in a Hugging Face model config, and how a layer reads its spec from it.

:func:`~attnkit.attn.hf.swap_attention` records two things in the config, so that
``save_pretrained`` writes them to ``config.json``:

* ``attn_implementation = "attnkit"``: transformers' config constructor reads this key back
  (``PreTrainedConfig(attn_implementation=...)``), so a plain ``from_pretrained(path)`` builds
  the model on attnkit again, and fails with transformers' "not supported" error naming
  ``"attnkit"`` when ``import attnkit.hf`` has not registered that name (never a silent
  ``sdpa``);
* ``attnkit_attention`` (:data:`CONFIG_KEY`), the overrides as plain JSON::

    {"default": SPEC | null, "layers": {"3": SPEC, ...}}
    SPEC = {"type": "sliding_window", "left": 1023, "right": 0}
         | {"type": "linear_attention", "feature_map": "elu1", "normalize": true, ...}
         | {"type": "linear_attention", "feature_map": {"type": "hedgehog", "head_dim": 64,
            "feature_dim": 64, "num_heads": null}, ...}

``type`` is a name from :data:`SPEC_TYPES` (never a module path: a config file never makes us
import anything, and a class may move without breaking saved models); the other keys are the
class's constructor fields. Tensors (a block-sparse layout) are ``{"tensor": nested lists,
"dtype": "bool"}``. A Hedgehog feature map's weights are not in the JSON: they are the layer's
``attnkit_feature_map`` submodule in the model's state dict (see :mod:`~attnkit.attn.hf.loading`).
A spec that cannot be written (another callable feature map) is ``{"unsaved": "<repr>"}``, and
loading it raises. Configs written before registry names (``{"class":
"attnkit.attn.patterns.SlidingWindow", "fields": {...}}``) still load through
:data:`LEGACY_CLASS_PATHS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..block_sparse import BlockSparse
from ..feature_maps import HedgehogFeatureMap
from ..patterns import Causal, Dense, SlidingWindow
from .runtime import NAME
from .specs import FEATURE_MAP_ATTR, LinearAttention, Spec

__all__ = [
    "CONFIG_KEY", "SPEC_TYPES", "LEGACY_CLASS_PATHS", "spec_to_json", "spec_from_json", "layer_spec",
]

#: The config attribute that records the overrides.
CONFIG_KEY = "attnkit_attention"
#: The config key transformers' config constructor turns into ``config._attn_implementation``.
IMPLEMENTATION_KEY = "attn_implementation"

#: Registry name -> spec class. Every class is a dataclass whose init fields are the JSON keys.
SPEC_TYPES: dict[str, type] = {
    "dense": Dense,
    "causal": Causal,
    "sliding_window": SlidingWindow,
    "block_sparse": BlockSparse,
    "linear_attention": LinearAttention,
}
_TYPE_OF = {cls: name for name, cls in SPEC_TYPES.items()}

#: Class paths that configs written before registry names record (``{"class": path, "fields":
#: {...}}``; ``attnkit.attn.hf_specs`` became ``attnkit.attn.hf.specs``) -> registry name.
LEGACY_CLASS_PATHS: dict[str, str] = {
    "attnkit.attn.patterns.Dense": "dense",
    "attnkit.attn.patterns.Causal": "causal",
    "attnkit.attn.patterns.SlidingWindow": "sliding_window",
    "attnkit.attn.block_sparse.BlockSparse": "block_sparse",
    "attnkit.attn.hf_specs.LinearAttention": "linear_attention",
    "attnkit.attn.hf.specs.LinearAttention": "linear_attention",
}

#: The ``feature_map`` value that stands for a learned :class:`HedgehogFeatureMap`.
_HEDGEHOG = "hedgehog"
#: Where a layer memoises its parsed spec: ``(the config entry it was read from, spec)``.
_MEMO = "_attnkit_spec"


class _Unsaveable(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _value_to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        return [_value_to_json(v) for v in value]
    if isinstance(value, HedgehogFeatureMap):  # the shapes; the weights go with the state dict
        return {"type": _HEDGEHOG, "head_dim": value.head_dim, "feature_dim": value.feature_dim,
                "num_heads": value.num_heads}
    raise _Unsaveable(type(value).__name__)


def spec_to_json(spec: Spec | None) -> dict | None:
    """A JSON-able description of ``spec`` (``None`` = the model's own pattern), e.g.
    ``{"type": "sliding_window", "left": 1023, "right": 0}``, or ``{"unsaved": repr}``."""
    if spec is None:
        return None
    name = _TYPE_OF.get(type(spec))
    try:
        if name is None:
            raise _Unsaveable(type(spec).__name__)
        fields = {f.name: _value_to_json(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                  if f.init}
    except _Unsaveable:
        return {"unsaved": repr(spec)}
    return {"type": name, **fields}


def uses_learned_feature_map(entry: dict | None) -> bool:
    """Whether a :func:`spec_to_json` entry needs the layer's ``attnkit_feature_map`` weights."""
    fm = entry.get("feature_map") if isinstance(entry, dict) else None
    return isinstance(fm, dict) and fm.get("type") == _HEDGEHOG


def record_implementation(config) -> None:
    """Make ``save_pretrained`` write ``"attn_implementation": "attnkit"`` (transformers does not
    save the implementation itself)."""
    setattr(config, IMPLEMENTATION_KEY, NAME)


def forget_implementation(config) -> None:
    config.__dict__.pop(IMPLEMENTATION_KEY, None)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _value_from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tensor", "dtype"}:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, list):
        return tuple(_value_from_json(v) for v in value)
    return value


def _known() -> str:
    return ", ".join(map(repr, SPEC_TYPES))


def _type_and_fields(data: dict, where: str) -> tuple[str, dict]:
    if "type" in data:
        name = data["type"]
        if name not in SPEC_TYPES:
            raise ValueError(f"{where}: unknown attnkit attention type {name!r}; known types: {_known()}")
        return name, {k: v for k, v in data.items() if k != "type"}
    path = data.get("class")
    if path is None:
        raise ValueError(f"{where}: expected {{'type': NAME, ...fields}} with NAME one of {_known()}, "
                         f"got {data!r}")
    if path not in LEGACY_CLASS_PATHS:
        raise ValueError(
            f"{where}: {path!r} is not a class that configs from the attnkit package record; known "
            f"class paths: {', '.join(map(repr, LEGACY_CLASS_PATHS))} (or use {{'type': NAME}} "
            f"with NAME one of {_known()})"
        )
    fields = data.get("fields", {})
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: 'fields' must be a dict, got {fields!r}")
    return LEGACY_CLASS_PATHS[path], fields


def _learned_feature_map(desc: dict, module, where: str) -> HedgehogFeatureMap:
    """The layer's own :class:`HedgehogFeatureMap`, checked against the shapes the config names."""
    shape = {k: desc.get(k) for k in ("head_dim", "feature_dim", "num_heads")}
    fm = getattr(module, FEATURE_MAP_ATTR, None) if module is not None else None
    if not isinstance(fm, HedgehogFeatureMap):
        raise ValueError(
            f"{where}: this layer runs linear attention with a learned Hedgehog feature map "
            f"{shape}, whose weights are the layer's '{FEATURE_MAP_ATTR}' submodule; the model has "
            "no such submodule (transformers' from_pretrained does not create it and drops those "
            "weights): load the model with attnkit.hf.from_pretrained(path), or "
            "attnkit.finetune.load_finetuned(out_dir) for an 'attnkit finetune' output"
        )
    have = {"head_dim": fm.head_dim, "feature_dim": fm.feature_dim, "num_heads": fm.num_heads}
    if have != shape:
        raise ValueError(f"{where}: the config records a Hedgehog feature map {shape}, the layer's "
                         f"'{FEATURE_MAP_ATTR}' is {have}")
    return fm


def spec_from_json(data: object, where: str = "attnkit_attention", module=None) -> Spec | None:
    """Rebuild a spec written by :func:`spec_to_json` (or by an attnkit before registry names).

    ``where`` names the entry in errors; ``module`` is the layer's attention module, which holds
    a learned feature map (needed only for ``"feature_map": {"type": "hedgehog", ...}``).
    """
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an attnkit attention description (a dict), got {data!r}")
    if "unsaved" in data:
        raise ValueError(
            f"{where}: the config records an attnkit pattern that could not be saved as JSON "
            f"({data['unsaved']}); call attnkit.hf.swap_attention(model, ...) again after loading"
        )
    name, fields = _type_and_fields(data, where)
    kwargs = {k: _value_from_json(v) for k, v in fields.items()}
    if name == "linear_attention" and uses_learned_feature_map(fields):
        kwargs["feature_map"] = _learned_feature_map(fields["feature_map"], module, where)
    try:
        return SPEC_TYPES[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot rebuild {name!r} from {fields!r}: {e}") from None


def layer_spec(module) -> Spec | None:
    """The override of ``module``'s layer, or ``None`` (the model's own pattern).

    Read from ``module.config.attnkit_attention`` (so a model loaded with ``from_pretrained``
    gets its saved overrides) and memoised on the module until that config entry changes.
    """
    config = getattr(module, "config", None)
    raw = getattr(config, CONFIG_KEY, None)
    memo = module.__dict__.get(_MEMO)
    if memo is not None and memo[0] is raw:
        return memo[1]
    spec = None
    if raw is not None:
        if not isinstance(raw, dict):
            raise ValueError(f"config.{CONFIG_KEY} must be a dict {{'default': ..., 'layers': ...}}, "
                             f"got {raw!r}")
        layer = getattr(module, "layer_idx", None)
        layers = raw.get("layers") or {}
        key = str(layer)
        where = f"config.{CONFIG_KEY}"
        if layer is not None and key in layers:
            spec = spec_from_json(layers[key], f"{where}['layers'][{key!r}]", module)
        else:
            spec = spec_from_json(raw.get("default"), f"{where}['default']", module)
    # a model loaded with attnkit lost the key (transformers' config constructor pops it):
    # record it again so that saving this model keeps it
    if (config is not None and IMPLEMENTATION_KEY not in config.__dict__
            and getattr(config, "_attn_implementation", None) == NAME):
        record_implementation(config)
    set_layer_spec(module, raw, spec)
    return spec


def set_layer_spec(module, raw: dict | None, spec: Spec | None) -> None:
    """Memoise ``spec`` (possibly holding callables the JSON lacks) as read from ``raw``."""
    module.__dict__[_MEMO] = (raw, spec)


def cached_layer_spec(module, raw: dict | None) -> tuple[bool, Spec | None]:
    """``(True, spec)`` when ``module`` memoised a spec read from ``raw``, else ``(False, None)``."""
    memo = module.__dict__.get(_MEMO)
    return (True, memo[1]) if memo is not None and memo[0] is raw else (False, None)


def clear_layer_spec(module) -> None:
    module.__dict__.pop(_MEMO, None)
