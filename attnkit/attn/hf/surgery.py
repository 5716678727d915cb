"""Model surgery: :func:`swap_attention` and :func:`restore_attention`."""

from __future__ import annotations

import numbers
from collections.abc import Iterable

import torch

from .persist import (
    CONFIG_KEY,
    cached_layer_spec,
    clear_layer_spec,
    forget_implementation,
    record_implementation,
    set_layer_spec,
    spec_to_json,
    uses_learned_feature_map,
)
from .runtime import NAME, _warn_once
from .specs import FEATURE_MAP_ATTR, Spec, check_spec

__all__ = ["swap_attention", "restore_attention", "check_attention_backend_support",
           "routes_through_interface"]


def _base_model(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    from transformers import PreTrainedModel

    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> the transformers model
        if isinstance(inner, PreTrainedModel):
            return inner
        get = getattr(inner, "get_base_model", None)
        inner = get() if callable(get) else getattr(inner, "model", None)
    if isinstance(inner, PreTrainedModel):
        return inner
    raise TypeError(
        f"model must be a transformers PreTrainedModel (or a PEFT model wrapping one), got "
        f"{type(model).__name__}"
    )


def _attention_modules(base) -> list[torch.nn.Module]:
    """Modules that transformers' attention functions receive: they carry an int ``layer_idx``."""
    return [m for m in base.modules() if isinstance(getattr(m, "layer_idx", None), int)
            and hasattr(m, "config")]


def _configs(base, modules) -> list:
    """The model's config and every distinct sub-config its attention modules read."""
    return list({id(c): c for c in [base.config] + [m.config for m in modules]}.values())


def _set_implementation(base, name: str) -> None:
    setter = getattr(base, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    else:  # transformers < 4.56: no setter; the attribute is read at every call
        base.config._attn_implementation = name


def _check_layers(layers: object, available: set[int]) -> list[int]:
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, Iterable) or isinstance(layers, (str, bytes)):
        raise TypeError(f"layers must be an int, an iterable of ints or None, got {type(layers).__name__}")
    out = []
    n = max(available) + 1 if available else 0
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layers must hold ints, got {i!r}")
        i = int(i) + (n if i < 0 else 0)  # -1 = the last layer
        if i not in available:
            raise ValueError(f"layers: no attention layer {i}; this model has layers 0..{n - 1}")
        out.append(i)
    return out


def _entry(spec: Spec | None, modules: list) -> dict | None:
    """The config entry for ``spec`` on ``modules``; warns when it cannot be saved."""
    raw = spec_to_json(spec)
    why = None
    if raw is not None and "unsaved" in raw:
        why = "it cannot be written to the config as JSON"
    elif uses_learned_feature_map(raw) and any(
            getattr(m, FEATURE_MAP_ATTR, None) is not spec.feature_map for m in modules):
        # the weights are saved as the layer's submodule; a map held elsewhere is not saved
        raw = {"unsaved": repr(spec)}
        why = (f"its HedgehogFeatureMap is not the layer's '{FEATURE_MAP_ATTR}' submodule "
               "(attnkit.finetune.linearize.attach_feature_maps puts it there), so its weights "
               "cannot be written to the config or the checkpoint")
    if why is not None:
        _warn_once(f"unsaved:{raw['unsaved']}", f"{spec!r}: {why}; it applies to this model object "
                   "but save_pretrained will not keep it")
    return raw


#: The registry a modeling module must look its attention function up in to run attnkit.
_REGISTRY_NAME = "ALL_ATTENTION_FUNCTIONS"


def routes_through_interface(model) -> bool:
    """Whether ``model`` computes attention through transformers' ``AttentionInterface``.

    ``_supports_attention_backend = True`` says so; but it is not the whole truth: BART, T5,
    Whisper and many encoder-decoders leave it ``False`` (the class default) and still look their
    attention function up in ``ALL_ATTENTION_FUNCTIONS`` (transformers 5.16 and 5.24; refusing on
    the flag alone refused BART, which runs on attnkit). So a model also routes when a module it is
    built of comes from a modeling file that uses that registry; Falcon's picks an attention class
    by name from a dict of its own and calls torch's SDPA itself, so it does not.
    """
    import sys

    if getattr(type(model), "_supports_attention_backend", False):
        return True
    seen = set()
    for m in model.modules():
        name = type(m).__module__
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name)
        if module is not None and _REGISTRY_NAME in vars(module):
            return True
    return False


def check_attention_backend_support(model) -> None:
    """Raise ``ValueError`` for a model with T5's relative position bias (attnkit refuses
    ``position_bias``), and for one that does not route attention through transformers'
    ``AttentionInterface`` (:func:`routes_through_interface`; e.g. Falcon, which calls torch's SDPA
    itself): asking it for "attnkit" would silently run its own attention (or, through
    ``from_config(attn_implementation="attnkit")``, fail with a bare ``KeyError``)."""
    biased = next((m for m in model.modules() if getattr(m, "has_relative_attention_bias", False)
                   is True), None)
    if biased is not None:
        # T5 and its kin route through the interface but add a dense relative position bias to
        # every layer's scores (position_bias): refused here, before any call, rather than at
        # the first forward
        raise ValueError(
            f"{type(model).__name__} adds a relative position bias to its attention scores "
            f"({type(biased).__name__}.has_relative_attention_bias; passed as position_bias, as "
            "in T5), which attnkit does not support; keep attn_implementation='sdpa' or 'eager' "
            "for this model"
        )
    if not routes_through_interface(model):
        name = type(model).__name__
        raise ValueError(
            f"{name} does not route its attention through transformers' AttentionInterface "
            f"(none of its modules looks attention up in {_REGISTRY_NAME}: it calls its own "
            "attention code), so attnkit cannot run it; keep attn_implementation='sdpa' or "
            "'eager' for this model (the README lists the families known to route through the "
            "interface)"
        )


def swap_attention(model, pattern: Spec | None = None, *, layers: int | Iterable[int] | None = None):
    """Run ``model``'s attention on attnkit, optionally with another pattern.

    Args:
        model: a transformers ``PreTrainedModel`` or a PEFT model wrapping one (changed in place).
        pattern: ``None`` keeps each layer's own pattern (causal/bidirectional, its sliding
            window); an :class:`~attnkit.Pattern` (``SlidingWindow(1023)``, a ``BlockSparse``
            pattern, ``Dense()``, ...) or :class:`~attnkit.attn.hf.LinearAttention` replaces it.
            Padding and packing still apply on top of the pattern.
        layers: ``None`` sets ``pattern`` for every layer and drops earlier per-layer overrides;
            an int or ints (``-1`` = the last layer) set it for those layers only, on top of
            earlier calls. So ``swap_attention(m, SlidingWindow(1023))`` then
            ``swap_attention(m, None, layers=[-2, -1])`` gives every layer but the last two a
            window and leaves the last two as the model built them.

    The override is stored as JSON in ``config.attnkit_attention``, next to
    ``config.attn_implementation = "attnkit"``; ``save_pretrained`` writes both, so a plain
    ``from_pretrained(path)`` after ``import attnkit.hf`` runs the same attention again (see
    :mod:`attnkit.attn.hf.persist`). Patterns holding other Python callables cannot be saved (a
    warning says so).

    Returns:
        ``model``.
    """
    base = _base_model(model)
    check_attention_backend_support(base)
    spec = None if pattern is None else check_spec(pattern)
    modules = _attention_modules(base)
    available = {m.layer_idx for m in modules}
    chosen = set(available if layers is None else _check_layers(layers, available))
    raw_spec = _entry(spec, [m for m in modules if m.layer_idx in chosen])

    old = getattr(base.config, CONFIG_KEY, None) or {}
    if layers is None:
        raw = {"default": raw_spec, "layers": {}}
    else:
        raw = {"default": old.get("default"), "layers": dict(old.get("layers") or {})}
        for i in sorted(chosen):
            raw["layers"][str(i)] = raw_spec
    # the other layers keep the spec objects they run in this process (callables the JSON lacks
    # included); one that never ran reads the same entry from the new config later
    kept = {id(m): cached_layer_spec(m, getattr(m.config, CONFIG_KEY, None)) for m in modules
            if m.layer_idx not in chosen}

    for cfg in _configs(base, modules):
        setattr(cfg, CONFIG_KEY, raw)
        record_implementation(cfg)
    for m in modules:
        hit, layer_spec = (True, spec) if m.layer_idx in chosen else kept[id(m)]
        if hit:
            set_layer_spec(m, raw, layer_spec)
        else:
            clear_layer_spec(m)

    current = base.config._attn_implementation
    if current != NAME:
        base.__dict__["_attnkit_previous"] = current
        _set_implementation(base, NAME)
    return model


def restore_attention(model):
    """Undo :func:`swap_attention`: the implementation the model had before (``"sdpa"`` for a
    model loaded with ``attn_implementation="attnkit"``), and no attnkit record in its config
    (neither the overrides nor ``attn_implementation``). Returns ``model``."""
    base = _base_model(model)
    previous = base.__dict__.pop("_attnkit_previous", None) or "sdpa"
    modules = _attention_modules(base)
    for cfg in _configs(base, modules):
        if hasattr(cfg, CONFIG_KEY):
            delattr(cfg, CONFIG_KEY)
        forget_implementation(cfg)
    for m in modules:
        clear_layer_spec(m)
    _set_implementation(base, previous)
    return model
