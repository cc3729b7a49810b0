"""The install settings that reach the controller as flags: --captured-namespaces and --tap-max-taps."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import grpc
import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller, TapLimitError
from nodemesh.controlplane.main import parse_args
from nodemesh.controlplane.registry import WATCHED_KINDS, WorkloadRegistry
from nodemesh.controlplane.server import start_grpc_server

TESTDATA = Path(__file__).parent / "testdata" / "cluster.json"


def controller(**config: object) -> Controller:
    objects = json.loads(TESTDATA.read_text())["items"]
    reg = WorkloadRegistry()
    for kind in WATCHED_KINDS:
        reg.replace(kind, [copy.deepcopy(o) for o in objects if o["kind"] == kind])
    return Controller(ControllerConfig(**config), registry=reg)  # type: ignore[arg-type]


def test_controlplane_flags_parse() -> None:
    base = ["--state-dir", "/nonexistent"]
    c = parse_args([*base, "--captured-namespaces", "emojivoto,shop", "--tap-max-taps", "3"])
    assert c.captured_namespaces == ("emojivoto", "shop") and c.tap_max_taps == 3
    assert parse_args(base).captured_namespaces == ()


def test_controlplane_captured_namespaces_limit_capture() -> None:
    every = controller().captured_namespaces()
    assert "emojivoto" in every and len(every) > 1
    only = controller(captured_namespaces=("emojivoto", "kube-system"))
    # Only the listed ones, and an excluded namespace stays excluded even when listed.
    assert only.captured_namespaces() == ["emojivoto"]
    assert list(only.identity_message().identity.captured_namespaces) == ["emojivoto"]
    assert only.mesh_view().captured_namespaces == {"emojivoto"}


def test_controlplane_tap_max_taps_refuses_more_and_frees_on_close() -> None:
    flt = pb.TapFilter(target=pb.Resource(namespace="emojivoto", type="deployment", name="web"))

    async def main() -> None:
        c = controller(tap_max_taps=1)
        first = c.tap(flt)
        pending = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0.05)  # the first tap is open, waiting for events
        with pytest.raises(TapLimitError, match="--tap-max-taps 1"):
            c.check_tap_capacity()
        # Over the real API: RESOURCE_EXHAUSTED with the reason, nothing opened.
        server, port = await start_grpc_server(c, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = pb_grpc.ControllerStub(ch).Tap(pb.TapRequest(filter=flt))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call.read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "taps are open" in (refused.value.details() or "")
        finally:
            await server.stop(None)
        pending.cancel()  # the caller goes away: the generator's `finally` closes the tap
        with pytest.raises(asyncio.CancelledError):
            await pending
        await first.aclose()
        c.check_tap_capacity()  # closing the first tap frees its place

    asyncio.run(main())
