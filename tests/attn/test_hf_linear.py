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
