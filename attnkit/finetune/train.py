"""``attnkit.finetune.train``: LoRA fine-tuning of a causal LM on transformers' ``Trainer``.

One run, in order (every check that can fail comes before anything is written):

1. validate the settings and the model's config (``--seq-len`` against its position limit);
   decide fresh start or ``--resume`` (a resume must keep the settings and data recorded in
   ``OUT/run_config.json``, written at a fresh start);
2. read, tokenise and pack the text, holding out whole documents (or, with too few documents,
   packed blocks) for evaluation; only then is ``--out`` created (and the embedded model written);
3. evaluate the original model, and measure its calibration (:mod:`.calibration`);
4. swap the attention (``--attention``); for ``linear`` with ``--transfer-steps N``, first train
   per-layer Hedgehog feature maps by attention transfer (:mod:`.linearize`); evaluate and
   calibrate again;
5. wrap with PEFT LoRA, run it on attnkit's fused kernels (:func:`~attnkit.finetune.fuse_lora`);
   with ``--find-lr`` run the learning-rate range test (:mod:`.lr_finder`) and stop there, with
   ``--lr auto`` run it and take its suggestion; train with AdamW (decoupled weight decay),
   linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast on GPUs
   that have it; eval loss and perplexity every
   ``--eval-steps``; a checkpoint every ``--save-steps`` (``--resume`` continues from the last one
   with the same step count, optimizer, scheduler, RNG state and data order); the logged losses
   and gradient norms are checked for failure-mode signatures (:mod:`.diagnostics`), and a
   non-finite loss stops the run with its last good checkpoint named in ``summary.json``;
6. evaluate and calibrate, then write the adapter, ``attention.json``, ``summary.json``,
   ``loss_curve.png`` and ``reliability.png`` (:mod:`.results`).

Under ``torchrun --nproc_per_node N`` the Trainer runs DDP (gloo on CPU, NCCL on GPUs), or with
``--fsdp`` FSDP2 (:mod:`.fsdp`). The process group is set up first; rank 0 alone inspects and writes
``--out`` and broadcasts its decision. ``--gradient-checkpointing`` recomputes each decoder layer in
backward (transformers' non-reentrant ``torch.utils.checkpoint``, under ``--fsdp`` too).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .config import AttentionChoice, FinetuneConfig
from .dataset import (
    PackedDataset,
    data_fingerprint,
    embedded_corpus_path,
    read_documents,
    split_documents,
    tokenize_documents,
)
from .diagnostics import SignatureDetector, signature_callback
from .distributed import barrier as _barrier
from .distributed import from_rank0 as _from_rank0
from .distributed import init_distributed as _init_distributed
from .distributed import rank_and_world as _rank
from .model import check_model_folder, load_model, load_tokenizer
from .report import losses_from_history, peak_memory, perplexity, write_json
from .results import calibrate_stage, format_summary, lr_range_test, stopped_summary, write_results

__all__ = ["train", "run", "FinetuneConfig", "format_summary"]

RUN_CONFIG = "run_config.json"


def _run_record(cfg: FinetuneConfig) -> dict:
    """What ``OUT/run_config.json`` holds: the settings a resume must keep, and the data's hash."""
    record = cfg.run_record()
    record["data_sha256"] = data_fingerprint(cfg.data if cfg.data is not None else embedded_corpus_path())
    return json.loads(json.dumps(record))  # tuples -> lists, as read back


def _check_resume_config(cfg: FinetuneConfig, out: Path) -> None:
    """``--resume`` with settings other than the run's own is an error naming every changed one."""
    path = out / RUN_CONFIG
    if not path.is_file():  # a run from before run_config.json existed
        print(f"attnkit finetune: note: {str(path)!r} is missing; cannot check that --resume uses the "
              "run's own settings", file=sys.stderr)
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    now = _run_record(cfg)
    missing = object()
    changed = []
    defaults = json.loads(json.dumps(FinetuneConfig().run_record()))
    for key in sorted(set(saved) | set(now)):
        was, new = saved.get(key, missing), now.get(key, missing)
        if was == new or (was is missing and new == defaults.get(key, missing)):
            continue  # same, or a setting newer than the run, left at its default
        if key == "data_sha256":
            changed.append("the --data contents (their SHA-256 differs)")
        else:
            flag = f"--{key.replace('_', '-')}"
            changed.append(f"{flag} was {None if was is missing else was!r}, now "
                           f"{None if new is missing else new!r}")
    if changed:
        raise ValueError(f"--resume: the settings differ from the run in {str(out)!r} ({RUN_CONFIG}): "
                         + "; ".join(changed) + ". Resume with the run's own settings, or start afresh "
                         "with --overwrite or another --out")


def _decide_out(cfg: FinetuneConfig, out: Path) -> str | None:
    """Check ``--out`` against ``--resume``/``--overwrite`` (rank 0; writes nothing); returns the
    checkpoint to resume or None for a fresh start."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpts = out / "checkpoints"
    if cfg.resume is not None:
        if cfg.resume != "latest":
            if not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
                raise ValueError(f"--resume {cfg.resume!r}: not a checkpoint folder (no trainer_state.json)")
            last = cfg.resume
        else:
            last = get_last_checkpoint(str(ckpts)) if ckpts.is_dir() else None
            if last is None:
                raise ValueError(f"--resume: no checkpoint under {str(ckpts)!r}; run without --resume first")
        _check_resume_config(cfg, out)
        return last
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--out {str(out)!r} is not empty; pass --resume to continue the run there, "
                         "--overwrite to start afresh (deleting it), or another --out")
    return None


def _start_out(cfg: FinetuneConfig, out: Path, fresh: bool) -> None:
    """Rank 0: empty ``--out`` for ``--overwrite``, create it, record the settings of a fresh run."""
    if fresh and out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        write_json(out / RUN_CONFIG, _run_record(cfg))


def _precision(cfg: FinetuneConfig) -> tuple[str, torch.dtype]:
    """``(mode, base weight dtype)``: bf16 where the GPU supports it, else fp32."""
    cuda = torch.cuda.is_available()
    mode = cfg.precision
    if mode == "auto":
        mode = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if mode in ("bf16", "fp16") and not cuda:
        raise ValueError(f"--precision {mode} needs a CUDA GPU; this machine has none (use fp32 or auto)")
    if mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU does not support bfloat16; use fp16 or auto")
    # bf16 keeps the frozen base in bf16 (LoRA weights stay fp32 under autocast); fp16 training
    # keeps fp32 weights because its gradient scaler refuses fp16 parameters
    return mode, torch.bfloat16 if mode == "bf16" else torch.float32


def _pattern(choice: AttentionChoice, seq_len: int):
    """The attnkit spec for ``--attention`` (``None`` = the model's own pattern on attnkit)."""
    from ..attn.patterns import SlidingWindow
    from ..attn.sparse_builders import bigbird, longformer

    if choice.kind == "sliding":  # W tokens counting the query: transformers' sliding_window = W
        return SlidingWindow(choice.window - 1, 0)
    if choice.kind == "bigbird":
        return bigbird(seq_len, choice.block, causal=True)
    if choice.kind == "longformer":
        return longformer(seq_len, choice.block, choice.window, global_tokens=1, causal=True)
    return None


def _check_targets(model, targets) -> None:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"--target-modules: the model has no Linear layer named {', '.join(missing)}; "
                         f"its Linear layers are named {', '.join(sorted(names))}")


def _training_args(cfg: FinetuneConfig, out: Path, mode: str, world: int, **overrides):
    """``TrainingArguments`` with only the keywords this transformers version knows."""
    from transformers import TrainingArguments

    known = inspect.signature(TrainingArguments.__init__).parameters
    kw = dict(
        output_dir=str(out / "checkpoints"), max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, weight_decay=cfg.weight_decay,
        learning_rate=0.0 if cfg.lr == "auto" else cfg.lr,  # auto: the run passes the suggestion
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine", max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        logging_first_step=True, eval_steps=cfg.eval_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, bf16=mode == "bf16",
        fp16=mode == "fp16", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False, label_names=["labels"],
        disable_tqdm=not cfg.progress, ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # a NaN must reach the diagnostics, not be averaged away
    )
    strategy_key = "eval_strategy" if "eval_strategy" in known else "evaluation_strategy"
    kw[strategy_key] = "steps"
    if not torch.cuda.is_available():
        # accelerate only sets up multi-process CPU training (gloo) when told the run is on CPU
        kw["use_cpu" if "use_cpu" in known else "no_cuda"] = True
        if world > 1:
            kw["ddp_backend"] = "gloo"
    for k, v in overrides.items():
        kw[strategy_key if k == "eval_strategy" else k] = v
    if "gradient_checkpointing" in kw and "activation_checkpointing" in known:  # its name from 5.2x on
        kw["activation_checkpointing"] = kw.pop("gradient_checkpointing")
        kw["activation_checkpointing_kwargs"] = kw.pop("gradient_checkpointing_kwargs", None)
    return TrainingArguments(**{k: v for k, v in kw.items() if k in known})


def _memory_args(cfg: FinetuneConfig, model) -> dict:
    """The ``TrainingArguments`` of ``--fsdp`` and ``--gradient-checkpointing`` (transformers' own
    checkpointing under FSDP too: :mod:`.fsdp` says why)."""
    kw: dict = {}
    if cfg.fsdp:
        from .fsdp import fsdp_training_kwargs

        kw.update(fsdp_training_kwargs(model))
    if cfg.gradient_checkpointing:  # non-reentrant: the LoRA weights get gradients although the
        # frozen embedding's output does not require one; it also restores the RNG state, so a
        # recomputed layer draws the same dropout seed as its first forward
        kw.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return kw


def _checkpointing_on(model) -> bool:
    """Whether the model's layers recompute in backward (transformers' flag, by either name)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def _trainer_classes():
    from transformers import Trainer, TrainerCallback

    from .fsdp import force_fsdp_on_cpu

    class FinetuneTrainer(Trainer):
        """Adds ``eval_perplexity`` next to every ``eval_loss`` it logs; makes ``--fsdp`` FSDP on
        CPU too (:func:`~.fsdp.force_fsdp_on_cpu`)."""

        def create_accelerator_and_postprocess(self, *args, **kwargs):
            out = super().create_accelerator_and_postprocess(*args, **kwargs)
            force_fsdp_on_cpu(self)
            return out

        def log(self, logs, *args, **kwargs):
            if "eval_loss" in logs:
                logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            return super().log(logs, *args, **kwargs)

    class StopAfter(TrainerCallback):
        """``--stop-after N``: checkpoint at step N and stop, as if the run had been killed."""

        def __init__(self, n: int):
            self.n = n

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= self.n:
                control.should_save = True
                control.should_training_stop = True

    return FinetuneTrainer, StopAfter


def _evaluate(model, eval_ds, cfg, out, mode, world) -> float:
    FinetuneTrainer, _ = _trainer_classes()
    args = _training_args(cfg, out, mode, world, eval_strategy="no", save_strategy="no")
    return float(FinetuneTrainer(model=model, args=args, eval_dataset=eval_ds).evaluate()["eval_loss"])


def _transfer(model, train_ds, cfg, out, mode, world, is_main) -> dict:
    """Stage 1 of linearising: train only the feature maps (attention transfer)."""
    from ..attn.hf import _base_model
    from . import linearize

    base = _base_model(model)
    previous = base.config._attn_implementation
    linearize.register_transfer_attention()
    base.requires_grad_(False)
    for fm in linearize.feature_maps_of(base).values():
        fm.requires_grad_(True)
    base.set_attn_implementation(linearize.TRANSFER_NAME)
    args = _training_args(cfg, out / "transfer", mode, world, max_steps=cfg.transfer_steps,
                          learning_rate=cfg.transfer_lr, weight_decay=0.0, eval_strategy="no",
                          save_strategy="no", warmup_steps=min(cfg.warmup_steps, cfg.transfer_steps // 10))
    trainer = linearize.transfer_trainer_class()(model=model, args=args, train_dataset=train_ds)
    t0 = time.perf_counter()
    trainer.train()
    mse = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    base.set_attn_implementation(previous)
    for fm in linearize.feature_maps_of(base).values():
        fm.requires_grad_(False)
    return {"steps": cfg.transfer_steps, "first_mse": mse[0] if mse else None,
            "last_mse": mse[-1] if mse else None, "seconds": round(time.perf_counter() - t0, 2)}


def _apply_attention(model, choice: AttentionChoice, cfg, out, train_ds, mode, world, is_main,
                     resumed: bool) -> dict:
    """Swap the attention; for linear:hedgehog attach (and maybe transfer) the feature maps."""
    from ..attn.hf import swap_attention
    from . import linearize

    info: dict = {}
    if choice.kind == "model":
        return info
    if choice.kind != "linear":
        swap_attention(model, _pattern(choice, cfg.seq_len))
        return info
    if choice.feature_map != "hedgehog":
        linearize.swap_to_linear(model, choice.feature_map, choice.window)
        return info
    saved = out / "transfer" / "feature_maps.safetensors"
    if resumed and saved.is_file():  # stage 1 finished before the interruption
        linearize.load_feature_maps(model, str(saved))
        info["transfer"] = {"steps": cfg.transfer_steps, "loaded_from": str(saved)}
    else:
        torch.manual_seed(cfg.seed)
        linearize.attach_feature_maps(model, cfg.feature_dim, choice.window)
        if cfg.transfer_steps:
            info["transfer"] = _transfer(model, train_ds, cfg, out, mode, world, is_main)
        if is_main:
            saved.parent.mkdir(parents=True, exist_ok=True)
            linearize.save_feature_maps(model, str(saved))
        _barrier()
    linearize.swap_to_linear(model, "hedgehog", choice.window)
    return info


def train(config: FinetuneConfig | None = None, **overrides) -> dict:
    """Fine-tune; returns the summary (also written to ``OUT/summary.json``).

    Pass a :class:`FinetuneConfig` and/or its fields as keywords, e.g.
    ``train(model="./my-llama", data="notes/", attention="sliding:256", out="run1")``.
    A run stopped by ``stop_after`` returns ``{"status": "interrupted", ...}`` and writes no result
    files (only checkpoints). Raises ``ValueError`` for bad settings before writing anything.
    """
    return run(config, **overrides)[0]


def run(config: FinetuneConfig | None = None, **overrides):
    """:func:`train`, returning ``(summary, model)``: the trained PEFT model stays usable in-process."""
    cfg = config if config is not None else FinetuneConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if isinstance(cfg.target_modules, str):
        cfg = dataclasses.replace(cfg, target_modules=tuple(cfg.target_modules.split(",")))
    choice = cfg.validate()
    check_model_folder(cfg, choice)
    rank, world = _rank()
    is_main = rank == 0
    if cfg.fsdp:
        from .fsdp import check_fsdp_supported

        check_fsdp_supported(world)
    out = Path(cfg.out)
    docs = read_documents(cfg.data if cfg.data is not None else embedded_corpus_path())
    mode, dtype = _precision(cfg)
    t_start = time.perf_counter()
    # rank 0 alone looks at --out and decides fresh vs resume; the others take its word for it
    _init_distributed(world)
    resume_from = _from_rank0(lambda: _decide_out(cfg, out))
    resumed = resume_from is not None

    import transformers

    import attnkit.hf  # noqa: F401 - registers attn_implementation="attnkit"

    # tokenise and split before writing anything: too little data fails here
    tokenizer = load_tokenizer(cfg, out, docs, resumed)
    train_blocks, eval_blocks, eval_split = split_documents(
        tokenize_documents(docs, tokenizer), cfg.seq_len, cfg.eval_fraction, cfg.max_eval_sequences)
    if eval_split == "blocks" and is_main:
        print(f"attnkit finetune: note: the data holds {len(docs)} document(s), too few (or too long) to "
              "hold out whole ones; the held-out sequences are packed blocks, which may share a "
              "document with the training text", file=sys.stderr)
    train_ds, eval_ds = PackedDataset(train_blocks), PackedDataset(eval_blocks)

    if is_main:
        _start_out(cfg, out, fresh=not resumed)
    _barrier()
    transformers.set_seed(cfg.seed)
    model, base_path = load_model(cfg, out, dtype, is_main, tokenizer, resumed)
    _barrier()  # OUT/base_model is complete before any process goes on
    _check_targets(model, cfg.target_modules)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))

    evals, calib = {"original": _evaluate(model, eval_ds, cfg, out, mode, world)}, {}
    calibrate_stage(calib, "before", model, eval_ds, cfg, mode, is_main)
    info = _apply_attention(model, choice, cfg, out, train_ds, mode, world, is_main, resume_from is not None)
    if choice.kind != "model":
        stage = "after_transfer" if "transfer" in info else "swapped"
        evals[stage] = _evaluate(model, eval_ds, cfg, out, mode, world)
        calibrate_stage(calib, stage, model, eval_ds, cfg, mode, is_main)

    from peft import LoraConfig, get_peft_model

    from .peft_glue import fuse_lora

    transformers.set_seed(cfg.seed)  # the same LoRA init with or without the transfer stage
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cfg.fused:
        # explicit "torch" off the GPU: lora_linear's "auto" would send CPU tensors to the Triton
        # interpreter when TRITON_INTERPRET=1 is set (as in the test suite), ~100x slower
        fuse_lora(model, backend="auto" if torch.cuda.is_available() else "torch")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr_info, lr = None, cfg.lr
    if cfg.find_lr or cfg.lr == "auto":  # rank 0 runs the range test; every rank gets its record
        lr_info = _from_rank0(lambda: lr_range_test(model, train_ds, cfg, out, mode, resumed, is_main))
        if cfg.find_lr:
            return {"status": "lr range test", "out": str(out), "lr_finder": lr_info}, model
        lr = lr_info["suggested_lr"]

    FinetuneTrainer, StopAfter = _trainer_classes()
    detector = SignatureDetector(cfg.max_grad_norm, cfg.warmup_steps)
    callbacks = [signature_callback(detector, announce=is_main)]
    callbacks += [StopAfter(cfg.stop_after)] if cfg.stop_after else []
    trainer = FinetuneTrainer(model=model, args=_training_args(cfg, out, mode, world, learning_rate=lr,
                                                               **_memory_args(cfg, model)),
                              train_dataset=train_ds, eval_dataset=eval_ds, callbacks=callbacks)
    start_step = trainer.state.global_step
    if resume_from is not None:
        with open(os.path.join(resume_from, "trainer_state.json")) as f:
            start_step = int(json.load(f).get("global_step", 0))
    result = trainer.train(resume_from_checkpoint=resume_from)
    steps = trainer.state.global_step
    if detector.stop_reason is not None:
        base = {"config": cfg.to_json(), "lr_finder": lr_info, "calibration": calib}
        return stopped_summary(cfg, out, trainer, detector, base, is_main), model
    if steps < cfg.max_steps:
        return {"status": "interrupted", "step": steps, "checkpoints": str(out / "checkpoints")}, model

    # the evaluation at the last step, when --eval-steps divides --max-steps, is the final one
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    evals["final"] = float(last["eval_loss"] if last.get("step") == steps else
                           trainer.evaluate()["eval_loss"])
    from .fsdp import full_state_dict, is_sharded

    sharded = is_sharded(model)
    # a sharded model's forward is a collective: every rank calibrates, rank 0 keeps the result
    calibrate_stage(calib, "after", model, eval_ds, cfg, mode, is_main, every_rank=sharded)
    train_curve, eval_curve = losses_from_history(trainer.state.log_history)
    tokens = (steps - start_step) * cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    runtime = float(result.metrics.get("train_runtime") or 0.0)
    summary = {
        "status": "finished",
        "config": cfg.to_json(),
        "attention": str(choice),
        "precision": mode,
        "world_size": world,
        "sharding": "fsdp2" if sharded else "ddp" if world > 1 else None,
        "activation_checkpointing": _checkpointing_on(model),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "base_model": base_path,
        "trainable_parameters": trainable,
        "train_sequences": len(train_ds),
        "eval_sequences": len(eval_ds),
        "eval_split": eval_split,
        "steps": steps,
        "resumed_from_step": start_step if resume_from is not None else None,
        "first_train_loss": train_curve[0][1] if train_curve else None,
        "last_train_loss": train_curve[-1][1] if train_curve else None,
        "eval_loss": evals["final"],
        "eval_perplexity": perplexity(evals["final"]),
        "eval": {k: {"loss": v, "perplexity": perplexity(v)} for k, v in evals.items()},
        "tokens_per_second": round(tokens / runtime, 1) if runtime > 0 else None,
        "train_seconds": round(runtime, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        **peak_memory(),
        **info,
        "peak_lr": lr,
        "lr_finder": lr_info,
        "calibration": calib,
        "diagnoses": [d.to_json() for d in detector.diagnoses],
        "train_loss_curve": train_curve,
        "eval_loss_curve": eval_curve,
    }
    state_dict = full_state_dict(model) if sharded else None  # a collective too
    if is_main:
        write_results(model, choice, cfg, out, base_path, summary, state_dict=state_dict)
    _barrier()
    return summary, model
