"""Per-pod CPU fairness (agent/fairness.py): budgets from the tick, and on the relay (loopback, no
root) a throttled source's connections paused and its new ones held while another source's run."""

from __future__ import annotations

import asyncio
import socket

from nodemesh.agent.admission import Admission
from nodemesh.agent.fairness import (
    CONNECTION_COST_S,
    ENGAGED_TICKS,
    TARGET_SHARE,
    TICK_S,
    UNLIMITED,
    Fairness,
)
from nodemesh.agent.housekeeping import Housekeeping
from test_agent_faults_relay import _until, echo_server, run, start


def _spend(f: Fairness, **busy: float) -> None:
    for source, seconds in busy.items():
        f.load_for(source).busy += seconds


def test_budgets_only_while_contended_and_shared() -> None:
    f = Fairness(TICK_S)
    _spend(f, a=0.09)
    f.tick(lag_s=0.1)  # contended, but a alone: no budget
    assert f.engaged == ENGAGED_TICKS and f.load_for("a").budget == UNLIMITED
    _spend(f, a=0.09, b=0.002)
    f.tick(lag_s=0.0)
    a, b = f.load_for("a"), f.load_for("b")
    equal = TICK_S * TARGET_SHARE / 2
    # max-min: b spent little, so a may take what b left of the target; b keeps at least its equal share
    assert abs(a.budget - (TICK_S * TARGET_SHARE - 0.002)) < 1e-9, a.budget
    assert abs(b.budget - (TICK_S * TARGET_SHARE - equal)) < 1e-9 and b.budget >= equal, b.budget
    assert a.busy == 0.0 and a.last == 0.09


def test_not_contended_means_no_budgets_and_contention_wears_off() -> None:
    f = Fairness(TICK_S)
    _spend(f, a=0.01, b=0.01)
    f.tick(lag_s=0.001)  # on time, 20 % busy: nobody is limited
    assert f.engaged == 0 and f.load_for("a").budget == UNLIMITED
    _spend(f, a=0.085, b=0.001)   # saturated: 86 % of the tick accounted
    f.tick(lag_s=0.0)
    assert f.engaged == ENGAGED_TICKS and f.load_for("a").budget < UNLIMITED
    for _ in range(ENGAGED_TICKS):
        _spend(f, a=0.01, b=0.01)
        f.tick(lag_s=0.0)
    assert f.engaged == 0 and f.load_for("a").budget == UNLIMITED


def test_over_budget_throttles_once_and_the_tick_releases() -> None:
    f = Fairness(TICK_S)
    a = f.load_for("a")
    assert f.over_budget(a) and not f.over_budget(a) and f.throttles == 1
    released = f.tick(lag_s=0.0)
    assert released == [a] and not a.throttled


def test_idle_sources_are_forgotten_live_ones_kept() -> None:
    f = Fairness(TICK_S)
    conn = object()
    f.opened(f.load_for("live"), conn)
    assert f.load_for("live").busy == CONNECTION_COST_S
    f.load_for("gone")
    f.tick(0.0)
    f.tick(0.0)
    assert set(f.loads) == {"live"}
    f.load_for("live").conns.discard(conn)
    f.tick(0.0)
    assert f.loads == {}


def _bound(host: str) -> socket.socket:
    s = socket.socket()
    s.bind((host, 0))
    s.setblocking(False)
    return s


async def _open(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = _bound(host)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, timeout: float) -> bytes:
    writer.write(line)
    return await asyncio.wait_for(reader.readexactly(len(line)), timeout)


def test_a_throttled_source_waits_for_the_tick_while_another_runs() -> None:
    """Source 127.0.0.2 spends past its budget: its connection stops being read (both sides) and its new
    connection is held (nothing dialled); 127.0.0.3 is served meanwhile; the next tick lets both of
    127.0.0.2's go on, bytes intact."""
    async def scenario() -> None:
        up = await echo_server()
        admission = Admission(1000)
        server, port, ctx, _rec = await start(up.sockets[0].getsockname()[:2], admission)
        housekeeping = Housekeeping(admission)   # ticked by hand below
        fairness = admission.fairness
        try:
            ar, aw = await _open("127.0.0.2", port)
            br, bw = await _open("127.0.0.3", port)
            assert await _echo(ar, aw, b"a1\n", 5) == b"a1\n"
            assert await _echo(br, bw, b"b1\n", 5) == b"b1\n"
            aggressor = fairness.load_for("127.0.0.2")
            aggressor.budget = 0.0                      # as a contended tick would set it
            aw.write(b"a2\n")   # this read spends past it: throttled, both sides paused (no echo back)
            assert await _until(lambda: aggressor.throttled)
            assert all(c.throttled for c in aggressor.conns)
            aw.write(b"a3\n")
            held_r, held_w = await _open("127.0.0.2", port)
            held_w.write(b"h1\n")
            assert await _echo(br, bw, b"b2\n", 5) == b"b2\n"   # the other source runs
            await asyncio.sleep(0.2)
            assert not ar._buffer and not held_r._buffer      # type: ignore[attr-defined]
            assert len(aggressor.held) == 1 and len(ctx.live) == 2
            housekeeping.fair_tick(0.0)
            assert await asyncio.wait_for(ar.readexactly(6), 5) == b"a2\na3\n"
            assert await asyncio.wait_for(held_r.readexactly(3), 5) == b"h1\n"
            assert not aggressor.throttled and len(ctx.live) == 3
            for w in (aw, bw, held_w):
                w.close()
            assert await _until(lambda: not ctx.live)
            assert all(not load.conns for load in fairness.loads.values())
        finally:
            server.close()
            up.close()

    run(scenario)
