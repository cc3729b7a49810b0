"""Issue 12, item 4 (bounded labels): one pod sending many distinct Host headers cannot grow the
agent's series past the per-workload cap, and every request is still counted.

The real agent (2 workers) between a client namespace and nginx; the client sends 20,000 requests
over 20 keep-alive connections, each with its own Host. `/metrics` (the same series the controller
is sent) must hold at most `--max-authorities` + 1 (`[other]`) authority values per metric, and the
request and response counts must add up to exactly what was sent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_traffic_net import SERVER_IP, Agent, Topology, start_agent, start_nginx, topology, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.root

CAP = 50
N = 20_000
CONNECTIONS = 20


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Agent]]:
    tmp = tmp_path_factory.mktemp("agent-labelcap")
    with topology() as t:
        start_nginx(t, tmp)
        agent = start_agent(t, tmp, workers=2, extra=("--max-authorities", str(CAP)))
        yield t, agent


def scrape(t: Topology) -> dict[str, list[tuple[dict[str, str], float]]]:
    res = t.run(t.agent, "python3", "-c",
                "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:4191/metrics').read().decode())",
                check=False)
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(res.stdout):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_many_host_headers_stay_under_the_cap_and_all_are_counted(net: tuple[Topology, Agent]) -> None:
    t, agent = net
    rss_before = rss_kb(agent.proc.pid)
    started = time.monotonic()
    out = t.python(t.client, f"""
import socket, threading
N, C = {N}, {CONNECTIONS}
codes = []
def run(c):
    s = socket.create_connection(('{SERVER_IP}', 80), timeout=20)
    f = s.makefile('rb')
    mine = 0
    for i in range(c, N, C):
        s.sendall(f'GET /index.html HTTP/1.1\\r\\nHost: h{{i}}.example\\r\\n\\r\\n'.encode())
        status = f.readline()
        length = 0
        while True:
            line = f.readline()
            if line in (b'\\r\\n', b''):
                break
            if line.lower().startswith(b'content-length:'):
                length = int(line.split(b':')[1])
        f.read(length)
        mine += status.startswith(b'HTTP/1.1 200')
    codes.append(mine)
    s.close()
threads = [threading.Thread(target=run, args=(c,)) for c in range(C)]
[th.start() for th in threads]; [th.join() for th in threads]
print(sum(codes))
""", timeout=180)
    sent_s = time.monotonic() - started
    assert int(out.strip()) == N, out

    def all_counted() -> bool:
        m = scrape(t)
        return sum(v for _, v in m.get("request_total", [])) >= N
    assert wait_for(all_counted, timeout=30), "not every request reached /metrics"
    m = scrape(t)
    requests = m["request_total"]
    authorities = {labels["authority"] for labels, _ in requests}
    assert len(authorities) <= CAP + 1 and "[other]" in authorities, len(authorities)
    assert sum(v for _, v in requests) == N
    assert sum(v for _, v in m["response_total"]) == N
    for name in ("response_total", "response_latency_ms_count"):
        assert len({labels["authority"] for labels, _ in m[name]}) <= CAP + 1, name
    overflow = sum(v for labels, v in m["nodemesh_label_overflow_total"] if labels["label"] == "authority")
    other = sum(v for labels, v in requests if labels["authority"] == "[other]")
    assert overflow == other == N - sum(v for labels, v in requests if labels["authority"] != "[other]")
    assert other == N - CAP  # every Host is new: the first CAP the parent saw got a series each
    rss_after = rss_kb(agent.proc.pid)
    print(f"\n{N} requests with distinct Host in {sent_s:.1f}s; series per metric "
          f"{len(authorities)}; agent parent RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB")
    assert agent.proc.poll() is None
