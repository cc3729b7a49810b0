"""Which iptables backend a node uses, nft or legacy, found without creating anything in either.

Both backends work side by side in one kernel, but a node must keep to one. Netfilter runs both
backends' nat hooks with no order between them, so our capture hook must sit in the backend that
holds kube-proxy's rules to run before them; and from the moment any legacy table exists in a
network namespace, every `iptables-nft` command there prints `# Warning: iptables-legacy tables
present` — and a legacy table cannot be removed until the namespace (the node: a reboot) goes.

Reading a legacy table creates it: `iptables-legacy-save -t nat` (what the agent once ran every
2 s) instantiated a legacy nat table on nft nodes. So this module only looks:

- the legacy tables that exist are listed in `/proc/net/ip_tables_names` (reading it creates
  nothing); `iptables-legacy-save` *without* `-t` dumps exactly those, and runs only when there are
  any;
- `iptables-nft-save` never creates a table.

The choice is kube-proxy's (kubernetes-sigs/iptables-wrappers): the backend holding kube-proxy's
or kubelet's chains (`KUBE-*`), else the one holding more rules, else the one `iptables` on PATH
points to (Debian's default, nft, in our image) — unless that backend cannot be read at all (a
kernel without nf_tables), then the other. The redirector holds to its choice for its lifetime;
`--backend nft|legacy` pins it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Backend = Literal["nft", "legacy"]
LEGACY_TABLE_LISTS = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")

# runs argv (inside the node's network namespace), returns (exit code, stdout); -1 if not found
Runner = Callable[[Sequence[str]], tuple[int, str]]


@dataclass(frozen=True)
class Ruleset:
    """What one backend holds, from its `*-save` output."""

    readable: bool
    rules: int = 0          # "-A" lines
    kube: bool = False      # a KUBE-* chain: kube-proxy's or kubelet's

    @classmethod
    def parse(cls, code: int, text: str) -> Ruleset:
        if code != 0:
            return cls(False)
        lines = text.splitlines()
        return cls(True, sum(1 for line in lines if line.startswith("-A ")),
                   any(line.startswith(":KUBE-") for line in lines))


def choose(nft: Ruleset, legacy: Ruleset, default: Backend) -> Backend:
    """The node's backend, from what each one holds (pure: golden-tested in tests/unit/redirector)."""
    if nft.kube != legacy.kube:
        return "nft" if nft.kube else "legacy"
    if nft.rules != legacy.rules:
        return "nft" if nft.rules > legacy.rules else "legacy"
    if not nft.readable and legacy.readable:
        return "legacy"
    return default


def legacy_tables(run: Runner) -> list[str]:
    """The legacy (x_tables) tables that exist in the namespace: reading the list creates none."""
    names: list[str] = []
    for path in LEGACY_TABLE_LISTS:
        code, text = run(["cat", path])
        if code == 0:
            names += [line.strip() for line in text.splitlines() if line.strip()]
    return names


def observe(run: Runner) -> tuple[Ruleset, Ruleset]:
    """Both backends' rulesets, read without creating any table in either."""
    nft = Ruleset.parse(*run(["iptables-nft-save"]))
    if legacy_tables(run):
        legacy = Ruleset.parse(*run(["iptables-legacy-save"]))   # no -t: only the tables that exist
    else:
        legacy = Ruleset(readable=True)
    return nft, legacy


def path_default() -> Backend:
    """What `iptables` on PATH points to (Debian's alternatives)."""
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        path = os.path.join(d, "iptables")
        if os.access(path, os.X_OK):
            return "legacy" if "legacy" in os.path.basename(os.path.realpath(path)) else "nft"
    return "nft"


def netns_runner(netns: str | None) -> Runner:
    """Run tools in the named network namespace (`ip netns exec`), or here."""
    def run(argv: Sequence[str]) -> tuple[int, str]:
        full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
        try:
            proc = subprocess.run(full, capture_output=True, text=True, check=False, timeout=60)
        except FileNotFoundError:
            return -1, ""
        return proc.returncode, proc.stdout
    return run


def detect_backend(netns: str | None = None, run: Runner | None = None) -> Backend:
    """The backend the node's other rules live in (see the module docstring)."""
    nft, legacy = observe(run or netns_runner(netns))
    return choose(nft, legacy, path_default())


def detect_eb_backend(backend: Backend, netns: str | None = None, run: Runner | None = None) -> Backend:
    """ebtables follows the iptables backend where the kernel has legacy ebtables; kernels built
    without it (CONFIG_BRIDGE_NF_EBTABLES_LEGACY unset, as on recent distributions) leave nft."""
    if backend == "nft":
        return "nft"
    code, _ = (run or netns_runner(netns))(["ebtables-legacy", "-t", "nat", "-L"])
    return "legacy" if code == 0 else "nft"
