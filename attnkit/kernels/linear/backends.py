"""The linear-attention backends, in ``"auto"``'s priority order, and the op's one dispatch.

* :class:`TritonLinear` — the chunked Triton kernels (``op.py``): CUDA tensors, fp16/bf16/fp32,
  feature and value dims up to 256;
* :class:`TorchLinear` — chunked PyTorch (``torch_impl.py``): any device, dtype and size.

Both take ``decay`` (a per-KV-head decaying state, causal only), the sliding-window + linear
hybrid (``window``; on Triton composed from the flash and linear kernels, :mod:`.hybrid_triton`)
and packed sequences (``cu_seqlens``; on Triton read in place, one grid row per sequence). Each
backend declares the hybrid and packing (:attr:`LinearBackend.hybrid`,
:attr:`LinearBackend.varlen`), so a backend that lacks one refuses such a call naming why, and
``"auto"`` takes the next (warning once when CUDA tensors land on torch).

(The CUDA decode step, ``cuda.py``, serves :func:`attnkit.linear_attention_step` only.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dispatch import TRITON_DTYPES, Backend, QueryCall, select_backend
from .feature_maps import FEATURE_MAPS
from .tiles import MAX_DIM

__all__ = [
    "LinearAttentionCall", "LinearBackend", "BACKENDS", "run_linear_attention", "MAX_DIM",
]


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
    # the hybrid (window is not None): raw q/k for the softmax part, and the window state
    window: int | None = None
    softmax_scale: float | None = None
    q_raw: torch.Tensor | None = None  # [B, Hq, N, Dk]
    k_raw: torch.Tensor | None = None  # [B, Hkv, N, Dk]
    kw: torch.Tensor | None = None  # [B, Hkv, L, Dk], L <= window - 1
    vw: torch.Tensor | None = None  # [B, Hkv, L, Dv]
    fkw: torch.Tensor | None = None  # [B, Hkv, L, F] (the mapped kw)
    valid_keys: torch.Tensor | None = None  # [B, N] bool (the HF path's padding), hybrid only
    window_valid: torch.Tensor | None = None  # [B, L] bool, hybrid only
    # packed sequences along N of B = 1 tensors: host (start, end) pairs from cu_seqlens
    segments: tuple[tuple[int, int], ...] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, query heads) of the kernels' grid: the packed sequences' count when packed."""
        rows = self.q.shape[0] if self.segments is None else len(self.segments)
        return rows, self.q.shape[1]


class LinearBackend(Backend):
    """A linear-attention backend: the dispatch's declarations plus two of this op's own."""

    #: Whether the sliding-window + linear hybrid (``window=``) runs here.
    hybrid: bool = True
    #: Whether packed sequences (``cu_seqlens``) run here.
    varlen: bool = True

    def special_reasons(self, call: LinearAttentionCall) -> list[str]:
        reasons = []
        if call.window is not None and not self.hybrid:
            reasons.append(f"the sliding-window + linear hybrid (window={call.window}) has no "
                           f"{self.name!r} kernel yet; use backend='torch' (or 'auto')")
        if call.segments is not None and not self.varlen:
            reasons.append(f"packed sequences (cu_seqlens, {len(call.segments)} sequences) have "
                           f"no {self.name!r} kernel yet; use backend='torch' (or 'auto'), or a "
                           "padded batch")
        return reasons


class TritonLinear(LinearBackend):
    """The chunked Triton kernels."""

    name = "triton"
    kind = "triton"
    dtypes = TRITON_DTYPES
    grid_limited = True
    # The forward holds all of F in one tile (declared: the call's head_dim is F) ...
    max_head_dim = MAX_DIM
    head_dim_name = "feature dim"
    hybrid = True
    varlen = True

    def special_reasons(self, call: LinearAttentionCall) -> list[str]:
        # ... and the backward all of Dv, the same cap: the dispatch declares one dim per call.
        reasons = super().special_reasons(call)
        dv = call.v.shape[-1]
        if dv > MAX_DIM:
            reasons.append(f"value head dim {dv} is above the maximum of {MAX_DIM}")
        if call.window is not None and call.q_raw is not None and call.q_raw.shape[-1] > MAX_DIM:
            reasons.append(f"the hybrid's window part (the flash kernel) takes q/k head dims up "
                           f"to {MAX_DIM}, got {call.q_raw.shape[-1]}")
        return reasons

    def run(self, call: LinearAttentionCall):
        from .op import linear_attention_triton

        if call.window is not None:
            from .hybrid_triton import hybrid_attention_triton

            return hybrid_attention_triton(call)
        cu = longest = None
        if call.segments is not None:  # the kernels read the packed tensors in place
            cu = torch.tensor([0] + [b for _, b in call.segments], dtype=torch.int32,
                              device=call.q.device)
            longest = max((b - a for a, b in call.segments), default=0)
        return linear_attention_triton(
            call.q, call.k, call.v, call.s0, call.z0, call.feature, call.causal, call.normalize,
            call.eps, call.scale, decay=call.decay, cu_seqlens=cu, max_seqlen=longest,
        )


class TorchLinear(LinearBackend):
    """Chunked PyTorch: any device, dtype and size; the hybrid and packed sequences."""

    name = "torch"
    kind = "torch"

    def run(self, call: LinearAttentionCall):
        from .torch_impl import compute_dtype

        q, k = call.q, call.k
        fkw = call.fkw
        if call.feature != "identity" or call.scale != 1.0:
            phi = FEATURE_MAPS[call.feature]
            cdt = compute_dtype(q.dtype)  # map in fp32, as the kernels do
            q, k = phi(q.to(cdt) * call.scale), phi(k.to(cdt))
            if call.kw is not None:
                fkw = phi(call.kw.to(cdt))
        if call.segments is None:
            return _torch_one(call, q, k, call.v, call.q_raw, call.k_raw, call.s0, call.z0,
                              call.kw, call.vw, fkw)
        # packed: every sequence on its own (a host loop over the segments), states stacked
        outs, states = [], []
        for i, (a, b) in enumerate(call.segments):
            def cut(t, a=a, b=b):
                return None if t is None else t[:, :, a:b]

            def row(t, i=i):
                return None if t is None else t[i:i + 1]

            o, *st = _torch_one(call, cut(q), cut(k), cut(call.v), cut(call.q_raw),
                                cut(call.k_raw), row(call.s0), row(call.z0), None, None, None)
            outs.append(o)
            states.append(st)
        o = torch.cat(outs, 2) if outs else call.v.new_zeros(call.v.shape[:3] + (0,))
        if call.window is not None:  # no per-sequence state for packed hybrid calls
            return o, None, None
        s = torch.cat([st[0] for st in states], 0)
        z = torch.cat([st[1] for st in states], 0)
        return o, s, z


def _torch_one(call: LinearAttentionCall, fq, fk, v, q, k, s0, z0, kw, vw, fkw):
    """One (unpacked) batch on the torch backend: ``(o, s, z)``, and for the hybrid also
    ``(k_win, v_win, valid_win)``."""
    from .hybrid import hybrid_attention_torch
    from .torch_impl import linear_attention_torch

    if call.window is None:
        return linear_attention_torch(fq, fk, v, s0, z0, call.causal, call.normalize, call.eps,
                                      decay=call.decay)
    return hybrid_attention_torch(
        q, k, v, fq, fk, call.window, call.softmax_scale, s0=s0, z0=z0, kw=kw, vw=vw, fkw=fkw,
        valid_keys=call.valid_keys if call.segments is None else None,
        window_valid=call.window_valid, eps=call.eps, decay=call.decay)


BACKENDS: tuple[Backend, ...] = (TritonLinear(), TorchLinear())


def run_linear_attention(call: LinearAttentionCall, backend: str):
    """Dispatch a validated call: ``(o, s, z)``, for the hybrid ``(o, s, z, k_win, v_win,
    valid_win)`` (packed hybrid calls: ``(o, None, None)``)."""
    return select_backend(call, backend, BACKENDS, op="linear_attention").run(call)
