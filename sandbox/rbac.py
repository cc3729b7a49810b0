"""Kubernetes RBAC over the sandbox's recorded objects: the SubjectAccessReview answer.

The sandbox records ClusterRoles and ClusterRoleBindings (and Roles/RoleBindings when a manifest
has them) without enforcing them on its own reads; the one decision the mesh asks of them is the
controller's SubjectAccessReview (may this user `watch` tap.nodemesh.io in that namespace?). This
evaluates resource attributes as the RBAC authorizer does: a binding names the user, one of its
groups or its ServiceAccount; its role's rules match verb, API group, resource and resourceNames
(`*` matching anything); a RoleBinding counts only in its namespace. Sans-IO: objects in, answer out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SA_PREFIX = "system:serviceaccount:"


def _subject_matches(subject: dict[str, Any], user: str, groups: Iterable[str], binding_ns: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name", "")
    if kind == "User":
        return name == user
    if kind == "Group":
        return name in set(groups)
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user == f"{SA_PREFIX}{ns}:{name}"
    return False


def _rule_matches(rule: dict[str, Any], attrs: dict[str, Any]) -> bool:
    def has(key: str, value: str) -> bool:
        items = rule.get(key) or []
        return "*" in items or value in items

    if not has("verbs", attrs.get("verb", "")) or not has("apiGroups", attrs.get("group", "")):
        return False
    resource = attrs.get("resource", "")
    if attrs.get("subresource"):
        resource += "/" + attrs["subresource"]
    if not has("resources", resource):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.get("name", "") in names


def allowed(objects: Iterable[dict[str, Any]], user: str, groups: Iterable[str],
            attrs: dict[str, Any]) -> tuple[bool, str]:
    """(allowed, reason) for a SubjectAccessReview's user, groups and resourceAttributes."""
    objs = list(objects)
    groups = tuple(groups)
    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objs
             if o.get("kind") in ("ClusterRole", "Role")}
    namespace = attrs.get("namespace", "") or ""
    for b in objs:
        kind = b.get("kind")
        if kind not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        b_ns = b["metadata"].get("namespace", "")
        if kind == "RoleBinding" and b_ns != namespace:  # namespaced grants apply only there
            continue
        if not any(_subject_matches(s, user, groups, b_ns) for s in b.get("subjects") or []):
            continue
        ref = b.get("roleRef") or {}
        role = roles.get((ref.get("kind", ""), b_ns if ref.get("kind") == "Role" else "", ref.get("name", "")))
        if role is None:
            continue
        if any(_rule_matches(rule, attrs) for rule in role.get("rules") or []):
            return True, f'RBAC: allowed by {kind} "{b["metadata"]["name"]}"'
    return False, "no RBAC rule allows it"
