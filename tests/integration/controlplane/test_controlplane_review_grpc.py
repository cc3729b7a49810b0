"""Review regressions over real grpc.aio: a big node's cumulative report still gets through."""

from __future__ import annotations

import time
from pathlib import Path

from controller_feed import FakeAgent
from controller_link import config_for, labels, reports_from, run
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.main import start
from waiting import eventually


def test_a_report_larger_than_grpc_default_4mb_is_accepted(state_dir: Path) -> None:
    # Agents report every series they ever saw (cumulative, one message): a node with ~1500
    # peer pairs over a day of rollouts passes gRPC's default 4 MiB receive limit, and the
    # controller then refused every report of that node (the stream broke, reconnected, broke).
    series = [pb.Series(name="response_total", labels={**labels(), "dst_pod": f"emoji-{i:06d}",
                                                       "classification": "success", "status_code": "200"},
                        value=1.0) for i in range(20_000)]
    msg = pb.AgentMessage(metrics=pb.MetricsReport(agent_id="agent-big", seq=1, time_ms=int(time.time() * 1000),
                                                   series=series))
    assert msg.ByteSize() > 5 * 1024 * 1024

    async def main() -> None:
        running = await start(config_for(state_dir))
        agent = None
        try:
            agent = FakeAgent(running.grpc_port, "agent-big", "node-1", int(time.time() * 1000))
            agent.send(msg)
            await eventually(lambda: reports_from(running, "agent-big") == 1, timeout=20)
        finally:
            if agent is not None:
                await agent.close()
            await running.stop()
    run(main)
