"""emoji-svc: EmojiService (`ListAll`, `FindByShortcode`) over gRPC on GRPC_PORT (8080).

Run: python -m nodemesh.demo.emojivoto.emoji
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc

from . import emojis
from .gen import Emoji_pb2 as pb
from .gen import Emoji_pb2_grpc as pb_grpc
from .runtime import ConfigError, GrpcServerConfig, Logger, serve_grpc, stop_event_on_signals


class EmojiService(pb_grpc.EmojiServiceServicer):
    """Answers from the fixed upstream emoji list."""

    def __init__(self, log: Logger) -> None:
        self.log = log
        # The list never changes and every ListAll returns all of it: build the answer once.
        self.list_all = pb.ListAllEmojiResponse(
            list=[pb.Emoji(unicode=u, shortcode=s) for s, u in emojis.EMOJI])

    async def ListAll(self, request: pb.ListAllEmojiRequest,
                      context: grpc.aio.ServicerContext) -> pb.ListAllEmojiResponse:
        return self.list_all

    async def FindByShortcode(self, request: pb.FindByShortcodeRequest,
                              context: grpc.aio.ServicerContext) -> pb.FindByShortcodeResponse:
        unicode = emojis.find_by_shortcode(request.Shortcode)
        if unicode is None:
            # Upstream answers OK with the Emoji field unset; web turns that into a 400.
            self.log.debug("unknown_shortcode", shortcode=request.Shortcode)
            return pb.FindByShortcodeResponse()
        return pb.FindByShortcodeResponse(Emoji=pb.Emoji(unicode=unicode, shortcode=request.Shortcode))


def register(server: grpc.aio.Server, log: Logger) -> None:
    pb_grpc.add_EmojiServiceServicer_to_server(EmojiService(log), server)


async def run(cfg: GrpcServerConfig, log: Logger) -> None:
    stop = stop_event_on_signals(asyncio.get_running_loop())
    log.info("starting", emoji=len(emojis.EMOJI))
    await serve_grpc(cfg, log, lambda server: register(server, log), stop)


def main() -> int:
    try:
        cfg = GrpcServerConfig.from_env(os.environ)
    except ConfigError as exc:
        print(f"emoji-svc: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(cfg, Logger("emoji-svc", cfg.log_level)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
