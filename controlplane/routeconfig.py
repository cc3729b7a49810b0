"""Routes users configured, per destination workload, for the agents (`MeshConfig.routes`).

Where a user names routes, their names win over the automatic ones (agent/routes.py):

* **Kubernetes: Gateway API `HTTPRoute` / `GRPCRoute`** (gateway.networking.k8s.io) whose
  `parentRefs` name a Service (GAMMA, the mesh use of the Gateway API, as Linkerd reads it): each
  match of each rule becomes a rule for the workloads behind that Service. The route's name is the
  rule's `name` when it has one (Gateway API v1.2), else the object's `metadata.name` (Linkerd's
  `route_name`). HTTP matches: `path` (`Exact`, `PathPrefix`, `RegularExpression`; default prefix
  `/`) and `method`; GRPC matches: `method.service` / `method.method` (Exact). Header and query
  matches are ignored (a rule with only those matches every path). Parent refs to Gateways are
  north-south and ignored.
* **Sandbox (or any cluster): the annotation `nodemesh.io/routes`** on a Service (rules for the
  workloads behind it) or on a Deployment, StatefulSet, DaemonSet or Job (rules for it): a JSON
  list, first match wins —
  `[{"name": "vote", "method": "POST", "path": "/api/vote", "type": "exact"},
    {"name": "doughnut", "grpc": "emojivoto.v1.VotingService/VoteDoughnut"}]`
  (`type`: `prefix` (default), `exact`, `regex`; `grpc`: `Service/Method`, either side may be empty
  for any). A malformed annotation is skipped with a warning: it never breaks identity.

Order per workload: its own annotation, then its Services' annotations, then HTTPRoutes and
GRPCRoutes (by namespace and name, rules in their order).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import TYPE_OF_KIND
from nodemesh.controlplane.registry import WorkloadRegistry

log = logging.getLogger("nodemesh.controlplane.routeconfig")

ROUTES_ANNOTATION = "nodemesh.io/routes"
HTTP_ROUTE, GRPC_ROUTE = "HTTPRoute", "GRPCRoute"
_PATH_TYPES = {"Exact": "exact", "PathPrefix": "prefix", "RegularExpression": "regex"}
_WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")

WorkloadKey = tuple[str, str, str]


def workload_routes(registry: WorkloadRegistry) -> list[pb.WorkloadRoutes]:
    """Every workload's configured route rules, in a stable order (pushed in MeshConfig)."""
    rules: dict[WorkloadKey, list[pb.RouteRule]] = {}

    for kind in _WORKLOAD_KINDS:
        for obj in sorted(_annotated(registry.objects(kind)), key=_ns_name):
            parsed = _annotation_rules(obj)
            if parsed:
                meta = obj.get("metadata") or {}
                rules.setdefault((meta.get("namespace", ""), TYPE_OF_KIND[kind], meta.get("name", "")), []) \
                    .extend(parsed)
    for svc in sorted(_annotated(registry.objects("Service")), key=_ns_name):
        parsed = _annotation_rules(svc)
        if parsed:
            for key in _workloads_behind(registry, _ns_name(svc)):
                rules.setdefault(key, []).extend(parsed)
    for kind in (HTTP_ROUTE, GRPC_ROUTE):
        for route in sorted(registry.objects(kind), key=_ns_name):
            parsed = _gateway_rules(route, grpc=kind == GRPC_ROUTE)
            if not parsed:
                continue
            for parent in _parent_services(route):
                for key in _workloads_behind(registry, parent):
                    rules.setdefault(key, []).extend(parsed)
    return [pb.WorkloadRoutes(workload=pb.Resource(namespace=ns, type=type_, name=name), rules=r)
            for (ns, type_, name), r in sorted(rules.items())]


def _ns_name(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace", "") or "", meta.get("name", "") or "")


def _annotated(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects carrying the routes annotation (every change walks them: keep it a lookup)."""
    return [o for o in objs if ROUTES_ANNOTATION in ((o.get("metadata") or {}).get("annotations") or {})]


def _workloads_behind(registry: WorkloadRegistry, service: tuple[str, str]) -> list[WorkloadKey]:
    """The workloads whose pods back `service` (namespace, name), sorted; none when unknown."""
    svc = registry.service(*service)
    if svc is None:
        return []
    return sorted({(p.workload.namespace, p.workload.kind, p.workload.name) for p in registry.service_pods(svc)})


def _annotation_rules(obj: dict[str, Any]) -> list[pb.RouteRule]:
    meta = obj.get("metadata") or {}
    text = (meta.get("annotations") or {}).get(ROUTES_ANNOTATION)
    if not text:
        return []
    where = f"{obj.get('kind', '')} {meta.get('namespace', '')}/{meta.get('name', '')}"
    try:
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise TypeError("expected a JSON list")
        out = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError("every route needs a name")
            if "grpc" in entry:
                service, _, method = str(entry["grpc"]).partition("/")
                out.append(pb.RouteRule(name=entry["name"], grpc=True, grpc_service=service, grpc_method=method))
                continue
            path_type = str(entry.get("type", "prefix"))
            if path_type not in ("prefix", "exact", "regex"):
                raise ValueError(f"unknown path type {path_type!r}")
            out.append(pb.RouteRule(name=entry["name"], method=str(entry.get("method", "")).upper(),
                                    path=str(entry.get("path", "")), path_type=path_type))
        return out
    except (ValueError, TypeError) as exc:
        log.warning("event=routes_annotation_invalid object=%s error=%r", where, str(exc)[:200])
        return []


def _parent_services(route: dict[str, Any]) -> list[tuple[str, str]]:
    namespace = _ns_name(route)[0]
    out = []
    for ref in (route.get("spec") or {}).get("parentRefs") or []:
        if ref.get("kind") == "Service" and ref.get("group", "") in ("", "core"):
            out.append((ref.get("namespace") or namespace, ref.get("name", "")))
    return out


def _gateway_rules(route: dict[str, Any], *, grpc: bool) -> list[pb.RouteRule]:
    default_name = _ns_name(route)[1]
    out: list[pb.RouteRule] = []
    for rule in (route.get("spec") or {}).get("rules") or []:
        name = rule.get("name") or default_name
        matches = rule.get("matches") or [{}]
        for match in matches:
            if grpc:
                method = match.get("method") or {}
                out.append(pb.RouteRule(name=name, grpc=True, grpc_service=method.get("service", ""),
                                        grpc_method=method.get("method", "")))
                continue
            path = match.get("path") or {}
            path_type = _PATH_TYPES.get(path.get("type", "PathPrefix"))
            if path_type is None:
                continue  # an implementation-specific match type we do not know: skip the match
            out.append(pb.RouteRule(name=name, method=match.get("method", ""), path=path.get("value", "/"),
                                    path_type=path_type))
    return out
