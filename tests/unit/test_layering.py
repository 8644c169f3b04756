"""The layering docs/ARCHITECTURE.md promises, checked on the source: imaging imports
nothing of ours, pxe only pxe, and inside peer/ each layer only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# package or subpackage -> what it may import (besides itself and the standard library)
ALLOWED = {
    "imaging": set(),
    "pxe": set(),
    "peer.core": {"imaging"},
    "peer.store": {"imaging", "peer.core"},
    "peer.adapters": {"imaging", "pxe", "peer.core", "peer.store"},
    "peer.api": {"imaging", "pxe", "peer.core", "peer.store", "peer.adapters"},
}
OURS = ("imaging", "pxe", "peer")


def layer_of(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] in OURS}


SOURCES = [
    p for top in ("imaging", "pxe", "peer") for p in sorted((REPO / top).rglob("*.py"))
]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_follow_the_layers(path: Path) -> None:
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    layer = layer_of(module)
    if layer is None:
        return  # peer/daemon.py, peer/cli.py and friends wire everything together
    for imported in imports_of(path):
        target = layer_of(imported) or imported.split(".")[0]
        assert target == layer or target in ALLOWED[layer], (
            f"{module} imports {imported}: {layer} may import only "
            f"{sorted(ALLOWED[layer]) or 'nothing of ours'}"
        )
