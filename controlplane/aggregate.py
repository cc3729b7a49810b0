"""Time-bucketed aggregation of what agents observed, and the math of windows over it.

Every series key is the tuple of `PEER_LABELS` values (direction, source and destination
workload and pod, service, authority, protocol). The store is columnar (numpy): each key has a
small integer id, and each second that saw traffic holds blocks of (id, column, value) entries —
the counters and latency buckets of `FIELDS`, only non-zero values — for `retention_s` seconds;
past `downsample_after_s` a minute's blocks are merged into one, and past `coarsen_after_s` the
minute blocks of 5 minutes (the hour: ~2 minutes of seconds, ~13 minute and ~9 five-minute blocks). A key with no traffic for longer
than the retention is dropped, which bounds memory by the traffic of the last hour. A query sums
the blocks of any window (10 s .. 1 h; kept windows slide as seconds pass) and derives rates,
success rate and latency quantiles from the merged histogram, as Prometheus'
`histogram_quantile` does.
"""

from __future__ import annotations

import gc
import math
import time
from array import array
from collections.abc import Callable, Collection, Container, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
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


def histogram_quantiles(qs: Sequence[float], bounds: Sequence[float], counts: np.ndarray) -> np.ndarray:
    """`histogram_quantile` for each row of `counts` (rows x (len(bounds) + 1), non-cumulative, last
    +Inf) and each of `qs`: a (len(qs), rows) array, NaN where a row has no observations. The same
    float operations in the same order as `histogram_quantile` (running sums left to right), so
    each value is the one it returns."""
    counts = np.asarray(counts, dtype=np.float64)
    rows, width = counts.shape
    out = np.full((len(qs), rows), np.nan)
    if rows == 0:
        return out
    cum = np.cumsum(counts, axis=1)              # sequential, as `cumulative + count`
    before = np.zeros_like(cum)
    before[:, 1:] = cum[:, :-1]
    total = cum[:, -1]
    seen = total > 0
    if width != len(bounds) + 1:
        raise ValueError(f"{width} buckets for {len(bounds)} bounds")
    top = float(bounds[-1])
    upper = np.array([*(float(b) for b in bounds), top])   # the +Inf bucket's: never used
    lower = np.array([0.0, *(float(b) for b in bounds)])
    r = np.arange(rows)
    for k, q in enumerate(qs):
        rank = q * total
        hit = (cum >= rank[:, None]) & (counts > 0)
        i = hit.argmax(axis=1)
        found = hit[r, i]
        count = np.where(found, counts[r, i], 1.0)
        lo, hi = lower[i], upper[i]
        value = lo + (hi - lo) * (rank - before[r, i]) / count
        value = np.where(found & (i < len(bounds)), value, top)
        out[k] = np.where(seen, value, np.nan)
    return out


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


# ------------------------------------------------------------------ the store
# A record is a few (series id, column, value) entries: the columns of a key's sums, in this
# order, then the latency histogram's buckets. Only non-zero values are entries (sparse).
FIELDS = ("success", "failure", "requests", "latency_sum", "tcp_open", "tcp_close", "read_bytes", "write_bytes")
COLUMN = {name: i for i, name in enumerate(FIELDS)}
LAT0 = len(FIELDS)            # the first latency bucket's column
NCOL = LAT0 + N_LATENCY
LATENCY_SUM = COLUMN["latency_sum"]
_NEVER = -(1 << 62)
_FREE = 1 << 62               # a free id's `_last`: never older than anything


class Pending:
    """A filed second's records not yet frozen into a block: the entries as appended (the
    columns ingest appends to these arrays directly), and whole chunks of numpy arrays."""

    __slots__ = ("chunks", "cols", "ids", "vals")

    def __init__(self) -> None:
        self.ids = array("i")
        self.cols = array("B")
        self.vals = array("d")
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []


class _Block:
    """Entries of one filed second (or of one downsampled minute or 5 minutes), ordered by id:
    each distinct id once (`uids`, int32, ascending) with how many entries it has (`counts`,
    uint8 — int32 past 255), and per entry `cols` (uint8) and `vals` (uint16 when each is an
    integer below 2^16, else float32 when each is exact so, else float64). An id's entries may
    repeat a column (sums are group sums). ~4.3 bytes an entry with ~6 entries an id (an int32
    id per entry and float32 values took ~9.7)."""

    __slots__ = ("cols", "counts", "uids", "vals")

    def __init__(self, ids: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        """`ids`: the entries' ids, grouped (equal ids side by side: sorted)."""
        self.cols, self.vals = cols, vals
        n = len(ids)
        heads = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        self.uids: np.ndarray = ids[np.concatenate(([0], heads))] if n else ids[:0].astype(np.int32)
        counts = np.diff(np.concatenate(([0], heads, [n]))) if n else np.zeros(0, dtype=np.int64)
        self.counts: np.ndarray = counts.astype(np.uint8 if not n or counts.max() < 256 else np.int32)

    @property
    def ids(self) -> np.ndarray:
        """Each entry's id."""
        ids: np.ndarray = np.repeat(self.uids, self.counts)
        return ids

    def __len__(self) -> int:
        return len(self.cols)

    def flat(self) -> np.ndarray:
        """Each entry's position in a row-major (id, column) matrix."""
        flat: np.ndarray = np.repeat(self.uids.astype(np.int64) * NCOL, self.counts) + self.cols
        return flat

    @property
    def nbytes(self) -> int:
        return int(self.uids.nbytes + self.counts.nbytes + self.cols.nbytes + self.vals.nbytes)


def _compact(ids: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> list[_Block]:
    """Entries (grouped by id) as blocks, no value rounded: integers below 2^16 (counts: most
    entries) with 2-byte values, the others float32 holds exactly (byte counts below 2^24)
    with 4, the rest (latency sums) with 8. (One more split, uint8 for counts below 256, saves
    less than the extra block's distinct ids cost.)"""
    with np.errstate(invalid="ignore"):   # NaN, inf, negatives: not small (compared unequal)
        v16 = vals.astype(np.uint16)
    small = v16 == vals
    if small.all():
        return [_Block(ids, cols, v16)]
    v32 = vals.astype(np.float32)
    exact = v32 == vals
    out = []
    for mask, v in ((small, v16), (exact & ~small, v32), (~exact, vals)):
        if mask.all():
            return [_Block(ids, cols, v)]
        if mask.any():
            out.append(_Block(ids[mask], cols[mask], v[mask]))
    return out


def _order_by_id(ids: np.ndarray) -> np.ndarray:
    """The permutation putting `ids` (non-negative) in order: each id with its position in its
    low 24 bits, sorted as one int64 — about twice as fast as `np.argsort` (an id's entries
    need not keep their order: they are summed)."""
    n = len(ids)
    if n >= 1 << 24:
        order: np.ndarray = np.argsort(ids)
        return order
    packed = (ids.astype(np.int64) << 24) | np.arange(n, dtype=np.int64)
    packed.sort()
    order = packed & 0xFFFFFF
    return order


MERGE_CHUNK = 1 << 20   # entries summed at a time by a dense merge (bounds what it holds at once)


def _merged(blocks: list[_Block]) -> list[_Block]:
    """Blocks summing `blocks`: one entry per (id, column) that any of them has."""
    total = sum(len(b) for b in blocks)
    size = (max(int(b.uids.max()) for b in blocks if len(b.uids)) + 1) * NCOL if total else 0
    if total and size <= 4 * total:
        # Dense (a minute of a busy store: more entries than cells): sum over the whole (id,
        # column) range — a scatter, no sort (np.unique's sort was most of a merge's CPU) — a
        # few blocks at a time into one accumulator: a minute of 1,000 agents' seconds
        # concatenated at once held ~0.5 GB for the merge's moment, this ~0.15 GB.
        present = np.zeros(size, dtype=bool)
        acc = np.zeros(size)
        i = 0
        while i < len(blocks):
            j, n = i, 0
            while j < len(blocks) and (n == 0 or n + len(blocks[j]) <= MERGE_CHUNK):
                n += len(blocks[j])
                j += 1
            flat = np.concatenate([x.flat() for x in blocks[i:j]])
            present[flat] = True
            acc += np.bincount(flat, weights=np.concatenate([x.vals.astype(np.float64) for x in blocks[i:j]]),
                               minlength=size)
            i = j
        cells = np.flatnonzero(present)
        sums: np.ndarray = acc[cells]
    else:
        every = np.concatenate([x.flat() for x in blocks])
        vals = np.concatenate([x.vals.astype(np.float64) for x in blocks])
        cells, inverse = np.unique(every, return_inverse=True)
        sums = np.bincount(inverse, weights=vals, minlength=len(cells))
    ids = (cells // NCOL).astype(np.int32)
    return _compact(ids, (cells % NCOL).astype(np.uint8), sums)


class _Sums:
    """Per series id, the sums of a set of blocks (`m`, one row of NCOL per id) and how many of
    the blocks hold the id (`n`: the id is in an answer while n > 0)."""

    __slots__ = ("m", "n")

    def __init__(self, rows: int) -> None:
        self.m = np.zeros((rows, NCOL))
        self.n = np.zeros(rows, dtype=np.int32)

    def fit(self, rows: int) -> None:
        if rows > len(self.n):
            grown = max(rows, 2 * len(self.n))
            m = np.zeros((grown, NCOL))
            m[:len(self.n)] = self.m
            n = np.zeros(grown, dtype=np.int32)
            n[:len(self.n)] = self.n
            self.m, self.n = m, n

    def add(self, b: _Block) -> None:
        # float64 weights: ufunc.at's fast path wants the array's dtype (float32: ~10x slower)
        np.add.at(self.m.reshape(-1), b.flat(), b.vals.astype(np.float64, copy=False))
        self.n[b.uids] += 1

    def sub(self, b: _Block) -> None:
        np.subtract.at(self.m.reshape(-1), b.flat(), b.vals.astype(np.float64, copy=False))
        n = self.n
        n[b.uids] -= 1
        gone = b.uids[n[b.uids] == 0]
        if len(gone):
            self.m[gone] = 0.0   # no rounding residue of the sums subtracted (latency_sum, bytes)


class _Window:
    """The sums of one window width over [end - width, end), kept up to date: a block of a
    second inside it is added when it is frozen, and when `end` moves the blocks of the seconds
    entering are added and those leaving subtracted. Every block filed at a second in
    [end - width, end) is in `sums`, no other."""

    __slots__ = ("end", "sums", "used", "width", "window_s")

    def __init__(self, window_s: float, end: int, used: float, rows: int) -> None:
        self.window_s = window_s
        self.width = int(window_s)
        self.end = end
        self.used = used
        self.sums = _Sums(rows)

    def holds(self, sec: int) -> bool:
        return self.end - self.width <= sec < self.end


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


@dataclass
class GroupSums:
    """The sums of a window per group (`Aggregator.group_sums`): `m` a row of `FIELDS` + latency
    buckets (NCOL columns) per group in `groups` (`index`: group -> row), the open-connection
    gauges' sum, whether a gauge counts, and whether the group has anything in the window."""

    window_s: float
    groups: list[object]
    index: Mapping[object, int]
    m: np.ndarray
    open_connections: np.ndarray
    has_gauge: np.ndarray
    present: np.ndarray

    def totals(self, j: int) -> Totals:
        t = _totals(self.window_s, self.m[j].tolist())
        if self.has_gauge[j]:
            t.open_connections = float(self.open_connections[j])
            t.has_gauge = True
        return t


class SeriesStore(Protocol):
    """What stat, edges and routes read: the `Aggregator` here, or a Prometheus snapshot
    (controlplane/promstore.py)."""

    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]: ...


COARSE_S = 60               # a downsampled block's width
COARSER_S = 300             # the width of a block of downsampled minutes
DOWNSAMPLE_AFTER_S = 120    # per-second blocks older than this are merged into minute blocks
COARSEN_AFTER_S = 900       # minute blocks older than this are merged into 5-minute blocks


def _totals(window_s: float, row: list[float]) -> Totals:
    return Totals(window_s, row[0], row[1], row[2], row[LAT0:], row[3], row[4], row[5], row[6], row[7])


@dataclass
class MergePlan:
    """A tier's merge, planned on the store's loop (`Aggregator.merge_plan`): per span of
    `width` seconds from `prev` to `new`, the blocks it sums as they were then."""
    width: int
    base: int   # the tier's horizon when planned: a store past it drops the plan
    prev: int
    new: int
    spans: list[tuple[int, list[tuple[int, list[_Block]]]]]
    oldest: int   # seconds before this (past the retention) are not merged

    def compute(self) -> list[list[_Block]]:
        """Each span's merged blocks: numpy over immutable blocks, safe off the loop (most of it
        releases the GIL: the loop is not held for more than ~15 ms at a time meanwhile)."""
        return [_merged([b for _, bs in filed for b in bs]) if filed else [] for _, filed in self.spans]


class Aggregator:
    """`retention_s`: how long records are kept. `downsample_after_s` (0: never): the seconds
    older than this are merged into one block per minute (`downsample`); `coarsen_after_s` (0:
    never; only with minutes): the minutes older than this into one block per 5 minutes. Memory
    is then bounded by the entries of about downsample_after_s seconds + (coarsen_after_s -
    downsample_after_s) / 60 minutes + retention / 300 5-minute blocks instead of retention
    seconds (a block of a key active in most seconds of its span holds about as many entries
    as one of its seconds).

    Storage: each key gets a small integer id (`_ids`); each filed second holds blocks of
    (id, column, value) entries in numpy arrays (`_blocks`; each id once per block with its
    entry count, values in the narrowest exact type: ~4–5 bytes per non-zero value) instead of
    a Python object per key and second. A record lands in the second's `Pending`
    arrays first; `_flush` (at every query and prune) freezes them into a block, adding it to
    the kept windows holding its second."""

    def __init__(self, retention_s: int = 3600, clock: Callable[[], float] = time.time,
                 downsample_after_s: int = DOWNSAMPLE_AFTER_S, coarsen_after_s: int = COARSEN_AFTER_S) -> None:
        self.retention_s = retention_s
        self.clock = clock
        self.downsample_after_s = downsample_after_s
        self.coarsen_after_s = coarsen_after_s
        # The tiers: per block width (minutes, 5 minutes), the second before which every second
        # is filed at the middle second of its block of that width (a later tier's is <= an
        # earlier one's: the seconds before it went through minutes first).
        self._before = {COARSE_S: _NEVER, COARSER_S: _NEVER}
        self._ids: dict[SeriesKey, int] = {}
        self._keys: list[SeriesKey | None] = []    # id -> key (None: a free id)
        self._free: list[int] = []
        self._last = np.full(64, _NEVER, dtype=np.int64)   # id -> the last filed second holding it
        self._gen = np.zeros(64, dtype=np.int32)           # id -> how many times it was freed
        # Held gauges (set at t = +inf): per id their sum over reporters and how many reporters
        # hold one (an id held is never freed); per reporter, id -> its value.
        self._held = np.zeros(64)
        self._holders = np.zeros(64, dtype=np.int32)
        self._held_by: dict[str, dict[int, float]] = {}
        self._pending: dict[int, Pending] = {}
        self._blocks: dict[int, list[_Block]] = {}
        # key -> reporter (agent id) -> (time, value): open connections are a gauge per agent.
        self._gauges: dict[SeriesKey, dict[str, tuple[float, float]]] = {}
        # key -> the reporters whose gauge for it is > 0. Agents keep a closed peer's gauge at 0
        # forever, so most keys of a long-running cluster are all zeros: a query walks only these.
        self._open: dict[SeriesKey, set[str]] = {}
        self._windows: dict[float, _Window] = {}
        # Group numbers per id of pure key -> group functions (`totals_by_group`'s token), for the
        # ids below `rows`; `_epoch` counts the prunes that freed ids (an id reused: recompute).
        self._groupings: dict[Hashable, tuple[np.ndarray, list[object], dict[object, int], int, int, int,
                                              Callable[[SeriesKey], object]]] = {}
        self._epoch = 0
        self._reused: list[int] = []   # free ids given to a new key since the epoch began

    def __len__(self) -> int:
        return len(self._ids)

    # ------------------------------------------------------------- ids and entries
    def id_of(self, key: SeriesKey) -> int:
        i = self._ids.get(key)
        if i is None:
            if self._free:
                i = self._free.pop()
                self._keys[i] = key
                self._last[i] = _NEVER
                self._reused.append(i)
            else:
                i = len(self._keys)
                self._keys.append(key)
                if i >= len(self._last):
                    last = np.full(2 * len(self._last), _NEVER, dtype=np.int64)
                    last[:i] = self._last
                    gen = np.zeros(2 * len(self._last), dtype=np.int32)
                    gen[:i] = self._gen[:i]
                    held = np.zeros(2 * len(self._last))
                    held[:i] = self._held[:i]
                    holders = np.zeros(2 * len(self._last), dtype=np.int32)
                    holders[:i] = self._holders[:i]
                    self._last, self._gen, self._held, self._holders = last, gen, held, holders
            self._ids[key] = i
        return i

    def gen(self, ids: np.ndarray) -> np.ndarray:
        """The ids' generations: an id freed (its key dropped at the retention) gets a new one,
        so a cached key -> id is known stale."""
        got: np.ndarray = self._gen[ids]
        return got

    def pending(self, sec: int) -> Pending:
        """The entries of filed second `sec` (a `filed_second`) not frozen yet, to append to."""
        p = self._pending.get(sec)
        if p is None:
            p = self._pending[sec] = Pending()
        return p

    @property
    def _coarse_before(self) -> int:
        """Seconds before this are downsampled (filed at their minute's or 5 minutes' middle)."""
        return self._before[COARSE_S]

    def filed_second(self, sec: int) -> int:
        """The second a record of second `sec` is filed at: itself, or past the downsampling
        horizon the middle second of its minute (where that minute's block is), or past the
        coarsening horizon the middle second of its 5 minutes."""
        if sec >= self._before[COARSE_S]:
            return sec
        width = COARSER_S if sec < self._before[COARSER_S] else COARSE_S
        return sec - sec % width + width // 2

    def block_width(self, sec: int) -> int:
        """The width of the block holding second `sec`'s records: 1 (its own second), 60 (its
        minute's) or 300 (its 5 minutes'), aligned to the width."""
        if sec >= self._before[COARSE_S]:
            return 1
        return COARSER_S if sec < self._before[COARSER_S] else COARSE_S

    def tier_bytes(self) -> dict[int, int]:
        """The blocks' bytes per width (1: seconds, 60: minutes, 300: 5 minutes)."""
        self._flush()
        out = dict.fromkeys((1, COARSE_S, COARSER_S), 0)
        for sec, blocks in self._blocks.items():
            width = 1 if sec >= self._before[COARSE_S] else COARSER_S if sec < self._before[COARSER_S] else COARSE_S
            out[width] += sum(b.nbytes for b in blocks)
        return out

    def seconds_of(self, key: SeriesKey) -> list[int]:
        """The filed seconds whose blocks hold `key` (a minute's block: its middle second)."""
        self._flush()
        i = self._ids.get(key)
        return sorted(sec for sec, blocks in self._blocks.items() if any(np.any(b.uids == i) for b in blocks))

    def stored_entries(self) -> int:
        """Entries held in blocks (what memory grows with)."""
        self._flush()
        return sum(len(b) for blocks in self._blocks.values() for b in blocks)

    def stored_bytes(self) -> int:
        self._flush()
        return sum(b.nbytes for blocks in self._blocks.values() for b in blocks)

    def record(self, key: SeriesKey, *, t: float | None = None, success: float = 0, failure: float = 0,
               requests: float = 0, latency: Sequence[float] | None = None, latency_bounds: Sequence[float] = BOUNDS,
               latency_sum: float = 0, tcp_open: float = 0, tcp_close: float = 0, read_bytes: float = 0,
               write_bytes: float = 0) -> None:
        """Add deltas observed at time `t` (default: now) to the key's second (or its minute's,
        past the downsampling horizon: a replay of old history). A record of zeros still puts
        the key in the windows holding its second."""
        sec = self.filed_second(int(self.clock() if t is None else t))
        p = self.pending(sec)
        i = self.id_of(key)
        ids, cols, vals = p.ids, p.cols, p.vals
        n = len(ids)
        for col, v in ((0, success), (1, failure), (2, requests), (4, tcp_open), (5, tcp_close), (6, read_bytes),
                       (7, write_bytes)):
            if v:
                ids.append(i)
                cols.append(col)
                vals.append(v)
        if latency is not None:
            index = rebin_index(latency_bounds) if latency_bounds is not BOUNDS else None
            for b, count in enumerate(latency):
                if count:
                    ids.append(i)
                    cols.append(LAT0 + (index[b] if index is not None else b))
                    vals.append(count)
            if latency_sum:
                ids.append(i)
                cols.append(LATENCY_SUM)
                vals.append(latency_sum)
        if len(ids) == n:
            ids.append(i)
            cols.append(0)
            vals.append(0.0)

    def flush(self, before: int) -> None:
        """Freeze the pending seconds older than `before` now (the controller calls it every
        second for the seconds whose reports are in): a query or prune then finds at most a
        second or two to freeze, where ten seconds of a thousand agents' reports took ~0.4 s of
        the loop at once."""
        self._flush(before)

    def _flush(self, before: int | None = None) -> None:
        """Freeze every pending second (or those older than `before`) into a block (added to the
        kept windows holding it)."""
        if not self._pending:
            return
        if before is None:
            pending, self._pending = self._pending, {}
        else:
            pending = {sec: self._pending.pop(sec) for sec in [s for s in self._pending if s < before]}
        rows = len(self._keys)
        windows = list(self._windows.values())
        last = self._last
        for sec, p in pending.items():
            parts = [(np.array(p.ids, dtype=np.int32), np.array(p.cols, dtype=np.uint8),
                      np.array(p.vals, dtype=np.float64))] if len(p.ids) else []
            parts += p.chunks
            if not parts:
                continue
            if len(parts) == 1:
                ids, cols, vals = parts[0]
            else:
                ids = np.concatenate([x[0] for x in parts])
                cols = np.concatenate([x[1] for x in parts])
                vals = np.concatenate([x[2] for x in parts])
            if len(ids) > 1 and not (ids[1:] >= ids[:-1]).all():   # a block's entries by id
                order = _order_by_id(ids)
                ids, cols, vals = ids[order], cols[order], vals[order]
            for b in _compact(ids, cols, vals):
                self._blocks.setdefault(sec, []).append(b)
                np.maximum.at(last, b.uids, sec)
                for w in windows:
                    if w.holds(sec):
                        w.sums.fit(rows)
                        w.sums.add(b)

    def set_gauge(self, key: SeriesKey, reporter: str, value: float, t: float | None = None) -> None:
        """The reporter's open-connection gauge for the key, as of `t`; `t` = +inf: held until
        the reporter goes (`drop_reporter`; a ref'd gauge, sent when it changes) — kept per
        series id in arrays, so a query sums them by numpy."""
        if t == math.inf:
            i = self.id_of(key)
            per = self._held_by.setdefault(reporter, {})
            old = per.pop(i, None)
            if old is not None:
                self._held[i] -= old
                self._holders[i] -= 1
            if value:
                per[i] = value
                self._held[i] += value
                self._holders[i] += 1
            if not self._holders[i]:
                self._held[i] = 0.0   # no rounding residue
            return
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
        for i, value in self._held_by.pop(reporter, {}).items():
            self._held[i] -= value
            self._holders[i] -= 1
            if not self._holders[i]:
                self._held[i] = 0.0
        for key in list(self._gauges):
            per = self._gauges[key]
            per.pop(reporter, None)
            if not per:
                del self._gauges[key]
        for key in list(self._open):
            self._not_open(key, reporter)

    # ------------------------------------------------------------- queries
    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]:
        """Per key, the sums over the last `window_s` *complete* seconds ([int(now) - window,
        int(now))) plus the latest open-connection gauge within the window.

        The second in progress is left out: agents report about once a second, so whether it
        already holds this second's report depends on the report's phase, and counting it
        while dividing by the full window read rates up to 1/window low (11 % at 10 s). Complete
        seconds each hold one report of a steadily reporting agent; the price is that traffic
        shows up in stats at most one second later. The Totals returned are the caller's."""
        now = self.clock() if now is None else now
        out = self._by_key(self.sums(window_s, now), window_s, where)
        for key, live in self.gauges(window_s, now, where).items():
            got = out.get(key)
            got = out[key] = got if got is not None else Totals(window_s)
            got.open_connections = live
            got.has_gauge = True
        return out

    def _by_key(self, sums: _Sums, window_s: float,
                where: Callable[[SeriesKey], bool] | None) -> dict[SeriesKey, Totals]:
        keys = self._keys
        present = np.flatnonzero(sums.n[:len(keys)] > 0)
        if where is not None:
            present = np.array([i for i in present.tolist() if where(keys[i])], dtype=np.int64)  # type: ignore[arg-type]
        out: dict[SeriesKey, Totals] = {}
        if len(present):
            # A Totals per key is hundreds of thousands of new objects: the cyclic GC would walk
            # the whole heap several times while they are made (2/3 of the time at 300,000 keys).
            enabled = gc.isenabled()
            gc.disable()
            try:
                for i, row in zip(present.tolist(), sums.m[present].tolist()):
                    out[keys[i]] = _totals(window_s, row)  # type: ignore[index]
            finally:
                if enabled:
                    gc.enable()
        return out

    def _scan(self, window_s: float, end: int, where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]:
        """The window summed afresh from the blocks (no gauges): what a kept window must equal."""
        self._flush()
        return self._by_key(self._scan_sums(window_s, end), window_s, where)

    def gauges(self, window_s: float, now: float,
               where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, float]:
        """Per key with open connections, their sum over the reporters' latest values within the
        window (agents keep a closed peer's gauge at 0 forever: zero open connections is not TCP
        activity, or every peer ever seen would stay in edges and --from/--to rows)."""
        out = self._timed_gauges(window_s, now, where)
        keys, held = self._keys, self._held
        for i in np.flatnonzero(held[:len(keys)] != 0).tolist():
            key = keys[i]
            if key is not None and (where is None or where(key)):
                out[key] = out.get(key, 0.0) + float(held[i])
        return {key: live for key, live in out.items() if live > 0}

    def _timed_gauges(self, window_s: float, now: float,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, float]:
        """The gauges set at a time (older agents: every gauge every second), summed per key."""
        out: dict[SeriesKey, float] = {}
        gauges, since = self._gauges, now - window_s
        for key in self._open:
            if where is not None and not where(key):
                continue
            live = sum(v for ts, v in gauges[key].values() if ts >= since)
            if live > 0:
                out[key] = live
        return out

    def totals_by_group(self, window_s: float, now: float | None, group: Callable[[SeriesKey], object],
                        token: Hashable | None = None, only: Container[object] | None = None) -> dict[object, Totals]:
        """Per group (`group(key)`; None: the key is left out), the sums of its keys' totals —
        what merging `totals_by_key` per group gives — summed by numpy over the window's matrix
        (`stat deploy -A` over 170,000 keys: no Totals per key). `token`: names `group` when it
        is a pure function of the key, so each key's group is computed once and kept (until an
        id is freed); `only`: the groups wanted (the others are not built). `group_sums` gives
        the same sums as arrays."""
        got = self.group_sums(window_s, now, group, token)
        out: dict[object, Totals] = {}
        for j in np.flatnonzero(got.present).tolist():
            name = got.groups[j]
            if only is None or name in only:
                out[name] = got.totals(j)
        return out

    def grouping(self, group: Callable[[SeriesKey], object],
                 token: Hashable | None = None) -> tuple[np.ndarray, list[object], Mapping[object, int]]:
        """Each series id's group number under `group` (-1: none; the array may be longer than
        the ids), the groups by number and the numbers by group — kept per `token` as
        `totals_by_group` keeps them. The caller's to read, not to change."""
        self._flush()
        return self._group_ids(group, token, len(self._keys))

    def group_sums(self, window_s: float, now: float | None, group: Callable[[SeriesKey], object],
                   token: Hashable | None = None,
                   grouping: tuple[np.ndarray, list[object], Mapping[object, int]] | None = None) -> GroupSums:
        """`totals_by_group`'s sums as arrays, a row per group of the grouping (those without a
        key in the window too: `present` says which have one, or a gauge). `grouping`: the ids'
        groups already known (derived from `grouping`s, as `group` would give them; `group` is
        then asked only of keys holding a timed gauge)."""
        now = self.clock() if now is None else now
        sums = self.sums(window_s, now)
        rows = len(self._keys)
        gid, groups, index = grouping if grouping is not None else self._group_ids(group, token, rows)
        if len(gid) < rows:
            raise ValueError("a grouping older than the series ids")
        n = sums.n
        if len(n) < rows:
            sums.fit(rows)
            n = sums.n
        sel = np.flatnonzero((n[:rows] > 0) & (gid[:rows] >= 0))
        g = gid[sel].astype(np.int64)
        width = len(groups)
        flat = (g[:, None] * NCOL + np.arange(NCOL)).ravel()
        matrix = np.bincount(flat, weights=sums.m[sel].ravel(), minlength=width * NCOL).reshape(width, NCOL)
        # The held gauges per group by numpy too: a key's counts when the sum of its reporters' > 0.
        held = self._held[:rows]
        hsel = np.flatnonzero((held > 0) & (gid[:rows] >= 0))
        hg = gid[hsel].astype(np.int64)
        open_sum = np.bincount(hg, weights=held[hsel], minlength=width)
        gauged = np.bincount(hg, minlength=width) > 0
        present = (np.bincount(g, minlength=width) > 0) | gauged
        # Timed gauges (older agents), and keys holding both kinds: per key, as `gauges` does.
        timed = self._timed_gauges(window_s, now)
        if timed:
            ids = self._ids
            for key, live in timed.items():
                name = group(key)
                if name is None:
                    continue
                j = index.get(name)
                if j is None:   # a key without an id (a timed gauge only): a group of its own
                    groups, index = [*groups, name], {**index, name: len(groups)}  # the grouping's: not changed
                    j = len(groups) - 1
                    matrix = np.vstack([matrix, np.zeros((1, NCOL))])
                    open_sum, gauged, present = (np.append(open_sum, 0.0), np.append(gauged, False),
                                                 np.append(present, False))
                i = ids.get(key)
                both = float(self._held[i]) if i is not None and self._held[i] != 0 else 0.0
                present[j] = True
                if both > 0:
                    open_sum[j] -= both   # counted above alone: the key's sum is live + both
                if live + both > 0:
                    open_sum[j] += live + both
                    gauged[j] = True
        return GroupSums(window_s, groups, index, matrix, open_sum, gauged, present)

    def totals_of(self, window_s: float, now: float | None, keys: Collection[SeriesKey]) -> Totals:
        """The sums of `keys` over the window (and their open-connection gauges): what merging
        their `totals_by_key` gives — the counts and buckets exactly, the latency sum up to the
        order of float additions — from the window's blocks, only their entries of these keys
        (the dashboard's time series: a step per window, without a matrix of every key per step)."""
        now = self.clock() if now is None else now
        self._flush()
        end = int(now)
        ids = self._ids
        wanted = [ids[k] for k in keys if k in ids]
        row = np.zeros(NCOL)
        if wanted:
            want = np.zeros(len(self._keys), dtype=bool)
            want[wanted] = True
            for sec in range(end - int(window_s), end):
                for b in self._blocks.get(sec, ()):
                    sel = want[b.ids]
                    if sel.any():
                        row += np.bincount(b.cols[sel], weights=b.vals[sel], minlength=NCOL)
        total = _totals(window_s, row.tolist())
        # `gauges` for these keys: per key, its timed gauges' sum plus its held ones', counted when > 0
        # (`gauges` itself walks every key holding a gauge: at 300,000 keys, 40 ms per step).
        live = self._timed_gauges(window_s, now, keys.__contains__)
        held = self._held
        for i in wanted:
            key = self._keys[i]
            if held[i] != 0 and key is not None:
                live[key] = live.get(key, 0.0) + float(held[i])
        counted = [v for v in live.values() if v > 0]
        if counted:
            total.open_connections = sum(counted)
            total.has_gauge = True
        return total

    def _group_ids(self, group: Callable[[SeriesKey], object], token: Hashable | None,
                   rows: int) -> tuple[np.ndarray, list[object], dict[object, int]]:
        """Each id's group number (-1: none), the groups by number, and the numbers by group
        (the grouping's own: read them, never change them)."""
        cached = self._groupings.get(token) if token is not None else None
        if cached is None or cached[3] != self._epoch:
            cached = (np.full(max(rows, 16), -1, dtype=np.int32), [], {}, self._epoch, 0, 0, group)
        gid, groups, index, epoch, done, reused, _ = cached
        if rows > len(gid):
            grown = np.full(max(rows, 2 * len(gid)), -1, dtype=np.int32)
            grown[:len(gid)] = gid
            gid = grown
        keys = self._keys
        for i in (*self._reused[reused:], *range(done, rows)):   # ids new to this grouping
            key = keys[i]
            name = group(key) if key is not None else None
            if name is None:
                continue
            j = index.get(name)
            if j is None:
                j = index[name] = len(groups)
                groups.append(name)
            gid[i] = j
        if token is not None:
            if len(self._groupings) >= 32 and token not in self._groupings:
                self._groupings.clear()
            self._groupings[token] = (gid, groups, index, epoch, rows, len(self._reused), group)
        return gid, groups, index

    def keep_ready(self, window_s: float, now: float, groupings: Mapping[Hashable, Callable[[SeriesKey], object]]) -> None:
        """Keep the window of `window_s` (made and slid to `now`, marked used) and bring every
        kept grouping, and `groupings` (token -> group), up to the ids there are now — without
        freezing the seconds still pending (`flush` does the settled ones). The controller calls
        it each second (`stat.warm`), so a query meets at most a second's slide and new ids: not,
        at the first question or after a quiet spell, a scan of the window's blocks and a Python
        call per id of 300,000."""
        self._window(window_s, int(now), now)
        rows = len(self._keys)
        todo = {token: cached[6] for token, cached in self._groupings.items()}
        todo.update(groupings)
        for token, group in todo.items():
            self._group_ids(group, token, rows)

    def sums(self, window_s: float, now: float) -> _Sums:
        """The window's sums per id: the kept window's (read them, never change them), or a scan
        of the blocks for a moment the kept window has moved past."""
        self._flush()
        end = int(now)  # exclusive
        window = self._window(window_s, end, now)
        return window.sums if window is not None else self._scan_sums(window_s, end)

    def _scan_sums(self, window_s: float, end: int) -> _Sums:
        sums = _Sums(len(self._keys))
        for sec in range(end - int(window_s), end):
            for b in self._blocks.get(sec, ()):
                sums.add(b)
        return sums

    def _window(self, window_s: float, end: int, now: float) -> _Window | None:
        """The kept window of this width, moved to `end`; None when `end` is behind it."""
        w = self._windows.get(window_s)
        if w is not None and end < w.end:
            return None
        width = int(window_s)
        blocks = self._blocks
        if w is None or end - w.end >= width:
            if w is None and len(self._windows) >= MAX_WINDOWS:
                del self._windows[min(self._windows, key=lambda k: self._windows[k].used)]
            w = self._windows[window_s] = _Window(window_s, end, now, 0)
            w.sums = self._scan_sums(window_s, end)
        else:
            w.sums.fit(len(self._keys))
            for sec in range(w.end, end):                   # entering
                for b in blocks.get(sec, ()):
                    w.sums.add(b)
            for sec in range(w.end - width, end - width):   # leaving
                for b in blocks.get(sec, ()):
                    w.sums.sub(b)
            w.end = end
        w.used = now
        return w

    def totals(self, window_s: float, now: float | None = None,
               where: Callable[[SeriesKey], bool] | None = None) -> Totals:
        total = Totals(window_s)
        for t in self.totals_by_key(window_s, now, where).values():
            total.merge(t)
        return total

    # ------------------------------------------------------------- housekeeping
    def downsample(self, now: float | None = None) -> int:
        """Merge the seconds of whole minutes older than `downsample_after_s` into one block per
        minute, filed at the minute's middle second, then the minutes of whole 5 minutes older
        than `coarsen_after_s` into one block per 5 minutes, filed at their middle second;
        returns entries merged.

        A window counts a coarse block when its middle second is inside the window, so a window
        reaching past a horizon has its far edge rounded to the nearest minute (an error of at
        most 30 s of that minute's traffic), or past the coarsening horizon to the nearest 5
        minutes (at most 150 s of theirs: 4 % of a 1 h window with steady traffic); windows
        within the downsampling horizon are answered from seconds as before, and a window
        covering whole blocks gets exactly the same sums. Kept windows trade the merged blocks
        they held for the coarse block when its middle second is inside them (their sums stay
        those of a fresh scan)."""
        if not self.downsample_after_s:
            return 0
        now = self.clock() if now is None else now
        self._flush()
        merged = 0
        while (plan := self.merge_plan(now)) is not None:
            got = self.merge_apply(plan, plan.compute())
            if got is None:
                break   # (never here: nothing changed the store between the plan and its apply)
            merged += got
        return merged

    def merge_plan(self, now: float) -> MergePlan | None:
        """The next tier's merge that is due (None: nothing is), for `downsample` — or, split in
        three, for a caller that runs `MergePlan.compute` (the numpy sums: ~0.6–1.1 s for a
        minute of 1,000 agents' reports) off its loop and `merge_apply` back on it. The blocks
        are left in place until then: queries meanwhile read the seconds."""
        if not self.downsample_after_s:
            return None
        tiers = [(COARSE_S, int(now) - self.downsample_after_s)]
        if self.coarsen_after_s:
            # Only what is minutes already: the 5 minutes wholly before the minutes' horizon.
            tiers.append((COARSER_S, min(int(now) - self.coarsen_after_s, self._before[COARSE_S])))
        oldest = int(now) - self.retention_s
        blocks = self._blocks
        for width, horizon in tiers:
            new = horizon - horizon % width
            prev = base = self._before[width]
            if new <= prev:
                continue
            if prev <= _NEVER:
                prev = min(blocks, default=new)
                prev -= prev % width
            spans = []
            for start in range(prev, new, width):
                # Seconds past the retention are not merged: only a lagging kept window still
                # holds them, and they leave it as they are.
                filed = [(sec, list(blocks[sec])) for sec in range(max(start, oldest), start + width) if sec in blocks]
                spans.append((start, filed))
            return MergePlan(width, base, prev, new, spans, oldest)
        return None

    def merge_apply(self, plan: MergePlan, merged: list[list[_Block]]) -> int | None:
        """Put `plan`'s merged blocks (`plan.compute()`) in place of the blocks they sum; returns
        entries merged. Blocks a late record added meanwhile join the merged block as they are. A
        plan the store moved past (another merge, a prune dropping its seconds) is dropped (None):
        the next one sees the store as it is."""
        width, blocks = plan.width, self._blocks
        if self._before[width] != plan.base:
            return None
        for _, filed in plan.spans:
            for sec, bs in filed:
                now_there = blocks.get(sec, ())
                if len(now_there) < len(bs) or any(x is not y for x, y in zip(now_there, bs)):
                    return None
        windows = [w for w in self._windows.values() if w.end - w.width < plan.new and w.end > plan.prev]
        for w in windows:
            w.sums.fit(len(self._keys))
        self._before[width] = plan.new
        count = 0
        for (start, planned), ms in zip(plan.spans, merged):
            csec = start + width // 2
            # Every second of the span, a late record's second without blocks when planned too.
            filed = [(sec, blocks.pop(sec)) for sec in range(max(start, plan.oldest), start + width) if sec in blocks]
            was = dict(planned)
            late = [b for sec, bs in filed for b in bs[len(was.get(sec, ())):]]
            parts = [b for _, bs in filed for b in bs]
            if not parts:
                continue
            ms = ms + late
            count += sum(len(b) for b in parts)
            for w in windows:
                lo, hi = w.end - w.width, w.end
                if hi <= start or lo >= start + width:
                    continue
                sums = w.sums
                if lo <= start and start + width <= hi:
                    # The whole span is inside: the same sums, one block instead of several.
                    for b in parts:
                        sums.n[b.uids] -= 1
                    for m in ms:
                        sums.n[m.uids] += 1
                    continue
                for sec, bs in filed:
                    if lo <= sec < hi:
                        for b in bs:
                            sums.sub(b)
                if lo <= csec < hi:
                    for m in ms:
                        sums.add(m)
            blocks.setdefault(csec, []).extend(ms)
            for m in ms:
                np.maximum.at(self._last, m.uids, csec)
        return count

    def prune(self, now: float | None = None, downsample: bool = True) -> int:
        """Forget records older than the retention, and keys left without any, and downsample
        what is past the horizon (`downsample` False: the caller merges, `merge_plan`); returns
        keys dropped."""
        now = self.clock() if now is None else now
        self._flush()
        oldest = int(now) - self.retention_s
        for width in [k for k, w in self._windows.items() if w.used < now - WINDOW_IDLE_S]:
            del self._windows[width]
        # A kept window last moved before now still holds seconds older than the retention: their
        # blocks stay until it slides past them (it subtracts what leaves).
        index_oldest = min([oldest, *(w.end - w.width for w in self._windows.values())])
        for sec in [s for s in self._blocks if s < index_oldest]:
            del self._blocks[sec]
        if downsample:
            self.downsample(now)
        # A key whose last record is older than the retention is dropped, and its id reused, once
        # no block holds it (a lagging kept window may still hold it: then at a later prune) and
        # no reporter holds a gauge for it.
        used = len(self._keys)
        gone = np.flatnonzero((self._last[:used] < index_oldest) & (self._holders[:used] == 0)).tolist()
        dropped = 0
        keys, ids = self._keys, self._ids
        for i in gone:
            key = keys[i]
            if key is None:
                continue
            del ids[key]
            keys[i] = None
            self._last[i] = _FREE
            self._gen[i] += 1
            self._free.append(i)
            dropped += 1
        if dropped:
            self._epoch += 1
            self._reused.clear()
        for key in list(self._gauges):
            per = self._gauges[key]
            for reporter in [r for r, (ts, _) in per.items() if ts < oldest]:
                del per[reporter]
                self._not_open(key, reporter)
            if not per:
                del self._gauges[key]
        return dropped

    def keys(self) -> Iterable[SeriesKey]:
        return self._ids.keys()
