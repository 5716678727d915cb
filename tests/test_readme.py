"""The README's examples run as written (on the CPU they take the torch backend).

Every ```python block is a standalone example and runs here; snippets that need something the
README's shell commands make first (a finished fine-tuning run) are fenced as ```py instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may save files (an adapter folder)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_has_examples():
    assert BLOCKS


def test_readme_links_to_files_that_exist():
    """Embedded plots and relative links point at committed files."""
    text = README.read_text()
    targets = re.findall(r"\]\(((?!https?://|#)[^)\s]+)\)", text)
    assert any(t.endswith(".png") for t in targets)
    missing = [t for t in targets if not (README.parent / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"
