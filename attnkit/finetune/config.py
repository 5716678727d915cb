"""The fine-tuning run's settings (:class:`FinetuneConfig`) and the ``--attention`` grammar.

Everything here is checked before a model is loaded or a file is written, so a bad argument
fails in a second with a message that names the argument, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

__all__ = ["FinetuneConfig", "AttentionChoice", "parse_attention", "LLAMA_TARGETS", "ATTENTION_HELP"]

#: LoRA targets for Llama-style models (Llama, Mistral, Qwen2, Gemma, ...): every projection.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Feature maps ``linear:NAME`` accepts; ``hedgehog`` is learnable (see :mod:`.linearize`).
LINEAR_FEATURE_MAPS = ("hedgehog", "elu1", "relu", "identity")

ATTENTION_HELP = (
    "'model' (the model's own attention, untouched), 'dense' (the model's own causal pattern on "
    "attnkit's kernels), 'sliding:W' (each token sees itself and the W-1 tokens before it), "
    "'bigbird[:BLOCK]' (causal BigBird block-sparse, block size BLOCK, default 64), "
    "'longformer:W[:BLOCK]' (causal Longformer band of W//2 tokens plus the first token as global), "
    "'linear[:FEATURE_MAP][,window=W]' (linear attention; FEATURE_MAP one of "
    + ", ".join(LINEAR_FEATURE_MAPS) + "; default hedgehog; ',window=W' makes it the "
    "sliding-window + linear hybrid: softmax over each token's last W keys, linear beyond)"
)


#: ``attnkit finetune --quick``'s attention: a window on attnkit's kernels (half the quick preset's
#: 128-token sequences), so the demo runs attnkit's attention, forward and backward, not only the
#: model's own; ``--attention`` overrides it. (:meth:`FinetuneConfig.quick` itself keeps the
#: model's attention.)
QUICK_ATTENTION = "sliding:64"


@dataclass(frozen=True)
class AttentionChoice:
    """A parsed ``--attention`` value.

    ``kind`` is ``model``, ``dense``, ``sliding``, ``bigbird``, ``longformer`` or ``linear``;
    ``window`` (sliding/longformer; linear: the hybrid's softmax window, ``None`` = pure linear),
    ``block`` (bigbird/longformer) and ``feature_map`` (linear) carry the arguments.
    """

    kind: str
    window: int | None = None
    block: int | None = None
    feature_map: str | None = None

    @property
    def long_context(self) -> bool:
        """Whether the pattern's cost and reach do not grow with N (so ``--seq-len`` may exceed the
        model's trained maximum, with the usual caveats of position extrapolation)."""
        return self.kind in ("sliding", "linear")

    def __str__(self) -> str:
        if self.kind == "sliding":
            return f"sliding:{self.window}"
        if self.kind == "bigbird":
            return f"bigbird:{self.block}"
        if self.kind == "longformer":
            return f"longformer:{self.window}:{self.block}"
        if self.kind == "linear":
            hybrid = "" if self.window is None else f",window={self.window}"
            return f"linear:{self.feature_map}{hybrid}"
        return self.kind


def _int_part(text: str, what: str, value: str, minimum: int) -> int:
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"--attention {value!r}: {what} must be an integer >= {minimum}, got {text!r}; "
                         f"accepted: {ATTENTION_HELP}")
    return n


def parse_attention(value: str) -> AttentionChoice:
    """Parse ``--attention``; raises ``ValueError`` naming the value and the accepted forms."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"--attention must be a non-empty string, got {value!r}; accepted: {ATTENTION_HELP}")
    name, *args = value.strip().lower().split(":")
    if name in ("model", "dense") and not args:
        return AttentionChoice(name)
    if name == "sliding" and len(args) == 1:
        return AttentionChoice("sliding", window=_int_part(args[0], "the window W", value, 1))
    if name == "bigbird" and len(args) <= 1:
        block = _int_part(args[0], "the block size", value, 16) if args else 64
        return AttentionChoice("bigbird", block=block)
    if name == "longformer" and len(args) in (1, 2):
        window = _int_part(args[0], "the window W", value, 1)
        block = _int_part(args[1], "the block size", value, 16) if len(args) == 2 else 64
        return AttentionChoice("longformer", window=window, block=block)
    if name == "linear" and len(args) <= 1:
        return _parse_linear(args[0] if args else "", value)
    raise ValueError(f"--attention: unknown or malformed pattern {value!r}; accepted: {ATTENTION_HELP}")


def _parse_linear(text: str, value: str) -> AttentionChoice:
    """``[FEATURE_MAP][,window=W]`` of ``--attention linear:...``."""
    fm, window = "hedgehog", None
    for i, part in enumerate(p.strip() for p in text.split(",")):
        if part.startswith("window="):
            if window is not None:
                raise ValueError(f"--attention {value!r}: window given twice")
            window = _int_part(part[len("window="):], "the hybrid's window W", value, 1)
        elif i == 0 and part:
            fm = part
        elif part or i:
            raise ValueError(f"--attention {value!r}: unexpected {part!r}; accepted: "
                             "linear[:FEATURE_MAP][,window=W], e.g. linear:hedgehog,window=64")
    if fm not in LINEAR_FEATURE_MAPS:
        raise ValueError(f"--attention {value!r}: unknown feature map {fm!r}; accepted: "
                         f"{', '.join(LINEAR_FEATURE_MAPS)}")
    return AttentionChoice("linear", window=window, feature_map=fm)


@dataclass
class FinetuneConfig:
    """Every setting of a run (the CLI flags, one to one). ``model``/``data`` ``None`` = the
    embedded default (a small random Llama-style model and the corpus shipped in the package)."""

    out: str = "attnkit-finetune"
    model: str | None = None
    data: str | None = None
    # data
    seq_len: int = 128
    eval_fraction: float = 0.05
    max_eval_sequences: int = 64
    # LoRA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_TARGETS
    fused: bool = True
    # attention
    attention: str = "model"
    transfer_steps: int = 0
    transfer_lr: float = 1e-2
    feature_dim: int | None = None
    # optimisation
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | str = 2e-3  # or "auto": the --find-lr suggestion
    weight_decay: float = 0.01
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    precision: str = "auto"
    seed: int = 0
    # memory: FSDP2 sharding (under torchrun) and activation (gradient) checkpointing
    fsdp: bool = False
    gradient_checkpointing: bool = False
    # learning-rate range test (--find-lr alone, or before the run with --lr auto)
    find_lr: bool = False
    find_lr_steps: int = 200
    find_lr_min: float = 1e-6
    find_lr_max: float = 1.0
    # diagnostics
    calibration: bool = True
    # bookkeeping
    eval_steps: int = 50
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    resume: str | None = None
    overwrite: bool = False
    stop_after: int | None = None
    progress: bool = True
    # embedded model size (used only without --model)
    embedded_layers: int = 4
    embedded_hidden: int = 128
    embedded_heads: int = 4
    embedded_vocab: int = 1024
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides) -> FinetuneConfig:
        """The ``--quick`` preset: the embedded default, sized to finish in well under a minute on
        a 2-core CPU while showing the loss fall."""
        # no LoRA dropout: the embedded model is random, there is nothing to over-fit to yet, and
        # the seeded dropout mask costs about a third of each CPU step
        base = dict(max_steps=150, batch_size=8, seq_len=128, eval_steps=50, save_steps=50,
                    logging_steps=5, warmup_steps=10, lr=5e-3, dropout=0.0)
        base.update(overrides)
        return cls(**base)

    @property
    def attention_choice(self) -> AttentionChoice:
        return parse_attention(self.attention)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    #: Fields a resumed run may change: how the run is driven, not what it trains.
    RESUMABLE_FIELDS = ("resume", "stop_after", "overwrite", "progress", "out", "find_lr", "calibration")

    def run_record(self) -> dict:
        """:meth:`to_json` less :attr:`RESUMABLE_FIELDS`: what ``OUT/run_config.json`` holds and
        ``--resume`` must match."""
        return {k: v for k, v in self.to_json().items() if k not in self.RESUMABLE_FIELDS}

    def validate(self) -> AttentionChoice:
        """Check every field that can be checked without loading the model; returns the parsed
        attention choice. Raises ``ValueError`` naming the flag."""
        choice = parse_attention(self.attention)
        positive = dict(seq_len=self.seq_len, rank=self.rank, max_steps=self.max_steps,
                        batch_size=self.batch_size, grad_accum=self.grad_accum,
                        eval_steps=self.eval_steps, save_steps=self.save_steps,
                        logging_steps=self.logging_steps, save_total_limit=self.save_total_limit,
                        max_eval_sequences=self.max_eval_sequences)
        for name, v in positive.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name, v in dict(transfer_steps=self.transfer_steps, warmup_steps=self.warmup_steps).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (a next-token target), got {self.seq_len}")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ValueError(f"--eval-fraction must be in (0, 0.5), got {self.eval_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr == "auto" or (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool))):
            raise ValueError(f"--lr must be a positive number or 'auto' (run the --find-lr range test "
                             f"first and use its suggestion), got {self.lr!r}")
        if self.find_lr and self.lr == "auto":
            raise ValueError("--find-lr with --lr auto: --find-lr alone only runs the range test; "
                             "--lr auto runs it and then trains; pass one of them")
        if self.find_lr and self.resume is not None:
            raise ValueError(f"--find-lr with --resume {self.resume!r}: the range test runs from a fresh "
                             "start only (a resumed --lr auto run reuses the suggestion recorded in "
                             "OUT/lr_find.json); drop --resume, or drop --find-lr")
        if isinstance(self.find_lr_steps, bool) or not isinstance(self.find_lr_steps, int) \
                or self.find_lr_steps < 2:
            raise ValueError(f"--find-lr-steps must be an integer >= 2, got {self.find_lr_steps!r}")
        if not 0 < self.find_lr_min < self.find_lr_max:
            raise ValueError(f"--find-lr-min/--find-lr-max must satisfy 0 < min < max, got "
                             f"{self.find_lr_min!r} and {self.find_lr_max!r}")
        for name in ("alpha", "lr", "transfer_lr", "max_grad_norm"):
            if name == "lr" and self.lr == "auto":
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be one of auto, fp32, bf16, fp16, got {self.precision!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"--target-modules must name at least one module, got {self.target_modules!r}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ValueError(f"--feature-dim must be a positive integer, got {self.feature_dim}")
        if self.transfer_steps:
            if choice.kind != "linear":
                raise ValueError(f"--transfer-steps {self.transfer_steps} needs --attention linear"
                                 "[:hedgehog] "
                                 f"(attention transfer trains linear-attention feature maps), got "
                                 f"--attention {self.attention!r}")
            if choice.feature_map != "hedgehog":
                raise ValueError(f"--transfer-steps {self.transfer_steps}: the feature map "
                                 f"{choice.feature_map!r} has no parameters to train; use "
                                 "--attention linear:hedgehog or --transfer-steps 0")
        if self.stop_after is not None and not 1 <= self.stop_after < self.max_steps:
            raise ValueError(f"--stop-after must be in [1, --max-steps = {self.max_steps}), "
                             f"got {self.stop_after}")
        if self.model is not None and not os.path.isdir(self.model):
            raise ValueError(f"--model {self.model!r}: no such folder; give a local Hugging Face "
                             "causal-LM folder (config.json, weights, tokenizer files)")
        if self.model is not None and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"--model {self.model!r}: the folder has no config.json; give a folder "
                             "written by save_pretrained (config.json, weights, tokenizer files)")
        if self.data is not None and not os.path.exists(self.data):
            raise ValueError(f"--data {self.data!r}: no such file or folder; give a .txt/.md file, "
                             "a .jsonl file or a folder of them")
        return choice
