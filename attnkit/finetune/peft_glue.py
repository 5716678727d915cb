"""PEFT integration: run PEFT's LoRA ``Linear`` layers on the fused kernels, in place.

:func:`fuse_lora` swaps the class of every PEFT ``lora.Linear`` to :class:`FusedLoraLinear`, a
subclass that adds nothing but ``forward``: parameters, buffers, names (``lora_A``, ``lora_B``,
``scaling``, ``lora_dropout``), active adapters and ``state_dict`` keys stay PEFT's, so
``save_pretrained`` writes the same ``adapter_model.safetensors`` and a plain PEFT install loads it.
:func:`register_fused_lora` asks PEFT (``LoraConfig._register_custom_module``) to build fused
layers directly in ``get_peft_model``.

The fused forward handles one active vanilla LoRA adapter on an ``nn.Linear`` (or a
``fan_in_fan_out`` Conv1D) base. Everything else goes to PEFT's own forward, and each reason is
said once through :mod:`warnings`: DoRA or another LoRA variant, merged or disabled adapters,
several active adapters, mixed-adapter batches (``adapter_names=``), a LoRA bias.

This module imports peft; :mod:`attnkit.finetune` imports it on first use.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from .functional import _autocast_dtype, lora_linear

__all__ = ["FusedLoraLinear", "fuse_lora", "unfuse_lora", "register_fused_lora"]

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attnkit.fuse_lora: {reason}; using PEFT's unfused LoRA forward",
                      stacklevel=3)


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA ``Linear`` whose forward runs :func:`attnkit.finetune.lora_linear`.

    Input ``[..., in]``, output ``[..., out]``, as PEFT's layer. ``attnkit_backend`` (class
    attribute, settable per instance) picks the backend.
    """

    attnkit_backend: str = "auto"

    def _fusion_plan(self, x: torch.Tensor, args, kwargs):
        """The active adapter to fuse, or ``(None, reason)`` for PEFT's path (reason None: quiet)."""
        if self.disable_adapters:
            return None, "adapters are disabled"
        if kwargs.get("adapter_names") is not None:
            return None, "a mixed-adapter batch (adapter_names=) was passed"
        if self.merged:
            return None, "the adapter is merged into the base weight"
        if args or any(v is not None for v in kwargs.values()):
            return None, "extra forward arguments were passed"
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None, None  # PEFT's forward is then the base layer alone
        if len(active) > 1:
            return None, "several adapters are active at once"
        name = active[0]
        if name in getattr(self, "lora_variant", {}) or self.use_dora.get(name, False):
            return None, "the adapter is DoRA or another LoRA variant"
        if self.lora_B[name].bias is not None:
            return None, "the adapter has a LoRA bias (lora_bias=True)"
        dropout = self.lora_dropout[name]
        if not isinstance(dropout, (nn.Dropout, nn.Identity)):
            return None, f"its lora_dropout is a {type(dropout).__name__}"
        base = self.get_base_layer()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None, f"the base layer {type(base).__name__} has no 2-D weight"
        if not isinstance(base, nn.Linear) and not self.fan_in_fan_out:
            return None, f"the base layer is a {type(base).__name__}, not an nn.Linear"
        if _autocast_dtype(x.device.type) is None and x.dtype != weight.dtype:
            return None, "the input's dtype differs from the base weight's"
        return name, None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        name, reason = self._fusion_plan(x, args, kwargs)
        if name is None:
            if reason is not None:
                _warn_once(reason)
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight.t() if self.fan_in_fan_out else base.weight  # [out, in]
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return lora_linear(
            x, weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
            getattr(base, "bias", None), p, training=p > 0.0, backend=self.attnkit_backend,
        )

    def __repr__(self) -> str:
        return "fused_" + super().__repr__()


def fuse_lora(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every PEFT LoRA ``Linear`` in ``model`` use the fused kernels, in place.

    Works on ``get_peft_model(...)`` and ``PeftModel.from_pretrained(...)`` models (and on any
    module tree holding PEFT LoRA layers). Returns ``model``. Layers of other LoRA types
    (embeddings, convolutions, quantized bases) are left alone. ``backend``: ``"auto"``,
    ``"triton"`` or ``"torch"`` (attnkit's CUDA kernels serve only inference-time multi-adapter
    batches, :func:`attnkit.finetune.lora_batched`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be one of 'auto', 'triton', 'torch', got {backend!r}")
    n = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
        if isinstance(module, FusedLoraLinear):
            if backend != "auto" or "attnkit_backend" in vars(module):
                module.attnkit_backend = backend
            n += 1
    if n == 0:
        warnings.warn("attnkit.fuse_lora: the model has no PEFT LoRA Linear layer; nothing fused",
                      stacklevel=2)
    return model


def unfuse_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_lora`: every :class:`FusedLoraLinear` becomes PEFT's ``Linear`` again."""
    for module in model.modules():
        if type(module) is FusedLoraLinear:
            vars(module).pop("attnkit_backend", None)
            module.__class__ = PeftLoraLinear
    return model


def register_fused_lora(config):
    """Have ``get_peft_model(model, config)`` build :class:`FusedLoraLinear` layers directly.

    Uses PEFT's experimental ``LoraConfig._register_custom_module`` hook (``nn.Linear`` targets).
    The saved adapter is an ordinary LoRA adapter. Returns ``config``.
    """
    register = getattr(config, "_register_custom_module", None)
    if register is None:
        raise TypeError(
            f"config must be a peft.LoraConfig with _register_custom_module (peft >= 0.14), "
            f"got {type(config).__name__}"
        )
    register({nn.Linear: FusedLoraLinear})
    return config
