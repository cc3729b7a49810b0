"""Opaque TCP moved by the kernel: socket → pipe → socket with splice(2), no byte in user space.

Once a connection is known to be opaque TCP (tcp.TcpMode) and nothing of it is held in the agent
(no pending bytes, both transports' write buffers empty), `relay.Connection.try_splice` takes both
sockets away from their uvloop transports and gives them to a `Splice`. Per direction one pipe is
the only buffer: `splice(src → pipe)` when the source is readable and the pipe has room,
`splice(pipe → dst)` while the pipe holds bytes. A slow receiver fills the pipe, then the source's
socket buffer, then TCP's window: the agent never buffers more than the pipe (backpressure as
before, bounded by the pipe size instead of the transport's high-water mark).

Kept from the copying path (relay.py), with the same numbers: bytes counted where they are read
(`read_bytes` from the client, `write_bytes` from the upstream) and reported at close; the source's
fairness work per read (fairness.py) and its throttle (reading paused, writing goes on); half-close
in each direction after the pipe is empty (shutdown SHUT_WR), the connection closed when both
directions ended; an upstream reset answered with a reset to the client, a client reset closing the
upstream; `close_both`/`abort_both` (drain's end, a throttled source) close here.

Handing over to a newer agent (handover.py) works as for a copied connection: frozen means reading
paused on both sides while the pipes empty (the writers go on); once both are empty the duplicates
are sent and `release` closes ours; the successor adopts it as opaque TCP on transports and splices
it again after its first chunk. A half-closed one is not movable (as before) and drains. mTLS
connections are never spliced (TLS needs the bytes; agent/tunnel.py).

fd ownership (see tests/unit/agent/test_agent_relay_fd_ownership.py): the sockets are dup()ed and
the Splice owns the duplicates, the transports are closed (their fds, and libuv's epoll entries for
them, go with them; the duplicates are registered anew). Nothing else holds the duplicate numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("nodemesh.agent.splice")

HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_NONBLOCK")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
PIPE_SIZE = 256 * 1024     # asked per direction; bounded by /proc/sys/fs/pipe-max-size
# Pipes are charged at their full size against the user's pipe pages (pipe-user-pages-soft,
# 16,384 pages by default), and the agent's user (root) is shared with every root process of the
# node, pods included: past the soft limit each new pipe of that user gets 8 KiB. So a worker
# splices at most this many connections at once (2 pipes of 64 pages each: 4,096 pages), and only
# connections that carry bulk (relay.Connection.try_splice: after `splice_after_bytes`); the
# rest stay on the copying path.
MAX_SPLICED = 16
MIN_PIPE = 64 * 1024       # a pipe the kernel made smaller (the soft limit reached): no splice
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
_LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"


_accel_marker: str | None = None


def sockmap_accelerated() -> bool:
    """`--accelerate sockmap` is pinned on this node (redirector/sockmap.py). Its sk_msg program
    puts a pod's sends straight into the agent socket's BPF ingress queue, which only recvmsg
    reads: splice(2) reads the TCP receive queue and would wait for bytes that never come there
    (seen: the mesh tests' bulk and banner connections hung with `ebpf+sockmap`). So while it is
    on, nothing is spliced. One stat per connection about to be spliced (a path cached once)."""
    global _accel_marker
    if _accel_marker is None:
        from nodemesh.agent.capture import bpf_dir
        from nodemesh.redirector.sockmap import accel_dir

        _accel_marker = f"{accel_dir(bpf_dir())}/nm_stats"
    return os.path.exists(_accel_marker)


def pipe_size_limit() -> int:
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return 64 * 1024


class _Direction:
    """One way: `src` socket → pipe → `dst` socket."""

    __slots__ = ("capacity", "dst", "eof", "full", "in_pipe", "pr", "pw", "shut", "src")

    def __init__(self, src: int, dst: int, size: int) -> None:
        self.src, self.dst = src, dst
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = 64 * 1024
        try:
            fcntl.fcntl(self.pw, F_SETPIPE_SZ, size)
        except OSError:
            pass   # over the user's pipe pages (pipe-user-pages-soft): the default size still works
        with contextlib.suppress(OSError):
            self.capacity = fcntl.fcntl(self.pw, F_GETPIPE_SZ)
        if self.capacity < MIN_PIPE:
            self.close()
            raise OSError(errno.ENOBUFS, f"pipe of {self.capacity} bytes: the user's pipe pages are spent")
        self.in_pipe = 0       # bytes in the pipe now
        self.eof = False       # src sent FIN
        self.shut = False      # FIN passed on to dst (after the pipe emptied)
        # The pipe refused more (EAGAIN with bytes in it): its slots are pages, and socket data
        # comes in fragments, so it can be full below `capacity` bytes. Reading waits for the next
        # write to dst: with the reader armed the level-triggered poll would spin on a readable
        # source while a slow receiver keeps the pipe full.
        self.full = False

    def close(self) -> None:
        for fd in (self.pr, self.pw):
            with contextlib.suppress(OSError):
                os.close(fd)


class Splice:
    """Both directions of one connection. `on_bytes(upstream, n)` counts n bytes read from the
    client (upstream False) or the upstream (True) and returns False to stop reading (throttled);
    `on_end(error, upstream_side)` is called once, after both sockets are closed."""

    __slots__ = (
        "_readers",
        "_writers",
        "c2u",
        "client",
        "ended",
        "loop",
        "on_bytes",
        "on_end",
        "paused",
        "u2c",
        "up",
    )

    live = 0   # Splices running in this process (at most MAX_SPLICED)

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket, up: socket.socket,
                 on_bytes: Callable[[bool, int], bool], on_end: Callable[[str | None, bool], None],
                 pipe_size: int = PIPE_SIZE) -> None:
        self.loop = loop
        self.client, self.up = client, up
        self.on_bytes, self.on_end = on_bytes, on_end
        size = min(pipe_size, pipe_size_limit())
        cfd, ufd = client.fileno(), up.fileno()
        self.c2u = _Direction(cfd, ufd, size)
        try:
            self.u2c = _Direction(ufd, cfd, size)
        except OSError:
            self.c2u.close()
            raise
        self.paused = False
        self.ended = False
        Splice.live += 1
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    def start(self, paused: bool = False) -> None:
        self.paused = paused
        self._arm(self.c2u)
        self._arm(self.u2c)

    # -- readiness ---------------------------------------------------------------------------

    def _arm(self, d: _Direction) -> None:
        """Register exactly the interest this direction has now."""
        if self.ended:
            return
        want_read = not d.eof and not self.paused and not d.full and d.in_pipe < d.capacity
        cb_read = self._on_readable_c if d is self.c2u else self._on_readable_u
        if want_read and d.src not in self._readers:
            self._readers.add(d.src)
            self.loop.add_reader(d.src, cb_read)
        elif not want_read and d.src in self._readers:
            self._readers.discard(d.src)
            self.loop.remove_reader(d.src)
        want_write = d.in_pipe > 0
        cb_write = self._on_writable_u if d is self.c2u else self._on_writable_c
        if want_write and d.dst not in self._writers:
            self._writers.add(d.dst)
            self.loop.add_writer(d.dst, cb_write)
        elif not want_write and d.dst in self._writers:
            self._writers.discard(d.dst)
            self.loop.remove_writer(d.dst)

    def _on_readable_c(self) -> None:
        self._read(self.c2u, False)

    def _on_readable_u(self) -> None:
        self._read(self.u2c, True)

    def _on_writable_u(self) -> None:
        self._write(self.c2u, True)

    def _on_writable_c(self) -> None:
        self._write(self.u2c, False)

    # -- moving bytes ------------------------------------------------------------------------

    def _read(self, d: _Direction, from_up: bool) -> None:
        if self.ended:
            return
        try:
            n = os.splice(d.src, d.pw, d.capacity - d.in_pipe, flags=_FLAGS)
        except OSError as exc:
            if exc.errno in _AGAIN:
                if d.in_pipe:
                    d.full = True
                    self._arm(d)
                return
            self._failed(exc, from_up)
            return
        if n == 0:
            d.eof = True
        else:
            d.in_pipe += n
            if not self.on_bytes(from_up, n):
                self.pause()
            if self.ended:
                return
        self._write(d, not from_up)

    def _write(self, d: _Direction, to_up: bool) -> None:
        if self.ended:
            return
        while d.in_pipe:
            try:
                n = os.splice(d.pr, d.dst, d.in_pipe, flags=_FLAGS)
            except OSError as exc:
                if exc.errno in _AGAIN:
                    break
                self._failed(exc, to_up)
                return
            if n == 0:
                break
            d.in_pipe -= n
            d.full = False
        if d.eof and not d.in_pipe and not d.shut:
            d.shut = True
            try:
                (self.up if to_up else self.client).shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._failed(exc, to_up)
                return
            if self.c2u.shut and self.u2c.shut:
                self.close(None, False)
                return
        self._arm(d)

    # -- flow control (fairness) -------------------------------------------------------------

    def pause(self) -> None:
        """Stop reading both sides (what is in the pipes is still written)."""
        if not self.paused:
            self.paused = True
            self._arm(self.c2u)
            self._arm(self.u2c)

    def resume(self) -> None:
        if self.paused and not self.ended:
            self.paused = False
            self._arm(self.c2u)
            self._arm(self.u2c)

    # -- the end -----------------------------------------------------------------------------

    def _failed(self, exc: OSError, upstream_side: bool) -> None:
        """A socket error on one side: as the copying relay does, an upstream error resets the
        client; a client error closes the upstream."""
        self.close(type(exc).__name__, upstream_side)

    def close(self, error: str | None, upstream_side: bool, abort: bool = False) -> None:
        if self.ended:
            return
        self.ended = True
        Splice.live -= 1
        self._unregister()
        if error is not None and upstream_side:
            with contextlib.suppress(OSError):
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self.c2u.close()
        self.u2c.close()
        self.client.close()
        self.up.close()
        self.on_end(error, upstream_side)

    def movable(self) -> bool:
        """Could be handed over (handover.py): running, neither direction half-closed."""
        return not self.ended and not (self.c2u.eof or self.u2c.eof or self.c2u.shut or self.u2c.shut)

    def fds(self) -> list[int]:
        return [self.client.fileno(), self.up.fileno()]

    def release(self) -> None:
        """Handed over (handover.py): the successor holds the sockets now. Ours are closed without
        a word (no shutdown, no reset); the connection's end is the hand-over's, not `on_end`."""
        if self.ended:
            return
        self.ended = True
        Splice.live -= 1
        self._unregister()
        self.c2u.close()
        self.u2c.close()
        self.client.close()
        self.up.close()

    def _unregister(self) -> None:
        for fd in self._readers:
            self.loop.remove_reader(fd)
        for fd in self._writers:
            self.loop.remove_writer(fd)
        self._readers.clear()
        self._writers.clear()

    def buffered(self) -> int:
        """Bytes in the pipes now (what the agent holds for this connection)."""
        return self.c2u.in_pipe + self.u2c.in_pipe
