"""``--find-lr``: a learning-rate range test, and the peak learning rate it suggests.

From the model as it is about to be trained (LoRA attached, attention swapped), AdamW (the run's
betas and weight decay, the run's gradient clipping and accumulation) takes ``--find-lr-steps``
steps while the learning rate grows exponentially from ``--find-lr-min`` to ``--find-lr-max``;
batches are drawn in a seeded random order from the training split. The test stops early once the
smoothed loss exceeds :data:`DIVERGE_FACTOR` times its minimum or turns non-finite. Afterwards the
trainable parameters and the RNG states are put back exactly as they were, so the real run starts
from the same point as without the test.

The suggestion rule: the losses are smoothed with a bias-corrected exponential moving average
(factor :data:`SMOOTHING`); ``lr_at_min`` is the learning rate where the smoothed loss is lowest
and the suggested peak learning rate is ``lr_at_min / SUGGEST_DIVISOR`` (one decade below the
point where the loss stops improving, the margin a warm-up-then-decay schedule needs, since the
minimum of a range test is already on the edge of divergence). ``lr_steepest``, the learning rate
where the smoothed loss falls fastest per decade, is reported too but not used: on short, noisy
tests it jumps about more.
"""

from __future__ import annotations

import math

import torch

__all__ = ["find_lr", "suggest_lr", "plot_lr_find", "SMOOTHING", "SUGGEST_DIVISOR", "DIVERGE_FACTOR"]

SMOOTHING = 0.9
SUGGEST_DIVISOR = 10.0
DIVERGE_FACTOR = 4.0


def _smooth(losses: list[float]) -> list[float]:
    out, avg = [], 0.0
    for i, loss in enumerate(losses, 1):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
        out.append(avg / (1 - SMOOTHING**i))
    return out


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[dict, list[float]]:
    """``(record, smoothed losses)`` for a range test's points (``lrs`` increasing, ``losses``
    finite, same length): the record holds ``lr_at_min``, ``min_smoothed_loss``, ``lr_steepest``,
    ``suggested_lr``, ``rule`` and, when the loss never fell, ``warning``."""
    smoothed = _smooth(losses)
    i_min = min(range(len(smoothed)), key=smoothed.__getitem__)
    slopes = [(smoothed[i + 1] - smoothed[i]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i]))
              for i in range(max(0, i_min))]
    i_steep = min(range(len(slopes)), key=slopes.__getitem__) if slopes else None
    rec = {"lr_at_min": lrs[i_min], "min_smoothed_loss": smoothed[i_min],
           "lr_steepest": lrs[i_steep] if i_steep is not None else None,
           "suggested_lr": lrs[i_min] / SUGGEST_DIVISOR,
           "rule": f"lr_at_min / {SUGGEST_DIVISOR:g} (smoothed-loss minimum, EMA {SMOOTHING})"}
    if i_min == 0 or smoothed[i_min] >= smoothed[0]:
        rec["warning"] = ("the smoothed loss never fell below its first value: widen the range "
                          "(--find-lr-min lower, --find-lr-max higher) or run more --find-lr-steps")
    return rec, smoothed


def find_lr(model, dataset, *, steps: int, lr_min: float, lr_max: float, batch_size: int,
            grad_accum: int = 1, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
            seed: int = 0, autocast_dtype: torch.dtype | None = None) -> dict:
    """Run the range test on ``model`` (its trainable parameters) over ``dataset`` (items
    ``{"input_ids": [T], "labels": [T]}``); returns the record (the points and :func:`suggest_lr`'s
    fields). ``model`` and the RNG states are restored before returning."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    saved = [p.detach().clone() for p in params]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    lrs, losses = [], []
    stopped = None
    opt = torch.optim.AdamW(params, lr=lr_min, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    try:
        for i in range(steps):
            lr = lr_min * (lr_max / lr_min) ** (i / max(1, steps - 1))
            for group in opt.param_groups:
                group["lr"] = lr
            total = 0.0
            for _ in range(grad_accum):
                if not order:
                    order = torch.randperm(len(dataset), generator=gen).tolist()
                idx = [order.pop() for _ in range(min(batch_size, len(order)))]
                ids = torch.stack([dataset[j]["input_ids"] for j in idx]).to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = model(input_ids=ids, labels=ids).loss / grad_accum
                loss.backward()
                total += float(loss.detach())
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not math.isfinite(total):
                stopped = f"non-finite loss at lr {lr:.3g}"
                break
            lrs.append(lr)
            losses.append(total)
            smoothed = _smooth(losses)
            if len(smoothed) > 1 and smoothed[-1] > DIVERGE_FACTOR * min(smoothed):
                stopped = f"smoothed loss above {DIVERGE_FACTOR:g} x its minimum at lr {lr:.3g}"
                break
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
                p.grad = None
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        model.train(was_training)
    if len(losses) < 2:
        raise ValueError(f"--find-lr: the range test got {len(losses)} finite loss(es) before it stopped "
                         f"({stopped}); lower --find-lr-min or raise --find-lr-steps")
    rec, smoothed = suggest_lr(lrs, losses)
    return {**rec, "steps_run": len(losses), "steps": steps, "lr_min": lr_min, "lr_max": lr_max,
            "stopped_early": stopped, "lrs": lrs, "losses": losses, "smoothed": smoothed}


def plot_lr_find(path, rec: dict, title: str = "") -> str | None:
    """Loss against learning rate (log scale) with the suggestion marked; ``None`` on success."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); lr_find.png skipped"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(rec["lrs"], rec["losses"], color="tab:blue", alpha=0.35, label="loss")
    ax.plot(rec["lrs"], rec["smoothed"], color="tab:blue", label=f"smoothed (EMA {SMOOTHING})")
    ax.axvline(rec["lr_at_min"], color="tab:red", ls=":", label=f"minimum, lr {rec['lr_at_min']:.3g}")
    ax.axvline(rec["suggested_lr"], color="tab:green", ls="--",
               label=f"suggested peak lr {rec['suggested_lr']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
