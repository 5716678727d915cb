"""Linearising a model's attention: learnable feature maps per layer and attention transfer.

The recipe of the LoLCATs line of work (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of
Large Language Models"), in two stages:

1. **attention transfer**: give every attention layer a :class:`~attnkit.attn.HedgehogFeatureMap`
   and train only those maps so that each layer's *linear* attention output matches its *softmax*
   attention output on the same ``q, k, v`` (MSE, summed over layers; the model stays frozen and
   every layer is fed the softmax output, so layers learn independently, in parallel);
2. swap every layer to linear attention with its trained map and LoRA fine-tune (``train.py``).

With a window ``W`` (``--attention linear:hedgehog,window=64``) the student of stage 1 and the
swapped layers of stage 2 are the sliding-window + linear hybrid
(``LinearAttention(window=W)``): the maps are trained for the part of attention the window does
not cover. The window is held by each layer as ``attnkit_linear_window`` while transferring.

How a learnable map gets into a layer without touching ``attnkit.attn.hf``: the map is registered
as a submodule of the layer's attention module (``attnkit_feature_map``), so it moves with
``model.to(...)`` and is frozen by PEFT like any base weight; then
``swap_attention(model, LinearAttention(feature_map=that_map), layers=[i])`` is called per layer
(a callable feature map cannot go into ``config.json``, so :func:`save_feature_maps` writes the
maps and their shapes to a safetensors file and :func:`load_feature_maps` rebuilds them).

Stage 1 runs through transformers' attention interface under its own name
(:data:`TRANSFER_NAME`): the registered function computes the softmax output with attnkit's
kernels (the layer's own pattern), the linear output with the layer's map, records the MSE and
returns the softmax output.
"""

from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as nnf

from ..attn.feature_maps import HedgehogFeatureMap
from ..attn.hf.interface import attnkit_attention_forward, attnkit_mask
from ..attn.hf.linear import hf_linear_attention
from ..attn.hf.specs import LinearAttention
from ..attn.hf.surgery import _attention_modules, _base_model, swap_attention

__all__ = [
    "TRANSFER_NAME", "attach_feature_maps", "feature_maps_of", "swap_to_linear", "transfer_losses",
    "save_feature_maps", "load_feature_maps", "register_transfer_attention",
]

#: The attention-implementation name used during attention transfer.
TRANSFER_NAME = "attnkit_transfer"
#: The attribute holding a layer's feature map.
ATTR = "attnkit_feature_map"
#: The attribute holding the hybrid's window during attention transfer (``None``: pure linear).
WINDOW_ATTR = "attnkit_linear_window"

#: Per-layer MSE values recorded by the transfer attention function during one forward.
_losses: list[torch.Tensor] = []


def _layer_shapes(module) -> tuple[int, int, int]:
    """``(head_dim, num_q_heads, num_kv_heads)`` of a transformers attention module."""
    cfg = module.config
    hq = getattr(cfg, "num_attention_heads", None)
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    head_dim = getattr(module, "head_dim", None) or getattr(cfg, "head_dim", None)
    if head_dim is None and hq:
        head_dim = cfg.hidden_size // hq
    if not (head_dim and hq):
        raise ValueError(f"cannot tell the head size of {type(module).__name__}; linearisation needs a "
                         "model whose config has num_attention_heads (Llama-style)")
    return int(head_dim), int(hq), int(hkv)


def attach_feature_maps(model, feature_dim: int | None = None,
                        window: int | None = None) -> list[HedgehogFeatureMap]:
    """Give every attention layer of ``model`` a fresh :class:`HedgehogFeatureMap` (in fp32).

    ``feature_dim`` defaults to the head dim (so ``F = 2 * head_dim``). The map is per head when
    the layer has as many key/value heads as query heads, else shared by the heads (the same map
    must apply to ``q`` with ``Hq`` heads and to ``k`` with ``Hkv``). ``window``: attention
    transfer trains the maps for the sliding-window + linear hybrid of that window. Returns the
    maps by layer.
    """
    base = _base_model(model)
    maps = []
    for m in sorted(_attention_modules(base), key=lambda m: m.layer_idx):
        head_dim, hq, hkv = _layer_shapes(m)
        fm = HedgehogFeatureMap(head_dim, feature_dim or head_dim, num_heads=hq if hq == hkv else None)
        device = next((p.device for p in m.parameters()), torch.device("cpu"))
        setattr(m, ATTR, fm.to(device))
        setattr(m, WINDOW_ATTR, window)
        maps.append(fm)
    if not maps:
        raise ValueError(f"{type(base).__name__} has no attention layers that attnkit can swap")
    return maps


def feature_maps_of(model) -> dict[int, HedgehogFeatureMap]:
    """The attached maps by layer index."""
    return {m.layer_idx: getattr(m, ATTR) for m in _attention_modules(_base_model(model))
            if isinstance(getattr(m, ATTR, None), HedgehogFeatureMap)}


def swap_to_linear(model, feature_map: str = "hedgehog", window: int | None = None):
    """Run every layer on linear attention: with its attached map (``"hedgehog"``) or a built-in
    elementwise map (``"elu1"``, ``"relu"``, ``"identity"``); with ``window`` the
    sliding-window + linear hybrid. Returns ``model``."""
    if feature_map != "hedgehog":
        return swap_attention(model, LinearAttention(feature_map=feature_map, window=window))
    maps = feature_maps_of(model)
    if not maps:
        raise ValueError("swap_to_linear(..., 'hedgehog'): no feature maps attached; call "
                         "attach_feature_maps(model) (or load_feature_maps) first")
    with warnings.catch_warnings():  # "cannot be saved to the config": save_feature_maps does it
        warnings.simplefilter("ignore")
        for layer, fm in sorted(maps.items()):
            swap_attention(model, LinearAttention(feature_map=fm, window=window), layers=[layer])
    return model


# --------------------------------------------------------------------------------------------
# Stage 1: attention transfer
# --------------------------------------------------------------------------------------------


def _transfer_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """Softmax attention (returned) and linear attention with the layer's map (MSE recorded)."""
    with torch.no_grad():
        teacher, _ = attnkit_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                               scaling=scaling, sliding_window=sliding_window,
                                               softcap=softcap, is_causal=is_causal, **kwargs)
    fm = getattr(module, ATTR)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    kpm = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    spec = LinearAttention(feature_map=fm, window=getattr(module, WINDOW_ATTR, None))
    student = hf_linear_attention(query.detach(), key.detach(), value.detach(), kpm, spec, causal,
                                  scaling=scaling)  # [B, Hq, N, Dv]
    _losses.append(nnf.mse_loss(student.transpose(1, 2).float(), teacher.float()))
    return teacher, None


def register_transfer_attention() -> None:
    """Register :data:`TRANSFER_NAME` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(TRANSFER_NAME, _transfer_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - old transformers build masks themselves
        return
    AttentionMaskInterface.register(TRANSFER_NAME, attnkit_mask)


def transfer_losses() -> list[torch.Tensor]:
    """The MSE values recorded since the last call (and clears them)."""
    out = list(_losses)
    _losses.clear()
    return out


def transfer_trainer_class():
    """A ``transformers.Trainer`` whose loss is the summed per-layer attention-output MSE.

    Built lazily so importing this module does not import transformers' Trainer.
    """
    import inspect

    from transformers import Trainer

    class AttentionTransferTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            base = _base_model(model)
            if "logits_to_keep" in inspect.signature(base.forward).parameters:
                inputs["logits_to_keep"] = 1  # the LM head's logits are not needed here
            transfer_losses()
            outputs = model(**inputs, use_cache=False)
            losses = transfer_losses()
            if not losses:
                raise RuntimeError("attention transfer: no layer ran the transfer attention function; "
                                   f"is the model's attn_implementation {TRANSFER_NAME!r}?")
            loss = torch.stack(losses).sum()
            return (loss, outputs) if return_outputs else loss

    return AttentionTransferTrainer


# --------------------------------------------------------------------------------------------
# Saving and loading the maps
# --------------------------------------------------------------------------------------------


def save_feature_maps(model, path: str) -> dict:
    """Write the attached maps to a safetensors file; returns the shape description it stores."""
    from safetensors.torch import save_file

    maps = feature_maps_of(model)
    tensors, layers = {}, {}
    for layer, fm in sorted(maps.items()):
        tensors[f"layers.{layer}.weight"] = fm.weight.detach().float().cpu().contiguous()
        tensors[f"layers.{layer}.bias"] = fm.bias.detach().float().cpu().contiguous()
        layers[str(layer)] = dict(head_dim=fm.head_dim, feature_dim=fm.feature_dim, num_heads=fm.num_heads)
    meta = {"kind": "attnkit.HedgehogFeatureMap", "layers": layers}
    save_file(tensors, path, metadata={"attnkit": json.dumps(meta)})
    return meta


def load_feature_maps(model, path: str) -> dict[int, HedgehogFeatureMap]:
    """Attach the maps saved by :func:`save_feature_maps` to ``model`` (frozen) and return them."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("attnkit", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if meta.get("kind") != "attnkit.HedgehogFeatureMap":
        raise ValueError(f"{path}: not an attnkit feature-map file (no 'attnkit' metadata)")
    modules = {m.layer_idx: m for m in _attention_modules(_base_model(model))}
    out = {}
    for key, shape in meta["layers"].items():
        layer = int(key)
        if layer not in modules:
            raise ValueError(f"{path}: has a feature map for layer {layer}, the model has layers "
                             f"{sorted(modules)}")
        fm = HedgehogFeatureMap(shape["head_dim"], shape["feature_dim"], num_heads=shape["num_heads"])
        fm.weight.data.copy_(tensors[f"layers.{layer}.weight"])
        fm.bias.data.copy_(tensors[f"layers.{layer}.bias"])
        fm.requires_grad_(False)
        device = next((p.device for p in modules[layer].parameters()), torch.device("cpu"))
        setattr(modules[layer], ATTR, fm.to(device))
        out[layer] = fm
    return out
