"""LoRA fine-tuning on the fused kernels: functional ops, a LoRA layer and PEFT integration.

* :func:`lora_linear` / :func:`lora_batched`: the functional ops (``functional.py``);
* :class:`LoRALinear`: a standalone LoRA layer with ``merge()``/``unmerge()`` (``lora.py``);
* :func:`fuse_lora`, :func:`unfuse_lora`, :func:`register_fused_lora`: PEFT glue
  (``peft_glue.py``).

Importing this package is light: triton, peft and transformers load on first use (the PEFT glue
is imported when one of its names is first looked up).
"""

from __future__ import annotations

from .functional import lora_batched, lora_linear
from .lora import LoRALinear

__all__ = [
    "lora_linear", "lora_batched", "LoRALinear", "fuse_lora", "unfuse_lora",
    "register_fused_lora", "FusedLoraLinear",
]

_PEFT_NAMES = ("fuse_lora", "unfuse_lora", "register_fused_lora", "FusedLoraLinear")


def __getattr__(name: str):
    if name in _PEFT_NAMES:
        from . import peft_glue

        return getattr(peft_glue, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
