"""Authentication end to end on loopback: the real controller (`main.start` with --token-file, as
`nodemesh install --sandbox` runs it), the real `nodemesh` CLI in a subprocess, and the agent's
real ControllerLink.

* `nodemesh stat` without a token: one `Error:` line, exit 1; with a wrong one: refused; with the
  sandbox's `controller.token` found beside `controller.addr`: the table.
* an agent with a wrong token never gets a session; after the token file is fixed it connects
  (it re-reads the file per connect), and the controller sees it.
* the web port's probes and /metrics stay open.
* the controller refuses to start open on a non-loopback address, and says so in one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.report import ControllerLink
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.auth import MISSING_TOKEN
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.main import RunningController, start
from nodemesh.manifests.sandboxfiles import write_controller_address

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
SANDBOX = "authbox"
TOKEN = "sandbox-token-0123456789"


def run(coro_fn: Callable[[], Awaitable[Any]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 90))


def sandbox_dir(root: Path) -> Path:
    state = root / SANDBOX
    state.mkdir(parents=True)
    write_objects(state, ClusterObjects(1, json.loads(TESTDATA.read_text())["items"]))
    (state / "controller.token").write_text(TOKEN + "\n")
    return state


def protected_config(state: Path) -> ControllerConfig:
    return ControllerConfig(source="sandbox", state_dir=str(state), grpc_port=0, web_port=0,
                            token_file=str(state / "controller.token"), sandbox_poll_s=0.1,
                            identity_debounce_s=0.05)


async def nodemesh(root: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """The real CLI in a subprocess, with a clean environment pointing at our sandbox root."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NODEMESH_")}
    clean |= {"NODEMESH_SANDBOX_ROOT": str(root), "NODEMESH_SANDBOX": SANDBOX, **env}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "nodemesh.cli.main", *args, env=clean,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def assert_one_error_line(result: tuple[int, str, str], fragment: str) -> None:
    code, out, err = result
    assert code == 1, result
    assert out == "" and err.count("\n") == 1 and err.startswith("Error: "), result
    assert fragment in err and "Traceback" not in err


async def stopped(running: RunningController | None) -> None:
    if running is not None:
        await running.stop()


def test_controlplane_auth_cli_refused_then_finds_the_sandbox_token(tmp_path: Path) -> None:
    state = sandbox_dir(tmp_path)

    async def main() -> None:
        running = await start(protected_config(state))
        try:
            addr = f"127.0.0.1:{running.grpc_port}"
            # An address given by hand and no token: refused, one line saying what to do.
            assert_one_error_line(await nodemesh(tmp_path, "stat", "deploy", "-n", "emojivoto", "--controller", addr),
                                  f"Error: the controller refused our credentials: {MISSING_TOKEN}\n")
            # The sandbox's address file with a wrong explicit token: the user's token wins, and fails.
            write_controller_address(state, "127.0.0.1", running.grpc_port)
            assert_one_error_line(await nodemesh(tmp_path, "stat", "deploy", "-n", "emojivoto",
                                                 NODEMESH_TOKEN="not-the-token"),
                                  "invalid token (check NODEMESH_TOKEN/--token-file)")
            # No token given: found beside controller.addr.
            code, out, err = await nodemesh(tmp_path, "stat", "deploy", "-n", "emojivoto")
            assert code == 0, err
            assert out.splitlines()[0].split()[:2] == ["NAME", "MESHED"] and "emoji" in out
            # An explicit --token-file with an explicit --controller works too.
            code, out, err = await nodemesh(tmp_path, "stat", "deploy", "-n", "emojivoto", "--controller", addr,
                                            "--token-file", str(state / "controller.token"))
            assert code == 0 and "emoji" in out, err
            # The tap stream answers a missing token the same way.
            os.unlink(state / "controller.addr")
            assert_one_error_line(await nodemesh(tmp_path, "tap", "deploy/web", "-n", "emojivoto",
                                                 "--controller", addr), MISSING_TOKEN)
        finally:
            await running.stop()

    run(main)


def test_controlplane_auth_agent_link_needs_the_right_token(tmp_path: Path) -> None:
    state = sandbox_dir(tmp_path)
    agent_token = tmp_path / "agent.token"
    agent_token.write_text("wrong\n")

    async def main() -> None:
        running = await start(protected_config(state))
        node = NodeTelemetry(AgentConfig(node="node-a", node_ip="127.0.0.1", pod_cidrs=("10.244.1.0/24",),
                                         controller=f"127.0.0.1:{running.grpc_port}", token_file=str(agent_token),
                                         workers=1))
        link = ControllerLink(node.config, node, backoff_base_s=0.05, backoff_max_s=0.2)
        link.start()
        try:
            await asyncio.sleep(1.0)  # several attempts, all refused before the servicer
            assert running.controller.sessions == {}
            assert not any(n.agent_connected for n in running.controller.check().nodes)
            web = f"http://127.0.0.1:{running.web_port}"
            async with aiohttp.ClientSession() as http, http.get(f"{web}/metrics") as resp:
                text = await resp.text()
            line = next(x for x in text.splitlines()
                        if x.startswith('nodemesh_controller_auth_refused_total{code="UNAUTHENTICATED"}'))
            assert float(line.split()[-1]) >= 2
            # Rotate the file the agent reads: the next connect presents the right token.
            agent_token.write_text(TOKEN + "\n")
            deadline = time.monotonic() + 10
            while not (link.connected and node.agent_id in running.controller.sessions):
                assert time.monotonic() < deadline, "agent did not connect with the right token"
                await asyncio.sleep(0.05)
            # ... and it is a real session: identity pushed from the sandbox's objects.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
                check = await pb_grpc.ControllerStub(ch).Check(
                    pb.CheckRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
            assert any(n.node == "node-a" and n.agent_connected for n in check.nodes)
        finally:
            await link.stop()
            await running.stop()

    run(main)


def test_controlplane_auth_web_probes_and_metrics_stay_open(tmp_path: Path) -> None:
    state = sandbox_dir(tmp_path)

    async def main() -> None:
        running = await start(protected_config(state))
        try:
            async with aiohttp.ClientSession() as http:
                for path in ("/live", "/metrics"):
                    async with http.get(f"http://127.0.0.1:{running.web_port}{path}") as resp:
                        assert resp.status == 200, path
                deadline = time.monotonic() + 10
                while True:  # ready once the sandbox source synced
                    async with http.get(f"http://127.0.0.1:{running.web_port}/ready") as resp:
                        if resp.status == 200:
                            break
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        finally:
            await running.stop()

    run(main)


def test_controlplane_auth_open_on_loopback_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = sandbox_dir(tmp_path)

    async def main() -> None:
        config = ControllerConfig(source="sandbox", state_dir=str(state), grpc_port=0, web_port=0)
        with caplog.at_level(logging.WARNING, logger="nodemesh.controlplane"):
            running = await start(config)
        try:
            assert any("event=auth_disabled" in r.getMessage() and "OPEN" in r.getMessage()
                       for r in caplog.records)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as ch:
                await pb_grpc.ControllerStub(ch).Check(pb.CheckRequest(), timeout=5)  # dev mode: no token needed
        finally:
            await running.stop()

    run(main)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--listen", "0.0.0.0"], "refusing to serve the gRPC API without authentication on 0.0.0.0"),
    (["--token-file", "/nonexistent/controller.token"], "cannot read --token-file /nonexistent/controller.token"),
    (["--token-file", "x", "--token-review"], "--token-file and --token-review are exclusive"),
    (["--token-review"], "--token-review needs --source kubernetes"),
])
def test_controlplane_auth_startup_refusals_are_one_line(tmp_path: Path, extra: list[str], fragment: str) -> None:
    state = sandbox_dir(tmp_path)

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodemesh.controlplane", "--source", "sandbox", "--state-dir", str(state),
            "--grpc-port", "0", "--web-port", "0", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = err.decode()
        assert proc.returncode != 0
        assert fragment in text and "Traceback" not in text, text
        # One message line (argparse's usage block before a flag error is the only other text).
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
        assert len(lines) == 1 and fragment in lines[0], text

    run(main)
