"""Apply a capture Plan to a node, and remove it, touching only what nodemesh owns.

- iptables: one atomic `iptables-restore --noflush` per change. Declaring our chains flushes them, so
  the chain contents are replaced in one transaction; the hooks into built-in chains are inserted
  (at position 1) only when missing and deleted by exact match. Nothing else is written.
- Applying compares the kernel's rules (as `iptables-save` prints them) with the plan first: applying
  the same plan twice writes nothing at all.
- Removal deletes our hooks, any rule anywhere carrying a `nodemesh:` comment, and our chains. With the
  nft backend a table left empty that only nodemesh used is deleted too, so `iptables-save` reads as
  before. (The legacy backend cannot unload a table from a namespace; see docs/redirector.md.)
- Backend: the node's (redirector/backend.py: kube-proxy's, found without creating a table in either
  backend); nothing is ever written to, or read with `-t` from, the other one. ebtables follows it
  where the kernel has legacy ebtables, else uses nft.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from nodemesh.redirector import backend as backend_mod
from nodemesh.redirector.backend import Backend
from nodemesh.redirector.plan import (
    CHAIN_INBOUND,
    CHAIN_INPUT,
    CHAIN_OUTBOUND,
    CHAIN_OUTPUT,
    CHAIN_PREROUTING,
    COMMENT_PREFIX,
    IPTABLES_TABLES,
    Plan,
)
from pyroute2 import IPRoute, NetNS

# NODEMESH_ANTISPOOF is redirector/antispoof.py's (raw PREROUTING): a full removal takes it too.
OUR_CHAINS = (CHAIN_PREROUTING, CHAIN_OUTBOUND, CHAIN_INBOUND, CHAIN_OUTPUT, CHAIN_INPUT, "NODEMESH_ANTISPOOF")
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


class ApplyError(RuntimeError):
    """A netfilter or routing command failed."""


@dataclass(frozen=True)
class Netfilter:
    """Runs the iptables/ebtables tools of one backend, optionally inside a named network namespace."""

    backend: Backend = "nft"
    eb_backend: Backend = "nft"
    netns: str | None = None

    def _run(self, argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
        full = (["ip", "netns", "exec", self.netns] if self.netns else []) + list(argv)
        proc = subprocess.run(full, check=False, input=stdin, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise ApplyError(f"{shlex.join(full)} failed ({proc.returncode}): {proc.stderr.strip()}"
                             + (f"\ninput:\n{stdin}" if stdin else ""))
        return proc.stdout

    def save(self, table: str | None = None) -> str:
        """`iptables-save` output without comments and counters (what we compare)."""
        argv = [f"iptables-{self.backend}-save"] + (["-t", table] if table else [])
        return strip_save(self._run(argv))

    def restore(self, text: str, noflush: bool = True) -> None:
        self._run([f"iptables-{self.backend}-restore"] + (["--noflush"] if noflush else []), text)

    def eb_save(self, table: str = "nat") -> str:
        return strip_save(self._run([f"ebtables-{self.eb_backend}-save", "-t", table], check=False))

    def eb_restore(self, text: str, noflush: bool = True) -> None:
        self._run([f"ebtables-{self.eb_backend}-restore"] + (["--noflush"] if noflush else []), text)

    def eb(self, *args: str, check: bool = True) -> str:
        return self._run([f"ebtables-{self.eb_backend}", *args], check=check)


def strip_save(text: str) -> str:
    """Drop `#` lines, counters and trailing blanks: what is left is the ruleset, comparable byte for byte."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":") and line.endswith("]") and "[" in line:
            line = line[: line.rindex("[")].rstrip()
        out.append(line.rstrip())
    return "\n".join(out) + ("\n" if out else "")


# ---------------------------------------------------------------------------------- iptables backend
# Which backend (nft or legacy) is the node's: redirector/backend.py, which reads both without
# creating a table in either. Re-exported here for the callers that import it from apply.
detect_backend = backend_mod.detect_backend
detect_eb_backend = backend_mod.detect_eb_backend
# ------------------------------------------------------------------------------ end iptables backend


# ----------------------------------------------------------------------------------------- parsing
@dataclass
class TableState:
    exists: bool
    chains: dict[str, str]              # chain -> policy ("-" for user chains)
    rules: dict[str, list[str]]         # chain -> specs (without "-A CHAIN ")


def parse_table(save_text: str, table: str) -> TableState:
    state = TableState(False, {}, {})
    current = None
    for line in save_text.splitlines():
        if line.startswith("*"):
            current = line[1:]
            if current == table:
                state.exists = True
            continue
        if current != table:
            continue
        if line.startswith(":"):
            name, _, policy = line[1:].partition(" ")
            state.chains[name] = policy.split(" ")[0]
            state.rules.setdefault(name, [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            state.rules.setdefault(chain, []).append(spec)
    return state


def _is_ours(spec: str) -> bool:
    return f'--comment "{COMMENT_PREFIX}' in spec or any(spec.endswith(f"-j {c}") for c in OUR_CHAINS)


# ------------------------------------------------------------------------------------------ iptables
def iptables_changes(plan: Plan, current: dict[str, TableState], capture: bool) -> str:
    """The restore script taking `current` to the plan (empty: nothing to do)."""
    out: list[str] = []
    for table in plan.tables:
        state = current[table]
        lines: list[str] = []
        want_chains = {c: [r.spec for r in plan.rules_in(table, c)] for c in plan.chains_in(table)}
        if any(state.rules.get(c) != specs or c not in state.chains for c, specs in want_chains.items()):
            lines.extend(f":{c} - [0:0]" for c in want_chains)
            lines.extend(f"-A {c} {spec}" for c, specs in want_chains.items() for spec in specs)
        for hook in plan.hooks_in(table):
            have = state.rules.get(hook.chain, [])
            wanted = capture or not hook.capture
            in_place = wanted and have[hook.position - 1: hook.position] == [hook.spec] \
                and have.count(hook.spec) == 1
            if in_place:
                continue
            lines.extend(f"-D {hook.chain} {hook.spec}" for _ in range(have.count(hook.spec)))
            if wanted:
                lines.append(f"-I {hook.chain} {hook.position} {hook.spec}")
        if lines:
            out.append(f"*{table}")
            out.extend(lines)
            out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def removal_script(current: dict[str, TableState]) -> str:
    out: list[str] = []
    for table, state in current.items():
        lines: list[str] = []
        for chain, specs in state.rules.items():
            if chain in OUR_CHAINS:
                continue
            lines.extend(f"-D {chain} {spec}" for spec in specs if _is_ours(spec))
        ours = [c for c in OUR_CHAINS if c in state.chains]
        lines.extend(f"-F {c}" for c in ours)
        lines.extend(f"-X {c}" for c in ours)
        if lines:
            out.extend([f"*{table}", *lines, "COMMIT"])
    return "\n".join(out) + "\n" if out else ""


def _is_empty(state: TableState) -> bool:
    return (all(c in BUILTIN_CHAINS and p == "ACCEPT" for c, p in state.chains.items())
            and not any(state.rules.values()))


# --------------------------------------------------------------------------------------- the actions
class Redirector:
    """Owns nodemesh's capture on one node (or one network namespace)."""

    def __init__(self, nf: Netfilter) -> None:
        self.nf = nf

    def _tables(self) -> dict[str, TableState]:
        text = self.nf.save()
        return {t: parse_table(text, t) for t in IPTABLES_TABLES}

    def apply(self, plan: Plan, capture: bool = True) -> bool:
        """Make the node hold exactly `plan` (hooks that capture only if `capture`). True if anything
        changed. Re-applying the same plan is a no-op."""
        changed = False
        script = iptables_changes(plan, self._tables(), capture)
        if script:
            self.nf.restore(script)
            changed = True
        changed |= self._apply_routing(plan)
        changed |= self._apply_ebtables(plan, capture)
        return changed

    def set_capture(self, plan: Plan, capture: bool) -> bool:
        return self.apply(plan, capture=capture)

    def remove_capture_hooks(self, plan: Plan) -> bool:
        """Take out only the hooks that capture (found by their exact spec), leaving our chains and
        the return path as they are: what fail-open does, for a caller that does not know the plan
        the hooks were installed with (`redirector fail-open` at pod start), and the fast path when
        the agent dies. True if any was there.

        First one transaction that deletes each hook once, without reading anything (it fails as a
        whole when a hook is not there): every millisecond here is a refused connection. Then a
        read of the kernel for what that could not do (a hook missing, or there twice)."""
        hooks = [h for h in plan.hooks if h.capture]
        by_table: dict[str, list[str]] = {}
        for hook in hooks:
            by_table.setdefault(hook.table, []).append(f"-D {hook.chain} {hook.spec}")
        quick = "".join(f"*{t}\n" + "\n".join(ls) + "\nCOMMIT\n" for t, ls in by_table.items())
        try:
            self.nf.restore(quick)
        except ApplyError:
            pass
        else:
            self._remove_capture_hooks_read(plan)
            return True
        return self._remove_capture_hooks_read(plan)

    def _remove_capture_hooks_read(self, plan: Plan) -> bool:
        tables = self._tables()
        lines: dict[str, list[str]] = {}
        for hook in plan.hooks:
            if hook.capture:
                have = tables[hook.table].rules.get(hook.chain, [])
                lines.setdefault(hook.table, []).extend(f"-D {hook.chain} {hook.spec}"
                                                        for _ in range(have.count(hook.spec)))
        script = "".join(f"*{t}\n" + "\n".join(ls) + "\nCOMMIT\n" for t, ls in lines.items() if ls)
        if script:
            self.nf.restore(script)
        return bool(script)

    def capture_hooked(self, plan: Plan) -> bool:
        """Does any hook that captures (the plan's, as the kernel holds them) sit in a built-in chain?"""
        tables = self._tables()
        return any(hook.spec in tables[hook.table].rules.get(hook.chain, []) for hook in plan.hooks if hook.capture)

    def remove(self, plan: Plan | None = None) -> bool:
        """Delete everything nodemesh installed (found by comment and chain name), nothing else."""
        changed = False
        tables = self._tables()
        script = removal_script(tables)
        if script:
            self.nf.restore(script)
            changed = True
        if self.nf.backend == "nft":
            after = self._tables()
            for table in tables:
                # A table nodemesh alone used is left behind empty by nft; deleting it restores the
                # ruleset as it was. A table someone else uses always has a rule or a user chain.
                if changed and after[table].exists and _is_empty(after[table]) and \
                        self._table_was_ours(tables[table]):
                    self.nf.restore(f"*{table}\nCOMMIT\n", noflush=False)
        changed |= self._remove_ebtables()
        # The anti-spoofing rules (redirector/antispoof.py): its raw chain went with ours above; its
        # ebtables filter chain (and a filter table only it used) goes here, as after a SIGKILL.
        from nodemesh.redirector.antispoof import remove_rules

        changed |= remove_rules(self.nf)
        if plan is not None:
            changed |= self._remove_routing(plan)
        return changed

    @staticmethod
    def _table_was_ours(state: TableState) -> bool:
        others = [s for c, specs in state.rules.items() if c not in OUR_CHAINS for s in specs
                  if not _is_ours(s)]
        user = [c for c in state.chains if c not in BUILTIN_CHAINS and c not in OUR_CHAINS]
        return not others and not user and all(p == "ACCEPT" for c, p in state.chains.items()
                                                 if c in BUILTIN_CHAINS)

    # ---------------------------------------------------------------------------------- ebtables
    def _eb_state(self) -> TableState:
        return parse_table(self.nf.eb_save("nat"), "nat")

    def _apply_ebtables(self, plan: Plan, capture: bool) -> bool:
        if not plan.eb_chains:
            return False
        state = self._eb_state()
        lines: list[str] = []
        want = [r.spec for r in plan.eb_rules]
        if state.rules.get(CHAIN_PREROUTING) != want or CHAIN_PREROUTING not in state.chains:
            if CHAIN_PREROUTING in state.chains:
                self.nf.eb("-t", "nat", "-F", CHAIN_PREROUTING)
            else:
                lines.append(f":{CHAIN_PREROUTING} RETURN")
            lines.extend(r.save_line() for r in plan.eb_rules)
        for hook in plan.eb_hooks:
            spec = f"-j {hook.target_chain}"
            have = state.rules.get(hook.chain, [])
            wanted = capture or not hook.capture
            if wanted and have[:1] == [spec] and have.count(spec) == 1:
                continue
            lines.extend(f"-D {hook.chain} {spec}" for _ in range(have.count(spec)))
            if wanted:
                lines.append(f"-I {hook.chain} 1 {spec}")
        if not lines:
            return False
        self.nf.eb_restore("*nat\n" + "\n".join(lines) + "\n")
        return True

    def _remove_ebtables(self) -> bool:
        before = self._eb_state()
        if CHAIN_PREROUTING not in before.chains:
            return False
        for chain, specs in before.rules.items():
            for spec in specs:
                if chain != CHAIN_PREROUTING and spec == f"-j {CHAIN_PREROUTING}":
                    self.nf.eb("-t", "nat", "-D", chain, *shlex.split(spec))
        self.nf.eb("-t", "nat", "-F", CHAIN_PREROUTING)
        self.nf.eb("-t", "nat", "-X", CHAIN_PREROUTING)
        after = self._eb_state()
        if self.nf.eb_backend == "nft" and _is_empty(after) and self._table_was_ours(before):
            self.nf.eb_restore("*nat\n", noflush=False)
        return True

    # ---------------------------------------------------------------------------------- routing
    def _iproute(self) -> IPRoute | NetNS:
        return NetNS(self.nf.netns) if self.nf.netns else IPRoute()

    def _apply_routing(self, plan: Plan) -> bool:
        changed = False
        with self._iproute() as ipr:
            for rule in plan.ip_rules:
                if not _find_rules(ipr, rule.table, rule.priority):
                    ipr.rule("add", table=rule.table, priority=rule.priority, fwmark=rule.fwmark,
                             fwmask=rule.fwmask, family=socket.AF_INET)
                    changed = True
            lo = ipr.link_lookup(ifname="lo")[0]
            for route in plan.ip_routes:
                if not _find_local_default(ipr, route.table):
                    ipr.route("add", dst=route.dst, type=route.type, oif=lo, table=route.table,
                              scope=254, family=socket.AF_INET)  # scope host, as for any local route
                    changed = True
        return changed

    def _remove_routing(self, plan: Plan) -> bool:
        changed = False
        with self._iproute() as ipr:
            for rule in plan.ip_rules:
                for _ in _find_rules(ipr, rule.table, rule.priority):
                    ipr.rule("del", table=rule.table, priority=rule.priority, fwmark=rule.fwmark,
                             fwmask=rule.fwmask, family=socket.AF_INET)
                    changed = True
            for route in plan.ip_routes:
                if _find_local_default(ipr, route.table):
                    lo = ipr.link_lookup(ifname="lo")[0]
                    ipr.route("del", dst=route.dst, type=route.type, oif=lo, table=route.table,
                              scope=254, family=socket.AF_INET)
                    changed = True
        return changed


def _find_rules(ipr: IPRoute | NetNS, table: int, priority: int) -> list[object]:
    found = []
    for msg in ipr.get_rules(family=socket.AF_INET):
        if msg.get("FRA_TABLE") == table and msg.get("FRA_PRIORITY") == priority:
            found.append(msg)
    return found


def _find_local_default(ipr: IPRoute | NetNS, table: int) -> bool:
    for msg in ipr.get_routes(family=socket.AF_INET, table=table):
        if msg.get("RTA_TABLE") == table and msg["dst_len"] == 0 and msg["type"] == 2:  # RTN_LOCAL
            return True
    return False

