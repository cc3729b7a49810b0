"""A controller that has not listed the cluster yet tells agents nothing about identity.

A restarted controller used to answer every agent that reconnected with the identity it had — none
(the Kubernetes source's first list takes seconds on a big cluster) — and each agent replaced what
it held with that, so every pod on every node was counted `unknown` until the list arrived. Now the
agent keeps what it holds until the source has synced, then gets the whole identity at once.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

from controller_testkit import Stream, settle
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry
from nodemesh.controlplane.sources import ClusterSource

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"


class SlowListSource(ClusterSource):
    """The ClusterSource interface, with the first list held until `list_now()`."""

    def __init__(self) -> None:
        super().__init__()
        self.registry: WorkloadRegistry | None = None

    async def start(self, registry: WorkloadRegistry) -> None:
        self.registry = registry

    async def stop(self) -> None:
        pass

    def list_now(self) -> None:
        assert self.registry is not None
        items = json.loads(TESTDATA.read_text())["items"]
        for kind in WATCHED_KINDS:
            self.registry.replace(kind, [copy.deepcopy(o) for o in items if o["kind"] == kind])
        self.synced.set()


def test_identity_waits_for_the_first_list_then_reaches_agents_already_connected() -> None:
    async def main() -> None:
        source = SlowListSource()
        c = Controller(ControllerConfig(identity_debounce_s=0.01), source)
        await c.start()
        try:
            early = Stream(c)
            await settle()
            assert [m.WhichOneof("msg") for m in early.received] == ["report_ack"]  # no (empty) identity
            source.list_now()
            for _ in range(100):
                if any(m.HasField("identity") for m in early.received):
                    break
                await asyncio.sleep(0.01)
            identities = [m.identity for m in early.received if m.HasField("identity")]
            assert len(identities) == 1, early.received
            assert "web-5f7c9d8b6-x2vqm" in {p.name for p in identities[0].pods}
            late = Stream(c, agent_id="node-2/8/1")  # after the sync: the identity at once
            await settle()
            assert [m.WhichOneof("msg") for m in late.received] == ["report_ack", "identity"]
            await early.close()
            await late.close()
        finally:
            await c.stop()

    asyncio.run(main())
