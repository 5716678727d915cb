"""Every model family whose config has a sliding or local window, under attnkit, against the
family's own eager attention on a tiny random model (a sequence longer than the window, a padded
row). A window read one token too wide or too narrow shows up here as a wrong hidden state."""

from __future__ import annotations

import pytest
import torch

tf = pytest.importorskip("transformers")

import attnkit.hf  # noqa: E402,F401  (registers "attnkit")

WINDOW = 3
N = 17
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=0)


def _configs():
    """(name, config, model class, padding side). Sliding and full layers interleaved."""
    out = [
        ("mistral", tf.MistralConfig(num_hidden_layers=2, num_key_value_heads=2, sliding_window=WINDOW,
                                     **COMMON), tf.MistralModel, "left"),
        ("qwen2", tf.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, use_sliding_window=True,
                                 sliding_window=WINDOW, max_window_layers=1, **COMMON),
         tf.Qwen2Model, "left"),
        ("gemma2", tf.Gemma2Config(num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                   sliding_window=WINDOW, attn_logit_softcapping=None,
                                   final_logit_softcapping=None, **COMMON), tf.Gemma2Model, "left"),
        ("gemma3", tf.Gemma3TextConfig(num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                       sliding_window=WINDOW, layer_types=["sliding_attention",
                                                                           "full_attention"],
                                       **COMMON), tf.Gemma3TextModel, "left"),
        ("cohere2", tf.Cohere2Config(num_hidden_layers=2, num_key_value_heads=2, sliding_window=WINDOW,
                                     layer_types=["sliding_attention", "full_attention"], **COMMON),
         tf.Cohere2Model, "left"),
        ("modernbert", tf.ModernBertConfig(num_hidden_layers=3, local_attention=2 * WINDOW,
                                           global_attn_every_n_layers=3, bos_token_id=1,
                                           eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                           hidden_dropout=0.0, attention_dropout=0.0,
                                           embedding_dropout=0.0, mlp_dropout=0.0, **COMMON),
         tf.ModernBertModel, "right"),
    ]
    return out


CONFIGS = {name: (cfg, cls, side) for name, cfg, cls, side in _configs()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_windowed_family_matches_its_eager_attention(name):
    cfg, cls, side = CONFIGS[name]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, N), generator=g)
    mask = torch.ones(2, N, dtype=torch.long)
    if side == "left":
        mask[1, :5] = 0
    else:
        mask[1, -5:] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("attnkit")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-4)


def test_bidirectional_window_reads_the_config_window_first():
    from attnkit import SlidingWindow
    from attnkit.attn.hf.specs import model_pattern

    # ModernBERT: passes config.sliding_window + 1 (flash-attention's convention)
    assert model_pattern(False, 4, config_window=3) == SlidingWindow(3, 3)
    # T5Gemma: passes config.sliding_window itself; its eager mask is |q - k| <= config window
    assert model_pattern(False, 3, config_window=3) == SlidingWindow(3, 3)
    assert model_pattern(False, 4) == SlidingWindow(3, 3)  # no config: flash-attention's reading
    assert model_pattern(True, 4, config_window=4) == SlidingWindow(3, 0)
