"""Query parameters of the dashboard's JSON API -> validated values, or an ApiError (4xx).

Pure functions with no I/O. The spellings follow the CLI (`nodemesh stat`, `nodemesh tap`):
kubectl resource types and aliases, `TYPE/NAME` peers, durations such as `10s`, `1m`, `1m30s`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nodemesh.api import tapfilter
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import RESOURCE_ALIASES, SelectorError, WindowError, parse_selector
from nodemesh.api.model import parse_window as model_parse_window
from nodemesh.controlplane.stat import DEFAULT_WINDOW_S

DEFAULT_NAMESPACE = "default"
# What the overview lists: the workload kinds (pods and services have their own CLI verbs).
OVERVIEW_TYPES = ("deployment", "statefulset", "daemonset", "job")
_TRUE = ("1", "true", "yes")
_FALSE = ("", "0", "false", "no")


class ApiError(Exception):
    """A request the caller got wrong: answered as `{"error": message}` with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def check_keys(query: Mapping[str, str], allowed: Iterable[str]) -> None:
    """Reject unknown parameters: a typo (`windw=1h`) must not silently mean the default."""
    allowed = set(allowed)
    unknown = sorted(k for k in query if k not in allowed)
    if unknown:
        raise ApiError(f"unknown parameter {unknown[0]!r}: expected one of {', '.join(sorted(allowed))}")


def parse_window(text: str | None, default_s: int = DEFAULT_WINDOW_S) -> int:
    """`10s`, `1m`, `90s`, `1m30s`, `1h`, or plain seconds (`60`) -> seconds in [10 s, 1 h]."""
    if text is None or text.strip() == "":
        return default_s
    try:
        return model_parse_window(text, bare_seconds=True)
    except WindowError as exc:
        raise ApiError(str(exc)) from None


def parse_bool(text: str | None, name: str) -> bool:
    value = (text or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ApiError(f"invalid {name} {text!r}: expected true or false")


def parse_type(text: str | None, name: str = "type") -> str:
    """A kubectl resource type (any alias) -> its canonical name."""
    if not text:
        raise ApiError(f"missing parameter {name!r} (a resource type such as deploy, sts, ds, po, svc)")
    canonical = RESOURCE_ALIASES.get(text.strip().lower())
    if canonical is None:
        raise ApiError(f"unknown resource type {text.strip()!r}")
    return canonical


def parse_types(text: str | None) -> list[str]:
    """`deploy,sts` -> canonical types, in the order given, without repeats."""
    out: list[str] = []
    for part in (text or "").split(","):
        t = parse_type(part)
        if t not in out:
            out.append(t)
    return out


def parse_peer(text: str | None, namespace: str | None, default_ns: str, name: str) -> pb.Resource | None:
    """`--from`/`--to` as the CLI takes them: `TYPE/NAME` (or a bare TYPE) with its own namespace."""
    if not text:
        if namespace:
            raise ApiError(f"{name}_namespace needs {name}")
        return None
    try:
        sel = parse_selector(text.strip())
    except SelectorError as exc:
        raise ApiError(f"invalid {name}: {exc}") from None
    if sel.type == "all":
        raise ApiError(f"'all' is not a valid resource for {name}")
    return pb.Resource(namespace=namespace or default_ns, type=sel.type, name=sel.name)


def parse_name(text: str | None, what: str = "name") -> str:
    name = (text or "").strip()
    if not name:
        raise ApiError(f"missing parameter {what!r}")
    if "/" in name or len(name) > 253:
        raise ApiError(f"invalid {what} {name!r}")
    return name


def parse_int(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None or text.strip() == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(f"invalid {name} {text!r}: expected an integer") from None
    if not low <= value <= high:
        raise ApiError(f"{name} {value} is out of range: expected {low}..{high}")
    return value


def parse_tap_filter(query: Mapping[str, str], max_rps_cap: float) -> pb.TapFilter:
    """The CLI's tap flags (`nodemesh tap TYPE/NAME --to --method --path --authority --scheme
    --max-rps`) as query parameters; checked as the CLI checks them. The browser's rate is capped
    by the controller's configured tap limit (a page cannot usefully show more)."""
    namespace = (query.get("namespace") or DEFAULT_NAMESPACE).strip()
    type_ = parse_type(query.get("type"))
    if type_ == "all":
        raise ApiError("tap does not accept 'all': tap a namespace instead (type=ns)")
    name = (query.get("name") or "").strip()
    target = pb.Resource(namespace=namespace, type=type_, name=name)
    raw_rps = (query.get("max_rps") or "").strip()
    try:
        max_rps = float(raw_rps) if raw_rps else max_rps_cap
    except ValueError:
        raise ApiError(f"invalid max_rps {raw_rps!r}: expected a number") from None
    if not max_rps > 0:
        raise ApiError(f"max_rps must be positive, got {raw_rps}")
    flt = pb.TapFilter(target=target, method=(query.get("method") or "").strip(), path_prefix=query.get("path") or "",
                       authority=(query.get("authority") or "").strip(), scheme=(query.get("scheme") or "").strip(),
                       max_rps=min(max_rps, max_rps_cap))
    try:
        tapfilter.check_fields(flt)
    except tapfilter.TapFilterError as exc:
        raise ApiError(str(exc)) from None
    to = parse_peer(query.get("to"), query.get("to_namespace"), namespace, "to")
    if to is not None:
        flt.to.CopyFrom(to)
    return flt
