"""The agent's report history: the last minutes of per-interval increments, for the controller.

Every report interval the controller link closes one *entry*: what the node counted in that
interval (peer counters and histograms that changed, `NodeStore.take_pending`), as a
`MetricsReport` with `increments=true`, its `seq` (1, 2, 3 ... per agent process) and the time
the interval ended. The ring keeps entries for `max_age_s` whether or not a controller
acknowledged them: a controller that restarts loses its memory, and its successor is given the
whole ring back (its first `ReportAck` says seq 0), so windows reaching before the restart still
hold every count. A controller that was only away gets what it lacks (seq above its ack).

Entries are stored serialized and zlib-compressed (the same label values repeat every second:
measured ~10x smaller, see docs/agent-telemetry.md), so memory is bounded by `max_bytes` as well
as by age. What falls out of the ring before any controller acknowledged it is lost for good: it
is counted (`dropped_unacked`, exported as `nodemesh_report_history_dropped_total`) and logged.
"""

from __future__ import annotations

import logging
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from nodemesh.api.gen import nodemesh_pb2 as pb

log = logging.getLogger("nodemesh.agent.history")

COMPRESS_LEVEL = 1  # fast: a second's worth of series compresses ~10x at this level already


@dataclass(slots=True)
class Entry:
    seq: int
    time_ms: int
    blob: bytes  # zlib(MetricsReport.SerializeToString())

    def report(self) -> pb.MetricsReport:
        return pb.MetricsReport.FromString(zlib.decompress(self.blob))


class ReportRing:
    """Increment reports by seq, oldest first, bounded by age and by bytes."""

    def __init__(self, max_age_s: float = 900.0, max_bytes: int = 64 << 20) -> None:
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._entries: deque[Entry] = deque()
        self.bytes = 0
        self.acked = 0               # highest seq the current controller said it stored
        self.stored = 0              # highest seq any controller said it stored (this process's life)
        self.dropped_unacked = 0     # entries lost: out of the ring before any controller stored them
        self.dropped_acked = 0       # entries aged out after a controller had stored them (normal)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    @property
    def last_seq(self) -> int:
        return self._entries[-1].seq if self._entries else self.acked

    @property
    def first_seq(self) -> int:
        return self._entries[0].seq if self._entries else 0

    def append(self, report: pb.MetricsReport) -> Entry:
        """Keep one interval's report (its seq must follow the last one's), then enforce the bounds."""
        if self._entries and report.seq <= self._entries[-1].seq:
            raise ValueError(f"seq {report.seq} does not follow {self._entries[-1].seq}")
        entry = Entry(report.seq, report.time_ms, zlib.compress(report.SerializeToString(), COMPRESS_LEVEL))
        self._entries.append(entry)
        self.bytes += len(entry.blob)
        self._trim(report.time_ms)
        return entry

    def _trim(self, now_ms: int) -> None:
        horizon = now_ms - self.max_age_s * 1000
        lost = 0
        while self._entries and (self._entries[0].time_ms < horizon or self.bytes > self.max_bytes) \
                and len(self._entries) > 1:
            old = self._entries.popleft()
            self.bytes -= len(old.blob)
            if old.seq > self.stored:
                lost += 1
            else:
                self.dropped_acked += 1
        if lost:
            self.dropped_unacked += lost
            log.warning("event=report_history_overflow dropped=%d total=%d acked=%d first_kept=%d bytes=%d "
                        "why=%s", lost, self.dropped_unacked, self.acked, self.first_seq, self.bytes,
                        "bytes" if self.bytes > self.max_bytes else "age")

    def ack(self, seq: int) -> None:
        """The controller stored every seq <= `seq` (a new controller: 0; what an earlier one stored
        is still not lost: it was counted once, and it is in the ring to be given again)."""
        self.acked = seq
        self.stored = max(self.stored, seq)

    def since(self, seq: int) -> list[Entry]:
        """Entries with a seq above `seq`, oldest first (what a controller that acked `seq` lacks)."""
        out = []
        for entry in reversed(self._entries):
            if entry.seq <= seq:
                break
            out.append(entry)
        out.reverse()
        return out
