"""Fixes found by running transformers' own model tests with attnkit standing in for "sdpa"
(scripts/hf_model_tests.py), each reproduced small."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.attn.hf as akhf  # noqa: E402
from attnkit.attn.hf import interface  # noqa: E402


def test_torch_compile_on_the_cpu_runs_attnkit_outside_the_graph():
    """transformers' compile tests (GPT-2's test_generate_compile_model_forward_fullgraph and
    friends) traced into the CPU torch backend and failed on a data-dependent guard; now the call
    graph-breaks with a one-time warning and gives the eager numbers, and fullgraph=True fails
    with the reason instead of a guard error deep in attnkit."""
    def one_call(q, k, v):
        return interface._softmax_attention(q, k, v, akhf.model_pattern(True, None, None), None,
                                            None, None)

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    want = one_call(q, k, v)
    torch._dynamo.reset()
    akhf._warned.discard("cpu-compile")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = torch.compile(one_call, backend="eager")(q, k, v)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert any("outside the graph" in str(w.message) for w in seen)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="torch.compile cannot trace"):
        torch.compile(one_call, backend="eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()


def _bart(attn_implementation):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                        attn_implementation=attn_implementation)
    return tf.BartForConditionalGeneration(cfg).eval()


def test_a_model_that_routes_without_the_backend_flag_is_swapped_and_matches_eager():
    """BART (like T5 and Whisper) leaves ``_supports_attention_backend`` False yet looks its
    attention up in ALL_ATTENTION_FUNCTIONS: swap_attention refused it by that flag; now it runs,
    encoder (padded), decoder self-attention and cross-attention, with eager's numbers."""
    import transformers as tf

    from attnkit.attn.hf.surgery import routes_through_interface

    model = _bart("eager")
    assert not type(model)._supports_attention_backend  # the premise: the flag is not set
    assert routes_through_interface(model)
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding in the encoder
    dec = torch.randint(3, 64, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    akhf.swap_attention(model)
    assert model.config._attn_implementation == "attnkit"
    calls = []
    real = interface.attention
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(interface, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert len(calls) == 2 + 2 * 2  # encoder layers, then self- and cross-attention per decoder layer
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    falcon = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=32,
                                                  num_hidden_layers=1, num_attention_heads=4))
    assert not routes_through_interface(falcon)
