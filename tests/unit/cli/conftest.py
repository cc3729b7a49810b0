"""Fixtures of the CLI tests; the helpers live in cli_testkit.py."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from cli_testkit import FakeController, Served
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc


@pytest.fixture(autouse=True)
def no_kubeconfig(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own kube context never reaches these tests (the CLI prefers it to a sandbox)."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("KUBECONFIG", raising=False)


@pytest.fixture
def controller() -> Iterator[Served]:
    fake = FakeController()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ControllerServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Served(fake, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None).wait(5)
