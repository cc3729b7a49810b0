"""emojivoto as real processes on 127.0.0.1: vote-bot -> web -> emoji-svc / voting-svc.

The three services and vote-bot run exactly as the manifests start them (`python3 -m ...`, config in
env), on ephemeral loopback ports. No root needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from nodemesh.demo.emojivoto.gen import Voting_pb2, Voting_pb2_grpc

LISTENING = re.compile(r"event=listening .*?\bport=(\d+)")


class Proc:
    """A program of the app, its stdout collected, its listening port read from its first log line."""

    def __init__(self, module: str, env: dict[str, str]) -> None:
        self.module = module
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", f"nodemesh.demo.emojivoto.{module}"], env={**os.environ, **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port_found = threading.Event()
        self.port = 0
        self.ready_after = 0.0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and not self.port_found.is_set():
                self.port = int(match.group(1))
                self.ready_after = time.monotonic() - self.started
                self.port_found.set()

    def wait_listening(self, timeout: float = 15.0) -> int:
        if not self.port_found.wait(timeout):
            raise AssertionError(f"{self.module} did not start:\n" + "\n".join(self.lines))
        return self.port

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"{self.module} ignored SIGTERM") from None


class Forwarder:
    """A loopback TCP relay that counts the connections it carries (to see clients reconnect)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def start() -> asyncio.Server:
            return await asyncio.start_server(handle, "127.0.0.1", 0)

        self.server = self.loop.run_until_complete(start())
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        self.thread.join(10)


BASE_ENV = {"BIND_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()


def start_services(procs: list[Proc], server_env: dict[str, str] | None = None,
                   voting_via: Forwarder | None = None) -> tuple[Proc, Proc, Proc]:
    extra = {**BASE_ENV, "GRPC_PORT": "0", **(server_env or {})}
    emoji = Proc("emoji", extra)
    voting = Proc("voting", {**extra, "FAILURE_RATE": "1.0"})
    procs += [emoji, voting]
    emoji_port, voting_port = emoji.wait_listening(), voting.wait_listening()
    if voting_via is not None:
        voting_via.target_port = voting_port
        voting_port = voting_via.port
    web = Proc("web", {**BASE_ENV, "WEB_PORT": "0", "EMOJISVC_HOST": f"127.0.0.1:{emoji_port}",
                       "VOTINGSVC_HOST": f"127.0.0.1:{voting_port}"})
    procs.append(web)
    web.wait_listening()
    return emoji, voting, web


def run_votebot(procs: list[Proc], web_port: int, stats: Path, extra: dict[str, str] | None = None) -> Proc:
    bot = Proc("votebot", {**BASE_ENV, "WEB_HOST": f"127.0.0.1:{web_port}", "REQUEST_RATE": "40", "TTL": "4",
                           "VOTEBOT_STATS_FILE": str(stats), "STATS_INTERVAL": "1s", **(extra or {})})
    procs.append(bot)
    assert bot.popen.wait(30) == 0, "\n".join(bot.lines)
    return bot


def test_votebot_against_web_counts_add_up_and_only_doughnut_fails(procs: list[Proc], tmp_path: Path) -> None:
    emoji, voting, web = start_services(procs)
    for proc in (emoji, voting, web):
        # The demo must reach its end in < 30 s on 2 busy cores: each program starts in a few seconds.
        assert proc.ready_after < 5.0, (proc.module, proc.ready_after)

    stats_file = tmp_path / "votebot.json"
    bot = run_votebot(procs, web.port, stats_file)
    stats = json.loads(stats_file.read_text())

    cycles = stats["cycles"]
    assert 100 <= cycles <= 170, cycles  # 40/s for 4 s, on a shared machine
    lists, votes = stats["endpoints"]["/api/list"], stats["endpoints"]["/api/vote"]
    doughnut, other = stats["votes"]["doughnut"], stats["votes"]["other"]
    assert lists == {"requests": cycles, "success": cycles, "failure": 0, "success_rate": 1.0,
                     "statuses": {"200": cycles}}
    assert votes["requests"] == cycles == doughnut["requests"] + other["requests"]
    assert doughnut["requests"] > 0 and doughnut["statuses"] == {"500": doughnut["requests"]}
    assert other["statuses"] == {"200": other["requests"]}
    assert stats["total"]["requests"] == 2 * cycles
    assert stats["total"]["failure"] == doughnut["requests"]
    assert any("event=stats" in line for line in bot.lines)  # the periodic key=value line
    assert any("event=stopped" in line and f"cycles={cycles}" in line for line in bot.lines)

    with urllib.request.urlopen(f"http://127.0.0.1:{web.port}/api/leaderboard", timeout=10) as response:
        board = json.loads(response.read())
    assert sum(int(row["votes"]) for row in board) == other["success"]
    assert ":doughnut:" not in {row["shortcode"] for row in board}
    assert [int(r["votes"]) for r in board] == sorted((int(r["votes"]) for r in board), reverse=True)

    # A plain grpcio client, as any other emojivoto component would call it.
    with grpc.insecure_channel(f"127.0.0.1:{voting.port}") as channel:
        stub = Voting_pb2_grpc.VotingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.VoteDoughnut(Voting_pb2.VoteRequest(), timeout=5)
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        assert failed.value.details() == "ERROR"
        stub.VotePizza(Voting_pb2.VoteRequest(), timeout=5)

    for proc in (web, voting, emoji):
        assert proc.stop() == 0, "\n".join(proc.lines)
        assert any("event=stopped" in line for line in proc.lines), proc.module


def test_connection_recycling_loses_no_request(procs: list[Proc], tmp_path: Path) -> None:
    # MAX_CONNECTION_AGE is what lets a mesh installed mid-run capture web's gRPC connections; it must
    # cost nothing: no failure beyond the designed doughnut ones, on either hop.
    relay = Forwarder(target_port=0)
    try:
        _, _, web = start_services(procs, server_env={"MAX_CONNECTION_AGE": "500ms"}, voting_via=relay)
        stats_file = tmp_path / "votebot.json"
        run_votebot(procs, web.port, stats_file, extra={"MAX_CONNECTION_AGE": "500ms"})
        stats = json.loads(stats_file.read_text())
        assert stats["endpoints"]["/api/list"]["failure"] == 0
        assert stats["votes"]["other"]["failure"] == 0
        assert stats["votes"]["other"]["requests"] > 50
        assert stats["total"]["failure"] == stats["votes"]["doughnut"]["requests"]
        # web really reopened its voting connection several times in those 4 s.
        assert relay.connections >= 4, relay.connections
    finally:
        relay.close()


def test_votebot_stops_cleanly_on_sigterm_and_counts_failures_when_web_is_down(
        procs: list[Proc], tmp_path: Path) -> None:
    # Port 1 on loopback: nobody listens, every connection is refused at once.
    stats_file = tmp_path / "votebot.json"
    bot = Proc("votebot", {**BASE_ENV, "WEB_HOST": "127.0.0.1:1", "REQUEST_RATE": "20",
                           "VOTEBOT_STATS_FILE": str(stats_file), "WAIT_FOR_WEB": "0"})
    procs.append(bot)
    deadline = time.monotonic() + 10
    while not stats_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    assert bot.stop() == 0
    stats = json.loads(stats_file.read_text())
    lists = stats["endpoints"]["/api/list"]
    assert lists["requests"] == stats["cycles"] > 5
    assert lists["failure"] == lists["requests"] and lists["statuses"] == {"error": lists["requests"]}
    assert stats["endpoints"]["/api/vote"]["requests"] == 0  # no list, no vote (as upstream)
