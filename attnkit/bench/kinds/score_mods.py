"""Score-modified attention kinds: Gemma-2-style and gpt-oss-style layers, attnkit against
FlexAttention with the same ``score_mod`` and block mask.

* ``gemma2-softcap``: logit soft-capping ``50 * tanh(s / 50)`` in a causal sliding window of
  4096 keys (Gemma 2's local layers: ``attn_logit_softcapping = 50``, ``sliding_window = 4096``);
* ``gptoss-sinks``: one learned sink logit per head (a softmax column with no value) in a causal
  window of 128 keys (gpt-oss's local layers).

FlexAttention computes the soft-cap in its ``score_mod``; it has no sink column, so the sinks
baseline runs ``flex_attention(..., return_lse=True)`` and rescales each row by
``sigmoid(lse - sink)`` (``exp(lse) / (exp(lse) + exp(sink))``: the same softmax with one more
logit), as a user of FlexAttention writes it. Both block masks are built outside the timed call.

Every built workload is checked once against the float64 oracle
(:func:`~attnkit.kernels.flash.naive.attention_naive`) on the last :data:`ORACLE_ROWS` queries of
the first batch row (bottom-right alignment lets the oracle take a slice of the queries, so the
check costs ``ORACLE_ROWS x N``, never ``N x N``); a disagreement makes the row an ``error`` with
the measured difference, so no timing of a wrong result is ever reported.
"""

from __future__ import annotations

import functools
import os

import torch

from ...attn.patterns import SlidingWindow
from ..flops import attention_bytes, attention_flops
from ..registry import Impl, Kind, Point, Unavailable, Workload, register_impl, register_kind
from . import attention as _attention  # _compiled_flex looked up per call (tests patch it there)
from .attention import _predict_attention
from .common import attnkit_backend, on_cuda, qkv

__all__ = ["SCORE_MOD_KINDS", "ORACLE_ROWS"]

#: name -> (soft-cap or None, sinks?, window in keys, description)
SCORE_MOD_KINDS = {
    "gemma2-softcap": (50.0, False, 4096,
                       "Gemma-2-style: soft-cap 50, causal sliding window of 4096 keys"),
    "gptoss-sinks": (None, True, 128,
                     "gpt-oss-style: a learned sink per head, causal sliding window of 128 keys"),
}
#: Queries (the last ones of batch row 0) checked against the float64 oracle once per point.
ORACLE_ROWS = 128
#: Largest |attnkit or flex - oracle| accepted, by dtype (outputs of unit-variance values).
_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _sinks(point: Point) -> torch.Tensor:
    """The per-head sink logits ``[H]`` (fp32, fixed seed: the same for both implementations)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(point.heads, generator=g).to(point.device)


def _oracle_check(name: str, out: torch.Tensor, q, k, v, pattern, softcap, sinks) -> None:
    from ...kernels.flash.naive import attention_naive

    m = min(ORACLE_ROWS, q.shape[2])
    with torch.no_grad():
        want, _ = attention_naive(q[:1, :, -m:].detach(), k[:1].detach(), v[:1].detach(), pattern,
                                  softcap=softcap, sinks=sinks)
        err = (out[:1, :, -m:].double() - want).abs().max().item()
    tol = _TOL[q.dtype]
    if not err <= tol:  # also catches NaN
        raise RuntimeError(f"{name} disagrees with the float64 oracle: max |err| {err:.3g} over the "
                           f"last {m} queries (tolerance {tol:g} for {q.dtype})")


def _build_attnkit(kind: str, point: Point, requires_grad: bool) -> Workload:
    from ...attn.functional import attention

    softcap, has_sinks, window, _ = SCORE_MOD_KINDS[kind]
    q, k, v = qkv(point, requires_grad)
    pattern, backend = SlidingWindow(window - 1, 0), attnkit_backend(point)
    kw = {"softcap": softcap} if softcap is not None else {}
    if has_sinks:
        kw["sinks"] = _sinks(point)

    def fn():
        return attention(q, k, v, pattern, backend=backend, **kw)

    with torch.no_grad():
        _oracle_check("attnkit", fn(), q, k, v, pattern, softcap, kw.get("sinks"))
    return Workload(fn, [q, k, v])


def _build_flex(kind: str, point: Point, requires_grad: bool) -> Workload:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise Unavailable(f"FlexAttention is not in torch {torch.__version__}: {e}") from None
    if not on_cuda(point) and os.environ.get("ATTNKIT_BENCH_FLEX_CPU") != "1":
        raise Unavailable("FlexAttention on the CPU compiles for ~20 s per shape; GPU grids only "
                          "(set ATTNKIT_BENCH_FLEX_CPU=1 to include it)")
    if not on_cuda(point) and requires_grad:
        raise Unavailable("FlexAttention has no backward on the CPU")
    softcap, has_sinks, window, _ = SCORE_MOD_KINDS[kind]
    left = window - 1

    def mask_mod(b, h, qi, ki):
        return (ki <= qi) & (ki >= qi - left)

    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, qi, ki):
            return softcap * torch.tanh(score / softcap)

    block_mask = create_block_mask(mask_mod, None, None, point.n, point.n, device=point.device)
    q, k, v = qkv(point, requires_grad)
    flex = _attention._compiled_flex()
    sinks = _sinks(point) if has_sinks else None

    if sinks is None:
        def fn():
            return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
    else:
        sink = sinks[None, :, None]

        try:  # torch >= 2.9 asks for the log-sum-exp this way (return_lse is deprecated)
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:
            AuxRequest = None

        def fn():
            if AuxRequest is None:
                out, lse = flex(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                return_lse=True)
            else:
                out, aux = flex(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                return_aux=AuxRequest(lse=True))
                lse = aux.lse
            return out * torch.sigmoid(lse - sink).unsqueeze(-1).to(out.dtype)

    with torch.no_grad():
        _oracle_check("flex", fn(), q, k, v, SlidingWindow(left, 0), softcap, sinks)
    return Workload(fn, [q, k, v])


def _register(kind: str) -> None:
    softcap, has_sinks, window, description = SCORE_MOD_KINDS[kind]
    pattern = SlidingWindow(window - 1, 0)

    def flops(p: Point) -> float:
        return attention_flops(p.batch, p.heads, p.n, p.n, p.d, pattern, p.mode)

    def nbytes(p: Point) -> float:
        return attention_bytes(p.batch, p.heads, p.n, p.d, p.elem, p.mode)

    register_kind(Kind(kind, "attention", description, flops, nbytes, 1.0))
    register_impl(kind, Impl("attnkit", functools.partial(_build_attnkit, kind), False,
                             _predict_attention(False), tier=0))
    register_impl(kind, Impl("flex", functools.partial(_build_flex, kind), True,
                             _predict_attention(False), tier=2))


for _kind in SCORE_MOD_KINDS:
    _register(_kind)
