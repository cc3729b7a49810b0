"""The agent's parent never forks while grpc's threads run (issue 11 item 5).

On a real node the parent logged `fork_posix.cc:71] Other threads are currently calling into gRPC,
skipping fork() handlers` every 2 s (its capture check ran `iptables-*-save` as asyncio subprocesses,
which uvloop forks), and once a forked child died in grpc's poller (`ev_epoll1_linux.cc ... Check
failed`). Here the real agent runs with a real controller link for ~15 s while its capture check
reads the hook going in, out and in again, serves traffic, and re-spawns a worker killed with -9:
grpc's log (at INFO, where that line is written) must hold no fork line, and the controller must
see every capture change. A control test shows the line does appear when a fork happens.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_traffic_net import SERVER_IP, Topology, start_agent, start_nginx, topology, wait_for
from nodemesh.redirector.plan import CHAIN_PREROUTING

pytestmark = pytest.mark.root

GRPC_PORT, WEB_PORT = 18085, 18084
FORK_LINES = ("fork_posix", "skipping fork() handlers", "Check failed")


def start_controller(t: Topology, tmp: Path) -> Path:
    state = tmp / "state"
    state.mkdir()
    (state / "objects.json").write_text('{"resourceVersion": "1", "items": []}')
    (tmp / "token").write_text("s3cret\n")
    log = tmp / "controller.log"
    with open(log, "wb") as out:
        t.exec(t.agent, sys.executable, "-m", "nodemesh.controlplane", "--source", "sandbox", "--state-dir",
               str(state), "--listen", "127.0.0.1", "--grpc-port", str(GRPC_PORT), "--web-port", str(WEB_PORT),
               "--token-file", str(tmp / "token"), stdout=subprocess.DEVNULL, stderr=out)
    return tmp / "token"


def capture_seen_by_controller(t: Topology) -> str:
    """What the controller's Check says about node n1: 'True', 'False', 'absent' or 'unreachable ...'."""
    code = (
        "import grpc\n"
        "from nodemesh.api.gen import nodemesh_pb2 as pb, nodemesh_pb2_grpc as g\n"
        f"ch = grpc.insecure_channel('127.0.0.1:{GRPC_PORT}')\n"
        "try:\n"
        "    r = g.ControllerStub(ch).Check(pb.CheckRequest(), timeout=5,\n"
        "                                   metadata=(('authorization', 'Bearer s3cret'),))\n"
        "    print(next((str(n.capture_installed) for n in r.nodes if n.node == 'n1' and n.agent_connected),\n"
        "               'absent'))\n"
        "except grpc.RpcError as exc:\n"
        "    print('unreachable', exc.code())\n"
    )
    return t.python(t.agent, code).strip()


def set_hook(t: Topology, present: bool) -> None:
    """The redirector's hook, as the agent's capture check reads it (an empty chain: the topology's
    own REDIRECT rule does the capturing)."""
    if present:
        t.run(t.agent, "iptables", "-t", "nat", "-N", CHAIN_PREROUTING, check=False)
        t.run(t.agent, "iptables", "-t", "nat", "-I", "PREROUTING", "1", "-j", CHAIN_PREROUTING)
    else:
        t.run(t.agent, "iptables", "-t", "nat", "-D", "PREROUTING", "-j", CHAIN_PREROUTING)


def test_agent_parent_with_controller_link_never_forks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_VERBOSITY", "INFO")   # the level fork_posix.cc writes at, whatever the default
    with topology() as t:
        start_nginx(t, tmp_path)
        token = start_controller(t, tmp_path)
        agent = start_agent(t, tmp_path, workers=2, extra=("--controller", f"127.0.0.1:{GRPC_PORT}",
                                                           "--token-file", str(token)))
        started = time.monotonic()

        def get() -> str:
            return t.run(t.client, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
                         f"http://{SERVER_IP}/index.html").stdout

        assert wait_for(lambda: capture_seen_by_controller(t) == "False", 15), "agent never reported"
        set_hook(t, True)
        assert wait_for(lambda: capture_seen_by_controller(t) == "True", 10)
        assert get() == "200"
        # A worker dies: the parent, grpc threads running, starts a new one.
        log = agent.stderr.read_text()
        victim = int(re.search(r"event=worker_started index=1 pid=(\d+) how=fork", log).group(1))  # type: ignore[union-attr]
        subprocess.run(["kill", "-9", str(victim)], check=True)
        assert wait_for(lambda: "index=1 pid=" in agent.stderr.read_text().split("action=restart", 1)[-1]
                        and "how=exec" in agent.stderr.read_text(), 15), agent.stderr.read_text()
        for _ in range(4):   # both workers serve (SO_REUSEPORT spreads the connections)
            assert get() == "200"
        set_hook(t, False)
        assert wait_for(lambda: capture_seen_by_controller(t) == "False", 10)
        set_hook(t, True)
        assert wait_for(lambda: capture_seen_by_controller(t) == "True", 10)
        # A while with the link up: several 2 s capture checks.
        while time.monotonic() - started < 15:
            time.sleep(0.5)
        agent.sigterm()
        agent.proc.wait(timeout=30)
        log = agent.stderr.read_text()
        assert "event=controller_connected" in log
        assert log.count("event=capture_state") == 3   # in, out, in again
        forks = [line for line in log.splitlines() if any(w in line for w in FORK_LINES)]
        assert forks == [], "\n".join(forks)


CONTROL = """
import asyncio, sys
import grpc, uvloop

async def main():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await channel.channel_ready()
    if sys.argv[1] == "asyncio":        # what the agent did: uvloop's subprocess, fork() + exec()
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
    else:                               # what it does now
        from nodemesh.agent import spawn
        await spawn.run(["true"])
    await channel.close()
    await server.stop(None)

uvloop.run(main())
"""


@pytest.mark.parametrize(("how", "forks"), [("asyncio", True), ("spawn", False)])
def test_agent_fork_line_control(how: str, forks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The line the test above looks for is written when a grpc process forks, and not with spawn."""
    monkeypatch.setenv("GRPC_VERBOSITY", "INFO")
    res = subprocess.run([sys.executable, "-c", CONTROL, how], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert ("fork_posix" in res.stderr) is forks, res.stderr
