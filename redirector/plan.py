"""The capture rule plan: every chain, rule, policy-routing rule and ebtables rule nodemesh needs on a
node, built from a CaptureConfig as plain data. Nothing here touches the kernel; `apply.py` does.

Rules are written in the canonical form `iptables-save` prints them back in (addresses with their
prefix length, `-m comment` last before the target), so the plan can be compared with what the kernel
holds, line for line. Each rule carries a `nodemesh:` comment naming why it exists.

Mechanisms (see docs/redirector.md for why dnat is the default):
- dnat: nat PREROUTING DNATs captured TCP to the node's own address (outbound :4140, inbound :4143);
  the agent reads the original destination with SO_ORIGINAL_DST. Works on bridge and routed CNIs,
  unlike REDIRECT, which needs an IPv4 address on the incoming interface.
- tproxy: mangle PREROUTING TPROXYs captured TCP to an IP_TRANSPARENT listener; the original
  destination is the accepted socket's getsockname().
"""

from __future__ import annotations

from dataclasses import dataclass

from nodemesh.redirector import heartbeat
from nodemesh.redirector.config import CaptureConfig

CHAIN_PREROUTING = "NODEMESH_PREROUTING"
CHAIN_OUTBOUND = "NODEMESH_OUTBOUND"
CHAIN_INBOUND = "NODEMESH_INBOUND"
CHAIN_OUTPUT = "NODEMESH_OUTPUT"
CHAIN_INPUT = "NODEMESH_INPUT"


def hook_present(save_text: str) -> bool:
    """Is the node's pod traffic captured: does nat PREROUTING (in `iptables-save` output) jump to
    our chain? Read-only; used by the agent (reported to `nodemesh check`) and the sandbox installer."""
    jump = f"-j {CHAIN_PREROUTING}"
    in_nat = False
    for line in save_text.splitlines():
        if line.startswith("*"):
            in_nat = line.strip() == "*nat"
        elif in_nat and line.startswith("-A PREROUTING ") and (
                line.rstrip().endswith(jump) or jump + " " in line):
            return True
    return False
COMMENT_PREFIX = "nodemesh: "
IPTABLES_TABLES = ("raw", "mangle", "nat", "filter")


@dataclass(frozen=True)
class Rule:
    """One iptables rule appended to one of our chains."""

    table: str
    chain: str
    match: str      # matches before the comment, canonical order: -s -d -p then -m ...
    target: str     # "-j ..."
    comment: str    # why the rule exists

    @property
    def spec(self) -> str:
        parts = [p for p in (self.match, f'-m comment --comment "{COMMENT_PREFIX}{self.comment}"',
                             self.target) if p]
        return " ".join(parts)

    def save_line(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True)
class Hook:
    """A jump from a built-in chain into ours, inserted at `position` (1: ahead of kube-proxy)."""

    table: str
    chain: str
    target_chain: str
    comment: str
    position: int = 1
    capture: bool = True   # removing it stops capture (fail-open removes these; return-path hooks stay)

    @property
    def spec(self) -> str:
        return f'-m comment --comment "{COMMENT_PREFIX}{self.comment}" -j {self.target_chain}'

    def save_line(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True)
class IpRule:
    """`ip rule add fwmark MARK/MASK lookup TABLE priority PRIORITY`."""

    fwmark: int
    fwmask: int
    table: int
    priority: int
    comment: str

    def command(self) -> str:
        return (f"ip rule add fwmark {self.fwmark:#x}/{self.fwmask:#x} lookup {self.table} "
                f"priority {self.priority}")


@dataclass(frozen=True)
class IpRoute:
    """`ip route add local 0.0.0.0/0 dev lo table TABLE`: every address is local in that table."""

    type: str
    dst: str
    dev: str
    table: int
    comment: str

    def command(self) -> str:
        return f"ip route add {self.type} {self.dst} dev {self.dev} table {self.table}"


@dataclass(frozen=True)
class EbRule:
    """One ebtables rule appended to our chain. ebtables has no comment match: our chain is the mark."""

    table: str
    chain: str
    spec: str
    comment: str

    def save_line(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass(frozen=True)
class Plan:
    config: CaptureConfig
    chains: tuple[tuple[str, str], ...]          # (table, chain) we own, in creation order
    rules: tuple[Rule, ...]
    hooks: tuple[Hook, ...]
    ip_rules: tuple[IpRule, ...]
    ip_routes: tuple[IpRoute, ...]
    eb_chains: tuple[tuple[str, str], ...]
    eb_rules: tuple[EbRule, ...]
    eb_hooks: tuple[Hook, ...]

    @property
    def tables(self) -> tuple[str, ...]:
        used = {t for t, _ in self.chains}
        return tuple(t for t in IPTABLES_TABLES if t in used)

    def chains_in(self, table: str) -> tuple[str, ...]:
        return tuple(c for t, c in self.chains if t == table)

    def rules_in(self, table: str, chain: str | None = None) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.table == table and (chain is None or r.chain == chain))

    def hooks_in(self, table: str) -> tuple[Hook, ...]:
        return tuple(h for h in self.hooks if h.table == table)


def _addr(ip: str) -> str:
    return ip if "/" in ip else f"{ip}/32"


def _mark(mark: int) -> str:
    return f"{mark:#x}/{mark:#x}"


def build_plan(config: CaptureConfig) -> Plan:
    """The complete plan for one node. Pure: the same config always gives the same plan."""
    if config.mechanism == "tproxy":
        capture_table = "mangle"
    else:
        capture_table = "nat"
    rules: list[Rule] = []
    chains: list[tuple[str, str]] = []
    hooks: list[Hook] = []
    mark = _mark(config.transparent_mark)

    # --- return path for the agent's transparent upstream sockets (source = the calling pod's IP).
    # Replies to such a socket are addressed to a pod IP the kernel would forward to the pod; marking
    # them sends them through our routing table, where every address is local, so they reach the socket.
    chains.append(("mangle", CHAIN_PREROUTING))
    hooks.append(Hook("mangle", "PREROUTING", CHAIN_PREROUTING,
                      "return path and capture for transparent sockets" if config.mechanism == "tproxy"
                      else "return path for transparent agent sockets",
                      capture=config.mechanism == "tproxy"))
    rules.append(Rule("mangle", CHAIN_PREROUTING, "-p tcp -m socket --transparent",
                      f"-j MARK --set-xmark {mark}",
                      "packet of a local transparent socket: route it to the socket"))
    # The socket match cannot find the socket when kube-proxy DNATed the agent's upstream connection
    # in OUTPUT (the agent dialled a ClusterIP): the reply comes from the endpoint, not the address the
    # socket is connected to. Conntrack still knows the connection: mark it when it leaves (a locally
    # sent packet whose source is not a node address comes from a transparent socket), mark replies.
    rules.append(Rule("mangle", CHAIN_PREROUTING, f"-p tcp -m connmark --mark {mark}",
                      f"-j MARK --set-xmark {mark}",
                      "reply on a connection of a transparent socket: route it to the socket"))
    chains.append(("mangle", CHAIN_OUTPUT))
    hooks.append(Hook("mangle", "OUTPUT", CHAIN_OUTPUT,
                      "remember connections of transparent agent sockets", capture=False))
    rules.append(Rule("mangle", CHAIN_OUTPUT, "-p tcp -m addrtype ! --src-type LOCAL",
                      f"-j CONNMARK --set-xmark {mark}",
                      "sent from a non-node address: a transparent socket, mark its connection"))
    # When the endpoint is on this node's own network (the API server, a hostNetwork pod), its
    # replies never arrive through PREROUTING: they are sent from here, and routed to the pod whose
    # IP the agent's socket borrowed (the pod answers with a reset; the upstream connect timed out on
    # a real node). Marking them as they leave re-routes them (mangle OUTPUT re-routes on a new
    # mark) through the all-local table, back in through lo to the agent's socket.
    rules.append(Rule("mangle", CHAIN_OUTPUT, f"-p tcp -m connmark --mark {mark} -m conntrack --ctdir REPLY",
                      f"-j MARK --set-xmark {mark}",
                      "reply from an endpoint on this node to a transparent socket: route it to the socket"))
    # The agent's upstream carries the calling pod's address and a port of its own choosing, so its
    # 4-tuple can be one the pod (or the other node's agent) also has in conntrack: a captured
    # connection, DNATed to the agent. Looked up in the same zone, the upstream's SYN is taken for
    # that connection and NATed back to the agent's own listener (it times out), or a pod's new SYN
    # is taken for the upstream and reaches the server un-NATed (and resets it). In a zone of their
    # own for the original direction, the agent's connections never match a pod's; replies are looked
    # up in the default zone as before (found by tests/integration/faults, 21-455 collisions in 8,000).
    chains.append(("raw", CHAIN_OUTPUT))
    hooks.append(Hook("raw", "OUTPUT", CHAIN_OUTPUT,
                      "transparent agent connections get a conntrack zone of their own", capture=False))
    rules.append(Rule("raw", CHAIN_OUTPUT, "-p tcp -m addrtype ! --src-type LOCAL",
                      f"-j CT --zone-orig {config.conntrack_zone}",
                      "sent from a non-node address: a transparent socket, its own conntrack zone"))
    if config.mechanism == "tproxy":
        rules.append(Rule("mangle", CHAIN_PREROUTING, f"-p tcp -m mark --mark {mark}", "-j RETURN",
                          "already belongs to a transparent socket: never divert it again"))
        # Without this, replies to the agent's own upstream connections that carry a local address
        # would be diverted to the listener and the upstream handshake hangs.
        rules.append(Rule("mangle", CHAIN_PREROUTING, "-m addrtype --dst-type LOCAL", "-j RETURN",
                          "addressed to the node itself: not pod traffic"))

    # --- capture: one chain deciding, two chains redirecting.
    if config.mechanism == "dnat":
        chains.append(("nat", CHAIN_PREROUTING))
        hooks.append(Hook("nat", "PREROUTING", CHAIN_PREROUTING,
                          "capture pod TCP ahead of kube-proxy so ClusterIPs stay visible"))
        rules.append(Rule("nat", CHAIN_PREROUTING, "-m addrtype --dst-type LOCAL", "-j RETURN",
                          "addressed to the node itself: not pod traffic"))
    chains.append((capture_table, CHAIN_OUTBOUND))
    chains.append((capture_table, CHAIN_INBOUND))
    for m in config.ignore_marks:
        rules.append(Rule(capture_table, CHAIN_PREROUTING, f"-m mark --mark {_mark(m)}", "-j RETURN",
                          f"mark {m:#x} is never captured"))
    ports = ",".join(str(p) for p in config.effective_skip_ports)
    rules.append(Rule(capture_table, CHAIN_PREROUTING, f"-p tcp -m multiport --dports {ports}", "-j RETURN",
                      "skipped ports and the agent ports are never proxied"))
    if config.agent_heartbeat and config.mechanism == "dnat":
        # Fail-open by construction (redirector/heartbeat.py): no beat from the agent for
        # SILENCE_S (dead, hung) and pods go direct, even with no redirector left to act.
        rules.append(Rule(capture_table, CHAIN_PREROUTING, f"-p tcp {heartbeat.recent_match()}", "-j RETURN",
                          "no heartbeat from the agent: fail open"))
    if config.capture == "iptables":
        # With --capture ebpf the pods' own connect() goes to the agent (redirector/ebpf.py).
        for cidr in config.networks:
            rules.append(Rule(capture_table, CHAIN_PREROUTING, f"-s {cidr} -p tcp", f"-j {CHAIN_OUTBOUND}",
                              "TCP leaving a local pod is outbound"))
    for cidr in config.networks:
        rules.append(Rule(capture_table, CHAIN_PREROUTING, f"-d {cidr} -p tcp", f"-j {CHAIN_INBOUND}",
                          "TCP arriving for a local pod is inbound"))

    for ip in config.excluded_ips:
        rules.append(Rule(capture_table, CHAIN_OUTBOUND, f"-s {_addr(ip)}", "-j RETURN",
                          "source pod namespace is excluded from capture"))
    rules.append(Rule(capture_table, CHAIN_OUTBOUND, "-p tcp", _redirect(config, config.outbound_port),
                      "outbound TCP goes to the agent outbound port"))
    for cidr in config.networks:
        # A local pod calling a local pod is seen once, outbound; only an excluded caller gets here.
        rules.append(Rule(capture_table, CHAIN_INBOUND, f"-s {cidr}", "-j RETURN",
                          "local callers are captured outbound, not inbound"))
    for ip in config.excluded_ips:
        rules.append(Rule(capture_table, CHAIN_INBOUND, f"-d {_addr(ip)}", "-j RETURN",
                          "destination pod namespace is excluded from capture"))
    rules.append(Rule(capture_table, CHAIN_INBOUND, "-p tcp", _redirect(config, config.inbound_port),
                      "inbound TCP goes to the agent inbound port"))

    if config.agent_heartbeat and config.mechanism == "dnat":
        # A SYN DNATed to an agent port where nothing listens (the agent just died, its heartbeat
        # not yet expired) is dropped rather than reset: its conntrack entry is never confirmed,
        # so the client's retransmission, a second later, is a new connection and goes direct.
        agent_ports = f"{config.outbound_port},{config.inbound_port}"
        syn_to_agent = (f"-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate DNAT "
                        f"-m multiport --dports {agent_ports}")
        chains.append(("mangle", CHAIN_INPUT))
        hooks.append(Hook("mangle", "INPUT", CHAIN_INPUT,
                          "captured connections to an agent port nobody listens on are retried, not reset",
                          capture=False))
        rules.append(Rule("mangle", CHAIN_INPUT, f"{syn_to_agent} -m socket --nowildcard", "-j RETURN",
                          "an agent listens: deliver"))
        rules.append(Rule("mangle", CHAIN_INPUT, syn_to_agent, "-j DROP",
                          "no agent listens: drop, the retransmission goes direct once the heartbeat expired"))

    ip_rules = (IpRule(config.transparent_mark, config.transparent_mark, config.route_table,
                       config.rule_priority, "marked packets use the all-local table"),)
    ip_routes = (IpRoute("local", "0.0.0.0/0", "lo", config.route_table,
                         "every address is local: deliver to the transparent socket"),)

    eb_chains: tuple[tuple[str, str], ...] = ()
    eb_rules: list[EbRule] = []
    eb_hooks: tuple[Hook, ...] = ()
    if config.bridge_replies:
        # On a bridge CNI a reply from a local pod to another local pod's IP is switched at L2 and
        # never reaches the agent's socket bound to that IP. Sending it to the bridge's own MAC makes
        # the node route it, where the mark above delivers it. Harmless where there is no bridge.
        eb_chains = (("nat", CHAIN_PREROUTING),)
        # A return-path hook, not a capture hook: fail-open and shutdown keep it while the agent's
        # same-node transparent connections are still in flight (without it their replies are
        # switched past the agent and the request hangs; found by the sandbox uninstall test).
        # New direct connections are merely routed by the node instead of switched.
        eb_hooks = (Hook("nat", "PREROUTING", CHAIN_PREROUTING,
                         "route local pod-to-pod TCP so replies reach transparent sockets", capture=False),)
        for src in config.networks:
            for dst in config.networks:
                eb_rules.append(EbRule("nat", CHAIN_PREROUTING,
                                       f"-p IPv4 --ip-src {src} --ip-dst {dst} --ip-proto tcp "
                                       "-j redirect",
                                       "local pod to local pod TCP is routed, not switched"))

    return Plan(config, tuple(chains), tuple(rules), tuple(hooks), ip_rules, ip_routes,
                eb_chains, tuple(eb_rules), eb_hooks)


def _redirect(config: CaptureConfig, port: int) -> str:
    if config.mechanism == "tproxy":
        return (f"-j TPROXY --on-port {port} --on-ip {config.node_ip} "
                f"--tproxy-mark {_mark(config.transparent_mark)}")
    return f"-j DNAT --to-destination {config.node_ip}:{port}"


# ---------------------------------------------------------------------------------------- rendering
def render_iptables(plan: Plan, capture: bool = True) -> str:
    """The plan as `iptables-restore --noflush` input (iptables-save syntax). Declaring our chains
    flushes them, so feeding this twice leaves the same rules; hooks are `-I CHAIN POS`."""
    out: list[str] = []
    for table in plan.tables:
        out.append(f"*{table}")
        out.extend(f":{chain} - [0:0]" for chain in plan.chains_in(table))
        for hook in plan.hooks_in(table):
            if capture or not hook.capture:
                out.append(f"-I {hook.chain} {hook.position} {hook.spec}")
        out.extend(r.save_line() for r in plan.rules_in(table))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_ebtables(plan: Plan, capture: bool = True) -> str:
    out: list[str] = []
    for table in sorted({t for t, _ in plan.eb_chains}):
        out.append(f"*{table}")
        out.extend(f":{c} RETURN" for t, c in plan.eb_chains if t == table)
        for hook in plan.eb_hooks:
            if hook.table == table and (capture or not hook.capture):
                out.append(f"-I {hook.chain} {hook.position} -j {hook.target_chain}")
        out.extend(r.save_line() for r in plan.eb_rules if r.table == table)
    return "\n".join(out) + ("\n" if out else "")


def render_dry_run(plan: Plan) -> str:
    """Everything the plan installs, each part in its own tool's syntax."""
    c = plan.config
    head = [
        (f"# nodemesh capture plan: mechanism={c.mechanism} node_ip={c.node_ip} "
        f"pod_cidrs={','.join(c.networks)} outbound={c.outbound_port} inbound={c.inbound_port}"),
        (f"# excluded_ips={','.join(c.excluded_ips) or '-'} skip_ports="
        f"{','.join(str(p) for p in c.effective_skip_ports)}"),
    ]
    if c.agent_heartbeat:
        head.append(f"# agent_heartbeat: capture while the agent beats {heartbeat.proc_path()} "
                    f"every {heartbeat.PERIOD_S:g}s; {heartbeat.SILENCE_S:g}s of silence fails open")
    head.append("# --- iptables (iptables-restore --noflush)")
    parts = ["\n".join(head) + "\n", render_iptables(plan)]
    parts.append("# --- policy routing (pyroute2)\n")
    parts.extend(f"{r.command()}  # {r.comment}\n" for r in plan.ip_rules)
    parts.extend(f"{r.command()}  # {r.comment}\n" for r in plan.ip_routes)
    if plan.eb_chains:
        parts.append("# --- ebtables (ebtables-restore --noflush)\n")
        parts.append(render_ebtables(plan))
    return "".join(parts)
