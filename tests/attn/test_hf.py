"""attn_implementation="attnkit" against transformers' "sdpa" on tiny random models (CPU).

Each model is built once under "sdpa", run, switched with ``swap_attention``, run again and
restored, so both runs share the weights. Logits are compared on real (unpadded) tokens only:
what a model computes at padded positions is not specified.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from attnkit import Causal, Dense, SlidingWindow  # noqa: E402
from attnkit.attn import hf  # noqa: E402
from tests.attn.hf_models import ALL, CAUSAL, batch, build  # noqa: E402

ATOL = 1e-4


def _logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", ALL)
def test_padded_logits_match_sdpa(name, padding):
    model = build(name)
    ids, mask = batch(padding, N=14 if name in ("mistral", "qwen2") else 10)
    ref = _logits(model, ids, mask)
    hf.swap_attention(model)
    assert model.config._attn_implementation == "attnkit"
    out = _logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=1e-4)
    hf.restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("name", ALL)
def test_packed_batch_matches_separate_sequences(name, how):
    """A DataCollatorWithFlattening-style batch: sequences concatenated along N, B = 1."""
    model = build(name)
    lengths = [5, 9, 3]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 128, (1, n), generator=g) for n in lengths]
    refs = [_logits(model, s) for s in seqs]
    ids = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    kw = {"position_ids": position_ids, "use_cache": False} if name != "bert" else \
        {"position_ids": position_ids}
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    hf.swap_attention(model)
    out = _logits(model, ids, **kw)
    torch.testing.assert_close(out, torch.cat(refs, 1), atol=ATOL, rtol=1e-4)


def test_packed_rows_of_a_batch():
    """Packing detected per row when B > 1 (as transformers' sdpa masks do)."""
    model = build("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 8), generator=g)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1]])
    ref = _logits(model, ids, position_ids=pos, use_cache=False)  # sdpa's packed-mask path
    hf.swap_attention(model)
    torch.testing.assert_close(_logits(model, ids, position_ids=pos, use_cache=False), ref,
                               atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", CAUSAL)
def test_greedy_generate_same_tokens(name):
    model = build(name)
    ids, mask = batch("left", N=7)  # 7 prompt + 8 new tokens: past Mistral/Qwen2's window of 4
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    ref = model.generate(ids, **kw)
    hf.swap_attention(model)
    assert torch.equal(model.generate(ids, **kw), ref)


def test_swap_sliding_window_equals_configured_window():
    """A Llama-like Mistral without a window, swapped to SlidingWindow(w - 1), equals the same
    weights with ``config.sliding_window = w`` under sdpa (logits and generated tokens)."""
    w = 3
    model = build("mistral", sliding_window=None)
    ids, mask = batch("left", N=11)
    model.config.sliding_window = w
    ref = _logits(model, ids, mask)
    ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.config.sliding_window = None
    plain = _logits(model, ids, mask)
    assert not torch.allclose(plain[mask.bool()], ref[mask.bool()], atol=1e-3), "window must bite"
    hf.swap_attention(model, SlidingWindow(w - 1))
    out = _logits(model, ids, mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=1e-4)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, ref_gen)


def test_per_layer_override_and_restore():
    model = build("llama")
    ids, mask = batch("right", N=10)
    ref = _logits(model, ids, mask)
    hf.swap_attention(model, SlidingWindow(1))
    windowed = _logits(model, ids, mask)
    assert not torch.allclose(windowed, ref, atol=1e-3)
    hf.swap_attention(model, None, layers=[0, -1])  # every layer back to the model's own
    torch.testing.assert_close(_logits(model, ids, mask)[mask.bool()], ref[mask.bool()], atol=ATOL,
                               rtol=1e-4)
    hf.swap_attention(model, SlidingWindow(1), layers=0)
    spec = model.config.attnkit_attention
    assert spec["layers"]["0"] == {"type": "sliding_window", "left": 1, "right": 0}
    assert spec["layers"]["1"] is None
    hf.restore_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.config, "attnkit_attention")
    torch.testing.assert_close(_logits(model, ids, mask), ref)


def test_save_pretrained_round_trips_the_override(tmp_path):
    import transformers as tf

    model = build("llama")
    ids, mask = batch("left", N=10)
    hf.swap_attention(model, SlidingWindow(2))
    hf.swap_attention(model, Dense(), layers=[1])
    out = _logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkit").eval()
    assert loaded.config.attnkit_attention == model.config.attnkit_attention
    torch.testing.assert_close(_logits(loaded, ids, mask), out)
    hf.swap_attention(loaded, Causal(), layers=[0])  # edits on top of a loaded override
    assert loaded.config.attnkit_attention["default"] == {"type": "sliding_window", "left": 2, "right": 0}


def test_block_sparse_override_matches_sdpa_with_its_dense_mask(tmp_path):
    """A causal Longformer layout through ``swap_attention`` equals sdpa given the layout's own
    element mask as a 4-D mask (same weights), and the layout (a tensor plus element masks)
    survives save_pretrained / from_pretrained."""
    import transformers as tf

    from attnkit import longformer

    n = 40
    model = build("llama")
    ids = torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(5))
    pattern = longformer(n, 16, window=8, global_tokens=1, causal=True)
    allowed = pattern.dense_mask(n, n)[0]
    assert allowed.any(1).all() and not allowed.tril().equal(torch.ones(n, n).bool().tril())
    additive = torch.zeros(2, 1, n, n).masked_fill(~allowed, float("-inf"))
    ref = _logits(model, ids, additive)
    causal = _logits(model, ids)
    assert not torch.allclose(ref, causal, atol=1e-3), "the layout must bite"
    hf.swap_attention(model, pattern)
    out = _logits(model, ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkit").eval()
    torch.testing.assert_close(_logits(loaded, ids), out)


def test_peft_lora_backward_matches_sdpa():
    peft = pytest.importorskip("peft")
    model = build("llama")
    model.train()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    for n, p in lora.named_parameters():  # LoRA B starts at zero: give it values so grads flow
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask = batch("left", N=10)
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        lora.zero_grad()
        loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad}

    ref_loss, ref = grads()
    hf.swap_attention(lora)  # the PEFT wrapper is accepted
    loss, got = grads()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == ref.keys() and len(got) == 8
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_set_attn_implementation_and_from_config():
    import transformers as tf

    from tests.attn.hf_models import config

    model = tf.AutoModelForCausalLM.from_config(config("qwen2"), attn_implementation="attnkit")
    assert model.config._attn_implementation == "attnkit"
    ref = build("qwen2")
    model.load_state_dict(ref.state_dict())
    ids, mask = batch("right", N=14)
    torch.testing.assert_close(_logits(model.eval(), ids, mask)[mask.bool()],
                               _logits(ref, ids, mask)[mask.bool()], atol=ATOL, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Unsupported requests
# --------------------------------------------------------------------------------------------


def test_output_attentions_warns_once_and_returns_the_eager_weights():
    """attnkit never forms attention weights: output_attentions=True runs those calls the eager
    way (with one warning) and returns the same logits and weights as the model's own eager."""
    model = build("mistral")  # a sliding window, GQA
    ids, mask = batch("left", N=14)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    hf.swap_attention(model)
    with pytest.warns(UserWarning, match="output_attentions=True.*eager attention"), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=ATOL, rtol=1e-4)
    assert len(out.attentions) == len(ref.attentions) == 2
    for w, rw in zip(out.attentions, ref.attentions, strict=True):
        # weights of real query rows (padded query rows are unspecified)
        torch.testing.assert_close(w.transpose(1, 2)[real], rw.transpose(1, 2)[real], atol=1e-5,
                                   rtol=1e-4)


def test_head_dim_the_kernels_cannot_take_raises():
    model = build("llama", head_dim=512, hidden_size=64)
    hf.swap_attention(model)
    hf.set_backend("triton")
    try:
        with pytest.raises(ValueError, match="head dim 512"):
            _logits(model, *batch("right", N=4))
    finally:
        hf.set_backend("auto")


def test_bad_arguments():
    model = build("llama")
    with pytest.raises(TypeError, match="pattern must be"):
        hf.swap_attention(model, "causal")
    with pytest.raises(ValueError, match="no attention layer 5"):
        hf.swap_attention(model, Causal(), layers=[5])
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.swap_attention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        hf.set_backend("tpu")


def test_dense_4d_mask_with_override_raises_and_without_falls_back():
    model = build("llama")
    ids = torch.randint(3, 128, (1, 6))
    dense = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None]
    ref = _logits(model, ids, dense)
    hf.swap_attention(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf._warned.discard("dense-mask")
        torch.testing.assert_close(_logits(model, ids, dense), ref)
    assert any("dense 4-D attention mask" in str(w.message) for w in caught)
    hf.swap_attention(model, SlidingWindow(2))
    with pytest.raises(ValueError, match="cannot be combined"):
        _logits(model, ids, dense)


def test_block_sequence_ids_overlay_is_built_dense_not_ignored():
    """Gemma 3 / PaliGemma let image tokens attend each other both ways through
    ``create_causal_mask(..., block_sequence_ids=...)``, an ``or`` overlay that transformers does
    not flag with ``use_vmap``. attnkit's mask function must not drop it (a key mask would make
    those tokens causal): it returns sdpa's dense mask, with the one-time warning."""
    import inspect

    from transformers import masking_utils as mu

    params = inspect.signature(mu.create_causal_mask).parameters
    if "block_sequence_ids" not in params or "cache" not in params:
        pytest.skip("this transformers has no block_sequence_ids (or an older signature)")
    model = build("llama")
    embeds = torch.zeros(1, 7, 64)
    groups = torch.tensor([[-1, 0, 0, 0, -1, -1, -1]])  # tokens 1-3: one image
    masks = {}
    for impl in ("sdpa", "attnkit"):
        model.config._attn_implementation = impl
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf._warned.discard("overlay")
            masks[impl] = mu.create_causal_mask(config=model.config, inputs_embeds=embeds,
                                                attention_mask=None, cache=None,
                                                block_sequence_ids=groups)
    assert any("mask overlay" in str(w.message) for w in caught)
    dense = masks["attnkit"]
    assert dense is not None and dense.shape == (1, 1, 7, 7)
    assert bool(dense[0, 0, 1, 3]) and not bool(dense[0, 0, 4, 5])  # image both ways, text causal
    torch.testing.assert_close(dense, masks["sdpa"])
    model.config._attn_implementation = "attnkit"
    assert mu.create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                                 cache=None) is None  # no overlay: no mask at all


def test_unsaveable_pattern_warns_and_loading_it_raises():
    from attnkit.attn.hf.persist import spec_from_json

    model = build("llama")
    hf._warned.clear()
    with pytest.warns(UserWarning, match="cannot be written to the config"):
        hf.swap_attention(model, hf.LinearAttention(feature_map=torch.nn.functional.softplus))
    entry = model.config.attnkit_attention["default"]
    assert "unsaved" in entry
    with pytest.raises(ValueError, match="swap_attention"):
        spec_from_json(entry, "default")
    with pytest.raises(ValueError, match="attnkit package"):
        spec_from_json({"class": "os.system", "fields": {}}, "default")


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_generate_with_a_static_cache(name):
    """A static cache hands over every slot; the unfilled tail is cut by the mask's length."""
    model = build(name)
    ids, mask = batch("left", B=2, N=6)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    ref = model.generate(ids, **kw)
    hf.swap_attention(model)
    assert torch.equal(model.generate(ids, **kw), ref)


def test_chunked_attention_raises():
    model = build("llama")
    model.config.attention_chunk_size = 4  # as Llama 4's chunked layers
    hf.swap_attention(model)
    with pytest.raises(ValueError, match="chunked attention"):
        _logits(model, *batch("right", N=6))
