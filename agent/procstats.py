"""The agent's own health on /metrics: CPU, memory and fds of the whole agent, and capture state.

prometheus-client's ProcessCollector sees one process; the agent is a parent plus workers, so
this collector sums the parent and its direct children (found through /proc at scrape time,
never on the traffic path). The names are the standard `process_*` ones, so dashboards built
for any Prometheus client work unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from nodemesh.api.model import CAPTURE_INSTALLED
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_BOOT_TIME = 0.0
try:
    with open("/proc/stat") as _f:
        _BOOT_TIME = float(next(line.split()[1] for line in _f if line.startswith("btime")))
except (OSError, StopIteration):
    pass


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces: fields start after the last ")"
    return text[text.rindex(")") + 2:].split()


def agent_pids(root: int) -> list[int]:
    """The root process and its direct children (the workers)."""
    pids = [root]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == root:
                pids.append(int(entry))
    return pids


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class AgentProcessCollector(Collector):
    def __init__(self, capture_installed: Callable[[], bool], root: int | None = None) -> None:
        self._capture_installed = capture_installed
        self._root = root or os.getpid()

    def collect(self) -> Iterator[Metric]:
        cpu = rss = 0.0
        fds = 0
        start = None
        pids = agent_pids(self._root)
        for pid in pids:
            fields = _stat_fields(pid)
            if fields is None:
                continue
            # fields (0-based after the name): 11 utime, 12 stime, 19 starttime, 21 rss pages
            cpu += (int(fields[11]) + int(fields[12])) / _TICKS
            rss += int(fields[21]) * _PAGE
            fds += _fds(pid)
            if pid == self._root:
                start = _BOOT_TIME + int(fields[19]) / _TICKS
        yield CounterMetricFamily("process_cpu_seconds_total",
                                  "CPU time of the agent (parent and workers), seconds", value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes",
                                "Resident memory of the agent (parent and workers), bytes", value=rss)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the agent", value=fds)
        if start is not None:
            yield GaugeMetricFamily("process_start_time_seconds", "Start time of the agent parent, unix seconds",
                                    value=start)
        yield GaugeMetricFamily("nodemesh_agent_processes", "Agent processes (parent and workers)",
                                value=len(pids))
        yield GaugeMetricFamily(CAPTURE_INSTALLED, "1 while this node's traffic capture is installed",
                                value=1.0 if self._capture_installed() else 0.0)
