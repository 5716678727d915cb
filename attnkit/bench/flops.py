"""FLOP and byte counts: what one call of each op must do, independent of how it is done.

Attention follows flash-attention's convention so that TFLOP/s figures compare with published
ones: a dense forward is ``4 * B * H * Nq * Nk * D`` (two GEMMs, ``QK^T`` and ``PV``, at 2 FLOPs
per multiply-add), a causal forward half of that, and any other pattern ``4 * B * H * pairs * D``
with ``pairs`` the visited (query, key) pairs (:meth:`attnkit.Pattern.visited_pairs`). Backward
counts 2.5x the forward (five GEMMs against two) and forward+backward 3.5x. Recomputation inside
a kernel is not counted: the figure is useful work per second.

Linear attention uses the recurrent form's leading term, ``4 * B * H * N * F * Dv`` forward (a
``phi(k) v^T`` state update and a ``phi(q) S`` read per token), with the same 2.5x / 3.5x
factors so the rows read like the attention rows. LoRA counts its GEMMs exactly (the frozen base
weight gets no gradient).

Bytes are the minimum traffic: every input read once and every output written once. GB/s from
them is the figure that matters for memory-bound ops (linear attention, LoRA at small rank).
"""

from __future__ import annotations

from ..attn.patterns import Causal, Dense, Pattern

__all__ = [
    "MODES", "MODE_FACTOR", "attention_flops", "attention_bytes", "linear_attention_flops",
    "lora_flops", "lora_bytes",
]

#: What a benchmark point times: the forward, the backward alone, or both.
MODES = ("fwd", "bwd", "fwd+bwd")
#: Backward / forward+backward FLOPs as multiples of the forward (flash-attention's convention).
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _check_mode(mode: str) -> None:
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def attention_flops(batch: int, heads: int, nq: int, nk: int, d: int, pattern: Pattern | None,
                    mode: str = "fwd") -> float:
    """FLOPs of one attention call; ``pattern=None`` means dense."""
    _check_mode(mode)
    if pattern is None or isinstance(pattern, Dense):
        pairs = nq * nk
    elif isinstance(pattern, Causal):
        pairs = nq * nk / 2  # the convention halves; the exact count is N(N+1)/2
    else:
        # Per (batch row, head); a block-sparse layout with several heads gives their mean.
        pairs = pattern.visited_pairs(nq, nk)
    return 4.0 * batch * heads * pairs * d * MODE_FACTOR[mode]


def attention_bytes(batch: int, heads: int, n: int, d: int, elem: int, mode: str = "fwd") -> float:
    """Minimum bytes moved: fwd reads q, k, v and writes o and the fp32 LSE; bwd reads q, k, v,
    o, do and the LSE and writes dq, dk, dv. (Also used for linear attention, whose state stays
    on chip.)"""
    _check_mode(mode)
    tensor = batch * heads * n * d * elem
    lse = batch * heads * n * 4
    fwd = 4 * tensor + lse
    bwd = 8 * tensor + lse
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def linear_attention_flops(batch: int, heads: int, n: int, f: int, dv: int, mode: str = "fwd") -> float:
    """FLOPs of causal or bidirectional linear attention with ``F`` features and value dim ``Dv``."""
    _check_mode(mode)
    return 4.0 * batch * heads * n * f * dv * MODE_FACTOR[mode]


def lora_flops(tokens: int, d_in: int, d_out: int, rank: int, mode: str = "fwd") -> float:
    """FLOPs of ``y = x W^T + s (x A^T) B^T`` on ``tokens`` rows, base weight frozen.

    Forward: ``2M(in*out + r*in + r*out)``. Backward: ``dx = dy W + s (dy B) A`` costs
    ``2M(out*in + out*r + r*in)``, ``dB`` ``2M*out*r`` and ``dA`` ``2M*r*in``; no ``dW``.
    """
    _check_mode(mode)
    m = tokens
    fwd = 2.0 * m * (d_in * d_out + rank * d_in + rank * d_out)
    bwd = 2.0 * m * (d_in * d_out + 2 * rank * (d_in + d_out))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def lora_bytes(tokens: int, d_in: int, d_out: int, rank: int, elem: int, mode: str = "fwd") -> float:
    """Minimum bytes: fwd reads x, W, A, B and writes y; bwd reads dy, x, W, A, B and writes
    dx, dA, dB."""
    _check_mode(mode)
    weights = (d_in * d_out + rank * d_in + rank * d_out) * elem
    fwd = tokens * (d_in + d_out) * elem + weights
    bwd = tokens * (d_out + d_in + d_in) * elem + weights + rank * (d_in + d_out) * elem
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])
