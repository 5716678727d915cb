"""Training text: reading local files, tokenising, packing into fixed-length sequences, splitting.

Accepted ``--data``: a text file (any suffix but ``.jsonl``/``.json``; one document), a JSONL file
(one JSON object per line with a ``"text"`` field, or a JSON string per line), or a folder holding
such files (searched recursively, in sorted order so every process and every resume sees the same
stream). Documents are tokenised with the model's tokenizer, joined with its EOS token and cut into
``seq_len`` blocks (the ragged tail is dropped). Packing full blocks means no padding and no
attention mask: every token trains, and the attention kernels take their fastest path.

The held-out set is made of whole documents (:func:`split_documents`) when there are at least
:data:`MIN_DOCUMENTS_FOR_SPLIT` of them, so no evaluated text shares a document with training text;
with fewer (one long text file, say) it falls back to held-out packed blocks.

The embedded corpus (``attnkit/finetune/data/corpus.txt``) and the offline tokenizer for the
embedded model live here too.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "read_documents", "embedded_corpus_path", "build_embedded_tokenizer", "pack", "PackedDataset",
    "split_blocks", "split_documents", "tokenize_documents", "pack_tokens", "data_files",
    "data_fingerprint", "TEXT_SUFFIXES", "MIN_DOCUMENTS_FOR_SPLIT",
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


def data_files(data: str | os.PathLike) -> list[Path]:
    """The files ``--data`` names (itself, or the text files under the folder), in a fixed order."""
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data {str(data)!r}: the folder holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if path.is_file():
        return [path]
    raise ValueError(f"--data {str(data)!r}: no such file or folder")


def data_fingerprint(data: str | os.PathLike) -> str:
    """SHA-256 over the data files' names (relative to ``data``) and bytes: a resumed run checks it."""
    root = Path(data)
    h = hashlib.sha256()
    for f in data_files(data):
        name = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(name.encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def read_documents(data: str | os.PathLike) -> list[str]:
    """The documents under ``data`` (a file or a folder), in a fixed order."""
    files = data_files(data)
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


def tokenize_documents(docs: list[str], tokenizer) -> list[list[int]]:
    """Each document's token ids, ending with the tokenizer's EOS token."""
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    # the tokenizer's "sequence longer than the model's maximum" warning is moot: we cut later
    old_max = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = 1 << 30
    try:
        for doc in docs:
            piece = list(tokenizer(doc, add_special_tokens=True)["input_ids"])
            if eos is not None and (not piece or piece[-1] != eos):
                piece.append(eos)
            out.append(piece)
    finally:
        if old_max is not None:
            tokenizer.model_max_length = old_max
    return out


def pack_tokens(token_docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Join tokenised documents and cut into ``[num_blocks, seq_len]`` (int64; ragged tail dropped)."""
    ids = [t for doc in token_docs for t in doc]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _too_small(n_tokens: int, seq_len: int) -> ValueError:
    return ValueError(f"the data gives {n_tokens} tokens, fewer than two sequences of --seq-len {seq_len} "
                      "(one to train on, one to evaluate); give more text or a shorter --seq-len")


def pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenise ``docs``, join them with EOS and cut into ``[num_blocks, seq_len]`` (int64)."""
    token_docs = tokenize_documents(docs, tokenizer)
    blocks = pack_tokens(token_docs, seq_len)
    if blocks.shape[0] < 2:
        raise _too_small(sum(map(len, token_docs)), seq_len)
    return blocks


def _n_eval(n: int, eval_fraction: float, max_eval: int) -> int:
    """Held-out blocks out of ``n``: ``eval_fraction`` of them, capped by ``max_eval``, in [1, n-1]."""
    return max(1, min(round(n * eval_fraction), max_eval, n - 1))


def split_blocks(blocks: torch.Tensor, eval_fraction: float, max_eval: int, seed: int = 1234):
    """``(train, eval)`` blocks: a fixed pseudo-random ``eval_fraction`` of the blocks (at least one,
    at most ``max_eval``, always leaving one to train on) is held out. The split does not depend on
    ``--seed``, so runs with different seeds are evaluated on the same text."""
    n = blocks.shape[0]
    if n < 2:
        raise _too_small(blocks.numel(), blocks.shape[1] if blocks.dim() == 2 else 0)
    n_eval = _n_eval(n, eval_fraction, max_eval)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = perm[:n_eval].sort().values
    keep = perm[n_eval:].sort().values
    return blocks[keep], blocks[held]


#: Fewest documents for a by-document held-out split; with fewer, packed blocks are held out.
MIN_DOCUMENTS_FOR_SPLIT = 4


def split_documents(token_docs: list[list[int]], seq_len: int, eval_fraction: float, max_eval: int,
                    seed: int = 1234):
    """``(train_blocks, eval_blocks, how)``: the held-out set by whole documents where possible.

    Documents are taken in a fixed pseudo-random order (independent of ``--seed``) and held out
    until they give ``eval_fraction`` of the tokens (at least one ``seq_len`` block, at most
    ``max_eval`` blocks); a document that would overshoot that by more than its size is skipped, so
    one huge document cannot swallow the training text. Each side is packed on its own, so no block
    mixes held-out and training text. ``how`` is ``"documents"``, or ``"blocks"`` when there are
    fewer than :data:`MIN_DOCUMENTS_FOR_SPLIT` documents or no such subset exists: then
    :func:`split_blocks` holds out packed blocks (which may share a document with training blocks).
    """
    total = sum(map(len, token_docs))
    n_blocks = total // seq_len
    if n_blocks < 2:
        raise _too_small(total, seq_len)
    target = _n_eval(n_blocks, eval_fraction, max_eval)  # blocks to hold out
    if len(token_docs) >= MIN_DOCUMENTS_FOR_SPLIT:
        order = torch.randperm(len(token_docs), generator=torch.Generator().manual_seed(seed)).tolist()
        limit = 2 * target * seq_len  # overshoot at most the target again
        held, held_tokens = [], 0
        for i in order:
            if held_tokens >= target * seq_len:
                break
            if held_tokens + len(token_docs[i]) > limit:
                continue
            held.append(i)
            held_tokens += len(token_docs[i])
        held_set = set(held)
        if held_tokens >= seq_len and len(held) < len(token_docs):
            eval_blocks = pack_tokens([token_docs[i] for i in sorted(held_set)], seq_len)[:max_eval]
            train_blocks = pack_tokens([d for i, d in enumerate(token_docs) if i not in held_set], seq_len)
            if train_blocks.shape[0] >= 1 and eval_blocks.shape[0] >= 1:
                return train_blocks, eval_blocks, "documents"
    train_blocks, eval_blocks = split_blocks(pack_tokens(token_docs, seq_len), eval_fraction, max_eval, seed)
    return train_blocks, eval_blocks, "blocks"


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
