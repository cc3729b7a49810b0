"""Prometheus as the store behind `stat`, `edges` and `routes` (`--backend prometheus`).

A cluster that outgrows one in-memory controller (docs/scale.md) already runs Prometheus, and
Prometheus already scrapes every agent's `/metrics` (manifests/prometheus.yaml). This module asks it,
with PromQL, for exactly what the in-memory `Aggregator` answers: per series key (the tuple of
`PEER_LABELS`, or `ROUTE_LABELS` for routes), the sums over a window — requests, successes and
failures, the latency histogram, TCP opens/closes/bytes, the open-connection gauge — as `Totals`.
`stat.py` and `routes.py` then run unchanged over the result, so both backends give the same rows,
the same output and the same errors by construction; only where the numbers come from differs:

* counters: `sum by (<labels>) (increase(<family>[<window>]))` at the request's time — Prometheus'
  extrapolated increase over its scrapes (counter resets of a restarted agent handled by it), where
  the in-memory path sums the agents' own per-second deltas;
* the latency histogram: the same, `by (<labels>, le)` over `_bucket`, turned back into the
  per-bucket counts the quantile math reads (`histogram_quantile` semantics, aggregate.py);
* open connections: `sum by (<labels>) (last_over_time(tcp_open_connections[<window>]))`, the
  latest value per agent in the window, summed over agents, as the in-memory gauge.

The queries run concurrently on the controller's event loop (aiohttp) and never block it; a
Prometheus that cannot answer is one clear error line for the caller, never a hang.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from nodemesh.api.model import (
    PEER_LABELS,
    REPORT_HISTORY_BYTES,
    REQUEST_TOTAL,
    RESPONSE_LATENCY_MS,
    RESPONSE_TOTAL,
    ROUTE_LABELS,
    ROUTE_REQUEST_TOTAL,
    ROUTE_RESPONSE_LATENCY_MS,
    ROUTE_RESPONSE_TOTAL,
    TCP_CLOSE_TOTAL,
    TCP_OPEN_CONNECTIONS,
    TCP_OPEN_TOTAL,
    TCP_READ_BYTES_TOTAL,
    TCP_WRITE_BYTES_TOTAL,
)
from nodemesh.controlplane.aggregate import BOUNDS, N_LATENCY, SeriesKey, Totals

MEMORY = "memory"
PROMETHEUS = "prometheus"
BACKENDS = (MEMORY, PROMETHEUS)


class PrometheusError(RuntimeError):
    """Prometheus could not answer (unreachable, an error status, a malformed reply)."""


@dataclass(frozen=True)
class Family:
    """One set of series the controller answers from: its label tuple and its metric names."""

    labels: tuple[str, ...]
    requests: str
    responses: str
    latency: str
    tcp: tuple[tuple[str, str], ...] = ()   # (Totals field, counter) pairs
    gauge: str = ""


PEER = Family(PEER_LABELS, REQUEST_TOTAL, RESPONSE_TOTAL, RESPONSE_LATENCY_MS,
              tcp=(("tcp_open", TCP_OPEN_TOTAL), ("tcp_close", TCP_CLOSE_TOTAL),
                   ("read_bytes", TCP_READ_BYTES_TOTAL), ("write_bytes", TCP_WRITE_BYTES_TOTAL)),
              gauge=TCP_OPEN_CONNECTIONS)
ROUTE = Family(ROUTE_LABELS, ROUTE_REQUEST_TOTAL, ROUTE_RESPONSE_TOTAL, ROUTE_RESPONSE_LATENCY_MS)


def increase(counter: str, by: str, window_s: int) -> str:
    """The increase of `counter` over the window, summed by `by`, counting what a series born
    inside the window held at its first scrape: `increase()` alone starts a new series at its
    first sample, so every series an agent creates (a new peer, a new status code) loses the
    requests counted before its first scrape — measured 2.1-2.5 % of a 20 s run scraped every
    500 ms. A series absent `offset <window>` ago was born in the window, from 0 (agents create a
    series on its first count), so its first value (`min_over_time`, a counter) belongs in the sum.
    What remains is `increase()`'s own extrapolation at the window's edges (at most half a scrape
    interval of the series' average rate at each end)."""
    rng = f"[{int(window_s)}s]"
    born = f"(min_over_time({counter}{rng}) unless {counter} offset {int(window_s)}s)"
    return f"sum by ({by}) (increase({counter}{rng})) + sum by ({by}) ({born}) or sum by ({by}) (increase({counter}{rng}))"


def queries(family: Family, window_s: int, matchers: dict[str, str] | None = None) -> dict[str, str]:
    """What to ask Prometheus, by the Totals field each answer fills. `matchers`: label equalities
    every series must have (narrows what Prometheus sums; the caller still filters exactly)."""
    by = ", ".join(family.labels)
    rng = f"[{int(window_s)}s]"
    sel = selector(matchers or {})
    out = {
        "requests": increase(family.requests + sel, by, window_s),
        "responses": increase(family.responses + sel, f"{by}, classification", window_s),
        "latency": increase(f"{family.latency}_bucket{sel}", f"{by}, le", window_s),
        "latency_sum": increase(f"{family.latency}_sum{sel}", by, window_s),
    }
    for field_name, counter in family.tcp:
        out[field_name] = increase(counter + sel, by, window_s)
    if family.gauge:
        out["open_connections"] = f"sum by ({by}) (last_over_time({family.gauge}{sel}{rng}))"
    return out


def selector(matchers: dict[str, str]) -> str:
    """`{a="x",b="y"}` (PromQL string escapes), or "" for no matchers."""
    if not matchers:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(matchers.items())) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


Vector = list[tuple[dict[str, str], float]]


def totals_from(family: Family, window_s: float, answers: dict[str, Vector]) -> dict[SeriesKey, Totals]:
    """The per-key Totals of a window from the answers to `queries` (pure: unit-tested on
    recorded Prometheus replies)."""
    out: dict[SeriesKey, Totals] = {}

    def key_of(metric: dict[str, str]) -> SeriesKey:
        return tuple(metric.get(name, "") for name in family.labels)

    def totals(metric: dict[str, str]) -> Totals:
        key = key_of(metric)
        tot = out.get(key)
        if tot is None:
            tot = out[key] = Totals(window_s)
        return tot

    for metric, value in answers.get("requests", ()):
        totals(metric).requests += value
    for metric, value in answers.get("responses", ()):
        if metric.get("classification") == "failure":
            totals(metric).failure += value
        else:
            totals(metric).success += value
    for metric, value in answers.get("latency_sum", ()):
        totals(metric).latency_sum += value
    cumulative: dict[SeriesKey, list[tuple[float, float]]] = {}
    for metric, value in answers.get("latency", ()):
        le = _le(metric.get("le", ""))
        if le is not None:
            totals(metric)  # a key seen only in the histogram still gets its Totals
            cumulative.setdefault(key_of(metric), []).append((le, value))
    for key, points in cumulative.items():
        out[key].latency = per_bucket(points)
    for field_name, _ in family.tcp:
        for metric, value in answers.get(field_name, ()):
            tot = totals(metric)
            setattr(tot, field_name, getattr(tot, field_name) + value)
    for metric, value in answers.get("open_connections", ()):
        # As the in-memory gauge: zero open connections is not TCP activity (aggregate.py).
        if value > 0:
            tot = totals(metric)
            tot.open_connections += value
            tot.has_gauge = True
    # Prometheus answers 0 for a series that exists but did not move in the window; the in-memory
    # store has no bucket for it at all. Keep only keys that saw something, as it does.
    return {k: t for k, t in out.items() if t.has_gauge or _moved(t)}


def _moved(t: Totals) -> bool:
    return any(v > 0 for v in (t.success, t.failure, t.requests, t.tcp_open, t.tcp_close, t.read_bytes,
                               t.write_bytes, *t.latency))


def _le(text: str) -> float | None:
    try:
        return float(text)   # "+Inf" parses as inf
    except ValueError:
        return None


def per_bucket(points: Iterable[tuple[float, float]], bounds: Sequence[float] = BOUNDS) -> list[float]:
    """Cumulative (le, count) points -> non-cumulative counts over `bounds` + the +Inf bucket.
    A bound Prometheus has no point for takes the next lower one's count (an empty bucket)."""
    by_le = dict(points)
    counts = [0.0] * N_LATENCY
    previous = 0.0
    for i, bound in enumerate((*bounds, math.inf)):
        cum = by_le.get(float(bound))
        if cum is None:
            cum = max((c for le, c in by_le.items() if le <= bound), default=previous)
        # increase() of each bucket is extrapolated on its own: never let a bucket go negative.
        counts[i] = max(0.0, cum - previous)
        previous = max(previous, cum)
    return counts


def parse_vector(body: dict[str, Any]) -> Vector:
    """The samples of an instant-vector reply of /api/v1/query; PrometheusError on anything else."""
    if body.get("status") != "success":
        raise PrometheusError(f"{body.get('errorType', 'error')}: {body.get('error', 'no status in reply')}")
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise PrometheusError(f"expected a vector, got {data.get('resultType')!r}")
    out: Vector = []
    for sample in data.get("result", ()):
        value = float(sample["value"][1])
        if math.isnan(value):
            continue
        out.append((sample.get("metric", {}), value))
    return out


def parse_matrix(body: dict[str, Any]) -> dict[int, Vector]:
    """A range query's reply (/api/v1/query_range) as one vector per evaluation time (whole
    seconds: the steps asked for are); PrometheusError on anything else."""
    if body.get("status") != "success":
        raise PrometheusError(f"{body.get('errorType', 'error')}: {body.get('error', 'no status in reply')}")
    data = body.get("data") or {}
    if data.get("resultType") != "matrix":
        raise PrometheusError(f"expected a matrix, got {data.get('resultType')!r}")
    out: dict[int, Vector] = {}
    for series in data.get("result", ()):
        metric = series.get("metric", {})
        for at, text in series.get("values", ()):
            value = float(text)
            if not math.isnan(value):
                out.setdefault(round(float(at)), []).append((metric, value))
    return out


# A gauge every agent exports, without labels: how many agents Prometheus holds a current sample of.
AGENTS_SCRAPED = f"count({REPORT_HISTORY_BYTES})"


class Snapshot:
    """Totals fetched for one window at one time, answering as an `Aggregator` does for stat/routes.
    `agents_scraped`: how many agents' metrics Prometheus holds now (fewer than the controller
    sees connected: the rows miss their traffic, and the caller is told so)."""

    def __init__(self, window_s: float, by_key: dict[SeriesKey, Totals], agents_scraped: int = 0) -> None:
        self.window_s = window_s
        self._by_key = by_key
        self.agents_scraped = agents_scraped

    def totals_by_key(self, window_s: float, now: float | None = None,
                      where: Callable[[SeriesKey], bool] | None = None) -> dict[SeriesKey, Totals]:
        if window_s != self.window_s:
            raise PrometheusError(f"snapshot holds a {self.window_s}s window, asked for {window_s}s")
        return {k: t for k, t in self._by_key.items() if where is None or where(k)}

    def keys(self) -> Iterable[SeriesKey]:
        return self._by_key.keys()


class PrometheusStore:
    """Asks one Prometheus server (`--prometheus-url`) for a family's Totals over a window."""

    def __init__(self, url: str, timeout_s: float = 10.0, bearer_token: str = "") -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.bearer_token = bearer_token
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def snapshot(self, family: Family, window_s: int, now: float) -> Snapshot:
        asked = queries(family, window_s)
        try:
            *replies, agents = await asyncio.wait_for(
                asyncio.gather(*(self.query(q, now) for q in (*asked.values(), AGENTS_SCRAPED))), self.timeout_s)
        except TimeoutError:
            raise PrometheusError(f"{self.url} did not answer within {self.timeout_s:g}s") from None
        return Snapshot(window_s, totals_from(family, window_s, dict(zip(asked, replies))),
                        agents_scraped=int(sum(v for _, v in agents)))

    async def steps(self, family: Family, step_s: int, end: int, count: int,
                    matchers: dict[str, str] | None = None) -> list[tuple[int, Snapshot]]:
        """`count` consecutive windows of `step_s` ending at `end` (oldest first), each a Snapshot
        of that step alone: one range query per Totals field (the dashboard's sparklines)."""
        asked = queries(family, step_s, matchers)
        start = end - (count - 1) * step_s
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(*(self.query_range(q, start, end, step_s) for q in asked.values())), self.timeout_s)
        except TimeoutError:
            raise PrometheusError(f"{self.url} did not answer within {self.timeout_s:g}s") from None
        by_field = dict(zip(asked, replies))
        out = []
        for at in range(start, end + 1, step_s):
            answers = {name: matrix.get(at, []) for name, matrix in by_field.items()}
            out.append((at, Snapshot(step_s, totals_from(family, step_s, answers))))
        return out

    async def agents_scraped(self, now: float, timeout_s: float | None = None) -> int:
        """How many agents' metrics Prometheus holds now (PrometheusError when it does not answer
        within `timeout_s`, default the store's timeout)."""
        timeout_s = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        try:
            agents = await asyncio.wait_for(self.query(AGENTS_SCRAPED, now), timeout_s)
        except TimeoutError:
            raise PrometheusError(f"{self.url} did not answer within {timeout_s:g}s") from None
        return int(sum(v for _, v in agents))

    async def query(self, expr: str, at: float) -> Vector:
        return parse_vector(await self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"}))

    async def query_range(self, expr: str, start: int, end: int, step_s: int) -> dict[int, Vector]:
        return parse_matrix(await self._get("/api/v1/query_range", {
            "query": expr, "start": str(start), "end": str(end), "step": f"{step_s}s"}))

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        if self._session is None:
            headers = {"Authorization": f"Bearer {self.bearer_token}"} if self.bearer_token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        try:
            async with self._session.get(f"{self.url}{path}", params=params) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    raise PrometheusError(f"{self.url} answered {resp.status} with no JSON") from None
        except aiohttp.ClientError as exc:
            raise PrometheusError(f"cannot query {self.url}: {exc}") from None
        if not isinstance(body, dict):
            raise PrometheusError(f"{self.url} answered {type(body).__name__}, not a query result")
        return body
