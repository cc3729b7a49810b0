"""Parent <-> worker message channel: framed pickles over a Unix socketpair, driven by asyncio.

Workers send metrics increments and tap events up; the parent sends identity (snapshots and
deltas) and tap open/close down. Both ends are non-blocking: a worker must never stall its
traffic because the parent is slow, so writes are buffered and, past `max_buffer`, refused
(`send` returns False): a worker keeps refused increments and sends them with the next ones; a
refused identity delta leaves a version gap the worker notices and repairs with a resync.

Messages are tuples whose first item names the kind (see the constants below). Pickle is fine
here: both ends are our own processes, created together, over a private socketpair.

Passing the child end to a worker:
  - multiprocessing (fork, spawn or forkserver): pass the `ChannelEnd` in the Process args; it
    pickles its socket through multiprocessing's fd passing.
  - a plain exec'd child: `pass_fds=[end.fileno()]`, then `ChannelEnd.from_fd(fd)` in the child.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("nodemesh.agent.workerlink")

# worker -> parent
MSG_HELLO = "hello"            # ("hello", worker_index, pid)
MSG_METRICS = "metrics"        # ("metrics", Snapshot)
MSG_TAP_EVENT = "tap_event"    # ("tap_event", TapEvent bytes)
MSG_IDENTITY_RESYNC = "identity_resync"  # ("identity_resync", worker_index): send me the whole identity
# parent -> worker
MSG_IDENTITY = "identity"      # ("identity", ControllerMessage bytes: an IdentitySnapshot or IdentityDelta)
MSG_TAP_OPEN = "tap_open"      # ("tap_open", tap_id, TapFilter bytes)
MSG_TAP_CLOSE = "tap_close"    # ("tap_close", tap_id)
MSG_FLUSH = "flush"            # ("flush",): worker, send a metrics snapshot now

_HEADER = struct.Struct("!I")
_READ_CHUNK = 256 * 1024


class ChannelEnd:
    """One end of a channel. Picklable by multiprocessing (its socket travels as an fd)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    @classmethod
    def from_fd(cls, fd: int) -> ChannelEnd:
        return cls(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd))

    def close(self) -> None:
        self.sock.close()


def make_channel() -> tuple[ChannelEnd, ChannelEnd]:
    """(parent_end, child_end). Close the child end in the parent once the worker has it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.set_inheritable(True)
    b.set_inheritable(True)
    return ChannelEnd(a), ChannelEnd(b)


class Link:
    """A running, non-blocking message endpoint on the current event loop."""

    def __init__(self, end: ChannelEnd, on_message: Callable[[tuple[Any, ...]], None],
                 on_close: Callable[[], None] | None = None, max_buffer: int = 16 * 1024 * 1024) -> None:
        self._end = end
        self._sock = end.sock
        self._on_message = on_message
        self._on_close = on_close
        self._max_buffer = max_buffer
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False
        self.closed = False
        self.dropped = 0               # messages not sent because the buffer was full

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    # ------------------------------------------------------------------ sending
    def send(self, msg: tuple[Any, ...]) -> bool:
        if self.closed:
            return False
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        if len(self._wbuf) + len(data) > self._max_buffer:
            self.dropped += 1
            return False
        self._wbuf += _HEADER.pack(len(data))
        self._wbuf += data
        if not self._writing:
            self._flush()
        return True

    def _flush(self) -> None:
        while self._wbuf:
            try:
                n = self._sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._closed_by_peer()
                return
            del self._wbuf[:n]
        want = bool(self._wbuf)
        if want != self._writing and self._loop is not None:
            if want:
                self._loop.add_writer(self._sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self._sock.fileno())
            self._writing = want

    # ------------------------------------------------------------------ receiving
    def _on_readable(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._closed_by_peer()
                return
            self._rbuf += chunk
            if len(chunk) < _READ_CHUNK:
                break
        self._deliver()

    def _deliver(self) -> None:
        buf = self._rbuf
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            end = pos + _HEADER.size + size
            if len(buf) < end:
                break
            msg = pickle.loads(bytes(buf[pos + _HEADER.size:end]))
            pos = end
            try:
                self._on_message(msg)
            except Exception:  # one bad message must not kill the link
                log.exception("event=workerlink_handler_failed kind=%s", msg[0] if msg else "?")
        if pos:
            del buf[:pos]

    # ------------------------------------------------------------------ closing
    def _closed_by_peer(self) -> None:
        was_open = not self.closed
        self.close()
        if was_open and self._on_close is not None:
            self._on_close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._sock.fileno())
                if self._writing:
                    self._loop.remove_writer(self._sock.fileno())
            except (ValueError, OSError):
                pass
        self._writing = False
        self._end.close()

    async def drain(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until buffered messages are written: for a final snapshot at shutdown."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._wbuf and not self.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
