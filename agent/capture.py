"""Is the redirector's capture in place on this node? (read only: the redirector owns the rules)

Our hook in nat PREROUTING (`redirector.plan.hook_present`), read without importing the
redirector's apply module, which pulls in pyroute2 (about 20 MB of the agent parent's memory for a
check that reads one table), and without a thread: one `iptables-<backend>-save -t nat`
subprocess per backend, awaited on the event loop.
"""

from __future__ import annotations

from nodemesh.agent import spawn
from nodemesh.redirector.plan import hook_present

BACKENDS = ("nft", "legacy")   # the redirector installs into whichever one the node's rules use


async def capture_active() -> bool | None:
    """True: hooked; False: every backend read, no hook; None: unknown (a save failed, e.g. while
    another writer's transaction held the table) — the caller keeps what it knew."""
    unknown = False
    for backend in BACKENDS:
        try:
            code, out = await spawn.run([f"iptables-{backend}-save", "-t", "nat"])
        except OSError:  # this backend's tools are not installed
            continue
        if code != 0:
            unknown = True
        elif hook_present(out.decode("utf-8", "replace")):
            return True
    return None if unknown else False
