"""Without a controller, NodeTelemetry reads the sandbox's recorded objects (reloading on change),
serves /capture from them over real HTTP, and pushes the identity to its workers."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

from clusterobjects import cluster, namespace, pod
from nodemesh.agent.config import AgentConfig
from nodemesh.agent.node import NodeTelemetry
from nodemesh.agent.telemetry import WorkerTelemetry
from nodemesh.agent.workerlink import make_channel
from nodemesh.api.clusterstate import write_objects


async def get(url: str) -> tuple[int, bytes]:
    def fetch() -> tuple[int, bytes]:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()

    return await asyncio.get_running_loop().run_in_executor(None, fetch)


async def wait_for(cond, timeout: float = 10.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_identity_file_capture_endpoint_and_reload(tmp_path: Path) -> None:
    async def body() -> None:
        objs = cluster()
        write_objects(tmp_path, objs)
        cfg = AgentConfig(node="node-1", admin_host="127.0.0.1", admin_port=0, identity_file=str(tmp_path),
                          report_interval_s=0.1, workers=1)
        node = NodeTelemetry(cfg)
        parent_end, child_end = make_channel()
        worker = WorkerTelemetry(cfg, child_end)
        try:
            await node.start()
            node.attach_worker(0, parent_end)
            await worker.start()
            await wait_for(lambda: asyncio.sleep(0, result=worker.index.generation > 0), timeout=5,
                           what="first identity at the worker")
            assert worker.index.peer_labels("10.244.1.5")[1:3] == ("deployment", "web")
            assert worker.index.service_endpoints("10.96.0.10", 80) == [("10.244.1.5", 8080)]
            base = f"http://127.0.0.1:{node.admin.port}"
            status, raw = await get(base + "/capture")
            body = json.loads(raw)
            assert status == 200 and {k: body[k] for k in ("excluded_ips", "synced")} == {
                "excluded_ips": ["10.244.1.20", "10.244.1.21"], "synced": True}
            assert body["capture_mode"] == "iptables", body  # no eBPF capture pinned here (agent/capture.py)

            # The sandbox records a change: a new namespace opted out, with a pod on this node.
            objs.resource_version += 1
            objs.items += [namespace("batch", disabled=True), pod("cron-1", "batch", "10.244.1.30", "node-1")]
            write_objects(tmp_path, objs)
            os.utime(tmp_path / "objects.json", ns=(2, 2))

            async def reloaded() -> bool:
                return json.loads((await get(base + "/capture"))[1])["excluded_ips"] == [
                    "10.244.1.20", "10.244.1.21", "10.244.1.30"]

            await wait_for(reloaded, what="/capture after reload")
            await wait_for(lambda: asyncio.sleep(0, result=worker.index.owner("10.244.1.30") is not None),
                           what="reloaded identity at the worker")
            # close_admin (drain start): the admin port stops answering.
            node.close_admin()
            await asyncio.sleep(0.05)
            try:
                await get(base + "/live")
                raise AssertionError("admin still answering after close_admin")
            except OSError:
                pass
        finally:
            await worker.stop()
            await node.stop()

    asyncio.run(asyncio.wait_for(body(), 60))
