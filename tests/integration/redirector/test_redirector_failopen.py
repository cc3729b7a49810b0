"""The fail-open runner as it runs in the DaemonSet: a process in the node watching the agent's /ready."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from nodemesh.redirector import presence
from redirector_minicluster import NODE_IP, POD_CIDR, MiniCluster, assert_same, read_records

pytestmark = pytest.mark.root
GRACE_S = 2.0


def _wait(predicate, timeout: float, step: float = 0.1) -> float:  # type: ignore[no-untyped-def]
    """Seconds until predicate() held; raises after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    raise TimeoutError(f"condition not met within {timeout}s")


def test_redirector_fail_open_and_resume(mini_cluster: MiniCluster) -> None:
    cl = mini_cluster
    a, b = cl.pods["a"], cl.pods["b"]
    before = cl.snapshot(1)
    standin, record = cl.standin(1)
    runner = cl.spawn(cl.nodes[1], "-m", "nodemesh.redirector", "run", "--node-ip", NODE_IP[1],
                      "--pod-cidr", POD_CIDR[1], "--grace", str(GRACE_S), log="runner.log")

    def captured_dial() -> bool:
        n = len(read_records(record))
        res = cl.dial(a, b.ip, 8080, timeout=1)
        return res.stdout.strip() == a.ip and len(read_records(record)) > n

    def direct_dial() -> bool:
        return cl.dial(a, b.ip, 8080, timeout=0.5).stdout.strip() == a.ip

    try:
        _wait(captured_dial, 10)

        # The agent goes away: new connections fail until the grace passes, then go direct.
        cl.stop(standin, signal.SIGKILL)
        killed = time.monotonic()
        _wait(direct_dial, GRACE_S + 3, step=0.05)
        # The successful dial started within grace + 1 s (a dial takes ~0.1-0.3 s of Python start-up).
        went_direct = time.monotonic() - killed
        print(f"fail_open went_direct_s={went_direct:.2f}")
        assert went_direct <= GRACE_S + 1 + 0.5, went_direct

        # The agent is back: capture resumes.
        standin, record = cl.standin(1)
        _wait(captured_dial, 5)

        # The agent reports a's namespace as excluded: the runner re-applies, a goes direct.
        cl.excluded_file(1).write_text(f"{a.ip}\n")
        _wait(lambda: not captured_dial(), 5)
        cl.excluded_file(1).write_text("")
        _wait(captured_dial, 5)
    finally:
        cl.stop(runner, signal.SIGTERM)
    assert runner.returncode == 0
    log = (cl.workdir / "runner.log").read_text()
    assert log.count("event=capture_removed") == 1, log
    assert log.count("event=capture_installed") == 2, log
    assert log.count("event=capture_updated") == 2, log
    # SIGTERM removed everything the runner installed.
    assert_same(before, cl.snapshot(1), cl.workdir / "runner.log")


def test_redirector_rolling_update_restores_capture(mini_cluster: MiniCluster) -> None:
    """DaemonSet rolling update: a new redirector runs beside the old one; the old one's SIGTERM
    hands the shared rules over to it instead of removing them (it used to remove them, and the new
    one put them back within a second: a capture gap per node per upgrade, issue 11 item 7)."""
    cl = mini_cluster
    a, b = cl.pods["a"], cl.pods["b"]
    before = cl.snapshot(1)
    standin, record = cl.standin(1)
    argv = ("-m", "nodemesh.redirector", "run", "--node-ip", NODE_IP[1], "--pod-cidr", POD_CIDR[1])
    old = cl.spawn(cl.nodes[1], *argv, log="old.log")
    new = cl.spawn(cl.nodes[1], *argv, log="new.log")

    def captured_dial() -> bool:
        n = len(read_records(record))
        res = cl.dial(a, b.ip, 8080, timeout=1)
        return res.stdout.strip() == a.ip and len(read_records(record)) > n

    try:
        _wait(captured_dial, 10)
        # The new one alone may have made the dial captured: SIGTERM before the old one's handler is
        # installed would kill it (-15) instead of testing its shutdown.
        _wait(lambda: "event=started" in (cl.workdir / "old.log").read_text(), 10)
        # As in a DaemonSet rolling update (the new pod is up before the old one is stopped): both
        # redirectors announce themselves on the node before the old one gets SIGTERM.
        _wait(lambda: len(presence.present(presence.REDIRECTOR, cl.nodes[1])) == 2, 10)
        cl.stop(old, signal.SIGTERM)
        assert old.returncode == 0
        # At once, with no second of direct traffic: the old one left the rules in place.
        assert captured_dial()
    finally:
        cl.stop(new, signal.SIGTERM)
        cl.stop(standin, signal.SIGTERM)
    assert "event=capture_handed_over" in (cl.workdir / "old.log").read_text()
    assert "event=capture_restored" not in (cl.workdir / "new.log").read_text()
    assert_same(before, cl.snapshot(1), cl.workdir / "old.log", cl.workdir / "new.log")  # the last one out removed everything


BEATER = """
import logging, threading
from nodemesh.redirector.heartbeat import Heartbeat
logging.basicConfig(level=logging.INFO)
Heartbeat(lambda: True).start()
threading.Event().wait()
"""


def test_redirector_heartbeat_fails_open_with_nobody_left(mini_cluster: MiniCluster) -> None:
    """`--agent-heartbeat` (redirector/heartbeat.py), with no runner at all: capture works only while
    someone beats the list; a stopped beater fails the node open within its 0.7 s of silence, and
    captures again as soon as it continues; a SYN to an agent port nobody listens on is retried
    (dropped, not reset) and then goes direct. `remove` leaves the node exactly as before."""
    cl = mini_cluster
    a, b = cl.pods["a"], cl.pods["b"]
    ns = cl.nodes[1]
    before = cl.snapshot(1)
    standin, record = cl.standin(1)
    argv = ("--node-ip", NODE_IP[1], "--pod-cidr", POD_CIDR[1], "--agent-heartbeat")
    assert cl.spawn(ns, "-m", "nodemesh.redirector", "apply", *argv, log="apply.log").wait(30) == 0
    beater = None

    def dial(timeout: float = 1.0) -> tuple[bool, bool]:
        """(answered, captured)."""
        n = len(read_records(record))
        res = cl.dial(a, b.ip, 8080, timeout=timeout)
        return res.stdout.strip() == a.ip, len(read_records(record)) > n

    try:
        assert dial() == (True, False), "captured with nobody beating"
        beater = cl.spawn(ns, "-c", BEATER, log="beater.log")
        _wait(lambda: dial() == (True, True), 10)

        # The "agent" hangs: nobody removes anything, yet new connections go direct.
        beater.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _wait(lambda: dial(0.3) == (True, False), 5, step=0.02)
        went_direct = time.monotonic() - stopped
        print(f"heartbeat stopped: direct after {went_direct:.2f} s")
        assert went_direct <= 1.5, went_direct   # 0.7 s of silence, plus a dial's start-up on a busy machine
        beater.send_signal(signal.SIGCONT)
        _wait(lambda: dial() == (True, True), 3, step=0.02)

        # Agent and beater gone together: the first SYN finds no listener and is dropped, its
        # retransmission (1 s later) goes direct. Answered, not reset.
        cl.stop(standin, signal.SIGKILL)
        cl.stop(beater, signal.SIGKILL)
        started = time.monotonic()
        answered, _ = dial(timeout=5.0)
        print(f"agent and beater killed: answered={answered} after {time.monotonic() - started:.2f} s")
        assert answered
    finally:
        if beater is not None:
            beater.send_signal(signal.SIGCONT)
            cl.stop(beater, signal.SIGKILL)
        cl.stop(standin, signal.SIGKILL)
        assert cl.spawn(ns, "-m", "nodemesh.redirector", "remove", *argv, log="remove.log").wait(30) == 0
    assert "installed=true" in (cl.workdir / "beater.log").read_text()
    assert_same(before, cl.snapshot(1))
    listed = subprocess.run(["ip", "netns", "exec", ns, "ls", "/proc/net/xt_recent"], capture_output=True,
                            text=True, check=False)
    assert "nodemesh_agent" not in listed.stdout, "the heartbeat list outlived its rules"
