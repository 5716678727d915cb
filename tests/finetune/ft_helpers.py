"""Tiny models, data and settings shared by the ``attnkit finetune`` tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

#: Settings that keep a run to a few seconds on a 2-core CPU.
TINY = dict(seq_len=32, batch_size=4, max_steps=6, eval_steps=3, save_steps=3, logging_steps=1,
            warmup_steps=1, lr=2e-2, dropout=0.0, rank=4, alpha=8.0, max_eval_sequences=4,
            embedded_layers=2, embedded_hidden=32, embedded_heads=2, embedded_vocab=300, progress=False)


def corpus_sample(n_chars: int = 20_000) -> str:
    from attnkit.finetune.dataset import embedded_corpus_path

    return embedded_corpus_path().read_text(encoding="utf-8")[:n_chars]


def make_model_folder(path: Path, max_positions: int = 64, kv_heads: int = 2) -> Path:
    """A tiny random Llama model plus a byte-level tokenizer, written with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attnkit.finetune.dataset import build_embedded_tokenizer

    tok = build_embedded_tokenizer([corpus_sample()], 300)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, initializer_range=0.1, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2",
            "--logging-steps", "1", "--warmup-steps", "1", "--rank", "4", "--dropout", "0",
            "--max-eval-sequences", "4", "--no-progress", *extra]
