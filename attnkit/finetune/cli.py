"""``attnkit finetune``: the command line of :func:`attnkit.finetune.train.train`.

Wired into ``attnkit`` through :func:`add_finetune_parser` / :func:`run_finetune`; also runnable
alone as ``python -m attnkit.finetune.cli ...`` (and under ``torchrun``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .config import ATTENTION_HELP, LLAMA_TARGETS, QUICK_ATTENTION, FinetuneConfig

__all__ = ["add_finetune_parser", "add_arguments", "config_from_args", "run_finetune", "main"]

DESCRIPTION = (
    "LoRA fine-tuning of a local Hugging Face causal LM on attnkit's fused kernels, optionally with "
    "its attention swapped (sliding window, block-sparse, linear; linear with attention transfer). "
    "Without --model/--data it trains a small built-in Llama-style model on a built-in corpus. "
    "Writes the PEFT adapter, attention.json, summary.json (with calibration and failure-mode "
    "diagnoses), loss_curve.png and reliability.png to --out. --find-lr runs a learning-rate range "
    "test instead; --lr auto runs it first and trains with its suggestion."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags, on any parser."""
    d = FinetuneConfig()
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="local Hugging Face causal-LM folder (default: a small random Llama-style "
                   "model built here, no downloads)")
    g.add_argument("--data", help="a .txt/.md file, a .jsonl file ({'text': ...} per line) or a folder of "
                   "them (default: the corpus shipped with attnkit)")
    g.add_argument("--out", default=d.out, help=f"output folder (default: {d.out})")
    g.add_argument("--quick", action="store_true",
                   help="the quick preset: 150 steps of the built-in model with its attention swapped "
                        f"to --attention {QUICK_ATTENTION} on attnkit's kernels, about 15 s on a 2-core CPU")
    g.add_argument("--seq-len", type=int, help=f"tokens per packed sequence (default {d.seq_len})")
    g.add_argument("--eval-fraction", type=float,
                   help=f"share of the tokens held out for evaluation, as whole documents where there "
                   f"are at least 4 (default {d.eval_fraction})")
    g.add_argument("--max-eval-sequences", type=int,
                   help=f"cap on held-out sequences, >= 1 (default {d.max_eval_sequences})")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, help=f"LoRA rank r (default {d.rank})")
    g.add_argument("--alpha", type=float, help=f"LoRA alpha; scaling = alpha / r (default {d.alpha:g})")
    g.add_argument("--dropout", type=float, help=f"LoRA dropout (default {d.dropout})")
    g.add_argument("--target-modules", help="comma-separated Linear layer names (default "
                   f"{','.join(LLAMA_TARGETS)})")
    g.add_argument("--no-fused", action="store_true", help="use PEFT's own LoRA forward (for comparison)")

    g = p.add_argument_group("attention")
    g.add_argument("--attention", help=f"{ATTENTION_HELP} (default: model)")
    g.add_argument("--transfer-steps", type=int, help="linear:hedgehog only: steps of attention transfer "
                   "(train the feature maps to match softmax attention) before LoRA (default 0)")
    g.add_argument("--transfer-lr", type=float,
                   help=f"learning rate of attention transfer (default {d.transfer_lr})")
    g.add_argument("--feature-dim", type=int, help="Hedgehog projection width (default: the head dim)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, help=f"optimizer steps (default {d.max_steps})")
    g.add_argument("--batch-size", type=int,
                   help=f"sequences per device per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int,
                   help=f"micro-batches per optimizer step (default {d.grad_accum})")
    g.add_argument("--lr", help=f"peak learning rate, a number or 'auto' (run the --find-lr range test "
                   f"first and train with its suggestion) (default {d.lr})")
    g.add_argument("--weight-decay", type=float,
                   help=f"AdamW decoupled weight decay (default {d.weight_decay})")
    g.add_argument("--warmup-steps", type=int,
                   help=f"linear warm-up steps before cosine decay (default {d.warmup_steps})")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping norm (default {d.max_grad_norm})")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 on GPUs that support it, else fp32")
    g.add_argument("--seed", type=int, help=f"seed (default {d.seed})")
    g.add_argument("--fsdp", action="store_true", help="shard the model, gradients and optimizer state "
                   "across the torchrun processes with FSDP2 (fully_shard; one unit per decoder layer); "
                   "NCCL on GPUs, gloo on CPU. The adapter saved is the same PEFT adapter")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder "
                   "layer's activations in backward instead of storing them (less memory, about one "
                   "more forward of compute)")

    g = p.add_argument_group("learning-rate range test and diagnostics")
    g.add_argument("--find-lr", action="store_true", help="only run the learning-rate range test: write "
                   "lr_find.png and lr_find.json to --out and exit without training")
    g.add_argument("--find-lr-steps", type=int,
                   help=f"steps of the range test (default {d.find_lr_steps})")
    g.add_argument("--find-lr-min", type=float, help=f"its first learning rate (default {d.find_lr_min:g})")
    g.add_argument("--find-lr-max", type=float, help=f"its last learning rate (default {d.find_lr_max:g})")
    g.add_argument("--no-calibration", action="store_true", help="skip the calibration (ECE, temperature, "
                   "reliability.png) of the held-out split before and after fine-tuning")

    g = p.add_argument_group("progress and checkpoints")
    g.add_argument("--eval-steps", type=int, help=f"evaluate every N steps (default {d.eval_steps})")
    g.add_argument("--save-steps", type=int, help=f"checkpoint every N steps (default {d.save_steps})")
    g.add_argument("--save-total-limit", type=int, help=f"checkpoints kept (default {d.save_total_limit})")
    g.add_argument("--logging-steps", type=int,
                   help=f"log the train loss every N steps (default {d.logging_steps})")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the last checkpoint in --out (or from CHECKPOINT)")
    g.add_argument("--overwrite", action="store_true", help="delete a non-empty --out and start afresh")
    g.add_argument("--stop-after", type=int, metavar="N",
                   help="checkpoint at step N and stop as if interrupted (to try --resume)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU: torch threads (default 0: torch's default, every core). On a busy or "
                        "shared machine 1 is often much faster (measured on a busy 2-core machine: "
                        "the quick run took 3 min 14 s with 2 threads, 25 s with 1)")


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``finetune`` sub-command to an ``argparse`` sub-parsers object; returns its parser."""
    p = subparsers.add_parser("finetune", help="LoRA fine-tuning with fused kernels and swapped attention",
                              description=DESCRIPTION)
    add_arguments(p)
    return p


_FLAG_FIELDS = ("model", "data", "out", "seq_len", "eval_fraction", "max_eval_sequences", "rank", "alpha",
                "dropout", "attention", "transfer_steps", "transfer_lr", "feature_dim", "max_steps",
                "batch_size", "grad_accum", "weight_decay", "warmup_steps", "max_grad_norm",
                "precision", "seed", "find_lr_steps", "find_lr_min", "find_lr_max", "eval_steps",
                "save_steps", "save_total_limit", "logging_steps", "resume", "stop_after")


def parse_lr(text: str) -> float | str:
    """``--lr``: a positive number or ``auto``; raises ``ValueError`` naming the value otherwise."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise ValueError(f"--lr {text!r}: expected a positive number (e.g. 2e-3) or 'auto' (use the "
                         "--find-lr range test's suggestion)")
    return value


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` for parsed flags (``--quick`` first, explicit flags on top)."""
    given = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f, None) is not None}
    if args.target_modules is not None:
        given["target_modules"] = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    if args.lr is not None:
        given["lr"] = parse_lr(args.lr)
    given["find_lr"] = args.find_lr
    given["calibration"] = not args.no_calibration
    given["fused"] = not args.no_fused
    given["overwrite"] = args.overwrite
    given["progress"] = not args.no_progress
    given["fsdp"] = getattr(args, "fsdp", False)
    given["gradient_checkpointing"] = getattr(args, "gradient_checkpointing", False)
    if args.quick:  # the demo runs attnkit's attention kernels unless --attention says otherwise
        return FinetuneConfig.quick(**{"attention": QUICK_ATTENTION, **given})
    return FinetuneConfig(**given)


def run_finetune(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status (0 done, or the --find-lr test written; 2 bad
    arguments; 3 stopped by --stop-after; 4 stopped by a non-finite loss)."""
    from .train import format_summary, train

    try:
        threads = getattr(args, "threads", 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"--threads must be an integer >= 0 (0 = torch's default), got {threads!r}")
        if threads:
            torch.set_num_threads(threads)
        cfg = config_from_args(args)
        summary = train(cfg)
    except ValueError as e:
        print(f"attnkit finetune: error: {e}", file=sys.stderr)
        return 2
    if summary.get("status") == "lr range test":
        print(format_summary(summary))
        return 0
    if summary.get("status") != "finished":
        print(format_summary(summary))
        return 4 if str(summary.get("status", "")).startswith("stopped") else 3
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for everyone
        return 0
    print(format_summary(summary))
    print(f"results in {cfg.out} (adapter_model.safetensors, attention.json, summary.json, loss_curve.png, "
          "reliability.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.finetune.cli", description=DESCRIPTION)
    add_arguments(parser)
    return run_finetune(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
