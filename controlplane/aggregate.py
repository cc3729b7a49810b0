"""Time-bucketed aggregation of what agents observed, and the math of windows over it.

Every series key is the tuple of `PEER_LABELS` values (direction, source and destination
workload and pod, service, authority, protocol). Per key the aggregator keeps one bucket per
second that saw traffic (sparse: quiet seconds cost nothing), for `retention_s` seconds; a key
with no traffic for longer than that is dropped, which bounds memory by the traffic of the last
hour. A query sums the buckets of any window (10 s .. 1 h) and derives rates, success rate and
latency quantiles from the merged histogram, as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nodemesh.api.model import LATENCY_BUCKETS_MS, PEER_LABELS

SeriesKey = tuple[str, ...]
LABEL_INDEX = {name: i for i, name in enumerate(PEER_LABELS)}
BOUNDS: tuple[float, ...] = tuple(float(b) for b in LATENCY_BUCKETS_MS)
N_LATENCY = len(BOUNDS) + 1  # + the +Inf bucket


def series_key(labels: Mapping[str, str]) -> SeriesKey:
    """A report's labels (a dict, or a Series' protobuf map) as the aggregator's key."""
    get = labels.get
    return tuple(get(name, "") for name in PEER_LABELS)


def label(key: SeriesKey, name: str) -> str:
    return key[LABEL_INDEX[name]]


def histogram_quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """Prometheus' histogram_quantile over non-cumulative `counts` (len(bounds) + 1, last +Inf).

    Linear interpolation inside the bucket holding the rank; the first bucket starts at 0; a
    rank in the +Inf bucket returns the highest finite bound. None without observations.
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if cumulative + count >= rank and count > 0:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = 0.0 if i == 0 else float(bounds[i - 1])
            upper = float(bounds[i])
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return float(bounds[-1])


class Bucket:
    __slots__ = (
        "failure",
        "latency",
        "latency_sum",
        "read_bytes",
        "requests",
        "success",
        "tcp_close",
        "tcp_open",
        "write_bytes",
    )

    def __init__(self) -> None:
        self.success = 0.0
        self.failure = 0.0
        self.requests = 0.0
        self.latency: list[float] | None = None  # allocated on the first latency observation
        self.latency_sum = 0.0
        self.tcp_open = 0.0
        self.tcp_close = 0.0
        self.read_bytes = 0.0
        self.write_bytes = 0.0


@dataclass
class Totals:
    """Sums over a window (and, for the gauge, the latest value in it)."""

    window_s: float
    success: float = 0.0
    failure: float = 0.0
    requests: float = 0.0
    latency: list[float] = field(default_factory=lambda: [0.0] * N_LATENCY)
    latency_sum: float = 0.0
    tcp_open: float = 0.0
    tcp_close: float = 0.0
    read_bytes: float = 0.0
    write_bytes: float = 0.0
    open_connections: float = 0.0
    has_gauge: bool = False

    def add_bucket(self, b: Bucket) -> None:
        self.success += b.success
        self.failure += b.failure
        self.requests += b.requests
        if b.latency is not None:
            lat = self.latency
            for i, c in enumerate(b.latency):
                lat[i] += c
        self.latency_sum += b.latency_sum
        self.tcp_open += b.tcp_open
        self.tcp_close += b.tcp_close
        self.read_bytes += b.read_bytes
        self.write_bytes += b.write_bytes

    def merge(self, other: Totals) -> None:
        self.success += other.success
        self.failure += other.failure
        self.requests += other.requests
        for i, c in enumerate(other.latency):
            self.latency[i] += c
        self.latency_sum += other.latency_sum
        self.tcp_open += other.tcp_open
        self.tcp_close += other.tcp_close
        self.read_bytes += other.read_bytes
        self.write_bytes += other.write_bytes
        self.open_connections += other.open_connections
        self.has_gauge = self.has_gauge or other.has_gauge

    # ------------------------------------------------------------- derived
    @property
    def responses(self) -> float:
        return self.success + self.failure

    @property
    def has_traffic(self) -> bool:
        return self.responses > 0

    @property
    def has_tcp(self) -> bool:
        return self.has_gauge or self.tcp_open > 0 or self.read_bytes > 0 or self.write_bytes > 0

    @property
    def success_rate(self) -> float | None:
        return self.success / self.responses if self.responses else None

    @property
    def rps(self) -> float:
        return self.responses / self.window_s

    @property
    def read_bytes_rate(self) -> float:
        return self.read_bytes / self.window_s

    @property
    def write_bytes_rate(self) -> float:
        return self.write_bytes / self.window_s

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, BOUNDS, self.latency)


class _History:
    __slots__ = ("buckets", "last_sec")

    def __init__(self) -> None:
        self.buckets: deque[tuple[int, Bucket]] = deque()
        self.last_sec = -1

    def at(self, sec: int) -> Bucket:
        buckets = self.buckets
        if not buckets or sec > buckets[-1][0]:
            b = Bucket()
            buckets.append((sec, b))
            self.last_sec = sec
            return b
        if sec == buckets[-1][0]:
            return buckets[-1][1]
        # An earlier second: an agent's history replayed after a reconnect. Usually near the end
        # (a replay arrives in order), so walk back from there.
        i = len(buckets) - 1
        while i > 0 and buckets[i - 1][0] >= sec:
            i -= 1
        if buckets[i][0] == sec:
            return buckets[i][1]
        b = Bucket()
        buckets.insert(i, (sec, b))
        return b


_rebin_cache: dict[tuple[float, ...], list[int]] = {}


def rebin_index(bounds: Sequence[float]) -> list[int]:
    """Map each bucket of a reporter's histogram (bounds + Inf) to ours: the first of our buckets
    whose upper bound is >= the reporter's. Identity when the agent uses LATENCY_BUCKETS_MS."""
    key = tuple(float(b) for b in bounds)
    cached = _rebin_cache.get(key)
    if cached is None:
        cached = []
        for b in (*key, math.inf):
            idx = next((i for i, ours in enumerate(BOUNDS) if ours >= b), len(BOUNDS))
            cached.append(idx)
        _rebin_cache[key] = cached
    return cached


class SeriesStore(Protocol):
    """What stat, edges and routes read: the `Aggregator` here, or a Prometheus snapshot
    (controlplane/promstore.py)."""

    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]: ...


class Aggregator:
    def __init__(self, retention_s: int = 3600, clock: Callable[[], float] = time.time) -> None:
        self.retention_s = retention_s
        self.clock = clock
        self._history: dict[SeriesKey, _History] = {}
        # key -> reporter (agent id) -> (time, value): open connections are a gauge per agent.
        self._gauges: dict[SeriesKey, dict[str, tuple[float, float]]] = {}

    def __len__(self) -> int:
        return len(self._history)

    def record(self, key: SeriesKey, *, t: float | None = None, success: float = 0, failure: float = 0,
               requests: float = 0, latency: Sequence[float] | None = None, latency_bounds: Sequence[float] = BOUNDS,
               latency_sum: float = 0, tcp_open: float = 0, tcp_close: float = 0, read_bytes: float = 0,
               write_bytes: float = 0) -> None:
        """Add deltas observed at time `t` (default: now) to the key's bucket for that second."""
        sec = int(self.clock() if t is None else t)
        hist = self._history.get(key)
        if hist is None:
            hist = self._history[key] = _History()
        b = hist.at(sec)
        b.success += success
        b.failure += failure
        b.requests += requests
        if latency is not None:
            if b.latency is None:
                b.latency = [0.0] * N_LATENCY
            index = rebin_index(latency_bounds) if latency_bounds is not BOUNDS else None
            for i, count in enumerate(latency):
                if count:
                    b.latency[index[i] if index is not None else i] += count
            b.latency_sum += latency_sum
        b.tcp_open += tcp_open
        b.tcp_close += tcp_close
        b.read_bytes += read_bytes
        b.write_bytes += write_bytes

    def set_gauge(self, key: SeriesKey, reporter: str, value: float, t: float | None = None) -> None:
        self._gauges.setdefault(key, {})[reporter] = (self.clock() if t is None else t, value)

    def drop_reporter(self, reporter: str) -> None:
        """An agent went away: its open-connection gauges no longer describe anything."""
        for key in list(self._gauges):
            per = self._gauges[key]
            per.pop(reporter, None)
            if not per:
                del self._gauges[key]

    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]:
        """Per key, the sums over the last `window_s` *complete* seconds (buckets
        [int(now) - window, int(now))) plus the latest open-connection gauge within the window.

        The second in progress is left out: agents report about once a second, so whether its
        bucket already holds this second's report depends on the report's phase, and counting it
        while dividing by the full window read rates up to 1/window low (11 % at 10 s). Complete
        seconds each hold one report of a steadily reporting agent; the price is that traffic
        shows up in stats at most one second later."""
        now = self.clock() if now is None else now
        end = int(now)  # exclusive
        first = end - int(window_s)
        out: dict[SeriesKey, Totals] = {}
        for key, hist in self._history.items():
            if hist.last_sec < first or (where is not None and not where(key)):
                continue
            tot = Totals(window_s)
            for sec, b in reversed(hist.buckets):
                if sec < first:
                    break
                if sec < end:
                    tot.add_bucket(b)
            out[key] = tot
        for key, per in self._gauges.items():
            if where is not None and not where(key):
                continue
            live = [v for ts, v in per.values() if ts >= now - window_s]
            # Agents keep a closed peer's gauge at 0 forever: zero open connections is not TCP
            # activity, or every peer ever seen would stay in edges and --from/--to rows.
            if sum(live) > 0:
                gauged = out.get(key)
                if gauged is None:
                    gauged = out[key] = Totals(window_s)
                gauged.open_connections = sum(live)
                gauged.has_gauge = True
        return out

    def totals(self, window_s: float, now: float | None = None,
               where: Callable[[SeriesKey], bool] | None = None) -> Totals:
        total = Totals(window_s)
        for t in self.totals_by_key(window_s, now, where).values():
            total.merge(t)
        return total

    def prune(self, now: float | None = None) -> int:
        """Forget buckets older than the retention, and keys left empty; returns keys dropped."""
        now = self.clock() if now is None else now
        oldest = int(now) - self.retention_s
        dropped = 0
        for key in list(self._history):
            buckets = self._history[key].buckets
            while buckets and buckets[0][0] < oldest:
                buckets.popleft()
            if not buckets:
                del self._history[key]
                dropped += 1
        for key in list(self._gauges):
            per = self._gauges[key]
            for reporter in [r for r, (ts, _) in per.items() if ts < oldest]:
                del per[reporter]
            if not per:
                del self._gauges[key]
        return dropped

    def keys(self) -> Iterable[SeriesKey]:
        return self._history.keys()
