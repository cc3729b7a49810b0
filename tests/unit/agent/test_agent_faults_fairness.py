"""Per-pod CPU fairness (agent/fairness.py): limits and budgets from the tick, and on the relay (loopback, no
root) a throttled source's connections paused and its new ones held while another source's run."""

from __future__ import annotations

import asyncio
import socket

from loopback_relay import echo_server, run, start, wait_until
from nodemesh.agent.admission import Admission
from nodemesh.agent.fairness import (
    CONNECTION_WORK,
    DECREASE,
    ENGAGED_TICKS,
    INCREASE,
    MIN_SHARE,
    TICK_S,
    UNLIMITED,
    Fairness,
)
from nodemesh.agent.housekeeping import Housekeeping


def _spend(f: Fairness, **work: int) -> None:
    for source, units in work.items():
        f.load_for(source).work += units


def test_no_limit_until_contended_then_max_min_budgets() -> None:
    f = Fairness(TICK_S)
    _spend(f, a=1000, b=20)
    f.tick(lag_s=0.001, cpu_s=0.03)   # on time, 30 % of a CPU: nobody is limited
    assert f.limit == UNLIMITED and f.load_for("a").budget == UNLIMITED
    _spend(f, a=1000, b=20)
    f.tick(lag_s=0.05, cpu_s=0.03)    # late: the sources together may do 70 % of what they did
    assert f.engaged == ENGAGED_TICKS and f.limit == 1020 * DECREASE
    a, b = f.load_for("a"), f.load_for("b")
    # max-min: b did little, so a may do what b left; b may always do at least its equal share
    assert a.budget == f.limit - 20 and b.budget == f.limit - f.limit / 2, (a.budget, b.budget)
    assert a.work == 0 and a.last == 1000


def test_a_pod_alone_is_never_limited() -> None:
    f = Fairness(TICK_S)
    _spend(f, a=1000)
    f.tick(lag_s=0.05, cpu_s=0.09)
    assert f.engaged and f.load_for("a").budget == UNLIMITED


def test_the_limit_grows_back_and_is_lifted_after_calm_ticks() -> None:
    f = Fairness(TICK_S)
    _spend(f, a=1000, b=20)
    f.tick(lag_s=0.0, cpu_s=0.09)     # saturated CPU counts as contended too
    limit = f.limit
    _spend(f, a=500, b=20)
    f.tick(lag_s=0.0, cpu_s=0.02)
    assert f.limit == limit * INCREASE
    for _ in range(ENGAGED_TICKS):
        _spend(f, a=500, b=20)
        f.tick(lag_s=0.0, cpu_s=0.02)
    assert f.engaged == 0 and f.limit == UNLIMITED and f.load_for("a").budget == UNLIMITED


def test_the_limit_never_goes_below_the_minimum_share() -> None:
    f = Fairness(TICK_S)
    for _ in range(50):
        _spend(f, a=1, b=1)
        f.tick(lag_s=0.1, cpu_s=0.0)
    assert f.limit == MIN_SHARE * 2 and f.load_for("a").budget >= MIN_SHARE


def test_over_budget_throttles_once_and_the_tick_releases() -> None:
    f = Fairness(TICK_S)
    a = f.load_for("a")
    assert f.over_budget(a) and not f.over_budget(a) and f.throttles == 1
    released = f.tick(lag_s=0.0, cpu_s=0.0)
    assert released == [a] and not a.throttled


def test_idle_sources_are_forgotten_live_ones_kept() -> None:
    f = Fairness(TICK_S)
    conn = object()
    f.opened(f.load_for("live"), conn)
    assert f.load_for("live").work == CONNECTION_WORK
    f.load_for("gone")
    f.tick(0.0, 0.0)
    f.tick(0.0, 0.0)
    assert set(f.loads) == {"live"}
    f.load_for("live").conns.discard(conn)
    f.tick(0.0, 0.0)
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
            assert await wait_until(lambda: aggressor.throttled)
            assert all(c.throttled for c in aggressor.conns)
            aw.write(b"a3\n")
            held_r, held_w = await _open("127.0.0.2", port)
            held_w.write(b"h1\n")
            assert await _echo(br, bw, b"b2\n", 5) == b"b2\n"   # the other source runs
            await asyncio.sleep(0.2)
            assert not ar._buffer and not held_r._buffer      # type: ignore[attr-defined]
            assert len(aggressor.held) == 1 and len(ctx.live) == 2
            housekeeping.fair_tick(0.0, 0.0)
            assert await asyncio.wait_for(ar.readexactly(6), 5) == b"a2\na3\n"
            assert await asyncio.wait_for(held_r.readexactly(3), 5) == b"h1\n"
            assert not aggressor.throttled and len(ctx.live) == 3
            for w in (aw, bw, held_w):
                w.close()
            assert await wait_until(lambda: not ctx.live)
            assert all(not load.conns for load in fairness.loads.values())
        finally:
            server.close()
            up.close()

    run(scenario)
