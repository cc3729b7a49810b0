"""Who may call the controller's gRPC API (port 8085): bearer tokens, checked per call.

Agents and the CLI send `authorization: Bearer <token>` metadata. An `Authenticator` turns the
token into a `Principal` and decides whether that principal may call the method; `AuthInterceptor`
runs it for every call before the servicer sees anything and refuses with UNAUTHENTICATED (no or
bad token) or PERMISSION_DENIED (a valid token of someone not on the list).

Two authenticators:

* `StaticTokenAuthenticator(token_file)`: one shared secret in a file (the sandbox's
  `controller.token`); may call everything. The file is re-read when it changes, so a rotated
  token takes effect without a restart.
* `TokenReviewAuthenticator(api_client, audiences, policy)`: projected ServiceAccount tokens on a
  real cluster, checked with the Kubernetes TokenReview API. The token must be valid for one of
  our audiences (a token minted for the API server is refused), and the user it names must be on
  the policy's list for the method: agents (`Connect`) and readers (`StatSummary`, `Edges`, `Routes`,
  `Check`, `Tap`) are separate lists, so a CLI token can never report metrics.

Tap needs more than the API: the events show what pods send. A token-file line carries roles
(`agent`, `stats`, `tap`, `metrics`; none = all), and a reviewed user must also be allowed `watch`
on `tap.nodemesh.io` for the tapped resource by Kubernetes RBAC (`authorize_tap`, a
SubjectAccessReview), checked per tap with the tap's namespace, type and name.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("nodemesh.controlplane.auth")

MISSING_TOKEN = "missing bearer token: pass --token-file or set NODEMESH_TOKEN"
INVALID_TOKEN = "invalid token"
DEFAULT_AUDIENCE = "nodemesh-controller"
AGENT_METHODS = frozenset({"Connect"})
GROUP_PREFIX = "group:"
# Not a gRPC method: an agent asks the controller whether a scraper of its /metrics may read it.
METRICS_SCRAPE = "Metrics"
# What each method needs of a token-file line's roles.
METHOD_ROLES = {"Connect": "agent", "StatSummary": "stats", "Edges": "stats", "Routes": "stats", "Check": "stats", "Tap": "tap",
                METRICS_SCRAPE: "metrics"}
ROLES = frozenset(METHOD_ROLES.values())
TAP_GROUP = "tap.nodemesh.io"  # RBAC: verb `watch` on this group's <type>s (resource "*" for all types)
TAP_VERB = "watch"


class AuthError(Exception):
    """A refused call: the gRPC status and the one line the caller sees."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or message  # logged by the controller, never sent to the caller


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token belongs to (Kubernetes user info for TokenReview; a fixed name for the file)."""

    username: str
    groups: tuple[str, ...] = ()


class Authenticator(Protocol):
    async def authenticate(self, token: str, method: str) -> Principal:
        """The token's principal if it may call `method` (short name, e.g. "StatSummary");
        raises AuthError otherwise."""
        ...

    async def authorize_tap(self, token: str, namespace: str, rtype: str, name: str) -> None:
        """Raises AuthError(PERMISSION_DENIED) unless the token may tap this resource (namespace ""
        = every namespace; rtype as a TapFilter's, e.g. "deployment"; name "" = every one)."""
        ...


def tap_resource(rtype: str) -> str:
    """The RBAC resource a tap of `rtype` asks for: the type's plural; "*" for all types."""
    if rtype in ("", "all"):
        return "*"
    return rtype if rtype.endswith("s") else rtype + "s"


def method_name(full_method: str) -> str:
    """`/nodemesh.v1.Controller/StatSummary` -> `StatSummary`."""
    return full_method.rsplit("/", 1)[-1]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; None when there is none."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


# ---------------------------------------------------------------------------- the token file


class StaticTokenAuthenticator:
    """Shared secrets read from a file; re-read whenever the file changes (inode, mtime, size).

    One token per line, optionally followed by its roles: `TOKEN [ROLE,...]` with roles among
    `agent` (Connect), `stats` (StatSummary, Edges, Routes, Check), `tap` (Tap), `metrics` (scrape an
    agent's /metrics); a line without roles may do everything (the sandbox's `controller.token`).
    Clients read the first token of the file (the first line's first word).
    """

    PRINCIPAL = Principal("static-token")

    def __init__(self, token_file: str) -> None:
        self.token_file = token_file
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: list[tuple[bytes, frozenset[str]]] = []
        self._reload(startup=True)

    @staticmethod
    def parse(text: bytes) -> list[tuple[bytes, frozenset[str]]]:
        """The file's lines as (token, roles); raises ValueError on an unknown role."""
        tokens = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith(b"#"):
                continue
            roles = frozenset(r.strip() for w in words[1:] for r in w.decode().removeprefix("role=").split(",")
                              if r.strip())
            unknown = roles - ROLES
            if unknown:
                raise ValueError(f"line {number}: unknown role {min(unknown)!r} "
                                 f"(roles: {', '.join(sorted(ROLES))})")
            tokens.append((words[0], roles or ROLES))
        return tokens

    def _reload(self, startup: bool = False) -> None:
        try:
            st = os.stat(self.token_file)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.token_file, "rb") as f:
                tokens = self.parse(f.read())
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            if startup:  # main() turns this into one line
                raise ValueError(f"cannot read --token-file {self.token_file}: {why}") from None
            # Mid-rotation (file briefly absent): keep the token we have rather than lock everyone out.
            log.warning("event=token_file_unreadable path=%s error=%r", self.token_file, why)
            return
        if not tokens:
            if startup:
                raise ValueError(f"--token-file {self.token_file} is empty")
            log.warning("event=token_file_empty path=%s keeping=previous", self.token_file)
            return
        if self._stamp is not None:
            log.info("event=token_file_reloaded path=%s", self.token_file)
        self._stamp, self._tokens = stamp, tokens

    async def authenticate(self, token: str, method: str) -> Principal:
        self._reload()
        given = token.encode()
        roles: frozenset[str] | None = None
        for known, known_roles in self._tokens:
            # Constant time, and every line compared: timing tells a prober nothing.
            if hmac.compare_digest(given, known):
                roles = known_roles
        if roles is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN, "token does not match the token file")
        needed = METHOD_ROLES.get(method, "stats")
        if needed not in roles:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"this token may not call {method}: it needs role {needed}, "
                            f"the token has {','.join(sorted(roles))}",
                            f"static token roles={sorted(roles)} not allowed for {method}")
        return self.PRINCIPAL

    async def authorize_tap(self, token: str, namespace: str, rtype: str, name: str) -> None:
        await self.authenticate(token, "Tap")  # the `tap` role covers every namespace


# ---------------------------------------------------------------------------- TokenReview


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call what, for TokenReview principals. Entries are usernames
    (`system:serviceaccount:NS:NAME`) or `group:NAME`."""

    agents: frozenset[str]   # may call Connect (report metrics, receive identity, serve taps)
    readers: frozenset[str]  # may call StatSummary, Edges, Routes, Check, Tap (tap also needs RBAC)
    scrapers: frozenset[str] = frozenset()  # may read an agent's /metrics (asked through Connect)

    @classmethod
    def for_namespace(cls, namespace: str, agents: Sequence[str] = (), readers: Sequence[str] = (),
                      scrapers: Sequence[str] = ()) -> AccessPolicy:
        """Defaults are the ServiceAccounts `nodemesh install` creates in `namespace`."""
        return cls(
            agents=frozenset(agents or [f"system:serviceaccount:{namespace}:nodemesh-agent"]),
            readers=frozenset(readers or [f"system:serviceaccount:{namespace}:nodemesh-cli"]),
            scrapers=frozenset(scrapers or [f"system:serviceaccount:{namespace}:nodemesh-prometheus"]),
        )

    def allows(self, principal: Principal, method: str) -> bool:
        if method in AGENT_METHODS:
            allowed = self.agents
        elif method == METRICS_SCRAPE:
            allowed = self.scrapers
        else:
            allowed = self.readers
        return principal.username in allowed or any(GROUP_PREFIX + g in allowed for g in principal.groups)


class TokenReviewAuthenticator:
    """Tokens checked by the API server (TokenReview), positive answers cached for `cache_ttl_s`.

    The cache is keyed by a SHA-256 of the token, so the controller's memory never holds the
    tokens themselves. An invalid token is remembered too, for `negative_ttl_s`: agents with a
    bad token retry every few hundred milliseconds, and a thousand of them must not turn into a
    thousand TokenReviews a second (a fixed token is a different token, so it works at once).
    Failures to ask (API server down, RBAC) are never cached. The `kubernetes` client is
    synchronous: reviews run in a thread, and concurrent calls with the same token (an agent's
    reconnect racing a CLI call) share one review.
    """

    def __init__(self, api_client: Any, audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
                 policy: AccessPolicy | None = None, *, cache_ttl_s: float = 60.0, negative_ttl_s: float = 10.0,
                 cache_max: int = 10_000, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from kubernetes import client  # heavy import: only when TokenReview is configured

        if not audiences:
            raise ValueError("TokenReview needs at least one audience (--token-audience)")
        self._client = client
        self._api = client.AuthenticationV1Api(api_client)
        self.audiences = tuple(audiences)
        self.policy = policy or AccessPolicy.for_namespace("nodemesh")
        self.cache_ttl_s = cache_ttl_s
        self.negative_ttl_s = min(negative_ttl_s, cache_ttl_s)
        self.cache_max = cache_max
        self.timeout_s = timeout_s
        self.clock = clock
        self.reviews = 0  # TokenReviews sent to the API server (tests, logs)
        self._cache: dict[str, tuple[float, Principal | AuthError]] = {}
        self._inflight: dict[str, asyncio.Future[Principal]] = {}
        self.access_reviews = 0  # SubjectAccessReviews sent (tests)
        self._access: dict[tuple[Any, ...], tuple[float, str]] = {}  # -> (expiry, "" allowed | reason)

    async def authenticate(self, token: str, method: str) -> Principal:
        principal = await self._identify(token)
        if not self.policy.allows(principal, method):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{principal.username} may not call {method}",
                            f"user={principal.username} not allowed for {method}")
        return principal

    async def authorize_tap(self, token: str, namespace: str, rtype: str, name: str) -> None:
        principal = await self.authenticate(token, "Tap")
        resource = tap_resource(rtype)
        key = (principal, namespace, resource, name)
        hit = self._access.get(key)
        now = self.clock()
        if hit is None or hit[0] <= now:
            denied = await asyncio.to_thread(self._access_review, principal, namespace, resource, name)
            if len(self._access) >= self.cache_max:
                self._access.clear()
            self._access[key] = hit = (now + self.negative_ttl_s if denied else now + self.cache_ttl_s, denied)
        if hit[1]:
            where = f"namespace {namespace}" if namespace else "all namespaces"
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{principal.username} may not tap {rtype or 'all'}{'/' + name if name else ''} in {where}: "
                            f"RBAC must allow verb {TAP_VERB} on {TAP_GROUP} {resource} "
                            f"(e.g. bind the ClusterRole nodemesh-tap)", f"SubjectAccessReview: {hit[1]}")

    def _access_review(self, principal: Principal, namespace: str, resource: str, name: str) -> str:
        """A SubjectAccessReview: "" when allowed, else the reason (logged, never sent)."""
        c = self._client
        attrs = c.V1ResourceAttributes(namespace=namespace or None, verb=TAP_VERB, group=TAP_GROUP,
                                       resource=resource, name=name or None)
        body = c.V1SubjectAccessReview(api_version="authorization.k8s.io/v1", kind="SubjectAccessReview",
                                       spec=c.V1SubjectAccessReviewSpec(user=principal.username,
                                                                        groups=list(principal.groups),
                                                                        resource_attributes=attrs))
        self.access_reviews += 1
        try:
            review = c.AuthorizationV1Api(self._api.api_client).create_subject_access_review(
                body, _request_timeout=self.timeout_s)
        except c.ApiException as exc:
            hint = " (does the controller's ClusterRole allow create on subjectaccessreviews?)" \
                if exc.status == 403 else ""
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            f"cannot check tap permission: SubjectAccessReview failed: {exc.status} {exc.reason}{hint}"
                            ) from None
        except Exception as exc:  # noqa: BLE001 - API server unreachable: the caller may retry
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            f"cannot check tap permission: SubjectAccessReview failed: {type(exc).__name__}") from None
        status = review.status
        if status is not None and status.allowed and not status.denied:
            return ""
        return (getattr(status, "reason", None) or "not allowed") if status is not None else "no status"

    async def _identify(self, token: str) -> Principal:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], AuthError):
                raise AuthError(hit[1].code, hit[1].message, hit[1].reason + " (cached)")
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Principal] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            principal = await asyncio.to_thread(self._review, token)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            if isinstance(exc, AuthError) and exc.code == grpc.StatusCode.UNAUTHENTICATED:
                self._remember(key, exc, self.negative_ttl_s)
            fut.set_exception(exc)
            fut.exception()  # mark it retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]
        fut.set_result(principal)
        self._remember(key, principal, self.cache_ttl_s)
        return principal

    def _remember(self, key: str, answer: Principal | AuthError, ttl_s: float) -> None:
        now = self.clock()
        if len(self._cache) >= self.cache_max:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self.cache_max:  # all live: drop the oldest half, not grow forever
                for k in list(self._cache)[: self.cache_max // 2]:
                    del self._cache[k]
        self._cache[key] = (now + ttl_s, answer)

    def _review(self, token: str) -> Principal:
        c = self._client
        body = c.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                               spec=c.V1TokenReviewSpec(token=token, audiences=list(self.audiences)))
        self.reviews += 1
        try:
            review = self._api.create_token_review(body, _request_timeout=self.timeout_s)
        except c.ApiException as exc:
            hint = " (does the controller's ClusterRole allow create on tokenreviews?)" if exc.status == 403 else ""
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            f"cannot check the token: TokenReview failed: {exc.status} {exc.reason}{hint}") from None
        except Exception as exc:  # noqa: BLE001 - API server unreachable: the caller may retry
            raise AuthError(grpc.StatusCode.UNAVAILABLE,
                            f"cannot check the token: TokenReview failed: {type(exc).__name__}") from None
        status = review.status
        if status is None or not status.authenticated or status.user is None or not status.user.username:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN,
                            f"TokenReview: not authenticated ({getattr(status, 'error', None) or 'no error given'})")
        # An authenticator that is not audience-aware returns no audiences: the token may be one
        # minted for the API server, which a compromised controller must not be able to replay.
        granted = set(status.audiences or ())
        if not granted & set(self.audiences):
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN,
                            f"TokenReview: audiences {sorted(granted)} do not include {list(self.audiences)}")
        return Principal(status.user.username, tuple(status.user.groups or ()))


async def review_scrape(authenticator: Authenticator, token: str) -> tuple[bool, bool, str]:
    """An agent's question: may the scraper presenting `token` read its /metrics? Returns
    (allowed, unavailable, message); `unavailable` means it could not be checked now."""
    if not token:
        return False, False, MISSING_TOKEN
    try:
        await authenticator.authenticate(token, METRICS_SCRAPE)
    except AuthError as exc:
        log.info("event=scrape_refused code=%s reason=%r", exc.code.name, exc.reason)
        return False, exc.code == grpc.StatusCode.UNAVAILABLE, exc.message
    return True, False, ""


# ---------------------------------------------------------------------------- the interceptor


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call before its handler runs; a refused call never reaches the servicer."""

    def __init__(self, authenticator: Authenticator, registry: CollectorRegistry | None = None,
                 log_every_s: float = 10.0) -> None:
        self.authenticator = authenticator
        self.refused = Counter("nodemesh_controller_auth_refused", "gRPC calls refused by authentication.",
                               ["code"], registry=registry)
        self.log_every_s = log_every_s
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED, nothing to protect
            return handler
        method = method_name(handler_call_details.method)
        token = bearer_token(handler_call_details.invocation_metadata)
        try:
            if token is None:
                raise AuthError(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN, "no bearer token")
            principal = await self.authenticator.authenticate(token, method)
        except AuthError as exc:
            self.refused.labels(exc.code.name).inc()
            return _refusal(handler, exc, method, self._log_refusal)
        log.debug("event=auth_ok method=%s user=%s", method, principal.username)
        return handler

    def _log_refusal(self, exc: AuthError, method: str, peer: str) -> None:
        # A misconfigured agent retries every few seconds, a scanner faster: one line per reason
        # per interval, with the count of the ones not logged.
        now = time.monotonic()
        key = f"{exc.code.name}:{exc.reason}"
        if now - self._last_log.get(key, -1e9) < self.log_every_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_log[key] = now
        log.warning("event=auth_refused method=%s peer=%s code=%s reason=%r suppressed=%d", method, peer,
                    exc.code.name, exc.reason, self._suppressed.pop(key, 0))


def _refusal(handler: grpc.RpcMethodHandler[Any, Any], exc: AuthError, method: str,
             on_refused: Callable[[AuthError, str, str], None]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that aborts the call with `exc`."""

    async def abort(request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        on_refused(exc, method, context.peer())
        await context.abort(exc.code, exc.message)

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


# ---------------------------------------------------------------------------- from config


def build_authenticator(token_file: str = "", token_review: bool = False, audiences: Sequence[str] = (),
                        policy: AccessPolicy | None = None, kubeconfig: str = "",
                        cache_ttl_s: float = 60.0) -> Authenticator | None:
    """The authenticator the flags ask for; None means the API is open (dev mode)."""
    if token_file and token_review:
        raise ValueError("--token-file and --token-review are exclusive: pick one")
    if token_file:
        return StaticTokenAuthenticator(token_file)
    if token_review:
        from kubernetes import client
        from nodemesh.controlplane.sources.kubernetes import load_configuration

        return TokenReviewAuthenticator(client.ApiClient(load_configuration(kubeconfig)),
                                        audiences or (DEFAULT_AUDIENCE,), policy, cache_ttl_s=cache_ttl_s)
    return None
