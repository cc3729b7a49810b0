"""`stat`'s rows computed as arrays over the grouped sums (`Aggregator.group_sums`,
`histogram_quantiles`, stat.py's `_rows_of_sums`) equal the per-row computation they replace
(a `Totals` per row, `histogram_quantile` per quantile, `_row`) value for value, on random data
with the corner cases: rows without any series, with only TCP, with requests but no responses,
with observations only in the +Inf bucket, and quantiles landing in the first bucket; and stat
and edges over the in-memory store answer what they answer over a store of Totals per key."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import numpy as np
import pytest
from controller_feed import NS, PODS, peer, series_for
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import PEER_LABELS, WorkloadRef
from nodemesh.controlplane.aggregate import (
    BOUNDS,
    N_LATENCY,
    Aggregator,
    SeriesKey,
    Totals,
    histogram_quantile,
    histogram_quantiles,
)
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.dashboard import views
from nodemesh.controlplane.registry import PodRecord, ResourceInfo
from nodemesh.controlplane.stat import (
    DEFAULT_WINDOW_S,
    QUANTILES,
    MeshView,
    _pod_counts,
    _row,
    _row_id,
    _row_id_of,
    _rows_of_sums,
    edges,
    stat_summary,
    warm,
)

QS = (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 1.0)


def _histogram(rng: random.Random) -> list[float]:
    shape = rng.choice(("empty", "inf", "first", "one", "spread", "quarters", "tail"))
    counts = [0.0] * N_LATENCY
    if shape == "inf":
        counts[-1] = float(rng.randint(1, 5))
    elif shape == "first":
        counts[0] = float(rng.randint(1, 1000))
        counts[rng.randrange(N_LATENCY)] += float(rng.randint(0, 1))
    elif shape == "one":
        counts[rng.randrange(N_LATENCY)] = float(rng.randint(1, 9))
    elif shape == "spread":
        counts = [float(rng.choice((0, 0, 1, 3, 70))) for _ in range(N_LATENCY)]
    elif shape == "quarters":   # fractional counts exact in binary: sums are exact in any order
        counts = [rng.randint(0, 12) / 4 for _ in range(N_LATENCY)]
    elif shape == "tail":
        counts[-2], counts[-1] = float(rng.randint(0, 3)), float(rng.randint(0, 3))
    return counts


def test_histogram_quantiles_equal_histogram_quantile() -> None:
    rng = random.Random(7)
    rows = [_histogram(rng) for _ in range(3000)]
    rows.append([0.0] * N_LATENCY)
    got = histogram_quantiles(QS, BOUNDS, np.array(rows))
    assert got.shape == (len(QS), len(rows))
    for k, q in enumerate(QS):
        for j, counts in enumerate(rows):
            want = histogram_quantile(q, BOUNDS, counts)
            value = got[k, j]
            if want is None:
                assert math.isnan(value), (q, counts)
            else:
                assert value == want, (q, counts, value, want)   # exactly, not approximately
    assert histogram_quantiles(QS, BOUNDS, np.zeros((0, N_LATENCY))).shape == (len(QS), 0)
    with pytest.raises(ValueError):
        histogram_quantiles(QS, BOUNDS, np.zeros((2, N_LATENCY - 1)))


def _key(**labels: str) -> SeriesKey:
    return tuple(labels.get(name, "") for name in PEER_LABELS)


def _pod(ns: str, name: str, node: str, running: bool = True) -> PodRecord:
    phase = "Running" if running else "Succeeded"
    return PodRecord(namespace=ns, name=name, ip="", node=node, phase=phase, status=phase, ready=True,
                     host_network=False, labels={}, workload=WorkloadRef(ns, "deployment", name.rpartition("-")[0]),
                     replicaset="", container_ports={})


@pytest.mark.parametrize("seed", range(4))
def test_rows_of_sums_equal_rows_of_totals(seed: int) -> None:
    rng = random.Random(seed)
    now = 10_000.0
    agg = Aggregator(retention_s=600, clock=lambda: now)
    deploys = [(f"ns{i % 3}", f"d{i}") for i in range(40)]
    resources = [ResourceInfo(ns, "deployment", name, {},
                              [_pod(ns, f"{name}-{p}", f"node-{p % 3}", running=p != 2) for p in range(rng.randint(0, 4))])
                 for ns, name in deploys]
    resources.append(ResourceInfo("ns0", "deployment", "never-seen", {}, []))   # no series at all
    for step in range(120):
        t = now - rng.randint(1, 70)
        ns, name = rng.choice(deploys[:32])   # d32.. only TCP or only requests
        key = _key(direction=rng.choice(("inbound", "inbound", "outbound")), dst_namespace=ns,
                   dst_kind="deployment", dst_name=name, dst_pod=f"{name}-{step % 3}",
                   src_namespace="ns0", src_kind="deployment", src_name=rng.choice(("d0", "d1")))
        latency = _histogram(rng)
        agg.record(key, t=t, success=float(rng.randint(0, 30)), failure=float(rng.choice((0, 0, 1, 5))),
                   requests=float(rng.randint(0, 30)), latency=latency, latency_sum=rng.random() * 100,
                   read_bytes=float(rng.choice((0, 10, 3000))), write_bytes=float(rng.choice((0, 7))))
    for ns, name in deploys[32:36]:    # only TCP: bytes, an open, a held gauge
        key = _key(direction="inbound", dst_namespace=ns, dst_kind="deployment", dst_name=name)
        agg.record(key, t=now - 5, tcp_open=1.0, read_bytes=float(rng.randint(0, 50)))
        agg.set_gauge(key, "agent-a", float(rng.randint(0, 3)), t=math.inf)
    for ns, name in deploys[36:38]:    # requests, no responses yet
        agg.record(_key(direction="inbound", dst_namespace=ns, dst_kind="deployment", dst_name=name),
                   t=now - 3, requests=4.0)
    ns, name = deploys[38]             # a timed gauge (an older agent) on a key without records
    agg.set_gauge(_key(direction="inbound", dst_namespace=ns, dst_kind="deployment", dst_name=name), "agent-b",
                  2.0, t=now - 1)
    mesh = MeshView(ready_nodes={"node-0", "node-1"}, captured_namespaces={"ns0", "ns1"})
    row_id = _row_id_of("deployment", "dst")
    assert row_id is not None
    for window in (10, 60):
        for direction, only_active in (("inbound", False), ("outbound", True)):
            def group(k: SeriesKey, rid=row_id, d=direction) -> object:   # type: ignore[no-untyped-def]
                return rid(k) if k[0] == d else None

            got = pb.StatResponse().rows
            _rows_of_sums("deployment", resources, agg.group_sums(window, now, group, token=(direction,)),
                          lambda r: _pod_counts(r, mesh), only_active, got)
            by_row = agg.totals_by_group(window, now, group)
            want = []
            for r in resources:
                totals = by_row.get(_row_id("deployment", r), Totals(window))
                if only_active and not totals.has_traffic and not totals.has_tcp:
                    continue
                want.append(_row(r, "deployment", totals, mesh))
            assert [pb.StatRow.SerializeToString(x, deterministic=True) for x in got] == \
                [pb.StatRow.SerializeToString(x, deterministic=True) for x in want]
            assert len(got) == (len(resources) if not only_active else len(want))
            if not only_active:
                assert any(x.has_traffic for x in got) and any(x.has_tcp and not x.has_traffic for x in got)
                assert any(x.latency_ms_p99 == BOUNDS[-1] for x in got) or window == 10
    assert QUANTILES == (0.5, 0.95, 0.99)


class _KeyStore:
    """The aggregator behind the `SeriesStore` protocol alone: stat and edges take their path of a
    Totals per key (as over a Prometheus snapshot), the reference the array path must equal."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg

    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]:
        return self.agg.totals_by_key(window_s, now, where)


def test_stat_and_edges_equal_the_totals_per_key_path(controller: Controller) -> None:
    c = controller
    now = time.time() + 1
    extra = series_for(peer("outbound", "vote-bot", "emoji", "emoji-svc"), 7, 1, 3.0)
    c.ingest_report(c.sessions["agent-1"], pb.MetricsReport(agent_id="agent-1", seq=2, series=extra), now=now - 3)
    mesh = c.mesh_view()
    ref = _KeyStore(c.aggregator)
    peers = [None, ("from", "deploy", "web"), ("to", "deploy", "emoji"), ("to", "svc", "voting-svc"),
             ("from", "ns", NS), ("to", "po", PODS["emoji"]), ("from", "svc", "web-svc"), ("from", "deploy", ""),
             ("to", "deploy", "nothing-here")]
    for type_ in ("deploy", "po", "svc", "ns", "rs", "all"):
        for all_ns in (False, True):
            for side in peers:
                req = pb.StatRequest(selector=pb.Resource(namespace=NS, type=type_), window_seconds=60,
                                     all_namespaces=all_ns)
                if side is not None:
                    getattr(req, side[0]).CopyFrom(pb.Resource(namespace=NS, type=side[1], name=side[2]))
                got = stat_summary(c.registry, c.aggregator, mesh, req, now)
                want = stat_summary(c.registry, ref, mesh, req, now)
                assert got == want, (type_, all_ns, side)
    assert any(r.has_traffic for r in stat_summary(c.registry, c.aggregator, mesh, pb.StatRequest(
        selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60), now).rows)
    for type_ in ("deploy", "po", "ns", "rs", "all"):
        for all_ns in (False, True):
            for name in ("", "web"):
                req = pb.EdgesRequest(selector=pb.Resource(namespace=NS, type=type_, name=name), window_seconds=60,
                                      all_namespaces=all_ns)
                got_edges = edges(c.registry, c.aggregator, req, now)
                assert got_edges == edges(c.registry, ref, req, now), (type_, all_ns, name)
    assert len(edges(c.registry, c.aggregator, pb.EdgesRequest(selector=pb.Resource(type="deploy"),
                                                               all_namespaces=True), now).edges) >= 3


def test_dashboard_time_series_equal_the_totals_per_key_path(controller: Controller) -> None:
    c = controller
    now = time.time() + 1
    me = pb.Resource(namespace=NS, type="deployment", name="emoji")
    got = views.time_series(c, me, 10, range_s=120, now=now)
    end = int(now)
    ref = _KeyStore(c.aggregator)
    want = views.time_series(c, me, 10, range_s=120, now=now, steps=[(end - i * 10, ref) for i in range(11, -1, -1)])
    assert got == want
    points = got["points"]
    assert isinstance(points, list) and any(p["rps"] for p in points) and any(p["rps"] is None for p in points)


def test_totals_of_equals_merged_key_totals() -> None:
    rng = random.Random(5)
    now = 5_000.0
    agg = Aggregator(retention_s=300, clock=lambda: now, downsample_after_s=60)
    keys = [_key(direction="inbound", dst_namespace="ns", dst_name=f"d{k % 5}", dst_pod=f"p{k}") for k in range(30)]
    for _ in range(400):
        agg.record(rng.choice(keys), t=now - rng.randint(1, 250), success=float(rng.randint(0, 5)),
                   failure=float(rng.randint(0, 1)), latency=_histogram(rng), read_bytes=float(rng.randint(0, 9)))
    agg.set_gauge(keys[0], "a", 3.0, t=math.inf)
    agg.set_gauge(keys[1], "b", 2.0, t=now - 2)
    agg.prune(now=now)
    chosen = set(keys[:12])
    for window, at in ((10, now), (60, now), (120, now - 30), (240, now)):
        want = Totals(window)
        for t in agg.totals_by_key(window, at, chosen.__contains__).values():
            want.merge(t)
        got = agg.totals_of(window, at, chosen)
        assert (got.success, got.failure, got.read_bytes, got.latency, got.open_connections, got.has_gauge) == \
            (want.success, want.failure, want.read_bytes, want.latency, want.open_connections, want.has_gauge)
        assert got.latency_sum == pytest.approx(want.latency_sum)
    assert agg.totals_of(60, now, chosen).has_traffic and agg.totals_of(60, now, set()).responses == 0


def test_warm_keeps_the_default_window_and_groupings_ready_and_changes_no_answer(controller: Controller) -> None:
    """`stat.warm` (the controller's each second): the default window kept and slid, the common
    groupings and every grouping a query made brought up to the ids there are, the seconds still
    pending left pending; and stat answers what the per-key path answers, before and after new
    series arrive."""
    c = controller
    agg = c.aggregator
    now = time.time() + 1
    warm(agg, now)
    assert DEFAULT_WINDOW_S in agg._windows
    assert {("direction",), ("row", "deployment", "dst"), ("row", "pod", "dst")} <= set(agg._groupings)
    # A query's own grouping (a --to peer's) is kept up too, from then on.
    req_to = pb.StatRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60)
    req_to.to.CopyFrom(pb.Resource(namespace=NS, type="deploy", name="emoji"))
    stat_summary(c.registry, agg, c.mesh_view(), req_to, now)
    tokens = set(agg._groupings)
    extra = series_for(peer("inbound", "vote-bot", "emoji", "emoji-svc"), 7, 1, 3.0)
    extra += series_for(peer("outbound", "web", "vote-bot", "vote-bot-svc"), 3, 0, 1.0)
    c.ingest_report(c.sessions["agent-1"], pb.MetricsReport(agent_id="agent-1", seq=2, series=extra), now=now)
    pending = set(agg._pending)
    assert pending   # the report's second, not frozen yet
    warm(agg, now + 0.5)
    assert set(agg._pending) == pending   # warming freezes nothing
    assert set(agg._groupings) == tokens
    assert all(cached[4] == len(agg._keys) for cached in agg._groupings.values())
    ref = _KeyStore(agg)
    for at in (now + 0.5, now + 2):
        for req in (pb.StatRequest(selector=pb.Resource(namespace=NS, type="deploy"), window_seconds=60),
                    pb.StatRequest(selector=pb.Resource(type="po"), all_namespaces=True),
                    pb.StatRequest(selector=pb.Resource(type="ns"), window_seconds=60), req_to):
            got = stat_summary(c.registry, agg, c.mesh_view(), req, at)
            assert got == stat_summary(c.registry, ref, c.mesh_view(), req, at), (req, at)
    assert any(r.has_traffic for r in stat_summary(c.registry, agg, c.mesh_view(), pb.StatRequest(
        selector=pb.Resource(namespace=NS, type="deploy")), now + 2).rows)
