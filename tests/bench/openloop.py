"""Fixed-rate (open-loop) scheduling and latency summaries shared by the bench's load generators.

Why open loop: a closed-loop client (wrk) sends the next request only when the previous answer
came back, so a slow proxy makes it *send less* and its latency percentiles hide the stall
(coordinated omission). Here request i is due at `start + i / rate`, whatever happened before.

Latency of a request is measured from the moment it *should* have been sent when it is sent late
because every connection was still busy (the stall is charged to the system under test, as
wrk2 does), and from the actual send when a worker was idle and merely woke up late: asyncio
timers (uvloop's included) have a 1 ms granularity, and that lateness is the load generator's,
not the mesh's.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Request = Callable[[], Awaitable[bool]]  # one request on one worker's connection; True = success


@dataclass
class Samples:
    latencies_s: list[float] = field(default_factory=list)
    ok: int = 0
    errors: int = 0
    late: int = 0  # requests sent after their slot because every worker was busy
    total: int = 0  # successful requests including the warm-up (what a CPU-time delta covers)

    def summary(self, seconds: float) -> dict[str, float | int]:
        lat = sorted(self.latencies_s)
        out: dict[str, float | int] = {"requests": self.ok, "errors": self.errors, "late": self.late,
                                       "total_requests": self.total,
                                       "seconds": round(seconds, 3),
                                       "rps": round(self.ok / seconds, 1) if seconds > 0 else 0.0}
        for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)):
            out[f"{name}_ms"] = round(percentile(lat, q) * 1000, 4)
        out["max_ms"] = round(lat[-1] * 1000, 4) if lat else 0.0
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, int(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


async def fixed_rate(requests: list[Request], rate: float, duration: float, warmup: float) -> dict[str, float | int]:
    """Drive `rate` requests/s over the given workers (one request in flight per worker) for
    warmup + duration seconds; only requests due after the warm-up are counted."""
    clock = time.perf_counter
    start = clock() + 0.05
    measure_from = start + warmup
    end = measure_from + duration
    slots = itertools.count()
    samples = Samples()

    async def worker(send: Request) -> None:
        for i in slots:  # shared counter: a free worker claims the next due slot
            due = start + i / rate
            if due >= end:
                return
            now = clock()
            if due > now:
                await asyncio.sleep(due - now)
                t0 = clock()
            else:
                t0 = due
                if due >= measure_from and now - due > 0.001:
                    samples.late += 1
            ok = await send()
            samples.total += ok
            if due < measure_from:
                continue
            if ok:
                samples.ok += 1
                samples.latencies_s.append(clock() - t0)
            else:
                samples.errors += 1

    await asyncio.gather(*(worker(r) for r in requests))
    return samples.summary(duration)


async def saturate(requests: list[Request], duration: float, warmup: float) -> dict[str, float | int]:
    """Closed loop: every worker sends its next request as soon as the previous one is answered."""
    clock = time.perf_counter
    start = clock()
    measure_from = start + warmup
    end = measure_from + duration
    samples = Samples()

    async def worker(send: Request) -> None:
        while True:
            t0 = clock()
            if t0 >= end:
                return
            ok = await send()
            samples.total += ok
            if t0 < measure_from:
                continue
            if ok:
                samples.ok += 1
                samples.latencies_s.append(clock() - t0)
            else:
                samples.errors += 1

    await asyncio.gather(*(worker(r) for r in requests))
    return samples.summary(duration)
