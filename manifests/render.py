"""Rendering of the Kubernetes manifests that `nodemesh install` prints.

Everything `kubectl apply -f manifests/daemonset.yaml` installs is built here from Python data and
dumped with `yaml.safe_dump`, so the committed files under `manifests/` are golden outputs of this
module (a unit test compares them byte for byte; `NODEMESH_REGEN_MANIFESTS=1` rewrites them).
Rendering is pure and deterministic: same values in, same bytes out.

Values a user can override with `nodemesh install --set key=value` are the fields of
`InstallValues`; the mesh configuration part of them is written into the `nodemesh-config`
ConfigMap (mounted in every container, a record of the settings) and passed to the processes as
flags, which is what they read.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import yaml
from nodemesh.api.model import (
    ADMIN_PORT,
    CAPTURE_DISABLED,
    CAPTURE_LABEL,
    CONTROLLER_GRPC_PORT,
    CONTROLLER_WEB_PORT,
)

VERSION = "0.1.0"

# The audience of the projected ServiceAccount token agents present to the controller. A token
# minted for the API server is never accepted by the controller and vice versa.
CONTROLLER_AUDIENCE = "nodemesh-controller"
CONFIG_MAP = "nodemesh-config"
CONFIG_KEY = "config.yaml"
CONFIG_DIR = "/etc/nodemesh"
TOKEN_DIR = "/var/run/secrets/nodemesh"
CONTROLLER_NAME = "nodemesh-controller"
AGENT_NAME = "nodemesh-agent"
CLI_NAME = "nodemesh-cli"
TAP_ROLE = "nodemesh-tap"
TAP_API_GROUP = "tap.nodemesh.io"  # controlplane/auth.py TAP_GROUP (the installer may not import controlplane/)
# Margin on top of the agent's drain grace for the redirector to fail open and the process to exit.
TERMINATION_MARGIN_S = 15
# The redirector keeps the return path this much longer than the agent's drain (inside the margin above).
REDIRECTOR_WAIT_MARGIN_S = 5

# The agent's defaults (agent/config.py DEFAULT_OPAQUE_PORTS; the installer may not import agent/, a test
# keeps the two equal): server-speaks-first protocols that protocol detection would stall on.
DEFAULT_OPAQUE_PORTS: tuple[int, ...] = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ManifestError(ValueError):
    """A value given to the renderer (e.g. with --set) is not acceptable."""


@dataclass(frozen=True)
class InstallValues:
    """Everything `--set` can change. Field names are the `--set` keys (camelCase, as Helm users type)."""

    namespace: str = "nodemesh"
    image: str = f"ghcr.io/nodemesh/nodemesh:{VERSION}"
    imagePullPolicy: str = "IfNotPresent"
    agentWorkers: int = 2
    logLevel: str = "info"
    # mesh configuration (ConfigMap `nodemesh-config`)
    capturedNamespaces: tuple[str, ...] = ()            # empty: every namespace not excluded
    excludedNamespaces: tuple[str, ...] = ("kube-system", "kube-public", "kube-node-lease")
    skippedPorts: tuple[int, ...] = ()                  # destination ports never captured
    opaquePorts: tuple[int, ...] = field(default=DEFAULT_OPAQUE_PORTS)
    tapMaxRps: float = 100.0
    tapMaxTaps: int = 10                                # concurrent taps per agent
    # Tap redaction (agents do it; Authorization, Proxy-Authorization, Cookie, Set-Cookie always).
    tapRedactHeaders: tuple[str, ...] = ()              # more headers redacted
    tapShowHeaders: tuple[str, ...] = ()                # allow list: only these headers shown
    tapRedactQuery: bool = False                        # redact query-string values
    drainGraceSeconds: int = 30
    podCidrs: tuple[str, ...] = ()                      # empty: each node's spec.podCIDRs
    # Outbound capture: iptables, or ebpf (cgroup/connect4 via bcc; redirector/ebpf.py). ebpf adds
    # the mounts and capabilities the programs need (_ebpf_*), and falls back to iptables by itself
    # on a node that cannot run them.
    capture: str = "iptables"
    # sockmap: the redirector also loads redirector/sockmap.py (opt-in, docs/bench.md); needs the
    # redirector's eBPF mounts and capabilities whatever the capture.
    accelerate: str = "none"
    # stat/edges/routes from Prometheus (controlplane/promstore.py): the controller's --prometheus-url
    # (e.g. http://nodemesh-prometheus.nodemesh.svc:9090 with `--addon prometheus`) and default backend.
    prometheusUrl: str = ""
    statBackend: str = "memory"
    # false: the controller keeps no metrics of its own (--no-ingest), Prometheus answers all
    # (needs statBackend=prometheus): a cluster past one controller's ingest (docs/scale.md).
    ingest: bool = True
    # Node-to-node mTLS (issue 13; docs/architecture.md): the controller is the workload CA (its
    # root in the Secret WORKLOAD_CA_SECRET, made on first start), agents keep their pods' keys in
    # a memory emptyDir and tunnel cross-node pod traffic. Namespaces listed take no plaintext.
    mtls: bool = False
    mtlsRequiredNamespaces: tuple[str, ...] = ()
    # TLS on the controller's gRPC (8085) and web (8084) ports (issue 13 item 4): the controller
    # keeps its CA in the Secret CONTROLLER_TLS_SECRET and publishes the CA certificate in the
    # ConfigMap CONTROLLER_CA_CONFIGMAP, which agents (and Prometheus, the CLI) verify it with.
    controllerTls: bool = True

    def mesh_config(self) -> dict[str, Any]:
        """The document the processes read with `--config` (the ConfigMap's config.yaml)."""
        excluded = list(self.excludedNamespaces)
        # The mesh never captures itself: the controller's traffic and the agents' must not loop.
        if self.namespace not in excluded:
            excluded.append(self.namespace)
        return {
            "capturedNamespaces": list(self.capturedNamespaces),
            "excludedNamespaces": excluded,
            "skippedPorts": list(self.skippedPorts),
            "opaquePorts": list(self.opaquePorts),
            "tapMaxRps": self.tapMaxRps,
            "tapMaxTaps": self.tapMaxTaps,
            "tapRedactHeaders": list(self.tapRedactHeaders),
            "tapShowHeaders": list(self.tapShowHeaders),
            "tapRedactQuery": self.tapRedactQuery,
            "drainGraceSeconds": self.drainGraceSeconds,
            "logLevel": self.logLevel,
        }


# ---------------------------------------------------------------------------- --set parsing

def _parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ManifestError(f"{key}: expected true or false, got {text!r}")


def _parse_int(key: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ManifestError(f"{key}: expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ManifestError(f"{key}: {value} is out of range {low}..{high}")
    return value


def _parse_list(text: str) -> list[str]:
    # `--set opaquePorts=` (empty) means an empty list; `[a,b]` is accepted as Helm writes it.
    text = text.strip().removeprefix("[").removesuffix("]")
    return [item.strip() for item in text.split(",") if item.strip()]


def _check_namespace(key: str, name: str) -> str:
    if not _DNS_LABEL.match(name):
        raise ManifestError(f"{key}: {name!r} is not a valid namespace name (RFC 1123 label)")
    return name


def _check_cidr(key: str, text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError as exc:
        raise ManifestError(f"{key}: {exc}") from None


def _convert(key: str, text: str) -> Any:
    if key in ("namespace",):
        return _check_namespace(key, text.strip())
    if key == "image":
        if not text.strip() or any(c.isspace() for c in text.strip()):
            raise ManifestError("image: expected an image reference like registry/nodemesh:0.1.0")
        return text.strip()
    if key == "imagePullPolicy":
        if text not in ("Always", "IfNotPresent", "Never"):
            raise ManifestError("imagePullPolicy: expected Always, IfNotPresent or Never")
        return text
    if key == "agentWorkers":
        return _parse_int(key, text, 1, 256)
    if key == "logLevel":
        if text not in ("debug", "info", "warning", "error"):
            raise ManifestError("logLevel: expected debug, info, warning or error")
        return text
    if key in ("capturedNamespaces", "excludedNamespaces"):
        return tuple(_check_namespace(key, n) for n in _parse_list(text))
    if key in ("skippedPorts", "opaquePorts"):
        return tuple(sorted({_parse_int(key, p, 1, 65535) for p in _parse_list(text)}))
    if key == "tapMaxRps":
        try:
            rps = float(text)
        except ValueError:
            raise ManifestError(f"tapMaxRps: expected a number, got {text!r}") from None
        if not 0 < rps <= 100_000:
            raise ManifestError("tapMaxRps: expected a number in (0, 100000]")
        return rps
    if key == "tapMaxTaps":
        return _parse_int(key, text, 1, 1000)
    if key in ("tapRedactHeaders", "tapShowHeaders"):
        names = tuple(h.lower() for h in _parse_list(text))
        bad = [h for h in names if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", h)]
        if bad:
            raise ManifestError(f"{key}: {bad[0]!r} is not a header name")
        return names
    if key in ("tapRedactQuery", "mtls", "controllerTls", "ingest"):
        return _parse_bool(key, text)
    if key == "mtlsRequiredNamespaces":
        return tuple(_check_namespace(key, n) for n in _parse_list(text))
    if key == "podCidrs":
        return tuple(_check_cidr(key, c) for c in _parse_list(text))
    if key == "drainGraceSeconds":
        return _parse_int(key, text, 0, 3600)
    if key == "accelerate":
        if text not in ("none", "sockmap"):
            raise ManifestError("accelerate: expected none or sockmap")
        return text
    if key == "capture":
        if text not in ("iptables", "ebpf"):
            raise ManifestError("capture: expected iptables or ebpf")
        return text
    if key == "prometheusUrl":
        url = text.strip()
        if url and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ManifestError(f"prometheusUrl: expected http(s)://host:port, got {text!r}")
        return url
    if key == "statBackend":
        if text not in ("memory", "prometheus"):
            raise ManifestError("statBackend: expected memory or prometheus")
        return text
    raise AssertionError(key)


SETTABLE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(InstallValues))


def apply_sets(values: InstallValues, assignments: list[str] | tuple[str, ...]) -> InstallValues:
    """Apply `key=value` strings (later ones win) and return new values; ManifestError on a bad one."""
    changes: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise ManifestError(f"--set {assignment!r}: expected key=value")
        if key not in SETTABLE_KEYS:
            raise ManifestError(f"--set {key}: unknown key (known: {', '.join(SETTABLE_KEYS)})")
        changes[key] = _convert(key, text)
    result = replace(values, **changes)
    if result.statBackend == "prometheus" and not result.prometheusUrl:
        raise ManifestError("statBackend=prometheus needs prometheusUrl")
    if not result.ingest and result.statBackend != "prometheus":
        raise ManifestError("ingest=false needs statBackend=prometheus (the controller then keeps no metrics)")
    return result


# ---------------------------------------------------------------------------- YAML dumping

class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (embedded config, dashboards) as `|` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        # Shared Python lists must not become &id001 anchors: kubectl users read these files.
        return True


def _str_representer(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_representer)


def dump_documents(docs: list[dict[str, Any]], header: str) -> str:
    body = "---\n".join(
        yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)
        for doc in docs
    )
    return header + "---\n" + body


def header(what: str, command: str, source: str = "manifests/render.py") -> str:
    """The two comment lines on top of every rendered file: what it is, and how to make it again."""
    return (
        f"# nodemesh {VERSION}: {what}\n"
        f"# Generated by `{command}` ({source}); do not edit by hand.\n"
    )


# ---------------------------------------------------------------------------- objects

def labels(component: str) -> dict[str, str]:
    return {
        # `app` is what `nodemesh` (cli/client.py) selects the controller pod by.
        "app": f"nodemesh-{component}",
        "app.kubernetes.io/name": f"nodemesh-{component}",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "nodemesh",
        "app.kubernetes.io/version": VERSION,
    }


def selector_labels(component: str) -> dict[str, str]:
    # Selectors are immutable on Deployments/DaemonSets: never put the version in them.
    return {"app.kubernetes.io/name": f"nodemesh-{component}", "app.kubernetes.io/component": component}


def meta(name: str, namespace: str | None, component: str) -> dict[str, Any]:
    """An object's metadata: its name, namespace (None for cluster-wide objects) and our labels."""
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = labels(component)
    return meta


def _namespace(v: InstallValues) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": v.namespace,
            "labels": {
                "app.kubernetes.io/part-of": "nodemesh",
                # The mesh never captures its own namespace (api/model.py CAPTURE_LABEL).
                CAPTURE_LABEL: CAPTURE_DISABLED,
                # hostNetwork + NET_ADMIN is outside the baseline Pod Security Standard.
                "pod-security.kubernetes.io/enforce": "privileged",
            },
        },
    }


def _service_account(name: str, v: InstallValues, component: str, automount: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(name, v.namespace, component),
        "automountServiceAccountToken": automount,
    }


def _controller_rbac(v: InstallValues) -> list[dict[str, Any]]:
    read = ["get", "list", "watch"]
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": meta(CONTROLLER_NAME, None, "controller"),
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "services", "namespaces", "nodes"], "verbs": read},
            {
                "apiGroups": ["apps"],
                "resources": ["replicasets", "deployments", "statefulsets", "daemonsets"],
                "verbs": read,
            },
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": read},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
            # Gateway API routes name routes for `nodemesh routes` (controlplane/routeconfig.py).
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": read},
            # Checking the tokens agents and the CLI present (TokenReview), nothing else.
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            # Asking whether a caller may tap what it asks to (verb watch on tap.nodemesh.io).
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
        ],
    }
    return [role, _binding(CONTROLLER_NAME, v, "controller")]


def _tap_rbac(v: InstallValues) -> list[dict[str, Any]]:
    # Tap shows what pods send: it is its own permission, `watch` on tap.nodemesh.io/<type>s in the
    # tapped namespace (the controller asks with a SubjectAccessReview). This ClusterRole grants it
    # everywhere and is bound to the CLI's ServiceAccount; bind it with a RoleBinding to grant one
    # namespace's tap, or unbind it to make the CLI stats-only.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": meta(TAP_ROLE, None, "cli"),
        "rules": [{"apiGroups": [TAP_API_GROUP], "resources": ["*"], "verbs": ["watch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": meta(TAP_ROLE, None, "cli"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": TAP_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": CLI_NAME, "namespace": v.namespace}],
    }
    return [role, binding]


def _agent_rbac(v: InstallValues) -> list[dict[str, Any]]:
    # The agent never watches the cluster (identity comes from the controller). It reads one
    # object: its own Node, for spec.podCIDRs (`--pod-cidr auto`). RBAC cannot narrow `get` to
    # "the node I run on", so this is get on nodes: no list, no watch, no write.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": meta(AGENT_NAME, None, "agent"),
        "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}],
    }
    return [role, _binding(AGENT_NAME, v, "agent")]


def _binding(name: str, v: InstallValues, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": meta(name, None, component),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": v.namespace}],
    }


def to_yaml(obj: Any) -> str:
    """One YAML document, as every embedded file (config.yaml, prometheus.yml) is written."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)


def config_document(v: InstallValues) -> str:
    return to_yaml(v.mesh_config())


def _config_map(v: InstallValues) -> dict[str, Any]:
    # The mesh configuration as one document, mounted at /etc/nodemesh in every container. The
    # processes take the same values as flags today (rendered from the same InstallValues below);
    # the document is where a `--config` flag reads them, and what `kubectl get cm` shows an admin.
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(CONFIG_MAP, v.namespace, "config"),
        "data": {CONFIG_KEY: config_document(v)},
    }


def _config_checksum(v: InstallValues) -> str:
    # In the pod templates, so that changing the config rolls the pods (they read it at start).
    return hashlib.sha256(config_document(v).encode()).hexdigest()


def controller_address(v: InstallValues) -> str:
    return f"{CONTROLLER_NAME}.{v.namespace}.svc.cluster.local:{CONTROLLER_GRPC_PORT}"


def _security_context(add: list[str], user: int) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
    }
    if user == 0:
        # Root inside the container, but with every capability dropped except `add`: Kubernetes
        # puts added capabilities in the effective set only for uid 0 (no ambient capabilities).
        ctx.update({"runAsNonRoot": False, "runAsUser": 0})
    else:
        ctx.update({"runAsNonRoot": True, "runAsUser": user, "runAsGroup": user})
    ctx["capabilities"] = {"drop": ["ALL"], **({"add": add} if add else {})}
    return ctx


def _downward_env() -> list[dict[str, Any]]:
    return [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ]


def _config_volume_mount() -> dict[str, Any]:
    return {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}


def _csv(items: tuple[Any, ...] | list[Any]) -> str:
    return ",".join(str(i) for i in items)


def _controller_args(v: InstallValues) -> list[str]:
    config = v.mesh_config()
    return [
        "--source", "kubernetes",
        "--in-cluster",
        # The Service and the kubelet's probes reach the pod on its own IP, not on loopback.
        "--listen", "0.0.0.0",
        "--grpc-port", str(CONTROLLER_GRPC_PORT),
        "--web-port", str(CONTROLLER_WEB_PORT),
        "--excluded-namespaces", _csv(config["excludedNamespaces"]),
        "--opaque-ports", _csv(config["opaquePorts"]),
        "--tap-max-rps", _number(config["tapMaxRps"]),
        "--tap-max-taps", str(config["tapMaxTaps"]),
        *(["--tap-redact-headers", _csv(config["tapRedactHeaders"])] if config["tapRedactHeaders"] else []),
        *(["--tap-show-headers", _csv(config["tapShowHeaders"])] if config["tapShowHeaders"] else []),
        *(["--tap-redact-query"] if config["tapRedactQuery"] else []),
        *(["--captured-namespaces", _csv(config["capturedNamespaces"])] if config["capturedNamespaces"] else []),
        "--log-level", v.logLevel,
        # Agents and the CLI present audience-bound ServiceAccount tokens; the controller checks
        # them with TokenReview (docs/controlplane.md "Authentication").
        "--token-review",
        "--token-audience", CONTROLLER_AUDIENCE,
        *(["--prometheus-url", v.prometheusUrl] if v.prometheusUrl else []),
        *(["--stat-backend", v.statBackend] if v.statBackend != "memory" else []),
        *(["--no-ingest"] if not v.ingest else []),
        # Its own TLS on both ports: CA in a Secret (made on first start), CA certificate in a
        # ConfigMap, serving certificate for the Service's names renewed in memory (servingtls.py).
        *(["--tls-ca-secret", f"{v.namespace}/{CONTROLLER_TLS_SECRET}",
           "--tls-ca-configmap", f"{v.namespace}/{CONTROLLER_CA_CONFIGMAP}"] if v.controllerTls else []),
        *(["--ca-secret", f"{v.namespace}/{WORKLOAD_CA_SECRET}"] if v.mtls else []),
        *(["--mtls-required-namespaces", _csv(v.mtlsRequiredNamespaces)] if v.mtls and v.mtlsRequiredNamespaces
          else []),
    ]


WORKLOAD_CA_SECRET = "nodemesh-workload-ca"
CERT_DIR = "/run/nodemesh-certs"
CONTROLLER_TLS_SECRET = "nodemesh-controller-tls"   # the controller's serving CA (key included)
CONTROLLER_CA_CONFIGMAP = "nodemesh-controller-ca"  # its certificate alone, `ca.crt`, for everyone
CONTROLLER_CA_DIR = "/etc/nodemesh-controller-ca"
CONTROLLER_CA_KEY = "ca.crt"


def _controller_tls_objects(v: InstallValues) -> list[dict[str, Any]]:
    """The Secret and the ConfigMap the controller fills on first start, created empty here so
    that it needs no `create` (which RBAC cannot narrow to one name): only get/update on these
    two by name. `kubectl apply` again leaves their data alone (it is not in the manifest);
    `kubectl delete -f` removes them, and a reinstall makes a new CA."""
    if not v.controllerTls:
        return []
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": meta(CONTROLLER_TLS_SECRET, v.namespace, "controller"),
              "type": "Opaque"}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": meta(CONTROLLER_CA_CONFIGMAP, v.namespace, "controller")}
    role_name = f"{CONTROLLER_NAME}-tls"
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta(role_name, v.namespace, "controller"),
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CONTROLLER_TLS_SECRET],
             "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [CONTROLLER_CA_CONFIGMAP],
             "verbs": ["get", "update"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta(role_name, v.namespace, "controller"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_NAME, "namespace": v.namespace}],
    }
    return [secret, config_map, role, binding]


def controller_ca_volume() -> dict[str, Any]:
    """The published CA certificate as a volume: optional, so a pod starts before the controller
    wrote it (the agent waits for the file, re-read at every connect; the kubelet updates it)."""
    return {"name": "controller-ca", "configMap": {"name": CONTROLLER_CA_CONFIGMAP, "optional": True}}


def _ca_secret_rbac(v: InstallValues) -> list[dict[str, Any]]:
    """With mtls: the controller keeps the workload root in one Secret of its namespace, shipped
    empty here (as the controller's TLS Secret: RBAC cannot narrow `create` to one name), filled on
    first start and rewritten at rotation; it may get and update that Secret and touch no other."""
    if not v.mtls:
        return []
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": meta(WORKLOAD_CA_SECRET, v.namespace, "controller"),
              "type": "Opaque"}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta(f"{CONTROLLER_NAME}-workload-ca", v.namespace, "controller"),
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [WORKLOAD_CA_SECRET],
             "verbs": ["get", "update"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta(f"{CONTROLLER_NAME}-workload-ca", v.namespace, "controller"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{CONTROLLER_NAME}-workload-ca"},
        "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER_NAME, "namespace": v.namespace}],
    }
    return [secret, role, binding]


def _https(v: InstallValues) -> dict[str, str]:
    # The kubelet's HTTPS probes do not verify the certificate (Kubernetes' documented behaviour).
    return {"scheme": "HTTPS"} if v.controllerTls else {}


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _controller(v: InstallValues) -> list[dict[str, Any]]:
    container = {
        "name": "controller",
        "image": v.image,
        "imagePullPolicy": v.imagePullPolicy,
        "command": ["python", "-m", "nodemesh.controlplane"],
        "args": _controller_args(v),
        "ports": [
            {"name": "grpc", "containerPort": CONTROLLER_GRPC_PORT, "protocol": "TCP"},
            {"name": "web", "containerPort": CONTROLLER_WEB_PORT, "protocol": "TCP"},
        ],
        "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "web", **_https(v)},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": "web", **_https(v)},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        },
        "securityContext": _security_context([], 65534),
        "volumeMounts": [_config_volume_mount(), {"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(CONTROLLER_NAME, v.namespace, "controller"),
        "spec": {
            # One process by design: it holds the aggregation windows and the agents' streams.
            "replicas": 1,
            "selector": {"matchLabels": selector_labels("controller")},
            "template": {
                "metadata": {
                    "labels": labels("controller"),
                    "annotations": {"nodemesh.io/config-checksum": _config_checksum(v)},
                },
                "spec": {
                    "serviceAccountName": CONTROLLER_NAME,
                    # The controller talks to the API server (list/watch, TokenReview).
                    "automountServiceAccountToken": True,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": CONFIG_MAP}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(CONTROLLER_NAME, v.namespace, "controller"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels("controller"),
            "ports": [
                {"name": "grpc", "port": CONTROLLER_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "grpc"},
                {"name": "web", "port": CONTROLLER_WEB_PORT, "targetPort": "web", "protocol": "TCP",
                 "appProtocol": "http"},
            ],
        },
    }
    return [deployment, service]


def _agent_capabilities(v: InstallValues) -> list[str]:
    # NET_ADMIN: IP_TRANSPARENT upstream sockets (keep the calling pod's source IP) and the
    # policy routing that returns their replies. NET_RAW: transparent/raw socket options.
    # eBPF capture: BPF, for bpf(2) on the pinned maps (the agent reads original destinations and
    # puts its listeners in the sockmap; kernels with unprivileged BPF off refuse any bpf(2) without it).
    return ["NET_ADMIN", "NET_RAW", *(["BPF"] if v.capture == "ebpf" else [])]


def _redirector_capabilities(v: InstallValues) -> list[str]:
    # NET_ADMIN + NET_RAW: iptables/ebtables (netlink and the raw socket iptables-legacy uses) and
    # the policy-routing rule. eBPF capture: BPF (load, pin) + PERFMON (the programs hold socket
    # pointers from the sockmap); NET_ADMIN already covers attaching cgroup programs.
    uses_bpf = v.capture == "ebpf" or v.accelerate == "sockmap"
    return ["NET_ADMIN", "NET_RAW", *(["BPF", "PERFMON"] if uses_bpf else [])]


# eBPF capture on a real node: programs and maps pinned in the host's bpffs (they outlive the
# redirector: a dead agent fails open in the kernel with nobody left), pod cgroups read from the
# host's cgroup v2 hierarchy (attached there, read-only mount: attaching is a bpf(2) call on the
# directory), and the kernel headers bcc compiles against (the node's /lib/modules and /usr/src).
EBPF_BPF_DIR = "/sys/fs/bpf/nodemesh"
EBPF_CGROUP_ROOT = "/sys/fs/cgroup"


def _ebpf_volumes() -> list[dict[str, Any]]:
    return [
        {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}},
        {"name": "cgroup2", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
        {"name": "modules", "hostPath": {"path": "/lib/modules", "type": "Directory"}},
        {"name": "usr-src", "hostPath": {"path": "/usr/src", "type": "Directory"}},
    ]


def _ebpf_redirector_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
        {"name": "cgroup2", "mountPath": "/sys/fs/cgroup", "readOnly": True},
        {"name": "modules", "mountPath": "/lib/modules", "readOnly": True},
        {"name": "usr-src", "mountPath": "/usr/src", "readOnly": True},
    ]


# The init container that writes this node's pod CIDR(s) where the agent and the redirector read
# them (`--pod-cidr "$(cat ...)"`): the downward API cannot expose node.spec.podCIDRs, and the agent
# itself never calls the Kubernetes API. POD_CIDRS (from `--set podCidrs=`) wins, for CNIs whose
# IPAM ignores node.spec.podCIDRs (Calico's own IPAM). Outside a cluster (tests) it uses KUBECONFIG.
POD_CIDRS_FILE = "/run/nodemesh/pod-cidrs"
POD_CIDRS_SCRIPT = """\
import json, os, sys
from kubernetes import client, config
node = os.environ["NODE_NAME"]
cidrs = [c for c in os.environ.get("POD_CIDRS", "").split(",") if c]
if not cidrs:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    raw = client.CoreV1Api().read_node(node, _preload_content=False)
    spec = json.loads(raw.data).get("spec", {})
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
if not cidrs:
    sys.exit(f"event=pod_cidrs_missing node={node} hint='node.spec.podCIDRs is empty; "
             "reinstall with: nodemesh install --set podCidrs=CIDR[,CIDR]'")
with open(os.environ.get("POD_CIDRS_FILE", "/run/nodemesh/pod-cidrs"), "w") as f:
    f.write(",".join(cidrs))
print(f"event=pod_cidrs node={node} cidrs={','.join(cidrs)}")
"""
# The agent rewrites this every second with `ready` or `not-ready` (agent/liveness.py); the probes
# check what it says and that it is fresh (a hung agent stops writing it).
HEALTH_FILE = "/run/nodemesh/agent.health"
_HEALTH_FRESH = f'test $(( $(date +%s) - $(stat -c %Y {HEALTH_FILE}) )) -lt 10'
_HEALTH_READY = f'test "$(cat {HEALTH_FILE})" = ready && {_HEALTH_FRESH.replace("-lt 10", "-lt 5")}'
# `sh -c SCRIPT argv0 ARGS...`: the container's args arrive as "$@", the pod CIDRs from the file.
_WITH_POD_CIDRS = 'exec python -m {module} --pod-cidr "$(cat ' + POD_CIDRS_FILE + ')" "$@"'


def _init_pod_cidrs(v: InstallValues) -> dict[str, Any]:
    return {
        "name": "pod-cidrs",
        "image": v.image,
        "imagePullPolicy": v.imagePullPolicy,
        "command": ["python", "-c", POD_CIDRS_SCRIPT],
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "POD_CIDRS", "value": _csv(v.podCidrs)},
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}},
        "securityContext": _security_context([], 65534),
        "volumeMounts": [{"name": "run", "mountPath": "/run/nodemesh"}],
    }


def _init_node_sysctls(v: InstallValues) -> dict[str, Any]:
    """Sets net.ipv4.tcp_migrate_req=1 on the node (redirector/sysctls.py: a rolling update then
    resets no queued connection). /proc/sys is read-only in every container that is not
    privileged, whatever its capabilities, and under hostNetwork the pod may not declare net.*
    sysctls: so this one container is privileged, runs for a moment, and writes nothing else."""
    return {
        "name": "node-sysctls",
        "image": v.image,
        "imagePullPolicy": v.imagePullPolicy,
        "command": ["python", "-m", "nodemesh.redirector", "sysctls"],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "200m", "memory": "64Mi"}},
        "securityContext": {"privileged": True, "readOnlyRootFilesystem": True, "runAsNonRoot": False,
                            "runAsUser": 0},
    }


def _init_fail_open(v: InstallValues) -> dict[str, Any]:
    # First thing at pod start, before anything waits on the API server: capture rules left in the
    # kernel (a restarted node, a killed redirector) go unless an agent is ready with its identity
    # (a rolling update's old one). Otherwise they capture pods while nothing serves the agent's
    # ports, and the mesh's own pods before any agent can name them (issue 11, item 2).
    # eBPF capture: a pinned capture left switched on is switched off the same way (no compile).
    ebpf_args = ["--capture", "ebpf", "--bpf-dir", EBPF_BPF_DIR] if v.capture == "ebpf" else []
    ebpf_mounts = [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"}] \
        if v.capture == "ebpf" else []
    return {
        "name": "fail-open",
        "image": v.image,
        "imagePullPolicy": v.imagePullPolicy,
        "command": ["python", "-m", "nodemesh.redirector", "fail-open",
                    "--agent-admin", f"http://127.0.0.1:{ADMIN_PORT}", *ebpf_args],
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"cpu": "200m", "memory": "128Mi"}},
        "securityContext": _security_context(_redirector_capabilities(v), 0),
        "volumeMounts": [{"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
                         {"name": "tmp", "mountPath": "/tmp"}, *ebpf_mounts],
    }


def _daemonset(v: InstallValues) -> dict[str, Any]:
    config = v.mesh_config()
    agent = {
        "name": "agent",
        "image": v.image,
        "imagePullPolicy": v.imagePullPolicy,
        "command": ["/bin/sh", "-c", _WITH_POD_CIDRS.format(module="nodemesh.agent"), "agent"],
        "args": [
            "--node", "$(NODE_NAME)",
            "--node-ip", "$(NODE_IP)",
            "--controller", controller_address(v),
            "--token-file", f"{TOKEN_DIR}/token",
            *(["--controller-ca", f"{CONTROLLER_CA_DIR}/{CONTROLLER_CA_KEY}"] if v.controllerTls else []),
            "--workers", str(v.agentWorkers),
            "--drain-grace", str(v.drainGraceSeconds),
            "--opaque-ports", _csv(config["opaquePorts"]),
            "--log-level", v.logLevel,
            "--health-file", HEALTH_FILE,
            *(["--cert-dir", CERT_DIR, "--mtls"] if v.mtls else []),
        ],
        "env": _downward_env(),
        # No `ports:` on purpose: with hostNetwork every containerPort is a hostPort, and the
        # scheduler would then refuse the surge pod (maxSurge: 1) on a node whose old agent
        # holds the same ports. The agent binds with SO_REUSEPORT, so old and new can overlap.
        # For the same reason the probes read this pod's health file instead of GET :4191: the
        # kernel hands a probe to any agent listening there, and during a rolling update the old
        # one answered for the new one, declaring it Ready before it listened (issue 11 item 7).
        "readinessProbe": {
            "exec": {"command": ["/bin/sh", "-c", _HEALTH_READY]},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "exec": {"command": ["/bin/sh", "-c", _HEALTH_FRESH]},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "512Mi"},
        },
        "securityContext": _security_context(_agent_capabilities(v), 0),
        "volumeMounts": [
            _config_volume_mount(),
            {"name": "controller-token", "mountPath": TOKEN_DIR, "readOnly": True},
            *([{"name": "controller-ca", "mountPath": CONTROLLER_CA_DIR, "readOnly": True}] if v.controllerTls
              else []),
            {"name": "run", "mountPath": "/run/nodemesh"},
            {"name": "tmp", "mountPath": "/tmp"},
            *([{"name": "workload-certs", "mountPath": CERT_DIR}] if v.mtls else []),
        ],
    }
    redirector_mounts: list[dict[str, Any]] = [
        _config_volume_mount(),
        {"name": "run", "mountPath": "/run/nodemesh", "readOnly": True},
        # Shared with kube-proxy and the CNI so concurrent iptables-restore calls serialize.
        {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    redirector_args = ["--node-ip", "$(NODE_IP)"]
    if config["skippedPorts"]:
        redirector_args += ["--skip-ports", _csv(config["skippedPorts"])]
    # --agent-heartbeat: the rules fail open by themselves when the agent dies or hangs, even when
    # the redirector is gone too (redirector/heartbeat.py).
    redirector_args += ["--agent-admin", f"http://127.0.0.1:{ADMIN_PORT}", "--grace", "2", "--agent-heartbeat",
                        # the return path stays while the agent drains, then the pod's grace ends
                        "--shutdown-wait", str(v.drainGraceSeconds + REDIRECTOR_WAIT_MARGIN_S)]
    if v.capture == "ebpf":
        redirector_args += ["--capture", "ebpf", "--bpf-dir", EBPF_BPF_DIR, "--cgroup-root", EBPF_CGROUP_ROOT]
        redirector_mounts += _ebpf_redirector_mounts()
        agent["volumeMounts"] = [*cast(list[dict[str, Any]], agent["volumeMounts"]),
                                 {"name": "bpffs", "mountPath": "/sys/fs/bpf", "readOnly": True,
                                  "mountPropagation": "HostToContainer"}]
        agent["env"] = [*cast(list[dict[str, Any]], agent["env"]), {"name": "NODEMESH_BPF_DIR", "value": EBPF_BPF_DIR}]
    if v.accelerate == "sockmap":
        # Attached at the cgroup root: every pod of the node and the agent's own pod are below it.
        redirector_args += ["--accelerate", "sockmap"]
        if v.capture != "ebpf":
            redirector_args += ["--bpf-dir", EBPF_BPF_DIR, "--cgroup-root", EBPF_CGROUP_ROOT]
            redirector_mounts += _ebpf_redirector_mounts()
    redirector = {
        "name": "redirector",
        "image": v.image,
        "imagePullPolicy": v.imagePullPolicy,
        "command": ["/bin/sh", "-c", _WITH_POD_CIDRS.format(module="nodemesh.redirector run"), "redirector"],
        "args": redirector_args,
        "env": _downward_env(),
        "resources": {
            "requests": {"cpu": "10m", "memory": "48Mi"},
            "limits": {"cpu": "200m", "memory": "128Mi"},
        },
        "securityContext": _security_context(_redirector_capabilities(v), 0),
        "volumeMounts": redirector_mounts,
    }
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": CONFIG_MAP}},
        {
            "name": "controller-token",
            "projected": {
                "sources": [{
                    "serviceAccountToken": {
                        "audience": CONTROLLER_AUDIENCE,
                        "expirationSeconds": 3600,
                        "path": "token",
                    },
                }],
            },
        },
        *([controller_ca_volume()] if v.controllerTls else []),
        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
        *(_ebpf_volumes() if v.capture == "ebpf" or v.accelerate == "sockmap" else []),
        # The pods' private keys: memory only, never on the node's disk, gone with the pod.
        *([{"name": "workload-certs", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}] if v.mtls else []),
    ]
    pod_security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta(AGENT_NAME, v.namespace, "agent"),
        "spec": {
            "selector": {"matchLabels": selector_labels("agent")},
            # A node never goes without an agent: the new one is ready before the old one drains.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels("agent"),
                    "annotations": {"nodemesh.io/config-checksum": _config_checksum(v)},
                },
                "spec": {
                    "serviceAccountName": AGENT_NAME,
                    # For the init container's `get` on this Node (pod CIDRs). The agent presents
                    # the projected, audience-bound token to the controller, never this one.
                    "automountServiceAccountToken": True,
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    # Pod traffic on the node flows through the agent: evict it last.
                    "priorityClassName": "system-node-critical",
                    # Drain grace plus the margin for the redirector's fail-open and the exit.
                    "terminationGracePeriodSeconds": v.drainGraceSeconds + TERMINATION_MARGIN_S,
                    "tolerations": [{"operator": "Exists"}],
                    "securityContext": pod_security,
                    "initContainers": [_init_fail_open(v), _init_node_sysctls(v), _init_pod_cidrs(v)],
                    "containers": [agent, redirector],
                    "volumes": volumes,
                },
            },
        },
    }


def daemonset_documents(v: InstallValues) -> list[dict[str, Any]]:
    return [
        _namespace(v),
        _service_account(CONTROLLER_NAME, v, "controller", True),
        _service_account(AGENT_NAME, v, "agent", True),
        # Identity for the CLI's tokens: `kubectl create token nodemesh-cli --audience nodemesh-controller`.
        # Its only RBAC is the tap permission (nodemesh-tap); stats need no RBAC, only the name.
        _service_account(CLI_NAME, v, "cli", False),
        *_controller_rbac(v),
        *_tap_rbac(v),
        *_agent_rbac(v),
        *_ca_secret_rbac(v),
        *_controller_tls_objects(v),
        _config_map(v),
        *_controller(v),
        _daemonset(v),
    ]


def render_daemonset(values: InstallValues | None = None) -> str:
    v = values or InstallValues()
    return dump_documents(
        daemonset_documents(v),
        header("the mesh (namespace, RBAC, config, controller, agent DaemonSet)",
                "nodemesh install --capture ebpf > manifests/daemonset-ebpf.yaml" if v.capture == "ebpf"
                else "nodemesh install > manifests/daemonset.yaml"),
    )


def to_json(obj: Any) -> str:
    """Stable JSON for the committed dashboards (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
