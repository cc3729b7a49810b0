"""An increment report's series columns (api/columns.py) into the aggregator, a few Python
operations per series.

Each ref of the stream was resolved once, when it was defined (`deltas.RefEntry`): its aggregator
key and the column its values add to (`slot`: success or failure for a response counter,
requests, latency, tcp_*, read/write bytes, or "gauge"). So the loop per series is: a dict
lookup, a range check, and three appends to the entries of the report's second
(`Aggregator.pending`); a report's histograms go in as numpy arrays (their non-zero buckets).
What the loop does not do goes through the per-series path (`SeriesDelta` into
Controller._record): route families (their key is capped per route), histograms whose bounds are
not ours (rebinned there). The numbers are the per-series path's: zero increments are skipped as
there, negative or non-finite values and unknown refs are rejected.
"""

from __future__ import annotations

import math

import numpy as np
from nodemesh.api.columns import Columns
from nodemesh.controlplane.aggregate import COLUMN, LAT0, LATENCY_SUM, N_LATENCY, Aggregator
from nodemesh.controlplane.deltas import MAX_SERIES_REFS, SeriesDelta, SeriesRefs

GAUGE = "gauge"
LATENCY = "latency"
COUNTER_SLOTS = frozenset({"success", "failure", "requests", "tcp_open", "tcp_close", "read_bytes", "write_bytes"})
_INF = math.inf


# A ref's code in `RefColumns.codes`: a counter column (0..LAT0-1), or one of these.
_HIST = LAT0          # a latency histogram (taken here when its bounds are ours)
_GAUGE = LAT0 + 1     # an open-connection gauge
_SLOW = LAT0 + 2      # anything else: the per-series path (routes)
_UNRESOLVED = -1      # not looked up yet, or not defined on the stream (rejected)
_CODE = {**{slot: COLUMN[slot] for slot in COUNTER_SLOTS}, LATENCY: _HIST, GAUGE: _GAUGE}


class RefColumns:
    """A stream's series refs as arrays indexed by ref: the series id in the aggregator, that
    id's generation when it was looked up (`Aggregator.gen`: an id freed since is looked up
    again), and the ref's code. Filled the first time a ref shows up in columns; refs are
    numbered from 1 by the agent, so the arrays are as long as the stream's refs. A ref past
    `MAX_REF` is looked up in the dict every time."""

    MAX_REF = MAX_SERIES_REFS + 1

    __slots__ = ("codes", "gens", "ids")

    def __init__(self) -> None:
        self.ids = np.full(0, -1, dtype=np.int32)
        self.gens = np.zeros(0, dtype=np.int32)
        self.codes = np.full(0, _UNRESOLVED, dtype=np.int8)

    def resolve(self, agg: Aggregator, refs: SeriesRefs, wanted: np.ndarray) -> None:
        """Look up `wanted` refs (each < MAX_REF) not resolved yet or whose id was freed since."""
        if not len(wanted):
            return
        top = int(wanted.max()) + 1
        if top > len(self.ids):
            size = min(max(top, 2 * len(self.ids), 256), self.MAX_REF)
            ids = np.full(size, -1, dtype=np.int32)
            ids[:len(self.ids)] = self.ids
            gens = np.zeros(size, dtype=np.int32)
            gens[:len(self.gens)] = self.gens
            codes = np.full(size, _UNRESOLVED, dtype=np.int8)
            codes[:len(self.codes)] = self.codes
            self.ids, self.gens, self.codes = ids, gens, codes
        ids, codes = self.ids[wanted], self.codes[wanted]
        stale = (codes == _UNRESOLVED) | ((ids >= 0) & (agg.gen(ids) != self.gens[wanted]))
        if not stale.any():
            return
        for ref in np.unique(wanted[stale]).tolist():
            e = refs.get(ref)
            if e is None:
                continue
            code = _CODE.get(e[3], _SLOW) if e[1] is not None else _SLOW
            self.codes[ref] = code
            if code < _GAUGE:
                i = agg.id_of(e[1])  # type: ignore[arg-type]
                self.ids[ref] = i
                self.gens[ref] = agg.gen(np.array([i]))[0]


def ingest_columns(agg: Aggregator, refs: SeriesRefs, cols: Columns, sec: int, reporter: str,
                   n_buckets: int, native_bounds: bool,
                   cache: RefColumns | None = None) -> tuple[int, list[SeriesDelta]]:
    """Add the columns' increments to second `sec` of `agg`; gauges set for `reporter` (held
    until its stream ends, as a ref'd gauge is). Returns (series rejected, the series left for
    the per-series path). `n_buckets`: counts per histogram (api/columns.decode checked them);
    `native_bounds`: the report's histograms use our buckets (else they are rebinned there);
    `cache`: the stream's refs as arrays (kept on its session; None: a fresh one)."""
    cache = cache if cache is not None else RefColumns()
    sec = agg.filed_second(sec)  # an old replay: its minute's
    p = agg.pending(sec)
    rejected = 0
    slow: list[SeriesDelta] = []
    if len(cols.refs):
        r = np.frombuffer(cols.refs, dtype=np.uint32).astype(np.int64)
        v = np.frombuffer(cols.values, dtype=np.float64)
        codes, ids = _lookup(agg, refs, cache, r)
        valid = (codes != _UNRESOLVED) & (v >= 0.0) & (v < _INF)   # NaN: not >= 0
        rejected += len(r) - int(np.count_nonzero(valid))
        nonzero = valid & (v != 0.0)
        counter = nonzero & (codes < LAT0)
        if counter.any():
            p.chunks.append((ids[counter], codes[counter].astype(np.uint8), v[counter]))
        for j in np.flatnonzero(valid & (codes == _GAUGE)).tolist():
            agg.set_gauge(refs[int(r[j])][1], reporter, float(v[j]), t=_INF)  # type: ignore[arg-type]
        for j in np.flatnonzero(nonzero & (codes >= LAT0) & (codes != _GAUGE)).tolist():
            e = refs[int(r[j])]
            slow.append(SeriesDelta(e[2], e[0], float(v[j]), key=e[1]))
    if len(cols.hist_refs) and n_buckets:
        r = np.frombuffer(cols.hist_refs, dtype=np.uint32).astype(np.int64)
        total = np.frombuffer(cols.hist_sums, dtype=np.float64)
        counts = np.frombuffer(cols.hist_counts, dtype=np.uint64).reshape(len(r), n_buckets)
        codes, ids = _lookup(agg, refs, cache, r)
        valid = (codes != _UNRESOLVED) & (total >= 0.0) & (total < _INF)
        rejected += len(r) - int(np.count_nonzero(valid))
        taken = valid & counts.any(axis=1)
        fast = taken & (codes == _HIST) if native_bounds and n_buckets == N_LATENCY else np.zeros(len(r), bool)
        if fast.any():
            rows = np.flatnonzero(fast)
            row, bucket = np.nonzero(counts[rows])
            with_sum = rows[total[rows] != 0.0]
            p.chunks.append((np.concatenate((ids[rows][row], ids[with_sum])),
                             np.concatenate(((bucket + LAT0).astype(np.uint8),
                                             np.full(len(with_sum), LATENCY_SUM, dtype=np.uint8))),
                             np.concatenate((counts[rows][row, bucket].astype(np.float64), total[with_sum]))))
        for j in np.flatnonzero(taken & ~fast).tolist():
            e = refs[int(r[j])]
            slow.append(SeriesDelta(e[2], e[0], buckets=tuple(counts[j].tolist()), sum=float(total[j]), key=e[1]))
    elif len(cols.hist_refs):
        # No buckets per histogram (a report without bounds): nothing to count, only to check.
        for ref, t in zip(cols.hist_refs, cols.hist_sums):
            if refs.get(ref) is None or not 0.0 <= t < _INF:
                rejected += 1
    return rejected, slow


def _lookup(agg: Aggregator, refs: SeriesRefs, cache: RefColumns, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codes and series ids of refs `r` (a ref not defined: _UNRESOLVED)."""
    small = r < RefColumns.MAX_REF
    if small.all():
        cache.resolve(agg, refs, r)
        return cache.codes[r], cache.ids[r]
    # Refs past the arrays (an agent numbering them oddly): looked up one by one.
    codes = np.full(len(r), _UNRESOLVED, dtype=np.int8)
    ids = np.full(len(r), -1, dtype=np.int32)
    cache.resolve(agg, refs, r[small])
    codes[small], ids[small] = cache.codes[r[small]], cache.ids[r[small]]
    for j in np.flatnonzero(~small).tolist():
        e = refs.get(int(r[j]))
        if e is not None:
            codes[j] = _CODE.get(e[3], _SLOW) if e[1] is not None else _SLOW
            if codes[j] < _GAUGE:
                ids[j] = agg.id_of(e[1])  # type: ignore[arg-type]
    return codes, ids
