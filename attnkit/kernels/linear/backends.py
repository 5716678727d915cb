"""The linear-attention backends, in ``"auto"``'s priority order, and the op's one dispatch.

* :class:`TritonLinear` — the chunked Triton kernels (``op.py``): CUDA tensors, fp16/bf16/fp32,
  feature and value dims up to 256;
* :class:`TorchLinear` — chunked PyTorch (``torch_impl.py``): any device, dtype and size.

Both take ``decay`` (a per-KV-head decaying state, causal only).

(The CUDA decode step, ``cuda.py``, serves :func:`attnkit.linear_attention_step` only.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dispatch import TRITON_DTYPES, Backend, QueryCall, select_backend
from .feature_maps import FEATURE_MAPS
from .tiles import MAX_DIM

__all__ = ["LinearAttentionCall", "BACKENDS", "run_linear_attention", "MAX_DIM"]


@dataclass(frozen=True)
class LinearAttentionCall(QueryCall):
    """A validated call, as the backends see it. ``q``/``k`` are raw inputs when ``feature`` names
    a fused map, else already-mapped features (``feature == "identity"``, ``scale == 1``). Its
    ``head_dim`` (from :class:`~attnkit.kernels.dispatch.QueryCall`) is ``F``, the feature dim
    after the map: what :attr:`Backend.max_head_dim` bounds."""

    q: torch.Tensor  # [B, Hq, N, F] (or [B, Hq, N, Dk] for fused maps, F == Dk)
    k: torch.Tensor  # [B, Hkv, N, F]
    v: torch.Tensor  # [B, Hkv, N, Dv]
    s0: torch.Tensor | None  # [B, Hkv, F, Dv]
    z0: torch.Tensor | None  # [B, Hkv, F]
    feature: str
    causal: bool
    normalize: bool
    eps: float
    scale: float
    decay: torch.Tensor | None = None  # [Hkv] gamma in (0, 1], causal only


    @property
    def grid(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1]


class TritonLinear(Backend):
    """The chunked Triton kernels."""

    name = "triton"
    kind = "triton"
    dtypes = TRITON_DTYPES
    grid_limited = True
    # The forward holds all of F in one tile (declared: the call's head_dim is F) ...
    max_head_dim = MAX_DIM
    head_dim_name = "feature dim"

    def special_reasons(self, call: LinearAttentionCall) -> list[str]:
        # ... and the backward all of Dv, the same cap: the dispatch declares one dim per call.
        reasons = []
        dv = call.v.shape[-1]
        if dv > MAX_DIM:
            reasons.append(f"value head dim {dv} is above the maximum of {MAX_DIM}")
        return reasons

    def run(self, call: LinearAttentionCall):
        from .op import linear_attention_triton

        return linear_attention_triton(
            call.q, call.k, call.v, call.s0, call.z0, call.feature, call.causal, call.normalize,
            call.eps, call.scale, decay=call.decay,
        )


class TorchLinear(Backend):
    """Chunked PyTorch: any device, dtype and size."""

    name = "torch"
    kind = "torch"

    def run(self, call: LinearAttentionCall):
        from .torch_impl import compute_dtype, linear_attention_torch

        q, k = call.q, call.k
        if call.feature != "identity" or call.scale != 1.0:
            phi = FEATURE_MAPS[call.feature]
            cdt = compute_dtype(q.dtype)  # map in fp32, as the kernels do
            q, k = phi(q.to(cdt) * call.scale), phi(k.to(cdt))
        return linear_attention_torch(
            q, k, call.v, call.s0, call.z0, call.causal, call.normalize, call.eps,
            decay=call.decay,
        )


BACKENDS: tuple[Backend, ...] = (TritonLinear(), TorchLinear())


def run_linear_attention(call: LinearAttentionCall, backend: str):
    """Dispatch a validated call: ``(o, s, z)``."""
    return select_backend(call, backend, BACKENDS, op="linear_attention").run(call)
