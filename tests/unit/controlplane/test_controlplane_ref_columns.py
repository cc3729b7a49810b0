"""A stream's refs as arrays (columns.RefColumns): kept across reports, they give what looking
every ref up in the dict gives — refs defined between reports, refs never defined, bad values,
gauges, route series (the per-series path), refs past the arrays, and keys dropped at the
retention whose ids go to other keys."""

from __future__ import annotations

import math
from array import array

from nodemesh.api.columns import Columns
from nodemesh.api.model import RESPONSE_LATENCY_MS, RESPONSE_TOTAL, ROUTE_REQUEST_TOTAL, TCP_OPEN_CONNECTIONS
from nodemesh.controlplane.aggregate import N_LATENCY, Aggregator
from nodemesh.controlplane.columns import RefColumns, ingest_columns
from nodemesh.controlplane.deltas import RefEntry, SeriesRefs

KEY_A, KEY_B = ("inbound", "a"), ("inbound", "b")
FAR = RefColumns.MAX_REF + 5


def report(values: dict[int, float], hists: dict[int, tuple[list[int], float]]) -> Columns:
    cols = Columns()
    for ref, v in values.items():
        cols.refs.append(ref)
        cols.values.append(v)
    for ref, (counts, total) in hists.items():
        cols.hist_refs.append(ref)
        cols.hist_sums.append(total)
        cols.hist_counts.extend(array("Q", counts))
    return cols


def test_kept_ref_arrays_follow_the_refs_and_the_ids() -> None:
    agg = Aggregator(retention_s=600, clock=lambda: 0.0, downsample_after_s=120)
    refs: SeriesRefs = {1: RefEntry({}, KEY_A, RESPONSE_TOTAL, "success"),
                        2: RefEntry({}, KEY_A, RESPONSE_LATENCY_MS, "latency"),
                        3: RefEntry({}, KEY_A, TCP_OPEN_CONNECTIONS, "gauge"),
                        4: RefEntry({"route": "/x"}, None, ROUTE_REQUEST_TOTAL),
                        FAR: RefEntry({}, KEY_B, RESPONSE_TOTAL, "failure")}
    cache = RefColumns()
    lat = [0] * N_LATENCY
    lat[3] = 2
    # ref 5 not defined yet; a NaN, a negative; zero increments skipped
    got = ingest_columns(agg, refs, report({1: 2.0, 5: 1.0, 3: 4.0, 4: 7.0, FAR: 1.0, 6: math.nan},
                                           {2: (lat, 12.5), 7: (lat, 1.0)}), 1000, "ag", N_LATENCY, True, cache)
    rejected, slow = got
    assert rejected == 3 and [(d.name, d.value) for d in slow] == [(ROUTE_REQUEST_TOTAL, 7.0)]
    refs[5] = RefEntry({}, KEY_B, RESPONSE_TOTAL, "success")            # defined by a later report
    rejected, slow = ingest_columns(agg, refs, report({1: 0.0, 5: 3.0, 3: -1.0}, {2: ([0] * N_LATENCY, 0.0)}),
                                    1001, "ag", N_LATENCY, True, cache)
    assert (rejected, slow) == (1, [])
    t = agg.totals_by_key(10, now=1002)
    assert (t[KEY_A].success, t[KEY_A].latency[3], t[KEY_A].latency_sum, t[KEY_A].open_connections) == (2, 2, 12.5, 4)
    assert (t[KEY_B].failure, t[KEY_B].success) == (1, 3)
    # both keys idle past the retention: dropped, their ids free (a's once its gauge is not held
    # any more); a new key takes one of them
    assert agg.prune(now=1700) == 1 and KEY_A in list(agg.keys())
    agg.drop_reporter("ag")
    assert agg.prune(now=1700) == 1 and not list(agg.keys())
    agg.record(("inbound", "new"), t=1700, requests=1)
    ingest_columns(agg, refs, report({1: 1.0, FAR: 2.0}, {}), 1701, "ag", N_LATENCY, True, cache)
    t = agg.totals_by_key(10, now=1702)
    assert (t[KEY_A].success, t[KEY_B].failure, t[("inbound", "new")].requests) == (1, 2, 1)
    assert t[("inbound", "new")].success == 0
