"""Must-show 3: a rolling restart under wrk load drops nothing.

A second agent binds the same ports (SO_REUSEPORT) while the first serves a wrk run; the first
gets SIGTERM mid-run: its busy keep-alive connections move to the new agent between two requests
(agent/handover.py), and any that cannot are closed by the server after a request carrying
`Connection: close`, wrk reconnecting to the new agent. Either way nothing fails.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from agent_traffic_net import SERVER_IP, start_agent, start_nginx, topology

pytestmark = pytest.mark.root


def test_sigterm_during_wrk_with_second_agent_fails_nothing(tmp_path: Path) -> None:
    with topology() as t:
        start_nginx(t, tmp_path)
        old = start_agent(t, tmp_path, "old", workers=2, extra=("--drain-grace", "10"))
        wrk = t.exec(t.client, "wrk", "-t2", "-c16", "-d6s", f"http://{SERVER_IP}/index.html",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1.5)
        new = start_agent(t, tmp_path, "new", workers=2, extra=("--admin-port", "4191"))
        time.sleep(0.5)
        old.sigterm()
        out, _ = wrk.communicate(timeout=30)
        text = out.decode()
        assert old.proc.wait(timeout=20) == 0
        assert "event=drain_done aborted=0" in old.stderr.read_text()
        total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
        print(text, [ln for ln in old.stderr.read_text().splitlines() if "drain" in ln])
        assert total > 1000, text
        assert "Socket errors" not in text, text
        assert "Non-2xx" not in text, text
        # Both agents carried traffic: the new one took over the connections wrk reopened.
        old_reqs = sum(1 for e in old.events() if e["ev"] == "end")
        new_reqs = sum(1 for e in new.events() if e["ev"] == "end")
        assert old_reqs > 0 and new_reqs > 0
        assert all(e["reset_error"] is None for e in old.events() + new.events() if e["ev"] == "end")
