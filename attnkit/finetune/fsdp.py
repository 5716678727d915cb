"""``attnkit finetune --fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through the Trainer.

The Trainer hands FSDP to accelerate's ``FullyShardedDataParallelPlugin`` (``fsdp_version=2``):
every decoder layer (the model's ``_no_split_modules``) becomes one FSDP unit, then the input
embedding, the final norm with the output layer, and the root. A decoder layer's unit holds its
frozen base weights and its LoRA ``A``/``B`` alike; its pre-forward all-gather makes them whole
tensors before the layer runs, so the fused LoRA forward (:class:`~.peft_glue.FusedLoraLinear`,
which reads ``lora_A[name].weight`` without calling that module) sees plain tensors, and the
gradients it returns are reduce-scattered by the unit's post-backward.

CPU (gloo): FSDP2 itself runs on gloo in torch 2.13 (``all_gather_into_tensor`` and
``reduce_scatter_tensor`` both work), but accelerate (1.15 measured, the same code in earlier
versions) sets ``DistributedType.FSDP`` only when the process group is of a GPU-like type
(``AcceleratorState.__init__``: ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ...]``,
``MULTI_CPU`` absent), so a CPU Trainer given an FSDP plugin silently trains with DDP instead.
:func:`force_fsdp_on_cpu` sets the distributed type after the Accelerator is made, on both
accelerate's ``AcceleratorState`` and ``PartialState`` (every later ``AcceleratorState()`` copies
``PartialState``'s fields back over its own, e.g. the RNG synchronisation of each epoch's data
loader, which would undo a change made to one alone). On GPUs accelerate's own path is used as is.

Saving: the parameters are ``DTensor`` shards; :func:`full_state_dict` gathers them (a collective:
every rank calls it) into ordinary tensors on rank 0, which then saves an ordinary PEFT adapter
(``save_pretrained(..., state_dict=...)``), key for key the single-process one (the gathered keys are the
unwrapped model's).

Activation checkpointing under FSDP is transformers' (``gradient_checkpointing``), not FSDP's own
(accelerate's ``fsdp_config["activation_checkpointing"]``, which transformers recommends to save
one all-gather per layer in backward): that one wraps each decoder layer in a ``CheckpointWrapper``
whose ``_checkpoint_wrapped_module`` name part PEFT's adapter-key selection (structural, from the
model's module names) does not see through. Measured: the saved adapter, and the Trainer's
checkpoints, were empty.
"""

from __future__ import annotations

import torch

__all__ = ["fsdp_training_kwargs", "force_fsdp_on_cpu", "full_state_dict", "is_sharded",
           "check_fsdp_supported"]

def check_fsdp_supported(world: int) -> None:
    """``--fsdp`` needs ``torchrun`` with 2+ processes and a torch with ``fully_shard``; raises
    ``ValueError`` saying which is missing."""
    if world < 2:
        raise ValueError(f"--fsdp shards the model across processes, but this run has WORLD_SIZE={world}; "
                         "launch it with torchrun --nproc_per_node N (N >= 2), or drop --fsdp")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise ValueError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this "
                         f"torch is {torch.__version__}") from None


def _layer_classes(model) -> list[str]:
    """The decoder-layer class names to wrap: the model's ``_no_split_modules``."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return sorted(set(names))
    raise ValueError(f"--fsdp: the model ({type(model).__name__}) declares no _no_split_modules, so its "
                     "decoder layers (the FSDP units) are unknown")


def fsdp_training_kwargs(model) -> dict:
    """The ``TrainingArguments`` keywords for FSDP2 over ``model``'s decoder layers."""
    import transformers

    config = {"version": 2, "transformer_layer_cls_to_wrap": _layer_classes(model),
              "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}
    major = int(transformers.__version__.split(".")[0])
    # transformers 5 takes fsdp=True (its legacy option strings are deprecated); 4.x only the strings
    return {"fsdp": True if major >= 5 else "full_shard auto_wrap", "fsdp_config": config}


def force_fsdp_on_cpu(trainer) -> bool:
    """After ``Trainer.create_accelerator_and_postprocess``: on a CPU run whose arguments ask for
    FSDP that accelerate turned into DDP, make it FSDP (see the module docstring). Returns whether
    it changed anything."""
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    if plugin_args is None or trainer.is_fsdp_enabled or torch.cuda.is_available():
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return True


def is_sharded(model) -> bool:
    """Whether ``model`` (or a module in it) is an FSDP2 module."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_state_dict(model) -> dict:
    """The whole model's state dict as ordinary CPU tensors on rank 0 (``{}`` on the others).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
