"""The attnkit command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnkit.cli import main


def test_info_reports_versions_devices_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out
    # every op's backends, each with its verdict
    for title in ("attention backends for a bf16 prefill call", "attention backends for a bf16 "
                  "decode step", "linear_attention backends", "lora_linear backends",
                  "lora_batched backends"):
        assert title in out, title
    for entry in ("cuda (CudaDecodeBackend)", "triton (TritonDecode)", "triton (TritonFlash)",
                  "torch (TorchAttention)", "triton (TritonLinear)", "torch (TorchLinear)",
                  "cuda (CudaLoRA)", "triton (TritonLoRA)", "torch (TorchLoRA)"):
        assert entry in out, entry
    assert out.count("torch (TorchAttention)         usable") == 2


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "attnkit", "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0
    assert "info" in proc.stdout


def test_import_is_light():
    """`import attnkit` must not import triton (kernels load on first use)."""
    code = "import sys, attnkit; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_version_flag(capsys):
    import attnkit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnkit {attnkit.__version__}"


def test_compile_report_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile-report", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--arch", "--json", "--first-only", "--kernel", "--head-dim", "--dtype"):
        assert flag in out, flag


def test_bench_out_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("not a folder")
    for out, says in ((f, "is an existing file"), (f / "sub", "cannot be created")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--quick", "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and says in err[0], err
