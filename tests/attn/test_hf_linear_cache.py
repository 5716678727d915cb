"""Generation with LinearAttentionCache: a constant-size recurrent state per swapped layer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: E402

from attnkit.attn import hf  # noqa: E402
from attnkit.attn.hf.linear_cache import LinearAttentionCache, RecurrentStateLayer  # noqa: E402
from tests.attn.hf_models import batch, build  # noqa: E402


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a cache layer's attributes (not the layer's own
    accounting, so a state kept somewhere unexpected still counts)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x, seen) for x in obj.values())
    return 0


def _cache_bytes(cache) -> int:
    seen: set[int] = set()
    return sum(_tensor_bytes(vars(layer), seen) for layer in cache.layers)


def _teacher_forced(model, out, mask):
    full = torch.cat([mask, torch.ones(mask.shape[0], out.shape[1] - mask.shape[1],
                                       dtype=mask.dtype)], 1)
    pos = (full.cumsum(-1) - 1).clamp(min=0)  # generate's positions under left padding
    with torch.no_grad():
        return model(input_ids=out, attention_mask=full, position_ids=pos).logits


def _generate(model, ids, mask, n, cache, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          cache=cache, return_dict_in_generate=True, output_logits=True, **kw)


def test_cache_size_does_not_grow():
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention())
    ids, mask = batch("left", B=2, N=6)
    sizes, dynamic = [], []
    for n in (20, 100):
        cache = LinearAttentionCache(model)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, cache=cache)
        assert out.shape[1] == 6 + n
        assert all(isinstance(layer, RecurrentStateLayer) for layer in cache.layers)
        assert cache.get_seq_length() == 6 + n - 1  # the last token is never fed back
        sizes.append(_cache_bytes(cache))
        assert sizes[-1] == cache.nbytes > 0
        ref = DynamicCache(config=model.config)
        model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                       min_new_tokens=n, cache=ref)
        dynamic.append(_cache_bytes(ref))
    assert sizes[0] == sizes[1]
    assert dynamic[1] > dynamic[0] > sizes[0]  # the KV cache grows; the state does not


@pytest.mark.parametrize("layers", [None, [0]], ids=["all-linear", "mixed"])
def test_greedy_equals_teacher_forced(layers):
    """Every step's logits (prefill from the parallel form, then recurrent steps) match one
    parallel forward over the generated sequence, and the tokens are its argmax; layer 1 of the
    mixed model keeps softmax attention and a KV cache layer."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(), layers=layers)
    ids, mask = batch("left", B=2, N=6)
    cache = LinearAttentionCache(model)
    res = _generate(model, ids, mask, 8, cache)
    if layers == [0]:
        assert isinstance(cache.layers[0], RecurrentStateLayer)
        assert isinstance(cache.layers[1], DynamicLayer)
        assert cache.layers[1].keys.shape[2] == 6 + 8 - 1
    logits = _teacher_forced(model, res.sequences, mask)
    steps = torch.stack(res.logits, 1)  # [B, new, V]
    real = mask.bool()
    torch.testing.assert_close(steps, logits[:, 5:-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(logits[:, 5:-1].argmax(-1), res.sequences[:, 6:])
    assert real[1, :3].logical_not().all()  # row 1 is left-padded (3 pads)


def test_left_padded_row_equals_unpadded():
    """Padded keys never enter the state: a left-padded row generates what it does alone."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(feature_map="relu", eps=1e-3))
    ids, mask = batch("left", B=2, N=8)
    padded = _generate(model, ids, mask, 6, LinearAttentionCache(model))
    alone_ids = ids[1:, 3:]  # row 1 without its 3 pads
    alone = _generate(model, alone_ids, torch.ones_like(alone_ids), 6, LinearAttentionCache(model))
    assert torch.equal(padded.sequences[1, 8:], alone.sequences[0, 5:])
    torch.testing.assert_close(torch.stack(padded.logits, 1)[1], torch.stack(alone.logits, 1)[0],
                               atol=1e-4, rtol=1e-4)


def test_matches_the_kv_cache_path_and_sampling():
    """The state path gives the recomputation path's tokens (greedy and seeded sampling)."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(), layers=[1])
    ids, mask = batch("left", B=2, N=5)
    greedy = [model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             use_cache=True, cache=c)
              for c in (LinearAttentionCache(model), DynamicCache(config=model.config))]
    assert torch.equal(greedy[0], greedy[1])
    sampled = []
    for c in (LinearAttentionCache(model), DynamicCache(config=model.config)):
        torch.manual_seed(123)
        sampled.append(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True,
                                      top_k=0, cache=c))
    assert torch.equal(sampled[0], sampled[1])


def test_stale_cache_is_refused():
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention())
    cache = LinearAttentionCache(model)
    hf.restore_attention(model)  # the layers no longer consume the state
    ids = torch.randint(3, 100, (1, 4))
    with torch.no_grad(), pytest.raises(RuntimeError, match="stale"):
        model(input_ids=ids, cache=cache)
        model(input_ids=ids[:, :1], cache=cache)


def test_refuses_crop():
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention())
    cache = LinearAttentionCache(model)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (1, 4)), cache=cache)
    with pytest.raises(ValueError, match="cannot crop -2 tokens"):
        cache.crop(-2)


def test_decay_generation_state_and_kv_paths_agree():
    """A decaying state (per-KV-head gamma) in the cache: greedy steps match the teacher-forced
    forward and the recomputation path, with left padding."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(decay=(0.9, 0.6)))
    ids, mask = batch("left", B=2, N=6)
    res = _generate(model, ids, mask, 6, LinearAttentionCache(model))
    logits = _teacher_forced(model, res.sequences, mask)
    torch.testing.assert_close(torch.stack(res.logits, 1), logits[:, 5:-1], atol=1e-4, rtol=1e-4)
    ref = _generate(model, ids, mask, 6, DynamicCache(config=model.config))
    assert torch.equal(res.sequences, ref.sequences)
    # and the decay is really applied: without it the logits differ
    hf.swap_attention(model, hf.LinearAttention())
    plain = _generate(model, ids, mask, 6, LinearAttentionCache(model))
    assert not torch.allclose(torch.stack(plain.logits, 1), torch.stack(res.logits, 1))


def test_callable_feature_map_with_the_cache():
    """A callable map (run outside the kernels, as Hedgehog maps are) through the cache."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(feature_map=torch.nn.functional.softplus))
    ids, mask = batch("left", B=2, N=5)
    res = _generate(model, ids, mask, 5, LinearAttentionCache(model))
    logits = _teacher_forced(model, res.sequences, mask)
    torch.testing.assert_close(torch.stack(res.logits, 1), logits[:, 4:-1], atol=1e-4, rtol=1e-4)
