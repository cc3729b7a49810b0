"""TokenReview through the REAL `kubernetes` client against a small API server on loopback.

The server answers `POST /apis/authentication.k8s.io/v1/tokenreviews` with TokenReview objects
shaped like the ones a real API server returns (projected ServiceAccount tokens: username,
groups, the pod/node `extra`, the granted audiences; refusals with `error` and no
`authenticated`). Asserted: who is allowed which method, audience checks, the positive cache and
its TTL, one review for concurrent calls with the same token, and the API server's failures.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import grpc
import pytest
from kubernetes import client
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.controlplane.auth import (
    INVALID_TOKEN,
    AccessPolicy,
    AuthError,
    AuthInterceptor,
    Principal,
    TokenReviewAuthenticator,
)
from prometheus_client import CollectorRegistry

AUDIENCE = "nodemesh-controller"
AGENT_SA = "system:serviceaccount:nodemesh:nodemesh-agent"
CLI_SA = "system:serviceaccount:nodemesh:nodemesh-cli"
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def sa_user(namespace: str, name: str, pod: str = "") -> dict[str, Any]:
    """user info as the API server fills it for a projected ServiceAccount token."""
    extra = {"authentication.kubernetes.io/credential-id": ["JTI=5d2c1a4e-0f3b-4e55-9a3e-1f2b3c4d5e6f"]}
    if pod:
        extra |= {"authentication.kubernetes.io/pod-name": [pod],
                  "authentication.kubernetes.io/pod-uid": ["0b7c9a52-43f1-4d55-8c8b-6c0a3e2f9d11"],
                  "authentication.kubernetes.io/node-name": ["node-a"]}
    return {"username": f"system:serviceaccount:{namespace}:{name}",
            "uid": "2f1e8a0c-5b6d-4c3e-9f7a-8b9c0d1e2f3a",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "extra": extra}


# token -> status the API server answers (the review's status; spec is echoed back)
STATUSES: dict[str, dict[str, Any]] = {
    "agent-token": {"authenticated": True, "user": sa_user("nodemesh", "nodemesh-agent", "nodemesh-agent-x7k2p"),
                    "audiences": [AUDIENCE]},
    "cli-token": {"authenticated": True, "user": sa_user("nodemesh", "nodemesh-cli"), "audiences": [AUDIENCE]},
    "other-sa-token": {"authenticated": True, "user": sa_user("default", "default"), "audiences": [AUDIENCE]},
    # A real API server refuses a token for another audience itself ...
    "apiserver-audience-token": {"user": {}, "error": "[invalid bearer token, token audiences "
                                 "[\"https://kubernetes.default.svc.cluster.local\"] is invalid for the "
                                 "target audiences [\"nodemesh-controller\"]]"},
    # ... but an authenticator that is not audience-aware (a webhook) says yes with no audiences.
    "audience-unaware-token": {"authenticated": True, "user": sa_user("nodemesh", "nodemesh-agent")},
    "wrong-audience-token": {"authenticated": True, "user": sa_user("nodemesh", "nodemesh-agent"),
                             "audiences": ["something-else"]},
    "expired-token": {"user": {}, "error": "[invalid bearer token, service account token has expired]"},
}


class FakeApiServer(BaseHTTPRequestHandler):
    reviews: ClassVar[list[dict[str, Any]]] = []
    fail_with: ClassVar[int] = 0      # answer every review with this HTTP status (e.g. 403)
    delay_s: ClassVar[float] = 0.0

    def log_message(self, fmt: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        if self.path.split("?")[0] != REVIEW_PATH:
            return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                    "reason": "NotFound", "message": "the server could not find the requested resource"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).reviews.append(body)
        time.sleep(self.delay_s)
        if self.fail_with:
            return self._send(self.fail_with, {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden",
                "message": 'tokenreviews.authentication.k8s.io is forbidden: User '
                           '"system:serviceaccount:nodemesh:nodemesh-controller" cannot create resource '
                           '"tokenreviews" in API group "authentication.k8s.io" at the cluster scope',
                "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"}, "code": self.fail_with})
        status = STATUSES.get(body["spec"]["token"], {"user": {}, "error": "[invalid bearer token, token lookup failed]"})
        self._send(201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                         "metadata": {"creationTimestamp": None}, "spec": body["spec"], "status": status})

    def _send(self, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def api_client() -> Iterator[client.ApiClient]:
    FakeApiServer.reviews = []
    FakeApiServer.fail_with = 0
    FakeApiServer.delay_s = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{server.server_address[1]}"
    api = client.ApiClient(cfg)
    try:
        yield api
    finally:
        api.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def refused(auth: TokenReviewAuthenticator, token: str, method: str) -> AuthError:
    with pytest.raises(AuthError) as err:
        run(auth.authenticate(token, method))
    return err.value


def test_controlplane_auth_tokenreview_policy(api_client: client.ApiClient) -> None:
    auth = TokenReviewAuthenticator(api_client, [AUDIENCE], AccessPolicy.for_namespace("nodemesh"))
    agent = run(auth.authenticate("agent-token", "Connect"))
    assert agent.username == AGENT_SA and "system:serviceaccounts:nodemesh" in agent.groups
    assert run(auth.authenticate("cli-token", "StatSummary")).username == CLI_SA
    for method in ("Edges", "Check", "Tap"):
        run(auth.authenticate("cli-token", method))
    # Each side only what it needs: a CLI token cannot report metrics, an agent's cannot read stats.
    err = refused(auth, "cli-token", "Connect")
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.message == f"{CLI_SA} may not call Connect"
    assert refused(auth, "agent-token", "StatSummary").code == grpc.StatusCode.PERMISSION_DENIED
    # Any other valid ServiceAccount of the cluster is authenticated but not allowed.
    assert refused(auth, "other-sa-token", "Check").code == grpc.StatusCode.PERMISSION_DENIED
    # What was sent: the token and our audience, as a TokenReview object.
    sent = FakeApiServer.reviews[0]
    assert sent["apiVersion"] == "authentication.k8s.io/v1" and sent["kind"] == "TokenReview"
    assert sent["spec"] == {"token": "agent-token", "audiences": [AUDIENCE]}


def test_controlplane_auth_tokenreview_groups_in_policy(api_client: client.ApiClient) -> None:
    policy = AccessPolicy.for_namespace("nodemesh", readers=["group:system:serviceaccounts:default"])
    auth = TokenReviewAuthenticator(api_client, [AUDIENCE], policy)
    assert run(auth.authenticate("other-sa-token", "Tap")).username == "system:serviceaccount:default:default"
    assert refused(auth, "cli-token", "Tap").code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("token", ["unknown-token", "expired-token", "apiserver-audience-token",
                                   "audience-unaware-token", "wrong-audience-token"])
def test_controlplane_auth_tokenreview_invalid_tokens(api_client: client.ApiClient, token: str) -> None:
    auth = TokenReviewAuthenticator(api_client, [AUDIENCE])
    err = refused(auth, token, "Connect")
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.message == INVALID_TOKEN
    assert token not in err.message and token not in err.reason  # tokens never reach a log line


def test_controlplane_auth_tokenreview_cache(api_client: client.ApiClient) -> None:
    clock = Clock()
    auth = TokenReviewAuthenticator(api_client, [AUDIENCE], cache_ttl_s=30, clock=clock)
    run(auth.authenticate("agent-token", "Connect"))
    run(auth.authenticate("agent-token", "Connect"))
    assert len(FakeApiServer.reviews) == 1 == auth.reviews
    # The cache holds who the token is, not the decision: the policy still applies per method.
    assert refused(auth, "agent-token", "Tap").code == grpc.StatusCode.PERMISSION_DENIED
    assert len(FakeApiServer.reviews) == 1
    assert "agent-token" not in repr(auth._cache)  # keyed by a hash, the token itself is not kept
    clock.now += 31  # expired: asked again (a revoked token stops working within the TTL)
    run(auth.authenticate("agent-token", "Connect"))
    assert len(FakeApiServer.reviews) == 2
    # An invalid token is remembered briefly (agents with a bad token retry fast), for 10 s.
    assert refused(auth, "unknown-token", "Connect").message == INVALID_TOKEN
    err = refused(auth, "unknown-token", "Connect")
    assert (err.code, err.message) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
    assert len(FakeApiServer.reviews) == 3
    clock.now += 11
    refused(auth, "unknown-token", "Connect")
    assert len(FakeApiServer.reviews) == 4


def test_controlplane_auth_tokenreview_cache_is_bounded(api_client: client.ApiClient) -> None:
    auth = TokenReviewAuthenticator(api_client, [AUDIENCE], cache_max=4)
    for i in range(10):
        STATUSES[f"bulk-{i}"] = STATUSES["agent-token"]
    try:
        for i in range(10):
            run(auth.authenticate(f"bulk-{i}", "Connect"))
    finally:
        for i in range(10):
            del STATUSES[f"bulk-{i}"]
    assert len(auth._cache) <= 4


def test_controlplane_auth_tokenreview_concurrent_calls_share_one_review(api_client: client.ApiClient) -> None:
    FakeApiServer.delay_s = 0.3
    auth = TokenReviewAuthenticator(api_client, [AUDIENCE])

    async def main() -> list[Principal]:
        return await asyncio.gather(*(auth.authenticate("agent-token", "Connect") for _ in range(5)))

    assert {p.username for p in run(main())} == {AGENT_SA}
    assert len(FakeApiServer.reviews) == 1


def test_controlplane_auth_tokenreview_api_server_failures(api_client: client.ApiClient) -> None:
    auth = TokenReviewAuthenticator(api_client, [AUDIENCE])
    FakeApiServer.fail_with = 403  # the controller's RBAC lacks create on tokenreviews
    err = refused(auth, "agent-token", "Connect")
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "TokenReview failed: 403" in err.message and "create on tokenreviews" in err.message
    FakeApiServer.fail_with = 0
    # A failure to ask is not an answer: not cached, the next call asks again and succeeds.
    assert run(auth.authenticate("agent-token", "Connect")).username == AGENT_SA
    assert len(FakeApiServer.reviews) == 2
    # The API server unreachable: UNAVAILABLE (the agent retries), quickly.
    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard port on loopback: connection refused
    with client.ApiClient(cfg) as dead:
        err = refused(TokenReviewAuthenticator(dead, [AUDIENCE]), "agent-token", "Connect")
    assert err.code == grpc.StatusCode.UNAVAILABLE and "cannot check the token" in err.message


def test_controlplane_auth_tokenreview_needs_an_audience(api_client: client.ApiClient) -> None:
    with pytest.raises(ValueError, match="--token-audience"):
        TokenReviewAuthenticator(api_client, [])


def test_controlplane_auth_tokenreview_through_a_grpc_server(api_client: client.ApiClient) -> None:
    """The interceptor with TokenReview on a real grpc.aio server: codes and messages on the wire."""

    class Servicer(pb_grpc.ControllerServicer):
        async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
            return pb.CheckResponse()

    async def main() -> None:
        auth = TokenReviewAuthenticator(api_client, [AUDIENCE])
        server = grpc.aio.server(interceptors=[AuthInterceptor(auth, CollectorRegistry())])
        pb_grpc.add_ControllerServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.ControllerStub(ch)
                await stub.Check(pb.CheckRequest(), metadata=(("authorization", "Bearer cli-token"),), timeout=5)
                for token, code, details in (
                    ("expired-token", grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN),
                    ("agent-token", grpc.StatusCode.PERMISSION_DENIED, f"{AGENT_SA} may not call Check"),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Check(pb.CheckRequest(), metadata=(("authorization", f"Bearer {token}"),),
                                         timeout=5)
                    assert (err.value.code(), err.value.details()) == (code, details)
        finally:
            await server.stop(None)

    run(main())


def test_controlplane_auth_tokenreview_agent_bound_to_its_node(api_client: client.ApiClient) -> None:
    """An agent's projected token names the node of the pod it was issued to (`node-name` extra):
    its Connect stream may speak only for that node — so it gets workload certificates only for
    that node's pods (controlplane/certify.py). A hello for another node is refused."""
    from nodemesh.controlplane.config import ControllerConfig
    from nodemesh.controlplane.controller import Controller
    from nodemesh.controlplane.server import start_grpc_server

    async def connect(port: int, node: str) -> pb.ControllerMessage:
        async def hello():  # type: ignore[no-untyped-def]
            yield pb.AgentMessage(hello=pb.AgentHello(agent_id=f"{node}/1/1", node=node))
            await asyncio.sleep(5)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb_grpc.ControllerStub(ch).Connect(hello(), metadata=(("authorization", "Bearer agent-token"),))
            async for msg in call:
                call.cancel()
                return msg
        raise AssertionError("no message")

    async def main() -> None:
        auth = TokenReviewAuthenticator(api_client, [AUDIENCE])
        assert (await auth.authenticate("agent-token", "Connect")).node == "node-a"
        assert (await auth.authenticate("cli-token", "StatSummary")).node == ""  # not bound to a pod
        controller = Controller(ControllerConfig(source="sandbox"))
        server, port = await start_grpc_server(controller, "127.0.0.1", 0, auth)
        try:
            assert (await connect(port, "node-a")).HasField("report_ack")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await connect(port, "node-b")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "issued to a pod on node node-a" in (err.value.details() or "")
            assert not any(s.node == "node-b" for s in controller.sessions.values())
        finally:
            await server.stop(None)

    run(main())
