"""Who may read what on the admin port: /ready and /live open, /capture only to the node itself,
/metrics and /identity off the node only with a credential the controller accepts (ScrapeAuth).

The server runs on loopback with its "is this caller on the node?" answer forced to no, so a
real socket plays the pod; the real pod case is tests/integration/trust/test_trust_admin.py."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvloop
from nodemesh.agent.admin import AdminServer
from nodemesh.agent.metrics import merge
from nodemesh.agent.scrapeauth import MISSING, ScrapeAuth
from nodemesh.api.gen import nodemesh_pb2 as pb

GOOD, BAD = "scraper-token", "pod-token"


async def get(port: int, path: str, token: str = "") -> tuple[int, bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


@pytest.mark.parametrize("local", [True, False])
def test_agent_admin_access_by_path_and_caller(local: bool) -> None:
    asked: list[str] = []

    async def ask(token: str) -> pb.ScrapeReviewResult:
        asked.append(token)
        return pb.ScrapeReviewResult(allowed=token == GOOD, message="" if token == GOOD else "invalid token")

    async def main() -> None:
        auth = ScrapeAuth(ask)
        server = AdminServer("127.0.0.1", 0, snapshot=lambda: merge([]), ready=lambda: True,
                             excluded_ips=lambda: ["10.0.0.9"], identity=lambda: {"pods": {}},
                             scrape_auth=auth.check)
        server.is_local = lambda peer, sock: local  # type: ignore[method-assign]
        await server.start()
        try:
            for path in ("/ready", "/live"):
                assert (await get(server.port, path))[0] == 200
            status, _, body = await get(server.port, "/capture")
            if local:
                assert status == 200
                answer = json.loads(body)
                assert answer["excluded_ips"] == ["10.0.0.9"] and answer["synced"] is True
                assert answer["capture_mode"] == "iptables"   # no eBPF capture pinned in this test
                assert "no eBPF capture pinned" in answer["capture_mode_reason"]
            else:
                assert (status, body) == (403, b"/capture is only for this node's own processes\n")
            for path in ("/metrics", "/identity"):
                status, head, body = await get(server.port, path)
                if local:
                    assert status == 200
                    continue
                assert status == 401 and b'WWW-Authenticate: Bearer realm="nodemesh-agent"' in head
                assert body == (MISSING + "\n").encode()
                assert (await get(server.port, path, BAD))[:3:2] == (403, b"invalid token\n")
                status, _, body = await get(server.port, path, GOOD)
                assert status == 200 and (b"agent_process" in body or b"pods" in body), body[:200]
            # answers are cached: one question per token however many scrapes
            assert asked == ([] if local else [BAD, GOOD])
        finally:
            await server.stop()

    uvloop.run(main())


def test_agent_admin_access_scrapeauth_cache_and_controller_outage() -> None:
    now = [0.0]
    answers: list[pb.ScrapeReviewResult | Exception] = []

    async def ask(token: str) -> pb.ScrapeReviewResult:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def main() -> None:
        auth = ScrapeAuth(ask, clock=lambda: now[0])
        assert await auth.check(None) == (401, MISSING)
        answers.append(pb.ScrapeReviewResult(allowed=True))
        assert await auth.check(GOOD) == (200, "")
        now[0] = 30
        assert await auth.check(GOOD) == (200, "") and auth.asked == 1            # cached 60 s
        now[0] = 100
        answers.append(ConnectionError("no controller link"))
        assert await auth.check(GOOD) == (200, "")    # accepted before; controller away: still served
        answers.append(ConnectionError("no controller link"))
        status, message = await auth.check(BAD)      # never accepted: can't tell, so not a 403
        assert status == 503 and "no controller link" in message
        answers.append(pb.ScrapeReviewResult(message="invalid token"))
        assert await auth.check(BAD) == (403, "invalid token")
        assert await auth.check(BAD) == (403, "invalid token") and auth.asked == 4  # refused: cached 10 s
        now[0] = 5000
        answers.append(pb.ScrapeReviewResult(unavailable=True, message="cannot check the token: TokenReview failed"))
        assert (await auth.check(GOOD))[0] == 503    # accepted over an hour ago: no longer vouched for
        # concurrent scrapes with one token share one question
        answers.append(pb.ScrapeReviewResult(allowed=True))
        results = await asyncio.gather(*(auth.check("new") for _ in range(5)))
        assert results == [(200, "")] * 5 and auth.asked == 6

    asyncio.run(main())


def test_agent_admin_access_is_local_by_address() -> None:
    server = AdminServer("127.0.0.1", 0, snapshot=lambda: merge([]), ready=lambda: True, excluded_ips=list)
    assert server.is_local(("127.0.0.1", 5000), ("127.0.0.1", 4191))
    assert server.is_local(("127.0.0.53", 5000), ("127.0.0.1", 4191))          # loopback
    assert server.is_local(("10.9.8.7", 5000), ("10.9.8.7", 4191))             # our own address
    assert not server.is_local(("203.0.113.9", 5000), ("10.9.8.7", 4191))      # nobody's here
    assert not server.is_local(None, None)
