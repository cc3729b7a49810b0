"""The malformed inputs nginx must answer the same with and without the mesh (issue 12): raw
HTTP/1 and HTTP/2 payloads, and the normalisation of an answer before comparing (the Date header).
Used by tests/integration/faults/test_faults_transparency.py and tests/bench/faults.py."""

from __future__ import annotations

import re

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def h2(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


HTTP1 = {
    "bare LF line ends": b"GET /ok HTTP/1.1\nHost: t\nConnection: close\n\n",
    "unknown version HTTP/9.9": b"GET /ok HTTP/9.9\r\nHost: t\r\n\r\n",
    "valid request then junk, one read": b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n\x00\x01junk\r\n\r\n",
    "two requests, bare LF, pipelined": b"GET /ok HTTP/1.1\nHost: t\n\nGET / HTTP/1.1\nHost: t\nConnection: close\n\n",
    "invalid chunk size": b"POST /ok HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    "garbage header line": b"GET /ok HTTP/1.1\r\nHost: t\r\n\x00\x01\x02 nonsense\r\n\r\n",
    "malformed request line": b"GET /a b c HTTP/1.1\r\nHost: t\r\n\r\n",
    "HTTP/1.0 without Host": b"GET /ok HTTP/1.0\r\n\r\n",
    "absolute-form target": b"GET http://t/ok HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "unknown method": b"BREW /ok HTTP/1.1\r\nHost: t\r\n\r\n",
    "space before colon": b"GET /ok HTTP/1.1\r\nHost : t\r\n\r\n",
    "content-length and chunked": (b"POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "header block over 64 KB": b"GET /ok HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
}
HTTP2 = {
    "bad HPACK index 0": H2_PREFACE + SETTINGS + h2(1, 0x5, 1, b"\x80"),
    "CONTINUATION without HEADERS": H2_PREFACE + SETTINGS + h2(9, 0x4, 1, b"\x82"),
    "HEADERS on stream 0": H2_PREFACE + SETTINGS + h2(1, 0x5, 0, b"\x82\x86\x84"),
    "DATA on an idle stream": H2_PREFACE + SETTINGS + h2(0, 0x1, 3, b"hello"),
}

_DATE = re.compile(rb"\r?\nDate: [^\r\n]*")


def normalize(got: bytes) -> bytes:
    return _DATE.sub(b"\nDate: -", got)
