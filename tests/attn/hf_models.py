"""Tiny random transformers models built from configs (no downloads) for the HF tests."""

from __future__ import annotations

import torch

VOCAB = 128
CAUSAL = ("llama", "mistral", "qwen2", "gpt2")
ALL = (*CAUSAL, "bert")
#: Mistral's and Qwen2's window: small enough that the test sequences (up to 14 tokens) exceed it.
WINDOW = 4


def config(name: str, **overrides):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=VOCAB, max_position_embeddings=128)
    if name == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
    elif name == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=WINDOW, **common)
    elif name == "qwen2":  # layer 0 full, layer 1 sliding (interleaved layer_types)
        cfg = tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
                             max_window_layers=1, **common)
    elif name == "gpt2":  # absolute position embeddings, no GQA
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1,
                            eos_token_id=2)
    elif name == "bert":  # bidirectional encoder
        cfg = tf.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    else:
        raise ValueError(name)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(name: str, seed: int = 0, **overrides):
    """The model in eval mode under ``"sdpa"``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = config(name, **overrides)
    cls = tf.BertForMaskedLM if name == "bert" else tf.AutoModelForCausalLM
    model = (cls(cfg) if name == "bert" else cls.from_config(cfg))
    model.set_attn_implementation("sdpa")
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return model.eval()


def batch(kind: str, B: int = 3, N: int = 12, seed: int = 1):
    """``(input_ids, attention_mask)``: ``kind`` is ``"right"`` or ``"left"`` padding (row 0 full,
    the others shorter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    for b, n_pad in zip(range(1, B), (3, 7, 1, 5), strict=False):
        if kind == "right":
            mask[b, N - n_pad:] = 0
        else:
            mask[b, :n_pad] = 0
    return ids, mask
