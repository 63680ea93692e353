"""The packages import downward only, and no import hides inside a function to dodge a cycle.

Layers, bottom to top: ``models`` and ``data``; ``ipu_options`` (pure config -> PopTorch plans); ``train``; the
command-line modules (``__main__``, ``cli`` and the ``python -m`` entry points) and ``bench``. An entry point may
import from any layer; a library module only from its own layer and below.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"models": 0, "data": 0, "ipu_options": 1, "train": 2, "bench": 3}
#: Modules run with ``python -m``: the top layer whatever package they sit in.
ENTRY_POINTS = {"ipu_options/__main__.py", "train/__main__.py", "train/cli.py", "train/finetune.py",
                "train/validate.py", "models/summary.py"}


def modules() -> Iterator[Tuple[str, Path]]:
    for package in LAYER:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path


def imported(tree: ast.AST, package: str) -> Iterator[Tuple[str, ast.AST]]:
    """Absolute top-level package names each import statement reaches (relative ones stay in ``package``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom):
            yield (node.module or "") if node.level == 0 else package, node


LIBRARY_MODULES = [(m, p) for m, p in modules() if m not in ENTRY_POINTS]


@pytest.mark.parametrize("name, path", LIBRARY_MODULES, ids=[m for m, _ in LIBRARY_MODULES])
def test_imports_point_downward(name: str, path: Path) -> None:
    package = name.split("/")[0]
    tree = ast.parse(path.read_text())
    for target, node in imported(tree, package):
        top = target.split(".")[0]
        if top in LAYER:
            assert LAYER[top] <= LAYER[package], f"{name}:{node.lineno} imports {target} from a higher layer"


@pytest.mark.parametrize("name, path", list(modules()), ids=[m for m, _ in modules()])
def test_no_function_local_imports_of_the_project(name: str, path: Path) -> None:
    """A function-local import of the project's own modules is how a cycle hides; optional third-party
    dependencies (PopTorch, timm, W&B, ...) may be imported late."""
    tree = ast.parse(path.read_text())
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for target, node in imported(func, name.split("/")[0]):
            assert target.split(".")[0] not in LAYER, f"{name}:{node.lineno} imports {target} in a function"
