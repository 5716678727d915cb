"""The architecture, checked: no import cycle among attnkit's modules (module-level and lazy
imports alike), the ops in ``kernels/`` never import the layers above them at module level, and
no source file is over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "attnkit"
ABOVE_KERNELS = ("attnkit.attn", "attnkit.finetune", "attnkit.bench", "attnkit.distributed",
                 "attnkit.cli", "attnkit.hf")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, bool]]:
    """``(imported attnkit module, at module level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                targets.append(sub if sub in modules else mod)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t in modules:
                found.append((t, id(node) in top_level))
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {m: {t for t, _ in _imports(m, p, modules)} - {m} for m, p in modules.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_kernels_do_not_import_the_layers_above_them_at_module_level():
    modules = _modules()
    bad = [f"{m} imports {t}" for m, p in modules.items() if m.startswith("attnkit.kernels")
           for t, top in _imports(m, p, modules) if top and t.startswith(ABOVE_KERNELS)]
    assert not bad, bad


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
