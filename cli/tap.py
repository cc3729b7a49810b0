"""`nodemesh tap`: live requests matching a filter, one line per event, until Ctrl-C.

The controller opens taps only on the agents that can see matching traffic; cancelling our
stream (Ctrl-C, a closed pipe) is what makes it close them everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any

import click
import grpc
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.cli import render
from nodemesh.cli.client import ClientConfig, CliError, Controller, connect, controller_options
from nodemesh.cli.query import DEFAULT_MAX_RPS, DEFAULT_NAMESPACE, build_tap_request

OUTPUTS = ("", "wide", "json")

_END = object()


def tap_filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The filter flags `tap` and `top` share."""
    options = [
        click.argument("resource", nargs=-1, metavar="(TYPE [NAME] | TYPE/NAME)"),
        click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True,
                     help="Namespace of the resource."),
        click.option("--to", metavar="TYPE/NAME", help="Only requests to this resource."),
        click.option("--to-namespace", metavar="NS", help="Namespace of --to (default: --namespace)."),
        click.option("--method", help="Only requests with this HTTP method."),
        click.option("--path", help="Only requests whose path starts with this prefix."),
        click.option("--authority", help="Only requests with this :authority (Host)."),
        click.option("--scheme", help="Only requests with this scheme (http, https)."),
        click.option("--max-rps", type=float, default=DEFAULT_MAX_RPS, show_default=True,
                     help="Maximum requests per second to tap."),
    ]
    for option in reversed(options):
        func = option(func)
    return controller_options(func)


def events(ctl: Controller, request: pb.TapRequest, stop: threading.Event) -> Generator[pb.TapEvent | None]:
    """Tap events read on a helper thread, so the main thread stays free for Ctrl-C and timers.

    Yields None every `tick` while idle (callers refresh displays then) and returns when the
    server ends the stream; raises CliError on a stream failure. Cancels the call on exit.
    """
    call = ctl.stream("Tap", request)
    inbox: queue.Queue[Any] = queue.Queue(maxsize=10_000)

    def pump() -> None:
        try:
            for event in call:
                inbox.put(event)
        except grpc.RpcError as exc:
            inbox.put(exc)
        finally:
            inbox.put(_END)

    reader = threading.Thread(target=pump, name="nodemesh-tap", daemon=True)
    reader.start()
    try:
        while not stop.is_set():
            try:
                item = inbox.get(timeout=0.2)
            except queue.Empty:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, grpc.RpcError):
                if item.code() == grpc.StatusCode.CANCELLED and stop.is_set():
                    return
                raise ctl.error(item)
            yield item
    finally:
        call.cancel()
        reader.join(timeout=2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@tap_filter_options
@click.option("-o", "--output", default="", help="Output format: wide or json (default: plain lines).")
def tap(
    resource: tuple[str, ...], namespace: str, to: str | None, to_namespace: str | None, method: str | None,
    path: str | None, authority: str | None, scheme: str | None, max_rps: float, output: str,
    client: ClientConfig,
) -> None:
    """Watch live requests from or to a resource, until Ctrl-C.

    \b
    Examples:
      nodemesh tap deploy/web -n emojivoto
      nodemesh tap deploy/web --to deploy/voting --path /emojivoto.v1 -o wide
    """
    from nodemesh.cli.stat import check_output

    output = check_output(output, OUTPUTS)
    request = build_tap_request(
        resource, namespace=namespace, to=to, to_namespace=to_namespace, method=method, path=path,
        authority=authority, scheme=scheme, max_rps=max_rps,
    )
    line: Callable[[pb.TapEvent], str] = (
        render.tap_json if output == "json" else functools.partial(render.tap_line, wide=output == "wide")
    )
    run_stream(client, request, lambda event: click.echo(line(event)))


def run_stream(
    config: ClientConfig, request: pb.TapRequest, on_event: Callable[[pb.TapEvent], None],
    on_idle: Callable[[], None] | None = None,
) -> None:
    """Drive a tap stream until it ends, Ctrl-C, or the reader of our output goes away; exit 0 then."""
    stop = threading.Event()
    # Ctrl-C sets `stop` instead of raising KeyboardInterrupt wherever the main thread happens to be:
    # raised inside queue.get's lock handling it surfaced as "RuntimeError: release unlocked lock".
    # The loop sees `stop` within one idle tick and cancels the call.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with connect(config) as ctl, contextlib.closing(events(ctl, request, stop)) as stream:
            for event in stream:
                if event is None:
                    if on_idle is not None:
                        on_idle()
                else:
                    on_event(event)
    except KeyboardInterrupt:
        stop.set()  # `events` cancelled the call in its finally: the controller closes the taps
    except BrokenPipeError:
        stop.set()
        # Python flushes stdout again at exit; point it at /dev/null so that is silent too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except CliError:
        stop.set()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
