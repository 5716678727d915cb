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


#: A tiny embedded model that can learn fast enough to show failure modes in a few dozen steps:
#: LoRA on ``lm_head`` too (the frozen random output layer otherwise caps how far the loss can
#: fall, see :func:`attnkit.finetune.model.embedded_config`), rank 16, width 64.
CAPABLE = {**TINY, "embedded_hidden": 64, "embedded_heads": 4, "rank": 16, "alpha": 32.0,
           "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                              "lm_head")}


def eval_split(out: Path, seq_len: int, max_eval_sequences: int, eval_fraction: float = 0.05):
    """The held-out split of the embedded corpus, tokenised with the run's tokenizer in ``out``."""
    from transformers import AutoTokenizer

    from attnkit.finetune.dataset import (
        PackedDataset,
        embedded_corpus_path,
        read_documents,
        split_documents,
        tokenize_documents,
    )

    tok = AutoTokenizer.from_pretrained(out / "base_model")
    docs = read_documents(embedded_corpus_path())
    _, held, _ = split_documents(tokenize_documents(docs, tok), seq_len, eval_fraction, max_eval_sequences)
    return PackedDataset(held)
