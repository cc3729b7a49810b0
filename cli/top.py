"""`nodemesh top`: a live table of the busiest request paths, aggregated from tap.

`TopTable` is the sans-IO part (tap events in, sorted rows out); the command only moves events
from the stream into it and redraws: with rich.live on a terminal, or by printing a plain
snapshot every `--interval` seconds (and a last one at the end) when the output is not a tty.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import click
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli import render
from nodemesh.cli.client import ClientConfig
from nodemesh.cli.query import build_tap_request
from nodemesh.cli.tap import run_stream, tap_filter_options

MAX_OUTSTANDING = 10_000  # requests whose end we still wait for; older ones are dropped


@dataclass(slots=True)
class TopRow:
    source: str
    destination: str
    method: str
    path: str
    count: int = 0
    best_us: int = 0
    worst_us: int = 0
    last_us: int = 0
    successes: int = 0
    failures: int = 0

    def add(self, latency_us: int, success: bool) -> None:
        if self.count == 0 or latency_us < self.best_us:
            self.best_us = latency_us
        self.worst_us = max(self.worst_us, latency_us)
        self.last_us = latency_us
        self.count += 1
        if success:
            self.successes += 1
        else:
            self.failures += 1

    @property
    def success_rate(self) -> float | None:
        total = self.successes + self.failures
        return self.successes / total if total else None


@dataclass(slots=True)
class _Pending:
    source: str
    destination: str
    method: str
    path: str
    http_status: int = 0


def _peer_name(peer: pb.Peer) -> str:
    # Linkerd's top names peers by pod, falling back to the bare IP (ports differ per connection).
    return peer.pod or peer.ip


def classify(http_status: int, end: pb.ResponseEnd) -> bool:
    """Success as ARCHITECTURE.md defines it: no reset, gRPC status 0 when present, else HTTP < 500."""
    if end.reset_error:
        return False
    if end.has_grpc_status:
        return end.grpc_status == 0
    return 0 < http_status < 500


class TopTable:
    """Completed requests grouped by (source, destination, method, path)."""

    def __init__(self, max_outstanding: int = MAX_OUTSTANDING) -> None:
        self._pending: OrderedDict[tuple[str, str, str, str], _Pending] = OrderedDict()
        self._rows: dict[tuple[str, str, str, str], TopRow] = {}
        self._max_outstanding = max_outstanding
        self.version = 0  # bumps on every change, so displays redraw only when needed

    def add(self, event: pb.TapEvent) -> None:
        # The same request id can be seen by two agents (outbound and inbound): keep them apart.
        key = (
            event.direction,
            render.format_addr(event.source.ip, event.source.port),
            render.format_addr(event.destination.ip, event.destination.port),
            event.request_id,
        )
        kind = event.WhichOneof("event")
        if kind == "request_init":
            self._pending[key] = _Pending(
                _peer_name(event.source), _peer_name(event.destination),
                event.request_init.method, event.request_init.path,
            )
            if len(self._pending) > self._max_outstanding:
                self._pending.popitem(last=False)
        elif kind == "response_init":
            pending = self._pending.get(key)
            if pending is not None:
                pending.http_status = event.response_init.http_status
        elif kind == "response_end":
            done = self._pending.pop(key, None)
            if done is None:
                return  # the tap opened after this request started: nothing to attribute it to
            row_key = (done.source, done.destination, done.method, done.path)
            row = self._rows.get(row_key)
            if row is None:
                row = self._rows[row_key] = TopRow(*row_key)
            row.add(event.response_end.since_request_init_us, classify(done.http_status, event.response_end))
            self.version += 1

    def rows(self) -> list[TopRow]:
        # sorted() is stable: equal counts keep first-seen order, so rows do not jitter
        return sorted(self._rows.values(), key=lambda r: -r.count)


TOP_COLUMNS = (
    render.Column("Source"), render.Column("Destination"), render.Column("Method"), render.Column("Path"),
    render.Column("Count", right=True), render.Column("Best", right=True), render.Column("Worst", right=True),
    render.Column("Last", right=True), render.Column("Success Rate", right=True),
)


def top_snapshot(table: TopTable) -> str:
    rows = [
        [r.source, r.destination, r.method, r.path, str(r.count), render.go_duration(r.best_us),
         render.go_duration(r.worst_us), render.go_duration(r.last_us), render.fmt_percent(r.success_rate)]
        for r in table.rows()
    ]
    # Linkerd's top spaces its columns by two
    return render.format_table(TOP_COLUMNS, rows, gap="  ")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@tap_filter_options
@click.option("--interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between redraws (default: 0.5 on a terminal, 5 otherwise).")
def top(
    resource: tuple[str, ...], namespace: str, to: str | None, to_namespace: str | None, method: str | None,
    path: str | None, authority: str | None, scheme: str | None, max_rps: float, interval: float | None,
    client: ClientConfig,
) -> None:
    """A live table of the busiest paths of a resource, from tap, until Ctrl-C.

    \b
    Example:
      nodemesh top deploy/web -n emojivoto
    """
    request = build_tap_request(
        resource, namespace=namespace, to=to, to_namespace=to_namespace, method=method, path=path,
        authority=authority, scheme=scheme, max_rps=max_rps,
    )
    table = TopTable()
    if sys.stdout.isatty():
        _run_live(client, request, table, interval or 0.5)
    else:
        _run_plain(client, request, table, interval or 5.0)


def _run_live(config: ClientConfig, request: pb.TapRequest, table: TopTable, interval: float) -> None:
    from rich.live import Live
    from rich.text import Text

    def frame() -> Text:
        return Text("(press Ctrl-C to quit)\n\n" + top_snapshot(table), no_wrap=True, overflow="crop")

    with Live(frame(), refresh_per_second=max(1.0, 1 / interval), screen=False, transient=False) as live:
        shown = [-1]

        def redraw() -> None:
            if table.version != shown[0]:
                shown[0] = table.version
                live.update(frame())

        last = [time.monotonic()]

        def on_event(event: pb.TapEvent) -> None:
            table.add(event)
            if time.monotonic() - last[0] >= interval:
                last[0] = time.monotonic()
                redraw()

        run_stream(config, request, on_event, on_idle=redraw)
        redraw()


def _run_plain(config: ClientConfig, request: pb.TapRequest, table: TopTable, interval: float) -> None:
    printed = [-1]
    last = [time.monotonic()]

    def maybe_print(force: bool = False) -> None:
        now = time.monotonic()
        if table.version != printed[0] and (force or now - last[0] >= interval):
            if printed[0] != -1:
                click.echo()
            click.echo(top_snapshot(table), nl=False)
            printed[0] = table.version
            last[0] = now

    def on_event(event: pb.TapEvent) -> None:
        table.add(event)
        maybe_print()

    run_stream(config, request, on_event, on_idle=maybe_print)
    maybe_print(force=True)  # the stream ended or Ctrl-C: show where it stopped
