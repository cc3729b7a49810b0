"""What the controller's loopback tests share: a real controller (`config_for`: the sandbox source
over a recorded cluster, see the `state_dir` fixture in conftest.py), the labels of the fake
agents' reports (the agents: tests/support/controller_feed.py), and waiting helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller_feed import PODS, peer
from nodemesh.api.clusterstate import ClusterObjects, write_objects
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.main import RunningController

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"
EMOJI_POD = PODS["emoji"]


def labels(direction: str = "inbound") -> dict[str, str]:
    """web -> emoji, as dialled by its short name."""
    return {**peer(direction, "web", "emoji", "emoji-svc"), "authority": "emoji-svc:8080"}


def report(agent_id: str, seq: int, success: float, failure: float = 0) -> pb.AgentMessage:
    base = labels()
    return pb.AgentMessage(metrics=pb.MetricsReport(agent_id=agent_id, seq=seq, time_ms=int(time.time() * 1000),
                                                    series=[
        pb.Series(name="response_total", labels={**base, "classification": "success"}, value=success),
        pb.Series(name="response_total", labels={**base, "classification": "failure"}, value=failure),
    ]))


def reports_from(running: RunningController | None, agent_id: str) -> int:
    session = running.controller.sessions.get(agent_id) if running else None
    return session.reports if session else -1


def write_cluster(state_dir: Path, items: list[dict[str, Any]], rv: int) -> None:
    write_objects(state_dir, ClusterObjects(rv, items))


def config_for(state_dir: Path, grpc_port: int = 0) -> ControllerConfig:
    return ControllerConfig(source="sandbox", state_dir=str(state_dir), grpc_port=grpc_port, web_port=0,
                            identity_debounce_s=0.05, sandbox_poll_s=0.1)


def run(coro_fn: Callable[[], Any], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), timeout))
