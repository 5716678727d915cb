"""Models whose attention needs score modifications, under attnkit, against their own eager
attention: Gemma 2 (logit soft-capping + sliding window) and gpt-oss (attention sinks + sliding
window), on tiny random models with a left-padded batch: logits of real tokens and greedy tokens.
The score modifications run on the Triton flash kernels (the interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")

from attnkit.attn import hf  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)


@pytest.fixture(autouse=True)
def _triton_backend():
    hf.set_backend("triton")
    yield
    hf.set_backend("auto")


def _gemma2():
    cfg = tf.Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=4,
                          attn_logit_softcapping=3.0, final_logit_softcapping=30.0, **COMMON)
    return tf.Gemma2ForCausalLM(cfg)


def _gpt_oss():
    cfg = tf.GptOssConfig(num_hidden_layers=2, head_dim=16, sliding_window=4, num_local_experts=2,
                          num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"],
                          **COMMON)
    model = tf.GptOssForCausalLM(cfg)
    with torch.no_grad():  # sinks large enough to matter
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("build", [_gemma2, _gpt_oss], ids=["gemma2-softcap", "gpt-oss-sinks"])
def test_family_matches_eager_logits_and_greedy_tokens(build):
    torch.manual_seed(0)
    model = build().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    gen_kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    ref_tokens = model.generate(ids, **gen_kw)
    hf.swap_attention(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-4, rtol=1e-4)
    assert torch.equal(model.generate(ids, **gen_kw), ref_tokens)


def test_a_model_that_bypasses_the_attention_interface_is_refused_clearly():
    cfg = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"FalconForCausalLM does not route its attention through "
                                         r"transformers' AttentionInterface"):
        hf.swap_attention(model)


def _deepseek_v3():
    cfg = tf.DeepseekV3Config(num_hidden_layers=1, q_lora_rank=None, kv_lora_rank=16,
                              qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                              n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
                              moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                              topk_group=1, **{**COMMON, "num_key_value_heads": 4})
    return tf.DeepseekV3ForCausalLM(cfg)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_values_of_their_own_head_dim_reach_the_kernels_unpadded(backend, monkeypatch):
    """DeepSeek-V3: q/k head dim 24, v head dim 16, passed as they are (no zero padding)."""
    import attnkit.attn.hf.interface as interface

    seen = []
    real = interface.attention

    def spy(q, k, v, *args, **kw):
        seen.append((q.shape[-1], v.shape[-1]))
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(interface, "attention", spy)
    hf.set_backend(backend)
    torch.manual_seed(0)
    model = _deepseek_v3().eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    hf.swap_attention(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    real_rows = mask.bool()
    torch.testing.assert_close(out[real_rows], ref[real_rows], atol=2e-4, rtol=1e-4)
    assert seen and all(shape == (24, 16) for shape in seen), seen
