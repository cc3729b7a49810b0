"""Authentication of the gRPC API: the token file authenticator, and the interceptor on a real
grpc.aio server over loopback (unary calls and both streams refused without the right token,
the servicer never reached)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.auth import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    AccessPolicy,
    AuthError,
    AuthInterceptor,
    Principal,
    StaticTokenAuthenticator,
    bearer_token,
    method_name,
)
from prometheus_client import CollectorRegistry

TOKEN = "s3cret-token-for-tests"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "controller.token"
    path.write_text(TOKEN + "\n")
    return path


# ---------------------------------------------------------------------------- pieces


def test_controlplane_auth_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("user-agent", "x"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic dXNlcjpwYXNz")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([]) is None and bearer_token(None) is None
    assert method_name("/nodemesh.v1.Controller/StatSummary") == "StatSummary"


def test_controlplane_auth_static_token_right_wrong(token_file: Path) -> None:
    auth = StaticTokenAuthenticator(str(token_file))
    assert run(auth.authenticate(TOKEN, "StatSummary")) == StaticTokenAuthenticator.PRINCIPAL
    assert run(auth.authenticate(TOKEN, "Connect")) == StaticTokenAuthenticator.PRINCIPAL
    for wrong in ("", TOKEN[:-1], TOKEN + "x", "s3cret"):
        with pytest.raises(AuthError) as err:
            run(auth.authenticate(wrong, "StatSummary"))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.message == INVALID_TOKEN


def test_controlplane_auth_static_token_file_rotation(token_file: Path) -> None:
    auth = StaticTokenAuthenticator(str(token_file))
    # Rotated the way secrets usually are: write beside, rename over (a new inode).
    tmp = token_file.with_name("new")
    tmp.write_text("rotated\n")
    os.replace(tmp, token_file)
    assert run(auth.authenticate("rotated", "Check")) == StaticTokenAuthenticator.PRINCIPAL
    with pytest.raises(AuthError):
        run(auth.authenticate(TOKEN, "Check"))
    # Rewritten in place with the same length: the mtime still tells.
    token_file.write_text("rotatee\n")
    st = token_file.stat()
    os.utime(token_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert run(auth.authenticate("rotatee", "Check")) == StaticTokenAuthenticator.PRINCIPAL
    # Briefly gone or empty mid-rotation: the last good token keeps working, nobody is locked out.
    token_file.unlink()
    assert run(auth.authenticate("rotatee", "Check")) == StaticTokenAuthenticator.PRINCIPAL
    token_file.write_text("\n")
    assert run(auth.authenticate("rotatee", "Check")) == StaticTokenAuthenticator.PRINCIPAL


def test_controlplane_auth_static_token_startup_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read --token-file .*missing: No such file"):
        StaticTokenAuthenticator(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        StaticTokenAuthenticator(str(tmp_path / "empty"))


def test_controlplane_auth_policy_users_and_groups() -> None:
    policy = AccessPolicy.for_namespace("mesh", readers=["group:oncall", "alice"])
    agent = Principal("system:serviceaccount:mesh:nodemesh-agent", ("system:serviceaccounts",))
    assert policy.allows(agent, "Connect") and not policy.allows(agent, "StatSummary")
    assert policy.allows(Principal("bob", ("oncall",)), "Tap")
    assert policy.allows(Principal("alice"), "Edges")
    assert not policy.allows(Principal("alice"), "Connect")
    assert not policy.allows(Principal("system:serviceaccount:other:nodemesh-agent"), "Connect")
    default = AccessPolicy.for_namespace("nodemesh")
    assert default.readers == {"system:serviceaccount:nodemesh:nodemesh-cli"}


# ---------------------------------------------------------------------------- the interceptor


class RecordingServicer(pb_grpc.ControllerServicer):
    """Answers every method and records which ones ran: a refused call must never get here."""

    def __init__(self) -> None:
        self.called: list[str] = []

    async def StatSummary(self, request: pb.StatRequest, context: grpc.aio.ServicerContext) -> pb.StatResponse:
        self.called.append("StatSummary")
        return pb.StatResponse(error="ok")

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        self.called.append("Check")
        return pb.CheckResponse()

    async def Connect(self, request_iterator: AsyncIterator[pb.AgentMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ControllerMessage]:
        self.called.append("Connect")
        async for msg in request_iterator:
            if msg.WhichOneof("msg") == "hello":
                yield pb.ControllerMessage(identity=pb.IdentitySnapshot(resource_version="7"))
                return

    async def Tap(self, request: pb.TapRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TapEvent]:
        self.called.append("Tap")
        yield pb.TapEvent(tap_id="t1")


async def serve(authenticator: Any) -> tuple[grpc.aio.Server, str, RecordingServicer, AuthInterceptor]:
    servicer = RecordingServicer()
    interceptor = AuthInterceptor(authenticator, CollectorRegistry())
    server = grpc.aio.server(interceptors=[interceptor])
    pb_grpc.add_ControllerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", servicer, interceptor


def md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


async def connect_once(stub: pb_grpc.ControllerStub, token: str | None) -> list[pb.ControllerMessage]:
    async def hello() -> AsyncIterator[pb.AgentMessage]:
        yield pb.AgentMessage(hello=pb.AgentHello(agent_id="a1", node="node-a"))
        await asyncio.sleep(5)  # keep the request side open: the server ends the stream

    return [m async for m in stub.Connect(hello(), metadata=md(token), timeout=10)]


async def expect_refused(coro: Awaitable[Any], code: grpc.StatusCode, details: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    assert err.value.code() == code, err.value
    assert err.value.details() == details


def test_controlplane_auth_interceptor_refuses_without_or_with_a_bad_token(token_file: Path) -> None:
    async def main() -> None:
        server, addr, servicer, interceptor = await serve(StaticTokenAuthenticator(str(token_file)))
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = pb_grpc.ControllerStub(ch)
                unauth = grpc.StatusCode.UNAUTHENTICATED
                # Unary, no token and a wrong one.
                await expect_refused(stub.StatSummary(pb.StatRequest(), timeout=5), unauth, MISSING_TOKEN)
                await expect_refused(stub.StatSummary(pb.StatRequest(), metadata=md("nope"), timeout=5),
                                     unauth, INVALID_TOKEN)
                await expect_refused(stub.Check(pb.CheckRequest(), metadata=(("authorization", TOKEN),),
                                                timeout=5), unauth, MISSING_TOKEN)  # no "Bearer" scheme
                # The agents' bidirectional stream and the tap stream.
                await expect_refused(connect_once(stub, None), unauth, MISSING_TOKEN)
                await expect_refused(connect_once(stub, "nope"), unauth, INVALID_TOKEN)

                async def tap(token: str | None) -> list[pb.TapEvent]:
                    return [e async for e in stub.Tap(pb.TapRequest(), metadata=md(token), timeout=5)]

                await expect_refused(tap(None), unauth, MISSING_TOKEN)
                assert servicer.called == []  # nothing reached the servicer
                refused = interceptor.refused.labels("UNAUTHENTICATED")._value.get()
                assert refused == 6

                # The right token: every shape of call goes through.
                resp = await stub.StatSummary(pb.StatRequest(), metadata=md(TOKEN), timeout=5)
                assert resp.error == "ok"
                await stub.Check(pb.CheckRequest(), metadata=md(TOKEN), timeout=5)
                msgs = await connect_once(stub, TOKEN)
                assert [m.identity.resource_version for m in msgs] == ["7"]
                assert [e.tap_id for e in await tap(TOKEN)] == ["t1"]
                assert servicer.called == ["StatSummary", "Check", "Connect", "Tap"]
        finally:
            await server.stop(None)

    run(main())


def test_controlplane_auth_interceptor_passes_on_the_authenticators_code(token_file: Path) -> None:
    class Denying:
        async def authenticate(self, token: str, method: str) -> Principal:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"alice may not call {method}")

    async def main() -> None:
        server, addr, servicer, _ = await serve(Denying())
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = pb_grpc.ControllerStub(ch)
                await expect_refused(stub.StatSummary(pb.StatRequest(), metadata=md("t"), timeout=5),
                                     grpc.StatusCode.PERMISSION_DENIED, "alice may not call StatSummary")
                await expect_refused(connect_once(stub, "t"), grpc.StatusCode.PERMISSION_DENIED,
                                     "alice may not call Connect")
                assert servicer.called == []
        finally:
            await server.stop(None)

    run(main())
