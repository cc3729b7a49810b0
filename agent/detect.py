"""Protocol detection on the first bytes a client sends (sans-IO).

`detect(data)` looks at the bytes received so far and answers with a `Detection`: a protocol, or
`NEED_MORE` when the prefix is still ambiguous. The caller owns the timeout: a client that sends
nothing (server-speaks-first protocols such as MySQL or SMTP) or too little is opaque TCP.
"""

from __future__ import annotations

from dataclasses import dataclass

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Methods httptools/llhttp understands; anything else on a request line is not HTTP/1 to us.
HTTP1_METHODS = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH", b"REPORT",
    b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE", b"UNSUBSCRIBE",
    b"PURGE", b"MKCALENDAR", b"LINK", b"UNLINK", b"BIND", b"REBIND", b"UNBIND", b"ACL", b"QUERY",
)
_LONGEST_METHOD = max(len(m) for m in HTTP1_METHODS) + 1
# A request line longer than this without its "HTTP/1.x" tail is not worth waiting for.
MAX_REQUEST_LINE = 16 * 1024

HTTP1 = "http1"
HTTP2 = "http2"
TLS = "tls"
TCP = "tcp"
NEED_MORE = "need-more"


@dataclass(frozen=True, slots=True)
class Detection:
    protocol: str            # HTTP1 | HTTP2 | TLS | TCP | NEED_MORE
    sni: str | None = None   # TLS only, when the ClientHello names a server


def detect(data: bytes) -> Detection:
    if not data:
        return Detection(NEED_MORE)
    first = data[0]
    if first == 0x16:
        return _detect_tls(data)
    if first == ord("P") and H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        if len(data) >= len(H2_PREFACE):
            return Detection(HTTP2)
        return Detection(NEED_MORE)
    return _detect_http1(data)


def _detect_http1(data: bytes) -> Detection:
    space = data.find(b" ", 0, _LONGEST_METHOD)
    if space < 0:
        if len(data) >= _LONGEST_METHOD:
            return Detection(TCP)
        # Still a possible method prefix?
        if any(m.startswith(data) for m in HTTP1_METHODS):
            return Detection(NEED_MORE)
        return Detection(TCP)
    if data[:space] not in HTTP1_METHODS:
        return Detection(TCP)
    eol = data.find(b"\n", space)
    if eol < 0:
        return Detection(NEED_MORE if len(data) < MAX_REQUEST_LINE else TCP)
    line = data[:eol].rstrip(b"\r")
    version = line.rsplit(b" ", 1)[-1]
    # Only HTTP/1.x is relayed as HTTP/1; a request line ending otherwise is still HTTP-shaped
    # (e.g. an oversize or malformed target) and the HTTP/1 layer answers it with 400.
    if version in (b"HTTP/1.1", b"HTTP/1.0"):
        return Detection(HTTP1)
    if version.startswith(b"HTTP/"):
        return Detection(HTTP1)
    return Detection(TCP)


def settle_on_timeout(data: bytes) -> str:
    """The protocol to settle on when the detection timeout fires with `data` still undecided.

    A request head that is still coming (a method prefix, a request line without its end) is
    HTTP/1: a slowloris sends one byte a second, and as opaque TCP it would be held for as long
    as it likes; as HTTP/1 the header timeout answers it with 408. Anything else (a partial TLS
    ClientHello, a partial HTTP/2 preface, which clients send whole) is relayed as opaque TCP."""
    if not data or data[0] == 0x16 or (len(data) >= 3 and H2_PREFACE.startswith(data[:24])):
        return TCP
    return HTTP1 if _detect_http1(data).protocol in (NEED_MORE, HTTP1) else TCP


def _detect_tls(data: bytes) -> Detection:
    # TLS record: type 0x16, version 0x03 0x0X, length; then handshake type 1 (ClientHello).
    if len(data) < 6:
        return Detection(NEED_MORE) if _tls_prefix_ok(data) else Detection(TCP)
    if not _tls_prefix_ok(data) or data[5] != 0x01:
        return Detection(TCP)
    record_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + record_len:
        # A ClientHello fits one record; wait for it so the SNI can be recorded.
        return Detection(NEED_MORE)
    return Detection(TLS, parse_sni(data[5 : 5 + record_len]))


def _tls_prefix_ok(data: bytes) -> bool:
    if len(data) >= 2 and data[1] != 0x03:
        return False
    return not (len(data) >= 3 and data[2] > 0x04)


def parse_sni(hello: bytes) -> str | None:
    """The server_name extension of a ClientHello handshake message, or None."""
    try:
        pos = 4 + 2 + 32  # handshake header, client_version, random
        sid_len = hello[pos]
        pos += 1 + sid_len
        cs_len = int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2 + cs_len
        comp_len = hello[pos]
        pos += 1 + comp_len
        ext_total = int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        end = min(len(hello), pos + ext_total)
        while pos + 4 <= end:
            ext_type = int.from_bytes(hello[pos : pos + 2], "big")
            ext_len = int.from_bytes(hello[pos + 2 : pos + 4], "big")
            pos += 4
            if ext_type == 0:  # server_name
                # server_name_list length (2), name_type (1), name length (2), name
                if hello[pos + 2] == 0:
                    name_len = int.from_bytes(hello[pos + 3 : pos + 5], "big")
                    name = hello[pos + 5 : pos + 5 + name_len]
                    if len(name) == name_len:
                        return name.decode("ascii", "replace")
                return None
            pos += ext_len
    except IndexError:
        return None
    return None
