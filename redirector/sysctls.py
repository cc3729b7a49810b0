"""The node sysctls the mesh relies on, set by the one step allowed to: the DaemonSet's privileged
init container (`python -m nodemesh.redirector sysctls`). In every other container /proc/sys is
read-only, so the agent can only read them.

`net.ipv4.tcp_migrate_req=1` (Linux >= 5.14; per network namespace — under hostNetwork, the
node's): when an agent's SO_REUSEPORT listener closes (a rolling update hands over to the new
agent, a worker dies), the connections already completed in its accept queue, and the handshakes
in progress, move to another listener of the group instead of being reset. Measured on a rolling
restart under a new-connection-per-request load (docs/agent.md): with 0, 12 of 20 restarts reset
1-22 connections each; with 1, none of 20.

A sysctl the kernel does not have, or cannot be written, is logged and skipped: the mesh works
without it, a little less gracefully, and the agent says so at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# (key, value, why)
NODE_SYSCTLS: tuple[tuple[str, str, str], ...] = (
    ("net.ipv4.tcp_migrate_req", "1", "queued connections of a closing agent listener move to another"),
)


@dataclass(frozen=True)
class Outcome:
    key: str
    value: str
    status: str          # "set", "unchanged", "missing" (kernel without it), "failed"
    before: str = ""
    error: str = ""


def sysctl_path(key: str, root: Path = Path("/proc/sys")) -> Path:
    return root.joinpath(*key.split("."))


def ensure(key: str, value: str, root: Path = Path("/proc/sys")) -> Outcome:
    """Read first, write only when different: nothing is written when it is already right."""
    path = sysctl_path(key, root)
    try:
        before = path.read_text().strip()
    except FileNotFoundError:
        return Outcome(key, value, "missing")
    except OSError as exc:
        return Outcome(key, value, "failed", error=exc.strerror or str(exc))
    if before == value:
        return Outcome(key, value, "unchanged", before)
    try:
        path.write_text(value)
    except OSError as exc:
        return Outcome(key, value, "failed", before, exc.strerror or str(exc))
    return Outcome(key, value, "set", before)


def ensure_node_sysctls(log: Callable[..., None], root: Path = Path("/proc/sys")) -> list[Outcome]:
    outcomes = []
    for key, value, why in NODE_SYSCTLS:
        outcome = ensure(key, value, root)
        fields = {"key": key, "value": value, "status": outcome.status}
        if outcome.before:
            fields["before"] = outcome.before
        if outcome.error:
            fields["error"] = outcome.error
        log("sysctl", **fields, why=why)
        outcomes.append(outcome)
    return outcomes
