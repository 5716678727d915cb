"""Rebuilding a fine-tuned model from an ``attnkit finetune`` output folder.

Plain PEFT is enough when the attention was not swapped (``PeftModel.from_pretrained(base, OUT)``).
:func:`load_finetuned` also re-applies the recorded attention (``OUT/attention.json``): the
pattern for ``sliding``/``bigbird``/``longformer``/``dense``, or linear attention with the trained
Hedgehog feature maps (``OUT/feature_maps.safetensors``).
"""

from __future__ import annotations

import json
import os
import warnings

__all__ = ["apply_recorded_attention", "load_finetuned"]


def apply_recorded_attention(model, out_dir: str):
    """Swap ``model``'s attention as ``OUT/attention.json`` records (call before adding the adapter).
    Returns ``model``."""
    import attnkit.hf  # noqa: F401 - registers attn_implementation="attnkit"

    from ..attn.hf.persist import spec_from_json
    from ..attn.hf.surgery import swap_attention
    from . import linearize

    with open(os.path.join(out_dir, "attention.json"), encoding="utf-8") as f:
        record = json.load(f)
    kind = record.get("kind")
    if kind == "model":
        return model
    if record.get("feature_maps"):
        linearize.load_feature_maps(model, os.path.join(out_dir, record["feature_maps"]))
        from .config import parse_attention

        window = parse_attention(record["attention"]).window  # linear:hedgehog[,window=W]
        return linearize.swap_to_linear(model, "hedgehog", window)
    entry = record.get("config_entry") or {}
    spec = spec_from_json(entry.get("default"), f"{out_dir}/attention.json config_entry['default']")
    return swap_attention(model, spec)


def load_finetuned(out_dir: str, *, fused: bool = True, device=None, dtype=None):
    """``(model, tokenizer)``: the base model named in ``adapter_config.json``, its attention as
    recorded, and the LoRA adapter (on the fused kernels unless ``fused=False``), in eval mode.

    When the recorded base path does not exist (an embedded-default run whose folder was moved or
    copied elsewhere), ``OUT/base_model`` is used instead, with a warning."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import _dtype_kwarg
    from .peft_glue import fuse_lora

    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(out_dir).__name__}")
    adapter_config = os.path.join(out_dir, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        what = "does not exist" if not os.path.exists(out_dir) else "has no adapter_config.json"
        raise FileNotFoundError(
            f"load_finetuned: {os.fspath(out_dir)!r} {what}; pass the --out folder of a finished "
            "`attnkit finetune` run (it holds adapter_config.json, attention.json and the adapter)"
        )
    with open(adapter_config, encoding="utf-8") as f:
        base_path = json.load(f)["base_model_name_or_path"]
    local = os.path.join(out_dir, "base_model")
    if not os.path.exists(base_path) and os.path.isfile(os.path.join(local, "config.json")):
        # the embedded default records OUT/base_model as an absolute path: the folder has moved
        warnings.warn(f"load_finetuned: the recorded base model {base_path!r} does not exist; using "
                      f"{local!r} (the base model stored with the run)", stacklevel=2)
        base_path = local
    kw = {} if dtype is None else _dtype_kwarg(dtype)
    model = AutoModelForCausalLM.from_pretrained(base_path, **kw)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    apply_recorded_attention(model, out_dir)
    model = PeftModel.from_pretrained(model, out_dir)
    if fused:
        import torch

        on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        fuse_lora(model, backend="auto" if on_gpu else "torch")  # see train.py: no interpreter on CPU
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
