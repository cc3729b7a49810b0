"""The recorded cluster state file: Kubernetes API objects as JSON, written by the sandbox.

The sandbox records every object it "creates" here, in exactly the shape the Kubernetes API
returns (apiVersion, kind, metadata with uid/resourceVersion/ownerReferences, spec, status),
so the controller's sandbox cluster source reads the same objects its Kubernetes source would
list. The file is replaced atomically on every change; `resourceVersion` only grows.

Layout of `<state_dir>/objects.json`:
    {"resourceVersion": "42", "items": [ {...Pod...}, {...Service...}, ... ]}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OBJECTS_FILE = "objects.json"


@dataclass
class ClusterObjects:
    resource_version: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.items if o.get("kind") == kind]


def objects_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / OBJECTS_FILE


def read_objects(state_dir: str | os.PathLike[str]) -> ClusterObjects:
    path = objects_path(state_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return ClusterObjects()
    return ClusterObjects(int(data.get("resourceVersion", "0")), list(data.get("items", [])))


def write_objects(state_dir: str | os.PathLike[str], objects: ClusterObjects) -> None:
    path = objects_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"resourceVersion": str(objects.resource_version), "items": objects.items}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".objects-")
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(tmp, path)
