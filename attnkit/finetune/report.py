"""What a finished run writes besides the adapter: ``summary.json`` and ``loss_curve.png``."""

from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch

__all__ = ["losses_from_history", "peak_memory", "perplexity", "write_json", "plot_losses"]


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


def losses_from_history(history: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, eval)`` as ``(step, loss)`` pairs from a Trainer's ``state.log_history``.

    One point per step: an ``evaluate()`` after training at a step already evaluated would repeat
    it (the later entry is kept)."""
    train = [(h["step"], float(h["loss"])) for h in history if "loss" in h and "step" in h]
    evals = {h["step"]: float(h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h}
    return train, list(evals.items())


def peak_memory() -> dict:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the resident-set peak."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return {"peak_memory_mib": round(mib, 1), "peak_memory_kind": "process peak RSS (CPU)"}


def write_json(path, data: dict) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def plot_losses(path, train: list[tuple[int, float]], evals: list[tuple[int, float]],
                title: str) -> str | None:
    """Write the loss-curve PNG; returns ``None`` on success, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); loss_curve.png skipped"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
