"""The folders show the layers: runtime (rmn_fx/nn) <- passes <- API (rmn_fx/*.py) <-
recipes <- CLI (rmn_fx/cli). A module imports only from its own layer or those below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LAYERS = {  # folder (installed package) -> rank; lower ranks may not import higher ones
    "rmn_fx/nn": ("rmn_fx.nn", 0),
    "rmn_fx/nn/rules": ("rmn_fx.nn.rules", 0),
    "passes": ("rmn_fx.passes", 1),
    "rmn_fx": ("rmn_fx", 2),
    "rmn_fx/deploy": ("rmn_fx.deploy", 2),
    "recipes": ("rmn_fx.recipes", 3),
    "rmn_fx/cli": ("rmn_fx.cli", 4),
}
SHARED = {"rmn_fx.errors"}  # the one-line error family every layer raises
ENTRY_POINTS = {"__main__.py"}  # `python -m rmn_fx`: the CLI's, wherever it sits


def layer_of_module(name: str) -> int | None:
    best = None
    for package, rank in LAYERS.values():
        if (name == package or name.startswith(package + ".")) and (best is None or len(package) > len(best[0])):
            best = (package, rank)
    return None if best is None else best[1]


def imports(path: Path, package: str) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


@pytest.mark.parametrize("folder", list(LAYERS))
def test_modules_import_only_their_own_layer_or_lower(folder):
    package, rank = LAYERS[folder]
    files = sorted((ROOT / folder).glob("*.py"))
    assert files
    for path in files:
        if path.name in ENTRY_POINTS:
            continue
        for name in imports(path, package):
            if name in SHARED or layer_of_module(name) is None:
                continue
            assert layer_of_module(name) <= rank, f"{path.relative_to(ROOT)} imports {name}, a higher layer"
