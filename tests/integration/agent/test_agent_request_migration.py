"""net.ipv4.tcp_migrate_req on a node whose containers see /proc/sys read-only (issue 11 item 10).

On a real node the agent logged `tcp_migrate_req_unavailable` (read-only /proc/sys in its
container) and the setting stayed 0. It matters: on a rolling update the old agent closes its
SO_REUSEPORT listeners, and the connections completed in their accept queues are reset unless the
kernel may move them to the new agent's listeners. Measured with this file's `--measure` (wrk, a new
connection per request, rolling restart of a 2-worker agent), 20 rounds each on the shared 2-core
machine: with 0, 12 rounds reset 1-22 connections each (121 in all); with 1, none.

So the DaemonSet's privileged init container sets it (`python -m nodemesh.redirector sysctls`) and
the agents, run here like containers with /proc/sys read-only, only read it.

    python3 tests/integration/agent/test_agent_request_migration.py --measure 8    # root, ~3 min
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from agent_traffic_net import SERVER_IP, Agent, Topology, start_nginx, topology

pytestmark = pytest.mark.root

SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


def start_agent_readonly_sysctls(t: Topology, tmp: Path, name: str, extra: tuple[str, ...] = ()) -> Agent:
    """The agent as in its container: /proc/sys mounted read-only (a mount namespace of its own)."""
    stderr, events = tmp / f"{name}.log", tmp / f"{name}-events.jsonl"
    argv = [sys.executable, "-m", "nodemesh.agent", "--node", "n1", "--node-ip", "10.201.1.1", "--pod-cidr",
            "10.201.1.0/24", "--workers", "2", "--log-level", "info", *extra]
    script = ("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "
              + shlex.join(argv))
    with open(stderr, "wb") as err:
        proc = t.exec(t.agent, "unshare", "--mount", "sh", "-c", script, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 30
    while "event=agent_ready" not in stderr.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"agent {name} not ready:\n{stderr.read_text()}")
        time.sleep(0.05)
    return Agent(proc, events, stderr)


def new_connection_load(t: Topology, seconds: int) -> subprocess.Popen[bytes]:
    """wrk with `Connection: close`: every request on a new connection, so accept queues are busy."""
    return t.exec(t.client, "wrk", "-t2", "-c32", f"-d{seconds}s", "-H", "Connection: close",
                  f"http://{SERVER_IP}/index.html", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wrk_result(text: str) -> tuple[int, int, int]:
    """(requests, socket errors, non-2xx)."""
    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return total, errors, int(m.group(1)) if m else 0


def rolling_restart(t: Topology, tmp: Path) -> tuple[int, int, int]:
    """Old agent under new-connection load; a new one starts beside it; the old one gets SIGTERM."""
    start_nginx(t, tmp)
    old = start_agent_readonly_sysctls(t, tmp, "old", ("--drain-grace", "5"))
    load = new_connection_load(t, 5)
    time.sleep(1.5)
    start_agent_readonly_sysctls(t, tmp, "new")
    time.sleep(0.5)
    old.sigterm()
    out, _ = load.communicate(timeout=60)
    assert old.proc.wait(timeout=30) == 0
    return wrk_result(out.decode())


def node_sysctls(t: Topology) -> str:
    """What the DaemonSet's init container runs, here in the agent's (the node's) namespace."""
    return t.run(t.agent, sys.executable, "-m", "nodemesh.redirector", "sysctls").stderr


def test_agent_rolling_restart_resets_nothing_with_migration_set_by_the_init_step(tmp_path: Path) -> None:
    with topology() as t:
        assert t.run(t.agent, "cat", SYSCTL).stdout.strip() == "0"       # a new namespace's default
        assert "status=set before=0" in node_sysctls(t)
        assert "status=unchanged" in node_sysctls(t)                       # the next pod start
        total, errors, non2xx = rolling_restart(t, tmp_path)
        print(f"rolling restart, tcp_migrate_req=1: {total} requests, {errors} socket errors, {non2xx} non-2xx")
        logs = (tmp_path / "old.log").read_text() + (tmp_path / "new.log").read_text()
        assert "tcp_migrate_req" not in logs             # set by the init step: nothing to warn about
        assert total > 500 and errors == 0 and non2xx == 0


def test_agent_warns_once_with_a_hint_when_migration_is_off(tmp_path: Path) -> None:
    with topology() as t:
        agent = start_agent_readonly_sysctls(t, tmp_path, "agent")
        agent.sigterm()
        agent.proc.wait(timeout=30)
        warnings = [ln for ln in agent.stderr.read_text().splitlines() if "tcp_migrate_req" in ln]
        assert len(warnings) == 1 and "nodemesh.redirector sysctls" in warnings[0], warnings
        assert t.run(t.agent, "cat", SYSCTL).stdout.strip() == "0"      # read-only: it could not, and did not


def measure(rounds: int) -> None:
    """Rolling restarts with the setting off and on, printed (not a test: the resets are racy)."""
    for value in ("0", "1"):
        for i in range(rounds):
            with tempfile.TemporaryDirectory() as d, topology() as t:
                t.run(t.agent, "sysctl", "-qw", f"net.ipv4.tcp_migrate_req={value}")
                total, errors, non2xx = rolling_restart(t, Path(d))
            print(f"tcp_migrate_req={value} round={i} requests={total} socket_errors={errors} non2xx={non2xx}",
                  flush=True)


if __name__ == "__main__":
    measure(int(sys.argv[sys.argv.index("--measure") + 1]) if "--measure" in sys.argv else 5)
