"""Loading the model to fine-tune: a local Hugging Face folder, or the embedded default.

The embedded default is a small Llama-style model built from a config (random weights, no
downloads) with a byte-level BPE tokenizer trained on the shipped corpus. It is written to
``OUT/base_model`` on the first run so that the saved adapter has a real base folder to point at
(``adapter_config.json``'s ``base_model_name_or_path``) and a resumed run starts from the same
weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import AttentionChoice, FinetuneConfig

__all__ = ["check_model_folder", "embedded_config", "load_model", "load_tokenizer", "max_positions"]

#: Config fields that name a model's position limit (the first found wins).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(config) -> int | None:
    """The longest sequence the model was built for, or ``None`` when the config does not say."""
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def embedded_config(cfg: FinetuneConfig, vocab_size: int):
    """The embedded model's ``LlamaConfig`` (no GQA, so Hedgehog maps can be per head).

    ``initializer_range`` is 0.1 rather than Llama's 0.02: with LoRA on the projections only, the
    random output layer caps how peaked the logits can get (``|logit| <= |RMSNorm(h)| |w_row|``,
    about 2.6 at 0.02), which would hold the loss near ``ln(vocab)`` however well the LoRA layers
    learn; at 0.1 the quick run's loss falls from about 7.6 to 5 in 60 steps.
    """
    from transformers import LlamaConfig

    hidden, heads = cfg.embedded_hidden, cfg.embedded_heads
    if hidden % heads:
        raise ValueError(f"embedded model: hidden size {hidden} is not divisible by {heads} heads")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3 + 63) // 64 * 64,
        num_hidden_layers=cfg.embedded_layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, initializer_range=0.1,
    )


def check_model_folder(cfg: FinetuneConfig, choice: AttentionChoice):
    """Read the model's config (cheap: no weights) and check ``--seq-len`` against its maximum.

    Returns the config, or ``None`` for the embedded model (checked against its fixed maximum).
    """
    if cfg.model is None:
        limit, config, where = 256, None, "the embedded model"
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(cfg.model)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--model {cfg.model!r}: cannot read its config.json ({e})") from None
        limit, where = max_positions(config), f"--model {cfg.model!r}"
    if limit is None or cfg.seq_len <= limit:
        return config
    absolute = config is not None and getattr(config, "n_positions", None) is not None
    if choice.long_context and not absolute:
        return config
    why = ("it has learned absolute position embeddings, so no attention pattern can go past them"
           if absolute else "only a sliding-window or linear pattern (--attention sliding:W or "
           "linear) may run past the trained length")
    raise ValueError(f"--seq-len {cfg.seq_len} exceeds the maximum of {where} ({limit} positions); "
                     f"{why}; use --seq-len {limit} or less")


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 calls the load dtype ``dtype``; older versions ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_tokenizer(cfg: FinetuneConfig, out: Path, texts=None, resumed: bool = False):
    """The run's tokenizer: ``--model``'s, the resumed run's ``OUT/base_model`` one, or a new embedded
    one trained on ``texts`` (deterministic, so every DDP process builds the same)."""
    from transformers import AutoTokenizer

    if cfg.model is not None:
        try:
            return AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {cfg.model!r}: cannot load its tokenizer ({e}); the folder "
                             "needs the tokenizer files save_pretrained writes") from None
    base = out / "base_model"
    if resumed:
        if not (base / "config.json").is_file():
            raise ValueError(f"--resume: {str(base)!r} is missing; the embedded model of the run to "
                             "resume is stored there")
        return AutoTokenizer.from_pretrained(base)
    from .dataset import build_embedded_tokenizer

    return build_embedded_tokenizer(texts, cfg.embedded_vocab)


def load_model(cfg: FinetuneConfig, out: Path, dtype: torch.dtype, is_main: bool, tokenizer,
               resumed: bool = False):
    """``(model, base_path)``: the model in ``dtype`` and the folder it came from.

    The embedded default: a resumed run loads ``OUT/base_model``; a fresh one builds the model from
    its config with ``cfg.seed`` (every DDP process builds the same weights, none reads a folder
    another process may be writing) and rank 0 writes ``OUT/base_model`` (the caller waits for it
    on a barrier).
    """
    from transformers import AutoModelForCausalLM

    if cfg.model is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **_dtype_kwarg(dtype))
        return model, os.path.abspath(cfg.model)

    base = out / "base_model"
    if resumed:  # exactly the weights the run started from
        model = AutoModelForCausalLM.from_pretrained(base, **_dtype_kwarg(dtype))
        return model, str(base.resolve())
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(embedded_config(cfg, len(tokenizer)))
    if is_main:
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
    return model.to(dtype), str(base.resolve())
