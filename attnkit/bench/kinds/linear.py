"""The linear-attention kind: attnkit, the chunked torch form, the O(N^2) form, fla."""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..flops import attention_bytes, linear_attention_flops
from ..registry import Impl, Kind, Point, Unavailable, Workload, register_impl, register_kind
from .common import attnkit_backend as _attnkit_backend
from .common import on_cuda as _on_cuda
from .common import qkv as _qkv
from .common import tensor_bytes as _tensor_bytes


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x.float()) + 1


def _build_linear_attnkit(backend: str | None, point: Point, requires_grad: bool) -> Workload:
    from ...attn.linear import linear_attention

    if backend == "torch" and not _on_cuda(point):
        raise Unavailable("on the CPU attnkit itself runs the torch backend (the 'attnkit' row)")
    chosen = backend or _attnkit_backend(point)
    q, k, v = _qkv(point, requires_grad)
    return Workload(lambda: linear_attention(q, k, v, feature_map="elu1", causal=True, backend=chosen),
                    [q, k, v])


def _build_linear_quadratic(point: Point, requires_grad: bool) -> Workload:
    """The O(N^2) form ``(phi(q) phi(k)^T * causal) v / row sums``: what linear attention avoids."""
    q, k, v = _qkv(point, requires_grad)

    def fn():
        fq, fk = _elu1(q), _elu1(k)
        a = (fq @ fk.transpose(-1, -2)).tril()
        o = (a @ v.float()) / (a.sum(-1, keepdim=True) + 1e-6)
        return o.to(q.dtype)

    return Workload(fn, [q, k, v])


def _build_fla(point: Point, requires_grad: bool) -> Workload:
    if importlib.util.find_spec("fla") is None:
        raise Unavailable("flash-linear-attention (fla) is not installed")
    if not _on_cuda(point):
        raise Unavailable("flash-linear-attention needs a CUDA device")
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except (ImportError, OSError) as e:
        raise Unavailable(f"flash-linear-attention is installed but does not import: {e}") from None

    q, k, v = _qkv(point, requires_grad, layout="bnhd")
    kwargs = {"scale": 1.0, "normalize": True}
    if "head_first" in inspect.signature(chunk_linear_attn).parameters:
        kwargs["head_first"] = False  # older fla defaults to [B, H, T, D]; ours are [B, T, H, D]

    def fn():
        fq, fk = _elu1(q).to(q.dtype), _elu1(k).to(k.dtype)  # the same map, outside the kernel
        out = chunk_linear_attn(fq, fk, v, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return Workload(fn, [q, k, v])


def _predict_linear(quadratic: bool) -> Callable[[Point], float]:
    def predict(point: Point) -> float:
        grad = 1 if point.mode == "fwd" else 2
        base = _tensor_bytes(point, 8 * grad) * (4 / point.elem)  # fp32 copies of the mapped inputs
        return base + (2 * 4 * point.batch * point.heads * point.n**2 * grad if quadratic else 0)
    return predict


def _linear_flops(p: Point) -> float:
    return linear_attention_flops(p.batch, p.heads, p.n, p.d, p.d, p.mode)


def _linear_bytes(p: Point) -> float:
    return attention_bytes(p.batch, p.heads, p.n, p.d, p.elem, p.mode)


register_kind(Kind("linear", "linear_attention", "causal linear attention, elu+1 feature map",
                   _linear_flops, _linear_bytes, 1.0))
register_impl("linear", Impl("attnkit", functools.partial(_build_linear_attnkit, None), False,
                             _predict_linear(False), tier=0))
register_impl("linear", Impl("torch-chunked", functools.partial(_build_linear_attnkit, "torch"), True,
                             _predict_linear(False)))
register_impl("linear", Impl("torch-quadratic", _build_linear_quadratic, True, _predict_linear(True)))
# tier 2 with the compiled baselines: fla autotunes on its first call, which the budget's
# compile reserve must cover.
register_impl("linear", Impl("fla", _build_fla, True, _predict_linear(False), tier=2))


# --------------------------------------------------------------------------------------------
# The sliding-window + linear hybrid (linear_attention(..., window=W)): Triton on CUDA, torch on the CPU
# --------------------------------------------------------------------------------------------

#: The hybrid's softmax window: the "window" kind's, so the two compare at one W.
HYBRID_WINDOW = {"cuda": 1024, "cpu": 128}


def _window(point: Point) -> int:
    return HYBRID_WINDOW["cuda" if _on_cuda(point) else "cpu"]


def _build_hybrid_attnkit(point: Point, requires_grad: bool) -> Workload:
    from ...attn.linear import linear_attention

    q, k, v = _qkv(point, requires_grad)
    w = _window(point)
    # "auto": on CUDA the Triton composition (flash window + shifted linear kernel)
    return Workload(lambda: linear_attention(q, k, v, feature_map="elu1", window=w), [q, k, v])


def _hybrid_flops(p: Point) -> float:
    """Linear attention's, plus the window's scores and weighted values (``4 N W D``, half the
    tile is above the diagonal and skipped by nothing on the torch path: counted as computed)."""
    w = min(_window(p), p.n)
    from ..flops import MODE_FACTOR

    return _linear_flops(p) + 4.0 * p.batch * p.heads * p.n * (w + 64) * p.d * MODE_FACTOR[p.mode]


def _predict_hybrid(point: Point) -> float:
    grad = 1 if point.mode == "fwd" else 2
    tile = 4 * point.batch * point.heads * point.n * (_window(point) + 64) * 3 * grad  # scores kept
    return _tensor_bytes(point, 8 * grad) * (4 / point.elem) + tile


register_kind(Kind("hybrid", "linear_attention",
                   f"sliding-window ({HYBRID_WINDOW['cuda']} keys; {HYBRID_WINDOW['cpu']} on the CPU) "
                   "+ linear (elu+1) hybrid", _hybrid_flops, _linear_bytes, 1.0))
register_impl("hybrid", Impl("attnkit", _build_hybrid_attnkit, False, _predict_hybrid, tier=0))


# --------------------------------------------------------------------------------------------
# Decoding with swapped models: one greedy step after a T-token prompt (N = T)
# --------------------------------------------------------------------------------------------

DECODE_LAYERS, DECODE_VOCAB = 2, 256


def _decode_config(point: Point):
    from transformers import LlamaConfig

    hidden = point.heads * point.d
    return LlamaConfig(vocab_size=DECODE_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=DECODE_LAYERS, num_attention_heads=point.heads,
                       num_key_value_heads=point.heads, max_position_embeddings=point.n + 2**16,
                       pad_token_id=0)


def decode_cache_bytes(point: Point) -> float:
    """The cache one decoding step reads after ``T = N`` tokens: the KV cache of every layer
    (softmax), the state ``(S [F, Dv], z [F])`` in fp32 (linear), plus the ``W - 1``-slot window
    of keys/values and its validity (hybrid). Checked against ``cache.nbytes`` by the tests."""
    bh, d = point.batch * point.heads, point.d
    state = bh * (d * d + d) * 4
    if point.impl == "softmax":
        per_layer = 2 * bh * point.n * d * point.elem
    elif point.impl == "linear":
        per_layer = state
    else:
        w = _window(point) - 1
        per_layer = state + 2 * bh * w * d * point.elem + point.batch * w
    return float(DECODE_LAYERS * per_layer)


def _decode_flops(p: Point) -> float:
    """The matmuls of one step: ``2 x parameters`` per token, plus the attention's reads."""
    h = p.heads * p.d
    params = DECODE_LAYERS * (4 * h * h + 3 * h * 2 * h) + DECODE_VOCAB * h
    return 2.0 * p.batch * params + 2.0 * decode_cache_bytes(p) / p.elem


def _build_decode(swap: str, point: Point, requires_grad: bool) -> Workload:
    if requires_grad:
        raise Unavailable("decoding is inference only (run --modes fwd)")
    if importlib.util.find_spec("transformers") is None:
        raise Unavailable("transformers is not installed")
    from transformers import AutoModelForCausalLM, DynamicCache

    from ...attn import hf
    from ...attn.hf.linear_cache import LinearAttentionCache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_decode_config(point))
    model = model.to(device=point.device, dtype=point.torch_dtype).eval()
    if swap == "softmax":
        model.set_attn_implementation("sdpa")  # the model as it ships: transformers' SDPA
        cache = DynamicCache(config=model.config)
    else:
        hf.swap_attention(model, hf.LinearAttention(
            window=_window(point) if swap == "hybrid" else None))
        cache = LinearAttentionCache(model)
    # transformers 5 names the argument ``cache``; older releases ``past_key_values``
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, DECODE_VOCAB, (point.batch, point.n), generator=g).to(point.device)
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{name: cache})  # prefill: not timed
    tok = prompt[:, -1:]

    def step():
        out = model(input_ids=tok, use_cache=True, **{name: cache}).logits
        if swap == "softmax":
            cache.crop(-1)  # drop the new token: every timed step decodes after T tokens
        # (a state cannot forget a token: the linear and hybrid steps run after T + reps
        # tokens, at the same cost, since their steps do not depend on T)
        return out

    workload = Workload(step, [])
    workload.cache = cache  # for the byte check of the tests (decode_cache_bytes)
    return workload


register_kind(Kind("decode", "generate",
                   f"one greedy decoding step after N prompt tokens: a {DECODE_LAYERS}-layer Llama "
                   f"(hidden = heads x d) as it ships (softmax, SDPA + DynamicCache), swapped to "
                   f"linear attention, or to the hybrid (window {HYBRID_WINDOW['cpu']} on the CPU, "
                   f"{HYBRID_WINDOW['cuda']} on CUDA), both with LinearAttentionCache; 'bytes' is the "
                   "cache the step reads", _decode_flops, decode_cache_bytes, 0.0))
for _swap in ("softmax", "linear", "hybrid"):
    register_impl("decode", Impl(_swap, functools.partial(_build_decode, _swap), _swap == "softmax",
                                 lambda p: 4 * decode_cache_bytes(p) + 2**26, tier=0))
