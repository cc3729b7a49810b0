"""vote-bot: the emojivoto load generator, which also counts everything it saw.

Each cycle, REQUEST_RATE times a second (default 1): GET /api/list, then GET /api/vote for 🍩
:doughnut: 15 % of the time, else for a random emoji of the list (upstream's vote-bot, which "has a
sweet tooth"). Unlike upstream it keeps score, because the end-to-end test compares the mesh's
success rates with what the client really observed:

- a key=value `stats` line every STATS_INTERVAL (10s) and at exit;
- with VOTEBOT_STATS_FILE set, a JSON summary rewritten every second and at exit (see `Stats.summary`;
  `{hostname}` and `{pid}` in the path keep replicas apart). `window()` turns two moments of its
  history into per-endpoint counts.

A response with status < 500 is a success, 5xx or no response at all a failure: the mesh's
classification for HTTP.

Other settings: WEB_HOST (web-svc.emojivoto:80), HOST_OVERRIDE (Host header), TTL (seconds; exit 0
after it, like upstream), MAX_CONNECTION_AGE (reopen the keep-alive connection to web after this
long, so a mesh installed meanwhile captures it; 0 = never), VOTEBOT_SEED (reproducible choices).

Run: python -m nodemesh.demo.emojivoto.votebot
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .emojis import DOUGHNUT
from .runtime import ConfigError, Logger, env_duration, env_float, env_int

DOUGHNUT_PROBABILITY = 0.15
LIST_PATH = "/api/list"
VOTE_PATH = "/api/vote"
DEFAULT_WEB_HOST = "web-svc.emojivoto:80"
HISTORY_LENGTH = 900  # one entry a second: 15 minutes of history in the stats file


@dataclass(frozen=True, slots=True)
class VoteBotConfig:
    web_host: str = DEFAULT_WEB_HOST
    host_override: str = ""
    request_rate: float = 1.0  # cycles per second
    ttl: float = 0.0  # seconds; 0 = run until stopped
    stats_file: str = ""
    stats_interval: float = 10.0  # seconds between `stats` log lines
    max_connection_age: float = 0.0  # seconds; 0 = keep the connection while it works
    request_timeout: float = 10.0
    # Wait this long at most for web to accept connections before the first cycle, so pods starting
    # together do not count web's start-up as failures. 0 = start at once, as upstream does.
    wait_for_web: float = 30.0
    seed: int | None = None
    log_level: str = "info"
    # The pod name: Kubernetes and the sandbox set HOSTNAME; in a sandbox netns gethostname() is the
    # machine's, which would make replicas share one stats file.
    hostname: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VoteBotConfig:
        rate = env_float(env, "REQUEST_RATE", 1.0)
        if rate <= 0:
            raise ConfigError(f"REQUEST_RATE={rate}: expected a positive number of cycles per second")
        seed = env.get("VOTEBOT_SEED", "").strip()
        return cls(
            web_host=env.get("WEB_HOST", "") or DEFAULT_WEB_HOST,
            host_override=env.get("HOST_OVERRIDE", ""),
            request_rate=rate,
            ttl=env_duration(env, "TTL", 0.0),
            stats_file=env.get("VOTEBOT_STATS_FILE", ""),
            stats_interval=env_duration(env, "STATS_INTERVAL", 10.0),
            max_connection_age=env_duration(env, "MAX_CONNECTION_AGE", 0.0),
            request_timeout=env_duration(env, "REQUEST_TIMEOUT", 10.0),
            wait_for_web=env_duration(env, "WAIT_FOR_WEB", 30.0),
            seed=env_int(env, "VOTEBOT_SEED", 0) if seed else None,
            log_level=env.get("LOG_LEVEL", "info") or "info",
            hostname=env.get("HOSTNAME", "") or socket.gethostname(),
        )

    def stats_path(self) -> Path | None:
        if not self.stats_file:
            return None
        return Path(self.stats_file.format(hostname=self.hostname, pid=os.getpid()))


def choose(rng: random.Random, shortcodes: Sequence[str]) -> str:
    """What to vote for: the doughnut 15 % of the time, else any emoji of the list."""
    if rng.random() < DOUGHNUT_PROBABILITY or not shortcodes:
        return DOUGHNUT
    return rng.choice(shortcodes)


def is_success(status: int | None) -> bool:
    """The mesh's HTTP classification: 5xx (or no response at all) is a failure."""
    return status is not None and status < 500


@dataclass(slots=True)
class Counts:
    """Requests seen for one endpoint (or one kind of vote), by outcome."""

    requests: int = 0
    success: int = 0
    failure: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # "200", "500", ... and "error"

    def record(self, status: int | None) -> None:
        self.requests += 1
        if is_success(status):
            self.success += 1
        else:
            self.failure += 1
        key = "error" if status is None else str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        rate = self.success / self.requests if self.requests else None
        return {"requests": self.requests, "success": self.success, "failure": self.failure,
                "success_rate": rate, "statuses": dict(sorted(self.statuses.items()))}


class Stats:
    """Everything vote-bot observed since it started."""

    # The groups a summary reports, and what a history entry records for each: [requests, failures].
    GROUPS = ("total", LIST_PATH, VOTE_PATH, "doughnut", "other")

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self.cycles = 0
        self.groups = {name: Counts() for name in self.GROUPS}
        self.history: list[dict[str, Any]] = []

    def record_list(self, status: int | None) -> None:
        self.groups["total"].record(status)
        self.groups[LIST_PATH].record(status)

    def record_vote(self, shortcode: str, status: int | None) -> None:
        self.groups["total"].record(status)
        self.groups[VOTE_PATH].record(status)
        self.groups["doughnut" if shortcode == DOUGHNUT else "other"].record(status)

    def snapshot(self) -> None:
        """Append a history entry: cumulative [requests, failures] per group, at this moment."""
        entry: dict[str, Any] = {"t": round(self.clock(), 3)}
        entry.update({name: [c.requests, c.failure] for name, c in self.groups.items()})
        self.history.append(entry)
        del self.history[:-HISTORY_LENGTH]

    def summary(self) -> dict[str, Any]:
        return {
            "started": round(self.started, 3),
            "updated": round(self.clock(), 3),
            "cycles": self.cycles,
            "total": self.groups["total"].as_dict(),
            "endpoints": {path: self.groups[path].as_dict() for path in (LIST_PATH, VOTE_PATH)},
            "votes": {kind: self.groups[kind].as_dict() for kind in ("doughnut", "other")},
            "history": list(self.history),
        }

    def log_fields(self) -> dict[str, object]:
        g = self.groups
        return {"cycles": self.cycles, "requests": g["total"].requests, "failures": g["total"].failure,
                "list_ok": g[LIST_PATH].success, "list_failed": g[LIST_PATH].failure,
                "vote_ok": g[VOTE_PATH].success, "vote_failed": g[VOTE_PATH].failure,
                "doughnut_failed": g["doughnut"].failure}


def window(summary: Mapping[str, Any], since: float, until: float | None = None) -> dict[str, tuple[int, int]]:
    """[requests, failures] per group between two moments, from a summary's history.

    Uses the last entry at or before `since` as the baseline (the start of time if none) and the last
    entry at or before `until` (default: the newest) as the end, so a caller can line the client's
    view up with the mesh's stat window.
    """
    history = summary["history"]
    zero = {name: [0, 0] for name in Stats.GROUPS}
    base = next((e for e in reversed(history) if e["t"] <= since), zero)
    end = history[-1] if until is None else next((e for e in reversed(history) if e["t"] <= until), zero)
    return {name: (end[name][0] - base[name][0], end[name][1] - base[name][1]) for name in Stats.GROUPS}


class WebClient:
    """One keep-alive HTTP/1.1 connection to web, reopened when it breaks or grows too old."""

    def __init__(self, cfg: VoteBotConfig) -> None:
        self.cfg = cfg
        self.conn: http.client.HTTPConnection | None = None
        self.opened = 0.0
        self.headers = {"Host": cfg.host_override} if cfg.host_override else {}

    def get(self, path: str) -> tuple[int, bytes]:
        """GET path; (status, body). Raises OSError/HTTPException when no response came."""
        self._recycle_if_old()
        reused = self.conn is not None
        try:
            return self._get_once(path)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.close()
            if not reused:
                raise
            # web closed an idle keep-alive connection under us; like Go's http.Transport, retry
            # once on a fresh connection rather than report a failure the server never saw.
            try:
                return self._get_once(path)
            except (OSError, http.client.HTTPException):
                self.close()
                raise
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def _get_once(self, path: str) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.cfg.web_host, timeout=self.cfg.request_timeout)
            self.opened = time.monotonic()
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        body = response.read()  # read it all: the connection is reused for the next request
        if response.will_close:
            self.close()
        return response.status, body

    def _recycle_if_old(self) -> None:
        age = self.cfg.max_connection_age
        if self.conn is not None and age > 0 and time.monotonic() - self.opened >= age:
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class VoteBot:
    def __init__(self, cfg: VoteBotConfig, log: Logger, client: WebClient | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.client = client or WebClient(cfg)
        self.rng = random.Random(cfg.seed)
        self.stats = Stats()
        self.stop = threading.Event()
        self.stats_path = cfg.stats_path()
        self.stats_write_failed = False

    def cycle(self) -> None:
        """One round: list the emoji, then vote once. A failed list skips the vote (as upstream)."""
        self.stats.cycles += 1
        try:
            status, body = self.client.get(LIST_PATH)
        except (OSError, http.client.HTTPException) as exc:
            self.stats.record_list(None)
            self.log.debug("request_failed", path=LIST_PATH, error=repr(exc))
            return
        self.stats.record_list(status)
        if status != 200:
            self.log.debug("request_failed", path=LIST_PATH, status=status)
            return
        try:
            shortcodes = [e["shortcode"] for e in json.loads(body)]
        except (ValueError, TypeError, KeyError) as exc:
            self.log.warning("bad_list", error=repr(exc))
            return
        choice = choose(self.rng, shortcodes)
        path = f"{VOTE_PATH}?choice={urllib.parse.quote(choice, safe=':')}"
        try:
            status, _ = self.client.get(path)
        except (OSError, http.client.HTTPException) as exc:
            self.stats.record_vote(choice, None)
            self.log.debug("vote", choice=choice, error=repr(exc))
            return
        self.stats.record_vote(choice, status)
        self.log.debug("vote", choice=choice, status=status)

    def wait_for_web(self) -> bool:
        """Until web accepts a TCP connection (or WAIT_FOR_WEB passes, or we are stopped)."""
        host, _, port = self.cfg.web_host.rpartition(":")
        if not host:
            host, port = self.cfg.web_host, "80"
        deadline = time.monotonic() + self.cfg.wait_for_web
        logged = False
        while not self.stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=1.0):
                    return True
            except OSError as exc:
                if time.monotonic() >= deadline:
                    self.log.warning("web_not_reachable", web_host=self.cfg.web_host, error=repr(exc))
                    return False
                if not logged:
                    self.log.info("waiting_for_web", web_host=self.cfg.web_host, error=repr(exc))
                    logged = True
            self.stop.wait(0.2)
        return False

    def run(self) -> None:
        if self.cfg.wait_for_web > 0:
            self.wait_for_web()
        period = 1.0 / self.cfg.request_rate
        start = time.monotonic()
        deadline = start + self.cfg.ttl if self.cfg.ttl > 0 else None
        next_cycle = start
        next_snapshot = start
        next_log = start + self.cfg.stats_interval
        self.log.info("starting", web_host=self.cfg.web_host, request_rate=self.cfg.request_rate,
                      ttl=self.cfg.ttl, stats_file=str(self.stats_path or ""))
        while not self.stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.log.info("ttl_reached", ttl=self.cfg.ttl)
                break
            if now >= next_snapshot:
                self.stats.snapshot()
                self.write_stats()
                next_snapshot += 1.0
            if now >= next_log:
                self.log.info("stats", **self.stats.log_fields())
                next_log += self.cfg.stats_interval
            if now >= next_cycle:
                self.cycle()
                # A fixed schedule, not sleep-after-work, so the rate holds; after a stall (slow web)
                # it resumes from now instead of bursting to catch up.
                next_cycle = max(next_cycle + period, time.monotonic() - period)
                continue
            self.stop.wait(min(next_cycle, next_snapshot) - now)
        self.client.close()
        self.stats.snapshot()
        self.write_stats()
        self.log.info("stopped", **self.stats.log_fields())

    def write_stats(self) -> None:
        if self.stats_path is None:
            return
        # Write then rename, so a reader never sees half a file.
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.stats.summary(), indent=1) + "\n")
            os.replace(tmp, self.stats_path)
        except OSError as exc:
            if not self.stats_write_failed:  # once, not every second
                self.log.warning("stats_write_failed", path=str(self.stats_path), error=repr(exc))
            self.stats_write_failed = True


def main() -> int:
    try:
        cfg = VoteBotConfig.from_env(os.environ)
    except ConfigError as exc:
        print(f"vote-bot: {exc}", file=sys.stderr)
        return 2
    bot = VoteBot(cfg, Logger("vote-bot", cfg.log_level))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: bot.stop.set())
    bot.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
