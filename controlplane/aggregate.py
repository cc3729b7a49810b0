"""Time-bucketed aggregation of what agents observed, and the math of windows over it.

Every series key is the tuple of `PEER_LABELS` values (direction, source and destination
workload and pod, service, authority, protocol). Per key the aggregator keeps one bucket per
second that saw traffic (sparse: quiet seconds cost nothing), for `retention_s` seconds; a key
with no traffic for longer than that is dropped, which bounds memory by the traffic of the last
hour. A query sums the buckets of any window (10 s .. 1 h) and derives rates, success rate and
latency quantiles from the merged histogram, as Prometheus' `histogram_quantile` does.
Complete minutes are also kept summed per key (`Aggregator.seal`): a window's first build and
downsampling take them whole instead of second by second.
"""

from __future__ import annotations

import math
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
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
            self.latency = list(map(operator.add, self.latency, b.latency))
        self.latency_sum += b.latency_sum
        self.tcp_open += b.tcp_open
        self.tcp_close += b.tcp_close
        self.read_bytes += b.read_bytes
        self.write_bytes += b.write_bytes

    def sub_bucket(self, b: Bucket) -> None:
        """A bucket leaving a sliding window (counts are integers: exact)."""
        self.success -= b.success
        self.failure -= b.failure
        self.requests -= b.requests
        if b.latency is not None:
            self.latency = list(map(operator.sub, self.latency, b.latency))
        self.latency_sum -= b.latency_sum
        self.tcp_open -= b.tcp_open
        self.tcp_close -= b.tcp_close
        self.read_bytes -= b.read_bytes
        self.write_bytes -= b.write_bytes

    def copy(self) -> Totals:
        return Totals(self.window_s, self.success, self.failure, self.requests, self.latency.copy(),
                      self.latency_sum, self.tcp_open, self.tcp_close, self.read_bytes, self.write_bytes,
                      self.open_connections, self.has_gauge)

    def merge(self, other: Totals) -> None:
        self.success += other.success
        self.failure += other.failure
        self.requests += other.requests
        self.latency = [a + c for a, c in zip(self.latency, other.latency)]
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
    """A key's buckets: `buckets` one per second with traffic, newest last; `coarse` one per
    minute for the seconds older than the aggregator's downsampling horizon, each filed at its
    minute's middle second (see Aggregator.downsample), all older than every per-second bucket."""

    __slots__ = ("buckets", "coarse", "last_sec")

    def __init__(self) -> None:
        self.buckets: deque[tuple[int, Bucket]] = deque()
        self.coarse: deque[tuple[int, Bucket]] = deque()
        self.last_sec = -1

    def at(self, sec: int, coarse: bool = False) -> Bucket:
        buckets = self.coarse if coarse else self.buckets
        if not buckets or sec > buckets[-1][0]:
            b = Bucket()
            buckets.append((sec, b))
            self.last_sec = max(self.last_sec, sec)
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


class _Window:
    """Per-key totals of one window width over [end - width, end), kept up to date: a record
    into a second inside it is added here too, and when `end` moves the seconds entering are
    added and those leaving subtracted (`Aggregator._by_sec`). So a query costs the keys it
    returns, not every key times every second of the window."""

    __slots__ = ("buckets", "end", "totals", "used", "width", "window_s")

    def __init__(self, window_s: float, end: int, used: float) -> None:
        self.window_s = window_s
        self.width = int(window_s)
        self.end = end
        self.used = used
        self.totals: dict[SeriesKey, Totals] = {}
        self.buckets: dict[SeriesKey, int] = {}   # buckets of the key inside the window

    def add(self, key: SeriesKey, b: Bucket, n: int = 1) -> None:
        """Add bucket `b`, standing for `n` of the key's buckets (a sealed minute: its seconds)."""
        t = self.totals.get(key)
        if t is None:
            t = self.totals[key] = Totals(self.window_s)
            self.buckets[key] = 0
        t.add_bucket(b)
        self.buckets[key] += n

    def remove(self, key: SeriesKey, b: Bucket) -> None:
        t = self.totals.get(key)
        if t is None:
            return
        n = self.buckets[key] - 1
        if n <= 0:
            del self.totals[key], self.buckets[key]
        else:
            self.buckets[key] = n
            t.sub_bucket(b)


class _Sealed:
    """A key's seconds of one complete minute merged (`Aggregator._seal`): `bucket` their sum,
    `n` how many 1 s buckets it stands for."""

    __slots__ = ("bucket", "n")

    def __init__(self) -> None:
        self.bucket = Bucket()
        self.n = 0


def _add(target: Bucket | Totals, success: float, failure: float, requests: float,
         latency: Sequence[float] | None, index: list[int] | None, latency_sum: float, tcp_open: float,
         tcp_close: float, read_bytes: float, write_bytes: float) -> None:
    target.success += success
    target.failure += failure
    target.requests += requests
    if latency is not None:
        if target.latency is None:
            target.latency = [0.0] * N_LATENCY
        lat = target.latency
        for i, count in enumerate(latency):
            if count:
                lat[index[i] if index is not None else i] += count
        target.latency_sum += latency_sum
    target.tcp_open += tcp_open
    target.tcp_close += tcp_close
    target.read_bytes += read_bytes
    target.write_bytes += write_bytes


def _merge(target: Bucket, b: Bucket) -> None:
    """Add bucket `b` into `target` (downsampling)."""
    target.success += b.success
    target.failure += b.failure
    target.requests += b.requests
    if b.latency is not None:
        lat = target.latency
        target.latency = b.latency.copy() if lat is None else list(map(operator.add, lat, b.latency))
        target.latency_sum += b.latency_sum
    target.tcp_open += b.tcp_open
    target.tcp_close += b.tcp_close
    target.read_bytes += b.read_bytes
    target.write_bytes += b.write_bytes


_COUNTERS = tuple((name, operator.attrgetter(name)) for name in (
    "success", "failure", "requests", "latency_sum", "tcp_open", "tcp_close", "read_bytes", "write_bytes"))
_LATENCY = operator.attrgetter("latency")


def _sum_into(target: Bucket | Totals, buckets: list[Bucket]) -> None:
    """`target` (fresh) becomes the sum of `buckets`, field by field in C loops (what `_merge` or
    `Totals.add_bucket` of each in turn gives, in the same order; ~3 µs a bucket instead of ~4).
    A Totals' histogram counts are floats, a Bucket's stay what they were (ints from columns)."""
    for name, get in _COUNTERS:
        setattr(target, name, sum(map(get, buckets), 0.0))
    lats = [lat for lat in map(_LATENCY, buckets) if lat is not None]
    if not lats:
        return
    if isinstance(target, Totals):
        target.latency = list(map(sum, zip(*lats), repeat(0.0)))
    elif len(lats) == 1:
        target.latency = lats[0].copy()
    else:
        target.latency = list(map(sum, zip(*lats)))


MAX_WINDOWS = 8          # window widths kept sliding at once
WINDOW_IDLE_S = 120.0    # a width nobody asked for this long stops being kept

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


COARSE_S = 60               # a downsampled bucket's width
SEAL_AFTER_S = 5            # a minute is sealed (its seconds merged per key) once this much past its end
DOWNSAMPLE_AFTER_S = 600    # per-second buckets older than this are merged into minute buckets


class Aggregator:
    """`retention_s`: how long buckets are kept. `downsample_after_s` (0: never): per-second
    buckets older than this are merged into one bucket per minute (`downsample`), which bounds
    memory by keys × (this + retention / 60) instead of keys × retention."""

    def __init__(self, retention_s: int = 3600, clock: Callable[[], float] = time.time,
                 downsample_after_s: int = DOWNSAMPLE_AFTER_S) -> None:
        self.retention_s = retention_s
        self.clock = clock
        self.downsample_after_s = downsample_after_s
        self._coarse_before = -(1 << 62)  # seconds before this are filed in minute buckets
        self._history: dict[SeriesKey, _History] = {}
        # key -> reporter (agent id) -> (time, value): open connections are a gauge per agent.
        self._gauges: dict[SeriesKey, dict[str, tuple[float, float]]] = {}
        # key -> the reporters whose gauge for it is > 0. Agents keep a closed peer's gauge at 0
        # forever, so most keys of a long-running cluster are all zeros: a query walks only these.
        self._open: dict[SeriesKey, set[str]] = {}
        # second -> the buckets of that second (key, bucket): what enters and leaves a sliding window
        self._by_sec: dict[int, list[tuple[SeriesKey, Bucket]]] = {}
        self._windows: dict[float, _Window] = {}
        # Sealed minutes: minute start -> key -> its 1 s buckets of that minute merged, for the
        # complete minutes in [_sealed_lo, _sealed_before) (not yet downsampled; a late record
        # into one is added to its sum too). A window's first build takes whole minutes from
        # here, and downsampling a sealed minute only drops its seconds.
        self._minutes: dict[int, dict[SeriesKey, _Sealed]] = {}
        self._sealed_lo = -(1 << 62)
        self._sealed_before = -(1 << 62)

    def __len__(self) -> int:
        return len(self._history)

    def record(self, key: SeriesKey, *, t: float | None = None, success: float = 0, failure: float = 0,
               requests: float = 0, latency: Sequence[float] | None = None, latency_bounds: Sequence[float] = BOUNDS,
               latency_sum: float = 0, tcp_open: float = 0, tcp_close: float = 0, read_bytes: float = 0,
               write_bytes: float = 0) -> None:
        """Add deltas observed at time `t` (default: now) to the key's bucket for that second (or
        its minute's, past the downsampling horizon: a replay of old history)."""
        sec = self.filed_second(int(self.clock() if t is None else t))
        b, created = self._bucket(key, sec)
        index = rebin_index(latency_bounds) if latency is not None and latency_bounds is not BOUNDS else None
        _add(b, success, failure, requests, latency, index, latency_sum, tcp_open, tcp_close, read_bytes,
             write_bytes)
        if self._sealed_lo <= sec < self._sealed_before:  # a late record into a sealed minute
            minute = sec - sec % COARSE_S
            sealed = self._minutes.setdefault(minute, {})
            m = sealed.get(key)
            if m is None:
                m = sealed[key] = _Sealed()
            m.n += created
            _add(m.bucket, success, failure, requests, latency, index, latency_sum, tcp_open, tcp_close,
                 read_bytes, write_bytes)
        for w in self._windows.values():
            # A second already inside a kept window (a report that crossed a second boundary, a
            # replay): the window's totals take it now; a later second enters when `end` moves.
            if w.end - w.width <= sec < w.end:
                tot = w.totals.get(key)
                if tot is None:
                    tot = w.totals[key] = Totals(w.window_s)
                    w.buckets[key] = 0
                if created:
                    w.buckets[key] += 1
                _add(tot, success, failure, requests, latency, index, latency_sum, tcp_open, tcp_close,
                     read_bytes, write_bytes)

    # ------------------------------------------------------------- batch ingest (columns)
    def in_place(self, sec: int) -> bool:
        """May a batch add into `bucket_at(key, sec)` in place? Not when a kept window already
        holds second `sec` or its minute is sealed: those sums must see the record too
        (`add_bucket` keeps them)."""
        if self._sealed_lo <= sec < self._sealed_before:
            return False
        return not any(w.end - w.width <= sec < w.end for w in self._windows.values())

    def filed_second(self, sec: int) -> int:
        """The second a record of second `sec` is filed at: itself, or past the downsampling
        horizon the middle second of its minute (where that minute's bucket is)."""
        return sec if sec >= self._coarse_before else sec - sec % COARSE_S + COARSE_S // 2

    def bucket_at(self, key: SeriesKey, sec: int) -> Bucket:
        """The key's bucket of second `sec` (a `filed_second`), to add to in place: only when
        `in_place(sec)` (else `add_bucket`, which keeps the windows and sealed minutes up to
        date)."""
        return self._bucket(key, sec)[0]

    def _bucket(self, key: SeriesKey, sec: int) -> tuple[Bucket, bool]:
        """The key's bucket of filed second `sec`, and whether it was created now (then indexed
        by second, for pruning and downsampling)."""
        hist = self._history.get(key)
        if hist is None:
            hist = self._history[key] = _History()
        coarse = sec < self._coarse_before
        n = len(hist.coarse if coarse else hist.buckets)
        b = hist.at(sec, coarse)
        created = len(hist.coarse if coarse else hist.buckets) > n
        if created:
            self._by_sec.setdefault(sec, []).append((key, b))
        return b, created

    def add_bucket(self, key: SeriesKey, sec: int, d: Bucket) -> None:
        """Add a bucket of deltas `d` to the key's bucket of second `sec` and to the kept windows
        holding it (what `record` does for one series)."""
        self.record(key, t=sec, success=d.success, failure=d.failure, requests=d.requests, latency=d.latency,
                    latency_sum=d.latency_sum, tcp_open=d.tcp_open, tcp_close=d.tcp_close, read_bytes=d.read_bytes,
                    write_bytes=d.write_bytes)

    def set_gauge(self, key: SeriesKey, reporter: str, value: float, t: float | None = None) -> None:
        self._gauges.setdefault(key, {})[reporter] = (self.clock() if t is None else t, value)
        if value > 0:
            self._open.setdefault(key, set()).add(reporter)
        else:
            self._not_open(key, reporter)

    def _not_open(self, key: SeriesKey, reporter: str) -> None:
        reporters = self._open.get(key)
        if reporters is not None:
            reporters.discard(reporter)
            if not reporters:
                del self._open[key]

    def drop_reporter(self, reporter: str) -> None:
        """An agent went away: its open-connection gauges no longer describe anything."""
        for key in list(self._gauges):
            per = self._gauges[key]
            per.pop(reporter, None)
            if not per:
                del self._gauges[key]
        for key in list(self._open):
            self._not_open(key, reporter)

    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]:
        """Per key, the sums over the last `window_s` *complete* seconds (buckets
        [int(now) - window, int(now))) plus the latest open-connection gauge within the window.

        The second in progress is left out: agents report about once a second, so whether its
        bucket already holds this second's report depends on the report's phase, and counting it
        while dividing by the full window read rates up to 1/window low (11 % at 10 s). Complete
        seconds each hold one report of a steadily reporting agent; the price is that traffic
        shows up in stats at most one second later.

        The Totals returned are the kept window's (`_Window`): read them, merge them into your
        own, never change them."""
        now = self.clock() if now is None else now
        end = int(now)  # exclusive
        window = self._window(window_s, end, now)
        if window is not None:
            totals = window.totals
            out = dict(totals) if where is None else {k: t for k, t in totals.items() if where(k)}
        else:
            out = self._scan(window_s, end, where)
        gauges, since = self._gauges, now - window_s
        for key in self._open:
            if where is not None and not where(key):
                continue
            live = [v for ts, v in gauges[key].values() if ts >= since]
            # Agents keep a closed peer's gauge at 0 forever: zero open connections is not TCP
            # activity, or every peer ever seen would stay in edges and --from/--to rows.
            if sum(live) > 0:
                gauged = out.get(key)
                gauged = out[key] = gauged.copy() if gauged is not None else Totals(window_s)
                gauged.open_connections = sum(live)
                gauged.has_gauge = True
        return out

    def _scan(self, window_s: float, end: int, where: Callable[[SeriesKey], bool] | None) -> dict[SeriesKey, Totals]:
        """The window summed from every key's buckets (a query about a moment the kept windows
        have moved past)."""
        first = end - int(window_s)
        out: dict[SeriesKey, Totals] = {}
        for key, hist in self._history.items():
            if hist.last_sec < first or (where is not None and not where(key)):
                continue
            tot = Totals(window_s)
            n = 0
            for buckets in (hist.buckets, hist.coarse):
                for sec, b in reversed(buckets):
                    if sec < first:
                        break
                    if sec < end:
                        tot.add_bucket(b)
                        n += 1
            if n:
                out[key] = tot
        return out

    def _window(self, window_s: float, end: int, now: float) -> _Window | None:
        """The kept window of this width, moved to `end`; None when `end` is behind it."""
        w = self._windows.get(window_s)
        if w is not None and end < w.end:
            return None
        width = int(window_s)
        if w is None or end - w.end >= width:
            if w is None and len(self._windows) >= MAX_WINDOWS:
                del self._windows[min(self._windows, key=lambda k: self._windows[k].used)]
            w = self._windows[window_s] = _Window(window_s, end, now)
            by_sec, minutes = self._by_sec, self._minutes
            lo, sealed_end = self._sealed_lo, min(end, self._sealed_before)
            per_key: dict[SeriesKey, list[Bucket]] = {}
            counts = w.buckets
            sec = end - width
            while sec < end:
                if sec % COARSE_S == 0 and lo <= sec and sec + COARSE_S <= sealed_end:
                    # a whole sealed minute: its keys' sums, not its seconds
                    for key, m in minutes.get(sec, {}).items():
                        got = per_key.get(key)
                        if got is None:
                            per_key[key] = [m.bucket]
                            counts[key] = m.n
                        else:
                            got.append(m.bucket)
                            counts[key] += m.n
                    sec += COARSE_S
                    continue
                for key, b in by_sec.get(sec, ()):
                    got = per_key.get(key)
                    if got is None:
                        per_key[key] = [b]
                        counts[key] = 1
                    else:
                        got.append(b)
                        counts[key] += 1
                sec += 1
            for key, got in per_key.items():  # each key's sum field by field, in C loops
                tot = w.totals[key] = Totals(window_s)
                _sum_into(tot, got)
        else:
            by_sec = self._by_sec
            for sec in range(w.end, end):                   # entering
                for key, b in by_sec.get(sec, ()):
                    w.add(key, b)
            for sec in range(w.end - width, end - width):   # leaving
                for key, b in by_sec.get(sec, ()):
                    w.remove(key, b)
            w.end = end
        w.used = now
        return w

    def totals(self, window_s: float, now: float | None = None,
               where: Callable[[SeriesKey], bool] | None = None) -> Totals:
        total = Totals(window_s)
        for t in self.totals_by_key(window_s, now, where).values():
            total.merge(t)
        return total

    def seal(self, now: float | None = None) -> int:
        """Merge, per key, the 1 s buckets of each minute that ended `SEAL_AFTER_S` ago into that
        minute's sum (`_minutes`); returns buckets merged. Each second is merged once; a record
        arriving later into a sealed minute is added to its sum as well (`record`)."""
        now = self.clock() if now is None else now
        target = int(now) - SEAL_AFTER_S
        target -= target % COARSE_S
        start = max(self._sealed_before, self._sealed_lo, self._coarse_before)
        if start <= -(1 << 61):  # nothing sealed yet: from the oldest second held
            start = min((s for s in self._by_sec if s >= self._coarse_before), default=target)
            start -= start % COARSE_S
        if target <= start:
            return 0
        if self._sealed_before < start:
            self._sealed_lo = start
        by_sec, minutes = self._by_sec, self._minutes
        merged = 0
        for minute in range(start, target, COARSE_S):
            per_key: dict[SeriesKey, list[Bucket]] = {}
            for sec in range(minute, minute + COARSE_S):
                for key, b in by_sec.get(sec, ()):
                    seconds = per_key.get(key)
                    if seconds is None:
                        per_key[key] = [b]
                    else:
                        seconds.append(b)
            if not per_key:
                continue
            sealed = minutes[minute] = {}
            for key, seconds in per_key.items():
                m = sealed[key] = _Sealed()
                m.n = len(seconds)
                _sum_into(m.bucket, seconds)
                merged += m.n
        self._sealed_before = target
        return merged

    def downsample(self, now: float | None = None) -> int:
        """Merge the per-second buckets of whole minutes older than `downsample_after_s` into one
        bucket per key and minute, filed at the minute's middle second; returns buckets merged.

        A window counts a minute bucket when its middle second is inside the window, so a window
        reaching past the horizon (longer than `downsample_after_s`) has its far edge rounded to
        the nearest minute; windows within it are answered from per-second buckets as before, and
        a window covering whole minutes gets exactly the same sums. Kept windows holding merged
        seconds trade them for the minute buckets now inside them (their totals stay those of a
        fresh sum)."""
        if not self.downsample_after_s:
            return 0
        now = self.clock() if now is None else now
        horizon = int(now) - self.downsample_after_s
        oldest = int(now) - self.retention_s
        new = horizon - horizon % COARSE_S
        by_sec = self._by_sec
        prev = self._coarse_before
        if new <= prev:
            return 0
        if prev < 0:
            prev = min(by_sec, default=new)
            prev -= prev % COARSE_S
        windows = [w for w in self._windows.values() if w.end - w.width < new and w.end > prev]
        history = self._history
        self._coarse_before = new
        merged = 0
        sealed_lo, sealed_before = self._sealed_lo, self._sealed_before
        for minute in range(prev, new, COARSE_S):
            csec = minute + COARSE_S // 2
            sealed = self._minutes.pop(minute, None)
            if sealed_lo <= minute and minute + COARSE_S <= sealed_before and not any(
                    w.end - w.width < minute + COARSE_S and w.end > minute
                    and not (w.end - w.width <= minute and minute + COARSE_S <= w.end) for w in windows):
                # Sealed, and no kept window's edge inside it: its sums are the minute's buckets;
                # the seconds are dropped.
                merged += self._drop_seconds(minute, csec, sealed or {}, windows)
                continue
            per_key: dict[SeriesKey, list[tuple[int, Bucket]]] = {}
            # Seconds past the retention (--downsample-after = --retention) are not merged: their
            # buckets may be pruned already; only a lagging kept window still holds them, and
            # they leave it one by one through the index.
            for sec in range(max(minute, oldest), minute + COARSE_S):
                for key, b in by_sec.pop(sec, ()):
                    per_key.setdefault(key, []).append((sec, b))
            for key, seconds in per_key.items():
                hist = history.get(key)
                if hist is None:
                    continue
                fine = hist.buckets
                for sec, b in seconds:
                    if fine and fine[0][1] is b:
                        fine.popleft()
                    else:
                        fine.remove((sec, b))
                merged += len(seconds)
                partial = []
                for w in windows:
                    lo, hi = w.end - w.width, w.end
                    if lo <= minute and minute + COARSE_S <= hi:
                        # The whole minute is inside: same sums, one bucket instead of several.
                        w.buckets[key] -= len(seconds) - 1
                    elif lo < minute + COARSE_S and hi > minute:
                        for sec, b in seconds:  # before the buckets change (the first becomes the minute's)
                            if lo <= sec < hi:
                                w.remove(key, b)
                        partial.append(w)
                # Minutes are merged whole, once, oldest first: this minute is the key's newest.
                cb = seconds[0][1]  # the minute's first second becomes its bucket
                hist.coarse.append((csec, cb))
                by_sec.setdefault(csec, []).append((key, cb))
                hist.last_sec = max(hist.last_sec, csec)
                for _, b in seconds[1:]:
                    _merge(cb, b)
                for w in partial:
                    if w.end - w.width <= csec < w.end:
                        w.add(key, cb)
        self._sealed_lo = max(self._sealed_lo, new)
        return merged

    def _drop_seconds(self, minute: int, csec: int, sealed: dict[SeriesKey, _Sealed], windows: list[_Window]) -> int:
        """Downsample a sealed minute no kept window's edge is inside: each key's sum becomes its
        minute bucket, its seconds go. A window holding the whole minute keeps its totals (the
        same sums) and counts one bucket for the key instead of `n`."""
        by_sec, history = self._by_sec, self._history
        for sec in range(minute, minute + COARSE_S):
            by_sec.pop(sec, None)
        end = minute + COARSE_S
        inside = [w for w in windows if w.end - w.width <= minute and end <= w.end]
        merged = 0
        for key, m in sealed.items():
            hist = history.get(key)
            if hist is None:
                continue
            fine = hist.buckets
            while fine and fine[0][0] < end:  # older minutes are gone already: these are this one's
                fine.popleft()
            merged += m.n
            for w in inside:
                w.buckets[key] -= m.n - 1
            hist.coarse.append((csec, m.bucket))
            by_sec.setdefault(csec, []).append((key, m.bucket))
            hist.last_sec = max(hist.last_sec, csec)
        return merged

    def prune(self, now: float | None = None) -> int:
        """Forget buckets older than the retention, and keys left empty, and downsample what
        is past the horizon; returns keys dropped."""
        now = self.clock() if now is None else now
        oldest = int(now) - self.retention_s
        for width in [k for k, w in self._windows.items() if w.used < now - WINDOW_IDLE_S]:
            del self._windows[width]
        # A kept window last moved before now still holds seconds older than the retention: their
        # index stays until it slides past them (it subtracts what leaves through `_by_sec`; an
        # entry gone before that was counted in a 1 h window forever).
        index_oldest = min([oldest, *(w.end - w.width for w in self._windows.values())])
        for sec in [s for s in self._by_sec if s < index_oldest]:
            del self._by_sec[sec]
        if self._sealed_lo < oldest:  # a minute some of whose seconds are gone is no longer sealed
            first = oldest + (-oldest) % COARSE_S
            for minute in [m for m in self._minutes if m < first]:
                del self._minutes[minute]
            self._sealed_lo = first
        self.seal(now)
        self.downsample(now)
        dropped = 0
        for key in list(self._history):
            hist = self._history[key]
            buckets, coarse = hist.buckets, hist.coarse
            while coarse and coarse[0][0] < oldest:
                coarse.popleft()
            while buckets and buckets[0][0] < oldest:
                buckets.popleft()
            if not buckets and not coarse:
                del self._history[key]
                dropped += 1
        for key in list(self._gauges):
            per = self._gauges[key]
            for reporter in [r for r, (ts, _) in per.items() if ts < oldest]:
                del per[reporter]
                self._not_open(key, reporter)
            if not per:
                del self._gauges[key]
        return dropped

    def keys(self) -> Iterable[SeriesKey]:
        return self._history.keys()
