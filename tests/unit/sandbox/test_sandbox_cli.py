"""`nodemesh sandbox get pods` table rendering, pinned like kubectl prints it."""

from __future__ import annotations

import datetime as dt

from nodemesh.cli.sandbox_cmd import age, render_pod_table

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def _pod(name: str, ns: str, ready: bool, restarts: int, waiting: str | None = None) -> dict:  # type: ignore[type-arg]
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": "2026-01-01T11:59:15Z"},
            "spec": {"nodeName": "node1"},
            "status": {"phase": "Running", "podIP": "10.244.1.2",
                       "containerStatuses": [{"ready": ready, "restartCount": restarts, "state": state}]}}


def test_table_plain_and_wide() -> None:
    pods = [_pod("web-abc-x1", "shop", True, 0), _pod("crash-abc-x2", "shop", False, 4, "CrashLoopBackOff")]
    assert render_pod_table(pods, wide=False, all_namespaces=False, now=NOW) == (
        "NAME           READY   STATUS             RESTARTS   AGE\n"
        "web-abc-x1     1/1     Running            0          45s\n"
        "crash-abc-x2   0/1     CrashLoopBackOff   4          45s"
    )
    wide = render_pod_table(pods[:1], wide=True, all_namespaces=True, now=NOW).splitlines()
    assert wide[0].split() == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE",
                               "NOMINATED", "NODE", "READINESS", "GATES"]
    assert wide[1].split() == ["shop", "web-abc-x1", "1/1", "Running", "0", "45s", "10.244.1.2", "node1",
                               "<none>", "<none>"]


def test_age_like_kubectl() -> None:
    def at(seconds: int) -> str:
        return age((NOW - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ"), NOW)

    assert [at(5), at(119), at(150), at(300), at(3600), at(5 * 3600), at(3 * 86400)] == \
        ["5s", "119s", "2m30s", "5m", "60m", "5h", "3d"]
