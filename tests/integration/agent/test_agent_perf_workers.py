"""Workers are forked from the lean parent (shared pages), and a dead worker comes back by exec.

A 2-worker agent in the agent namespace: both workers are forks (same command line as the
parent, no exec), their pages are largely shared with the parent; one is SIGKILLed and a new
worker is exec'd (`nodemesh.agent.worker`), after which requests through the agent still all
succeed, on new connections spread over both workers; SIGTERM then ends the agent with code 0.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from agent_traffic_net import SERVER_IP, start_agent, start_nginx, topology, wait_for

pytestmark = pytest.mark.root


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    kids: list[int] = []
    for tid in tasks:
        try:
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return kids


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _rollup(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in smaps_rollup of {pid}")


def _requests(t, n: int) -> str:  # type: ignore[no-untyped-def]
    # One new connection per request: SO_REUSEPORT spreads them over both workers.
    return t.python(t.client, f"""
import http.client
codes = []
for i in range({n}):
    c = http.client.HTTPConnection("{SERVER_IP}", 80, timeout=10)
    c.request("GET", "/index.html")
    codes.append(c.getresponse().status)
    c.close()
print(codes.count(200), len(codes))
""")


def test_forked_workers_share_memory_and_a_killed_worker_is_reexeced(tmp_path: Path) -> None:
    with topology() as t:
        start_nginx(t, tmp_path)
        agent = start_agent(t, tmp_path, "perf", workers=2)
        parent = agent.proc.pid  # `ip netns exec` execs the agent: same pid
        assert wait_for(lambda: len(_children(parent)) == 2, 10), _children(parent)
        workers = _children(parent)
        for pid in workers:
            assert _cmdline(pid) == _cmdline(parent), "initial workers are forks, not exec'd"
            # Forked: most of a worker's resident pages are the parent's, shared copy-on-write.
            shared = _rollup(pid, "Shared_Clean") + _rollup(pid, "Shared_Dirty")
            assert shared > _rollup(pid, "Rss") // 2, (pid, shared, _rollup(pid, "Rss"))
        assert _requests(t, 8).split() == ["8", "8"]

        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: "how=exec" in agent.stderr.read_text(), 15), agent.stderr.read_text()
        assert wait_for(lambda: len(_children(parent)) == 2 and victim not in _children(parent), 10)
        fresh = [p for p in _children(parent) if p not in workers]
        assert len(fresh) == 1 and "nodemesh.agent.worker" in _cmdline(fresh[0])
        # The exec'd worker logs its listeners too: the second "listening" line of index 0.
        assert wait_for(lambda: agent.stderr.read_text().count("worker=0 event=worker_listening") >= 2, 10)
        assert _requests(t, 24).split() == ["24", "24"]

        agent.sigterm()
        assert agent.proc.wait(timeout=20) == 0
        log = agent.stderr.read_text()
        assert "Traceback" not in log, log
        assert log.count("event=drain_done") == 2, log
        time.sleep(0.1)
        assert not _children(parent)
