"""``attnkit finetune --fsdp`` under ``torchrun --nproc_per_node 2`` (FSDP2 on gloo, CPU), stopped and
resumed, against the same run in one process with the same global batch: the loss curves match,
the adapters are the same PEFT adapter (keys, shapes, values), and plain PEFT loads it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("torch.distributed.fsdp")

from ft_helpers import cli_args  # noqa: E402
from test_train_ddp import _run  # noqa: E402

from attnkit.finetune.cli import main as cli_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _args(model_dir, data_file, out, batch, *extra):
    """Three steps of batch ``batch`` per process; one checkpoint (at the end) and two evals."""
    args = cli_args(model_dir, data_file, out, "--max-steps", "3", "--eval-steps", "3", "--save-steps", "3",
                    "--batch-size", str(batch), "--threads", "1", *extra)
    return args


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_fsdp_two_process_run_matches_one_process(tmp_path, model_dir, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    # the sharded run also checkpoints its layers (--gradient-checkpointing): the same math; it
    # stops after step 2 (the workers exit 3, torchrun 1) and resumes from that checkpoint for step 3
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "attnkit.finetune.cli"]
    for extra in (["--stop-after", "2"], ["--resume"]):
        cmd = launch + _args(model_dir, data_file, sharded, 2, "--fsdp", "--gradient-checkpointing", *extra)
        rc, stdout, stderr = _run(cmd, env, tmp_path, timeout=240)
        stopped = extra[0] == "--stop-after"
        assert (rc != 0 and "interrupted at step 2" in stdout) if stopped else rc == 0, \
            stdout[-3000:] + stderr[-3000:]
    assert cli_main(_args(model_dir, data_file, single, 4)) == 0  # global batch 4 = 2 x 2

    a, b = (json.loads((o / "summary.json").read_text()) for o in (sharded, single))
    assert a["sharding"] == "fsdp2" and a["world_size"] == 2, "FSDP ran, not DDP"
    assert a["resumed_from_step"] == 2
    assert b["sharding"] is None and b["world_size"] == 1
    assert a["activation_checkpointing"] is True and b["activation_checkpointing"] is False
    assert [s for s, _ in a["train_loss_curve"]] == [1, 2, 3]
    for curve in ("train_loss_curve", "eval_loss_curve"):
        assert [s for s, _ in a[curve]] == [s for s, _ in b[curve]], curve
        # measured: about 1e-6 apart (the order of the reductions)
        assert [v for _, v in a[curve]] == pytest.approx([v for _, v in b[curve]], rel=1e-4, abs=1e-5), curve
    assert set(a["calibration"]) == {"before", "after"}
    assert a["calibration"]["after"]["nll"] == pytest.approx(b["calibration"]["after"]["nll"], rel=1e-4)

    # the same ordinary PEFT adapter: keys, shapes, dtypes and (up to reduction order) values
    wa, wb = _adapter(sharded), _adapter(single)
    assert sorted(wa) == sorted(wb) and len(wa) == 2 * 2 * 7  # A and B, 2 layers, 7 projections
    for k in wa:
        assert wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype, k
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    assert (wb[k] != 0).any(), "lora_B trained"
    ca, cb = (json.loads((o / "adapter_config.json").read_text()) for o in (sharded, single))
    for c in (ca, cb):  # a set in PEFT, written in no set order
        c["target_modules"] = sorted(c["target_modules"])
    assert ca == cb
    ckpt = sharded / "checkpoints" / "checkpoint-3"
    assert sorted(_adapter(ckpt)) == sorted(wa), "the checkpoint's adapter too"

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, str(sharded))
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tuned = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
    assert not torch.allclose(tuned, plain), "the loaded adapter changes the model"


def test_fsdp_needs_several_processes(tmp_path, model_dir, data_file, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli_main(_args(model_dir, data_file, tmp_path / "o", 2, "--fsdp")) == 2
    err = capsys.readouterr().err
    assert "--fsdp" in err and "WORLD_SIZE=1" in err and "torchrun" in err, err
    assert not (tmp_path / "o").exists(), "refused before writing anything"
