"""web's HTTP API against real emoji-svc and voting-svc servers on loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import grpc
import pytest
from demo_emojivoto_stack import running_stack
from nodemesh.demo.emojivoto import emojis, web


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_list_returns_every_emoji_in_upstream_shape() -> None:
    async def body() -> None:
        async with running_stack() as stack, aiohttp.ClientSession() as session:
            status, ctype, text = await _get(session, stack.web_url + "/api/list")
            assert status == 200
            assert ctype.startswith("application/json")
            listed = json.loads(text)
            assert listed == [{"shortcode": s, "unicode": u} for s, u in emojis.EMOJI]
    run(body())


def test_vote_records_and_doughnut_fails_with_500() -> None:
    async def body() -> None:
        async with running_stack(failure_rate=1.0) as stack, aiohttp.ClientSession() as session:
            for choice in (":joy:", ":joy:", ":100:", ":poop:"):
                status, _, text = await _get(session, f"{stack.web_url}/api/vote?choice={choice}")
                assert (status, text) == (200, "")
            status, _, text = await _get(session, f"{stack.web_url}/api/vote?choice=:doughnut:")
            assert status == 500
            assert json.loads(text) == {"error": "rpc error: code = Unknown desc = ERROR"}
            assert stack.poll.votes == {":joy:": 2, ":100:": 1, ":poop:": 1}

            status, _, text = await _get(session, stack.web_url + "/api/leaderboard")
            assert status == 200
            assert json.loads(text) == [
                {"votes": "2", "unicode": "\U0001f602", "shortcode": ":joy:"},
                {"votes": "1", "unicode": "\U0001f4af", "shortcode": ":100:"},
                {"votes": "1", "unicode": "\U0001f4a9", "shortcode": ":poop:"},
            ]
    run(body())


def test_doughnut_counts_when_failure_rate_is_zero() -> None:
    async def body() -> None:
        async with running_stack(failure_rate=0.0) as stack, aiohttp.ClientSession() as session:
            status, _, _ = await _get(session, f"{stack.web_url}/api/vote?choice=:doughnut:")
            assert status == 200
            assert stack.poll.votes == {":doughnut:": 1}
    run(body())


@pytest.mark.parametrize("query,error", [
    ("", "Emoji choice [] is mandatory"),
    ("?choice=", "Emoji choice [] is mandatory"),
    ("?choice=:not_an_emoji:", "Choosen emoji shortcode [:not_an_emoji:] doesnt exist"),
    ("?choice=:relaxed:", "Choosen emoji shortcode [:relaxed:] doesnt exist"),
])
def test_vote_rejects_bad_choice_with_400(query: str, error: str) -> None:
    async def body() -> None:
        async with running_stack() as stack, aiohttp.ClientSession() as session:
            status, _, text = await _get(session, f"{stack.web_url}/api/vote{query}")
            assert status == 400
            assert json.loads(text) == {"error": error}
            assert stack.poll.votes == {}
    run(body())


def test_vote_accepts_a_posted_form() -> None:
    async def body() -> None:
        async with running_stack() as stack, aiohttp.ClientSession() as session:
            async with session.post(stack.web_url + "/api/vote", data={"choice": ":taco:"}) as response:
                assert response.status == 200
            assert stack.poll.votes == {":taco:": 1}
    run(body())


def test_unreachable_backend_is_a_500_not_a_hang() -> None:
    async def body() -> None:
        async with running_stack(with_emoji=False) as stack, aiohttp.ClientSession() as session:
            # web waited for its backends (BACKEND_WAIT), said which one is missing, and serves anyway.
            assert "event=backend_not_ready backend=emoji" in stack.log.getvalue()
            assert "backend=voting" not in stack.log.getvalue()
            for path in ("/api/list", "/api/vote?choice=:joy:", "/api/leaderboard"):
                status, _, text = await _get(session, stack.web_url + path)
                if path == "/api/leaderboard":
                    # Results come from voting, which is up; no votes means no emoji-svc lookups.
                    assert (status, json.loads(text)) == (200, [])
                    continue
                assert status == 500, path
                assert json.loads(text)["error"].startswith("rpc error: code = Unavailable desc = ")
    run(body())


def test_pages_are_self_contained_html() -> None:
    async def body() -> None:
        async with running_stack() as stack, aiohttp.ClientSession() as session:
            for path in ("/", "/leaderboard"):
                status, ctype, text = await _get(session, stack.web_url + path)
                assert status == 200 and ctype.startswith("text/html")
                assert "/api/list" in text and "/api/vote" in text and "/api/leaderboard" in text
                assert "&lt;b&gt;hi&lt;/b&gt;" in text  # MESSAGE_OF_THE_DAY, escaped
                assert "http://" not in text and "https://" not in text  # no external assets
            status, _, _ = await _get(session, stack.web_url + "/nope")
            assert status == 404
    run(body())


def test_one_channel_per_backend_serves_concurrent_requests() -> None:
    async def body() -> None:
        async with running_stack(failure_rate=1.0) as stack, aiohttp.ClientSession() as session:
            choices = [":joy:", ":doughnut:"] * 20
            results = await asyncio.gather(
                *(_get(session, f"{stack.web_url}/api/vote?choice={c}") for c in choices))
            assert [r[0] for r in results] == [200, 500] * 20
            assert stack.poll.votes == {":joy:": 20}
    run(body())


def test_grpc_error_text_reads_like_go() -> None:
    exc = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="Deadline Exceeded")
    assert web.grpc_error_text(exc) == "rpc error: code = DeadlineExceeded desc = Deadline Exceeded"


def test_web_config_from_env() -> None:
    cfg = web.WebConfig.from_env({})
    assert (cfg.port, cfg.emojisvc_host, cfg.votingsvc_host) == (
        8080, "emoji-svc.emojivoto:8080", "voting-svc.emojivoto:8080")
    cfg = web.WebConfig.from_env({"WEB_PORT": "9000", "EMOJISVC_HOST": "e:1", "VOTINGSVC_HOST": "v:2",
                                  "RPC_TIMEOUT": "250ms"})
    assert (cfg.port, cfg.emojisvc_host, cfg.votingsvc_host, cfg.rpc_timeout) == (9000, "e:1", "v:2", 0.25)
