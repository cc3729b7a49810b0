"""HTTP/2 (h2load, gRPC), WebSocket, opaque bulk TCP and server-speaks-first through the agent."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_traffic_net import (
    CLIENT_IP,
    SERVER_IP,
    Agent,
    Topology,
    requests_of,
    start_agent,
    start_nginx,
    topology,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.root
HERE = Path(__file__).parent
PORTS = {"grpc": 50051, "websocket": 8765, "bulk": 9000, "banner": 2525}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Agent]]:
    tmp = tmp_path_factory.mktemp("agent-protocols")
    with topology() as t:
        start_nginx(t, tmp)
        for kind, port in PORTS.items():
            t.exec(t.server, sys.executable, str(HERE / "servers_agent_traffic.py"), kind, SERVER_IP, str(port))
        for port in PORTS.values():
            wait_port(t, t.server, SERVER_IP, port)
        yield t, start_agent(t, tmp)


def _new_requests(agent: Agent, before: int, n: int) -> list[dict[str, object]]:
    assert wait_for(lambda: sum(1 for r in requests_of(agent.events())[before:] if r.get("ended")) >= n), \
        requests_of(agent.events())[before:]
    time.sleep(0.2)  # nothing more may arrive
    return requests_of(agent.events())[before:]


def test_h2load_every_stream_is_a_request(net: tuple[Topology, Agent]) -> None:
    t, agent = net
    before = len(requests_of(agent.events()))
    res = t.run(t.client, "h2load", "-n", "300", "-c", "3", "-m", "10", f"http://{SERVER_IP}:8080/index.html")
    assert "300 succeeded, 0 failed, 0 errored" in res.stdout, res.stdout
    reqs = _new_requests(agent, before, 300)
    assert len(reqs) == 300
    assert {(r["method"], r["path"], r["status"], r["reset_error"]) for r in reqs} == {
        ("GET", "/index.html", 200, None)}
    assert all(r["response_bytes"] == len("hello from nginx\n") for r in reqs)


def test_grpc_unary_streaming_and_failures(net: tuple[Topology, Agent]) -> None:
    t, agent = net
    before = len(requests_of(agent.events()))
    out = t.python(t.client, f"""
import grpc, hashlib
ch = grpc.insecure_channel('{SERVER_IP}:{PORTS["grpc"]}')
unary = ch.unary_unary('/test.Echo/Unary')
stream = ch.unary_stream('/test.Echo/Stream')
collect = ch.stream_unary('/test.Echo/Collect')
for i in range(20):
    assert unary(b'hi%d' % i, timeout=10) == b'echo:hi%d' % i
try:
    unary(b'fail', timeout=10); print('no error')
except grpc.RpcError as e:
    print('code', e.code().name)
msgs = list(stream(b'50', timeout=30))
print('stream', len(msgs), msgs[-1])
blobs = [bytes([i]) * 100000 for i in range(30)]
print('collect', collect(iter(blobs), timeout=30).decode() == hashlib.sha256(b''.join(blobs)).hexdigest())
""")
    assert "code NOT_FOUND" in out and "stream 50 b'msg-49'" in out and "collect True" in out
    reqs = _new_requests(agent, before, 23)
    assert len(reqs) == 23
    assert all(r["grpc"] and r["status"] == 200 and r["reset_error"] is None for r in reqs)
    paths = [r["path"] for r in reqs]
    assert paths.count("/test.Echo/Unary") == 21
    assert [r["grpc_status"] for r in reqs if r["path"] == "/test.Echo/Unary"].count(5) == 1
    assert [r["grpc_status"] for r in reqs if r["path"] == "/test.Echo/Unary"].count(0) == 20
    streamed = next(r for r in reqs if r["path"] == "/test.Echo/Stream")
    assert streamed["grpc_status"] == 0 and streamed["response_bytes"] == sum(5 + len(b"msg-%d" % i) for i in range(50))
    collected = next(r for r in reqs if r["path"] == "/test.Echo/Collect")
    assert collected["request_bytes"] == 30 * (5 + 100000)


def test_websocket_upgrade_becomes_opaque(net: tuple[Topology, Agent]) -> None:
    t, agent = net
    before = len(requests_of(agent.events()))
    out = t.python(t.client, f"""
import asyncio, os, websockets
async def main():
    async with websockets.connect('ws://{SERVER_IP}:{PORTS["websocket"]}/chat', max_size=None) as ws:
        for i in range(20):
            await ws.send('m%d' % i); assert await ws.recv() == 'm%d' % i
        big = os.urandom(2000000)
        await ws.send(big); assert await ws.recv() == big
    print('ws ok')
asyncio.run(main())
""")
    assert "ws ok" in out
    reqs = _new_requests(agent, before, 1)
    assert len(reqs) == 1 and reqs[0]["status"] == 101 and reqs[0]["path"] == "/chat"
    conn = reqs[0]["conn"]
    assert wait_for(lambda: any(e["ev"] == "close" and e["conn"] == conn for e in agent.events()))
    close = next(e for e in agent.events() if e["ev"] == "close" and e["conn"] == conn)
    assert close["read_bytes"] > 2_000_000 and close["write_bytes"] > 2_000_000


def test_opaque_bulk_transfer_with_half_close(net: tuple[Topology, Agent]) -> None:
    t, agent = net
    out = t.python(t.client, f"""
import socket, hashlib, os
data = os.urandom(20 * 1024 * 1024)
s = socket.create_connection(('{SERVER_IP}', {PORTS["bulk"]}), timeout=30)
print('local', s.getsockname()[1])
s.sendall(data); s.shutdown(socket.SHUT_WR)
got = b''
while chunk := s.recv(1 << 16):
    got += chunk
digest, rest = got.split(b'\\n', 1)
print('sha', digest.decode() == hashlib.sha256(data).hexdigest(), rest == bytes(range(256)) * 4096 * 5)
""")
    assert "sha True True" in out
    port = int(out.split("local ")[1].split()[0])
    opened = [e for e in agent.events() if e["ev"] == "open" and e["source"] == [CLIENT_IP, port]]
    assert len(opened) == 1 and opened[0]["protocol"] == "tcp"
    conn = opened[0]["conn"]
    assert wait_for(lambda: any(e["ev"] == "close" and e["conn"] == conn for e in agent.events()))
    close = next(e for e in agent.events() if e["ev"] == "close" and e["conn"] == conn)
    assert close["read_bytes"] == 20 * 1024 * 1024
    assert close["write_bytes"] == 65 + 5 * 256 * 4096
    assert close["error"] is None


def test_server_speaks_first_is_heard_without_waiting(net: tuple[Topology, Agent]) -> None:
    t, _agent = net
    out = t.python(t.client, f"""
import socket, time
s = socket.create_connection(('{SERVER_IP}', {PORTS["banner"]}), timeout=10)
t0 = time.monotonic()
banner = s.recv(100)
print('banner', banner, round(time.monotonic() - t0, 3))
s.sendall(b'QUIT\\r\\n')
print('reply', s.recv(100))
""")
    assert "banner b'220 banner ready\\r\\n'" in out and "reply b'221 bye QUIT\\r\\n'" in out
    waited = float(out.split("banner ready\\r\\n' ")[1].split()[0])
    assert waited < 0.5  # not held back by the 1 s detection timeout
