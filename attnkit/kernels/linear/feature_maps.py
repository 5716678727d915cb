"""The built-in feature maps of linear attention: the torch functions and their kernel codes.

Each map is elementwise (``[..., D] -> [..., D]``, so ``F = D``). The Triton kernels (``op.py``)
and the CUDA decode step (``cuda.py``, ``attnkit/csrc/attnkit_cuda.h``'s ``FeatureMap``) fuse them
under the codes of :data:`FEATURES`; the torch backend and the decode step's torch path call
:data:`FEATURE_MAPS`. Learnable maps (``attnkit.attn.HedgehogFeatureMap``) live with the API.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as nnf

__all__ = ["FEATURE_MAPS", "FEATURES"]


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return nnf.elu(x) + 1.0


#: The built-in maps by name (all elementwise, so ``F = D``).
FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": _elu1,  # elu(x) + 1 > 0: Katharopoulos et al. 2020, "Transformers are RNNs"
    "relu": torch.relu,
    "identity": lambda x: x,
}

#: name -> the code the fused kernels switch on (the ``FEATURE`` constexpr of the Triton kernels,
#: the ``FeatureMap`` enum of the CUDA step): one table for both.
FEATURES: dict[str, int] = {"identity": 0, "elu1": 1, "relu": 2}
