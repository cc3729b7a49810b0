"""What the kubelet makes of a container spec before running it: pure functions, unit-tested.

- `$(VAR)` in command, args and env values is expanded from the container's environment, as the
  kubelet does (`$$(VAR)` stays a literal `$(VAR)`; an undefined variable stays as written).
- Volumes: the sandbox has no mount namespaces of its own, so each volume is a directory of the pod
  (`<pod dir>/volumes/<name>`; a hostPath volume is the host path itself), and a container sees it
  at its `mountPath` by rewriting that path where it appears in the container's command, args and
  env values (`/run/nodemesh/pod-cidrs` -> `<pod dir>/volumes/run/pod-cidrs`). Code that opens a
  fixed path it was not given on the command line does not see the volume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion."""
    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return _VAR.sub(repl, text)


@dataclass(frozen=True)
class Volume:
    name: str
    kind: str                 # emptyDir, configMap, projected, hostPath
    spec: dict[str, Any]
    host_path: Path           # where it lives on this machine


def pod_volumes(pod: dict[str, Any], pod_dir: Path, node_paths: dict[str, Path] | None = None) -> dict[str, Volume]:
    """`node_paths`: hostPath paths that are the node's own in the sandbox (a node's bpffs and pod
    cgroups, sandbox/cgroups.py), not this machine's."""
    out: dict[str, Volume] = {}
    for v in pod["spec"].get("volumes") or []:
        kind = next(k for k in ("emptyDir", "configMap", "projected", "hostPath") if k in v)
        spec = v[kind] or {}
        if kind == "hostPath":
            host = (node_paths or {}).get(spec["path"].rstrip("/")) or Path(spec["path"])
        else:
            host = pod_dir / "volumes" / v["name"]
        out[v["name"]] = Volume(v["name"], kind, spec, host)
    return out


def mount_map(container: dict[str, Any], volumes: dict[str, Volume]) -> list[tuple[str, str]]:
    """(mountPath, host path) of each mount, longest mountPath first (so /a/b wins over /a)."""
    pairs = []
    for mount in container.get("volumeMounts") or []:
        vol = volumes[mount["name"]]
        host = vol.host_path / mount["subPath"] if mount.get("subPath") else vol.host_path
        pairs.append((mount["mountPath"].rstrip("/"), str(host)))
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


def map_paths(text: str, mounts: list[tuple[str, str]]) -> str:
    """Rewrite every mountPath that starts a path in `text` to its host path, in one pass (a
    host path may itself start with another mountPath: /run/nodemesh/sandbox/...)."""
    if not mounts:
        return text
    hosts = dict(mounts)
    alternatives = "|".join(re.escape(m) for m, _ in mounts)  # longest first: /a/b before /a
    pattern = re.compile(r"(?<![\w.~/-])(" + alternatives + r")(?=$|[/\s\"'`):;,=])")
    return pattern.sub(lambda m: hosts[m.group(1)], text)


def container_argv(container: dict[str, Any], env: dict[str, str], mounts: list[tuple[str, str]]) -> list[str]:
    argv = [str(a) for a in list(container.get("command") or []) + list(container.get("args") or [])]
    return [map_paths(expand_vars(a, env), mounts) for a in argv]


def kubeconfig(server: str, token: str, namespace: str) -> str:
    """A kubeconfig for a pod: the sandbox's stand-in for the in-cluster configuration."""
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: sandbox\n  cluster:\n    server: {server}\n"
        f"users:\n- name: pod\n  user:\n    token: {token}\n"
        f"contexts:\n- name: sandbox\n  context:\n    cluster: sandbox\n    user: pod\n    namespace: {namespace}\n"
        "current-context: sandbox\n"
    )
