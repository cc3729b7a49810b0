"""`nodemesh top` on a real terminal (a pty): the live table draws, Ctrl-C ends it with exit 0."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

from cli_testkit import EMOJI, WEB, Served, tap_request_events


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def test_cli_tty_top_live_table_and_ctrl_c(controller: Served) -> None:
    events = []
    for i in range(3):
        events += tap_request_events(f"1:{i}", WEB, EMOJI, duration_us=2000)
    controller.fake.tap_events = events
    controller.fake.tap_hold_open = True
    leader, follower = pty.openpty()
    env = {**os.environ, "NODEMESH_CONTROLLER": controller.address, "COLUMNS": "160", "LINES": "40",
           "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodemesh.cli.main", "top", "deploy/web", "-n", "emojivoto", "--interval", "0.2"],
        stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    try:
        screen = _read_until(leader, b"emoji-5c6b-fghij", timeout=15)
        assert b"Success Rate" in screen and b"emoji-5c6b-fghij" in screen, screen
        assert b"press Ctrl-C to quit" in screen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        rest = _read_until(leader, b"\x00never", timeout=0.5)
        assert b"Traceback" not in screen + rest
        assert controller.fake.tap_cancelled.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
