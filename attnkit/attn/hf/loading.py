"""Loading a saved attnkit model whose layers hold learned feature maps.

A plain ``AutoModel*.from_pretrained(path)`` after ``import attnkit.hf`` restores every pattern
and every linear-attention spec with a built-in feature map from ``config.json``. A learned
:class:`~attnkit.attn.HedgehogFeatureMap` is a submodule of its attention module
(``attnkit_feature_map``), so ``save_pretrained`` writes its weights into the checkpoint; but
the model class transformers builds has no such submodule, and transformers drops those weights
as unexpected keys. :func:`from_pretrained` loads the model as transformers does, then builds
each map the config names and fills it from the checkpoint. (A model loaded plainly refuses to
run those layers, with an error that names this function, instead of running without the maps.)
"""

from __future__ import annotations

import json

import torch

from ..feature_maps import HedgehogFeatureMap
from .persist import CONFIG_KEY, clear_layer_spec, record_implementation, uses_learned_feature_map
from .runtime import NAME
from .specs import FEATURE_MAP_ATTR
from .surgery import _attention_modules, _base_model, _configs

__all__ = ["from_pretrained", "load_learned_feature_maps"]

#: ``from_pretrained`` keywords that say where the checkpoint files are.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


def _entry(raw: dict, layer: int):
    layers = raw.get("layers") or {}
    return layers[str(layer)] if str(layer) in layers else raw.get("default")


def _checkpoint_tensors(path, marker: str, hub: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors checkpoint at ``path`` whose name contains ``marker``."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(name: str):
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub)

    index = fetch("model.safetensors.index.json")
    if index is not None:
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    out = {}
    for name in names:
        file = fetch(name)
        if file is None:
            raise ValueError(f"{path}: no {name}; the learned feature maps are read from the "
                             "safetensors checkpoint save_pretrained writes")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if marker in key:
                    out[key] = f.get_tensor(key)
    return out


def _lookup(tensors: dict, name: str, prefix: str, leaf: str):
    """The checkpoint tensor of module ``name``'s ``leaf``, saved with or without the base
    model's prefix (a ``...ForCausalLM`` checkpoint loaded as the bare model, or the reverse)."""
    key = f"{name}.{FEATURE_MAP_ATTR}.{leaf}"
    candidates = [key, f"{prefix}.{key}" if prefix else key]
    if prefix and key.startswith(prefix + "."):
        candidates.append(key[len(prefix) + 1:])
    return next((tensors[c] for c in candidates if c in tensors), None), key


def load_learned_feature_maps(model, path, **hub) -> dict[int, HedgehogFeatureMap]:
    """Give every layer whose config entry names a learned Hedgehog feature map that map, with
    the weights the checkpoint at ``path`` holds. Returns the maps by layer (empty when the
    config names none)."""
    base = _base_model(model)
    raw = getattr(base.config, CONFIG_KEY, None)
    if not isinstance(raw, dict):
        return {}
    names = {id(m): n for n, m in base.named_modules()}
    needed = [m for m in _attention_modules(base) if uses_learned_feature_map(_entry(raw, m.layer_idx))]
    if not needed:
        return {}
    tensors = _checkpoint_tensors(path, f".{FEATURE_MAP_ATTR}.", hub)
    prefix = getattr(base, "base_model_prefix", "") or ""
    out = {}
    for m in needed:
        desc = _entry(raw, m.layer_idx)["feature_map"]
        weight, key = _lookup(tensors, names[id(m)], prefix, "weight")
        bias, _ = _lookup(tensors, names[id(m)], prefix, "bias")
        if weight is None or bias is None:
            raise ValueError(f"{path}: config.{CONFIG_KEY} gives layer {m.layer_idx} a learned "
                             f"Hedgehog feature map, but the checkpoint has no {key!r} (and bias)")
        fm = HedgehogFeatureMap(desc["head_dim"], desc["feature_dim"], num_heads=desc["num_heads"])
        with torch.no_grad():
            fm.weight.copy_(weight)
            fm.bias.copy_(bias)
        device = next((p.device for p in m.parameters()), torch.device("cpu"))
        setattr(m, FEATURE_MAP_ATTR, fm.to(device=device, dtype=weight.dtype).train(m.training))
        clear_layer_spec(m)  # read the entry again, now against the map
        out[m.layer_idx] = fm
    return out


def from_pretrained(path, *model_args, model_class=None, **kwargs):
    """``model_class.from_pretrained(path, *model_args, **kwargs)`` (default
    ``transformers.AutoModelForCausalLM``), with the learned feature maps the saved config names
    (see the module docstring). Everything else, attention included, is what the plain call
    restores; a model that runs attnkit also gets ``config.attn_implementation`` back at once
    (transformers drops it on reading), so saving it again keeps it. Returns what that call
    returns (``(model, info)`` with ``output_loading_info``)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    result = model_class.from_pretrained(path, *model_args, **kwargs)
    model = result[0] if isinstance(result, tuple) else result
    load_learned_feature_maps(model, path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    base = _base_model(model)
    if base.config._attn_implementation == NAME:
        for cfg in _configs(base, _attention_modules(base)):
            record_implementation(cfg)
    return result
