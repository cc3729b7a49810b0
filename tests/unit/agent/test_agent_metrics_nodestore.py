"""The parent's NodeStore: worker increments summed, authority labels capped per workload,
idle series evicted with a new creation stamp when they return (issue 10 item 6, issue 12 item 4)."""

from __future__ import annotations

from nodemesh.agent.metrics import NodeStore, to_series
from nodemesh.api.model import PEER_LABELS, REQUEST_TOTAL, RESPONSE_LATENCY_MS, TCP_OPEN_CONNECTIONS


def key(authority: str = "", src: str = "web", dst: str = "api", protocol: str = "http1") -> tuple[str, ...]:
    labels = {"direction": "outbound", "src_namespace": "ns", "src_kind": "deployment", "src_name": src,
              "src_pod": f"{src}-1", "dst_namespace": "ns", "dst_kind": "deployment", "dst_name": dst,
              "dst_pod": f"{dst}-1", "dst_service": "", "authority": authority, "protocol": protocol}
    return tuple(labels.get(n, "") for n in PEER_LABELS)  # no mTLS: tls, client_id, server_id ""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 5_000_000

    def mono(self) -> float:
        return self.now

    def ms(self) -> int:
        return self.wall


def store(**kw: object) -> tuple[NodeStore, Clock]:
    c = Clock()
    return NodeStore(clock=c.mono, wall_ms=c.ms, **kw), c  # type: ignore[arg-type]


def test_increments_from_workers_add_up() -> None:
    s, _ = store()
    s.add({REQUEST_TOTAL: {key("a"): 2}, RESPONSE_LATENCY_MS: {key("a"): [1, 0, 3.5]}})
    s.add({REQUEST_TOTAL: {key("a"): 3}, RESPONSE_LATENCY_MS: {key("a"): [0, 1, 10.0]}})
    assert s.series[REQUEST_TOTAL] == {key("a"): 5}
    assert s.series[RESPONSE_LATENCY_MS] == {key("a"): [1, 1, 13.5]}


def test_authorities_past_the_cap_fold_into_other_and_nothing_is_lost() -> None:
    s, _ = store(max_authorities=10)
    for i in range(1000):
        s.add({REQUEST_TOTAL: {key(f"h{i}"): 1}})
    s.add({REQUEST_TOTAL: {key("h3"): 1, key("x", src="other-client"): 1}})  # admitted ones stay themselves
    series = s.series[REQUEST_TOTAL]
    mine = {k[PEER_LABELS.index("authority")] for k in series if k[3] == "web"}
    assert len(mine) == 11 and "[other]" in mine and "h3" in mine
    assert sum(series.values()) == 1002
    assert series[key("[other]")] == 990
    assert s.series["nodemesh_label_overflow_total"] == {("authority",): 990}
    assert key("x", src="other-client") in series, "the cap is per workload"


def test_idle_series_are_evicted_and_come_back_as_a_new_incarnation() -> None:
    s, c = store(idle_s=60)
    s.add({REQUEST_TOTAL: {key("a"): 4, key("b"): 1}, TCP_OPEN_CONNECTIONS: {key(): 1}})
    created = s.created_ms(REQUEST_TOTAL, key("a"))
    c.now += 30
    s.add({REQUEST_TOTAL: {key("b"): 1}})
    c.now += 31
    assert s.evict() == 1  # a: idle 61 s; b: touched 31 s ago; the open connection's gauge stays
    assert key("a") not in s.series[REQUEST_TOTAL] and key() in s.series[TCP_OPEN_CONNECTIONS]
    assert s.series["nodemesh_series_evicted_total"] == {(): 1}
    c.wall += 61_000
    s.add({REQUEST_TOTAL: {key("a"): 1}})
    assert s.series[REQUEST_TOTAL][key("a")] == 1 and s.created_ms(REQUEST_TOTAL, key("a")) > created
    (series,) = [x for x in to_series(s.snapshot(), s.created_ms) if x.labels["authority"] == "a"]
    assert series.created_ms == s.created_ms(REQUEST_TOTAL, key("a"))
    # A gauge at 0 idles out too; a dead worker's open connections are taken back.
    s.remove_gauge({key(): 1})
    c.now += 61
    s.evict()
    assert s.series[TCP_OPEN_CONNECTIONS] == {}


def test_eviction_waits_for_a_report_after_the_last_change() -> None:
    s, c = store(idle_s=60)
    s.add({REQUEST_TOTAL: {key("a"): 1}})
    c.now += 100
    assert s.evict(safe_before=c.now - 150) == 0, "no report since the change: keep it"
    assert s.evict(safe_before=c.now - 5) == 1


def test_evicted_authorities_free_their_place_under_the_cap() -> None:
    s, c = store(max_authorities=2, idle_s=10)
    s.add({REQUEST_TOTAL: {key("a"): 1, key("b"): 1}})
    c.now += 11
    s.evict()
    s.add({REQUEST_TOTAL: {key("c"): 1}})
    assert key("c") in s.series[REQUEST_TOTAL]
