"""CLI test kit (imported by the test_cli_* modules): a real grpc server on loopback serving canned Controller answers, and golden files.

The fake servicer stands in for the controller only for rendering tests: what it returns is set
by each test, what it received (requests, metadata, cancellation) is recorded for assertions.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from click.testing import CliRunner, Result
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.cli.main import cli

TESTDATA = Path(__file__).parent / "testdata"


def assert_golden(name: str, actual: str) -> None:
    """Compare with testdata/<name>.golden; UPDATE_GOLDEN=1 rewrites it instead."""
    path = TESTDATA / f"{name}.golden"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"missing golden file {path} (run with UPDATE_GOLDEN=1)"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, f"output differs from {path}:\n--- expected\n{expected}--- actual\n{actual}"


@dataclass
class FakeController(pb_grpc.ControllerServicer):
    stat: dict[str, pb.StatResponse] = field(default_factory=dict)  # by selector type
    edges: pb.EdgesResponse = field(default_factory=pb.EdgesResponse)
    routes: pb.RoutesResponse = field(default_factory=pb.RoutesResponse)
    check: pb.CheckResponse = field(default_factory=pb.CheckResponse)
    tap_events: list[pb.TapEvent] = field(default_factory=list)
    tap_hold_open: bool = False          # keep the stream open after the events (Ctrl-C tests)
    abort: tuple[grpc.StatusCode, str] | None = None
    requests: list[Any] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    tap_cancelled: threading.Event = field(default_factory=threading.Event)

    def _record(self, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.abort is not None:
            context.abort(*self.abort)

    def StatSummary(self, request: pb.StatRequest, context: grpc.ServicerContext) -> pb.StatResponse:
        self._record(request, context)
        return self.stat.get(request.selector.type, pb.StatResponse())

    def Edges(self, request: pb.EdgesRequest, context: grpc.ServicerContext) -> pb.EdgesResponse:
        self._record(request, context)
        return self.edges

    def Routes(self, request: pb.RoutesRequest, context: grpc.ServicerContext) -> pb.RoutesResponse:
        self._record(request, context)
        return self.routes

    def Check(self, request: pb.CheckRequest, context: grpc.ServicerContext) -> pb.CheckResponse:
        self._record(request, context)
        return self.check

    def Tap(self, request: pb.TapRequest, context: grpc.ServicerContext) -> Iterator[pb.TapEvent]:
        self._record(request, context)
        context.add_callback(self.tap_cancelled.set)
        yield from self.tap_events
        while self.tap_hold_open and context.is_active():
            time.sleep(0.02)


@dataclass
class Served:
    fake: FakeController
    address: str

    def run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """`nodemesh <args> --controller <this server>` through click's CliRunner."""
        runner = CliRunner()
        full_env = {"NODEMESH_CONTROLLER": self.address, "NODEMESH_TOKEN": "", **(env or {})}
        return runner.invoke(cli, list(args), env=full_env, catch_exceptions=False)


# ---------------------------------------------------------------------------- canned data


def stat_row(
    ns: str, type_: str, name: str, *, meshed: int = 1, total: int = 1, status: str = "",
    ok: int = 0, fail: int = 0, rps: float = 0.0, p50: float = 0, p95: float = 0, p99: float = 0,
    tcp: float = 0, read: float = 0, write: float = 0, traffic: bool = True, has_tcp: bool | None = None,
) -> pb.StatRow:
    return pb.StatRow(
        resource=pb.Resource(namespace=ns, type=type_, name=name), meshed_pods=meshed, total_pods=total,
        status=status, has_traffic=traffic, success_count=ok, failure_count=fail, rps=rps,
        latency_ms_p50=p50, latency_ms_p95=p95, latency_ms_p99=p99, tcp_open_connections=tcp,
        tcp_read_bytes_rate=read, tcp_write_bytes_rate=write, has_tcp=traffic if has_tcp is None else has_tcp,
    )


def peer(ip: str, port: int, ns: str = "", pod: str = "", kind: str = "", name: str = "") -> pb.Peer:
    p = pb.Peer(ip=ip, port=port, namespace=ns, pod=pod)
    if kind:
        p.owner.CopyFrom(pb.Resource(namespace=ns, type=kind, name=name))
    return p


WEB = {"ip": "10.244.1.5", "port": 43210, "ns": "emojivoto", "pod": "web-7d9f-abcde", "kind": "deployment", "name": "web"}
EMOJI = {"ip": "10.244.2.7", "port": 8080, "ns": "emojivoto", "pod": "emoji-5c6b-fghij", "kind": "deployment", "name": "emoji"}
VOTING = {"ip": "10.244.2.9", "port": 8080, "ns": "emojivoto", "pod": "voting-6f4d-klmno", "kind": "deployment",
              "name": "voting"}


def tap_request_events(
    rid: str, src: dict[str, Any], dst: dict[str, Any], *, method: str = "POST",
    path: str = "/emojivoto.v1.EmojiService/ListAll", authority: str = "emoji-svc.emojivoto:8080",
    status: int = 200, latency_us: int = 1500, duration_us: int = 1800, grpc_status: int | None = 0,
    reset: str = "", length: int = 2161, direction: str = "outbound",
) -> list[pb.TapEvent]:
    """The three events of one request: req, rsp (unless reset before headers) and end."""
    base = {"request_id": rid, "direction": direction, "source": peer(**src), "destination": peer(**dst),
                "node": "node-1", "time_ms": 1_700_000_000_000}
    out = [pb.TapEvent(**base, request_init=pb.RequestInit(
        method=method, scheme="http", authority=authority, path=path,
        headers=[pb.Header(name="content-type", value="application/grpc")]))]
    if status:
        out.append(pb.TapEvent(**base, response_init=pb.ResponseInit(
            http_status=status, since_request_init_us=latency_us)))
    end = pb.ResponseEnd(since_request_init_us=duration_us, response_bytes=length, reset_error=reset)
    if grpc_status is not None and not reset:
        end.has_grpc_status = True
        end.grpc_status = grpc_status
    out.append(pb.TapEvent(**base, response_end=end))
    return out
