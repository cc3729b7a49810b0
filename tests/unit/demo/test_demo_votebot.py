"""vote-bot: what it chooses, and how it counts what it saw."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from nodemesh.demo.emojivoto import emojis, votebot
from nodemesh.demo.emojivoto.runtime import ConfigError, Logger

SHORTCODES = [code for code, _ in emojis.EMOJI]


def test_doughnut_is_chosen_fifteen_percent_of_the_time_plus_its_random_share() -> None:
    rng = random.Random(42)
    n = 40_000
    picks = Counter(votebot.choose(rng, SHORTCODES) for _ in range(n))
    # 15 % on purpose, plus 1/99 of the other 85 % when the random pick lands on it.
    expected = 0.15 + 0.85 / len(SHORTCODES)
    assert abs(picks[emojis.DOUGHNUT] / n - expected) < 0.01
    assert set(picks) <= set(SHORTCODES)
    # The rest spreads over the whole list.
    others = [picks[c] for c in SHORTCODES if c != emojis.DOUGHNUT]
    assert len(others) == 98 and min(others) > 0
    assert abs(sum(others) / 98 - n * 0.85 / 99) < 30


def test_choice_is_reproducible_with_a_seed() -> None:
    a = [votebot.choose(random.Random(3), SHORTCODES) for _ in range(5)]
    b = [votebot.choose(random.Random(3), SHORTCODES) for _ in range(5)]
    assert a == b


def test_stats_count_by_endpoint_vote_kind_and_status() -> None:
    clock = iter(range(100, 200)).__next__
    stats = votebot.Stats(clock=lambda: float(clock()))
    stats.record_list(200)
    stats.record_vote(":joy:", 200)
    stats.snapshot()
    stats.record_list(200)
    stats.record_vote(emojis.DOUGHNUT, 500)
    stats.record_list(None)  # no response at all
    stats.record_vote(":taco:", 400)  # a client error is not the server failing
    stats.snapshot()
    summary = stats.summary()
    assert summary["total"]["requests"] == 6
    assert summary["total"]["failure"] == 2
    assert summary["endpoints"]["/api/list"] == {
        "requests": 3, "success": 2, "failure": 1, "success_rate": pytest.approx(2 / 3),
        "statuses": {"200": 2, "error": 1}}
    assert summary["endpoints"]["/api/vote"]["statuses"] == {"200": 1, "400": 1, "500": 1}
    assert summary["votes"]["doughnut"] == {"requests": 1, "success": 0, "failure": 1, "success_rate": 0.0,
                                            "statuses": {"500": 1}}
    assert summary["votes"]["other"]["success"] == 2
    json.dumps(summary)  # it is what the stats file holds

    # The window between the two snapshots holds only the second batch.
    first, second = summary["history"][0]["t"], summary["history"][1]["t"]
    assert votebot.window(summary, since=first) == {
        "total": (4, 2), "/api/list": (2, 1), "/api/vote": (2, 1), "doughnut": (1, 1), "other": (1, 0)}
    assert votebot.window(summary, since=0, until=first)["total"] == (2, 0)
    assert votebot.window(summary, since=0)["total"] == (6, 2)
    assert second > first


def test_history_is_bounded() -> None:
    stats = votebot.Stats()
    for _ in range(votebot.HISTORY_LENGTH + 50):
        stats.snapshot()
    assert len(stats.history) == votebot.HISTORY_LENGTH


def test_config_from_env() -> None:
    cfg = votebot.VoteBotConfig.from_env({})
    assert (cfg.web_host, cfg.request_rate, cfg.ttl, cfg.stats_file) == ("web-svc.emojivoto:80", 1.0, 0.0, "")
    cfg = votebot.VoteBotConfig.from_env({
        "WEB_HOST": "127.0.0.1:8080", "REQUEST_RATE": "2.5", "TTL": "30", "MAX_CONNECTION_AGE": "5s",
        "VOTEBOT_STATS_FILE": "/x/{hostname}.json", "HOSTNAME": "vote-bot-abc", "VOTEBOT_SEED": "9"})
    assert (cfg.web_host, cfg.request_rate, cfg.ttl, cfg.max_connection_age, cfg.seed) == (
        "127.0.0.1:8080", 2.5, 30.0, 5.0, 9)
    assert cfg.stats_path() == Path("/x/vote-bot-abc.json")
    for bad in ({"REQUEST_RATE": "0"}, {"REQUEST_RATE": "fast"}, {"TTL": "later"}):
        with pytest.raises(ConfigError):
            votebot.VoteBotConfig.from_env(bad)


class ScriptedClient:
    """Stands in for web to drive one cycle without a server: records the paths asked for."""

    def __init__(self, vote_status: int) -> None:
        self.paths: list[str] = []
        self.vote_status = vote_status

    def get(self, path: str) -> tuple[int, bytes]:
        self.paths.append(path)
        if path == votebot.LIST_PATH:
            return 200, json.dumps([{"shortcode": ":joy:", "unicode": "x"}]).encode()
        return self.vote_status, b""

    def close(self) -> None:
        pass


def test_cycle_lists_then_votes_and_writes_stats(tmp_path: Path) -> None:
    cfg = votebot.VoteBotConfig(web_host="unused:1", stats_file=str(tmp_path / "stats.json"), seed=1)
    client = ScriptedClient(vote_status=200)
    bot = votebot.VoteBot(cfg, Logger("test", stream=io.StringIO()), client=client)  # type: ignore[arg-type]
    for _ in range(50):
        bot.cycle()
    assert client.paths[0::2] == [votebot.LIST_PATH] * 50
    votes = client.paths[1::2]
    assert set(votes) == {"/api/vote?choice=:joy:", "/api/vote?choice=:doughnut:"}
    bot.stats.snapshot()
    bot.write_stats()
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written["cycles"] == 50
    assert written["endpoints"]["/api/vote"]["requests"] == 50
    assert written["votes"]["doughnut"]["requests"] == votes.count("/api/vote?choice=:doughnut:")


def test_wait_for_web_returns_once_web_accepts_and_gives_up_after_the_limit() -> None:
    import socket
    import time

    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        up = votebot.VoteBot(votebot.VoteBotConfig(web_host=f"127.0.0.1:{port}", wait_for_web=5.0),
                             Logger("test", stream=io.StringIO()))
        assert up.wait_for_web() is True
    finally:
        listener.close()
    # Port 1 on loopback: refused at once, every time.
    out = io.StringIO()
    down = votebot.VoteBot(votebot.VoteBotConfig(web_host="127.0.0.1:1", wait_for_web=0.5), Logger("test", stream=out))
    started = time.monotonic()
    assert down.wait_for_web() is False
    assert 0.4 < time.monotonic() - started < 3.0
    assert "event=waiting_for_web" in out.getvalue() and "event=web_not_reachable" in out.getvalue()
