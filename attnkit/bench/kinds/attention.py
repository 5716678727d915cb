"""Attention kinds (dense, causal, window, BigBird, Longformer) with attnkit and every baseline.

Attention kinds share one set of implementations, built from the kind's pattern by
:func:`attention_kind`, so a new pattern (a block-sparse layout, say) is one call::

    attention_kind("bigbird", lambda point: bigbird(point.n, ...), expected_slope=1.0)

Baselines that cannot run here raise :class:`Unavailable` with the reason (not installed, no
CUDA device, a mask the SDPA backend does not take); the sweep records that as a skipped row.
Block-sparse layouts are built by name through :data:`SPARSE_BUILDERS`; an unknown name raises.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...attn.patterns import Causal, Dense, Pattern, SlidingWindow
from ..flops import attention_bytes, attention_flops
from ..registry import Impl, Kind, Point, Unavailable, Workload, register_impl, register_kind
from .common import attnkit_backend as _attnkit_backend
from .common import on_cuda as _on_cuda
from .common import qkv as _qkv
from .common import tensor_bytes as _tensor_bytes

__all__ = ["attention_kind", "WINDOW", "SDPA_BACKENDS", "SPARSE", "SPARSE_BUILDERS",
           "sparse_pattern"]


#: Sliding-window width of the ``window`` kind, by device type: the same for every N of a sweep, so
#: its cost is linear in N (``SlidingWindow(w - 1)``: each query sees itself and ``w - 1`` keys back).
#: The CPU grid's N are small, hence a narrower band there.
WINDOW = {"cuda": 1024, "cpu": 128}
#: SDPA backends benchmarked as baselines (torch.nn.attention.SDPBackend member names).
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


def _window_for(point: Point) -> SlidingWindow:
    return SlidingWindow(WINDOW["cuda" if _on_cuda(point) else "cpu"] - 1)



def _band_mask(pattern: Pattern, n: int, device) -> torch.Tensor:
    """Bool mask (True = attend) of a pattern, ``[Lb or 1, Lh or 1, n, n]``, for baselines that
    take an explicit mask: the pattern's kernel spec, as every attnkit backend reads it."""
    from ...kernels.flash.naive import visible_mask_4d

    return visible_mask_4d(pattern, n, n, device)


def _build_attnkit(pattern_fn, point: Point, requires_grad: bool) -> Workload:
    from ...attn.functional import attention

    q, k, v = _qkv(point, requires_grad)
    pattern, backend = pattern_fn(point), _attnkit_backend(point)
    return Workload(lambda: attention(q, k, v, pattern, backend=backend), [q, k, v])


def _build_sdpa(backend_name: str, pattern_fn, point: Point, requires_grad: bool) -> Workload:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, SDPA_BACKENDS[backend_name], None)
    if member is None:
        raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{SDPA_BACKENDS[backend_name]}")
    if not _on_cuda(point) and backend_name in ("sdpa-efficient", "sdpa-cudnn"):
        raise Unavailable(f"{backend_name} has no CPU kernel (CUDA only)")
    pattern = pattern_fn(point)
    q, k, v = _qkv(point, requires_grad)
    kwargs: dict = {}
    if isinstance(pattern, Causal):
        kwargs["is_causal"] = True
    elif not isinstance(pattern, Dense):
        if backend_name in ("sdpa-flash", "sdpa-cudnn"):
            raise Unavailable(f"{backend_name} takes no arbitrary attention mask "
                              f"(needed for the {pattern.kind} pattern)")
        # The N x N mask is what a user of SDPA has to build: it is part of the baseline's cost.
        kwargs["attn_mask"] = _band_mask(pattern, point.n, point.device)

    def fn():
        with sdpa_kernel(member):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    return Workload(fn, [q, k, v])


def _raise_compile_limit() -> None:
    """FlexAttention is compiled once per shape; the sweep's many shapes exceed dynamo's default
    recompile limit (8), after which it would silently run eagerly."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    _raise_compile_limit()
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        # The bwd mode times backward(retain_graph=True) over one forward; a compiled graph whose
        # first backward donated its saved buffers refuses that ("compiled with non-empty donated
        # buffers"), and the graph is cached on disk, so a fwd+bwd point of an earlier run would
        # break the bwd point of a later one (the mechanism reproduced with torch 2.11 on a CPU
        # compiled function; flex's own backward runs only on a GPU). Part of the cache key.
        functorch_config.donated_buffer = False
    return torch.compile(flex_attention, dynamic=False)


def _build_flex(pattern_fn, point: Point, requires_grad: bool) -> Workload:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise Unavailable(f"FlexAttention is not in torch {torch.__version__}: {e}") from None
    if not _on_cuda(point) and os.environ.get("ATTNKIT_BENCH_FLEX_CPU") != "1":
        raise Unavailable("FlexAttention on the CPU compiles for ~20 s per shape; GPU grids only "
                          "(set ATTNKIT_BENCH_FLEX_CPU=1 to include it)")
    pattern = pattern_fn(point)
    mask_mod = None
    mask_b = mask_h = None  # None: one mask for every batch row / head
    spec = pattern.compile(point.n, point.n)
    if spec.kind == "block_sparse":  # look the element mask up (N x N bytes)
        dense = _band_mask(pattern, point.n, point.device)
        hb, hh = dense.shape[0] > 1, dense.shape[1] > 1
        mask_b, mask_h = (dense.shape[0] if hb else None), (dense.shape[1] if hh else None)

        def mask_mod(b, h, qi, ki):
            return dense[b if hb else 0, h if hh else 0, qi, ki]
    elif not spec.is_dense:
        left, right = spec.left, spec.right

        def mask_mod(b, h, qi, ki):
            ok = qi >= 0  # all-true of the right shape
            if left is not None:
                ok = ok & (ki >= qi - left)
            if right is not None:
                ok = ok & (ki <= qi + right)
            return ok

    block_mask = None
    if mask_mod is not None:
        # The block mask is built outside the timed call, as a model builds it once per shape.
        # Per-batch / per-head layouts keep their own masks.
        block_mask = create_block_mask(mask_mod, mask_b, mask_h, point.n, point.n,
                                       device=point.device)
    q, k, v = _qkv(point, requires_grad)
    flex = _compiled_flex()
    return Workload(lambda: flex(q, k, v, block_mask=block_mask), [q, k, v])


def _build_flash_attn(pattern_fn, point: Point, requires_grad: bool) -> Workload:
    if importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash-attn is not installed (pip install flash-attn)")
    if not _on_cuda(point):
        raise Unavailable("flash-attn needs a CUDA device")
    if point.torch_dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable(f"flash-attn takes fp16/bf16, not {point.dtype}")
    try:
        from flash_attn import flash_attn_func
    except (ImportError, OSError) as e:  # e.g. a wheel built against another torch
        raise Unavailable(f"flash-attn is installed but does not import: {e}") from None

    pattern = pattern_fn(point)
    spec = pattern.compile(point.n, point.n)
    if spec.kind != "band":
        raise Unavailable(f"flash-attn has no {pattern.kind} pattern")
    causal = spec.right == 0 and spec.left is None
    window = spec.offsets()
    q, k, v = _qkv(point, requires_grad, layout="bnhd")
    return Workload(lambda: flash_attn_func(q, k, v, causal=causal, window_size=window), [q, k, v])


def _predict_attention(quadratic: bool) -> Callable[[Point], float]:
    def predict(point: Point) -> float:
        grad = 1 if point.mode == "fwd" else 2
        linear = _tensor_bytes(point, 4 * grad) + 256 * 2**20  # + the torch backend's chunk budget
        if not quadratic:
            return linear
        # scores, probabilities and the mask in fp32, twice that for backward
        return linear + 3 * 4 * point.batch * point.heads * point.n**2 * grad
    return predict


def attention_kind(name: str, pattern_fn: Callable[[Point], Pattern], expected_slope: float,
                   description: str = "") -> Kind:
    """Register an attention kind whose pattern at a point is ``pattern_fn(point)`` (it may depend
    on ``point.n`` and ``point.device``), with attnkit and every attention baseline."""

    def flops(p: Point) -> float:
        return attention_flops(p.batch, p.heads, p.n, p.n, p.d, pattern_fn(p), p.mode)

    def nbytes(p: Point) -> float:
        return attention_bytes(p.batch, p.heads, p.n, p.d, p.elem, p.mode)

    kind = register_kind(Kind(name, "attention", description or name, flops, nbytes, expected_slope))
    register_impl(name, Impl("attnkit", functools.partial(_build_attnkit, pattern_fn), False,
                             _predict_attention(False), tier=0))
    for backend in SDPA_BACKENDS:
        register_impl(name, Impl(backend, functools.partial(_build_sdpa, backend, pattern_fn), True,
                                 _predict_attention(backend == "sdpa-math" or name not in
                                                    ("dense", "causal"))))
    register_impl(name, Impl("flex", functools.partial(_build_flex, pattern_fn), True,
                             _predict_attention(False), tier=2))
    register_impl(name, Impl("flash-attn", functools.partial(_build_flash_attn, pattern_fn), True,
                             _predict_attention(False)))
    return kind


attention_kind("dense", lambda p: Dense(), 2.0, "dense (non-causal) softmax attention")
attention_kind("causal", lambda p: Causal(), 2.0, "causal softmax attention")
attention_kind("window", _window_for, 1.0,
               f"causal sliding window of {WINDOW['cuda']} keys ({WINDOW['cpu']} on the CPU)")

#: Block-sparse layouts by device type: block size, BigBird's (window, global, random) blocks,


#: Block-sparse layouts by device type: block size, BigBird's (window, global, random) blocks,
#: Longformer's band width and global tokens. Fixed in N, so the work is linear in N.
SPARSE = {"cuda": {"block": 128, "bigbird": (3, 2, 3), "longformer": (1024, 64)},
          "cpu": {"block": 32, "bigbird": (3, 2, 3), "longformer": (128, 16)}}


def _bigbird(n: int, cfg: dict) -> Pattern:
    import attnkit

    w, g, r = cfg["bigbird"]
    return attnkit.bigbird(n, cfg["block"], num_window_blocks=w, num_global_blocks=g,
                           num_random_blocks=r, seed=0)


def _longformer(n: int, cfg: dict) -> Pattern:
    import attnkit

    window, glob = cfg["longformer"]
    return attnkit.longformer(n, cfg["block"], window=window, global_tokens=glob)


#: name -> builder ``(n, device config) -> Pattern`` of each block-sparse kind (the one table:
#: a name not in it is refused, never run as another layout).
SPARSE_BUILDERS: dict[str, Callable[[int, dict], Pattern]] = {
    "bigbird": _bigbird,
    "longformer": _longformer,
}


@functools.lru_cache(maxsize=64)
def sparse_pattern(name: str, n: int, device_type: str) -> Pattern:
    """One pattern object per (layout, N, device): it caches its compiled block lists."""
    builder = SPARSE_BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown block-sparse layout {name!r}; accepted: "
                         f"{', '.join(sorted(SPARSE_BUILDERS))}")
    if device_type not in SPARSE:
        raise ValueError(f"unknown device type {device_type!r}; accepted: {', '.join(SPARSE)}")
    return builder(n, SPARSE[device_type])


def _register_block_sparse() -> None:
    try:
        import attnkit

        attnkit.bigbird, attnkit.longformer  # noqa: B018 - probe: block-sparse may be absent
    except (ImportError, AttributeError):
        return

    def pattern_of(name: str, point: Point) -> Pattern:
        return sparse_pattern(name, point.n, "cuda" if _on_cuda(point) else "cpu")

    for name, what in (("bigbird", "BigBird-ITC block layout (window 3, global 2, random 3 blocks)"),
                       ("longformer", "Longformer band + global tokens, as a block-sparse pattern")):
        attention_kind(name, functools.partial(pattern_of, name), 1.0, what)


_register_block_sparse()
