"""HTTP/2 and gRPC classification for a frame-level relay (sans-IO).

Frames are forwarded untouched by the relay; this module walks the frame headers of both
directions and decodes only header blocks (HEADERS, CONTINUATION, PUSH_PROMISE) with `hpack`,
one decoder per direction so its dynamic table stays in step with the peer's encoder. Every
stream is a request: its request head, response head (`:status`, first non-1xx), end (both
sides' END_STREAM, or RST_STREAM, or a GOAWAY that excludes it) and `grpc-status` (trailers or
a trailers-only response). Flow control is end to end: WINDOW_UPDATE and SETTINGS pass through.

docs/agent.md has the measurement that chose this over terminating both sides with `h2`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from h2.errors import ErrorCodes
from hpack import Decoder
from hpack.exceptions import HPACKError
from nodemesh.agent.detect import H2_PREFACE

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
MAX_HEADER_BLOCK = 1024 * 1024      # a header block larger than this: ENHANCE_YOUR_CALM
DRAIN_PING = b"nmdrain!"
CACHE_BLOCK_MAX = 512               # header blocks up to this size may be remembered
CACHE_ENTRIES = 256                 # remembered blocks per direction (cleared when full)


class CachingDecoder:
    """An hpack Decoder that remembers header blocks which left the dynamic table unchanged.

    Steady-state gRPC and HTTP/2 traffic repeats a handful of header blocks byte for byte: after
    the first request every field is an index into the (unchanging) dynamic table, or a literal
    *without* indexing (measured with grpcio unary: 14 000 blocks, 6 distinct). Decoding such a
    block gives the same headers as long as the dynamic table is the same, so the result is kept
    under the table's `version`, which moves whenever a decode changed the table (an insertion
    puts a new entry object first or changes the count; a size update changes `maxsize`) or the
    allowed table size changes. A block that changes the table is never served from the cache:
    it is stored under the version *before* it ran, which is gone once it has run.
    This took hpack from about half of the agent's Python time on gRPC to a dict lookup.
    """

    __slots__ = ("_cache", "_decoder", "_dyn", "_table", "version")

    def __init__(self) -> None:
        self._decoder = Decoder()
        self._table = self._decoder.header_table
        self._dyn = self._table.dynamic_entries
        # Cleared, never replaced: _Direction.feed holds this dict while it walks a read.
        self._cache: dict[bytes, tuple[int, list[tuple[str, str]]]] = {}
        self.version = 0

    @property
    def max_allowed_table_size(self) -> int:
        return self._decoder.max_allowed_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self._decoder.max_allowed_table_size = value
        self.version += 1  # decode() checks the table size against it: old results may not hold

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        hit = self._cache.get(block)
        if hit is not None and hit[0] == self.version:
            return list(hit[1])
        dyn, table = self._dyn, self._table
        before = (dyn[0] if dyn else None, len(dyn), table.maxsize)
        try:
            headers = self._decoder.decode(block, raw=False)
        except BaseException:
            self.version += 1  # it may have changed the table before failing
            raise
        after_first = dyn[0] if dyn else None
        if after_first is not before[0] or len(dyn) != before[1] or table.maxsize != before[2]:
            self.version += 1  # the table changed: everything remembered so far is stale
        elif len(block) <= CACHE_BLOCK_MAX:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[bytes(block)] = (self.version, list(headers))  # type: ignore[arg-type]
        return headers  # type: ignore[return-value]

    def snapshot(self) -> dict[str, object]:
        """The dynamic table (newest entry first) and its limits: what the peer's encoder assumes."""
        table = self._table
        return {"entries": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in table.dynamic_entries],
                "maxsize": table.maxsize, "allowed": self._decoder.max_allowed_table_size}

    def restore(self, state: dict[str, object]) -> None:
        """Into a fresh decoder: the same table, entry by entry (oldest first, as they came)."""
        self._decoder.max_allowed_table_size = int(state["allowed"])  # type: ignore[call-overload]
        self._table.maxsize = int(state["maxsize"])  # type: ignore[call-overload]
        for name, value in reversed(state["entries"]):  # type: ignore[call-overload]
            self._table.add(name.encode("latin-1"), value.encode("latin-1"))
        self._cache.clear()
        self.version += 1

# Event kinds; an event is (kind, H2Stream | int).
REQUEST_HEAD = 1
RESPONSE_HEAD = 2
STREAM_END = 3
CLIENT_PROTOCOL_ERROR = 4   # int: error code to send in a GOAWAY to the client before closing
UPSTREAM_PROTOCOL_ERROR = 5
DRAIN_ACKED = 6             # the client acknowledged the drain PING: send the final GOAWAY

Event = tuple[int, object]

_NO_EVENTS: list[Event] = []
_FRAME_HEADER = struct.Struct(">HBBBL")  # length split as 16+8 bits, type, flags, stream id
_NEEDS_PAYLOAD = frozenset((HEADERS, CONTINUATION, PUSH_PROMISE, RST_STREAM, SETTINGS, PING, GOAWAY))


def error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"UNKNOWN_ERROR_{code}"


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    n = len(payload)
    return _FRAME_HEADER.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def goaway_frame(last_stream_id: int, code: int = 0) -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">LL", last_stream_id & 0x7FFFFFFF, code))


def settings_frame() -> bytes:
    """An empty SETTINGS frame: what a server sends first (defaults for everything)."""
    return frame(SETTINGS, 0, 0, b"")


def ping_frame(payload: bytes = DRAIN_PING) -> bytes:
    return frame(PING, 0, 0, payload)


class H2ProtocolError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(error_name(code))
        self.code = code


class H2Stream:
    __slots__ = (
        "authority",
        "client_ended",
        "grpc",
        "grpc_status",
        "headers",
        "method",
        "obs",
        "path",
        "request_bytes",
        "reset_error",
        "response_at",
        "response_bytes",
        "response_headers",
        "scheme",
        "server_ended",
        "started",
        "status",
        "stream_id",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.method = ""
        self.path = ""
        self.authority = ""
        self.scheme = "http"
        self.headers: list[tuple[str, str]] = []
        self.grpc = False
        self.started = 0.0
        self.status = 0
        self.response_headers: list[tuple[str, str]] = []
        self.response_at = 0.0
        self.grpc_status: int | None = None
        self.request_bytes = 0
        self.response_bytes = 0
        self.client_ended = False
        self.server_ended = False
        self.reset_error: str | None = None
        self.obs: object = None


class _Direction:
    """Frame walker for one direction."""

    __slots__ = (
        "block",
        "block_flags",
        "block_stream",
        "block_type",
        "boundary_at",
        "decoder",
        "flags",
        "flen",
        "from_client",
        "ftype",
        "hdr",
        "mark_boundary",
        "pad",
        "payload",
        "preface_left",
        "relay",
        "remaining",
        "stream_id",
    )

    def __init__(self, relay: H2Classifier, from_client: bool) -> None:
        self.relay = relay
        self.from_client = from_client
        self.decoder = CachingDecoder()
        self.hdr = b""
        self.ftype = -1
        self.flags = 0
        self.stream_id = 0
        self.remaining = 0          # payload bytes of the current frame still to come
        self.payload: list[bytes] | None = None
        self.block: list[bytes] = []
        self.block_stream = 0       # stream of an unfinished header block (CONTINUATION due)
        self.block_flags = 0
        self.block_type = 0
        self.preface_left = len(H2_PREFACE) if from_client else 0
        self.mark_boundary = False
        self.boundary_at = -1
        self.flen = 0
        self.pad = 0                # padding octets of the DATA frame being read

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0 and not self.hdr and self.ftype == -1

    def feed(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        if self.preface_left:
            take = min(self.preface_left, end)
            pos += take
            self.preface_left -= take
        unpack_from = _FRAME_HEADER.unpack_from
        if self.ftype == -1 and not self.hdr and not self.mark_boundary:
            # Fast path: the frames that are whole in this read (the common case), handled from the
            # read itself: no header buffer, no payload list, no per-piece state. Those a steady
            # gRPC call is made of (DATA, WINDOW_UPDATE, one-frame HEADERS) are handled right here,
            # without a call per frame (docs/bench.md, "HTTP/2 and gRPC steps"); the others by
            # _whole_frame. A header block left open (CONTINUATION due), a partial frame at the
            # end, or a boundary to mark (drain): the loop below.
            relay = self.relay
            streams = relay.streams
            from_client = self.from_client
            decoder = self.decoder
            cache = decoder._cache
            while end - pos >= 9 and not self.block_stream:
                hi, lo, ftype, flags, sid = unpack_from(data, pos)
                length = (hi << 8) | lo
                start = pos + 9
                if end - start < length:
                    break
                pos = start + length
                sid &= 0x7FFFFFFF
                if ftype == DATA:
                    if length:
                        stream = streams.get(sid)
                        if stream is not None:
                            n = length - (1 + data[start] if flags & PADDED else 0)
                            if n > 0:
                                if from_client:
                                    stream.request_bytes += n
                                else:
                                    stream.response_bytes += n
                    if flags & END_STREAM:
                        relay.end_side(sid, from_client)
                elif ftype == WINDOW_UPDATE or ftype == PRIORITY:
                    pass  # flow control and priorities are end to end: nothing to follow
                elif (ftype == HEADERS and flags & END_HEADERS and not flags & (PADDED | PRIORITY_FLAG)
                      and sid and length <= MAX_HEADER_BLOCK):
                    block = data[start:pos]
                    hit = cache.get(block)  # CachingDecoder.decode's hit, inlined
                    if hit is not None and hit[0] == decoder.version:
                        headers = list(hit[1])
                    else:
                        try:
                            headers = decoder.decode(block)
                        except HPACKError as exc:
                            raise H2ProtocolError(ErrorCodes.COMPRESSION_ERROR) from exc
                    if from_client:
                        relay.client_headers(sid, headers, bool(flags & END_STREAM))
                    else:
                        relay.server_headers(sid, headers, bool(flags & END_STREAM))
                else:
                    self._whole_frame(ftype, flags, sid, length, data, start)
        while pos < end:
            if self.ftype == -1:
                if self.mark_boundary and not self.hdr:
                    self.mark_boundary = False
                    self.boundary_at = pos
                if not self.hdr and end - pos >= 9:
                    hi, lo, ftype, flags, sid = unpack_from(data, pos)
                    length = (hi << 8) | lo
                    if end - pos - 9 >= length:
                        start = pos + 9
                        pos = start + length
                        self._whole_frame(ftype, flags, sid & 0x7FFFFFFF, length, data, start)
                        continue
                need = 9 - len(self.hdr)
                chunk = data[pos : pos + need]
                pos += len(chunk)
                self.hdr += chunk
                if len(self.hdr) < 9:
                    return
                self._start_frame(self.hdr)
                self.hdr = b""
                if self.remaining == 0:
                    self._end_frame(b"")
                continue
            take = min(self.remaining, end - pos)
            if self.payload is not None:
                self.payload.append(data[pos : pos + take])
            elif self.ftype == DATA:
                self._count_data(data, pos, take)
            pos += take
            self.remaining -= take
            if self.remaining == 0:
                body = b"".join(self.payload) if self.payload is not None else b""
                self._end_frame(body)
        if self.mark_boundary and self.ftype == -1 and not self.hdr:
            self.mark_boundary = False
            self.boundary_at = end

    def _whole_frame(self, ftype: int, flags: int, sid: int, length: int, data: bytes, start: int) -> None:
        """_start_frame + payload + _end_frame for a frame that is entirely in `data` at `start`."""
        if self.block_stream and ftype != CONTINUATION:
            raise H2ProtocolError(ErrorCodes.PROTOCOL_ERROR)
        if ftype == DATA:
            if length:
                stream = self.relay.streams.get(sid)
                if stream is not None:
                    n = length - (1 + data[start] if flags & PADDED else 0)
                    if n > 0:
                        if self.from_client:
                            stream.request_bytes += n
                        else:
                            stream.response_bytes += n
            if flags & END_STREAM:
                self.relay.end_side(sid, self.from_client)
            return
        if ftype in _NEEDS_PAYLOAD:
            if length > MAX_HEADER_BLOCK:
                raise H2ProtocolError(ErrorCodes.ENHANCE_YOUR_CALM)
            body = data[start : start + length]
        else:
            body = b""
        self.ftype = ftype
        self.flags = flags
        self.stream_id = sid
        self._end_frame(body)

    def _start_frame(self, hdr: bytes) -> None:
        hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack(hdr)
        length = (hi << 8) | lo
        self.ftype = ftype
        self.flags = flags
        self.stream_id = sid & 0x7FFFFFFF
        self.remaining = length
        if self.block_stream and ftype != CONTINUATION:
            raise H2ProtocolError(ErrorCodes.PROTOCOL_ERROR)
        if ftype in _NEEDS_PAYLOAD:
            if length > MAX_HEADER_BLOCK:
                raise H2ProtocolError(ErrorCodes.ENHANCE_YOUR_CALM)
            self.payload = []
        else:
            self.payload = None
        self.flen = length

    def _count_data(self, data: bytes, pos: int, take: int) -> None:
        """Count the data octets of a DATA frame piece: [pad length octet] data [padding]."""
        off = self.flen - self.remaining  # where this piece starts in the frame's payload
        lo, hi = 0, self.flen
        if self.flags & PADDED:
            if off == 0:
                self.pad = data[pos]
            lo, hi = 1, self.flen - self.pad  # a frame split over reads: padding is not data either
        stream = self.relay.streams.get(self.stream_id)
        if stream is None:
            return
        n = min(off + take, hi) - max(off, lo)
        if n > 0:
            if self.from_client:
                stream.request_bytes += n
            else:
                stream.response_bytes += n

    def _end_frame(self, body: bytes) -> None:
        ftype, flags, sid = self.ftype, self.flags, self.stream_id
        self.ftype = -1
        self.payload = None
        relay = self.relay
        if ftype == DATA:
            if flags & END_STREAM:
                relay.end_side(sid, self.from_client)
        elif ftype == HEADERS:
            if sid == 0:
                raise H2ProtocolError(ErrorCodes.PROTOCOL_ERROR)
            if flags & PADDED:
                if not body:
                    raise H2ProtocolError(ErrorCodes.PROTOCOL_ERROR)
                pad = body[0]
                body = body[1 : len(body) - pad] if pad else body[1:]
            if flags & PRIORITY_FLAG:
                body = body[5:]
            self._begin_block(HEADERS, sid, flags, body)
        elif ftype == PUSH_PROMISE:
            if flags & PADDED and body:
                pad = body[0]
                body = body[1 : len(body) - pad] if pad else body[1:]
            self._begin_block(PUSH_PROMISE, sid, flags, body[4:])
        elif ftype == CONTINUATION:
            if not self.block_stream or sid != self.block_stream:
                raise H2ProtocolError(ErrorCodes.PROTOCOL_ERROR)
            self.block.append(body)
            if sum(len(b) for b in self.block) > MAX_HEADER_BLOCK:
                raise H2ProtocolError(ErrorCodes.ENHANCE_YOUR_CALM)
            if flags & END_HEADERS:
                self._finish_block()
        elif ftype == RST_STREAM:
            if len(body) == 4:
                relay.reset(sid, struct.unpack(">L", body)[0])
        elif ftype == GOAWAY:
            if len(body) >= 8:
                last, code = struct.unpack(">LL", body[:8])
                relay.goaway(self.from_client, last & 0x7FFFFFFF, code)
        elif ftype == SETTINGS:
            if not flags & ACK:
                relay.settings(self.from_client, body)
        elif ftype == PING and flags & ACK and self.from_client and body == DRAIN_PING:
            relay.events.append((DRAIN_ACKED, 0))

    def _begin_block(self, btype: int, sid: int, flags: int, fragment: bytes) -> None:
        self.block = [fragment]
        self.block_stream = sid
        self.block_flags = flags
        self.block_type = btype
        if flags & END_HEADERS:
            self._finish_block()

    def _finish_block(self) -> None:
        block = b"".join(self.block) if len(self.block) > 1 else self.block[0]
        sid, flags, btype = self.block_stream, self.block_flags, self.block_type
        self.block = []
        self.block_stream = 0
        try:
            headers = self.decoder.decode(block)
        except HPACKError as exc:
            raise H2ProtocolError(ErrorCodes.COMPRESSION_ERROR) from exc
        if btype == PUSH_PROMISE:
            return  # decoded only to keep the table in step; pushed streams are not requests
        if self.from_client:
            self.relay.client_headers(sid, headers, bool(flags & END_STREAM))
        else:
            self.relay.server_headers(sid, headers, bool(flags & END_STREAM))

    _STATE = ("ftype", "flags", "stream_id", "remaining", "block_stream", "block_flags", "block_type",
              "preface_left", "flen", "pad")

    def snapshot(self) -> dict[str, object]:
        """Where this walker is, mid-frame and mid-header-block included (bytes as latin-1 text)."""
        state: dict[str, object] = {k: getattr(self, k) for k in self._STATE}
        state["hdr"] = self.hdr.decode("latin-1")
        state["payload"] = None if self.payload is None else b"".join(self.payload).decode("latin-1")
        state["block"] = b"".join(self.block).decode("latin-1")
        state["decoder"] = self.decoder.snapshot()
        return state

    def restore(self, state: dict[str, object]) -> None:
        for k in self._STATE:
            setattr(self, k, int(state[k]))  # type: ignore[call-overload]
        self.hdr = str(state["hdr"]).encode("latin-1")
        payload = state["payload"]
        self.payload = None if payload is None else [str(payload).encode("latin-1")]
        self.block = [str(state["block"]).encode("latin-1")] if self.block_stream else []
        self.decoder.restore(state["decoder"])  # type: ignore[arg-type]


class H2Classifier:
    """Classifies one HTTP/2 connection relayed frame by frame."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.events: list[Event] = []
        self.streams: dict[int, H2Stream] = {}
        self.max_client_stream = 0
        self.failed = False
        self.client = _Direction(self, True)
        self.server = _Direction(self, False)

    def feed_client(self, data: bytes) -> list[Event]:
        if self.failed:
            return _NO_EVENTS
        try:
            self.client.feed(data)
        except H2ProtocolError as exc:
            self.failed = True
            self.events.append((CLIENT_PROTOCOL_ERROR, exc.code))
        events = self.events  # the events so far, handed over (twice per gRPC call)
        if not events:
            return _NO_EVENTS
        self.events = []
        return events

    def feed_server(self, data: bytes) -> list[Event]:
        if self.failed:
            return _NO_EVENTS
        try:
            self.server.feed(data)
        except H2ProtocolError as exc:
            self.failed = True
            self.events.append((UPSTREAM_PROTOCOL_ERROR, exc.code))
        events = self.events
        if not events:
            return _NO_EVENTS
        self.events = []
        return events

    def feed_server_to_boundary(self, data: bytes) -> tuple[list[Event], int]:
        """`feed_server`, and the offset in `data` of the first frame boundary (-1: none in it):
        where frames of the agent's own may go to the client between the server's (drain)."""
        server = self.server
        server.boundary_at = -1
        server.mark_boundary = True   # the walker notes the first boundary it passes, then clears it
        events = self.feed_server(data)
        at, server.boundary_at = server.boundary_at, -1
        return events, at

    # -- called by the direction walkers ------------------------------------------------------

    def client_headers(self, sid: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            if sid % 2 == 0 or sid <= self.max_client_stream:
                return  # trailers of a finished stream, or not a client stream: nothing to count
            self.max_client_stream = sid
            stream = H2Stream(sid)
            for name, value in headers:
                if name[:1] == ":":  # HPACK can carry an empty name: not an IndexError
                    if name == ":method":
                        stream.method = value
                    elif name == ":path":
                        stream.path = value
                    elif name == ":authority":
                        stream.authority = value
                    elif name == ":scheme":
                        stream.scheme = value
                elif name == "content-type" and value.startswith("application/grpc"):
                    stream.grpc = True
                elif name == "host" and not stream.authority:
                    stream.authority = value
            stream.headers = headers
            stream.started = self.clock()
            self.streams[sid] = stream
            self.events.append((REQUEST_HEAD, stream))
        if end_stream:
            self.end_side(sid, True)

    def server_headers(self, sid: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        if not stream.status:
            status = 0
            for name, value in headers:
                if name == ":status":
                    status = int(value) if value.isdigit() else 0
                    break
            if 100 <= status < 200:
                return  # informational; the response head is still to come
            stream.status = status or 200
            stream.response_headers = headers
            stream.response_at = self.clock()
            self.events.append((RESPONSE_HEAD, stream))
        for name, value in headers:
            if name == "grpc-status":
                stream.grpc_status = int(value) if value.isdigit() else 2  # 2: UNKNOWN
        if end_stream:
            self.end_side(sid, False)

    def end_side(self, sid: int, from_client: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        if from_client:
            stream.client_ended = True
        else:
            stream.server_ended = True
        # A response that is complete ends the request, even if the client never half-closed
        # (servers may answer before reading the whole request). _finish(), inlined.
        if stream.server_ended and self.streams.pop(sid, None) is not None:
            self.events.append((STREAM_END, stream))

    def reset(self, sid: int, code: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            stream.reset_error = error_name(code)
            self._finish(stream)

    def goaway(self, from_client: bool, last_stream_id: int, code: int) -> None:
        if from_client:
            return  # the client will not accept pushes; client streams are unaffected
        # Streams above last_stream_id were never processed by the server.
        for sid in [s for s in self.streams if s > last_stream_id]:
            stream = self.streams[sid]
            stream.reset_error = f"GOAWAY_{error_name(code)}" if code else "REFUSED_STREAM"
            self._finish(stream)

    def settings(self, from_client: bool, body: bytes) -> None:
        # SETTINGS_HEADER_TABLE_SIZE announced by one side bounds what the other side's encoder
        # may use, so it sets the decoder of the *opposite* direction.
        for off in range(0, len(body) - len(body) % 6, 6):
            ident, value = struct.unpack(">HL", body[off : off + 6])
            if ident == 1:
                other = self.server if from_client else self.client
                other.decoder.max_allowed_table_size = value

    def _finish(self, stream: H2Stream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.events.append((STREAM_END, stream))

    # -- used by the relay ---------------------------------------------------------------------

    _STREAM_STATE = ("stream_id", "method", "path", "authority", "scheme", "grpc", "started", "status",
                     "response_at", "grpc_status", "request_bytes", "response_bytes", "client_ended",
                     "server_ended")

    def snapshot(self) -> dict[str, object]:
        """All this classifier knows, as plain data (JSON-able), for another process to carry on
        from exactly here (agent/handover.py): both walkers — mid-frame, mid-header-block — with
        their HPACK tables, and the open streams (without their headers, read only by a tap, nor
        their observer handles). Flow control is not ours: it is end to end."""
        return {"client": self.client.snapshot(), "server": self.server.snapshot(),
                "max_client_stream": self.max_client_stream,
                "streams": [{k: getattr(st, k) for k in self._STREAM_STATE} for st in self.streams.values()]}

    @classmethod
    def restored(cls, state: dict[str, object], clock: Callable[[], float] = time.monotonic) -> H2Classifier:
        relay = cls(clock)
        relay.client.restore(state["client"])  # type: ignore[arg-type]
        relay.server.restore(state["server"])  # type: ignore[arg-type]
        relay.max_client_stream = int(state["max_client_stream"])  # type: ignore[call-overload]
        for raw in state["streams"]:  # type: ignore[attr-defined]
            stream = H2Stream(int(raw["stream_id"]))
            for k in cls._STREAM_STATE[1:]:
                setattr(stream, k, raw[k])
            relay.streams[stream.stream_id] = stream
        return relay

    def close(self) -> list[H2Stream]:
        """The connection ended: streams that never finished."""
        left = list(self.streams.values())
        self.streams.clear()
        return left
