"""The package's structure: imports run one way (no module imports, at any depth, function-level imports
included, a module that imports it back); the model library loads no training code and the engine no
submitit (STYLE.md: config <- data, models, diffusion <- ldm <- engine <- train.py, launch/); and no
function is longer than a screen."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "audioldm_dist"


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_package_has_no_import_cycle() -> None:
    graph = _import_graph()
    assert "audioldm_dist.engine.trainer" in graph and graph["audioldm_dist.engine.trainer"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


TRAINING_CODE = ("deepspeed", "submitit", "audioldm_dist.engine")
ISOLATED = {"audioldm_dist.models": TRAINING_CODE, "audioldm_dist.data": TRAINING_CODE,
            "audioldm_dist.diffusion": TRAINING_CODE, "audioldm_dist.ldm": TRAINING_CODE,
            "audioldm_dist.engine": ("submitit",)}
"""A package (every module in it) → what importing it must not load."""

_PROBE = """
import importlib, json, sys
for module in MODULES:
    importlib.import_module(module)
    loaded = [name for name in FORBIDDEN if name in sys.modules]
    if loaded:
        print(json.dumps([module, loaded]))
        break
else:
    print(json.dumps(None))
"""


def _modules_of(package: str) -> list[str]:
    """The package and every module under it, from its files (`__main__` modules left out: they run a CLI)."""
    path = ROOT.joinpath(*package.split("."))
    if not path.is_dir():
        return [package]
    files = sorted(p for p in path.rglob("*.py") if p.name != "__main__.py")
    return [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in files]


def _first_import_loading(modules: list[str], *, forbidden: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """Imports `modules` in order in a fresh interpreter; the first one after which any of `forbidden` is
    loaded, with what was loaded; None if none was."""
    code = f"MODULES = {modules!r}\nFORBIDDEN = {forbidden!r}\n" + _PROBE
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    return None if found is None else (found[0], found[1])


@pytest.mark.parametrize("package", ISOLATED)
def test_importing_a_layer_loads_nothing_above_it(package: str) -> None:
    modules = _modules_of(package)
    assert len(modules) >= 1 and modules[0] == package
    found = _first_import_loading(modules, forbidden=ISOLATED[package])
    assert found is None, f"importing {found[0]} loads {', '.join(found[1])}"


def test_the_import_probe_finds_a_loaded_module() -> None:
    assert _first_import_loading(["json", "audioldm_dist.engine.distributed"], forbidden=("torch",)) == (
        "audioldm_dist.engine.distributed", ["torch"])


MAX_FUNCTION_LINES = 60


def _function_lengths() -> list[tuple[int, str]]:
    """(lines, "path:line name") of every def and async def in the package, nested ones included."""
    lengths = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1,
                                f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return lengths


def test_no_function_is_longer_than_a_screen() -> None:
    lengths = _function_lengths()
    assert len(lengths) > 500  # the whole package was read
    too_long = sorted((length, where) for length, where in lengths if length >= MAX_FUNCTION_LINES)
    assert not too_long, f"functions of {MAX_FUNCTION_LINES} lines or more (split them): {too_long}"


IMPORTERS = {"deepspeed": ("audioldm_dist/engine/", "benchmarks/", "tests/"),
             "submitit": ("launch/", "tests/")}
"""A third-party package only one layer may import (STYLE.md) → the folders whose files may import it."""


def _third_party_importers(package: str) -> list[str]:
    """Every .py file git tracks that imports `package` (any depth, function-level included)."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = []
    for relative in tracked.stdout.split():
        for node in ast.walk(ast.parse((ROOT / relative).read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            if any(name == package or name.startswith(package + ".") for name in names):
                found.append(relative)
                break
    return found


@pytest.mark.parametrize("package", IMPORTERS)
def test_only_its_layer_imports_a_training_package(package: str) -> None:
    importers = _third_party_importers(package)
    assert importers, f"nothing imports {package}: the walk missed the code"
    outside = [path for path in importers if not path.startswith(IMPORTERS[package])]
    assert not outside, f"{package} imported outside {IMPORTERS[package]}: {outside}"
