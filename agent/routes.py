"""Routes without configuration: a request's method and path -> a route name with bounded cardinality.

Sans-IO: strings in, a route name out; no sockets, no clock. The worker's telemetry asks a
`RouteTable` (one per destination workload) for every request, so the common case must be one
dict hit: each table caches (method, path) -> route for the raw paths it has seen (bounded: a
full cache is cleared and refills, which costs one templating per distinct path).

What a route is:

* gRPC: the method path exactly, `/pkg.Service/Method` (always POST, so no method prefix).
* HTTP: `METHOD /templated/path`, as Linkerd names ServiceProfile routes (`GET /books/{id}`). The
  query string, fragment and `;matrix` parameters are dropped; path segments that carry data
  become placeholders: `{id}` (digits), `{uuid}`, `{hash}` (7+ hex digits with a digit in them),
  `{date}` (ISO dates and date-times), `{token}` (16+ characters that look random: many
  changes between lower case, upper case and digits), `{email}`; a data segment with a file
  extension keeps it (`{id}.json`). Methods outside RFC 9110's (and PATCH) are `OTHER`.
* Configured routes (a Gateway API HTTPRoute/GRPCRoute, the sandbox's annotation) are tried
  first: their name wins for the requests they match (`RouteRule`, `RouteTable.configure`).
* `[DEFAULT]`: a request that has no path to name (`CONNECT host:port`, `OPTIONS *`, a request
  target that is not a path), as Linkerd's catch-all row.
* `[other]`: past the table's cap (`max_routes` distinct routes per destination workload), or a
  route longer than `MAX_ROUTE_CHARS`: a client sending user data in paths can never make more
  than `max_routes` + 2 series per label set. Every request is still counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nodemesh.api.model import DEFAULT_ROUTE
from nodemesh.api.model import OTHER_LABEL_VALUE as OTHER_ROUTE

DEFAULT_MAX_ROUTES = 100
CACHE_SIZE = 4096            # raw (method, path) entries per table before its cache is cleared
MAX_ROUTE_CHARS = 256
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{7,}")
_DATE = re.compile(r"\d{4}-\d{2}(-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?)?")
_EMAIL = re.compile(r"[^@/\s]+@[^@/\s]+\.[A-Za-z]{2,}")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-.~=+%]{16,}")
_EXTENSION = re.compile(r"(.+)(\.[A-Za-z][A-Za-z0-9]{0,4})")
_GRPC_PATH = re.compile(r"/[^/?#\s]+/[^/?#\s]+")


def _looks_random(seg: str) -> bool:
    """A long segment that reads like a generated token, not like words (`getUserPreferences`,
    `order_2024_summary_report` stay): many switches between lower case, upper case and digits."""
    switches = digits = letter_digit = 0
    prev = ""
    for ch in seg:
        if ch.isdigit():
            cls = "d"
            digits += 1
        elif ch.islower():
            cls = "l"
        elif ch.isupper():
            cls = "u"
        else:
            cls = ""  # a separator resets the run: words joined by `-` or `_` are not switches
        if cls and prev and cls != prev:
            switches += 1
            if "d" in (cls, prev):
                letter_digit += 1
        prev = cls
    return switches * 3 >= len(seg) or (digits >= 2 and letter_digit >= 4)


def template_segment(seg: str) -> str:
    """One path segment, with data replaced by a placeholder (or as it is)."""
    if not seg:
        return seg
    if ";" in seg:
        seg = seg.partition(";")[0]  # matrix parameters (`;jsessionid=...`) are data
        if not seg:
            return seg
    if seg.isdigit() and seg.isascii():
        return "{id}"
    first = seg[0]
    if len(seg) == 36 and _UUID.fullmatch(seg):
        return "{uuid}"
    if first.isdigit() and _DATE.fullmatch(seg):
        return "{date}"
    if len(seg) >= 7 and _HEX.fullmatch(seg):
        return "{hash}"
    if "@" in seg and _EMAIL.fullmatch(seg):
        return "{email}"
    if len(seg) >= 16 and _TOKEN_CHARS.fullmatch(seg) and _looks_random(seg):
        return "{token}"
    if "." in seg:
        m = _EXTENSION.fullmatch(seg)
        if m is not None:
            stem = template_segment(m.group(1))
            if stem.startswith("{"):
                return stem + m.group(2)
    return seg


def request_path(target: str) -> str | None:
    """The path of a request target (origin-form or absolute-form), without query or fragment;
    None when the target names no path (authority-form, asterisk-form, garbage)."""
    if not target.startswith("/"):
        if target.startswith(("http://", "https://")):
            rest = target.partition("//")[2]
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
        else:
            return None
    for sep in ("?", "#"):
        if sep in target:
            target = target.partition(sep)[0]
    return target


def template_path(path: str) -> str:
    """`/api/users/42/orders?x=1` -> `/api/users/{id}/orders` (a path from `request_path`)."""
    return "/".join([template_segment(seg) for seg in path.split("/")])


def auto_route(method: str, target: str, grpc: bool) -> str:
    """The route a request gets without configuration (before the cap)."""
    if grpc and _GRPC_PATH.fullmatch(target):
        return target
    path = request_path(target)
    if path is None:
        return DEFAULT_ROUTE
    if method not in METHODS:
        method = "OTHER"
    route = f"{method} {template_path(path)}"
    return route if len(route) <= MAX_ROUTE_CHARS else OTHER_ROUTE


@dataclass(frozen=True, slots=True)
class RouteRule:
    """A configured route: its name wins for the requests it matches (first rule that matches).

    path_type: "exact", "prefix" (whole segments, as Gateway API's PathPrefix) or "regex"; an empty
    `path` matches every path; an empty `method` every method. gRPC rules from a GRPCRoute are
    exact matches on `/service/method` (a service or method left empty matches any)."""

    name: str
    method: str = ""
    path: str = ""
    path_type: str = "prefix"
    grpc_service: str = ""
    grpc_method: str = ""
    grpc_only: bool = False

    def matches(self, method: str, path: str, grpc: bool) -> bool:
        if self.grpc_only:
            if not grpc:
                return False
            service, _, rpc = path[1:].partition("/")
            return (not self.grpc_service or service == self.grpc_service) and \
                (not self.grpc_method or rpc == self.grpc_method)
        if self.method and method != self.method:
            return False
        if not self.path:
            return True
        if self.path_type == "exact":
            return path == self.path
        if self.path_type == "regex":
            return _compiled(self.path).fullmatch(path) is not None
        prefix = self.path.rstrip("/")
        return path == prefix or path.startswith(prefix + "/") or not prefix


_regex_cache: dict[str, re.Pattern[str]] = {}
_NEVER = re.compile(r"(?!)")


def _compiled(pattern: str) -> re.Pattern[str]:
    compiled = _regex_cache.get(pattern)
    if compiled is None:
        try:
            compiled = re.compile(pattern)
        except re.error:
            compiled = _NEVER  # a bad regex in someone's route matches nothing; it never breaks a request
        _regex_cache[pattern] = compiled
    return compiled


class RouteTable:
    """The routes learned for one destination workload: a cache of raw requests, the distinct
    routes (at most `max_routes`; more are `[other]`), and the configured rules."""

    __slots__ = ("cache", "cache_size", "max_routes", "overflowed", "routes", "rules")

    def __init__(self, max_routes: int = DEFAULT_MAX_ROUTES, cache_size: int = CACHE_SIZE,
                 rules: tuple[RouteRule, ...] = ()) -> None:
        self.max_routes = max_routes
        self.cache_size = cache_size
        self.cache: dict[tuple[str, str], str] = {}
        self.routes: set[str] = set()
        self.rules = rules
        self.overflowed = 0  # requests whose route was folded into [other] by the cap

    def route(self, method: str, target: str, grpc: bool) -> str:
        """The hot path: a dict hit for a request seen before."""
        key = (method, target)
        route = self.cache.get(key)
        if route is None:
            route = self._learn(method, target, grpc)
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            self.cache[key] = route
        elif route is OTHER_ROUTE:
            self.overflowed += 1
        return route

    def _learn(self, method: str, target: str, grpc: bool) -> str:
        if self.rules:
            path = request_path(target)
            if path is not None:
                for rule in self.rules:
                    if rule.matches(method, path, grpc):
                        return rule.name  # configured routes are not capped: someone chose them
        route = auto_route(method, target, grpc)
        if route in self.routes or route == DEFAULT_ROUTE:
            return route
        if route is not OTHER_ROUTE and len(self.routes) < self.max_routes:
            self.routes.add(route)
            return route
        self.overflowed += 1
        return OTHER_ROUTE

    def configure(self, rules: tuple[RouteRule, ...]) -> None:
        """New configured rules: forget what the cache decided under the old ones."""
        if rules != self.rules:
            self.rules = rules
            self.cache.clear()


def rules_from_config(routes: object) -> dict[tuple[str, str, str], tuple[RouteRule, ...]]:
    """`MeshConfig.routes` (pb.WorkloadRoutes) -> rules per destination workload key."""
    out: dict[tuple[str, str, str], tuple[RouteRule, ...]] = {}
    for wr in routes:  # type: ignore[attr-defined]
        key = (wr.workload.namespace, wr.workload.type, wr.workload.name)
        out[key] = tuple(
            RouteRule(name=r.name, method=r.method, path=r.path, path_type=r.path_type or "prefix",
                      grpc_service=r.grpc_service, grpc_method=r.grpc_method, grpc_only=r.grpc)
            for r in wr.rules if r.name)
    return out


class RouteTables:
    """A worker's route tables, one per destination workload (`key`: namespace, kind, name).

    Unknown destinations (an address no pod owns) share one table, so external hosts cannot
    multiply tables either. `reset()` forgets what was learned (the telemetry calls it every
    `series_idle_s`, so routes that went away free their place under the cap)."""

    def __init__(self, max_routes: int = DEFAULT_MAX_ROUTES, cache_size: int = CACHE_SIZE) -> None:
        self.max_routes = max_routes
        self.cache_size = cache_size
        self.tables: dict[tuple[str, str, str], RouteTable] = {}
        self.rules: dict[tuple[str, str, str], tuple[RouteRule, ...]] = {}

    def table(self, namespace: str, kind: str, name: str) -> RouteTable:
        key = (namespace, kind, name) if namespace else ("", kind, "")
        table = self.tables.get(key)
        if table is None:
            table = self.tables[key] = RouteTable(self.max_routes, self.cache_size, self.rules.get(key, ()))
        return table

    def configure(self, rules: dict[tuple[str, str, str], tuple[RouteRule, ...]]) -> None:
        """The configured routes of every destination workload (from the controller's identity)."""
        self.rules = rules
        for key, table in self.tables.items():
            table.configure(rules.get(key, ()))

    def reset(self) -> None:
        self.tables.clear()

    @property
    def overflowed(self) -> int:
        return sum(t.overflowed for t in self.tables.values())
