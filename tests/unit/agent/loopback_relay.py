"""What the agent's loopback unit tests share (no root): a worker's relay listening on 127.0.0.1,
whose own address the endpoint picker maps to a real upstream, so the agent proxies without a
capture rule (transparent mode off); a uvloop runner that fails on any exception the loop
swallowed; an echo server; waiting for a condition; an observer that records closes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from nodemesh.agent.admission import Admission
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.endpoints import EndpointPicker
from nodemesh.agent.modes import make_mode
from nodemesh.agent.observe import ConnectionEnd, ConnectionMeta, RequestEnd, RequestHead
from nodemesh.agent.relay import Connection, WorkerContext
from nodemesh.agent.sockets import listen_socket

Address = tuple[str, int]


class LoopIndex:
    """The pod index as the endpoint picker asks it: the listener's own address is a Service whose
    one endpoint is `upstream`."""

    def __init__(self, listen: Address, upstream: Address) -> None:
        self.listen, self.upstream = listen, upstream

    def service_endpoints(self, ip: str, port: int) -> list[Address] | None:
        return [self.upstream] if (ip, port) == self.listen else None


async def serve(observer: Any, upstream: Address | Callable[[Address], Any], admission: Admission | None = None,
                **config: Any) -> tuple[asyncio.Server, int, WorkerContext]:
    """The relay on a loopback port; `upstream` an address, or a function of the listener's address
    that returns the index to pick endpoints from. Returns the server, its port and the context."""
    sock = listen_socket("127.0.0.1", 0)
    listen = ("127.0.0.1", sock.getsockname()[1])
    index = upstream(listen) if callable(upstream) else LoopIndex(listen, upstream)
    cfg = AgentConfig(node="n", transparent=False, outbound_port=1, inbound_port=2, admin_port=3, workers=1,
                      **config)
    ctx = WorkerContext(cfg, observer, EndpointPicker(index), make_mode, admission)
    server = await asyncio.get_running_loop().create_server(lambda: Connection(ctx, "outbound"), sock=sock)
    return server, listen[1], ctx


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run on uvloop (what the workers run) and fail on any exception the loop swallowed."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        await scenario()

    uvloop.run(main())
    assert not errors, errors


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def echo_server() -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class Recorder:
    """An observer that keeps each connection's protocol and how it closed."""

    def __init__(self) -> None:
        self.closes: list[str | None] = []
        self.protocols: list[str] = []

    def connection_open(self, meta: ConnectionMeta) -> Any:
        self.protocols.append(meta.protocol)
        return meta

    def connection_close(self, conn: Any, end: ConnectionEnd) -> None:
        self.closes.append(end.error)

    def request_start(self, conn: Any, head: RequestHead) -> Any:
        return head

    def response_start(self, req: Any, status: int, headers: list[tuple[str, str]], at: float) -> None:
        pass

    def request_end(self, req: Any, end: RequestEnd) -> None:
        pass


async def start(upstream: Address, admission: Admission, **config: Any) -> tuple[asyncio.Server, int,
                                                                                 WorkerContext, Recorder]:
    """`serve` with a Recorder and the given admission (the fault tests')."""
    rec = Recorder()
    server, port, ctx = await serve(rec, upstream, admission, **config)
    return server, port, ctx, rec
