"""What every emojivoto process shares: key=value logs, env parsing, signals and the gRPC server loop.

Kept import-light (no aiohttp here) so each program starts in well under a second.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_NEEDS_QUOTES = re.compile(r'[\s="]')


def _format_value(value: object) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class Logger:
    """One event per line, `ts=... level=... app=... event=... key=value`, to stdout.

    stdout because that is where `kubectl logs` and the sandbox's per-pod log files look.
    """

    def __init__(self, app: str, level: str = "info", stream: IO[str] | None = None) -> None:
        self.app = app
        self.threshold = _LEVELS.get(level.lower(), 20)
        self.stream = stream

    def log(self, level: str, event: str, **fields: object) -> None:
        if _LEVELS[level] < self.threshold:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        parts = [f"ts={stamp}", f"level={level}", f"app={self.app}", f"event={_format_value(event)}"]
        parts.extend(f"{key}={_format_value(value)}" for key, value in fields.items())
        stream = self.stream or sys.stdout
        stream.write(" ".join(parts) + "\n")
        stream.flush()

    def debug(self, event: str, **fields: object) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: object) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: object) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: object) -> None:
        self.log("error", event, **fields)


class ConfigError(ValueError):
    """An environment variable has a value the program cannot use."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds from `250ms`, `5s`, `1m`, or a bare number of seconds (upstream uses Go durations)."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"invalid duration {text!r}: expected e.g. 250ms, 5s, 1m")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None


def env_duration(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_duration(raw)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def stop_event_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by SIGTERM (what Kubernetes and the sandbox send) or SIGINT."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@dataclass(frozen=True, slots=True)
class GrpcServerConfig:
    """Where a gRPC service listens, and how long one client connection may live."""

    port: int = 8080
    bind_host: str = "0.0.0.0"
    # 0 = forever (upstream). A finite age makes clients reconnect now and then, so a mesh installed
    # while the app runs sees their traffic: connections opened before capture are never redirected.
    max_connection_age: float = 0.0
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GrpcServerConfig:
        return cls(
            port=env_int(env, "GRPC_PORT", 8080),
            bind_host=env.get("BIND_HOST", "0.0.0.0") or "0.0.0.0",
            max_connection_age=env_duration(env, "MAX_CONNECTION_AGE", 0.0),
            log_level=env.get("LOG_LEVEL", "info") or "info",
        )

    def server_options(self) -> list[tuple[str, Any]]:
        if self.max_connection_age <= 0:
            return []
        age_ms = max(1, int(self.max_connection_age * 1000))
        # The grace lets RPCs in flight on the old connection finish: recycling must never fail one.
        return [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", 10_000)]


async def serve_grpc(cfg: GrpcServerConfig, log: Logger, register: Callable[[Any], None],
                     stop: asyncio.Event, started: Callable[[int], None] | None = None) -> None:
    """Run a grpc.aio server until `stop` is set, then drain it for up to 5 s."""
    import grpc

    server = grpc.aio.server(options=cfg.server_options())
    register(server)
    port = server.add_insecure_port(f"{cfg.bind_host}:{cfg.port}")
    if port == 0:
        raise OSError(f"cannot listen on {cfg.bind_host}:{cfg.port}")
    await server.start()
    log.info("listening", addr=cfg.bind_host, port=port, max_connection_age=cfg.max_connection_age)
    if started is not None:
        started(port)
    await stop.wait()
    log.info("stopping")
    await server.stop(grace=5.0)
    log.info("stopped")
