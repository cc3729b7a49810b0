"""Which Kubernetes cluster the CLI talks to, by kubectl's rules (no API call, no client import).

- The kubeconfig: `--kubeconfig FILE` (that one file, which must exist); else `$KUBECONFIG`, a list
  of files separated by `:` (files that do not exist, and empty ones, are skipped; `~/.kube/config`
  is then not read unless listed); else `~/.kube/config`.
- Merging, as kubectl does: the first file to set a value wins — `current-context`, and each
  context, cluster and user by name. (The kubernetes Python client lets the *last* file's
  `current-context` win; we pass it the context by name, so its loader cannot pick another.)
- The context: `--context NAME`, which must exist; else `current-context`, which must name one.

`current_context()` returns None when there is no context at all: no kubeconfig file, or files
without a current-context and no `--context`. Anything a user must fix (a missing file named by
`--kubeconfig`, invalid YAML, a context or cluster named but not defined) raises KubeConfigError
with one line that says what and where.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class KubeConfigError(ValueError):
    """The kubeconfig cannot name a cluster as asked; the message is one line for the user."""


@dataclass(frozen=True)
class KubeContext:
    """One kubeconfig context, resolved: what the CLI port-forwards through."""

    name: str
    cluster: str
    server: str
    namespace: str
    files: tuple[str, ...]          # the kubeconfig files merged, in kubectl's order

    @property
    def config_file(self) -> str:
        """The files as one KUBECONFIG-style list (what the kubernetes client's loader takes)."""
        return os.pathsep.join(self.files)


def kubeconfig_files(flag: str | None, env: Mapping[str, str]) -> tuple[list[Path], str]:
    """(the files to merge, how they were chosen — for messages)."""
    if flag:
        path = Path(flag).expanduser()
        if not path.is_file():
            raise KubeConfigError(f"--kubeconfig {flag}: no such file")
        return [path], f"--kubeconfig {flag}"
    listed = env.get("KUBECONFIG", "")
    if listed:
        paths = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
        return [p for p in paths if p.is_file()], f"KUBECONFIG={listed}"
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    default = home / ".kube" / "config"
    return ([default] if default.is_file() else []), str(default)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise KubeConfigError(f"kubeconfig {path} is not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KubeConfigError(f"kubeconfig {path} is not a kubeconfig (a mapping at the top)")
    return data


def merge(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """kubectl's merge: the first file to set current-context, or a named entry, wins."""
    merged: dict[str, Any] = {"current-context": "", "contexts": {}, "clusters": {}, "users": {}}
    for config in configs:
        if not merged["current-context"] and config.get("current-context"):
            merged["current-context"] = str(config["current-context"])
        for kind in ("contexts", "clusters", "users"):
            for entry in config.get(kind) or []:
                if isinstance(entry, dict) and entry.get("name") and entry["name"] not in merged[kind]:
                    merged[kind][str(entry["name"])] = entry.get(kind[:-1]) or {}
    return merged


def current_context(flag_kubeconfig: str | None, flag_context: str | None,
                    env: Mapping[str, str]) -> KubeContext | None:
    files, chosen_by = kubeconfig_files(flag_kubeconfig, env)
    loaded = [(p, _load(p)) for p in files]
    files = [p for p, data in loaded if data]       # kubectl skips empty files; so must the client
    merged = merge([data for _, data in loaded])
    name = flag_context or merged["current-context"]
    where = f"kubeconfig {chosen_by}" if files else f"kubeconfig ({chosen_by}: no file)"
    if not name:
        return None
    context = merged["contexts"].get(name)
    if context is None:
        known = ", ".join(sorted(merged["contexts"])) or "none"
        what = f"context {name!r}" if flag_context else f"current-context {name!r}"
        raise KubeConfigError(f"{what} is not defined in {where} (contexts: {known})")
    cluster_name = str(context.get("cluster") or "")
    cluster = merged["clusters"].get(cluster_name)
    if cluster is None:
        raise KubeConfigError(f"context {name!r} names cluster {cluster_name!r}, which {where} does not define")
    return KubeContext(name=name, cluster=cluster_name, server=str(cluster.get("server") or ""),
                       namespace=str(context.get("namespace") or "default"),
                       files=tuple(str(p) for p in files))
