"""The package's layering, read from every module's imports (no jax needed): a break fails here, naming the line.

    main -> (jobs, pipeline) -> (train, eval) -> (sampling, models) -> data
         -> (config, parallel, xla_options, host_memory)

See docs/architecture.md. Imports sit at module top, so this graph is the one a reader sees; the exceptions are
main's lazy job dispatch (``--help`` answers without jax) and the optional heavy dependencies in LAZY_OK.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "medkr_jax"

# package (or top-level module) -> the medkr_jax packages it must not import
FORBIDDEN = {
    "models": {"train", "eval", "pipeline", "jobs", "sampling"},
    "data": {"models", "train", "eval", "sampling", "pipeline", "jobs"},
    "sampling": {"train", "eval", "pipeline", "jobs"},
    "eval": {"train", "pipeline", "jobs"},
    "train": {"pipeline", "jobs"},
    "config": {"data", "models", "train", "eval", "sampling", "pipeline", "jobs"},
    "parallel": {"config", "data", "models", "train", "eval", "sampling", "pipeline", "jobs"},
    "sharding_rules": {"config", "data", "models", "train", "eval", "sampling", "pipeline", "jobs"},
    "xla_options": {"data", "models", "train", "eval", "sampling", "pipeline", "jobs"},
    "host_memory": {"config", "parallel", "xla_options", "data", "models", "train", "eval", "sampling", "pipeline",
                    "jobs"},
    "pipeline": {"main"},
    "jobs": {"main"},
}
# layers that take plain arguments or settings objects: the config tree (ml_collections, medkr_jax.config) is read
# only by jobs and pipeline stages
NO_CONFIG_TREE = ("models", "data", "sampling", "train", "eval")
# optional heavy dependencies a function may import where it needs them (plots, torch references, datasets)
LAZY_OK = {"matplotlib", "matplotlib.pyplot", "torch", "datasets"}


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(tree: ast.AST):
    """(node, imported module name, at module top?) for every import statement."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                yield node, name, id(node) in top


def _internal_layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "medkr_jax" and len(parts) > 1 else None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_respects_the_layering(path):
    layer = _layer(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(PKG.parent)
    breaks = []
    for node, name, at_top in _imports(tree):
        target = _internal_layer(name)
        if target == "main":
            breaks.append(f"{where}:{node.lineno} imports medkr_jax.main (the CLI)")
        if target in FORBIDDEN.get(layer, ()):
            breaks.append(f"{where}:{node.lineno} ({layer}) imports {name} ({target})")
        if layer in NO_CONFIG_TREE and (name.split(".")[0] == "ml_collections" or name == "medkr_jax.config"
                                        or name.startswith("medkr_jax.config.")):
            breaks.append(f"{where}:{node.lineno} ({layer}) reads the config tree ({name}): take plain arguments")
        if not at_top and layer != "main" and name.split(".")[0] not in {m.split(".")[0] for m in LAZY_OK}:
            breaks.append(f"{where}:{node.lineno} imports {name} inside a function: import at module top")
    assert not breaks, "\n".join(sorted(set(breaks)))


def test_the_layering_test_sees_a_break(tmp_path):
    """The checks above fail on a models/ module that imports the trainer inside a function."""
    tree = ast.parse("def f():\n    from medkr_jax.train.loop import train\n")
    found = [(name, top) for _, name, top in _imports(tree)]
    assert ("medkr_jax.train.loop", False) in found
    assert _internal_layer("medkr_jax.train.loop") in FORBIDDEN["models"]


MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_and_function_sizes(path):
    """Modules of one job: at most 450 lines, functions (and methods) at most 80, def line to last line."""
    text = path.read_text(encoding="utf-8")
    where = path.relative_to(PKG.parent)
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{where}: {len(text.splitlines())} lines"
    long = [f"{where}:{n.lineno} {n.name}() is {n.end_lineno - n.lineno + 1} lines"
            for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)
