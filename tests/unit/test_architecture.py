"""The package stays easy to read: small modules and classes, faces on public names only.

The layering itself (core without Django or nats-py, only the broker adapter importing
nats-py, faces kept off the broker and SQL layers) is checked by import-linter in `make lint`;
see docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "jetstream_bridge"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
# The faces: what users click, call over HTTP, run from a shell or use in their tests.
FACES = ("admin", "views.py", "urls.py", "management", "testing", "contrib")


def _modules(*parts: str) -> Iterator[Path]:
    roots = [PACKAGE / part for part in parts] if parts else [PACKAGE]
    for root in roots:
        if root.suffix == ".py":
            yield root
        else:
            yield from (p for p in sorted(root.rglob("*.py")) if "migrations" not in p.parts)


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_architecture__no_module_over_500_lines() -> None:
    long = {
        _name(path): n
        for path in _modules()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_architecture__no_class_over_300_lines() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    long[f"{_name(path)}:{node.name}"] = size
    assert long == {}


def _bridge_module(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").startswith("jetstream_bridge")


def _private_uses(tree: ast.Module) -> Iterator[str]:
    """Yield each private name a module takes from the bridge (import or attribute)."""
    modules: set[str] = set()  # local names bound to bridge modules (`from .. import health`)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _bridge_module(node):
            for alias in node.names:
                local = alias.asname or alias.name
                if alias.name.startswith("_"):
                    yield f"from {node.module or '.'} import {alias.name}"
                modules.add(local)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield f"{node.value.id}.{node.attr}"


@pytest.mark.parametrize("path", list(_modules(*FACES)), ids=_name)
def test_architecture__faces_use_only_public_names(path: Path) -> None:
    assert list(_private_uses(ast.parse(path.read_text()))) == []


def test_architecture__the_private_name_check_sees_both_forms() -> None:
    source = "from ..publisher import _sender\nfrom .. import health\nhealth._probe()\n"
    assert list(_private_uses(ast.parse(source))) == [
        "from publisher import _sender",
        "health._probe",
    ]
