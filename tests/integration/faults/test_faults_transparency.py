"""Issue 12, the malformed-input row: what nginx answers without the mesh, it answers with it.

Each payload is sent raw, once from nginx's own node (not captured: the direct answer) and once
from a client pod on each node (captured: outbound, and inbound too across nodes); what comes back
must be the same bytes (HTTP/1: apart from the Date header) and end the same way. Before: a bare-LF
request got 400 from the agent (nginx: 200), HTTP/9.9 got 400 (nginx: 505), a valid request followed
by junk in one read was not answered (nginx answers it, then 400), and the agent answered HTTP/2
protocol errors with its own GOAWAY.
"""

from __future__ import annotations

import re

import pytest
from faults_harness import PEERS, PY, Faults

pytestmark = pytest.mark.root

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


def _normalize(got: bytes) -> bytes:
    return _DATE.sub(b"\nDate: -", got)


def _send(faults: Faults, via: str, port: int, payload: bytes) -> tuple[bytes, str]:
    srv = faults.server("nginx")
    argv = [PY, PEERS, "raw", srv.ip, str(port), "-", "2"]
    if via == "direct":
        res = faults.sb.node_exec(srv.node, argv, input=payload.hex(), capture_output=True, text=True, timeout=60)
    else:
        client = faults.client_near(srv, via == "same-node")
        res = faults.sb.exec("faults", client.name, argv, input=payload.hex(), capture_output=True, text=True,
                             timeout=60)
    assert res.returncode == 0, res.stderr
    out = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    return bytes.fromhex(out["got"]), out["end"]


@pytest.mark.parametrize("case", list(HTTP1) + list(HTTP2))
def test_faults_malformed_input_answered_as_nginx_answers(faults: Faults, case: str) -> None:
    port, payload = (8080, HTTP1[case]) if case in HTTP1 else (8081, HTTP2[case])
    direct = _send(faults, "direct", port, payload)
    first = direct[0].split(b"\n", 1)[0] if port == 8080 else direct[0][:40].hex()
    for via in ("same-node", "cross-node"):
        meshed = _send(faults, via, port, payload)
        print(f"transparency cni={faults.cni} {case!r} {via}: nginx {first!r} ({direct[1]}) | "
              f"mesh {'same' if _normalize(meshed[0]) == _normalize(direct[0]) else meshed[0][:60]!r} ({meshed[1]})")
        assert (_normalize(meshed[0]), meshed[1]) == (_normalize(direct[0]), direct[1]), (via, meshed, direct)
