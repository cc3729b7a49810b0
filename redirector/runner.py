"""The fail-open runner: keeps capture installed while the agent is ready, and only then.

Every `poll_s` it asks the agent's `/ready`. Ready: make sure the plan (with the excluded pod IPs the
agent reports on `/capture`) is installed with its capture hooks. Not ready for longer than `grace_s`:
remove the capture hooks so pods talk directly instead of failing, until the agent is back. SIGTERM
removes everything installed, in two steps: the capture hooks at once (new connections go direct),
the return path only once the agent's captured connections have ended (bounded by
`shutdown_wait_s`), because the agent's transparent upstream sockets still in flight get their
replies through it. Transitions are logged as one key=value line each.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from nodemesh.redirector.apply import ApplyError, Redirector
from nodemesh.redirector.config import CaptureConfig, ipv4_only
from nodemesh.redirector.plan import Plan, build_plan


@dataclass(frozen=True)
class RunnerConfig:
    capture: CaptureConfig
    agent_admin: str = "http://127.0.0.1:4191"
    grace_s: float = 2.0
    poll_s: float = 0.25
    # A loaded node can take a moment to schedule the agent: too short a timeout reads "busy" as
    # "dead" and fails open needlessly; a dead agent refuses at once whatever the timeout.
    http_timeout_s: float = 0.5
    # While capturing, re-check the kernel against the plan this often and put back what is missing:
    # during a rolling update the old redirector's shutdown removes the rules the new one relies on.
    reassert_s: float = 1.0
    # At shutdown, keep the return path at most this long while the agent still holds captured
    # connections (its drain grace is 30 s), so in-flight requests are not cut off (found by the
    # sandbox-wide uninstall test: a request in flight lost its replies and failed).
    shutdown_wait_s: float = 35.0


_REMOVE_ATTEMPTS = 5
# /proc/net/tcp states of a socket the agent still holds open: ESTABLISHED, SYN_RECV, CLOSE_WAIT.
_HELD_STATES = {"01", "03", "08"}


def captured_connections(ports: tuple[int, ...], netns: str | None = None) -> int:
    """Sockets open on the agent's capture ports in this (or the named) network namespace."""
    wanted = {f"{p:04X}" for p in ports}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            if netns:
                text = subprocess.run(["ip", "netns", "exec", netns, "cat", table], capture_output=True,
                                      text=True, check=False).stdout
            else:
                with open(table) as f:
                    text = f.read()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] in _HELD_STATES and fields[1].rsplit(":", 1)[-1] in wanted:
                count += 1
    return count


class KVLog:
    """One event per line, key=value, to a stream (stderr by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def __call__(self, event: str, **fields: object) -> None:
        parts = [f"ts={time.time():.3f}", "component=redirector", f"event={event}"]
        for key, value in fields.items():
            text = str(value)
            parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
        print(" ".join(parts), file=self.stream, flush=True)


class FailOpenRunner:
    def __init__(self, config: RunnerConfig, redirector: Redirector,
                 log: Callable[..., None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.redirector = redirector
        self.log = log or KVLog()
        self.clock = clock
        self.capturing = False
        self.plan: Plan | None = None
        self.last_ready = clock()
        self.excluded: tuple[str, ...] = ()
        self.last_asserted = clock()
        self._stop = threading.Event()

    # --------------------------------------------------------------------------- talking to the agent
    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.config.agent_admin.rstrip("/") + path,
                                        timeout=self.config.http_timeout_s) as resp:
                return resp.read() if resp.status == 200 else None
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def agent_ready(self) -> bool:
        return self._get("/ready") is not None

    def excluded_ips(self) -> tuple[str, ...]:
        """What the agent says today; on an unreadable answer, what it said last time."""
        body = self._get("/capture")
        if body is None:
            return self.excluded
        try:
            ips = ipv4_only([str(ip) for ip in json.loads(body).get("excluded_ips", [])])
            return self.config.capture.with_excluded(ips).excluded_ips
        except (ValueError, AttributeError, TypeError):
            self.log("capture_answer_invalid", body=body[:200].decode(errors="replace"))
            return self.excluded

    # ----------------------------------------------------------------------------------- one step
    def step(self) -> None:
        now = self.clock()
        if self.agent_ready():
            self.last_ready = now
            excluded = self.excluded_ips()
            if not self.capturing or excluded != self.excluded or self.plan is None:
                plan = build_plan(self.config.capture.with_excluded(excluded))
                self.redirector.apply(plan, capture=True)
                if not self.capturing:
                    self.log("capture_installed", reason="agent_ready", excluded_ips=len(excluded))
                else:
                    self.log("capture_updated", excluded_ips=len(excluded))
                self.plan, self.excluded, self.capturing = plan, excluded, True
                self.last_asserted = now
            elif now - self.last_asserted >= self.config.reassert_s:
                self.last_asserted = now
                if self.redirector.apply(self.plan, capture=True):
                    self.log("capture_restored", reason="rules_missing")
        elif self.capturing and now - self.last_ready > self.config.grace_s:
            assert self.plan is not None
            self.redirector.set_capture(self.plan, capture=False)
            self.capturing = False
            self.log("capture_removed", reason="agent_not_ready", fail_open="true",
                     not_ready_s=f"{now - self.last_ready:.2f}")

    def run(self) -> None:
        self.log("started", agent_admin=self.config.agent_admin, grace_s=self.config.grace_s,
                 mechanism=self.config.capture.mechanism, backend=self.redirector.nf.backend)
        try:
            while not self._stop.is_set():
                started = self.clock()
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 (a failed apply must not kill the watcher: retry next poll)
                    self.log("step_failed", error=repr(exc))
                self._stop.wait(max(0.0, self.config.poll_s - (self.clock() - started)))
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        plan = self.plan or build_plan(self.config.capture)
        if self.capturing:
            try:
                self.redirector.set_capture(plan, capture=False)
                self.log("capture_draining", reason="shutdown", hooks="removed")
                self._wait_captured_connections()
            except ApplyError as exc:  # removal below takes the hooks out too: never skip it
                self.log("capture_drain_failed", error=str(exc).splitlines()[0])
            self.capturing = False
        # The removal script is computed from a read of the kernel; another writer in between (the
        # new redirector of a rolling update re-asserting its hooks) makes the restore fail on a
        # busy chain. Read again and retry, so what we installed never stays behind.
        for attempt in range(1, _REMOVE_ATTEMPTS + 1):
            try:
                self.redirector.remove(plan)
                break
            except ApplyError as exc:
                if attempt == _REMOVE_ATTEMPTS:
                    raise
                self.log("remove_retry", attempt=attempt, error=str(exc).splitlines()[0])
                time.sleep(0.05 * attempt)
        self.log("capture_uninstalled", reason="shutdown")

    def _wait_captured_connections(self) -> None:
        """New connections already go direct; the ones the agent carries still need the return path."""
        capture = self.config.capture
        ports = (capture.outbound_port, capture.inbound_port)
        started = self.clock()
        left = captured_connections(ports, self.redirector.nf.netns)
        while left and self.clock() - started < self.config.shutdown_wait_s:
            time.sleep(0.05)
            left = captured_connections(ports, self.redirector.nf.netns)
        if left or self.clock() - started > 0.05:
            self.log("return_path_kept", seconds=f"{self.clock() - started:.2f}", connections_left=left)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
