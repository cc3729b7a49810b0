"""Is the redirector's capture in place on this node? (read only: the redirector owns the rules)

The same question as `redirector.apply.capture_active` — our hook in nat PREROUTING — asked without
importing the redirector's apply module, which pulls in pyroute2 (about 20 MB of the agent
parent's memory for a check that reads one table), and without a thread: one
`iptables-<backend>-save -t nat` subprocess per backend, awaited on the event loop.
"""

from __future__ import annotations

import asyncio

from nodemesh.redirector.plan import CHAIN_PREROUTING

BACKENDS = ("nft", "legacy")   # the redirector installs into whichever one the node's rules use


def hook_present(save_text: str) -> bool:
    """Does nat PREROUTING (in `iptables-save` output) jump to the redirector's chain?"""
    jump = f"-j {CHAIN_PREROUTING}"
    in_nat = False
    for line in save_text.splitlines():
        if line.startswith("*"):
            in_nat = line.strip() == "*nat"
        elif in_nat and line.startswith("-A PREROUTING ") and (
                line.rstrip().endswith(jump) or jump + " " in line):
            return True
    return False


async def capture_active() -> bool:
    for backend in BACKENDS:
        try:
            proc = await asyncio.create_subprocess_exec(
                f"iptables-{backend}-save", "-t", "nat",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except OSError:  # this backend's tools are not installed
            continue
        out, _ = await proc.communicate()
        if proc.returncode == 0 and hook_present(out.decode("utf-8", "replace")):
            return True
    return False
