"""What the user typed -> the controller's request messages, validated.

Pure functions (no I/O), unit-tested: resource arguments in kubectl's forms, time windows, label
selectors and the --from/--to flags become StatRequest, EdgesRequest and TapRequest. Every
mistake is a CliError with one line saying what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nodemesh.api import labelselector, tapfilter
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import Selector, SelectorError, WindowError, parse_selector
from nodemesh.api.model import parse_window as model_parse_window
from nodemesh.cli.client import CliError

DEFAULT_WINDOW = "1m"
DEFAULT_NAMESPACE = "default"
DEFAULT_MAX_RPS = 100.0

def parse_window(text: str) -> int:
    """`10s`, `1m`, `90s`, `1m30s`, `1h` -> seconds, within [10 s, 1 h] (the controller keeps 1 h)."""
    try:
        return model_parse_window(text)
    except WindowError as exc:
        raise CliError(str(exc)) from None


def selector(text: str) -> Selector:
    try:
        return parse_selector(text)
    except SelectorError as exc:
        raise CliError(str(exc)) from None


def parse_resources(args: Sequence[str]) -> list[Selector]:
    """kubectl's forms: `TYPE`, `TYPE NAME...`, or `TYPE/NAME...` (not mixed)."""
    if not args:
        raise CliError("you must specify a resource type (e.g. deploy, po, ns, all) or TYPE/NAME")
    if "/" not in args[0]:
        kind = selector(args[0])
        if len(args) == 1:
            return [kind]
        if any("/" in a for a in args[1:]):
            raise CliError("there is no need to specify a resource type as a separate argument when "
                           "passing arguments in resource/name form (e.g. 'nodemesh stat deploy/web')")
        if kind.type == "all":
            raise CliError("'all' takes no names")
        return [Selector(kind.type, name) for name in args[1:]]
    parsed = []
    for arg in args:
        if "/" not in arg:
            raise CliError(f"mixed arguments: {arg!r} is not in TYPE/NAME form like {args[0]!r}")
        parsed.append(selector(arg))
    return parsed


def check_label_selector(text: str) -> str:
    """Parse with the controller's own grammar (api/labelselector.py, Kubernetes') so a typo is one
    clear line here, before anything is sent; the controller checks again and filters with it."""
    if not text:
        return ""
    try:
        labelselector.parse(text)
    except labelselector.LabelSelectorError as exc:
        raise CliError(str(exc)) from None
    return text.strip()


def _resource(sel: Selector, namespace: str) -> pb.Resource:
    return pb.Resource(namespace="" if sel.type == "namespace" else namespace, type=sel.type, name=sel.name)


def _peer_flag(text: str | None, namespace: str | None, default_ns: str, flag: str) -> pb.Resource | None:
    if not text:
        return None
    sel = selector(text)
    if sel.type == "all":
        raise CliError(f"{flag} does not accept 'all'")
    return _resource(sel, namespace or default_ns)


def build_stat_requests(
    resources: Sequence[str], *, namespace: str = DEFAULT_NAMESPACE, all_namespaces: bool = False,
    from_: str | None = None, from_namespace: str | None = None, to: str | None = None,
    to_namespace: str | None = None, window: str = DEFAULT_WINDOW, label_selector: str = "",
) -> list[pb.StatRequest]:
    """One StatRequest per resource argument; the CLI merges the rows as Linkerd does."""
    targets = parse_resources(resources)
    if from_ and to:
        raise CliError("--to and --from flags are mutually exclusive")
    if from_namespace and not from_:
        raise CliError("--from-namespace needs --from")
    if to_namespace and not to:
        raise CliError("--to-namespace needs --to")
    if (from_ or to) and any(t.type == "all" for t in targets):
        raise CliError("'all' cannot be combined with --from or --to")
    window_s = parse_window(window)
    labels = check_label_selector(label_selector)
    ns = "" if all_namespaces else namespace
    src = _peer_flag(from_, from_namespace, namespace, "--from")
    dst = _peer_flag(to, to_namespace, namespace, "--to")
    requests = []
    for target in targets:
        req = pb.StatRequest(
            selector=_resource(target, ns), all_namespaces=all_namespaces, window_seconds=window_s,
            label_selector=labels,
        )
        if src is not None:
            getattr(req, "from").CopyFrom(src)  # `from` is a Python keyword
        if dst is not None:
            req.to.CopyFrom(dst)
        requests.append(req)
    return requests


def build_routes_request(
    resource: str, *, namespace: str = DEFAULT_NAMESPACE, to: str | None = None, to_namespace: str | None = None,
    window: str = DEFAULT_WINDOW,
) -> pb.RoutesRequest:
    """One RoutesRequest: a single TYPE/NAME (routes are per resource, as Linkerd's)."""
    targets = parse_resources([resource])
    target = targets[0]
    if not target.name:
        raise CliError(f"routes need one resource by name, e.g. {target}/NAME")
    if to_namespace and not to:
        raise CliError("--to-namespace needs --to")
    req = pb.RoutesRequest(selector=_resource(target, namespace), window_seconds=parse_window(window))
    dst = _peer_flag(to, to_namespace, namespace, "--to")
    if dst is not None:
        req.to.CopyFrom(dst)
    return req


def build_edges_request(
    resource: str, *, namespace: str = DEFAULT_NAMESPACE, all_namespaces: bool = False,
    window: str = DEFAULT_WINDOW,
) -> pb.EdgesRequest:
    target = selector(resource)
    if target.type == "all":
        raise CliError("edges needs one resource type (e.g. deploy, po), not 'all'")
    if target.name:
        raise CliError("edges takes a resource type only (e.g. 'nodemesh edges deploy')")
    return pb.EdgesRequest(
        selector=_resource(target, "" if all_namespaces else namespace), all_namespaces=all_namespaces,
        window_seconds=parse_window(window),
    )


def build_tap_request(
    resource: Sequence[str], *, namespace: str = DEFAULT_NAMESPACE, to: str | None = None,
    to_namespace: str | None = None, method: str | None = None, path: str | None = None,
    authority: str | None = None, scheme: str | None = None, max_rps: float = DEFAULT_MAX_RPS,
) -> pb.TapRequest:
    targets = parse_resources(resource)
    if len(targets) != 1:
        raise CliError("tap takes one resource: TYPE, TYPE NAME or TYPE/NAME")
    target = targets[0]
    if target.type == "all":
        raise CliError("tap does not accept 'all': tap a namespace instead (e.g. ns/default)")
    if to_namespace and not to:
        raise CliError("--to-namespace needs --to")
    if not 0 < max_rps < math.inf:  # also refuses nan (0 would mean "the controller's default")
        raise CliError(f"--max-rps must be positive, got {max_rps:g}")
    flt = pb.TapFilter(
        target=_resource(target, namespace), method=method or "", path_prefix=path or "",
        authority=authority or "", scheme=scheme or "", max_rps=max_rps,
    )
    try:
        tapfilter.check_fields(flt, lambda field: "--" + field.replace("_", "-"))
    except tapfilter.TapFilterError as exc:
        raise CliError(str(exc)) from None
    dst = _peer_flag(to, to_namespace, namespace, "--to")
    if dst is not None:
        flt.to.CopyFrom(dst)
    return pb.TapRequest(filter=flt)
