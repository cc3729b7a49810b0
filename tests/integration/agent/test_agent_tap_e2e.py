"""Must-show 2 on the real traffic path: the agent (supervisor + workers) between network namespaces,
a controller (a minimal Controller.Connect in the agent's namespace) opening taps on it.

With a tap open for one workload, every request at low rate produces its three events with the
right status; above max_rps the events are capped while every request still succeeds, is counted
in /metrics, and is not slowed by the tap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_traffic_net import (
    CLIENT_IP,
    SERVER_IP,
    start_agent,
    start_nginx,
    topology,
    wait_port,
)
from nodemesh.api.gen import nodemesh_pb2 as pb

CTL_PORT = 18085

FAKE_CONTROLLER = r'''
import asyncio, json, os, sys
import grpc
from google.protobuf.json_format import MessageToDict
from nodemesh.api.gen import nodemesh_pb2 as pb, nodemesh_pb2_grpc as pbg

port, ident_path, cmd_dir, out_path = sys.argv[1:]

class Ctl(pbg.ControllerServicer):
    async def Connect(self, it, ctx):
        out = open(out_path, "a")
        async def read():
            async for m in it:
                out.write(json.dumps(MessageToDict(m)) + "\n"); out.flush()
        reader = asyncio.get_running_loop().create_task(read())
        yield pb.ControllerMessage(identity=pb.IdentitySnapshot.FromString(open(ident_path, "rb").read()))
        sent = set()
        while not reader.done():
            for name in sorted(os.listdir(cmd_dir)):
                if name not in sent and not name.startswith("."):
                    sent.add(name)
                    yield pb.ControllerMessage.FromString(open(os.path.join(cmd_dir, name), "rb").read())
            await asyncio.sleep(0.02)

async def main():
    server = grpc.aio.server()
    pbg.add_ControllerServicer_to_server(Ctl(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()

asyncio.run(main())
'''

CLIENT = r'''
import http.client, sys, time
n, interval = int(sys.argv[1]), float(sys.argv[2])
c = http.client.HTTPConnection("{server}", 80, timeout=10)
ok = 0
t0 = time.monotonic()
for i in range(n):
    c.request("GET", "/index.html?i=%d" % i)
    r = c.getresponse(); r.read()
    ok += r.status == 200
    if interval:
        time.sleep(interval)
print(ok, time.monotonic() - t0)
'''


def identity() -> pb.IdentitySnapshot:
    snap = pb.IdentitySnapshot(resource_version="1")
    for ip, name, node in ((CLIENT_IP, "client", "n1"), (SERVER_IP, "nginx", "n2")):
        snap.pods.append(pb.Pod(ip=ip, namespace="demo", name=f"{name}-0", node=node, ready=True,
                                owner=pb.Resource(namespace="demo", type="deployment", name=name)))
    return snap


def command(cmd_dir: Path, seq: int, msg: pb.ControllerMessage) -> None:
    tmp = cmd_dir / f".{seq}"
    tmp.write_bytes(msg.SerializeToString())
    os.replace(tmp, cmd_dir / f"{seq:03d}")  # atomic: the controller never reads half a command


def received(out: Path) -> list[dict]:  # type: ignore[type-arg]
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def tap_events(out: Path, tap_id: str) -> list[dict]:  # type: ignore[type-arg]
    return [m["tapEvent"] for m in received(out) if "tapEvent" in m and m["tapEvent"]["tapId"] == tap_id]


def wait(pred, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


@pytest.mark.root
def test_tap_on_the_real_agent_low_rate_complete_high_rate_capped(tmp_path: Path) -> None:
    with topology() as t:
        start_nginx(t, tmp_path)
        ident, cmd_dir, out = tmp_path / "identity.pb", tmp_path / "cmds", tmp_path / "received.jsonl"
        ident.write_bytes(identity().SerializeToString())
        cmd_dir.mkdir()
        ctl_py, client_py = tmp_path / "ctl.py", tmp_path / "client.py"
        ctl_py.write_text(FAKE_CONTROLLER)
        client_py.write_text(CLIENT.replace("{server}", SERVER_IP))
        with open(tmp_path / "ctl.log", "wb") as ctl_log:  # the child keeps its own copy of the fd
            t.exec(t.agent, sys.executable, str(ctl_py), str(CTL_PORT), str(ident), str(cmd_dir), str(out),
                   stdout=subprocess.DEVNULL, stderr=ctl_log)
        wait_port(t, t.agent, "127.0.0.1", CTL_PORT)
        start_agent(t, tmp_path, workers=2, extra=("--controller", f"127.0.0.1:{CTL_PORT}"))
        assert wait(lambda: any("hello" in m for m in received(out))), "no hello from the agent"

        def client(n: int, interval: float) -> tuple[int, float]:
            res = t.run(t.client, sys.executable, str(client_py), str(n), str(interval), timeout=120, check=False)
            assert res.returncode == 0, res.stderr
            ok, secs = res.stdout.split()
            return int(ok), float(secs)

        # Baseline speed, no tap open.
        ok, base_s = client(1000, 0)
        assert ok == 1000

        # The agent is the client's node's: it shows the client's own (outbound) requests; nginx's
        # sightings belong to nginx's node (agent/tap.py Tap.sightings).
        target = pb.Resource(namespace="demo", type="deployment", name="client")
        command(cmd_dir, 1, pb.ControllerMessage(tap_open=pb.TapOpen(
            tap_id="low", filter=pb.TapFilter(target=target, path_prefix="/index.html", max_rps=100))))
        time.sleep(0.5)  # controller -> agent -> workers
        ok, _ = client(10, 0.05)
        assert ok == 10
        assert wait(lambda: len(tap_events(out, "low")) >= 30)
        time.sleep(0.3)
        evs = tap_events(out, "low")
        assert len(evs) == 30, len(evs)
        by_id: dict[str, list[dict]] = {}  # type: ignore[type-arg]
        for e in evs:
            by_id.setdefault(e["requestId"], []).append(e)
        assert len(by_id) == 10
        for rid, group in by_id.items():
            kinds = [next(k for k in ("requestInit", "responseInit", "responseEnd") if k in e) for e in group]
            assert kinds == ["requestInit", "responseInit", "responseEnd"], (rid, kinds)
            req, rsp, end = group
            assert req["direction"] == "outbound" and req["source"]["ip"] == CLIENT_IP
            assert req["destination"]["owner"]["name"] == "nginx"
            assert req["requestInit"]["method"] == "GET" and req["requestInit"]["path"].startswith("/index.html")
            assert rsp["responseInit"]["httpStatus"] == 200
            assert int(end["responseEnd"]["responseBytes"]) == len("hello from nginx\n")
        command(cmd_dir, 2, pb.ControllerMessage(tap_close=pb.TapClose(tap_id="low")))

        # Over the cap: 1000 requests as fast as the client goes, tap capped at 5/s.
        command(cmd_dir, 3, pb.ControllerMessage(tap_open=pb.TapOpen(
            tap_id="high", filter=pb.TapFilter(target=target, max_rps=5))))
        time.sleep(0.5)
        ok, tapped_s = client(1000, 0)
        assert ok == 1000
        time.sleep(0.5)
        admitted = len(tap_events(out, "high")) // 3
        assert 5 <= admitted <= 5 + 5 * tapped_s + 2, (admitted, tapped_s)
        assert len(tap_events(out, "low")) == 30  # closed: nothing more
        print(f"1000 keep-alive requests: no tap {base_s:.2f}s, tap over cap {tapped_s:.2f}s")
        assert tapped_s < base_s * 2 + 0.5, (base_s, tapped_s)

        # Every request is counted once, outbound, client -> nginx, in /metrics and in the reports.
        def metric_total() -> float:
            text = t.run(t.agent, "curl", "-s", "http://127.0.0.1:4191/metrics").stdout
            total = 0.0
            for line in text.splitlines():
                if line.startswith("request_total{") and 'src_name="client"' in line and 'dst_name="nginx"' in line:
                    assert 'direction="outbound"' in line
                    total += float(line.rsplit(" ", 1)[1])
            return total

        assert wait(lambda: metric_total() == 2010), metric_total()

        def reported() -> float:
            reports = [m["metrics"] for m in received(out) if "metrics" in m]
            return sum(s.get("value", 0) for s in reports[-1]["series"] if s["name"] == "request_total")

        assert wait(lambda: reported() == 2010), reported()
