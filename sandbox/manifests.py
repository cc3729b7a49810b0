"""Kubernetes YAML the sandbox runs: parsing and validation, with no side effects.

Every document of a file is validated before anything is created, so bad input leaves the
cluster untouched. Only the kinds the sandbox can run are accepted: Namespace, Deployment,
DaemonSet, Service (ClusterIP), ConfigMap, and — recorded — ServiceAccount, ClusterRole,
ClusterRoleBinding, Role and RoleBinding (RBAC is not enforced on the sandbox's own reads; its API
server answers SubjectAccessReviews from them: sandbox/rbac.py); anything else is an error naming
the document.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from nodemesh.sandbox.naming import is_dns_label, is_dns_subdomain

SUPPORTED = {("v1", "Namespace"), ("apps/v1", "Deployment"), ("v1", "Service"), ("apps/v1", "DaemonSet"),
             ("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("v1", "Secret"),
             ("rbac.authorization.k8s.io/v1", "ClusterRole"),
             ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
             ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")}
# Kinds without a namespace.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
# Kinds the sandbox only records (no controller acts on them; RBAC is not enforced).
RECORDED_ONLY = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Secret"}
WORKLOADS = {"Deployment", "DaemonSet"}
VOLUME_TYPES = ("emptyDir", "configMap", "projected", "hostPath")


class ManifestError(ValueError):
    """A manifest the sandbox refuses; the message is one line for the user."""


@dataclass
class Manifest:
    """One validated document."""

    kind: str
    name: str
    namespace: str  # "" for Namespace
    body: dict[str, Any] = field(repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


def load_file(path: str | Path) -> list[Manifest]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ManifestError(f"the path \"{path}\" does not exist") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    return load_text(text, source=str(path))


def load_text(text: str, source: str = "<input>") -> list[Manifest]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: invalid YAML: {_yaml_problem(exc)}") from None
    out: list[Manifest] = []
    for i, doc in enumerate(docs, 1):
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ManifestError(f"{source}: document {i}: List items must be a list")
        else:
            items = [doc]
        for item in items:
            out.append(validate(item, where=f"{source}: document {i}"))
    seen: set[tuple[str, str, str]] = set()
    for m in out:
        if m.key in seen:
            raise ManifestError(f"{source}: {m.kind} {_qual(m)} appears twice")
        seen.add(m.key)
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`line N: problem`, like kubectl says it (str(exc) starts with the context, e.g. "while parsing
    a flow node", and puts the problem and the line on later lines)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        return (f"line {mark.line + 1}: " if mark is not None else "") + exc.problem
    return str(exc).splitlines()[0]


def _qual(m: Manifest) -> str:
    return f"{m.namespace}/{m.name}" if m.namespace else m.name


def validate(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: not a mapping")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if not kind or not api:
        raise ManifestError(f"{where}: apiVersion and kind are required")
    if (api, kind) not in SUPPORTED:
        known = ", ".join(f"{k} ({a})" for a, k in sorted(SUPPORTED))
        raise ManifestError(f"{where}: unknown kind {kind!r} (apiVersion {api}); the sandbox runs {known}")
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ManifestError(f"{where}: metadata must be a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not is_dns_label(name):
        raise ManifestError(f"{where}: {kind} needs metadata.name, a DNS label (got {name!r})")
    _check_labels(meta.get("annotations"), f"{where}: {kind} {name}", "annotations")
    doc = copy.deepcopy(doc)
    if kind in CLUSTER_SCOPED:
        doc["metadata"].pop("namespace", None)
        _check_labels(doc["metadata"].get("labels"), f"{where}: {kind} {name}")
        return Manifest(kind, name, "", doc)
    namespace = meta.get("namespace") or "default"
    if not is_dns_label(namespace):
        raise ManifestError(f"{where}: invalid namespace {namespace!r}")
    doc["metadata"]["namespace"] = namespace
    label = f"{where}: {kind} {namespace}/{name}"
    _check_labels(meta.get("labels"), label)
    if kind == "Deployment":
        _validate_deployment(doc, label)
    elif kind == "DaemonSet":
        _validate_daemonset(doc, label)
    elif kind == "ConfigMap":
        _validate_configmap(doc, label)
    elif kind == "Service":
        _validate_service(doc, label)
    return Manifest(kind, name, namespace, doc)


def _check_labels(labels: Any, label: str, what: str = "labels") -> None:
    if labels is None:
        return
    if not isinstance(labels, dict) or not all(isinstance(k, str) for k in labels):
        raise ManifestError(f"{label}: {what} must be a map of strings")
    for k, v in labels.items():
        if not isinstance(v, str):
            raise ManifestError(f"{label}: {what[:-1]} {k} must be a string (quote it)")


def _validate_deployment(doc: dict[str, Any], label: str) -> None:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ManifestError(f"{label}: spec is required")
    replicas = spec.setdefault("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0 or replicas > 100:
        raise ManifestError(f"{label}: spec.replicas must be an integer 0..100")
    _validate_template(spec, label)


def _validate_daemonset(doc: dict[str, Any], label: str) -> None:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ManifestError(f"{label}: spec is required")
    _validate_template(spec, label)
    strategy = spec.setdefault("updateStrategy", {"type": "RollingUpdate"})
    if not isinstance(strategy, dict) or strategy.get("type", "RollingUpdate") not in ("RollingUpdate", "OnDelete"):
        raise ManifestError(f"{label}: updateStrategy.type must be RollingUpdate or OnDelete")
    rolling = strategy.get("rollingUpdate") or {}
    if not isinstance(rolling, dict):
        raise ManifestError(f"{label}: updateStrategy.rollingUpdate must be a mapping")
    for key in ("maxSurge", "maxUnavailable"):
        if key in rolling and not (isinstance(rolling[key], int) and not isinstance(rolling[key], bool)
                                   and rolling[key] >= 0):
            raise ManifestError(f"{label}: updateStrategy.rollingUpdate.{key} must be a number of pods "
                                "(the sandbox takes no percentages)")


def _validate_configmap(doc: dict[str, Any], label: str) -> None:
    data = doc.get("data") or {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ManifestError(f"{label}: data must be a map of strings")
    for key in data:
        if "/" in key or key in ("", ".", ".."):
            raise ManifestError(f"{label}: invalid data key {key!r}")


def _validate_template(spec: dict[str, Any], label: str) -> None:
    template = spec.get("template")
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        raise ManifestError(f"{label}: spec.template.spec is required")
    tmeta = template.get("metadata") or {}
    if not isinstance(tmeta, dict):
        raise ManifestError(f"{label}: spec.template.metadata must be a mapping")
    tlabels = tmeta.get("labels") or {}
    _check_labels(tlabels, label)
    _check_labels(tmeta.get("annotations"), label, "annotations")
    selector = spec.get("selector")
    selector = selector.get("matchLabels") if isinstance(selector, dict) else None
    if not isinstance(selector, dict) or not selector:
        raise ManifestError(f"{label}: spec.selector.matchLabels is required")
    if any(tlabels.get(k) != v for k, v in selector.items()):
        raise ManifestError(f"{label}: selector does not match template labels")
    pod_spec = template["spec"]
    if not isinstance(pod_spec.get("hostNetwork", False), bool):
        raise ManifestError(f"{label}: hostNetwork must be true or false")
    node_selector = pod_spec.get("nodeSelector")
    if node_selector is not None:
        _check_labels(node_selector, label, "nodeSelector entries")
    grace = pod_spec.get("terminationGracePeriodSeconds")
    if grace is not None and not (isinstance(grace, int) and not isinstance(grace, bool) and 0 <= grace <= 3600):
        raise ManifestError(f"{label}: terminationGracePeriodSeconds must be 0..3600")
    volumes = _validate_volumes(pod_spec.get("volumes"), label)
    containers = pod_spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise ManifestError(f"{label}: spec.template.spec.containers is required")
    init = pod_spec.get("initContainers") or []
    if not isinstance(init, list):
        raise ManifestError(f"{label}: initContainers must be a list")
    ports_seen: dict[int, str] = {}
    names: set[str] = set()
    for c in [*init, *containers]:
        if not isinstance(c, dict) or not is_dns_label(str(c.get("name", ""))):
            raise ManifestError(f"{label}: every container needs a name")
        cname = c["name"]
        if cname in names:
            raise ManifestError(f"{label}: container name {cname} appears twice")
        names.add(cname)
        if not all(isinstance(c.get(k) or [], list) for k in ("command", "args")):
            raise ManifestError(f"{label}: container {cname}: command and args must be lists")
        command = list(c.get("command") or []) + list(c.get("args") or [])
        if not command:
            raise ManifestError(
                f"{label}: container {cname} has no command; the sandbox runs processes, not images"
            )
        if not all(isinstance(a, (str, int, float)) for a in command):
            raise ManifestError(f"{label}: container {cname}: command and args must be strings")
        for p in c.get("ports") or []:
            port = p.get("containerPort") if isinstance(p, dict) else None
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise ManifestError(f"{label}: container {cname}: containerPort must be 1..65535")
            if port in ports_seen:
                raise ManifestError(
                    f"{label}: port clash: containerPort {port} is used by {ports_seen[port]} and {cname}"
                )
            ports_seen[port] = cname
        for e in c.get("env") or []:
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise ManifestError(f"{label}: container {cname}: every env entry needs a name")
            if "valueFrom" in e:
                path = ((e["valueFrom"] or {}).get("fieldRef") or {}).get("fieldPath")
                if path not in FIELD_REFS:
                    raise ManifestError(
                        f"{label}: container {cname}: env {e['name']}: only fieldRef "
                        f"{', '.join(sorted(FIELD_REFS))} is supported"
                    )
        for mount in c.get("volumeMounts") or []:
            if not isinstance(mount, dict) or mount.get("name") not in volumes:
                raise ManifestError(f"{label}: container {cname}: volumeMount names no volume of the pod")
            path = mount.get("mountPath")
            if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
                raise ManifestError(f"{label}: container {cname}: mountPath must be an absolute path")
        probe = c.get("readinessProbe")
        if probe is not None:
            if c in init:
                raise ManifestError(f"{label}: init container {cname} cannot have a readinessProbe")
            _validate_probe(probe, c, f"{label}: container {cname}")


def _validate_volumes(volumes: Any, label: str) -> set[str]:
    if volumes is None:
        return set()
    if not isinstance(volumes, list):
        raise ManifestError(f"{label}: volumes must be a list")
    names: set[str] = set()
    for v in volumes:
        if not isinstance(v, dict) or not is_dns_label(str(v.get("name", ""))):
            raise ManifestError(f"{label}: every volume needs a name")
        kinds = [k for k in VOLUME_TYPES if k in v]
        if len(kinds) != 1:
            raise ManifestError(f"{label}: volume {v['name']}: exactly one of {', '.join(VOLUME_TYPES)} "
                                "(the sandbox supports these)")
        if kinds[0] == "projected":
            for source in (v["projected"] or {}).get("sources") or []:
                token = source.get("serviceAccountToken") if isinstance(source, dict) else None
                if not isinstance(token, dict) or not isinstance(token.get("path"), str):
                    raise ManifestError(f"{label}: volume {v['name']}: only serviceAccountToken projections "
                                        "with a path are supported")
        if kinds[0] == "hostPath" and not str((v["hostPath"] or {}).get("path", "")).startswith("/"):
            raise ManifestError(f"{label}: volume {v['name']}: hostPath.path must be absolute")
        if kinds[0] == "configMap" and not isinstance((v["configMap"] or {}).get("name"), str):
            raise ManifestError(f"{label}: volume {v['name']}: configMap.name is required")
        if v["name"] in names:
            raise ManifestError(f"{label}: volume {v['name']} appears twice")
        names.add(v["name"])
    return names


FIELD_REFS = {"metadata.name", "metadata.namespace", "status.podIP", "spec.nodeName", "metadata.uid",
              "status.hostIP", "spec.serviceAccountName"}


def _validate_probe(probe: Any, container: dict[str, Any], label: str) -> None:
    if not isinstance(probe, dict):
        raise ManifestError(f"{label}: readinessProbe must be a mapping")
    if "exec" in probe:
        command = (probe["exec"] or {}).get("command") if isinstance(probe["exec"], dict) else None
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise ManifestError(f"{label}: readinessProbe exec needs a command (a list of strings)")
        return
    handler = probe.get("tcpSocket") or probe.get("httpGet")
    if not isinstance(handler, dict):
        raise ManifestError(f"{label}: readinessProbe needs exec, tcpSocket or httpGet")
    if resolve_container_port(container, handler.get("port")) is None:
        raise ManifestError(f"{label}: readinessProbe port {handler.get('port')!r} is not a port of it")


def resolve_container_port(container: dict[str, Any], port: Any) -> int | None:
    if isinstance(port, int):
        return port if 1 <= port <= 65535 else None
    if isinstance(port, str):
        if port.isdigit():
            return resolve_container_port(container, int(port))
        for p in container.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
    return None


def _validate_service(doc: dict[str, Any], label: str) -> None:
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ManifestError(f"{label}: spec is required")
    stype = spec.setdefault("type", "ClusterIP")
    if stype != "ClusterIP":
        raise ManifestError(f"{label}: only type ClusterIP is supported (got {stype})")
    if not isinstance(spec.get("clusterIP") or "", str):
        raise ManifestError(f"{label}: clusterIP must be an address")
    if spec.get("clusterIP") == "None":
        raise ManifestError(f"{label}: headless services are not supported")
    selector = spec.get("selector")
    if selector is not None:
        _check_labels(selector, label)
    ports = spec.get("ports")
    if not isinstance(ports, list) or not ports:
        raise ManifestError(f"{label}: spec.ports is required")
    seen_ports: set[tuple[int, str]] = set()
    seen_names: set[str] = set()
    for p in ports:
        if not isinstance(p, dict) or not isinstance(p.get("port"), int) or not 1 <= p["port"] <= 65535:
            raise ManifestError(f"{label}: every port needs a port number 1..65535")
        proto = p.setdefault("protocol", "TCP")
        if proto != "TCP":
            raise ManifestError(f"{label}: only TCP ports are supported (got {proto})")
        if (p["port"], proto) in seen_ports:
            raise ManifestError(f"{label}: port clash: port {p['port']}/{proto} is listed twice")
        seen_ports.add((p["port"], proto))
    for p in ports:
        pname = p.get("name", "")
        if not isinstance(pname, str) or (pname and not is_dns_label(pname)):
            raise ManifestError(f"{label}: invalid port name {pname!r}")
        if len(ports) > 1 and not pname:
            raise ManifestError(f"{label}: ports must be named when there is more than one")
        if pname in seen_names:
            raise ManifestError(f"{label}: port name {pname} appears twice")
        seen_names.add(pname)
        target = p.setdefault("targetPort", p["port"])
        if not (isinstance(target, str) or (isinstance(target, int) and not isinstance(target, bool)
                                             and 1 <= target <= 65535)) or \
                isinstance(target, str) and not (target.isdigit() or is_dns_label(target)):
            raise ManifestError(f"{label}: invalid targetPort {target!r}")
    if not is_dns_subdomain(doc["metadata"]["name"]):
        raise ManifestError(f"{label}: invalid name")
