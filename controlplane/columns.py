"""An increment report's series columns (api/columns.py) into the aggregator, a few Python
operations per series.

Each ref of the stream was resolved once, when it was defined (`deltas.RefEntry`): its aggregator
key and the Bucket field its values add to (`slot`: success or failure for a response counter,
requests, latency, tcp_*, read/write bytes, or "gauge"). So the loop per series is: a dict
lookup, a range check, and an add into the key's bucket of the report's second, fetched once per
key per report. What the loop does not do goes through the per-series path (`SeriesDelta` into
Controller._record): route families (their key is capped per route), histograms whose bounds are
not ours (rebinned there). The numbers are the per-series path's: zero increments are skipped as
there, negative or non-finite values and unknown refs are rejected.
"""

from __future__ import annotations

import math
from operator import add

from nodemesh.api.columns import Columns
from nodemesh.controlplane.aggregate import N_LATENCY, Aggregator, Bucket, SeriesKey
from nodemesh.controlplane.deltas import SeriesDelta, SeriesRefs

GAUGE = "gauge"
LATENCY = "latency"
COUNTER_SLOTS = frozenset({"success", "failure", "requests", "tcp_open", "tcp_close", "read_bytes", "write_bytes"})
_INF = math.inf


def ingest_columns(agg: Aggregator, refs: SeriesRefs, cols: Columns, sec: int, reporter: str,
                   n_buckets: int, native_bounds: bool) -> tuple[int, list[SeriesDelta]]:
    """Add the columns' increments to second `sec` of `agg`; gauges set for `reporter` (held
    until its stream ends, as a ref'd gauge is). Returns (series rejected, the series left for
    the per-series path). `n_buckets`: counts per histogram (api/columns.decode checked them);
    `native_bounds`: the report's histograms use our buckets (else they are rebinned there)."""
    sec = agg.filed_second(sec)  # an old replay: its minute's bucket
    batch = not agg.in_place(sec)
    # Usually no kept window holds the report's second yet, nor is its minute sealed: add straight
    # into the buckets. Else collect the report's deltas per key, then add them (and to those
    # windows and that minute's sums) once per key.
    bucket = _fresh if batch else agg.bucket_at
    cur: dict[SeriesKey, Bucket] = {}
    rejected = 0
    slow: list[SeriesDelta] = []
    get = refs.get
    counters = COUNTER_SLOTS
    for ref, v in zip(cols.refs, cols.values):
        e = get(ref)
        if e is None or not 0.0 <= v < _INF:
            rejected += 1
            continue
        slot = e[3]
        if slot in counters:
            if v:
                key = e[1]
                b = cur.get(key)  # type: ignore[arg-type]
                if b is None:
                    b = cur[key] = bucket(key, sec)  # type: ignore[index, arg-type]
                setattr(b, slot, getattr(b, slot) + v)
        elif slot == GAUGE:
            agg.set_gauge(e[1], reporter, v, t=_INF)  # type: ignore[arg-type]
        elif v:
            slow.append(SeriesDelta(e[2], e[0], v, key=e[1]))
    fast = native_bounds and n_buckets == N_LATENCY
    counts = cols.hist_counts
    for j, (ref, total) in enumerate(zip(cols.hist_refs, cols.hist_sums)):
        e = get(ref)
        if e is None or not 0.0 <= total < _INF:
            rejected += 1
            continue
        chunk = counts[j * n_buckets:(j + 1) * n_buckets]
        if not any(chunk):
            continue
        if fast and e[3] == LATENCY:
            key = e[1]
            b = cur.get(key)  # type: ignore[arg-type]
            if b is None:
                b = cur[key] = bucket(key, sec)  # type: ignore[index, arg-type]
            lat = b.latency
            # A new bucket takes the counts as ints: small ints are shared objects in CPython (a
            # float per zero count cost ~0.5 KB per histogram bucket held for an hour).
            b.latency = chunk.tolist() if lat is None else list(map(add, lat, chunk))
            b.latency_sum += total
        else:
            slow.append(SeriesDelta(e[2], e[0], buckets=tuple(chunk), sum=total, key=e[1]))
    if batch:
        for key, d in cur.items():
            agg.add_bucket(key, sec, d)
    return rejected, slow


def _fresh(key: SeriesKey, sec: int) -> Bucket:
    return Bucket()
