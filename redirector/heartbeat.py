"""The agent's heartbeat in the kernel: capture that fails open by itself when nobody of ours is left.

The redirector watches the agent (presence socket, `/ready`) and takes the capture hooks out when it
dies or hangs. But when the redirector is gone too — both killed, both OOM-killed, a hung agent and a
redirector in its restart back-off — nothing of ours is left to act, and the rules in the kernel keep
sending every new connection to ports nobody serves (issue 12: 1.9 s, 389 failed connects with both
killed; a hung agent and a killed redirector failed 100 % of requests).

So the capture decision itself depends on the agent being alive, in the kernel:

- **heartbeat**: the agent writes `+0.0.0.0` to `/proc/net/xt_recent/<LIST>` every `PERIOD_S`
  (a thread of its parent, only while it is ready with its identity and holds its listeners). The
  nat rule `-m recent ! --rcheck --seconds WINDOW_S --hitcount HITCOUNT --mask 0.0.0.0` RETURNs
  (no capture) unless the list saw HITCOUNT beats within the last WINDOW_S: after `SILENCE_S` of
  silence (killed, hung, stopped) new connections go direct, whoever else is alive; after
  `SILENCE_S` of beats again (SIGCONT, a restarted agent) capture works again. `--mask 0.0.0.0`
  folds every address into one entry, so the beat and every packet meet the same one.
- **no listener, no drop into the void**: a SYN that was DNATed to the agent's port while no
  socket listens there (the agent just died; the heartbeat has not expired yet) is dropped in mangle
  INPUT instead of answered with a reset: its conntrack entry was never confirmed, so the client's
  retransmission (1 s later, by then past `SILENCE_S`) is a new connection and goes direct. A dead
  agent costs those connections one SYN retransmission instead of failing them.

xt_recent counts in jiffies, and its window is whole seconds; the hit count gives the finer step:
HITCOUNT beats in WINDOW_S means "the (HITCOUNT-1)th beat before the last one is younger than
WINDOW_S", so the switch opens after WINDOW_S - (HITCOUNT-1) * PERIOD_S of silence: 0.7 s. Chosen against the longest gap between two
beats measured under load (`tests/bench/heartbeat_gap.py`: 118-331 ms, docs/redirector.md), so a
busy agent is not unmeshed, while a hung one is failed open within the 1 s issue 12 asks for.

Pure standard library: the agent imports this (no pyroute2 in its memory).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

LIST = "nodemesh_agent"
PERIOD_S = 0.05
WINDOW_S = 1
HITCOUNT = 7
SILENCE_S = WINDOW_S - (HITCOUNT - 1) * PERIOD_S   # 0.7 s of silence: fail open

log = logging.getLogger("nodemesh.redirector.heartbeat")


def proc_path(name: str = LIST) -> str:
    """The list's file: it exists while a rule names the list (per network namespace)."""
    return f"/proc/net/xt_recent/{name}"


def recent_match(name: str = LIST) -> str:
    """The rule's match, in the canonical form `iptables-save` prints (both backends)."""
    return (f"-m recent ! --rcheck --seconds {WINDOW_S} --hitcount {HITCOUNT} --name {name} "
            "--mask 0.0.0.0 --rsource")


def beat(path: str, count: int = 1) -> bool:
    """`count` beats. True if the list exists (capture with the heartbeat is installed). The list
    takes one address per open: a second write on the same file fails with ESPIPE."""
    for _ in range(count):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # (append: the unit test's stand-in file)
        except OSError:
            return False
        try:
            os.write(fd, b"+0.0.0.0\n")
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


class Heartbeat:
    """A daemon thread beating every PERIOD_S while `alive()` says so.

    A thread, not the event loop: the data path is the workers', so a busy parent loop (a big
    `/metrics`, a GC pass) must not read as a dead agent and unmesh the node; SIGSTOP, a crash or
    `kill -9` stop the thread with everything else. `max_gap_s` is the longest time between two
    beats seen while the list existed; each new longest gap over two periods is logged
    (`event=heartbeat_gap max_ms=...`, a warning past half the silence that fails the node open)."""

    def __init__(self, alive: Callable[[], bool], path: str | None = None, period_s: float = PERIOD_S) -> None:
        self.alive = alive
        self.path = path or proc_path()
        self.period_s = period_s
        self.beats = 0
        self.max_gap_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nodemesh-heartbeat", daemon=True)
        self._installed: bool | None = None

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _alive(self) -> bool:
        try:
            return bool(self.alive())
        except Exception:  # noqa: BLE001 (a failing check must not end the heartbeat for good)
            return False

    def _run(self) -> None:
        last: float | None = None   # the last beat while alive; None: not beating
        while not self._stop.wait(self.period_s):
            if not self._alive():
                last = None
                continue
            now = time.monotonic()
            gap = 0.0 if last is None else now - last
            if gap > self.max_gap_s and self._installed:
                self.max_gap_s = gap
                if gap > 2 * self.period_s:   # a new longest gap: a handful of lines in a lifetime
                    log.log(logging.WARNING if gap > SILENCE_S / 2 else logging.INFO,
                            "event=heartbeat_gap max_ms=%.0f fail_open_after_ms=%.0f", gap * 1000, SILENCE_S * 1000)
            # This process's first beat on the list (the agent started, or the rules were just
            # installed): a full window's worth at once, so capture works now, not SILENCE_S from
            # now. Not after a pause (SIGCONT, a late beat): those stamps would keep capture on for
            # a whole WINDOW_S if the agent stopped again at once.
            installed = beat(self.path, 1 if self._installed else HITCOUNT)
            last = now
            self.beats += installed
            if installed != self._installed:
                log.info("event=heartbeat list=%s installed=%s", self.path, str(installed).lower())
                self._installed = installed
