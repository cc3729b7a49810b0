"""The prometheus-client side of the metrics: a Collector over merged snapshots (parent process only).

Kept apart from `metrics` so worker processes, which only count in plain dicts, never import
prometheus-client (about 3 MB per process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from nodemesh.agent.metrics import ALL_METRICS, COUNTER, GAUGE, Snapshot, _le
from nodemesh.api.model import LATENCY_BUCKETS_MS
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector


class SnapshotCollector(Collector):
    """prometheus-client Collector over a snapshot source: the registry's locks never meet the hot path."""

    def __init__(self, source: Callable[[], Snapshot], bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self._source = source
        self._bounds = bounds

    def describe(self) -> Iterator[Metric]:
        return iter(())  # don't make the registry call collect() at register time

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        les = [_le(b) for b in self._bounds] + ["+Inf"]
        for name, (kind, label_names, help_text) in ALL_METRICS.items():
            series = snap.get(name, {})
            if kind in (COUNTER, GAUGE):
                flat = (CounterMetricFamily if kind == COUNTER else GaugeMetricFamily)(
                    name, help_text, labels=label_names)
                for key, value in series.items():
                    if not isinstance(value, list):  # always so for counters and gauges
                        flat.add_metric(list(key), value)
                yield flat
                continue
            fam = HistogramMetricFamily(name, help_text, labels=label_names)
            for key, value in series.items():
                if not isinstance(value, list):  # a histogram's value: bucket counts, then the sum
                    continue
                cumulative, running = [], 0.0
                for le, count in zip(les, value[:-1]):
                    running += count
                    cumulative.append((le, running))
                fam.add_metric(list(key), cumulative, sum_value=value[-1])
            yield fam
