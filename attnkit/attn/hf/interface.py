"""The functions transformers calls under ``attn_implementation="attnkit"``.

:mod:`attnkit.attn.hf` registers

* an attention function ``"attnkit"`` with ``transformers.AttentionInterface``: it receives
  ``query [B, Hq, Nq, D]``, ``key``/``value [B, Hkv, Nk, D]`` from the model (after the KV cache
  update) and returns ``(out [B, Nq, Hq, D], None)`` computed by :func:`attnkit.attention` (or by
  linear attention, see :class:`LinearAttention`);
* a mask function ``"attnkit"`` with ``transformers.masking_utils.AttentionMaskInterface`` that
  never builds an ``N x N`` mask: it returns ``None`` when no key is padded, else the 2-D bool
  padding mask ``[B, Nk]`` (True = attend) cut to the layer's keys, exactly like transformers'
  own flash-attention mask function.

so ``from_pretrained(..., attn_implementation="attnkit")`` and
``model.set_attn_implementation("attnkit")`` work. What each layer computes:

* **pattern**: causal or bidirectional from the module (``is_causal``), the layer's
  ``sliding_window`` (Mistral, Qwen2, Gemma-style interleaved ``layer_types``; transformers passes
  it per layer) becomes ``SlidingWindow(window - 1, 0)``, and a bidirectional local window
  (ModernBERT) ``SlidingWindow(c, c)`` with ``c = config.sliding_window``, as the model's own mask
  (:func:`~attnkit.attn.hf.specs.model_pattern`); :func:`swap_attention` overrides it for
  all or some layers (any :class:`~attnkit.Pattern`, or :class:`LinearAttention`);
* **padding**: the ``[B, Nk]`` key mask; the pattern applies to tensor positions, as in
  transformers, so left padding works; rows that see no key give zeros;
* **packing** (``DataCollatorWithFlattening``): ``cu_seq_lens_q``/``cu_seq_lens_k`` (and
  ``max_length_q``/``max_length_k``) keyword arguments, or else ``position_ids`` that restart
  inside a row while no padding mask is given, select the ``cu_seqlens`` path: sequences never
  see each other;
* **generation**: transformers' caches (dynamic, sliding-window, static: a static cache's unfilled
  tail is cut off using the padding mask's length, as transformers' flash path does); decoding
  steps are ``Nq = 1`` calls against the cache, bottom-right aligned. That cut is why a compiled
  ``generate`` on a static cache recompiles at every step (the key mask grows by one column;
  padding it to the cache's length would need the queries' cache positions, which the
  bottom-right aligned patterns do not take): GPT-2's
  ``test_generate_compile_model_forward_fullgraph`` fails on that recompile alone.

``output_attentions=True`` computes those calls the eager way (:mod:`~.eager`, one warning), so
the weights come back; a dense 4-D mask is then applied as it is. Under ``torch.compile`` on the
CPU, band patterns without packing compile in the graph as plain tensor ops (``fullgraph=True``
works; they form the ``N x N`` scores); packed and block-sparse calls run outside the graph.

Not supported (a clear error, never wrong numbers): additive position biases (T5),
``head_mask``, chunked attention (Llama 4), custom dense 4-D masks together with a
:func:`swap_attention` override, ``output_attentions=True`` on a linear-attention layer. A 4-D
mask given to a model that runs the model's own pattern (a custom mask, or mask overlays such as
bidirectional image tokens) is handed to transformers' ``sdpa`` function after a one-time
warning. Attention dropout is not applied (one-time warning).
"""

from __future__ import annotations

import torch

from ..functional import attention
from ..patterns import BandPattern
from . import runtime
from .eager import plain_attention
from .linear import hf_linear_attention
from .linear_cache import STATE_TAG
from .packing import flatten, packing, segments, unflatten
from .persist import layer_spec
from .runtime import _warn_once
from .specs import LinearAttention, model_pattern

__all__ = ["attnkit_attention_forward", "attnkit_mask"]


# --------------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------------


def attnkit_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` entry: ``None`` or a bool ``[B, kv_length]`` key mask.

    ``attention_mask`` is the user's 2-D mask over all tokens seen so far; the layer's keys are
    its last ``kv_length`` columns (a sliding-window cache keeps only the last keys; a static
    cache is longer than the mask, and the mask is then returned whole). Mask overlays that a
    key mask cannot express (``or``/``and`` mask functions, which transformers flags with
    ``use_vmap=True``, and the blockwise overlay of ``block_sequence_ids``) get a dense 4-D mask
    from transformers' ``sdpa_mask`` and, later, the ``sdpa`` attention function, with a one-time
    warning.
    """
    if kwargs.get("use_vmap") or _has_or_overlay(mask_function):
        from transformers.masking_utils import sdpa_mask

        _warn_once("overlay", "this model adds a custom mask overlay (e.g. bidirectional image "
                   "tokens) that attnkit cannot express as a key mask; those masks are built "
                   "dense and run through transformers' 'sdpa'")
        kwargs["allow_is_causal_skip"] = False
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, **kwargs)
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:] if attention_mask.shape[-1] > kv_length else attention_mask
    mask = mask.to(torch.bool)
    if torch.compiler.is_compiling():
        # no all-True check under torch.compile: it reads the mask's values (a graph break, so
        # fullgraph=True failed, and the resumed frame recompiled for every new mask length:
        # GPT-2's test_generate_compile_model_forward_fullgraph and
        # test_static_cache_no_recompile_with_smaller_length); an all-True key mask gives the
        # same result as none
        return mask
    if mask.shape[-1] == kv_length and bool(mask.all()):  # one sync per forward, as transformers' FA2
        return None
    return mask


def _has_or_overlay(fn, depth: int = 0) -> bool:
    """Whether transformers' mask function unions an overlay into the pattern (``or_masks``).

    ``create_causal_mask(..., block_sequence_ids=...)`` (Gemma 3, PaliGemma, GIT: image tokens
    attend each other bidirectionally) ORs a blockwise overlay in *without* ``use_vmap``; a key
    mask cannot express it, and ignoring it would silently make those tokens causal. The
    ``and`` compositions (sliding window, packing) stay expressible, so only an ``or_mask``
    anywhere in the closures counts.
    """
    if depth > 8 or not callable(fn):
        return False
    if getattr(fn, "__name__", "") == "or_mask":
        return True
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        items = inner if isinstance(inner, tuple) else (inner,)
        if any(_has_or_overlay(f, depth + 1) for f in items if callable(f)):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------


def _reject_unsupported(kwargs: dict, dropout: float) -> None:
    if kwargs.get("position_bias") is not None:
        raise ValueError("attnkit does not support additive position biases (position_bias, as in "
                         "T5); use attn_implementation='sdpa'")
    if kwargs.get("head_mask") is not None:
        raise ValueError("attnkit does not support head_mask; use attn_implementation='eager'")
    if dropout:
        _warn_once("dropout", f"attention dropout (p={dropout}) is not applied by attnkit; "
                   "training proceeds without it")


def _reject_chunked(module) -> None:
    """Chunked attention (Llama 4's ``attention_chunk_size``) is a mask transformers builds in
    the mask function; a key mask cannot carry it, so refuse rather than attend across chunks."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is None:
        return
    types = getattr(config, "layer_types", None)
    layer = getattr(module, "layer_idx", None)
    kind = types[layer] if types is not None and layer is not None and layer < len(types) else None
    if kind is None or "chunk" in str(kind):
        raise ValueError(
            f"attnkit does not support chunked attention (attention_chunk_size={chunk}); use "
            "attn_implementation='sdpa' or 'flex_attention' for this model"
        )


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _warn_once("dense-mask", f"received a dense {attention_mask.dim()}-D attention mask "
               f"{tuple(attention_mask.shape)}; attnkit only takes key padding masks, so these "
               "calls run transformers' 'sdpa'")
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def attnkit_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry.

    Args:
        module: the model's attention module (``is_causal``, ``layer_idx``, ``config``).
        query: ``[B, Hq, Nq, D]``; key, value: ``[B, Hkv, Nk, D]`` (after the cache update, so
            ``Nk >= Nq``; queries are the last ``Nq`` positions).
        attention_mask: ``None`` or the bool ``[B, L]`` key mask from :func:`attnkit_mask`.
        scaling: the model's softmax scale. sliding_window: the layer's window (tokens).
        kwargs: transformers' extra arguments (``position_ids``, ``cu_seq_lens_q``, ...).

    Returns:
        ``(out [B, Nq, Hq, Dv], None)``.
    """
    _reject_unsupported(kwargs, dropout)
    _reject_chunked(module)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    spec = layer_spec(module)
    # a LinearAttentionCache layer tags the key it returns; read it before any re-layout below
    state_layer = getattr(key, STATE_TAG, None)
    # gpt-oss passes its learned per-head sink logits as s_aux
    sinks = kwargs.pop("s_aux", None)
    if sinks is None:
        sinks = kwargs.pop("sinks", None)
    if spec is None:  # the layer's own pattern, as the model's own mask builds it
        config_window = getattr(getattr(module, "config", None), "sliding_window", None)
        pattern = model_pattern(bool(is_causal), sliding_window, config_window)
    else:
        pattern = spec
    dense = attention_mask is not None and (attention_mask.dim() != 2
                                            or attention_mask.dtype != torch.bool)
    if dense and spec is not None:
        raise ValueError(
            f"this layer runs the attnkit override {spec!r}, which cannot be combined with the "
            f"dense {attention_mask.dim()}-D attention mask {tuple(attention_mask.shape)} the "
            "model passed; give a 2-D padding mask, or restore_attention(model)"
        )
    if kwargs.get("output_attentions"):
        from .eager import eager_with_weights

        if isinstance(spec, LinearAttention):
            raise ValueError(
                f"output_attentions=True: this layer runs the attnkit override {spec!r}, linear "
                "attention, which has no attention weights; call the model without "
                "output_attentions, or restore_attention(model)"
            )
        _warn_once("output-attentions", "output_attentions=True: attnkit never forms attention "
                   "weights, so these calls run the model's eager attention (slower, O(N^2) "
                   "memory) to return them")
        # a dense mask (a custom 4-D mask, or an overlay such as Gemma 3's image-token blocks)
        # already holds the layer's whole pattern: it is applied alone, as sdpa would
        return eager_with_weights(module, query, key, value, attention_mask, pattern, scaling,
                                  softcap, sinks, kwargs)
    if dense:
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling, is_causal, kwargs)

    kpm = attention_mask
    if kpm is not None:
        if kpm.shape[1] < key.shape[2]:  # a static cache: keys past the mask are unfilled slots
            key, value = key[:, :, : kpm.shape[1]], value[:, :, : kpm.shape[1]]
        elif kpm.shape[1] > key.shape[2]:
            kpm = kpm[:, -key.shape[2]:]

    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    packed = packing(kwargs, B, Nq, Nk, kpm is not None)
    if packed is not None and B > 1:
        query, key, value = flatten(query), flatten(key), flatten(value)

    if isinstance(spec, LinearAttention):
        if softcap is not None or sinks is not None:
            raise ValueError(
                f"this layer runs the attnkit override {spec!r}, which has no soft-capping or "
                "attention sinks; the model uses them (softcap / s_aux), so restore_attention(model) "
                "or swap to a softmax pattern"
            )
        parts = segments(packed, query.shape[2], key.shape[2]) if packed is not None else None
        out = hf_linear_attention(query, key, value, kpm, spec, bool(is_causal), parts,
                                  state_layer, scaling=scaling)
    else:
        out = _softmax_attention(query, key, value, pattern, scaling, kpm, packed,
                                 softcap=softcap, sinks=sinks)

    if packed is not None and B > 1:
        out = unflatten(out, B)
    return out.transpose(1, 2), None


def _softmax_attention(q, k, v, pattern, scaling, kpm, packed, softcap=None, sinks=None):
    """Softmax attention under ``pattern`` (:func:`attnkit.attention`): ``q [B, Hq, Nq, D]``,
    ``k [B, Hkv, Nk, D]``, ``v [B, Hkv, Nk, Dv]`` -> ``[B, Hq, Nq, Dv]``; values of their own head
    dim (DeepSeek-V3's 192/128) go to the kernels as they are, without padding."""
    dq = q.shape[-1]
    scale = float(scaling) if scaling is not None else dq ** -0.5
    kw = {}
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        kw = dict(cu_seqlens=(cu_q, cu_k), max_seqlen=(max_q, max_k))
    if softcap is not None:
        kw["softcap"] = float(softcap)
    if sinks is not None:
        kw["sinks"] = sinks
    fn = attention
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        if packed is None and isinstance(pattern, BandPattern):
            _say_plain_under_compile(_CPU_COMPILE_PLAIN)  # runs at trace time, not in the graph
            return plain_attention(q, k, v, kpm, pattern, scale, softcap, sinks)[0]
        fn = _outside_the_graph()
    return fn(q, k, v, pattern, scale=scale, valid_keys=kpm, backend=runtime.get_backend(), **kw)


_CPU_COMPILE = ("attnkit's CPU (torch) attention plans its pieces on the host from tensor values, "
                "which torch.compile cannot trace: under torch.compile, packed sequences and "
                "block-sparse patterns run outside the graph (a graph break per layer), so "
                "fullgraph=True cannot compile them on the CPU; on CUDA the Triton kernels are "
                "custom ops that compile in the graph")


_CPU_COMPILE_PLAIN = ("under torch.compile on the CPU, dense, causal and sliding-window attention "
                      "runs as plain tensor ops inside the graph, forming the N x N scores "
                      "(O(N^2) memory, the eager way), so that fullgraph=True compiles; run the "
                      "model without torch.compile on the CPU for attnkit's O(N) path")


def _plain_under_compile_said(message: str) -> bool:
    """Warn once that a compiled CPU call takes the plain path. Under ``torch.compile`` this runs
    for real while dynamo traces (``assume_constant_result``, applied below: its result is baked
    in as a constant), so the warning comes once, at compile time, and is no graph break (a
    ``warnings.warn`` in the traced code is one, which ``fullgraph=True`` refuses)."""
    _warn_once("cpu-compile-plain", message)
    return True


_say_plain_under_compile = _plain_under_compile_said
if hasattr(torch, "_dynamo") and hasattr(torch._dynamo, "assume_constant_result"):
    _say_plain_under_compile = torch._dynamo.assume_constant_result(_plain_under_compile_said)


def _outside_the_graph():
    """:func:`attnkit.attention` marked ``torch.compiler.disable`` (made once): transformers'
    ``torch.compile`` tests on the CPU traced into the torch backend and failed on a data-dependent
    guard (``covered[rows].any()``), or recompiled per shape until the 180 s timeout. Band
    patterns without packing compile in the graph instead (:func:`~.eager.plain_attention`:
    GPT-2's ``test_generate_compile_model_forward_fullgraph`` asks for ``fullgraph=True``)."""
    global _disabled
    if _disabled is None:
        try:
            _disabled = torch.compiler.disable(_warned_attention, reason=_CPU_COMPILE)
        except TypeError:  # torch without disable(reason=...)
            _disabled = torch.compiler.disable(_warned_attention)
    return _disabled


_disabled = None


def _warned_attention(*args, **kwargs):
    _warn_once("cpu-compile", _CPU_COMPILE)
    return attention(*args, **kwargs)
