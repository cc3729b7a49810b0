"""The rooms' import floors (docs/architecture.md, "Package layout"): api at the ground, no import
running back up. Read from the source with `ast`, so a new upward import fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# room -> the other rooms it may import (the design brief's table; manifests/ is the installer).
MAY_IMPORT: dict[str, set[str]] = {
    "api": set(),
    "redirector": {"api"},
    "agent": {"api", "redirector"},
    "controlplane": {"api"},
    "sandbox": {"api"},
    "manifests": {"api", "redirector", "sandbox"},
    "cli": {"api", "manifests", "sandbox"},
    "demo": set(),
}


def _rooms_imported(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "nodemesh" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_rooms_import_only_the_floors_below_them() -> None:
    wrong = []
    for room, allowed in MAY_IMPORT.items():
        for source in sorted((REPO / room).rglob("*.py")):
            for other in _rooms_imported(source) - allowed - {room}:
                if other in MAY_IMPORT:
                    wrong.append(f"{source.relative_to(REPO)} imports nodemesh.{other}")
    assert not wrong, "\n".join(wrong)


def test_the_floor_check_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("from nodemesh.cli.client import connect\nimport nodemesh.api.model\nfrom . import y\n")
    assert _rooms_imported(source) == {"cli", "api"}


def test_every_room_has_a_floor() -> None:
    rooms = {p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name not in {".pkgroot"}}
    assert rooms - {"tests"} == set(MAY_IMPORT)
