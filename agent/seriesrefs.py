"""Series refs: an agent stream's label compaction (api/proto/nodemesh.proto, `Series.ref`).

A node reports the same few hundred series every second, each with a dozen labels; parsing those
label maps was most of what a controller spends per report (tests/scale, docs/scale.md). When the
controller's ReportAck says `series_refs`, the link numbers the series of each stream: the first
time a series goes out it carries its labels and a new ref, afterwards only its name and ref.
The table lives as long as the stream (a new stream, a new controller: labels again) and is
bounded: past `limit` series the rest go out whole, without a ref.
"""

from __future__ import annotations

from nodemesh.api.gen import nodemesh_pb2 as pb

MAX_REFS = 100_000


class SeriesRefTable:
    def __init__(self, limit: int = MAX_REFS) -> None:
        self.limit = limit
        self._refs: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}

    def __len__(self) -> int:
        return len(self._refs)

    def compact(self, report: pb.MetricsReport) -> None:
        """Replace the labels of series this stream already defined by their ref, in place."""
        refs = self._refs
        for s in report.series:
            key = (s.name, tuple(sorted(s.labels.items())))
            ref = refs.get(key)
            if ref is not None:
                s.ClearField("labels")
                s.ref = ref
            elif len(refs) < self.limit:
                ref = refs[key] = len(refs) + 1
                s.ref = ref  # defined here: labels kept
