"""voting-svc: the designed doughnut failure, its probability, and the poll."""

from __future__ import annotations

import asyncio
import io
import random

import grpc
import pytest
from demo_emojivoto_stack import start_grpc
from nodemesh.demo.emojivoto import voting
from nodemesh.demo.emojivoto.gen import Voting_pb2, Voting_pb2_grpc
from nodemesh.demo.emojivoto.runtime import ConfigError, GrpcServerConfig, Logger


def _service(failure_rate: float, seed: int = 7) -> voting.VotingService:
    return voting.VotingService(voting.Poll(), failure_rate, 0.0, Logger("test", stream=io.StringIO()),
                                rng=random.Random(seed))


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.9])
def test_doughnut_fails_with_the_configured_probability(rate: float) -> None:
    service = _service(rate)
    draws = 20_000
    failures = sum(service.doughnut_fails() for _ in range(draws))
    # Binomial: 4 standard deviations at most ~0.014 for n=20000; a seeded RNG makes it exact anyway.
    assert abs(failures / draws - rate) < 0.015


def test_failure_rate_one_always_fails_and_zero_never() -> None:
    assert all(_service(1.0).doughnut_fails() for _ in range(1000))
    assert not any(_service(0.0).doughnut_fails() for _ in range(1000))


def test_poll_orders_results_by_votes_then_shortcode() -> None:
    poll = voting.Poll()
    for code in (":taco:", ":joy:", ":taco:", ":beer:", ":taco:", ":joy:"):
        poll.vote(code)
    assert poll.results() == [(":taco:", 3), (":joy:", 2), (":beer:", 1)]


def test_every_vote_method_is_served() -> None:
    assert len(voting.VOTE_METHODS) == 100
    for name in voting.VOTE_METHODS:
        assert callable(getattr(voting.VotingService, name))


def test_real_grpc_client_sees_unknown_for_doughnut_and_counts_the_rest() -> None:
    async def body() -> None:
        service = _service(1.0)
        server, port = await start_grpc(lambda s: voting.register(s, service))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = Voting_pb2_grpc.VotingServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.VoteDoughnut(Voting_pb2.VoteRequest(), timeout=5)
                assert failed.value.code() == grpc.StatusCode.UNKNOWN
                assert failed.value.details() == "ERROR"
                await stub.VoteJoy(Voting_pb2.VoteRequest(), timeout=5)
                await stub.VoteJoy(Voting_pb2.VoteRequest(), timeout=5)
                await stub.VoteRelaxed(Voting_pb2.VoteRequest(), timeout=5)
                await stub.VoteStuckOutTongueWinkingEye(Voting_pb2.VoteRequest(), timeout=5)
                results = await stub.Results(Voting_pb2.ResultsRequest(), timeout=5)
            assert [(r.Shortcode, r.Votes) for r in results.results] == [
                (":joy:", 2), (":relaxed:", 1), (":stuck_out_tongue_winking_eye:", 1)]
        finally:
            await server.stop(grace=None)
    asyncio.run(asyncio.wait_for(body(), 30))


def test_voting_config_from_env() -> None:
    cfg = voting.VotingConfig.from_env({})
    assert (cfg.failure_rate, cfg.artificial_delay, cfg.server.port) == (1.0, 0.0, 8080)
    cfg = voting.VotingConfig.from_env({"FAILURE_RATE": "0.25", "ARTIFICIAL_DELAY": "100ms",
                                        "GRPC_PORT": "9090", "MAX_CONNECTION_AGE": "5s"})
    assert (cfg.failure_rate, cfg.artificial_delay, cfg.server.port) == (0.25, 0.1, 9090)
    assert cfg.server == GrpcServerConfig(port=9090, max_connection_age=5.0)
    assert dict(cfg.server.server_options())["grpc.max_connection_age_ms"] == 5000
    assert GrpcServerConfig().server_options() == []
    for bad in ({"FAILURE_RATE": "1.5"}, {"FAILURE_RATE": "lots"}, {"ARTIFICIAL_DELAY": "soon"}):
        with pytest.raises(ConfigError):
            voting.VotingConfig.from_env(bad)
