"""Series refs: an agent stream's label compaction (api/proto/nodemesh.proto, `Series.ref`).

A node reports the same few hundred series every second, each with a dozen labels; parsing those
label maps was most of what a controller spends per report (tests/scale, docs/scale.md). When the
controller's ReportAck says `series_refs`, the link numbers the series of each stream: the first
time a series goes out it carries its labels and a new ref, afterwards only its name and ref.
The table lives as long as the stream (a new stream, a new controller: labels again) and is
bounded: past `limit` series the rest go out whole, without a ref. On a stream with refs a gauge
(`tcp_open_connections`: the live reports carry every one, every second) is sent only when its
value changed; the controller holds a ref'd gauge's last value until the stream ends.

When the controller's ReportAck also says `series_columns`, the series of refs already defined
leave `series` altogether: their refs and values go as packed arrays in `MetricsReport.columns`
(api/columns.py), which the controller reads with a few C-level calls per report.
"""

from __future__ import annotations

from nodemesh.api.columns import Columns
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.model import TCP_OPEN_CONNECTIONS

MAX_REFS = 100_000


class SeriesRefTable:
    def __init__(self, limit: int = MAX_REFS, columns: bool = False) -> None:
        self.limit = limit
        self.columns = columns  # the controller takes MetricsReport.columns
        self._refs: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._gauges: dict[int, float] = {}  # ref -> the gauge value last sent on this stream

    def __len__(self) -> int:
        return len(self._refs)

    def compact(self, report: pb.MetricsReport) -> None:
        """Replace the labels of series this stream already defined by their ref, in place, and
        leave out gauges whose value this stream already carried (the controller holds a ref'd
        gauge's last value until the stream ends)."""
        refs, gauges = self._refs, self._gauges
        cols = Columns() if self.columns else None
        n_buckets = len(report.latency_bounds_ms) + 1
        keep = []
        for s in report.series:
            key = (s.name, tuple(sorted(s.labels.items())))
            ref = refs.get(key)
            if ref is not None:
                if s.name == TCP_OPEN_CONNECTIONS:
                    if gauges.get(ref) == s.value:
                        continue  # unchanged: not sent again
                    gauges[ref] = s.value
                if cols is not None:
                    counts = s.bucket_counts
                    if not counts:
                        cols.refs.append(ref)
                        cols.values.append(s.value)
                        continue
                    if len(counts) == n_buckets:
                        cols.hist_refs.append(ref)
                        cols.hist_sums.append(s.sum)
                        cols.hist_counts.extend(counts)
                        continue
                s.ClearField("labels")
                s.ref = ref
            elif len(refs) < self.limit:
                ref = refs[key] = len(refs) + 1
                s.ref = ref  # defined here: labels kept
                if s.name == TCP_OPEN_CONNECTIONS:
                    gauges[ref] = s.value
            keep.append(s)
        if len(keep) < len(report.series):
            del report.series[:]
            report.series.extend(keep)
        if cols:
            report.columns.CopyFrom(cols.to_proto())
