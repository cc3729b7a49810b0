"""Cumulative agent series in, per-report deltas out, with no double counting.

Agents report Prometheus-style cumulative values since their process started; `agent_id`
changes with every process. The controller keeps the last value of every series per agent_id and
hands the difference to the aggregator. The cases:

* same agent, next report: delta = current - previous.
* a value went down: the counter was reset, so everything it holds is new: delta = current.
* a series seen for the first time from an agent we already know: it started at 0 after our
  previous report, so delta = current.
* the first report of an agent_id this controller has never seen. Two different situations:
  - the agent process started after this controller did (an agent restart or a new node): its
    counters began at 0 while we were listening, so the whole value is new;
  - the agent is older than this controller (the controller restarted): its values include
    counts a previous controller already aggregated, or that happened while no controller ran.
    Counting them again would double count, and dumping them all into the current second would
    put them at the wrong time anyway; so that report is a *baseline*: we remember it and count
    from there. What is lost is exactly what happened while the controller was down.
  `first_report_is_baseline` is decided once per agent_id by comparing the agent's start time
  (AgentHello.start_time_ms) with the controller's.
* idle eviction (api/proto/nodemesh.proto, `Series`): an agent drops series idle for a while. A
  series missing from a report (reports always carry every live series) is forgotten here too:
  its counts were delivered while it lived. When the same labels come back they carry a new
  `created_ms`: a series whose created_ms differs from the one we hold is a new incarnation
  counting from 0, so all of its value is new (even if it is higher than the old one's, which a
  plain "went down = reset" rule would have mistaken for an increase). Nothing is lost or counted
  twice.

A malformed series (a value that is NaN, infinite or negative, a histogram whose length does not
match the report's bounds) is skipped and counted in `rejected`: one NaN would otherwise poison
every window holding it for an hour, and one bad histogram would end the agent's stream.

**Increment reports** (agents that keep a report history, agent/history.py; the controller
acknowledges them): each report holds one interval's increments, numbered by `seq` per agent
process. There is nothing to subtract: `ingest_increments` hands them on as they are, once —
a seq at or below `stored_seq` (a replay after a reconnect, whose ack crossed the resend) is a
duplicate and dropped whole; a jump past `stored_seq + 1` is a gap (intervals the agent's history
no longer held), counted. Gauges carry their current value. An agent that restarts is a new
agent_id whose seq starts again at 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nodemesh.api.model import TCP_OPEN_CONNECTIONS

GAUGES = frozenset({TCP_OPEN_CONNECTIONS})

SeriesId = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(slots=True)
class SeriesDelta:
    name: str
    labels: dict[str, str]
    value: float = 0.0                         # counters: the increase
    buckets: Sequence[float] | None = None     # histograms: per-bucket increase
    sum: float = 0.0
    gauge: bool = False                        # gauges: `value` is the current value
    key: tuple[str, ...] | None = None         # the aggregator's key, when known (series refs)


class RefEntry(NamedTuple):
    """What a stream's series ref stands for (resolved once, when the ref is defined)."""

    labels: dict[str, str]          # the labels kept (the controller keeps only what it reads)
    key: tuple[str, ...] | None     # the aggregator key, when the controller resolved one
    name: str                       # the series' family: columns carry refs without names
    slot: str = ""                  # the aggregator field a column value adds to ("": via SeriesDelta)


# Series refs (api/proto/nodemesh.proto, Series.ref): per agent stream, ref -> RefEntry, defined
# by the first series carrying the ref with its labels. Bounded: a stream defining more refs than
# this sends them unresolved (rejected), which a well-behaved agent never does.
SeriesRefs = dict[int, RefEntry]
MAX_SERIES_REFS = 200_000


class AgentCounters:
    """The last cumulative value of every series of one agent process."""

    def __init__(self, agent_id: str, first_report_is_baseline: bool) -> None:
        self.agent_id = agent_id
        self._baseline_pending = first_report_is_baseline
        self._last: dict[SeriesId, float | tuple[tuple[int, ...], float]] = {}
        self._created: dict[SeriesId, int] = {}
        self.stored_seq = 0        # increments: every seq <= this was handed on (what we acknowledge)
        self.duplicates = 0        # increment reports dropped: already stored
        self.gaps = 0              # increment reports missing between two stored ones
        self.forgotten = 0
        self.resets = 0
        self.rejected = 0

    def ingest(self, series: Iterable[object], seq: int = -1, n_buckets: int | None = None) -> list[SeriesDelta]:
        """Deltas of one MetricsReport's series (objects with name, labels, value,
        bucket_counts, sum: the protobuf Series, or anything shaped like it). `n_buckets`: the
        length every histogram must have (the report's bounds + the +Inf bucket)."""
        baseline = self._baseline_pending
        self._baseline_pending = False
        out: list[SeriesDelta] = []
        seen: set[SeriesId] = set()
        for s in series:
            name: str = s.name  # type: ignore[attr-defined]
            labels = dict(s.labels)  # type: ignore[attr-defined]
            counts = tuple(int(c) for c in s.bucket_counts)  # type: ignore[attr-defined]
            number = float(s.sum if counts else s.value)  # type: ignore[attr-defined]
            sid: SeriesId = (name, tuple(sorted(labels.items())))
            seen.add(sid)  # a rejected series is still alive at the agent: not to be forgotten
            if not math.isfinite(number) or number < 0 or (counts and n_buckets and len(counts) != n_buckets):
                self.rejected += 1
                continue
            if name in GAUGES:
                out.append(SeriesDelta(name, labels, number, gauge=True))
                continue
            created = int(getattr(s, "created_ms", 0) or 0)
            if created and self._created.get(sid, created) != created:
                # Evicted by the agent and back again: a new series from 0 (not baseline data).
                self._last.pop(sid, None)
                self.resets += 1
                self._created[sid] = created
                prev = None
                if counts:
                    self._last[sid] = (counts, number)
                    if any(counts):
                        out.append(SeriesDelta(name, labels, buckets=counts, sum=number))
                else:
                    self._last[sid] = number
                    if number:
                        out.append(SeriesDelta(name, labels, number))
                continue
            if created:
                self._created[sid] = created
            prev = self._last.get(sid)
            if counts:
                total_sum = number
                self._last[sid] = (counts, total_sum)
                if prev is None:
                    if baseline:
                        continue
                    d_counts, d_sum = counts, total_sum
                else:
                    p_counts, p_sum = prev  # type: ignore[misc]
                    if len(p_counts) != len(counts) or any(c < p for c, p in zip(counts, p_counts)):
                        self.resets += 1
                        d_counts, d_sum = counts, total_sum
                    else:
                        d_counts = tuple(c - p for c, p in zip(counts, p_counts))
                        d_sum = total_sum - p_sum
                if any(d_counts):
                    out.append(SeriesDelta(name, labels, buckets=d_counts, sum=d_sum))
            else:
                value = number
                self._last[sid] = value
                if prev is None:
                    if baseline:
                        continue
                    delta = value
                elif value < prev:  # type: ignore[operator]
                    self.resets += 1
                    delta = value
                else:
                    delta = value - prev  # type: ignore[operator]
                if delta:
                    out.append(SeriesDelta(name, labels, delta))
        # Series the agent no longer reports were evicted there: forget them (bounded memory).
        if len(seen) < len(self._last):
            for sid in [k for k in self._last if k not in seen]:
                del self._last[sid]
                self._created.pop(sid, None)
                self.forgotten += 1
        return out

    def take_seq(self, seq: int) -> bool:
        """An increment report's seq: False when it was already stored (a duplicate)."""
        if seq <= self.stored_seq:
            self.duplicates += 1
            return False
        if self.stored_seq and seq > self.stored_seq + 1:
            self.gaps += seq - self.stored_seq - 1
        self.stored_seq = seq
        return True

    def ingest_increments(self, series: Iterable[object], seq: int, n_buckets: int | None = None,
                          refs: SeriesRefs | None = None,
                          resolve: Callable[[str, dict[str, str]], RefEntry] | None = None,
                          ) -> list[SeriesDelta] | None:
        """One increment report's series as deltas, or None when its seq was already stored.
        `refs`: the stream's series refs (None: refs not taken, labels are read as sent);
        `resolve(name, labels) -> RefEntry`: run once per ref; what it
        keeps is what every later report of the ref hands on (the controller keeps only what it
        reads: a ref's labels held whole cost ~2 KB each, 3.5 GB for 1,000 nodes' refs)."""
        if not self.take_seq(seq):
            return None
        out: list[SeriesDelta] = []
        for s in series:
            name: str = s.name  # type: ignore[attr-defined]
            ref = getattr(s, "ref", 0) if refs is not None else 0
            key = None
            if ref and refs is not None:
                # A compacted series: its labels were sent once on this stream (parsing a
                # protobuf map per series per second was most of the controller's ingest).
                entry = refs.get(ref)
                if entry is None:
                    labels = dict(s.labels)  # type: ignore[attr-defined]
                    if not labels or len(refs) >= MAX_SERIES_REFS:
                        self.rejected += 1  # a ref never defined: nothing says whose series it is
                        continue
                    entry = refs[ref] = resolve(name, labels) if resolve is not None else RefEntry(labels, None, name)
                labels, key = entry[0], entry[1]
            counts = tuple(s.bucket_counts)  # type: ignore[attr-defined]  # uint64: ints already
            number = float(s.sum if counts else s.value)  # type: ignore[attr-defined]
            if not math.isfinite(number) or number < 0 or (counts and n_buckets and len(counts) != n_buckets):
                self.rejected += 1
                continue
            if not ref:
                labels = dict(s.labels)  # type: ignore[attr-defined]
            if name in GAUGES:
                out.append(SeriesDelta(name, labels, number, gauge=True, key=key))
            elif counts:
                if any(counts):
                    out.append(SeriesDelta(name, labels, buckets=counts, sum=number, key=key))
            elif number:
                out.append(SeriesDelta(name, labels, number, key=key))
        return out

    def __len__(self) -> int:
        return len(self._last)
