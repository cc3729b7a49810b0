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
    sec = agg.filed_second(sec)  # an old replay: its minute's
    p = agg.pending(sec)
    add_id, add_col, add_val = p.ids.append, p.cols.append, p.vals.append
    id_of = agg.id_of
    rejected = 0
    slow: list[SeriesDelta] = []
    get = refs.get
    columns = _COLUMNS
    for ref, v in zip(cols.refs, cols.values):
        e = get(ref)
        if e is None or not 0.0 <= v < _INF:
            rejected += 1
            continue
        slot = e[3]
        col = columns.get(slot)
        if col is not None:
            if v:
                add_id(id_of(e[1]))  # type: ignore[arg-type]
                add_col(col)
                add_val(v)
        elif slot == GAUGE:
            agg.set_gauge(e[1], reporter, v, t=_INF)  # type: ignore[arg-type]
        elif v:
            slow.append(SeriesDelta(e[2], e[0], v, key=e[1]))
    if not cols.hist_refs:
        return rejected, slow
    fast = native_bounds and n_buckets == N_LATENCY
    counts = np.frombuffer(cols.hist_counts, dtype=np.uint64).reshape(len(cols.hist_refs), n_buckets) \
        if n_buckets else np.zeros((len(cols.hist_refs), 0), dtype=np.uint64)
    any_count: list[bool] = counts.any(axis=1).tolist()  # type: ignore[assignment]
    rows: list[int] = []   # the histograms taken here: their row in `counts`, their series id
    row_ids: list[int] = []
    for j, (ref, total, nonzero) in enumerate(zip(cols.hist_refs, cols.hist_sums, any_count)):
        e = get(ref)
        if e is None or not 0.0 <= total < _INF:
            rejected += 1
            continue
        if not nonzero:
            continue
        if fast and e[3] == LATENCY:
            i = id_of(e[1])  # type: ignore[arg-type]
            rows.append(j)
            row_ids.append(i)
            if total:
                add_id(i)
                add_col(LATENCY_SUM)
                add_val(total)
        else:
            slow.append(SeriesDelta(e[2], e[0], buckets=tuple(counts[j].tolist()), sum=total, key=e[1]))
    if rows:
        taken = counts[rows]
        r, b = np.nonzero(taken)
        p.chunks.append((np.array(row_ids, dtype=np.int32)[r], (b + LAT0).astype(np.uint8),
                         taken[r, b].astype(np.float64)))
    return rejected, slow


_COLUMNS = {slot: COLUMN[slot] for slot in COUNTER_SLOTS}
