"""Fixes found by running transformers' own model tests with attnkit standing in for "sdpa"
(scripts/hf_model_tests.py), each reproduced small."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.attn.hf as akhf  # noqa: E402
from attnkit.attn.hf import interface  # noqa: E402


def _call(pattern, kpm=None, packed=None, softcap=None, sinks=None):
    def one_call(q, k, v):
        return interface._softmax_attention(q, k, v, pattern, None, kpm, packed,
                                            softcap=softcap, sinks=sinks)
    return one_call


def _compiled(fn, *args, fullgraph):
    torch._dynamo.reset()
    akhf._warned.discard("cpu-compile")
    akhf._warned.discard("cpu-compile-plain")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            out = torch.compile(fn, backend="eager", fullgraph=fullgraph)(*args)
        finally:
            torch._dynamo.reset()
    return out, " ".join(str(w.message) for w in seen)


@pytest.mark.parametrize("case", ["causal-padded", "window-gqa", "dense-softcap-sinks"])
def test_torch_compile_on_the_cpu_compiles_band_patterns_in_the_graph(case):
    """transformers' compile tests (GPT-2's test_generate_compile_model_forward_fullgraph asks for
    fullgraph=True) traced into the CPU torch backend and failed on a data-dependent guard; band
    patterns without packing now compile in the graph (plain tensor ops, said once: the warning
    runs while dynamo traces, so fullgraph=True still compiles) with attnkit's eager numbers, forward
    and every gradient, on left-padded keys (a row that sees no key gives zeros), GQA and
    Nq != Nk, soft-capping and sinks."""
    torch.manual_seed(0)
    hq, hkv, nq, nk = {"causal-padded": (4, 4, 8, 8), "window-gqa": (4, 2, 5, 11),
                       "dense-softcap-sinks": (4, 2, 7, 7)}[case]
    pattern = {"causal-padded": akhf.model_pattern(True, None, None),
               "window-gqa": akhf.model_pattern(True, 4, None),
               "dense-softcap-sinks": akhf.model_pattern(False, None, None)}[case]
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, :3] = False  # left padding: row 1's first queries see no key under Causal
    extra = dict(softcap=5.0, sinks=torch.randn(hq, requires_grad=True)) \
        if case == "dense-softcap-sinks" else {}
    q = torch.randn(2, hq, nq, 16, requires_grad=True)
    k, v = (torch.randn(2, hkv, nk, 16, requires_grad=True) for _ in range(2))
    fn = _call(pattern, kpm, **extra)
    want = fn(q, k, v)
    got, said = _compiled(fn, q, k, v, fullgraph=True)
    assert "outside the graph" not in said
    assert said.count("forming the N x N scores") == 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    leaves = [q, k, v] + ([extra["sinks"]] if extra else [])
    want_grads = torch.autograd.grad(want, leaves, g)
    got_grads = torch.autograd.grad(got, leaves, g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_compile_on_the_cpu_runs_packed_and_block_sparse_calls_outside_the_graph():
    """What plain tensor ops do not cover (packed sequences; block-sparse patterns) graph-breaks
    with a one-time warning and gives the eager numbers; fullgraph=True fails with the reason
    instead of a guard error deep in attnkit."""
    from attnkit import BlockSparse

    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    cu = torch.tensor([0, 13, 32], dtype=torch.int32)
    layout = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.bool)
    for fn in (_call(akhf.model_pattern(True, None, None), packed=(cu, cu, 19, 19)),
               _call(BlockSparse(layout, block_size=16))):
        want = fn(q, k, v)
        got, said = _compiled(fn, q, k, v, fullgraph=False)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert "outside the graph" in said
        with pytest.raises(Exception, match="torch.compile cannot trace"):
            _compiled(fn, q, k, v, fullgraph=True)


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

    t5 = tf.T5Model(tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                num_heads=4))
    assert routes_through_interface(t5)  # it routes, but its position bias is refused up front
    with pytest.raises(ValueError, match=r"T5Model adds a relative position bias .*T5Attention"):
        akhf.swap_attention(t5)
    assert t5.config._attn_implementation != "attnkit"

    falcon = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=64, hidden_size=32,
                                                  num_hidden_layers=1, num_attention_heads=4))
    assert not routes_through_interface(falcon)


def _gemma3(attn_implementation):
    import transformers as tf

    torch.manual_seed(0)
    text = tf.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16, sliding_window=4, max_position_embeddings=64,
                               layer_types=["full_attention", "sliding_attention"], pad_token_id=0)
    vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=20, patch_size=5)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=4, boi_token_index=5, eoi_token_index=6,
                          attn_implementation=attn_implementation)
    return tf.Gemma3ForConditionalGeneration(cfg).eval()


def test_output_attentions_with_a_dense_mask_overlay_matches_eager():
    """Gemma 3's image tokens see each other both ways: a mask overlay that reaches attnkit as a
    dense 4-D mask. With output_attentions=True that mask went to the key-mask path and crashed
    (``expand`` of a 6-D tensor; Gemma3Vision2TextModelTest's test_model_outputs_equivalence and
    test_capture_outputs_decorator); now it is applied alone, as sdpa applies it: the logits of
    real tokens and the weights of real query rows equal eager's (padded query rows see no key:
    zeros under attnkit, eager's uniform row)."""
    ids = torch.randint(7, 64, (2, 12))
    ids[:, 3:7] = 4  # one image: 4 tokens
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=(ids == 4).long(),
              pixel_values=torch.randn(2, 3, 20, 20), output_attentions=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _gemma3("eager")(**kw)
        got = _gemma3("attnkit")(**kw)
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=1e-5, rtol=1e-5)
    assert len(got.attentions) == len(want.attentions) == 2
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a[1, :, 2:], b[1, :, 2:], atol=1e-6, rtol=1e-5)
        assert a[1, :, :2].abs().sum() == 0


def test_output_attentions_takes_an_additive_dense_mask_like_a_bool_one():
    from attnkit.attn.hf.eager import eager_with_weights

    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8)
    k, v = (torch.randn(2, 2, 7, 8) for _ in range(2))
    ok = torch.rand(2, 1, 5, 7) > 0.3
    ok[1, 0, 2] = False  # a row that sees no key
    additive = torch.zeros(ok.shape).masked_fill(~ok, float("-inf"))
    # (module, q, k, v, mask, pattern, scaling, softcap, sinks, kwargs): the mask is the pattern
    out_b, w_b = eager_with_weights(None, q, k, v, ok, None, 0.5, None, None, {})
    out_f, w_f = eager_with_weights(None, q, k, v, additive, None, 0.5, None, None, {})
    torch.testing.assert_close(out_f, out_b)
    torch.testing.assert_close(w_f, w_b)
    assert w_b[1, :, 2].abs().sum() == 0 and w_b[~ok.expand_as(w_b)].abs().sum() == 0
    with pytest.raises(ValueError, match=r"dense attention mask of shape \[B, 1 or Hq, Nq=5, Nk=7\]"):
        eager_with_weights(None, q, k, v, ok[:, :, :4], None, None, None, None, {})


@pytest.mark.parametrize("padded", [False, True])
def test_a_model_compiles_with_fullgraph_on_the_cpu_and_matches_eager(padded):
    """A tiny GPT-2 under attnkit, its forward compiled with fullgraph=True on the CPU: the mask
    function read the mask's values to drop an all-True mask (``bool(mask.all())``, a
    data-dependent guard that fullgraph refuses) and the attention traced into the torch
    backend; now the logits equal eager attention's, padded or not."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    akhf.swap_attention(model)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(model, backend="eager", fullgraph=True)(
                input_ids=ids, attention_mask=mask).logits
    finally:
        torch._dynamo.reset()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
