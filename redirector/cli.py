"""`python -m nodemesh.redirector plan|apply|remove|run|sysctls`: the redirector's command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from nodemesh.api.model import ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT
from nodemesh.redirector import ebpf, ebpf_mode, sockmap, sockmap_mode
from nodemesh.redirector.antispoof import AntiSpoof
from nodemesh.redirector.apply import ApplyError, Netfilter, Redirector, detect_backend, detect_eb_backend
from nodemesh.redirector.config import (
    DEFAULT_ROUTE_TABLE,
    DEFAULT_RULE_PRIORITY,
    DEFAULT_TRANSPARENT_MARK,
    CaptureConfig,
    ConfigError,
    ipv4_only,
)
from nodemesh.redirector.plan import build_plan, render_dry_run
from nodemesh.redirector.runner import FailOpenRunner, KVLog, RunnerConfig
from nodemesh.redirector.sysctls import ensure_node_sysctls
from pyroute2 import NetNS


def _csv(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(p, 0) for p in _csv(text))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--node-ip", help="the node's own address (DNAT target)")
    common.add_argument("--pod-cidr", action="append", default=[],
                        help="this node's pod CIDR (repeat or comma-separate)")
    common.add_argument("--outbound-port", type=int, default=OUTBOUND_PORT)
    common.add_argument("--inbound-port", type=int, default=INBOUND_PORT)
    common.add_argument("--admin-port", type=int, default=ADMIN_PORT)
    common.add_argument("--skip-ports", type=_ints, default=None,
                        help="destination ports never captured (the agent's own always are)")
    common.add_argument("--exclude-ip", action="append", default=[], help="pod IPs never captured")
    common.add_argument("--ignore-mark", action="append", type=lambda s: int(s, 0), default=[])
    common.add_argument("--mechanism", choices=("dnat", "tproxy"), default="dnat")
    common.add_argument("--mark", type=lambda s: int(s, 0), default=DEFAULT_TRANSPARENT_MARK)
    common.add_argument("--route-table", type=int, default=DEFAULT_ROUTE_TABLE)
    common.add_argument("--rule-priority", type=int, default=DEFAULT_RULE_PRIORITY)
    common.add_argument("--no-bridge-replies", action="store_true",
                        help="leave out the ebtables rule that routes local pod-to-pod TCP on bridges")
    common.add_argument("--agent-heartbeat", action="store_true",
                        help="capture only while the agent beats (/proc/net/xt_recent): the rules fail "
                             "open by themselves when the agent dies or hangs, with no redirector left")
    common.add_argument("--capture", choices=("iptables", "ebpf"), default="iptables",
                        help="how pods' outbound TCP reaches the agent: iptables nat rules, or cgroup/connect4 "
                             "programs in each pod's cgroup (bcc; falls back to iptables, logged, when the "
                             "node cannot run them). Inbound capture is iptables either way")
    common.add_argument("--accelerate", choices=("none", "sockmap"), default="none",
                        help="sockmap: sock_ops + sk_msg programs carry the local hop between a pod and the "
                             "agent socket to socket, past the TCP/IP stack (opt-in: docs/redirector.md "
                             "says what it costs and where it is unsafe). Off, logged, where the kernel refuses")
    common.add_argument("--bpf-dir", default=ebpf.DEFAULT_BPF_DIR,
                        help="--capture ebpf: where programs and maps are pinned (on a bpffs)")
    common.add_argument("--cgroup-root", default=ebpf.DEFAULT_CGROUP_ROOT,
                        help="--capture ebpf: the cgroup v2 directory holding the node's pod cgroups")
    common.add_argument("--backend", choices=("auto", "nft", "legacy"), default="auto",
                        help="iptables backend (auto: the one holding the node's rules)")
    common.add_argument("--netns", default=None, help="act inside this named network namespace")

    parser = argparse.ArgumentParser(prog="python -m nodemesh.redirector",
                                     description="nodemesh capture: plan, apply, remove, run fail-open")
    sub = parser.add_subparsers(dest="verb", required=True)
    plan = sub.add_parser("plan", parents=[common], help="print the rule plan")
    plan.add_argument("--dry-run", action="store_true", help="print only (the default: plan never applies)")
    sub.add_parser("apply", parents=[common], help="install the plan (idempotent)")
    sub.add_parser("remove", parents=[common], help="remove everything nodemesh installed")
    fail_open = sub.add_parser(
        "fail-open", parents=[common],
        help="at pod start: take the capture hooks out unless an agent is ready with its identity "
             "(rules left by a restarted node or a killed redirector); the return path stays")
    fail_open.add_argument("--agent-admin", default=f"http://127.0.0.1:{ADMIN_PORT}")
    run = sub.add_parser("run", parents=[common], help="watch the agent; capture only while it is ready")
    run.add_argument("--agent-admin", default=f"http://127.0.0.1:{ADMIN_PORT}")
    run.add_argument("--grace", type=float, default=2.0, help="seconds not ready before failing open")
    run.add_argument("--poll", type=float, default=0.25)
    run.add_argument("--no-anti-spoofing", dest="anti_spoofing", action="store_false",
                     help="do not pin local pod IPs to their interfaces (redirector/antispoof.py)")
    run.add_argument("--shutdown-wait", type=float, default=RunnerConfig.shutdown_wait_s,
                     help="at shutdown, keep the return path this long at most while the agent still "
                          "carries captured connections (its drain grace plus a margin)")
    sub.add_parser("sysctls", help="set the node sysctls the agent relies on (net.ipv4.tcp_migrate_req=1); "
                                   "the DaemonSet's privileged init container runs it")
    return parser


def _capture_config(args: argparse.Namespace, required: bool = True) -> CaptureConfig:
    given = tuple(c for arg in args.pod_cidr for c in _csv(arg))
    cidrs = ipv4_only(given)
    if given and not cidrs:
        raise ConfigError(f"no IPv4 pod CIDR in {','.join(given)}: capture is IPv4 only")
    if not required and (not args.node_ip or not cidrs):
        # Removal finds our rules by name and comment; only the routing part needs the numbers.
        args.node_ip, cidrs = args.node_ip or "127.0.0.1", cidrs or ("127.0.0.0/8",)
    if not args.node_ip or not cidrs:
        raise ConfigError("--node-ip and --pod-cidr are required")
    return CaptureConfig(
        node_ip=args.node_ip, pod_cidrs=cidrs, outbound_port=args.outbound_port,
        inbound_port=args.inbound_port, admin_port=args.admin_port, skip_ports=args.skip_ports,
        excluded_ips=tuple(ip for arg in args.exclude_ip for ip in _csv(arg)),
        ignore_marks=tuple(args.ignore_mark), mechanism=args.mechanism, transparent_mark=args.mark,
        route_table=args.route_table, rule_priority=args.rule_priority,
        bridge_replies=not args.no_bridge_replies, agent_heartbeat=args.agent_heartbeat,
        capture=args.capture,
    )


def _runner_config(args: argparse.Namespace, config: CaptureConfig) -> RunnerConfig:
    return RunnerConfig(config, agent_admin=args.agent_admin, grace_s=args.grace, poll_s=args.poll,
                        shutdown_wait_s=args.shutdown_wait)


def _redirector(args: argparse.Namespace) -> Redirector:
    backend = detect_backend(args.netns) if args.backend == "auto" else args.backend
    return Redirector(Netfilter(backend=backend, eb_backend=detect_eb_backend(backend, args.netns),
                                netns=args.netns))


def _fail_open_at_start(args: argparse.Namespace, config: CaptureConfig, redirector: Redirector,
                        log: KVLog) -> int:
    """The DaemonSet pod's first init container. After a node restart the rules from before are still
    in the kernel while nothing serves the agent's ports yet: every captured connection is refused,
    and the mesh's own pods (a restarted controller with a new IP) are captured before any agent
    can name them. Capture comes back when the redirector sees an agent ready with its identity.
    A rolling update's new pod finds the old agent serving: the hooks stay. Never fails the pod:
    the redirector retries whatever could not be done here."""
    runner = FailOpenRunner(RunnerConfig(config, agent_admin=args.agent_admin), redirector, log)
    try:
        state = runner.agent_state()
        answer = runner.capture_answer() if state == "ready" else None
        if state == "ready" and answer is not None and answer[0]:
            log("capture_kept", reason="agent_ready", at="pod_start")
        elif redirector.remove_capture_hooks(build_plan(config)):
            log("capture_removed", reason="agent_" + ("not_synced" if state == "ready" else state),
                at="pod_start", fail_open="true")
        else:
            log("capture_absent", at="pod_start")
    except ApplyError as exc:
        log("fail_open_failed", error=str(exc).splitlines()[0])
    return 0


def _halt_on_signals(antispoof: AntiSpoof) -> None:
    """Stop anti-spoofing writes as soon as SIGTERM/SIGINT arrives, before the runner's own handler
    removes the node's rules, so the loop never re-adds a chain behind the removal."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: object, previous: object = previous) -> None:
            antispoof.halt()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log = KVLog()
    if args.verb == "sysctls":
        ensure_node_sysctls(log)   # logged one line each; never fatal: the mesh works without them
        return 0
    try:
        config = _capture_config(args, required=args.verb not in ("remove", "fail-open"))
        if args.verb == "plan":
            sys.stdout.write(render_dry_run(build_plan(config)))
            return 0
        redirector = _redirector(args)
        if args.verb == "remove":
            # Whatever the mode asked now: an eBPF capture left pinned goes too (no compile needed).
            if os.path.isdir(args.bpf_dir):
                gone = ebpf.EbpfCapture(config.node_ip, config.outbound_port, config.networks, (),
                                        args.bpf_dir, args.cgroup_root).remove()
                log("removed_ebpf", changed=str(gone).lower(), bpf_dir=args.bpf_dir)
            if sockmap.pinned(args.bpf_dir):
                gone = sockmap.SockmapAccel(config.node_ip, config.outbound_port, config.networks[0], False,
                                            args.bpf_dir, args.cgroup_root).remove()
                log("removed_sockmap", changed=str(gone).lower(), bpf_dir=sockmap.accel_dir(args.bpf_dir))
        elif args.verb == "fail-open":
            if ebpf.read_enabled(args.bpf_dir):   # no compile at pod start: switch the pinned one off
                ebpf.EbpfCapture(config.node_ip, config.outbound_port, config.networks, (),
                                 args.bpf_dir, args.cgroup_root).set_enabled(False)
                log("capture_removed", reason="pod_start", mode="ebpf", fail_open="true")
        else:
            config, redirector = ebpf_mode.choose(config, redirector, args.bpf_dir, args.cgroup_root, log)
            if args.verb == "run":
                redirector = sockmap_mode.choose(config, redirector, args.accelerate, args.bpf_dir,
                                                 args.cgroup_root, log)
        if args.verb == "apply":
            changed = redirector.apply(build_plan(config))
            log("applied", changed=str(changed).lower(), backend=redirector.nf.backend)
        elif args.verb == "remove":
            changed = redirector.remove(build_plan(config))
            log("removed", changed=str(changed).lower(), backend=redirector.nf.backend)
        elif args.verb == "fail-open":
            return _fail_open_at_start(args, config, redirector, log)
        else:
            runner = FailOpenRunner(_runner_config(args, config), redirector, log)
            runner.install_signal_handlers()
            # Per-pod anti-spoofing runs beside capture, independent of it: it is not capture, so
            # it stays while capture fails open (redirector/antispoof.py).
            antispoof = AntiSpoof(redirector.nf, config.pod_cidrs, log,
                                  iproute=(lambda: NetNS(args.netns)) if args.netns else None) \
                if args.anti_spoofing else None
            if antispoof is not None:
                antispoof.start()
                _halt_on_signals(antispoof)
            try:
                runner.run()
            finally:
                if antispoof is not None:
                    antispoof.stop()
        return 0
    except (ConfigError, ApplyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
