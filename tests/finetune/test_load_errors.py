"""``load_finetuned`` on a folder that is not a finished run: one clear error, not a raw one."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from attnkit.finetune.load import load_finetuned  # noqa: E402


def test_missing_folder_names_the_path_and_what_is_expected(tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=r"'.*no-such-run' does not exist; pass the --out "
                                                r"folder of a finished `attnkit finetune` run"):
        load_finetuned(str(missing))
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json"):
        load_finetuned(str(tmp_path))
    with pytest.raises(TypeError, match="out_dir must be a path"):
        load_finetuned(3)
