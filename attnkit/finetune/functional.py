"""Functional fused LoRA: input validation, then one dispatch to a backend.

:func:`lora_linear` is one LoRA linear layer, ``y = x W^T + bias + s drop(x) A^T B^T``, and
:func:`lora_batched` the multi-adapter inference form where each row picks its own adapter.
Both validate their arguments, build one :class:`~attnkit.kernels.lora.backends.LoRACall` and
hand it to :func:`~attnkit.kernels.lora.backends.run_lora`. Backends
(``attnkit/kernels/lora/``): ``"cuda"`` (BGMV kernels, no-grad ``lora_batched`` decode batches),
``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``"torch"`` (any
device). ``backend="auto"`` takes the first that can run the call and says once when a CUDA call
lands on torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels.lora.backends import LoRACall, run_lora

__all__ = ["lora_linear", "lora_batched"]


def _check_tensor(name: str, t, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_base(x, weight, bias) -> tuple[int, int]:
    """The base layer both ops share: ``x [..., in]``, ``weight [out, in]``, ``bias [out] | None``.
    Returns ``(out, in)``."""
    _check_tensor("x", x)
    _check_tensor("weight", weight, 2)
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(
            f"x must have shape [..., {in_f}] (in_features of weight {tuple(weight.shape)}), "
            f"got {tuple(x.shape)}"
        )
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias must have shape [{out_f}], got {tuple(bias.shape)}")
    return out_f, in_f


def _check_rank(name: str, t: torch.Tensor, r: int) -> None:
    if r < 1:
        raise ValueError(f"{name} has rank 0 (shape {tuple(t.shape)}); the rank must be >= 1")


def _check_devices(x: torch.Tensor, tensors: dict) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must match")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in on this device, or None when it is off."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's, else the input's, which must match W's."""
    cast = _autocast_dtype(x.device.type)
    if cast is not None:
        return cast
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but weight has dtype {weight.dtype}; they must match "
            "(or run under torch.autocast)"
        )
    return x.dtype


def _check_scalars(scaling, dropout_p) -> None:
    for name, value in (("scaling", scaling), ("dropout_p", dropout_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _index_checked_on_host(idx: torch.Tensor) -> bool:
    """Whether ``adapter_index``'s range is checked on the host (CPU tensors: reading them costs
    nothing) rather than on the device (anything else: reading would be a host sync per call)."""
    return idx.device.type == "cpu"


def _check_index(idx: torch.Tensor, n: int) -> None:
    """``idx [T]`` int64 must lie in ``[-1, n)``. CPU: a ``ValueError`` naming the bad value. On
    a device, ``torch._assert_async``: no host sync, the failure surfaces as a device-side assert
    at the next synchronisation (``CUDA_LAUNCH_BLOCKING=1`` pins it to this call); until then the
    Triton block table treats the bad rows as ``-1``, so no kernel reads outside the adapters."""
    if idx.numel() == 0:
        return
    accepted = f"[-1, {n - 1}] (-1 = no adapter, 0..{n - 1} = one of the {n} adapters)"
    if not _index_checked_on_host(idx):
        torch._assert_async(((idx >= -1) & (idx < n)).all(), f"adapter_index outside {accepted}")
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < -1 or hi >= n:
        bad = lo if lo < -1 else hi
        raise ValueError(f"adapter_index holds {bad}, outside {accepted}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear: ``y = x W^T + bias + scaling * drop(x) A^T B^T``.

    Args:
        x: ``[..., in]`` (any leading dims).
        weight: ``[out, in]`` frozen base weight (it gets a gradient if it requires one).
        lora_A: ``[r, in]``; lora_B: ``[out, r]``, ``1 <= r`` (``<= 256`` on Triton). They are
            cast to the compute dtype when they differ (fp32 adapters on a bf16 model).
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        bias: ``[out]`` or None.
        dropout_p: dropout on the LoRA input only, applied when ``training``; the mask is
            regenerated from a seed in backward, never stored.
        seed: dropout seed (drawn from torch's RNG when None).
        backend: ``"auto"`` (on CUDA: the fused kernel or the unfused cuBLAS path, whichever
            measured faster for this shape, ``docs/lora-dispatch.md``; ``ATTNKIT_LORA_PATH=
            fused|cublas`` forces one), ``"triton"`` (the fused kernel) or ``"torch"``.

    Returns:
        ``[..., out]`` in the compute dtype (the input's, or autocast's).
    """
    out_f, in_f = _check_base(x, weight, bias)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    r = lora_A.shape[0]
    _check_rank("lora_A", lora_A, r)
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A must have shape [r, {in_f}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B must have shape [{out_f}, {r}] ([out, r]), got {tuple(lora_B.shape)}")
    _check_scalars(scaling, dropout_p)
    _check_devices(x, dict(weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias))
    dtype = _compute_dtype(x, weight)
    needs_grad = _needs_grad(x, weight, lora_A, lora_B, bias)
    x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
    bias = bias.to(dtype) if bias is not None else None
    p = float(dropout_p) if training else 0.0
    call = LoRACall(
        x=x.reshape(-1, in_f), rank=r, needs_grad=needs_grad, batched=False, weight=weight,
        bias=bias, lora_a=lora_A, lora_b=lora_B, scaling=float(scaling), dropout_p=p,
        seed=None if seed is None or p == 0.0 else int(seed),
    )
    return run_lora(call, backend).reshape(*x.shape[:-1], out_f)


def lora_batched(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_As: torch.Tensor,
    lora_Bs: torch.Tensor,
    scalings: torch.Tensor | Sequence[float],
    adapter_index: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-adapter LoRA: each row uses its own adapter (Punica/vLLM's shrink/expand idea).

    ``y[t] = W x[t] + bias + scalings[i] * B[i] A[i] x[t]`` with ``i = adapter_index[t]``;
    ``i = -1`` means the base layer alone.

    Args:
        x: ``[..., in]``.
        weight: ``[out, in]``; bias: ``[out]`` or None.
        lora_As: ``[n, r, in]``; lora_Bs: ``[n, out, r]`` (adapters of smaller rank: zero-pad).
        scalings: ``[n]`` floats (a sequence or a tensor).
        adapter_index: integer tensor of shape ``x.shape[:-1]``, values in ``[-1, n)``. On CPU
            a value outside raises ``ValueError``; on a GPU it is checked on the device
            (``torch._assert_async``, no host sync): a device-side assert at the next sync.
        backend: ``"auto"``, ``"cuda"`` (decode batches, no autograd), ``"triton"`` (inference
            only: no autograd) or ``"torch"``.

    Returns:
        ``[..., out]`` in x's dtype.

    On the Triton path a GPU call makes no host sync and no host-to-device copy when
    ``scalings`` is already a float32 tensor on x's device and ``adapter_index`` is on it too
    (a decode loop: keep both on the device).
    """
    out_f, in_f = _check_base(x, weight, bias)
    _check_tensor("lora_As", lora_As, 3)
    _check_tensor("lora_Bs", lora_Bs, 3)
    _check_tensor("adapter_index", adapter_index)
    n, r = lora_As.shape[:2]
    if n < 1:
        raise ValueError(f"lora_As must hold at least one adapter, got shape {tuple(lora_As.shape)}")
    _check_rank("lora_As", lora_As, r)
    if lora_As.shape[2] != in_f:
        raise ValueError(f"lora_As must have shape [n, r, {in_f}], got {tuple(lora_As.shape)}")
    if tuple(lora_Bs.shape) != (n, out_f, r):
        raise ValueError(f"lora_Bs must have shape [{n}, {out_f}, {r}], got {tuple(lora_Bs.shape)}")
    # a float32 tensor on x's device is used as is (no copy); anything else is one conversion
    scal = torch.as_tensor(scalings, dtype=torch.float32, device=x.device).reshape(-1)
    if scal.numel() != n:
        raise ValueError(f"scalings must hold {n} values (one per adapter), got {scal.numel()}")
    if adapter_index.dtype.is_floating_point or adapter_index.dtype == torch.bool:
        raise TypeError(f"adapter_index must be an integer tensor, got dtype {adapter_index.dtype}")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"adapter_index must have shape {tuple(x.shape[:-1])} (x's leading dims), "
            f"got {tuple(adapter_index.shape)}"
        )
    idx = adapter_index.reshape(-1).to(device=x.device, dtype=torch.int64)
    _check_index(idx, n)
    operands = dict(weight=weight, lora_As=lora_As, lora_Bs=lora_Bs, bias=bias)
    _check_devices(x, operands)
    for name, t in operands.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    call = LoRACall(
        x=x.reshape(-1, in_f), rank=r, needs_grad=_needs_grad(x, *operands.values()),
        batched=True, weight=weight, bias=bias, lora_a=lora_As, lora_b=lora_Bs, scalings=scal,
        index=idx,
    )
    return run_lora(call, backend).reshape(*x.shape[:-1], out_f)
