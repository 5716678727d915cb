"""``ATTNKIT_AUTOTUNE=0`` keeps only the first config each prune returns (read at each prune)."""

from __future__ import annotations

from attnkit.kernels.autotune import first_only_if_asked


def test_first_only_if_asked(monkeypatch):
    configs = ["a", "b", "c", "d"]
    drop_a = first_only_if_asked(lambda cs, named_args, **kw: [c for c in cs if c != named_args["skip"]])
    keep_all = first_only_if_asked()
    monkeypatch.delenv("ATTNKIT_AUTOTUNE", raising=False)
    assert drop_a(configs, {"skip": "a"}) == ["b", "c", "d"]
    assert keep_all(configs, {}) == configs
    monkeypatch.setenv("ATTNKIT_AUTOTUNE", "0")
    assert drop_a(configs, {"skip": "a"}) == ["b"]  # the first the prune keeps, not configs[0]
    assert keep_all(configs, {}) == ["a"]
    monkeypatch.setenv("ATTNKIT_AUTOTUNE", "1")
    assert keep_all(configs, {}) == configs
