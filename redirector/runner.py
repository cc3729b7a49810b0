"""The fail-open runner: keeps capture installed while the agent is ready, and only then.

Every `poll_s` it asks the agent's `/ready`. Ready, and the agent has its identity (`/capture` says
`synced`): make sure the plan (with the excluded pod IPs the agent reports) is installed with its
capture hooks. An agent without its identity yet gets no capture: it cannot name the mesh's own pods
(the controller), and capturing them makes the mesh depend on itself. Not ready for longer than
`grace_s`, or no agent listening at all: remove the capture hooks so pods talk directly instead of
failing, until the agent is back. Hooks already in the kernel at start are reconciled the same way. SIGTERM
removes everything installed, in two steps: the capture hooks at once (new connections go direct),
the return path only once the agent's captured connections have ended (bounded by
`shutdown_wait_s`), because the agent's transparent upstream sockets still in flight get their
replies through it. Transitions are logged as one key=value line each.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from nodemesh.redirector import presence
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
    # At shutdown during a rolling update (a second agent runs on the node), wait this long at most
    # for the new pod's redirector to appear, and hand the rules over to it instead of removing them.
    handover_wait_s: float = 15.0


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
        self.synced_once = False       # an excluded list from a synced agent was seen (see step)
        self.adopted = False           # capturing with hooks found at start, plan not ours yet
        self.waiting_logged = False
        self._presence: socket.socket | None = None
        self._agent_links: dict[str, socket.socket] = {}
        self._dead_agents: set[str] = set()
        self._stop = threading.Event()

    # --------------------------------------------------------------------------- talking to the agent
    def _fetch(self, path: str) -> tuple[str, bytes | None]:
        """(state, body): state "ok" (200), "refused" (nothing listens: no agent at all), or
        "unavailable" (an answer other than 200, or none in time: a busy, starting or hung agent)."""
        try:
            with urllib.request.urlopen(self.config.agent_admin.rstrip("/") + path,
                                        timeout=self.config.http_timeout_s) as resp:
                return ("ok", resp.read()) if resp.status == 200 else ("unavailable", None)
        except urllib.error.HTTPError:
            return "unavailable", None
        except urllib.error.URLError as exc:
            return ("refused" if isinstance(exc.reason, ConnectionRefusedError) else "unavailable"), None
        except ConnectionRefusedError:
            return "refused", None
        except (OSError, ValueError):
            return "unavailable", None

    def _get(self, path: str) -> bytes | None:
        return self._fetch(path)[1]

    def agent_state(self) -> str:
        """"ready", "refused" (no agent listens) or "unavailable" (not ready, or no answer in time)."""
        state, _ = self._fetch("/ready")
        return "ready" if state == "ok" else state

    def agent_ready(self) -> bool:
        return self.agent_state() == "ready"

    def capture_answer(self) -> tuple[bool, tuple[str, ...]] | None:
        """(synced, excluded IPs) from the agent's /capture; None when unreadable. An agent that
        does not say `synced` (older than this redirector) is taken as synced."""
        body = self._get("/capture")
        if body is None:
            return None
        try:
            answer = json.loads(body)
            ips = ipv4_only([str(ip) for ip in answer.get("excluded_ips", [])])
            return bool(answer.get("synced", True)), self.config.capture.with_excluded(ips).excluded_ips
        except (ValueError, AttributeError, TypeError):
            self.log("capture_answer_invalid", body=body[:200].decode(errors="replace"))
            return None

    def excluded_ips(self) -> tuple[str, ...]:
        """What the agent says today; on an unreadable or not yet synced answer, what it said last time."""
        answer = self.capture_answer()
        if answer is None or not answer[0]:
            return self.excluded
        return answer[1]

    # ----------------------------------------------------------------------------------- one step
    def adopt_existing(self) -> None:
        """At start: capture hooks already in the kernel (a restarted node, a redirector that was
        killed, the old pod of a rolling update) are ours to look after from now on. Whether they
        stay is decided by the first step, like any capture: an agent that is not there, or that has
        no identity yet, gets them removed at once (they DNAT pods to a port nobody serves, or
        capture the mesh's own pods); a busy one gets the grace."""
        plan = build_plan(self.config.capture)
        if self.redirector.capture_hooked(plan):
            self.capturing = True
            self.adopted = True
            self.plan = plan
            self.last_ready = self.clock()
            self.log("capture_found", reason="start", action="reconcile")

    def _fail_open(self, reason: str, now: float) -> None:
        assert self.plan is not None
        # Only the capture hooks, in one quick transaction: our chains and the return path stay
        # (in-flight transparent connections still need it), and every millisecond counts.
        self.redirector.remove_capture_hooks(self.plan)
        self.capturing = False
        self.adopted = False
        self.log("capture_removed", reason=reason, fail_open="true", not_ready_s=f"{now - self.last_ready:.2f}")

    def step(self) -> None:
        now = self.clock()
        state = self.agent_state()
        if state == "ready":
            self.last_ready = now
            answer = self.capture_answer()
            if answer is not None and answer[0]:
                excluded = answer[1]
                self.synced_once = True
            elif not self.synced_once:
                # The agent has no identity yet (it gets it from the controller): it cannot name the
                # pods to exclude, the mesh's own among them. Capturing now would send the controller's
                # calls to the API server through the agent it serves: the deadlock of issue 11.
                # Hooks adopted at start stay as they are: a ready agent with no identity is two
                # agents answering (a rolling update: the old one's /ready, the new one's /capture,
                # on the shared admin port), and an agent alone reports ready only once it has it.
                if not self.waiting_logged:
                    self.log("capture_waiting", reason="agent_not_synced")
                    self.waiting_logged = True
                return
            else:
                excluded = self.excluded  # a restarted agent re-syncing: the list we had still holds
            if not self.capturing or excluded != self.excluded or self.plan is None or self.adopted:
                plan = build_plan(self.config.capture.with_excluded(excluded))
                self.redirector.apply(plan, capture=True)
                if not self.capturing:
                    self.log("capture_installed", reason="agent_ready", excluded_ips=len(excluded))
                else:
                    self.log("capture_updated", excluded_ips=len(excluded))
                self.plan, self.excluded, self.capturing, self.adopted = plan, excluded, True, False
                self.last_asserted = now
            elif now - self.last_asserted >= self.config.reassert_s:
                self.last_asserted = now
                if self.redirector.apply(self.plan, capture=True):
                    self.log("capture_restored", reason="rules_missing")
            elif (sync_pods := getattr(self.redirector, "sync_pods", None)) is not None:
                sync_pods(self.excluded)   # eBPF capture: programs into new pods' cgroups every poll
        elif self.capturing and ((gone := state == "refused" and not self._agents_alive())
                                 or now - self.last_ready > self.config.grace_s):
            # Gone: the admin port refuses and no agent process is alive on the node (killed,
            # crashed, not started): its ports refuse every connection capture sends there, so
            # waiting out the grace only fails connections. A refusal while an agent lives is the
            # admin socket of a draining agent in a rolling update: the grace applies.
            self._fail_open("agent_gone" if gone else "agent_not_ready", now)

    def _agents_alive(self) -> bool:
        return bool(presence.present(presence.AGENT, self.redirector.nf.netns))

    def run(self) -> None:
        self.log("started", agent_admin=self.config.agent_admin, grace_s=self.config.grace_s,
                 mechanism=self.config.capture.mechanism, capture=self.config.capture.capture,
                 backend=self.redirector.nf.backend)
        if self.redirector.nf.netns is None:  # presence is per netns: only where we run
            try:
                self._presence = presence.register(presence.REDIRECTOR)
            except OSError as exc:
                self.log("presence_unavailable", error=repr(exc))
        try:
            try:
                self.adopt_existing()
            except ApplyError as exc:
                self.log("step_failed", error=str(exc).splitlines()[0])
            while not self._stop.is_set():
                started = self.clock()
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 (a failed apply must not kill the watcher: retry next poll)
                    self.log("step_failed", error=repr(exc))
                self._watch_agents()
                if self._wait(max(0.0, self.config.poll_s - (self.clock() - started))):
                    try:
                        self._on_agent_death()
                    except ApplyError as exc:
                        self.log("step_failed", error=str(exc).splitlines()[0])
        finally:
            for sock in self._agent_links.values():
                sock.close()
            self.shutdown()

    # ------------------------------------------------------------------------------- liveness
    def _watch_agents(self) -> None:
        """Hold a connection to every agent's presence socket (agent/liveness.py); new agents are
        found at each poll. The kernel ends the connection when the agent dies, however it dies."""
        if self.redirector.nf.netns is not None:
            return  # abstract sockets are per netns: only in the one we run in
        for name in presence.present(presence.AGENT):
            if name not in self._agent_links:
                sock = presence.connect(name)
                if sock is not None:
                    self._agent_links[name] = sock

    def _wait(self, timeout: float) -> bool:
        """Sleep until the next poll, or wake at once when an agent dies: True then."""
        links = dict(self._agent_links)
        self._dead_agents.clear()
        if not links:
            self._stop.wait(timeout)
            return False
        try:
            readable, _, _ = select.select(list(links.values()), [], [], timeout)
        except (OSError, ValueError):
            return False
        died = False
        for name, sock in links.items():
            if sock not in readable:
                continue
            try:
                data = sock.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # EOF or reset: the agent process is gone
                sock.close()
                del self._agent_links[name]
                self._dead_agents.add(name)
                died = True
        return died

    def _on_agent_death(self) -> None:
        """An agent died. If none is left (a rolling update may have another), nothing serves the
        ports capture sends pods to: take the capture hooks out now, not after a missed poll and the
        grace (kill -9 of the agent failed connects for ~1 s on a real node; issue 11 item 8)."""
        # The dead one's listening socket may still be listed for a moment (a process's sockets
        # close one by one as it exits): only other agents count.
        others = set(presence.present(presence.AGENT)) - self._dead_agents
        if not self.capturing or self._agent_links or others:
            return
        started = self.clock()
        assert self.plan is not None
        self.redirector.remove_capture_hooks(self.plan)
        self.capturing = False
        self.adopted = False
        self.log("capture_removed", reason="agent_died", fail_open="true",
                 seconds=f"{self.clock() - started:.3f}")

    def stop(self) -> None:
        self._stop.set()

    def _peer(self) -> str | None:
        """Another redirector of this node, to hand the shared rules to. In a DaemonSet rolling
        update the new pod's one normally runs already; with two agents on the node (the new one and
        ours, draining) it is at most starting: wait for it. One agent: an uninstall, nobody comes."""
        if self.redirector.nf.netns is not None:
            return None
        deadline = self.clock() + self.config.handover_wait_s
        me = presence.address(presence.REDIRECTOR)
        while True:
            # Never ourselves: our own socket, closed a moment ago, can still be listed while a
            # short-lived child forked before the close holds it (seen: rules "handed over" to our
            # own pid and left on the node after the last redirector's SIGTERM).
            peers = [p for p in presence.present(presence.REDIRECTOR) if p != me]
            if peers:
                return peers[0]
            if len(presence.present(presence.AGENT)) < 2 or self.clock() >= deadline:
                return None
            time.sleep(0.05)

    def shutdown(self) -> None:
        plan = self.plan or build_plan(self.config.capture)
        if self._presence is not None:
            self._presence.close()  # leaving: a peer shutting down at the same time must not count us
            self._presence = None
        peer = self._peer()
        if peer is not None:
            # The rules are the node's, shared by every redirector of it: removing them on the way
            # out took the new pod's capture and return path away (issue 11 item 7).
            self.capturing = False
            self.log("capture_handed_over", to=peer)
            return
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
