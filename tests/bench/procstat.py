"""CPU time and memory of process trees and of the machine, read from /proc (no psutil needed).

The agent is a parent plus N worker processes; its cost is the sum over the whole tree.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Self

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces/parens: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """root and all its descendants alive right now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def netns_pids(netns: str) -> list[int]:
    """Every process living in the named network namespace (how a pod's processes are found)."""
    try:
        inode = os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino == inode:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the given processes (threads included)."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            user += int(fields[11])  # utime (field 14)
            system += int(fields[12])  # stime (field 15)
    return user / TICK, system / TICK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (threads included), in seconds."""
    return sum(cpu_split(pids))


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


def pss_mb(pids: list[int]) -> float:
    """Proportional set size summed over `pids`: each shared page counts 1/n in each of the n
    processes mapping it, so the sum over a process tree is the tree's real memory (summed RSS counts
    pages shared between parent and forked workers, and shared libraries, once per process)."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / TICK


def machine_cores() -> int:
    return os.cpu_count() or 1


class RssSampler:
    """Samples the RSS and the PSS of each process tree (summed over the tree) every `interval` s in
    a thread, keeping each tree's maximum of each."""

    def __init__(self, roots: list[int], interval: float = 0.2) -> None:
        self.roots = roots
        self.interval = interval
        self.max_by_root: dict[int, float] = dict.fromkeys(roots, 0.0)
        self.max_pss_by_root: dict[int, float] = dict.fromkeys(roots, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for root in self.roots:
                pids = tree_pids(root)
                self.max_by_root[root] = max(self.max_by_root[root], rss_mb(pids))
                self.max_pss_by_root[root] = max(self.max_pss_by_root[root], pss_mb(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
