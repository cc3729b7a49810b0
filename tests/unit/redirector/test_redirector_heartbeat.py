"""The agent's kernel heartbeat (redirector/heartbeat.py), against a plain file standing in for the
xt_recent list (the kernel side is tested in tests/integration/realnode/test_realnode_agent_crash.py)."""

from __future__ import annotations

import time
from pathlib import Path

from nodemesh.redirector import heartbeat
from nodemesh.redirector.heartbeat import HITCOUNT, Heartbeat


def _beats(path: Path) -> int:
    return path.read_text().count("+0.0.0.0\n") if path.exists() else 0


def _wait(pred, timeout: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_redirector_heartbeat_silence_bound_matches_the_rule() -> None:
    # HITCOUNT beats in WINDOW_S: the switch opens after WINDOW_S - (HITCOUNT-1)*PERIOD_S of silence.
    assert heartbeat.SILENCE_S == heartbeat.WINDOW_S - (HITCOUNT - 1) * heartbeat.PERIOD_S
    assert 0.2 <= heartbeat.SILENCE_S <= 1.0   # issue 12: a hung agent fails open within 1 s
    assert f"--hitcount {HITCOUNT} --name {heartbeat.LIST} --mask 0.0.0.0" in heartbeat.recent_match()


def test_redirector_heartbeat_beats_only_while_alive_and_bursts_only_at_first(tmp_path: Path) -> None:
    path = tmp_path / "list"
    alive = {"v": False}
    hb = Heartbeat(lambda: alive["v"], path=str(path), period_s=0.02).start()
    try:
        time.sleep(0.15)
        assert not path.exists(), "beats while not alive (not ready, no identity)"
        path.write_text("")          # the rules are installed: the list exists
        alive["v"] = True
        # the first beat is a full window's worth: capture works at once, not SILENCE_S later
        assert _wait(lambda: _beats(path) >= HITCOUNT)
        first = _beats(path)
        assert _wait(lambda: _beats(path) >= first + 3)
        assert _beats(path) < first + 3 + HITCOUNT, "steady beats are one at a time"
        alive["v"] = False
        time.sleep(0.1)
        stopped = _beats(path)
        time.sleep(0.15)
        assert _beats(path) == stopped, "beats after the agent stopped being ready"
        alive["v"] = True             # ready again (SIGCONT, identity back): one beat at a time, no
        assert _wait(lambda: _beats(path) >= stopped + 2)   # burst that would hold the switch for 1 s
        assert _beats(path) < stopped + HITCOUNT
    finally:
        hb.stop()


def test_redirector_heartbeat_survives_a_missing_list_and_a_failing_check(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "list"
    calls = {"n": 0}

    def alive() -> bool:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("boom")
        return True

    hb = Heartbeat(alive, path=str(path), period_s=0.01).start()
    try:
        assert _wait(lambda: calls["n"] > 10)
        assert hb.beats == 0           # no list: nothing written, nothing raised
        path.parent.mkdir()
        path.write_text("")
        assert _wait(lambda: _beats(path) >= HITCOUNT)
    finally:
        hb.stop()


def test_redirector_heartbeat_logs_a_late_beat(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A stall (here the readiness check itself, 0.4 s once) is measured and logged as a new longest gap."""
    path = tmp_path / "list"
    path.write_text("")
    calls = {"n": 0}

    def alive() -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            time.sleep(0.4)
        return True

    caplog.set_level("INFO", logger="nodemesh.redirector.heartbeat")
    hb = Heartbeat(alive, path=str(path), period_s=0.02).start()
    try:
        assert _wait(lambda: calls["n"] > 8)
        assert 0.4 <= hb.max_gap_s < 2.0
        assert any("event=heartbeat_gap" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    finally:
        hb.stop()
