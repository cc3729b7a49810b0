"""HTTP/1.x classification (sans-IO): bytes in, events out.

The agent relays HTTP/1 bytes untouched (one upstream connection per client connection, so
keep-alive and pipelining are the peers' business); this module only tells the relay *what
happened*: a request head was complete, a response head arrived, an exchange (request and its
response) ended, the connection was upgraded to something opaque, or a peer sent something that
is not HTTP/1. Parsing is httptools (llhttp), one parser per direction.

llhttp cannot know that a response answers a HEAD (or a CONNECT) request, so while such a
request is outstanding responses are fed in pieces that end on a head terminator: the response
head then ends exactly at a piece end and the parser is replaced before it waits for a body that
never comes. The same splitting lets a draining agent add `Connection: close` to a request head.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import httptools
from nodemesh.agent.observe import ALL_HEADERS, HeadersGate, RequestHead

MAX_HEAD_BYTES = 64 * 1024           # request/response head (line + headers); more: 431 / opaque
MAX_UNPARSED_AFTER_UPGRADE = 64 * 1024

# Event kinds; an event is a (kind, Http1Request | int | None) tuple.
REQUEST_HEAD = 1       # request head complete: observe request_start
RESPONSE_HEAD = 2      # final (non-1xx) response head: observe response_start
EXCHANGE_END = 3       # request and response both complete: observe request_end
UPGRADED = 4           # 101 / CONNECT 2xx: both directions are opaque from the next byte on
CLIENT_ERROR = 5       # client sent what we cannot parse as HTTP/1 (int: what it would merit, 400 or
                       # 431): its side is no longer classified; the bytes still go to the server
UPSTREAM_ERROR = 6     # server sent bad HTTP/1: stop classifying, relay the rest as opaque

Event = tuple[int, object]

_NO_EVENTS: list[Event] = []
_TERMINATOR = b"\r\n\r\n"


class HeadTooLarge(Exception):
    pass


def _lenient(parser: httptools.HttpRequestParser | httptools.HttpResponseParser) -> None:
    """Accept what common servers accept, so such messages are classified and not given up on:
    bare LF line ends (nginx answers them; llhttp needs both CR/LF leniencies for the request line)
    and any HTTP/x.y version (nginx answers 505). Classification only: the bytes go to the server
    as they are whatever the parser thinks."""
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True, lenient_optional_lf_after_cr=True,
                                    lenient_version=True)


def request_parser(side: object) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(side)
    _lenient(parser)
    return parser


def response_parser(side: object) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(side)
    _lenient(parser)
    return parser


class Http1Request(RequestHead):
    """One request/response pair on a connection; also the RequestHead the observer is given
    (one object per request instead of two: docs/bench.md "Hot path steps", step 6). Equality and
    hashing are by identity, as for any request, not the dataclass's field comparison."""

    __slots__ = (
        "closes",
        "obs",
        "request_bytes",
        "request_done",
        "response_at",
        "response_bytes",
        "response_done",
        "response_headers",
        "upgrade",
    )
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, ordinal: int) -> None:
        # RequestHead's fields, set here (its generated __init__ would be one more call):
        self.method = ""
        self.scheme = "http"
        self.authority = ""
        self.path = ""
        self.headers = []
        self.grpc = False
        self.stream_id = ordinal           # the ordinal of the request on the connection
        self.started = 0.0
        self.adopted = False
        self.status = 0                    # the response's status, once its head arrived
        self.response_headers: list[tuple[str, str]] = []
        self.response_at = 0.0
        self.request_bytes = 0
        self.response_bytes = 0
        self.request_done = False
        self.response_done = False
        self.upgrade = False          # asked for Upgrade (or is CONNECT)
        self.obs: object = None       # the Observer's handle, owned by the relay (None once ended)
        self.closes = False           # the server will close after this response

    @property
    def ordinal(self) -> int:
        return self.stream_id

    @property
    def done(self) -> bool:
        return self.request_done and self.response_done


def head_terminators(tail: bytes, data: bytes) -> list[int]:
    """Offsets in `data` right after every CRLFCRLF, counting one that starts in `tail`."""
    joined = tail[-3:] + data
    shift = len(joined) - len(data)
    ends = []
    pos = joined.find(_TERMINATOR)
    while pos >= 0:
        end = pos + 4 - shift
        if end > 0:
            ends.append(end)
        pos = joined.find(_TERMINATOR, pos + 1)
    return ends


def _split(data: bytes, ends: list[int]) -> list[bytes]:
    pieces = []
    start = 0
    for end in ends:
        if end > start:
            pieces.append(data[start:end])
            start = end
    if start < len(data):
        pieces.append(data[start:])
    return pieces


class _RequestSide:
    """httptools callbacks for the client -> server direction."""

    __slots__ = ("collect", "completed", "field", "head_bytes", "head_fed", "req", "x")

    def __init__(self, exchange: Http1Exchange) -> None:
        self.x = exchange
        self.req: Http1Request | None = None
        self.head_bytes = 0
        self.head_fed = 0
        self.completed = False   # a message ended in the read being fed
        self.field = b""
        self.collect = True      # this request's headers are wanted (decided at its first byte)

    def on_message_begin(self) -> None:
        x = self.x
        x.ordinal += 1
        self.req = Http1Request(x.ordinal)
        self.head_bytes = 0
        self.head_fed = 0
        self.collect = x.gate.headers_wanted
        x.head_pending = True

    def on_url(self, url: bytes) -> None:
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge
        self.req.path += url.decode("latin-1")  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge
        req = self.req
        assert req is not None
        if self.collect:
            req.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        elif len(name) == 4 and not req.authority and name.lower() == b"host":
            # No tap open: of all the headers only Host (the authority label) is decoded.
            req.authority = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        x = self.x
        req = self.req
        assert req is not None
        req.method = x.req_parser.get_method().decode("ascii")
        req.started = x.clock()
        if self.collect:
            for name, value in req.headers:
                if len(name) == 4 and name.lower() == "host":
                    req.authority = value
                    break
        if req.method == "CONNECT":
            req.authority = req.authority or req.path
            req.upgrade = True
        elif x.req_parser.should_upgrade():
            req.upgrade = True
        if not x.req_parser.should_keep_alive():
            req.closes = True
        x.head_pending = False
        x.awaiting.append(req)
        if req.method == "HEAD" or req.method == "CONNECT":
            x.split_pending += 1
        x.events.append((REQUEST_HEAD, req))
        x.head_done_in_piece = True

    # No on_body while nobody looks (see _ResponseSide): _RequestSideCounting counts the body.
    counts_body = False

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        req.request_done = True
        self.req = None
        self.completed = True
        if req.response_done:      # req.done (the request side just ended)
            self.x.events.append((EXCHANGE_END, req))


class _RequestSideCounting(_RequestSide):
    """The request side while a tap is open or the event log writes: counts the body's bytes
    (request_bytes, which only they show)."""

    __slots__ = ()
    counts_body = True

    def on_body(self, body: bytes) -> None:
        self.req.request_bytes += len(body)  # type: ignore[union-attr]


class _ResponseSide:
    """httptools callbacks for the server -> client direction, headers not wanted.

    No `on_header`: httptools then neither calls back nor builds name/value bytes per header, and
    nothing is accumulated (so no head bound is needed here). _ResponseSideHeaders adds it; the
    exchange swaps which one its parser is bound to between responses (see feed_response)."""

    __slots__ = ("head_bytes", "in_message", "informational", "req", "x")
    headers = False

    def __init__(self, exchange: Http1Exchange) -> None:
        self.x = exchange
        self.req: Http1Request | None = None
        self.head_bytes = 0
        self.informational = False
        self.in_message = False          # a response has begun and not ended

    def on_message_begin(self) -> None:
        self.head_bytes = 0
        self.informational = False
        self.req = None
        self.in_message = True

    def on_headers_complete(self) -> None:
        x = self.x
        status = x.resp_parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # 100 Continue and friends: not the response; llhttp ends this message without a body.
            self.informational = True
            if x.awaiting:
                x.awaiting[0].response_headers.clear()
            return
        if not x.awaiting:
            raise ValueError("response without a request")
        req = x.awaiting[0]
        self.req = req
        req.status = status
        req.response_at = x.clock()
        if not x.resp_parser.should_keep_alive():
            req.closes = True
        x.events.append((RESPONSE_HEAD, req))
        if req.method == "HEAD" or (req.method == "CONNECT" and 200 <= status < 300):
            # No body follows; the head ended exactly at this piece's end (see module doc).
            x.reset_response_after_piece = True

    # No on_body here: httptools copies every body chunk into a bytes object for it, and calls
    # Python per chunk (a bulk download's whole body). The count it kept (response_bytes) is
    # shown only by tap and the event log, which want headers too: _ResponseSideHeaders counts.

    def on_message_complete(self) -> None:
        self.in_message = False
        if self.informational:
            return
        self.x.finish_response()


class _ResponseSideHeaders(_ResponseSide):
    """The response side while headers are wanted (a tap is open, or the event log): collects
    them, bounded, and counts the body's bytes."""

    __slots__ = ()
    headers = True

    def on_status(self, status: bytes) -> None:
        self.head_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge
        x = self.x
        if x.awaiting:
            x.awaiting[0].response_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        if self.req is not None:
            self.req.response_bytes += len(body)


class Http1Exchange:
    """Classifies one HTTP/1 connection, both directions."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, gate: HeadersGate = ALL_HEADERS) -> None:
        self.clock = clock
        self.gate = gate                               # are header lists wanted (a tap open)?
        self.events: list[Event] = []
        self.ordinal = 0
        self.awaiting: deque[Http1Request] = deque()   # heads sent, responses not complete
        self.split_pending = 0                         # of those, HEAD/CONNECT (see module doc)
        self.head_pending = False                      # a request head has begun, not ended
        self.head_done_in_piece = False
        self.reset_response_after_piece = False
        self.upgraded = False                          # opaque from now on: stop feeding
        self.failed = False                            # the server stopped speaking HTTP/1: opaque
        self.client_failed = False                     # the client did: its side is not classified
        self.req_side = (_RequestSideCounting if gate.headers_wanted else _RequestSide)(self)
        self._resp_side = (_ResponseSideHeaders if gate.headers_wanted else _ResponseSide)(self)
        self.req_parser = request_parser(self.req_side)
        self.resp_parser = response_parser(self._resp_side)
        self._req_tail = b""
        self._resp_tail = b""
        self._upgrade_wait = False                     # request asked to upgrade, no answer yet
        self._held: list[bytes] = []                   # client bytes after an upgrade request
        self._held_len = 0
        self._closing_req: Http1Request | None = None  # draining: the request given Connection: close

    # -- client -> server --------------------------------------------------------------------

    def feed_request(self, data: bytes) -> list[Event]:
        if self.upgraded or self.failed or self.client_failed:
            return _NO_EVENTS
        if self._upgrade_wait:
            self._hold(data)
            return self._take()
        side = self.req_side
        if side.counts_body is not self.gate.headers_wanted and side.req is None:
            # A tap opened (or the last one closed): between requests, rebind the parser to the
            # side that does (not) count body bytes, as feed_response does for its side.
            side = self.req_side = (_RequestSideCounting if self.gate.headers_wanted else _RequestSide)(self)
            self.req_parser = request_parser(side)
        side.completed = False
        try:
            self.req_parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            self._upgrade_wait = True
            rest = data[int(up.args[0]):]
            if rest:
                self._hold(rest)
        except httptools.HttpParserError as exc:
            self._client_error(exc)
        else:
            # httptools buffers an unfinished header line itself: bound the head here too. A head
            # that began after another message in this same read is counted from the next read
            # on (where it starts in this one is unknown; one read is bounded anyway): counting
            # the whole read would charge it with the pipelined requests or body before it.
            if self.head_pending and not side.completed:
                side.head_fed += len(data)
                if side.head_fed > MAX_HEAD_BYTES:
                    self.client_failed = True
                    self.events.append((CLIENT_ERROR, 431))
        events = self.events   # self._take(), inlined
        if not events:
            return _NO_EVENTS
        self.events = []
        return events

    def feed_request_closing(self, data: bytes) -> tuple[list[Event], bytes, bool]:
        """Like feed_request, for a draining agent: the next request head completed here gets
        `Connection: close` added, so the server ends the connection after its response.

        Returns (events, bytes to forward, done): once done (that request, body included, is
        forwarded), nothing more may be forwarded.
        """
        if self.upgraded or self.failed or self.client_failed or self._upgrade_wait:
            return self.feed_request(data), data, False
        ends = head_terminators(self._req_tail, data)
        self._req_tail = (self._req_tail + data)[-3:]
        out: list[bytes] = []
        consumed = 0
        for piece in _split(data, ends):
            marked = self._closing_req
            if marked is not None and marked.request_done:
                return self._take(), b"".join(out), True
            consumed += len(piece)
            self.head_done_in_piece = False
            try:
                self.req_parser.feed_data(piece)
            except httptools.HttpParserUpgrade as up:
                self._upgrade_wait = True
                out.append(piece)
                if len(piece) > int(up.args[0]):
                    self._hold(piece[int(up.args[0]):])
                return self._take(), b"".join(out), False
            except httptools.HttpParserError as exc:
                # Not HTTP/1 we can follow: the server gets these bytes as they are and answers them.
                self._client_error(exc)
                out.append(piece)
                return self._take(), b"".join(out) + data[consumed:], True
            if marked is None and self.head_done_in_piece and piece.endswith(_TERMINATOR):
                req = self.awaiting[-1]
                req.closes = True
                piece = piece[:-2] + b"Connection: close\r\n\r\n"
                # Its body (if any) still goes to the server, which waits for it.
                self._closing_req = req
            out.append(piece)
        marked = self._closing_req
        return self._take(), b"".join(out), marked is not None and marked.request_done

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_len += len(data)
        if self._held_len > MAX_UNPARSED_AFTER_UPGRADE:
            # The client did not wait for the answer to its Upgrade: treat it as opaque.
            self._become_opaque()

    def _client_error(self, exc: Exception) -> None:
        self.client_failed = True
        cause = exc.__context__ or exc.__cause__
        status = 431 if isinstance(cause, HeadTooLarge) else 400
        self.events.append((CLIENT_ERROR, status))

    # -- server -> client --------------------------------------------------------------------

    def feed_response(self, data: bytes) -> list[Event]:
        if self.upgraded or self.failed:
            return _NO_EVENTS
        side = self._resp_side
        if side.headers is not self.gate.headers_wanted and not side.in_message:
            # A tap opened (or the last one closed): between responses, rebind the parser to the
            # side that does (not) collect headers. A response already begun keeps its side, so
            # when a tap opens mid-response that one response shows no headers in the tap.
            self._resp_side = (_ResponseSideHeaders if self.gate.headers_wanted else _ResponseSide)(self)
            self.resp_parser = response_parser(self._resp_side)
        if not self.split_pending:
            # The common case, inlined (calls are most of the per-request cost; see docs/bench.md).
            try:
                self.resp_parser.feed_data(data)
            except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
                self._response_parse_failed(exc)
            self._resp_tail = data[-3:]
            events = self.events
            if not events:
                return _NO_EVENTS
            self.events = []
            return events
        ends = head_terminators(self._resp_tail, data)
        self._resp_tail = (self._resp_tail + data)[-3:]
        start = 0
        for piece in _split(data, ends):
            start += len(piece)
            if not self._feed_response_piece(piece):
                break
            if self.reset_response_after_piece:
                self.reset_response_after_piece = False
                self.resp_parser = response_parser(self._resp_side)
                req = self.awaiting[0]
                self.finish_response()
                if req.method == "CONNECT":
                    self._become_opaque()
                    break
        return self._take()

    def _feed_response_piece(self, piece: bytes) -> bool:
        try:
            self.resp_parser.feed_data(piece)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError) as exc:
            self._response_parse_failed(exc)
            return False
        return True

    def _response_parse_failed(self, exc: Exception) -> None:
        if (isinstance(exc, httptools.HttpParserUpgrade) and self.resp_parser.get_status_code() == 101
                and self._upgrade_wait):
            # llhttp already ended the 101 message (EXCHANGE_END is out); the rest is opaque.
            if self.awaiting and self.awaiting[0].status == 101:
                self.finish_response()
            self._become_opaque()
        else:
            self._upstream_error()

    def finish_response(self) -> None:
        if not self.awaiting:
            return
        req = self.awaiting.popleft()
        if req.method == "HEAD" or req.method == "CONNECT":
            self.split_pending -= 1
        req.response_done = True
        if req.upgrade and not self.upgraded and req.status != 101:
            # The server declined the upgrade: the client keeps speaking HTTP/1.
            self._resume_after_declined_upgrade()
        if req.request_done:       # req.done (the response side just ended)
            self.events.append((EXCHANGE_END, req))

    def _resume_after_declined_upgrade(self) -> None:
        if not self._upgrade_wait:
            return
        self._upgrade_wait = False
        held, self._held, self._held_len = self._held, [], 0
        self.req_parser = request_parser(self.req_side)
        cur = self.req_side.req
        if cur is not None:
            # The upgrade request itself: llhttp skipped its body; call it complete.
            cur.request_done = True
            self.req_side.req = None
        for chunk in held:
            try:
                self.req_parser.feed_data(chunk)
            except httptools.HttpParserError as exc:
                self._client_error(exc)
                return

    def _upstream_error(self) -> None:
        self.failed = True
        self.events.append((UPSTREAM_ERROR, None))

    def _become_opaque(self) -> None:
        self.upgraded = True
        self._held = []
        self.events.append((UPGRADED, None))

    # -- both --------------------------------------------------------------------------------

    def close(self) -> list[Http1Request]:
        """The connection ended: the requests that never completed (head seen, not done)."""
        unfinished = list(self.awaiting)
        cur = self.req_side.req
        if cur is not None and cur not in unfinished and cur.started:
            unfinished.append(cur)
        self.awaiting.clear()
        self.split_pending = 0
        return unfinished

    @property
    def idle(self) -> bool:
        """No request in flight and none begun: a safe moment to close a keep-alive connection."""
        return not self.awaiting and not self.head_pending and self.req_side.req is None

    def _take(self) -> list[Event]:
        if not self.events:
            return _NO_EVENTS
        events = self.events
        self.events = []
        return events
