"""Bad input is answered like a real server would, and leaves no connection behind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from agent_traffic_net import SERVER_IP, Agent, Topology, start_agent, start_nginx, topology, wait_for

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Agent]]:
    tmp = tmp_path_factory.mktemp("agent-badinput")
    with topology() as t:
        start_nginx(t, tmp)
        yield t, start_agent(t, tmp, extra=("--header-timeout", "1"))


def _exchange(t: Topology, payload: str, port: int = 80, wait: float = 5.0) -> str:
    """Send raw bytes (a Python bytes literal), return what came back until close."""
    return t.python(t.client, f"""
import socket
s = socket.create_connection(('{SERVER_IP}', {port}), timeout={wait})
try:
    s.sendall({payload})
except OSError as e:
    print('send-error', e)
got = b''
try:
    while chunk := s.recv(65536):
        got += chunk
except OSError as e:
    print('recv-error', type(e).__name__)
print(repr(got))
""", timeout=wait + 30)


def test_oversized_headers_get_431(net: tuple[Topology, Agent]) -> None:
    t, _ = net
    out = _exchange(t, "b'GET / HTTP/1.1\\r\\nHost: x\\r\\n' + b'X-Big: ' + b'a' * (1024 * 1024) + b'\\r\\n\\r\\n'")
    # The bytes go to the server whatever the agent's parser thinks (transparency): nginx's own head
    # limit (8 KB) answers 400. (An agent of old answered 431 itself when its 64 KB limit tripped.)
    assert "HTTP/1.1 431" in out or "HTTP/1.1 400" in out


def test_invalid_chunk_size_gets_400(net: tuple[Topology, Agent]) -> None:
    t, _ = net
    out = _exchange(t, "b'POST /echo HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\nzz\\r\\nhello\\r\\n'")
    assert "HTTP/1.1 400" in out


def test_garbage_header_line_gets_400(net: tuple[Topology, Agent]) -> None:
    t, _ = net
    out = _exchange(t, "b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\x00\\x01\\x02 nonsense\\r\\n\\r\\n'")
    assert "HTTP/1.1 400" in out


def test_malformed_request_line_is_answered(net: tuple[Topology, Agent]) -> None:
    t, _ = net
    out = _exchange(t, "b'GET /a b c HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'")
    assert "HTTP/1.1 400" in out


def test_slowloris_gets_408_after_header_timeout(net: tuple[Topology, Agent]) -> None:
    t, _ = net
    started = time.monotonic()
    out = _exchange(t, "b'GET / HTTP/1.1\\r\\nHost: x\\r\\nX-Slow: '", wait=8)
    assert "HTTP/1.1 408" in out
    assert time.monotonic() - started < 6


def test_http2_compression_error_gets_goaway(net: tuple[Topology, Agent]) -> None:
    t, _ = net
    # Preface, empty SETTINGS, then a HEADERS frame whose block indexes entry 0 (invalid in HPACK).
    payload = ("b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + b'\\x00\\x00\\x00\\x04\\x00\\x00\\x00\\x00\\x00'"
               " + b'\\x00\\x00\\x01\\x01\\x05\\x00\\x00\\x00\\x01\\x80'")
    out = _exchange(t, payload, port=8080)
    got = eval(out.strip().splitlines()[-1])
    # Somewhere in what came back: a GOAWAY frame (type 7) with COMPRESSION_ERROR (9).
    pos = 0
    codes = []
    while pos + 9 <= len(got):
        length = int.from_bytes(got[pos:pos + 3], "big")
        if got[pos + 3] == 7:
            codes.append(int.from_bytes(got[pos + 13:pos + 17], "big"))
        pos += 9 + length
    assert 9 in codes, got


def test_no_connection_left_open(net: tuple[Topology, Agent]) -> None:
    _, agent = net

    def balanced() -> bool:
        events = agent.events()
        return sum(e["ev"] == "open" for e in events) == sum(e["ev"] == "close" for e in events)

    assert wait_for(balanced, timeout=10)
    events = agent.events()
    assert sum(e["ev"] == "open" for e in events) >= 6
    assert all(e.get("ended") is not False for e in events)
