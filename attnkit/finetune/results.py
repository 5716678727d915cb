"""The rest of a run besides the training itself: calibration at each stage, the learning-rate
range test, the result files, the summary of a stopped run, and the terminal summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .calibration import calibrate_model, plot_reliability
from .diagnostics import NON_FINITE_STATUS
from .lr_finder import find_lr, plot_lr_find
from .report import losses_from_history, plot_losses, write_json

__all__ = ["calibrate_stage", "lr_range_test", "stopped_summary", "write_results", "format_summary",
           "LR_FIND_JSON"]

LR_FIND_JSON = "lr_find.json"


def _autocast(mode: str) -> torch.dtype | None:
    return torch.bfloat16 if mode == "bf16" else torch.float16 if mode == "fp16" else None


def calibrate_stage(calib: dict, stage: str, model, eval_ds, cfg, mode: str, is_main: bool,
                    every_rank: bool = False) -> None:
    """Add ``calib[stage]`` (rank 0 only; :func:`~.calibration.calibrate_model`) unless
    ``--no-calibration``. ``every_rank``: every rank runs it (an FSDP model's forward is a
    collective) and rank 0 alone keeps it."""
    if cfg.calibration and (is_main or every_rank):
        result = calibrate_model(model, eval_ds, cfg.batch_size, _autocast(mode), seed=cfg.seed)
        if is_main:
            calib[stage] = result


def lr_range_test(model, train_ds, cfg, out: Path, mode: str, resumed: bool, is_main: bool) -> dict:
    """Rank 0: run the range test (:func:`~.lr_finder.find_lr`) and write ``lr_find.json`` and
    ``lr_find.png``; a resumed ``--lr auto`` run reads the suggestion back instead. Returns the
    record without its per-step arrays."""
    path = out / LR_FIND_JSON
    if resumed:
        if not path.is_file():
            raise ValueError(f"--lr auto with --resume: {str(path)!r} is missing, so the suggested "
                             "learning rate of the original run is unknown; resume with that run's --lr")
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    else:
        rec = find_lr(model, train_ds, steps=cfg.find_lr_steps, lr_min=cfg.find_lr_min,
                      lr_max=cfg.find_lr_max, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                      weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                      autocast_dtype=_autocast(mode))
        if is_main:
            skipped = plot_lr_find(out / "lr_find.png", rec, f"learning-rate range test: {rec['steps_run']}"
                                   f" steps, lr {cfg.find_lr_min:g} -> {cfg.find_lr_max:g}")
            rec["plot"] = None if skipped else "lr_find.png"
            write_json(path, rec)
    return {k: v for k, v in rec.items() if k not in ("lrs", "losses", "smoothed")}


def stopped_summary(cfg, out: Path, trainer, detector, summary_base: dict, is_main: bool) -> dict:
    """The summary of a run the diagnostics stopped (a non-finite loss): no adapter is written;
    ``last_good_checkpoint`` is the newest checkpoint saved at or before the last finite logged
    loss. Rank 0 writes ``summary.json`` and the loss curve."""
    train_curve, eval_curve = losses_from_history(trainer.state.log_history)
    finite_steps = [s for s, _ in detector.train]
    last_finite = finite_steps[-1] if finite_steps else 0
    ckpts = out / "checkpoints"
    good = sorted((int(p.name.split("-")[-1]), p) for p in ckpts.glob("checkpoint-*")
                  if p.name.split("-")[-1].isdigit() and int(p.name.split("-")[-1]) <= last_finite)
    summary = {"status": detector.stop_reason or NON_FINITE_STATUS, "step": trainer.state.global_step,
               "last_finite_step": last_finite,
               "last_good_checkpoint": str(good[-1][1]) if good else None,
               "checkpoints": str(ckpts), **summary_base,
               "diagnoses": [d.to_json() for d in detector.diagnoses],
               "train_loss_curve": [(s, v if v == v and abs(v) != float("inf") else str(v))
                                    for s, v in train_curve],
               "eval_loss_curve": eval_curve}
    if is_main:
        plot_losses(out / "loss_curve.png", [(s, v) for s, v in train_curve if isinstance(v, float)
                                             and abs(v) != float("inf") and v == v], eval_curve,
                    f"attnkit finetune: {summary['status']} at step {summary['step']}")
        write_json(out / "summary.json", summary)
    return summary


def write_results(model, choice, cfg, out: Path, base_path: str, summary: dict,
                  state_dict: dict | None = None) -> None:
    """The adapter, ``attention.json``, the feature maps, the plot, then ``summary.json`` last (its
    presence marks a complete result). ``state_dict``: the gathered full state dict of a sharded
    (FSDP) model, from which the adapter is taken."""
    from ..attn.hf import CONFIG_KEY, _base_model

    for adapter_cfg in model.peft_config.values():  # plain PEFT finds the base from here
        adapter_cfg.base_model_name_or_path = base_path
    model.save_pretrained(str(out), **({} if state_dict is None else {"state_dict": state_dict}))
    record = {"attention": str(choice), "kind": choice.kind, "seq_len": cfg.seq_len,
              "attn_implementation": None if choice.kind == "model" else "attnkit",
              "config_entry": None, "feature_maps": None}
    if choice.kind == "linear" and choice.feature_map == "hedgehog":
        shutil.copyfile(out / "transfer" / "feature_maps.safetensors", out / "feature_maps.safetensors")
        record["feature_maps"] = "feature_maps.safetensors"
    elif choice.kind != "model":
        record["config_entry"] = getattr(_base_model(model).config, CONFIG_KEY, None)
    write_json(out / "attention.json", record)
    title = (f"attnkit finetune: {Path(base_path).name}, attention {choice}, LoRA r={cfg.rank}; "
             f"final eval ppl {summary['eval_perplexity']:.2f}" if summary["eval_perplexity"] else "")
    skipped = plot_losses(out / "loss_curve.png", summary["train_loss_curve"], summary["eval_loss_curve"],
                          title)
    summary["loss_curve"] = None if skipped else "loss_curve.png"
    if skipped:
        summary["loss_curve_skipped"] = skipped
    if summary.get("calibration"):
        skipped = plot_reliability(out / "reliability.png", summary["calibration"],
                                   f"next-token calibration on the held-out split ({Path(base_path).name})")
        summary["reliability_diagram"] = None if skipped else "reliability.png"
    write_json(out / "summary.json", summary)


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    status = summary.get("status")
    if status == "lr range test":
        f = summary["lr_finder"]
        return (f"learning-rate range test: {f['steps_run']} steps, lowest smoothed loss "
                f"{f['min_smoothed_loss']:.4g} at lr {f['lr_at_min']:.3g}; suggested peak lr "
                f"{f['suggested_lr']:.3g} ({f['rule']})" + (f"; {f['warning']}" if f.get("warning") else "")
                + f"\nwritten: {summary['out']}/lr_find.png, {summary['out']}/{LR_FIND_JSON}")
    if status != "finished":
        lines = [f"{status or 'stopped'} at step {summary.get('step')}; checkpoints in "
                 f"{summary.get('checkpoints')}" + ("" if str(status).startswith("stopped") else
                                                    " (continue with --resume)")]
        if str(status).startswith("stopped"):
            lines.append(f"last good checkpoint: {summary.get('last_good_checkpoint')} (no adapter written)")
        lines += [f"diagnosis: {d['message']}" for d in summary.get("diagnoses", [])]
        return "\n".join(lines)
    ev = summary["eval"]
    lines = [f"steps {summary['steps']}  train loss {summary['first_train_loss']:.3f} -> "
             f"{summary['last_train_loss']:.3f}  ({summary['tokens_per_second']} tokens/s, peak "
             f"{summary['peak_memory_mib']} MiB)"]
    for k, v in ev.items():
        ppl = v["perplexity"]
        lines.append(f"eval {k:<15} loss {v['loss']:.4f}  perplexity {ppl:.2f}" if ppl else
                     f"eval {k:<15} loss {v['loss']}")
    if "transfer" in summary and "last_mse" in summary["transfer"]:
        t = summary["transfer"]
        lines.append(f"attention transfer: {t['steps']} steps, "
                     f"MSE {t['first_mse']:.4g} -> {t['last_mse']:.4g}")
    if summary.get("lr_finder"):
        f = summary["lr_finder"]
        lines.append(f"--lr auto: trained with peak lr {f['suggested_lr']:.3g} from the range test "
                     f"({f['rule']})")
    for stage, c in (summary.get("calibration") or {}).items():
        line = f"calibration {stage:<14} ECE {c['ece']:.4f}  NLL {c['nll']:.4f}  accuracy {c['accuracy']:.3f}"
        if "temperature" in c:
            bound = " (search bound)" if c.get("temperature_at_bound") else ""
            line += (f"  | T {c['temperature']:.3f}{bound}: ECE {c['ece_report']:.4f} -> "
                     f"{c['ece_scaled']:.4f}, NLL {c['nll_report']:.4f} -> {c['nll_scaled']:.4f} "
                     "(held-out half)")
        lines.append(line)
    diagnoses = summary.get("diagnoses")
    if diagnoses is not None:
        lines += [f"diagnosis: {d['message']}" for d in diagnoses] or ["diagnoses: none"]
    return "\n".join(lines)
