"""On-disk state of sandboxes: the cluster-index registry, each cluster's infra record, and
locked read-modify-write transactions on the recorded Kubernetes objects.

Layout under the state root (default /run/nodemesh/sandbox):
    registry.json           {"clusters": {"nodemesh": 0, "t3f9": 1}}   (flock: .registry.lock)
    <cluster>/sandbox.json  infra: index, cni, nodes, node processes, back-off
    <cluster>/objects.json  Kubernetes objects (nodemesh.api.clusterstate)
    <cluster>/runtime.json  pids the kubelet runs (for teardown after a crash)
    <cluster>/kubelet.pid, kubelet.log, logs/, pods/
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nodemesh.api import clusterstate
from nodemesh.sandbox import naming
from nodemesh.sandbox.addressing import MAX_INDEX

DEFAULT_STATE_ROOT = Path("/run/nodemesh/sandbox")


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


# ------------------------------------------------------------------------------------ registry
def allocate_index(root: Path, cluster: str) -> int:
    """The cluster's index: existing if registered, else the lowest free (0 is `nodemesh`'s)."""
    with flocked(root / ".registry.lock"):
        reg = read_json(root / "registry.json", {"clusters": {}})
        clusters: dict[str, int] = reg["clusters"]
        if cluster in clusters:
            return clusters[cluster]
        # forget clusters whose state is gone (torn down by hand, or a wiped /run)
        for other in list(clusters):
            if not (root / other / "sandbox.json").exists() and not (root / other).exists():
                del clusters[other]
        used = set(clusters.values())
        if cluster == naming.DEFAULT_CLUSTER:
            if 0 in used:
                raise RuntimeError("cluster index 0 is taken")
            index = 0
        else:
            free = [i for i in range(1, MAX_INDEX + 1) if i not in used]
            if not free:
                raise RuntimeError(f"too many sandboxes (max {MAX_INDEX})")
            index = free[0]
        clusters[cluster] = index
        (root / cluster).mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "registry.json", reg)
        return index


def lookup_index(root: Path, cluster: str) -> int | None:
    reg = read_json(root / "registry.json", {"clusters": {}})
    return reg["clusters"].get(cluster)


def release_index(root: Path, cluster: str) -> None:
    with flocked(root / ".registry.lock"):
        reg = read_json(root / "registry.json", {"clusters": {}})
        if reg["clusters"].pop(cluster, None) is not None:
            write_json_atomic(root / "registry.json", reg)


# ------------------------------------------------------------------------------------ objects
def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_rv(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}


class Objects:
    """The recorded objects inside a transaction; every change bumps resourceVersion."""

    def __init__(self, data: clusterstate.ClusterObjects) -> None:
        self.data = data
        self.changed = False

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        for o in self.data.items:
            m = o["metadata"]
            if o["kind"] == kind and m["name"] == name and m.get("namespace", "") == namespace:
                return o
        return None

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            o for o in self.data.items
            if o["kind"] == kind and (namespace is None or o["metadata"].get("namespace", "") == namespace)
        ]

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace (matched by kind/namespace/name); unchanged objects are left alone."""
        meta = obj["metadata"]
        old = self.get(obj["kind"], meta.get("namespace", ""), meta["name"])
        if old is not None:
            meta.setdefault("uid", old["metadata"]["uid"])
            meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"])
            if _strip_rv(old) == _strip_rv(obj):
                return old
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", now_rfc3339())
        self.data.resource_version += 1
        meta["resourceVersion"] = str(self.data.resource_version)
        if old is not None:
            self.data.items[self.data.items.index(old)] = obj
        else:
            self.data.items.append(obj)
        self.changed = True
        return obj

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        old = self.get(kind, namespace, name)
        if old is not None:
            self.data.items.remove(old)
            self.data.resource_version += 1
            self.changed = True
        return old


class ClusterState:
    """Files of one cluster's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir

    @property
    def sandbox_file(self) -> Path:
        return self.dir / "sandbox.json"

    @property
    def runtime_file(self) -> Path:
        return self.dir / "runtime.json"

    @property
    def kubelet_pid_file(self) -> Path:
        return self.dir / "kubelet.pid"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def exists(self) -> bool:
        return self.sandbox_file.exists()

    def infra(self) -> dict[str, Any]:
        return read_json(self.sandbox_file, {})

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with flocked(self.dir / ".lock"):
            yield

    @contextlib.contextmanager
    def infra_txn(self) -> Iterator[dict[str, Any]]:
        with self.locked():
            data = self.infra()
            yield data
            write_json_atomic(self.sandbox_file, data)

    @contextlib.contextmanager
    def objects_txn(self) -> Iterator[Objects]:
        with self.locked():
            objs = Objects(clusterstate.read_objects(self.dir))
            yield objs
            if objs.changed:
                clusterstate.write_objects(self.dir, objs.data)

    def objects(self) -> clusterstate.ClusterObjects:
        return clusterstate.read_objects(self.dir)

    def pod_log(self, namespace: str, pod: str, container: str) -> Path:
        return self.logs_dir / f"{namespace}_{pod}_{container}.log"

    def node_process_log(self, node: str, name: str) -> Path:
        return self.logs_dir / f"node_{node}_{name}.log"

    def pod_workdir(self, namespace: str, pod: str) -> Path:
        return self.dir / "pods" / f"{namespace}_{pod}"
