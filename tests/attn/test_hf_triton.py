"""The Hugging Face path on the Triton kernels (the interpreter on the CPU): logits and generate."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from attnkit.attn import hf  # noqa: E402
from tests.attn.hf_models import batch, build  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_backend():
    hf.set_backend("triton")
    yield
    hf.set_backend("auto")


def test_mistral_window_logits_on_triton():
    model = build("mistral")
    ids, mask = batch("left", N=12)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        hf.swap_attention(model)
        out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-4, rtol=1e-4)


def test_qwen2_generate_on_triton():
    """Interleaved full/sliding layers, a left-padded batch, decoding past the window."""
    model = build("qwen2")
    ids, mask = batch("left", B=2, N=6)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    ref = model.generate(ids, **kw)
    hf.swap_attention(model)
    assert torch.equal(model.generate(ids, **kw), ref)


def test_generate_through_the_decode_kernel(monkeypatch):
    """Decoding steps (no grad, a few query rows) go to the Triton split-KV decode backend, which
    is its own entry in the dispatch, and give the same tokens."""
    from attnkit.kernels.flash.backends import TritonDecode

    calls = []
    decode_run = TritonDecode.run

    def run(self, call):
        calls.append(call.q.shape)
        return decode_run(self, call)

    monkeypatch.setattr(TritonDecode, "run", run)
    model = build("mistral")
    ids, mask = batch("left", B=2, N=20)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    ref = model.generate(ids, **kw)
    hf.swap_attention(model)
    assert torch.equal(model.generate(ids, **kw), ref)
    assert sum(shape[2] == 1 for shape in calls) == 4 * 2  # 4 decoding steps x 2 layers


def test_block_sparse_override_on_triton():
    """A causal BigBird layout (random blocks differ per head) on the Triton flash kernel's
    block-list walk equals sdpa given the layout's dense mask."""
    from attnkit import bigbird

    n = 80
    model = build("llama")
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(3))
    pattern = bigbird(n, 16, num_window_blocks=1, num_global_blocks=1, num_random_blocks=1,
                      num_heads=4, causal=True)
    allowed = pattern.dense_mask(n, n)  # [heads, n, n]
    assert not torch.equal(allowed[0], allowed[1]), "heads must differ"
    additive = torch.zeros(1, 4, n, n).masked_fill(~allowed[None], float("-inf"))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=additive).logits
        hf.swap_attention(model, pattern)
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
