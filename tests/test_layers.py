"""The folders form layers that depend strictly downwards, with no import cycle between files.

    utils  <  dataset, tokenizer, evaluations  <  autoregressive.models  <  autoregressive.decoding
           <  autoregressive.strategies  <  drivers (train/, sample/, demo, reproduce, bench/,
                                                     the tokenizer's and evaluator's scripts)

Every import statement of every module counts, including the deferred ones inside functions: a
deferred import hides a cycle from Python, not from a reader.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autoregressive", "tokenizer", "dataset", "utils", "evaluations", "bench")

#: (module prefix, layer); the longest matching prefix decides.
LAYERS = [
    ("utils", 0),
    ("dataset", 1), ("tokenizer", 1), ("evaluations", 1),
    ("autoregressive.models", 2),
    ("autoregressive.decoding", 3),
    ("autoregressive.strategies", 4),
    ("autoregressive.train", 5), ("autoregressive.sample", 5), ("autoregressive.demo", 5),
    ("autoregressive.reproduce", 5), ("autoregressive.export", 5), ("bench", 5),
    ("tokenizer.train_vq", 5), ("tokenizer.reconstruction_vq_ddp", 5), ("evaluations.c2i.evaluator", 5),
]
LAYER_NAMES = {0: "utils", 1: "dataset/tokenizer/evaluations", 2: "models", 3: "decoding", 4: "strategies",
               5: "drivers"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every Python file of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> int:
    if module == "autoregressive":  # the namespace's empty __init__
        return 0
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return dict(LAYERS)[best]


def resolve(name: str) -> str | None:
    """The project module a dotted import name refers to (its longest prefix that is a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def project_imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its file; `from pkg import name` counts as
    importing `pkg.name` when that is a module, else `pkg`."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(resolve(f"{node.module}.{a.name}") for a in node.names)
    return found - {None, module}


def test_every_module_is_in_a_layer_and_imports():
    for module in MODULES:
        layer_of(module)
        importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    mine = layer_of(module)
    upward = sorted(f"{m} ({LAYER_NAMES[layer_of(m)]})" for m in project_imports(module) if layer_of(m) > mine)
    assert not upward, f"{module} ({LAYER_NAMES[mine]}) imports upwards: {', '.join(upward)}"


def test_no_import_cycle_between_files():
    graph = {m: project_imports(m) for m in MODULES}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles between files: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks are not vacuous: a strategy imported by a decoding module, and two decoding
    modules importing each other, are both reported."""
    fake = {"autoregressive.decoding.a": tmp_path / "a.py", "autoregressive.decoding.b": tmp_path / "b.py",
            "autoregressive.strategies.s": tmp_path / "s.py"}
    fake["autoregressive.decoding.a"].write_text("from autoregressive.strategies.s import X\n"
                                                 "def f():\n    import autoregressive.decoding.b\n")
    fake["autoregressive.decoding.b"].write_text("from autoregressive.decoding import a\n")
    fake["autoregressive.strategies.s"].write_text("X = 1\n")
    monkeypatch.setitem(globals(), "MODULES", fake)
    with pytest.raises(AssertionError, match="imports upwards: autoregressive.strategies.s"):
        test_no_upward_import("autoregressive.decoding.a")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle_between_files()
