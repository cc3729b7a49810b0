"""The node sysctls the mesh relies on, set by the one step allowed to: the DaemonSet's privileged
init container (`python -m nodemesh.redirector sysctls`). In every other container /proc/sys is
read-only, so the agent can only read them.

`net.ipv4.tcp_migrate_req=1` (Linux >= 5.14; per network namespace — under hostNetwork, the
node's): when an agent's SO_REUSEPORT listener closes (a rolling update hands over to the new
agent, a worker dies), the connections already completed in its accept queue, and the handshakes
in progress, move to another listener of the group instead of being reset. Measured on a rolling
restart under a new-connection-per-request load (docs/agent.md): with 0, 12 of 20 restarts reset
1-22 connections each; with 1, none of 20.

`net.netfilter.nf_conntrack_tcp_timeout_close_wait` at least 3600 (raised, never lowered; per
network namespace): the agent keeps a half-closed client connection (CLOSE_WAIT) for as long as
the server takes to finish its answer. With the kernel's 60 s, conntrack forgets such a connection
while both sockets live on; capture DNATs every connection of a pod to one agent address, so when
the pod reuses that source port towards another destination the NAT no longer sees the old tuple,
keeps the port, and the SYN meets the agent's old socket (challenge ACK, a connect delayed or
timed out). With the entry kept, the NAT moves the new connection to a free source port. Measured
in a two-namespace experiment: close_wait 3 s → `TcpExtTCPSYNChallenge` 1 and the old socket hit;
3600 → the port remapped, no challenge. kube-proxy sets the same 3600 on its nodes
(`conntrack.tcpCloseWaitTimeout`), so this changes nothing there; it matters on nodes without
kube-proxy's values.

A sysctl the kernel does not have, or cannot be written, is logged and skipped: the mesh works
without it, a little less gracefully, and the agent says so at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# (key, value, why); a value "N+" means at least N: a larger one is left as it is.
NODE_SYSCTLS: tuple[tuple[str, str, str], ...] = (
    ("net.ipv4.tcp_migrate_req", "1", "queued connections of a closing agent listener move to another"),
    ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600+",
     "conntrack keeps half-closed connections the agent still holds, so the NAT never reuses their tuple"),
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
    """Read first, write only when different: nothing is written when it is already right.
    `value` "N+": at least N (an integer sysctl already at N or more is left alone)."""
    at_least = value.endswith("+")
    value = value.removesuffix("+")
    path = sysctl_path(key, root)
    try:
        before = path.read_text().strip()
    except FileNotFoundError:
        return Outcome(key, value, "missing")
    except OSError as exc:
        return Outcome(key, value, "failed", error=exc.strerror or str(exc))
    if before == value or (at_least and before.isdigit() and int(before) >= int(value)):
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
