"""SIGTERM with capture still pointing at the agent and no other agent to take over: the agent
keeps accepting until the redirector has taken its hook out (pods then dial directly), so closing
its listeners refuses nobody. (The rolling update, with a second agent, is test_agent_traffic_restart.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agent_traffic_net import SERVER_IP, requests_of, start_agent, start_nginx, topology, wait_for
from nodemesh.redirector.plan import CHAIN_PREROUTING

pytestmark = pytest.mark.root


def test_agent_keeps_accepting_until_capture_is_gone(tmp_path: Path) -> None:
    with topology() as t:
        start_nginx(t, tmp_path)
        agent = start_agent(t, tmp_path, "agent", workers=1)
        # The redirector's hook, as `capture_active` sees it (an empty chain: the topology's own
        # DNAT rule still does the capturing).
        t.run(t.agent, "iptables", "-t", "nat", "-N", CHAIN_PREROUTING)
        t.run(t.agent, "iptables", "-t", "nat", "-I", "PREROUTING", "1", "-j", CHAIN_PREROUTING)

        def get() -> str:
            return t.run(t.client, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                         f"http://{SERVER_IP}/index.html").stdout

        assert get() == "200"
        agent.sigterm()
        # Still captured, nobody else listening: new connections keep being served by this agent.
        for _ in range(5):
            assert get() == "200"
            time.sleep(0.1)
        assert agent.proc.poll() is None
        served = len(requests_of(agent.events()))
        assert served >= 6
        # The redirector takes the hook out: the agent drains and exits promptly.
        removed = time.monotonic()
        t.run(t.agent, "iptables", "-t", "nat", "-D", "PREROUTING", "-j", CHAIN_PREROUTING)
        t.run(t.agent, "iptables", "-t", "nat", "-X", CHAIN_PREROUTING)
        assert wait_for(lambda: agent.proc.poll() is not None, timeout=10)
        assert agent.proc.returncode == 0
        assert time.monotonic() - removed < 3.0
        log = agent.stderr.read_text()
        assert "event=handoff reason=capture_removed" in log, log
        assert "event=drain_done aborted=0" in log, log
