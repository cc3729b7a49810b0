"""Is the redirector's capture in place on this node? (read only: the redirector owns the rules)

Our hook is a jump from nat PREROUTING to our chain (`redirector.plan.hook_present`). The agent
reads nat PREROUTING alone (`iptables -t nat -S PREROUTING`: on a node with 20k kube-proxy rules
~2 ms against ~370 ms for the whole table with `iptables-save -t nat`), in whichever backend the
redirector chose (redirector/backend.py), without ever creating a table in either:

- nft: `iptables-nft` never creates a table by reading one;
- legacy: read only when its nat table already exists (`/proc/net/ip_tables_names`). Reading a
  legacy table that does not exist creates it, and on an nft node that table stays until reboot
  and makes every `iptables` command there warn `iptables-legacy tables present`.

No pyroute2 (about 20 MB of the agent parent's memory for a check that reads one chain), no
thread, and no fork(): the tool is started with posix_spawn (agent/spawn.py; the parent runs
grpc's threads).
"""

from __future__ import annotations

from nodemesh.agent import spawn
from nodemesh.redirector.backend import LEGACY_TABLE_LISTS
from nodemesh.redirector.plan import hook_present


def legacy_nat_exists() -> bool:
    try:
        with open(LEGACY_TABLE_LISTS[0]) as f:
            return "nat" in f.read().split()
    except OSError:
        return False


async def _hooked(backend: str) -> bool | None:
    """None: this backend could not be read (not installed, or the read failed)."""
    try:
        code, out = await spawn.run([f"iptables-{backend}", "-w", "2", "-t", "nat", "-S", "PREROUTING"])
    except OSError:  # this backend's tools are not installed
        return None
    if code != 0:
        return None
    return hook_present("*nat\n" + out.decode("utf-8", "replace"))


async def capture_active() -> bool | None:
    """True: hooked; False: no hook where it could be; None: unknown (a read failed, e.g. while
    another writer's transaction held the table) — the caller keeps what it knew."""
    nft = await _hooked("nft")
    if nft:
        return True
    if not legacy_nat_exists():
        return nft            # False, or None when nft could not be read
    legacy = await _hooked("legacy")
    if legacy:
        return True
    return None if nft is None or legacy is None else False
