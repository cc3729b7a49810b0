"""The seam between a relay mode and its connection: what each may do to the other.

A mode (tcp.TcpMode, http1_relay.Http1Mode, http2_relay.Http2Mode) turns one connection's bytes
into observer events and forwards them; relay.Connection owns the sockets, flow control, half-close
and the connection's lifecycle. A mode sees its connection only as a `ModeHost`, so a test can drive
a mode by feeding it bytes and reading what it sent, timers included, as the parsers are tested
(tests/unit/agent/test_agent_modes_seam.py).

No cost on the hot path: `send_upstream` and `send_client` are the transports' own bound `write`
methods, stored on the connection when each side connects, so forwarding a chunk is one attribute
read and the transport's write, as before (it was `conn.up.write`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from nodemesh.agent.fairness import SourceLoad
from nodemesh.agent.observe import Observer


class Mode(Protocol):
    """What the connection asks of its mode: bytes from each side, drain, close."""

    protocol: str

    def client_data(self, data: bytes) -> None: ...

    def upstream_data(self, data: bytes) -> None: ...

    def drain(self) -> None:
        """The agent is shutting down: end the connection at its next safe point."""

    def close(self, upstream_clean: bool) -> None:
        """The connection ended: end what is still open (requests, streams), cancel timers."""


class ModeHost(Protocol):
    """What a mode may do to its connection (relay.Connection is the one in the agent)."""

    observer: Observer
    obs: Any                 # the observer's handle of this connection (requests are opened under it)
    slow: bool               # counted as slow by admission until its first request head is complete
    frozen: bool             # being handed over to a newer agent: nothing may close it
    read_bytes: int          # client bytes read so far (the relay counts them)
    write_bytes: int         # bytes written to the client so far (a mode adds what it injects)

    # Bytes forwarded as they came (the relay counts them where they were read). Methods here; in
    # relay.Connection, attributes holding each transport's bound `write`.
    def send_upstream(self, data: bytes) -> None: ...

    def send_client(self, data: bytes) -> None: ...

    @property
    def header_timeout_s(self) -> float:
        """How long a request head may take to arrive (HTTP/1: 408 after it)."""
        ...

    def write_client(self, data: bytes) -> None:
        """Bytes of the agent's own to the client (an error response, a GOAWAY), counted."""

    def head_arrived(self) -> None:
        """The first request head is complete: the connection is no longer slow."""

    def at_boundary(self) -> None:
        """Between two requests (HTTP/1): a draining agent may hand the connection over here."""

    def close_both(self) -> None:
        """Close both sides (what is buffered is still written)."""

    def try_splice(self) -> bool:
        """Opaque TCP: move the sockets to the kernel (agent/splice.py) if possible now. True:
        ask again later; False: done or never."""
        ...

    def linger_close(self) -> None:
        """Our own answer is out: drop the upstream, read and drop what the client still sends."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        """A timer on the connection's loop (cancel it with the handle)."""
        ...

    # For a mode that reads from the transports itself (DirectReads): the relay's per-read
    # accounting, which Connection.data_received and _Upstream.data_received do otherwise.
    load: SourceLoad         # this connection's source's time in the worker (fairness.py)

    def over_budget(self, load: SourceLoad) -> None:
        """The source spent its time budget for this tick: pause its connections (fairness.py)."""


class DirectReads(Protocol):
    """Optional for a mode: once the protocol is decided and both sides are connected, the relay
    points each transport at the protocol objects the mode returns (`transport.set_protocol`), so
    a read is one Python call into the mode instead of two (the connection's, then the mode's).
    Those objects do the relay's per-read accounting (read/write bytes, fairness work) themselves
    and pass every other callback (EOF, loss, flow control) to `client` / `upstream`, the
    protocols the transports had (docs/agent.md "Relay modes")."""

    def reader_protocols(self, client: asyncio.Protocol,
                         upstream: asyncio.Protocol) -> tuple[asyncio.Protocol, asyncio.Protocol]: ...


def not_connected(data: bytes) -> None:
    """`send_upstream`/`send_client` before that side is connected, or after the connection ended."""
    raise ConnectionError("no transport on this side of the connection")
