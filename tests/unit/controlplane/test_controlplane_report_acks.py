"""The controller's side of increment reports: acknowledged, filed in their own second, once per seq."""

from __future__ import annotations

import asyncio
import time

from controller_testkit import Stream, settle
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import PEER_LABELS
from nodemesh.controlplane.aggregate import Aggregator
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import AgentSession, Controller
from nodemesh.controlplane.deltas import AgentCounters

KEY = ("inbound", "ns", "deployment", "web", "web-1", "ns", "deployment", "api", "api-1", "", "api:80", "http1")
LABELS = dict(zip(PEER_LABELS, KEY))


def increments(seq: int, time_ms: int, ok: float, *, replayed: bool = False, gauge: float | None = None,
               agent_id: str = "node-1/7/1") -> pb.MetricsReport:
    series = [pb.Series(name="response_total", labels={**LABELS, "classification": "success"}, value=ok)]
    if gauge is not None:
        series.append(pb.Series(name="tcp_open_connections", labels=LABELS, value=gauge))
    return pb.MetricsReport(agent_id=agent_id, seq=seq, time_ms=time_ms, increments=True, replayed=replayed,
                            series=series)


def test_counters_take_each_seq_once_and_count_gaps() -> None:
    c = AgentCounters("a", first_report_is_baseline=True)  # baseline is for cumulative reports only
    first = c.ingest_increments(increments(1, 1000, 5).series, 1)
    assert first is not None and [d.value for d in first] == [5]
    assert c.ingest_increments(increments(1, 1000, 5).series, 1) is None      # the same seq again
    assert c.ingest_increments(increments(2, 2000, 5).series, 2) is not None
    assert c.ingest_increments(increments(5, 5000, 5).series, 5) is not None  # 3 and 4 never came
    assert (c.stored_seq, c.duplicates, c.gaps) == (5, 1, 2)
    bad = pb.Series(name="response_total", labels=LABELS, value=float("nan"))
    assert c.ingest_increments([bad, *increments(6, 6000, 2, gauge=3).series], 6) is not None
    assert c.rejected == 1


def test_aggregator_files_a_late_second_in_its_place() -> None:
    agg = Aggregator(clock=lambda: 1000.0)
    for t in (990, 995, 999):
        agg.record(KEY, t=t, success=1)
    agg.record(KEY, t=992, success=10)   # replayed history, older than what is there
    agg.record(KEY, t=985, success=100)  # older than everything
    agg.record(KEY, t=995, success=5)    # a second that has a bucket
    assert agg.seconds_of(KEY) == [985, 990, 992, 995, 999]
    assert agg.totals(10, now=1000).success == 1 + 10 + 1 + 5 + 1
    assert agg.totals(8, now=1000).success == 10 + 6 + 1    # [992, 1000)
    assert agg.totals(20, now=1000).success == 118


def test_report_time_is_the_agents_second_corrected_for_a_bad_clock_and_never_ahead() -> None:
    s = AgentSession(agent_id="a", node="n", version="", start_time_ms=0)
    r = increments(1, 1_000_000_500, 1)
    assert Controller.report_time(s, r, now=1_000_010.0) == 1_000_000.5
    s.clock_skew_ms = 300   # small: NTP-grade noise, not corrected
    assert Controller.report_time(s, r, now=1_000_010.0) == 1_000_000.5
    s.clock_skew_ms = 5000  # the agent's clock is 5 s ahead
    assert Controller.report_time(s, r, now=1_000_010.0) == 999_995.5
    s.clock_skew_ms = 0
    assert Controller.report_time(s, r, now=999_990.0) == 999_990.0  # never in our future


def test_serve_agent_acknowledges_dedupes_and_files_history_in_place() -> None:
    async def main() -> None:
        c = Controller(ControllerConfig())
        now = time.time()
        t0 = int(now) - 120  # two minutes of history, replayed
        a = Stream(c)
        await settle()
        assert a.received[0].HasField("report_ack") and a.acks() == [0]   # first: what we hold (nothing)
        assert a.received[0].report_ack.controller_epoch == c.identity.epoch
        for seq in range(1, 4):
            a.send(increments(seq, (t0 + seq * 10) * 1000, 10 * seq, replayed=True))
        await settle()
        assert a.acks()[-1] == 3
        a.send(increments(2, (t0 + 20) * 1000, 20, replayed=True))  # a resend the ack crossed
        a.send(increments(4, int(now * 1000), 1, gauge=2))           # live, with its gauge
        await settle()
        agg = c.aggregator
        assert agg.totals(600, now=now + 2).success == 10 + 20 + 30 + 1
        assert agg.totals(1, now=t0 + 21).success == 20                # in its own second
        assert agg.totals(5, now=now + 2).open_connections == 2
        assert c.metrics.reports_duplicate._value.get() == 1 and c.metrics.reports_replayed._value.get() == 3
        await a.close()

        # The same controller, a new stream of the same process: it is told where to resume.
        b = Stream(c)
        await settle()
        assert b.acks() == [4]
        await b.close()
        # A restarted controller knows nothing: seq 0, everything the agent still holds.
        fresh = Controller(ControllerConfig())
        d = Stream(fresh)
        await settle()
        assert d.acks() == [0] and d.received[0].report_ack.controller_epoch != c.identity.epoch
        await d.close()

    asyncio.run(main())


def test_cumulative_reports_of_an_older_agent_still_count() -> None:
    async def main() -> None:
        c = Controller(ControllerConfig())
        a = Stream(c)
        await settle()
        for seq, total in ((1, 5), (2, 9)):
            a.send(pb.MetricsReport(agent_id="node-1/7/1", seq=seq, time_ms=0, series=[
                pb.Series(name="response_total", labels={**LABELS, "classification": "success"}, value=total)]))
        await settle()
        # start_time_ms=1: the agent is older than this controller, so its first report is a baseline.
        assert c.aggregator.totals(60, now=time.time() + 2).success == 4
        await a.close()

    asyncio.run(main())
