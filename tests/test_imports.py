"""The package's import structure: no import circles between modules or between sub-packages, no module importing
another's private names, and a CLI whose import loads none of the heavy libraries (README, "CLI speed")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "exert_ds"
HEAVY = ("torch", "deepspeed", "peft", "datasets", "transformers")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module → (imported exert_ds module, names taken from it) for every import statement, at any depth."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, list[str]]]] = {name: [] for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("exert_ds"):
                for alias in node.names:  # `from exert_ds.storage import sparse_codec` imports a module
                    sub = f"{node.module}.{alias.name}"
                    found[name].append((sub, []) if sub in modules else (node.module, [alias.name]))
            elif isinstance(node, ast.Import):
                found[name] += [(a.name, []) for a in node.names if a.name.startswith("exert_ds")]
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_modules():
    graph = {module: {target for target, _ in targets} for module, targets in imports().items()}
    assert cycle(graph) is None, " → ".join(cycle(graph))


def test_no_import_circle_between_subpackages():
    """model, runtime, prune, storage, evaluation, train and demo form layers. The top-level modules (errors, roles,
    config, data, cli) are not nodes here: config is the floor every package reads, and it checks a few keys with
    prune's rules (pattern.py, and the scorer registry when a config is checked)."""

    def package(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 else None  # exert_ds.prune.pbs → prune; exert_ds.config → None

    graph: dict[str, set[str]] = {}
    for module, targets in imports().items():
        for target, _ in targets:
            if package(module) and package(target) and package(target) != package(module):
                graph.setdefault(package(module), set()).add(package(target))
    assert cycle(graph) is None, " → ".join(cycle(graph))


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{module} imports {target}.{name}"
        for module, targets in imports().items()
        for target, names in targets
        for name in names
        if name.startswith("_") and target != module
    ]
    assert not private, private


@pytest.mark.parametrize("module", ["exert_ds.cli", "exert_ds.config", "exert_ds.storage.inspection"])
def test_light_modules_load_no_heavy_library(module):
    """Checked in a fresh interpreter: what `import module` puts into sys.modules."""
    code = f"import sys, json, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == [], f"import {module} loads {loaded}"


def test_readme_layout_names_every_module():
    """README's Layout table names every module of the package (a new module gets its row)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py") and f"{path.name}`" not in table
    ]
    assert not missing, f"README's Layout table does not name {missing}"
