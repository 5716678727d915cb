"""Linear attention swapped into Hugging Face models (``LinearAttention`` spec)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from attnkit.attn import hf  # noqa: E402
from attnkit.attn.hf.linear import hf_linear_attention  # noqa: E402
from attnkit.kernels.linear.feature_maps import FEATURE_MAPS  # noqa: E402
from attnkit.kernels.linear.naive import linear_attention_naive  # noqa: E402
from tests.attn.hf_models import batch, build  # noqa: E402


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("nq", [9, 2, 1], ids=lambda n: f"Nq{n}")
def test_linear_function_matches_oracle(causal, nq):
    B, Hq, Hkv, Nk, D = 2, 4, 2, 9, 16
    q = torch.randn(B, Hq, nq, D)
    k, v = torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    kpm = torch.ones(B, Nk, dtype=torch.bool)
    kpm[1, :3] = False  # left padding
    spec = hf.LinearAttention()
    for mask in (None, kpm):
        out = hf_linear_attention(q, k, v, mask, spec, causal)
        ref, _, _ = linear_attention_naive(q, k, v, FEATURE_MAPS["elu1"], causal=causal,
                                           valid_keys=mask)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_padding_does_not_change_real_tokens(name):
    model = build(name)
    hf.swap_attention(model, hf.LinearAttention())
    for padding in ("left", "right"):
        ids, mask = batch(padding, B=2, N=9)
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
            padded = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            alone = model(input_ids=ids[1:][mask[1:].bool()][None]).logits
        torch.testing.assert_close(padded[1][mask[1].bool()], alone[0], atol=1e-4, rtol=1e-4)


def test_packed_equals_separate():
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(feature_map="relu", eps=1e-3))
    seqs = [torch.randint(3, 128, (1, n)) for n in (4, 7)]
    with torch.no_grad():
        ref = torch.cat([model(input_ids=s).logits for s in seqs], 1)
        pos = torch.cat([torch.arange(4), torch.arange(7)])[None]
        out = model(input_ids=torch.cat(seqs, 1), position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_generate_agrees_with_the_parallel_form():
    """Greedy decoding through transformers' cache (recomputed state) picks, at every step, the
    argmax of one parallel forward pass over the final sequence."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention(), layers=[0])  # layer 1 keeps softmax attention
    ids, mask = batch("left", B=2, N=6)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=full_mask).logits
    assert torch.equal(logits[:, 5:-1].argmax(-1), out[:, 6:])


@pytest.mark.parametrize("nq", [9, 2, 1], ids=lambda n: f"Nq{n}")
def test_decay_function_matches_oracle(nq):
    """The spec's decay (one gamma per KV head) through the recomputation path: cached keys are
    folded into a decayed state; padded keys add nothing but still count as tokens."""
    B, Hq, Hkv, Nk, D = 2, 4, 2, 9, 16
    q = torch.randn(B, Hq, nq, D)
    k, v = torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    kpm = torch.ones(B, Nk, dtype=torch.bool)
    kpm[1, :3] = False
    for decay in (0.8, (0.9, 0.5)):
        spec = hf.LinearAttention(decay=decay)
        g = torch.tensor(decay if isinstance(decay, tuple) else (decay,) * Hkv)
        for mask in (None, kpm):
            out = hf_linear_attention(q, k, v, mask, spec, True)
            ref, _, _ = linear_attention_naive(q, k, v, FEATURE_MAPS["elu1"], valid_keys=mask,
                                               decay=g)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


def test_decay_spec_validation_and_round_trip():
    spec = hf.LinearAttention(decay=torch.tensor([0.5, 0.25]))
    assert spec.decay == (0.5, 0.25)  # kept as a tuple: hashable, JSON-able
    entry = hf.spec_to_json(spec)
    assert entry["decay"] == [0.5, 0.25]
    assert hf.spec_from_json(entry, "here") == spec
    assert hf.spec_from_json(hf.spec_to_json(hf.LinearAttention(decay=0.9)), "here").decay == 0.9
    old = {"type": "linear_attention", "feature_map": "elu1", "normalize": True, "eps": 1e-6,
           "scale": None}  # written before the field existed
    assert hf.spec_from_json(old, "here") == hf.LinearAttention()
    for bad in (0.0, 1.5, (0.5, -1.0), "x", ()):
        with pytest.raises(ValueError, match="decay"):
            hf.LinearAttention(decay=bad)


def test_decay_refused_on_bidirectional_layers():
    model = build("bert")
    hf.swap_attention(model, hf.LinearAttention(decay=0.9))
    ids, mask = batch("right", B=2, N=6)
    with torch.no_grad(), pytest.raises(ValueError, match="decay needs a causal"):
        model(input_ids=ids, attention_mask=mask)


def test_decay_with_wrong_head_count_is_refused():
    model = build("llama")  # 2 KV heads
    hf.swap_attention(model, hf.LinearAttention(decay=(0.9, 0.8, 0.7)))
    with torch.no_grad(), pytest.raises(ValueError, match="3 values but this layer has 2"):
        model(input_ids=torch.randint(3, 100, (1, 5)))
