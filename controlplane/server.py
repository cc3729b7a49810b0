"""The gRPC API (port 8085): agents' Connect stream and the CLI's StatSummary/Edges/Check/Tap.

A thin layer: every method hands over to `Controller`, which holds the logic.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.gen import nodemesh_pb2_grpc as pb_grpc
from nodemesh.api.model import GRPC_CHANNEL_OPTIONS
from nodemesh.controlplane.auth import Authenticator, AuthError, AuthInterceptor, bearer_token, review_scrape
from nodemesh.controlplane.controller import Controller, TapLimitError
from nodemesh.controlplane.stat import StatError
from nodemesh.controlplane.tap import tap_scope

log = logging.getLogger("nodemesh.controlplane.server")

# A servicer's call context, typed by its request and response messages.
Context = grpc.aio.ServicerContext


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, controller: Controller, authenticator: Authenticator | None = None) -> None:
        self.controller = controller
        self.authenticator = authenticator

    async def Connect(self, request_iterator: AsyncIterator[pb.AgentMessage],
                      context: Context[pb.AgentMessage, pb.ControllerMessage],
                      ) -> AsyncIterator[pb.ControllerMessage]:
        node = ""
        if self.authenticator is not None:
            # Which node this token may speak for (TokenReview: the pod it was issued to); the
            # interceptor admitted the caller, this (cached) answer names the node.
            try:
                principal = await self.authenticator.authenticate(
                    bearer_token(context.invocation_metadata()) or "", "Connect")
            except AuthError as exc:
                await context.abort(exc.code, exc.message)
            node = principal.node
        try:
            async for msg in self.controller.serve_agent(request_iterator, node=node, encoded=True):
                yield msg  # type: ignore[misc]  # bytes: encoded once for every agent (_encode)
        except PermissionError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def StatSummary(self, request: pb.StatRequest,
                          context: Context[pb.StatRequest, pb.StatResponse]) -> pb.StatResponse:
        return await self.controller.answer_stat(request)

    async def Edges(self, request: pb.EdgesRequest,
                    context: Context[pb.EdgesRequest, pb.EdgesResponse]) -> pb.EdgesResponse:
        return await self.controller.answer_edges(request)

    async def Routes(self, request: pb.RoutesRequest,
                     context: Context[pb.RoutesRequest, pb.RoutesResponse]) -> pb.RoutesResponse:
        return await self.controller.answer_routes(request)

    async def Check(self, request: pb.CheckRequest,
                    context: Context[pb.CheckRequest, pb.CheckResponse]) -> pb.CheckResponse:
        return await self.controller.answer_check()

    async def Tap(self, request: pb.TapRequest,
                  context: Context[pb.TapRequest, pb.TapEvent]) -> AsyncIterator[pb.TapEvent]:
        try:
            self.controller.validate_tap(request.filter)
        except StatError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.authenticator is not None:
            # The interceptor let a reader in; what this tap shows needs its own permission.
            try:
                await self.authenticator.authorize_tap(bearer_token(context.invocation_metadata()) or "",
                                                       *tap_scope(request.filter))
            except AuthError as exc:
                await context.abort(exc.code, exc.message)
        try:
            self.controller.check_tap_capacity()
        except TapLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        events = self.controller.tap(request.filter)
        try:
            async for event in events:
                yield event
        finally:
            # The caller cancelled or disconnected: closing the generator closes the tap on
            # every agent it was opened on.
            await events.aclose()


# How long gRPC keeps a call our event loop has not taken yet (seconds).
UNREQUESTED_WAIT_S = 600


def _encode(msg: pb.ControllerMessage | bytes) -> bytes:
    """Connect's response serializer: identity messages arrive already encoded (the same bytes
    for every agent at the same version), the rest as messages."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def add_servicer(servicer: ControllerServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with Connect's responses serialized by `_encode`."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Connect": grpc.stream_stream_rpc_method_handler(
            servicer.Connect, request_deserializer=pb.AgentMessage.FromString, response_serializer=_encode),
        "StatSummary": grpc.unary_unary_rpc_method_handler(
            servicer.StatSummary, request_deserializer=pb.StatRequest.FromString,
            response_serializer=pb.StatResponse.SerializeToString),
        "Edges": grpc.unary_unary_rpc_method_handler(
            servicer.Edges, request_deserializer=pb.EdgesRequest.FromString,
            response_serializer=pb.EdgesResponse.SerializeToString),
        "Routes": grpc.unary_unary_rpc_method_handler(
            servicer.Routes, request_deserializer=pb.RoutesRequest.FromString,
            response_serializer=pb.RoutesResponse.SerializeToString),
        "Tap": grpc.unary_stream_rpc_method_handler(
            servicer.Tap, request_deserializer=pb.TapRequest.FromString,
            response_serializer=pb.TapEvent.SerializeToString),
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=pb.CheckRequest.FromString,
            response_serializer=pb.CheckResponse.SerializeToString),
    }
    service = pb.DESCRIPTOR.services_by_name["Controller"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials | None:
    """TLS for the API from PEM files (`--tls-cert`/`--tls-key`); None when neither is given.
    Read once at start: a new certificate takes a restart (agents and the CLI reconnect)."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ValueError("--tls-cert and --tls-key go together")
    try:
        with open(key_file, "rb") as k, open(cert_file, "rb") as c:
            return grpc.ssl_server_credentials([(k.read(), c.read())])
    except OSError as exc:
        raise ValueError(f"cannot read the TLS certificate or key: {exc.filename}: {exc.strerror}") from None


async def start_grpc_server(controller: Controller, host: str, port: int,
                            authenticator: Authenticator | None = None,
                            credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve the API on host:port (port 0: any free port); returns the server and the port.
    With an authenticator every call must carry an accepted bearer token (controlplane/auth.py);
    with credentials (server_credentials()) the port speaks only TLS."""
    interceptors = [AuthInterceptor(authenticator, controller.metrics.registry)] if authenticator else []
    if authenticator is not None:  # agents ask, over Connect, who may scrape their /metrics
        controller.scrape_reviewer = functools.partial(review_scrape, authenticator)
    server = grpc.aio.server(interceptors=interceptors,
                             # An agent's report holds every series it has seen: gRPC's default
                             # 4 MiB would stop a busy node's stats (api/model.py).
                             options=[*GRPC_CHANNEL_OPTIONS,
                                      ("grpc.keepalive_time_ms", 20_000),
                                      # A stream gRPC received but our loop has not yet taken waits
                                      # here, not 30 s (gRPC's default) and then CANCELLED: at 1,000
                                      # agents connecting at once, most streams were cancelled so and
                                      # came back after a backoff, again and again (docs/scale.md).
                                      ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_WAIT_S),
                                      ("grpc.http2.max_pings_without_data", 0),
                                      ("grpc.keepalive_permit_without_calls", 1)])
    add_servicer(ControllerServicer(controller, authenticator), server)
    addr = f"{host}:{port}"
    bound = server.add_secure_port(addr, credentials) if credentials is not None else server.add_insecure_port(addr)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    log.info("event=grpc_listening addr=%s:%d tls=%s", host, bound, credentials is not None)
    return server, bound
