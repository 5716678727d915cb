"""Training text: reading local files, tokenising, packing into fixed-length sequences, splitting.

Accepted ``--data``: a text file (any suffix but ``.jsonl``/``.json``; one document), a JSONL file
(one JSON object per line with a ``"text"`` field, or a JSON string per line), or a folder holding
such files (searched recursively, in sorted order so every process and every resume sees the same
stream). Documents are tokenised with the model's tokenizer, joined with its EOS token and cut into
``seq_len`` blocks (the ragged tail is dropped). Packing full blocks means no padding and no
attention mask: every token trains, and the attention kernels take their fastest path.

The embedded corpus (``attnkit/finetune/data/corpus.txt``) and the offline tokenizer for the
embedded model live here too.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "read_documents", "embedded_corpus_path", "build_embedded_tokenizer", "pack", "PackedDataset",
    "split_blocks", "TEXT_SUFFIXES",
]

#: Files picked from a ``--data`` folder.
TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json")


def embedded_corpus_path() -> Path:
    """The corpus shipped with the package (self-written text; see ``data/README.md``)."""
    return Path(str(resources.files("attnkit.finetune") / "data" / "corpus.txt"))


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data {str(path)!r} line {lineno}: not valid JSON ({e.msg}); a JSONL "
                                 "file holds one JSON object with a 'text' field per line") from None
            if isinstance(obj, str):
                docs.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                docs.append(obj["text"])
            else:
                raise ValueError(f"--data {str(path)!r} line {lineno}: expected a JSON string or an object "
                                 f"with a string 'text' field, got {line[:80]!r}")
    return docs


def read_documents(data: str | os.PathLike) -> list[str]:
    """The documents under ``data`` (a file or a folder), in a fixed order."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data {str(data)!r}: the folder holds no {', '.join(TEXT_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"--data {str(data)!r}: no such file or folder")
    docs: list[str] = []
    for f in files:
        if f.suffix.lower() in (".jsonl", ".json"):
            docs.extend(_jsonl_documents(f))
        else:
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"--data: {str(f)!r} is not UTF-8 text") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"--data {str(data)!r}: no non-empty text found")
    return docs


def build_embedded_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained here on ``texts`` (no downloads), as a
    ``PreTrainedTokenizerFast`` that ``save_pretrained``/``AutoTokenizer.from_pretrained`` round-trip.

    Byte-level: every string encodes (no unknown token); ``<|endoftext|>`` is BOS, EOS and PAD.
    Training is deterministic for a given corpus and vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                   pad_token=special, model_max_length=1 << 30)


def pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenise ``docs``, join them with EOS and cut into ``[num_blocks, seq_len]`` (int64)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    # the tokenizer's "sequence longer than the model's maximum" warning is moot: we cut below
    old_max = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = 1 << 30
    try:
        for doc in docs:
            piece = tokenizer(doc, add_special_tokens=True)["input_ids"]
            ids.extend(piece)
            if eos is not None and (not piece or piece[-1] != eos):
                ids.append(eos)
    finally:
        if old_max is not None:
            tokenizer.model_max_length = old_max
    n = len(ids) // seq_len
    if n < 2:
        raise ValueError(f"the data gives {len(ids)} tokens, fewer than two sequences of --seq-len "
                         f"{seq_len}; give more text or a shorter --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(blocks: torch.Tensor, eval_fraction: float, max_eval: int, seed: int = 1234):
    """``(train, eval)`` blocks: a fixed pseudo-random ``eval_fraction`` of the blocks (at least one,
    at most ``max_eval``) is held out. The split does not depend on ``--seed``, so runs with
    different seeds are evaluated on the same text."""
    n = blocks.shape[0]
    n_eval = min(max(1, round(n * eval_fraction)), max_eval, n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = perm[:n_eval].sort().values
    keep = perm[n_eval:].sort().values
    return blocks[keep], blocks[held]


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks as causal-LM examples: ``{"input_ids", "labels"}`` (the model
    shifts labels itself)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.blocks[i]
        return {"input_ids": row, "labels": row}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()
