"""Feature maps ``phi`` for linear attention: the built-in names and the learnable Hedgehog map.

A feature map takes ``[..., D]`` and returns ``[..., F]``; linear attention applies it to
``q * scale`` and to ``k``. The built-in maps (``"elu1"``, ``"relu"``, ``"identity"``) are
elementwise (``F = D``) and the Triton kernels fuse them; any other callable (an ``nn.Module``
such as :class:`HedgehogFeatureMap`, or a plain function) runs outside the kernel, under autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# The built-in maps are the kernels' (they fuse them); re-exported here for the API's users.
from ..kernels.linear.feature_maps import FEATURE_MAPS

__all__ = ["FEATURE_MAPS", "HedgehogFeatureMap", "resolve_feature_map"]


def resolve_feature_map(feature_map: object) -> tuple[str | None, Callable]:
    """``(built-in name or None, callable)`` for a ``feature_map`` argument.

    Raises:
        ValueError: an unknown name. TypeError: neither a str nor a callable.
    """
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))} or a callable "
                f"(e.g. attnkit.attn.HedgehogFeatureMap), got {feature_map!r}"
            )
        return feature_map, FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return None, feature_map
    raise TypeError(
        "feature_map must be a str (one of "
        f"{', '.join(map(repr, FEATURE_MAPS))}) or a callable, got {type(feature_map).__name__}"
    )


class HedgehogFeatureMap(nn.Module):
    """Learnable Hedgehog feature map (Zhang et al. 2024, "The Hedgehog & the Porcupine").

    ``phi(x) = [softmax(x W + b), softmax(-(x W + b))]`` over the feature axis, so
    ``F = 2 * feature_dim`` and every feature is positive (linear attention's denominator stays
    away from zero). ``W`` starts as the identity (truncated or zero-padded when
    ``feature_dim != head_dim``), as in the paper, and ``b`` at zero.

    Args:
        head_dim: ``D``, the last dim of the inputs.
        feature_dim: width of the projection; the output has ``2 * feature_dim`` features.
        num_heads: if given, one projection per head; inputs must then be ``[B, H, N, D]`` (or
            ``[B, H, D]`` for the decode step) with ``H == num_heads``. The same map is applied
            to q and k, so with GQA (``Hq != Hkv``) use a shared map (``num_heads=None``).

    Shapes: ``x [..., D]`` -> ``[..., 2 * feature_dim]`` in ``x``'s dtype (the softmax runs in
    fp32).
    """

    def __init__(self, head_dim: int, feature_dim: int, num_heads: int | None = None):
        super().__init__()
        for name, val in (("head_dim", head_dim), ("feature_dim", feature_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if num_heads is not None and (
            isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
        ):
            raise ValueError(f"num_heads must be a positive int or None, got {num_heads!r}")
        self.head_dim, self.feature_dim, self.num_heads = head_dim, feature_dim, num_heads
        heads = 1 if num_heads is None else num_heads
        eye = torch.eye(head_dim, feature_dim).expand(heads, head_dim, feature_dim).clone()
        self.weight = nn.Parameter(eye)  # [H or 1, D, feature_dim]
        self.bias = nn.Parameter(torch.zeros(heads, feature_dim))

    @property
    def output_dim(self) -> int:
        """``F = 2 * feature_dim``."""
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"HedgehogFeatureMap(head_dim={self.head_dim}) got inputs with last dim "
                f"{x.shape[-1]}; pass tensors [..., {self.head_dim}]"
            )
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if self.num_heads is None:
            u = x @ w[0] + b[0]
        else:
            if x.dim() < 3 or x.shape[1] != self.num_heads:
                raise ValueError(
                    f"HedgehogFeatureMap(num_heads={self.num_heads}) needs inputs [B, H, N, D] "
                    f"or [B, H, D] with H = {self.num_heads}, got shape {tuple(x.shape)}"
                )
            lead = (1,) * (x.dim() - 3)  # broadcast the per-head weights over N (if present)
            u = (x.unsqueeze(-2) @ w.view(self.num_heads, *lead, *w.shape[1:])).squeeze(-2)
            u = u + b.view(self.num_heads, *lead, -1)
        u = u.float()
        return torch.cat([u.softmax(-1), (-u).softmax(-1)], -1).to(x.dtype)

    def extra_repr(self) -> str:
        heads = "" if self.num_heads is None else f", num_heads={self.num_heads}"
        return f"head_dim={self.head_dim}, feature_dim={self.feature_dim}{heads}"

