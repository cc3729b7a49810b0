"""HTTP/1.1 through the agent to a real nginx: bytes intact, one request event per exchange."""

from __future__ import annotations

import hashlib
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
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Agent, Path]]:
    tmp = tmp_path_factory.mktemp("agent-http1")
    with topology() as t:
        www = start_nginx(t, tmp)
        agent = start_agent(t, tmp)
        yield t, agent, www


def _ended(agent: Agent, n: int) -> list[dict[str, object]]:
    assert wait_for(lambda: sum(1 for r in requests_of(agent.events()) if r.get("ended")) >= n), \
        requests_of(agent.events())
    return requests_of(agent.events())


def test_keepalive_requests_are_counted_once_each(net: tuple[Topology, Agent, Path]) -> None:
    t, agent, www = net
    before = len(requests_of(agent.events()))
    big_sum = hashlib.sha256((www / "www" / "big.bin").read_bytes()).hexdigest()
    out = t.python(t.client, f"""
import http.client, hashlib
c = http.client.HTTPConnection('{SERVER_IP}', 80, timeout=10)
for path in ['/index.html', '/status500', '/nocontent', '/missing']:
    c.request('GET', path); r = c.getresponse(); r.read(); print(path, r.status)
c.request('HEAD', '/big.bin'); r = c.getresponse(); r.read(); print('HEAD', r.status, r.getheader('content-length'))
c.request('GET', '/big.bin'); r = c.getresponse(); body = r.read(); print('big', hashlib.sha256(body).hexdigest())
c.request('POST', '/echo', body=b'x' * 1000000); r = c.getresponse(); print('post', r.status, r.read())
def chunks():
    for _ in range(10): yield b'y' * 1000
c.request('POST', '/echo', body=chunks(), encode_chunked=True); r = c.getresponse(); print('chunked', r.status, r.read())
c.request('GET', '/index.html', headers={{'Connection': 'close'}}); r = c.getresponse(); print('close', r.read())
""")
    assert f"big {big_sum}" in out
    assert "/status500 500" in out and "/nocontent 204" in out and "/missing 404" in out
    assert "post 200 b'posted'" in out and "chunked 200 b'posted'" in out
    assert "HEAD 200" in out and "close b'hello from nginx\\n'" in out
    reqs = _ended(agent, before + 9)[before:]
    assert [(r["method"], r["path"], r["status"]) for r in reqs] == [
        ("GET", "/index.html", 200), ("GET", "/status500", 500), ("GET", "/nocontent", 204),
        ("GET", "/missing", 404), ("HEAD", "/big.bin", 200), ("GET", "/big.bin", 200),
        ("POST", "/echo", 200), ("POST", "/echo", 200), ("GET", "/index.html", 200),
    ]
    assert all(r["reset_error"] is None for r in reqs)
    assert reqs[5]["response_bytes"] == (www / "www" / "big.bin").stat().st_size
    assert reqs[6]["request_bytes"] == 1_000_000
    assert reqs[7]["request_bytes"] == 10_000
    assert reqs[4]["response_bytes"] == 0
    # The connection was reported with the client's address and nginx as destination.
    opens = [e for e in agent.events() if e["ev"] == "open" and e["protocol"] == "http1"]
    assert opens and opens[-1]["source"][0] == CLIENT_IP
    assert opens[-1]["destination"] == [SERVER_IP, 80]
