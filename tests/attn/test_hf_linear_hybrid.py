"""``LinearAttention(window=W)`` (the sliding-window + linear hybrid) in Hugging Face models: the
attention function against the float64 oracle, generation with ``LinearAttentionCache`` (a
cache whose bytes do not depend on the tokens generated, greedy == teacher-forced, left
padding) and packed batches through the varlen path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache  # noqa: E402

from attnkit.attn import hf  # noqa: E402
from attnkit.attn.hf.linear import hf_linear_attention  # noqa: E402
from attnkit.attn.hf.linear_cache import LinearAttentionCache, RecurrentStateLayer  # noqa: E402
from attnkit.kernels.linear.feature_maps import FEATURE_MAPS  # noqa: E402
from attnkit.kernels.linear.naive import hybrid_attention_naive  # noqa: E402
from tests.attn.hf_models import batch, build  # noqa: E402
from tests.attn.test_hf_linear_cache import _cache_bytes, _generate, _teacher_forced  # noqa: E402


@pytest.mark.parametrize("nq", [9, 1], ids=lambda n: f"Nq{n}")
def test_hybrid_function_matches_oracle(nq):
    """The attention function, with and without left padding, as a prefill (Nq = Nk) and as a
    step over transformers' KV cache (Nq < Nk: the state is rebuilt from the cached keys)."""
    B, Hq, Hkv, Nk, D = 2, 4, 2, 9, 16
    q = torch.randn(B, Hq, nq, D)
    k, v = torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    kpm = torch.ones(B, Nk, dtype=torch.bool)
    kpm[1, :3] = False
    spec = hf.LinearAttention(window=3, decay=(0.9, 0.7))
    g = torch.tensor([0.9, 0.7], dtype=torch.float64)
    qfull = torch.cat([torch.zeros(B, Hq, Nk - nq, D), q], 2)  # the oracle wants one N
    for mask in (None, kpm):
        out = hf_linear_attention(q, k, v, mask, spec, True, scaling=0.3)
        ref = hybrid_attention_naive(qfull, k, v, FEATURE_MAPS["elu1"], 3, softmax_scale=0.3,
                                     valid_keys=mask, decay=g)[0][:, :, Nk - nq:]
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_hybrid_cache_size_is_constant():
    """20 and 100 new tokens leave the same cache bytes (state + a W - 1-slot window), while a
    DynamicCache grows."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(window=4))
    ids, mask = batch("left", B=2, N=6)
    sizes = []
    for n in (20, 100):
        cache = LinearAttentionCache(model)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, cache=cache)
        assert out.shape[1] == 6 + n
        layer = cache.layers[0]
        assert isinstance(layer, RecurrentStateLayer) and layer.state.k.shape[2] == 3
        sizes.append(_cache_bytes(cache))
        assert sizes[-1] == cache.nbytes > 0
    assert sizes[0] == sizes[1]
    ref = DynamicCache(config=model.config)
    model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, cache=ref)
    assert _cache_bytes(ref) > sizes[0]


@pytest.mark.parametrize("layers,window", [(None, 3), ([0], 1)], ids=["all-W3", "mixed-W1"])
def test_hybrid_greedy_equals_teacher_forced(layers, window):
    """Left-padded batch: every step's logits match one parallel forward over the generated
    sequence (the window crosses from the prompt into the generated tokens), the tokens are its
    argmax, and the KV-cache (recompute) path generates the same tokens."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(window=window, decay=0.9), layers=layers)
    ids, mask = batch("left", B=2, N=6)
    res = _generate(model, ids, mask, 7, LinearAttentionCache(model))
    logits = _teacher_forced(model, res.sequences, mask)
    torch.testing.assert_close(torch.stack(res.logits, 1), logits[:, 5:-1], atol=1e-4, rtol=1e-4)
    assert torch.equal(logits[:, 5:-1].argmax(-1), res.sequences[:, 6:])
    ref = _generate(model, ids, mask, 7, DynamicCache(config=model.config))
    assert torch.equal(res.sequences, ref.sequences)


def test_hybrid_generate_on_triton_equals_torch(monkeypatch):
    """The same swapped model and left-padded batch on the Triton composition (flash window +
    shifted linear kernel, the interpreter here) and on the torch path: the same greedy tokens
    and step logits, prefill and every one-token step through LinearAttentionCache."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(window=3, decay=0.9))
    ids, mask = batch("left", B=2, N=6)
    ref = _generate(model, ids, mask, 5, LinearAttentionCache(model))
    monkeypatch.setenv("ATTNKIT_BACKEND", "triton")
    from attnkit.kernels.linear import hybrid_triton

    calls = []
    run = hybrid_triton.hybrid_attention_triton
    monkeypatch.setattr(hybrid_triton, "hybrid_attention_triton",
                        lambda call: calls.append(call.q.shape[2]) or run(call))
    got = _generate(model, ids, mask, 5, LinearAttentionCache(model))
    layers = calls.count(6)  # every layer's prefill, then one-token steps
    assert layers >= 1 and calls[:layers] == [6] * layers and calls[layers:] == [1] * (4 * layers)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits, 1), torch.stack(ref.logits, 1),
                               atol=1e-4, rtol=1e-4)


def test_hybrid_left_padded_row_equals_unpadded():
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(window=4, feature_map="relu", eps=1e-3))
    ids, mask = batch("left", B=2, N=8)
    padded = _generate(model, ids, mask, 5, LinearAttentionCache(model))
    alone_ids = ids[1:, 3:]  # row 1 without its 3 pads
    alone = _generate(model, alone_ids, torch.ones_like(alone_ids), 5, LinearAttentionCache(model))
    assert torch.equal(padded.sequences[1, 8:], alone.sequences[0, 5:])
    torch.testing.assert_close(torch.stack(padded.logits, 1)[1], torch.stack(alone.logits, 1)[0],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 3])
def test_packed_equals_separate_through_varlen(window, monkeypatch):
    """Restarting position_ids (a flattened packed batch) run as one cu_seqlens call."""
    import attnkit.attn.hf.linear_hybrid as lh
    import attnkit.attn.linear as al

    seen = []
    run = al.run_linear_attention

    def spy(call, backend):
        seen.append(call.segments)
        return run(call, backend)

    monkeypatch.setattr(al, "run_linear_attention", spy)
    monkeypatch.setattr(lh, "run_linear_attention", spy)
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(window=window, decay=0.8))
    seqs = [torch.randint(3, 128, (1, n)) for n in (4, 7)]
    with torch.no_grad():
        ref = torch.cat([model(input_ids=s).logits for s in seqs], 1)
        seen.clear()
        pos = torch.cat([torch.arange(4), torch.arange(7)])[None]
        out = model(input_ids=torch.cat(seqs, 1), position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert seen and all(s == ((0, 4), (4, 11)) for s in seen)


def test_window_spec_validation_and_round_trip():
    spec = hf.LinearAttention(window=64, decay=0.9)
    assert hf.spec_from_json(hf.spec_to_json(spec), "here") == spec
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            hf.LinearAttention(window=bad)
    model = build("bert")
    hf.swap_attention(model, hf.LinearAttention(window=2))
    ids, mask = batch("right", B=2, N=6)
    with torch.no_grad(), pytest.raises(ValueError, match="needs a causal"):
        model(input_ids=ids, attention_mask=mask)
