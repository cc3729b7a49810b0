"""The node sysctls the privileged init container sets (redirector/sysctls.py), on a stand-in
/proc/sys tree: read first and write only what differs, and a missing or unwritable sysctl is
logged, never fatal. (tests/integration/agent/test_agent_request_migration.py runs it for real.)"""

from __future__ import annotations

from pathlib import Path

from nodemesh.redirector.sysctls import ensure, ensure_node_sysctls, sysctl_path

KEY = "net.ipv4.tcp_migrate_req"


def test_redirector_sysctl_read_first_write_only_what_differs(tmp_path: Path) -> None:
    path = sysctl_path(KEY, tmp_path)
    assert path == tmp_path / "net" / "ipv4" / "tcp_migrate_req"
    assert ensure(KEY, "1", tmp_path).status == "missing"          # a kernel older than 5.14
    path.parent.mkdir(parents=True)
    path.write_text("0\n")
    outcome = ensure(KEY, "1", tmp_path)
    assert (outcome.status, outcome.before, path.read_text()) == ("set", "0", "1")
    path.chmod(0o444)
    assert ensure(KEY, "1", tmp_path).status == "unchanged"       # nothing written
    path.unlink()
    path.mkdir()                                                  # unreadable as a value: failed, not raised
    assert ensure(KEY, "1", tmp_path).status == "failed"


CLOSE_WAIT = "net.netfilter.nf_conntrack_tcp_timeout_close_wait"


def test_redirector_sysctl_at_least_raises_and_never_lowers(tmp_path: Path) -> None:
    path = sysctl_path(CLOSE_WAIT, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("60\n")                                       # the kernel's default
    outcome = ensure(CLOSE_WAIT, "3600+", tmp_path)
    assert (outcome.status, outcome.before, path.read_text()) == ("set", "60", "3600")
    path.write_text("86400\n")                                    # someone wants longer: theirs
    assert ensure(CLOSE_WAIT, "3600+", tmp_path).status == "unchanged"
    assert path.read_text() == "86400\n"


def test_redirector_sysctls_log_one_line_each(tmp_path: Path) -> None:
    logged: list[tuple[str, dict[str, object]]] = []
    for key, value in ((KEY, "0"), (CLOSE_WAIT, "60")):
        sysctl_path(key, tmp_path).parent.mkdir(parents=True, exist_ok=True)
        sysctl_path(key, tmp_path).write_text(value)
    outcomes = ensure_node_sysctls(lambda event, **f: logged.append((event, f)), tmp_path)
    assert [o.status for o in outcomes] == ["set", "set"]
    assert logged[0][0] == "sysctl" and logged[0][1]["key"] == KEY and logged[0][1]["status"] == "set"
    assert logged[1][1]["key"] == CLOSE_WAIT and logged[1][1]["value"] == "3600+"
