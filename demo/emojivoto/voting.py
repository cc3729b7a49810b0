"""voting-svc: VotingService over gRPC on GRPC_PORT (8080): one `Vote<Name>` RPC per emoji, and `Results`.

`VoteDoughnut` fails with gRPC UNKNOWN ("ERROR", as upstream's Go error becomes) with probability
FAILURE_RATE (default 1.0, like the emojivoto images the Linkerd demo made famous): the bug the
debugging session finds. ARTIFICIAL_DELAY (e.g. 100ms) slows every successful vote.

Run: python -m nodemesh.demo.emojivoto.voting
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import grpc

from . import emojis
from .gen import Voting_pb2 as pb
from .gen import Voting_pb2_grpc as pb_grpc
from .runtime import (
    ConfigError,
    GrpcServerConfig,
    Logger,
    env_duration,
    env_float,
    serve_grpc,
    stop_event_on_signals,
)

DOUGHNUT_METHOD = "VoteDoughnut"
# Every Vote<Name> the .proto declares, read from the generated descriptor so it cannot drift.
VOTE_METHODS: tuple[str, ...] = tuple(
    m.name for m in pb.DESCRIPTOR.services_by_name["VotingService"].methods if m.name.startswith("Vote"))


@dataclass(frozen=True, slots=True)
class VotingConfig:
    server: GrpcServerConfig
    failure_rate: float = 1.0
    artificial_delay: float = 0.0  # seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VotingConfig:
        failure_rate = env_float(env, "FAILURE_RATE", 1.0)
        if not 0.0 <= failure_rate <= 1.0:
            raise ConfigError(f"FAILURE_RATE={failure_rate}: expected a probability between 0 and 1")
        return cls(server=GrpcServerConfig.from_env(env), failure_rate=failure_rate,
                   artificial_delay=env_duration(env, "ARTIFICIAL_DELAY", 0.0))


class Poll:
    """Votes per shortcode, in memory (upstream keeps no state either)."""

    def __init__(self) -> None:
        self.votes: dict[str, int] = {}

    def vote(self, shortcode: str) -> int:
        self.votes[shortcode] = self.votes.get(shortcode, 0) + 1
        return self.votes[shortcode]

    def results(self) -> list[tuple[str, int]]:
        """(shortcode, votes), most votes first; ties by shortcode so the leaderboard is stable."""
        return sorted(self.votes.items(), key=lambda item: (-item[1], item[0]))


VoteHandler = Callable[["VotingService", pb.VoteRequest, grpc.aio.ServicerContext], Awaitable[pb.VoteResponse]]


class VotingService(pb_grpc.VotingServiceServicer):
    """Counts votes; VoteDoughnut fails by design. The other Vote<Name> methods are attached below."""

    def __init__(self, poll: Poll, failure_rate: float, artificial_delay: float, log: Logger,
                 rng: random.Random | None = None) -> None:
        self.poll = poll
        self.failure_rate = failure_rate
        self.artificial_delay = artificial_delay
        self.log = log
        self.rng = rng or random.Random()

    def doughnut_fails(self) -> bool:
        """Draw whether this doughnut vote fails (upstream: rand.Float32() < failureRate)."""
        return self.failure_rate > 0 and self.rng.random() < self.failure_rate

    async def vote(self, shortcode: str) -> pb.VoteResponse:
        if self.artificial_delay > 0:
            await asyncio.sleep(self.artificial_delay)
        total = self.poll.vote(shortcode)
        self.log.debug("voted", shortcode=shortcode, total=total)
        return pb.VoteResponse()

    async def VoteDoughnut(self, request: pb.VoteRequest,
                           context: grpc.aio.ServicerContext) -> pb.VoteResponse:
        if self.doughnut_fails():
            self.log.debug("vote_failed", shortcode=emojis.DOUGHNUT, reason="designed failure")
            await context.abort(grpc.StatusCode.UNKNOWN, "ERROR")
        return await self.vote(emojis.DOUGHNUT)

    async def Results(self, request: pb.ResultsRequest,
                      context: grpc.aio.ServicerContext) -> pb.ResultsResponse:
        return pb.ResultsResponse(
            results=[pb.VotingResult(Shortcode=code, Votes=n) for code, n in self.poll.results()])


def _vote_for(shortcode: str) -> VoteHandler:
    async def handler(self: VotingService, request: pb.VoteRequest,
                      context: grpc.aio.ServicerContext) -> pb.VoteResponse:
        return await self.vote(shortcode)
    return handler


# One method per emoji, as the .proto declares them; written as a loop rather than 99 copies.
for _method in VOTE_METHODS:
    if _method == DOUGHNUT_METHOD:
        continue
    _shortcode = emojis.shortcode_of_method(_method)
    if _shortcode is None:
        raise RuntimeError(f"VotingService.{_method} matches no emoji")  # caught by the unit tests
    setattr(VotingService, _method, _vote_for(_shortcode))


def register(server: grpc.aio.Server, service: VotingService) -> None:
    pb_grpc.add_VotingServiceServicer_to_server(service, server)


async def run(cfg: VotingConfig, log: Logger) -> None:
    stop = stop_event_on_signals(asyncio.get_running_loop())
    service = VotingService(Poll(), cfg.failure_rate, cfg.artificial_delay, log)
    log.info("starting", failure_rate=cfg.failure_rate, artificial_delay=cfg.artificial_delay)
    await serve_grpc(cfg.server, log, lambda server: register(server, service), stop)


def main() -> int:
    try:
        cfg = VotingConfig.from_env(os.environ)
    except ConfigError as exc:
        print(f"voting-svc: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(cfg, Logger("voting-svc", cfg.server.log_level)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
