"""Who may read the agent's /metrics (:4191): a scraper presenting a credential the controller accepts.

`/metrics` lists every pod, namespace and Host seen on the node: not for any pod to read. The
agent never calls the Kubernetes API, so it asks the controller over its existing stream
(`ScrapeReview`; the controller checks the token with its own authenticator: TokenReview and the
`--token-review-scrapers` list, or a token-file line with the `metrics` role). Answers are cached
by the token's SHA-256 (the cache never holds tokens): allowed 60 s, refused 10 s. While the
controller cannot be asked, a token it accepted within the last hour stays accepted, so a
controller outage does not blind monitoring; an unknown token then gets 503, not 403.
Callers on the node's own addresses need no credential (see agent/admin.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from nodemesh.api.gen import nodemesh_pb2 as pb

log = logging.getLogger("nodemesh.agent.scrapeauth")

MISSING = "missing bearer token: /metrics needs a credential (a token the controller accepts for Metrics)"
Ask = Callable[[str], Awaitable[pb.ScrapeReviewResult]]
Verdict = tuple[int, str]  # HTTP status (200 allowed, 401, 403, 503) and the one line for the scraper


class ScrapeAuth:
    def __init__(self, ask: Ask, *, ttl_s: float = 60.0, negative_ttl_s: float = 10.0, stale_s: float = 3600.0,
                 timeout_s: float = 5.0, cache_max: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ask = ask
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.stale_s = stale_s
        self.timeout_s = timeout_s
        self.cache_max = cache_max
        self.clock = clock
        self.asked = 0
        # sha256 -> (fresh until, verdict, last accepted at or None)
        self._cache: dict[str, tuple[float, Verdict, float | None]] = {}
        self._inflight: dict[str, asyncio.Future[Verdict]] = {}

    async def check(self, token: str | None) -> Verdict:
        if not token:
            return 401, MISSING
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            verdict = await self._ask(key, token, hit)
        except BaseException:
            fut.cancel()  # our caller was cancelled: the others ask again
            raise
        finally:
            del self._inflight[key]
        fut.set_result(verdict)
        return verdict

    async def _ask(self, key: str, token: str, hit: tuple[float, Verdict, float | None] | None) -> Verdict:
        self.asked += 1
        accepted_at = hit[2] if hit is not None else None
        try:
            result = await asyncio.wait_for(self.ask(token), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - no link, timeout: not a "no"
            result = pb.ScrapeReviewResult(unavailable=True, message=f"cannot check the credential now: {exc}")
        now = self.clock()
        if result.allowed:
            self._remember(key, now + self.ttl_s, (200, ""), now)
            return 200, ""
        if result.unavailable:
            if accepted_at is not None and now - accepted_at < self.stale_s:
                return 200, ""  # accepted before; the controller is away: keep monitoring working
            return 503, result.message or "cannot check the credential now"
        verdict = (403, result.message or "this credential may not read /metrics")
        self._remember(key, now + self.negative_ttl_s, verdict, None)
        return verdict

    def _remember(self, key: str, until: float, verdict: Verdict, accepted_at: float | None) -> None:
        if len(self._cache) >= self.cache_max and key not in self._cache:
            now = self.clock()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now or (v[2] is not None and now - v[2] < self.stale_s)}
            if len(self._cache) >= self.cache_max:
                for k in list(self._cache)[: self.cache_max // 2]:
                    del self._cache[k]
        self._cache[key] = (until, verdict, accepted_at)
