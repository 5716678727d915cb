"""The attention backends, in ``"auto"``'s priority order, and the op's one dispatch.

==================  =======  ==========================================================
backend             name     takes
==================  =======  ==========================================================
CudaDecodeBackend   cuda     decode-shaped no-grad GPU calls (``attnkit/csrc``)
TritonDecode        triton   the same shapes on the Triton split-KV kernel (``decode.py``)
TritonFlash         triton   everything else on a GPU (``op.py``, ``launch.py``, ``kernels_*.py``)
TorchAttention      torch    any device and dtype (``torch_fused.py``, ``torch_band.py``, ...)
==================  =======  ==========================================================

Each declares its capabilities (:class:`~attnkit.kernels.dispatch.Backend`); reasons are derived
from them. ``backend="triton"`` picks the first Triton entry that fits (decode, then flash).
"""

from __future__ import annotations

import torch

from ..dispatch import TRITON_DTYPES, Backend, select_backend
from .call import AttentionCall
from .cuda import MAX_DECODE_QUERIES, CudaDecodeBackend

__all__ = ["BACKENDS", "TritonDecode", "TritonFlash", "TorchAttention", "run_attention"]


class TritonDecode(Backend):
    """Split-KV decode: a few no-grad queries per sequence against a long cache. Below
    :data:`MAX_DECODE_QUERIES` rows a flash query tile would be mostly padding, and one sequence
    could not fill the GPU; the decode kernel splits the keys instead."""

    name = "triton"
    kind = "triton"
    dtypes = TRITON_DTYPES
    max_head_dim = 256
    supports_grad = False
    max_queries = MAX_DECODE_QUERIES
    packed = False
    spec_kinds = ("band",)
    score_mods = ("softcap", "sinks", "alibi")
    # the decode kernel puts (batch, KV head) on the grid's x axis: no y/z limit

    def run(self, call: AttentionCall):
        from .decode import decode_attention

        return decode_attention(call.q, call.k, call.v, call.spec, call.scale, call.valid_keys,
                                softcap=call.softcap, sinks=call.sinks,
                                alibi_slopes=call.alibi_slopes)


class TritonFlash(Backend):
    """The Triton flash kernel family: band and block-sparse, forward and backward, varlen."""

    name = "triton"
    kind = "triton"
    dtypes = TRITON_DTYPES
    max_head_dim = 256
    spec_kinds = ("band", "block_sparse")
    grid_limited = True
    score_mods = ("softcap", "sinks", "alibi")
    value_head_dims = True

    def run(self, call: AttentionCall):
        run = _flash_attention[0]
        if run is None:  # imported on first use (it imports triton); an import per call cost ~2 us
            from .op import flash_attention as run

            _flash_attention[0] = run
        return run(call)


_flash_attention = [None]


class TorchAttention(Backend):
    """Chunked PyTorch attention (the CPU path): any device, dtype and head dim."""

    name = "torch"
    kind = "torch"
    spec_kinds = ("band", "block_sparse")
    score_mods = ("softcap", "sinks", "alibi")
    value_head_dims = True

    def run(self, call: AttentionCall):
        if call.score_mods or call.value_dim != call.head_dim:
            from .torch_scored import scored_attention_torch

            return scored_attention_torch(call)
        if call.spec.kind == "block_sparse":
            from .torch_sparse import block_sparse_attention_torch

            return block_sparse_attention_torch(
                call.q, call.k, call.v, call.spec, call.scale, call.valid_keys,
                call.cu_seqlens_q, call.cu_seqlens_k,
            )
        from .torch_band import attention_torch
        from .torch_fused import attention_fused, fused_available

        # The fused CPU flash kernel where it serves (CPU, fp32/fp64/bf16/fp16); the chunked
        # generic path on every other device and dtype (torch_fused.py says why).
        args = (call.q, call.k, call.v, call.spec, call.scale, call.valid_keys,
                call.cu_seqlens_q, call.cu_seqlens_k)
        if not fused_available(call.q, call.k):
            return attention_torch(*args)
        # the LSE costs a pass over the scores there; the caller drops it unless asked or trained
        need_lse = call.return_lse or (torch.is_grad_enabled() and any(
            t.requires_grad for t in (call.q, call.k, call.v)))
        return attention_fused(*args, need_lse=need_lse)


#: ``"auto"`` tries these in order; "cuda" and the Triton decode entry take only decode shapes.
BACKENDS: tuple[Backend, ...] = (CudaDecodeBackend(), TritonDecode(), TritonFlash(), TorchAttention())


def run_attention(call: AttentionCall, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch a validated call: ``(o, lse)``."""
    return select_backend(call, backend, BACKENDS, op="attention").run(call)
