"""`python -m nodemesh.agent`: the node agent (supervisor + workers)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvloop
from nodemesh.agent.config import DEFAULT_OPAQUE_PORTS, AgentConfig
from nodemesh.agent.supervisor import Supervisor, fork_workers


def build_config(args: argparse.Namespace) -> AgentConfig:
    cidrs = tuple(c for arg in args.pod_cidr for c in arg.split(",") if c)
    opaque = tuple(int(p) for p in args.opaque_ports.split(",") if p) if args.opaque_ports is not None \
        else DEFAULT_OPAQUE_PORTS
    return AgentConfig(
        node=args.node, node_ip=args.node_ip, pod_cidrs=cidrs, listen_host=args.listen_host,
        outbound_port=args.outbound_port, inbound_port=args.inbound_port, admin_host=args.admin_host,
        admin_port=args.admin_port,
        workers=args.workers if args.workers else len(os.sched_getaffinity(0)),
        transparent=not args.no_transparent, detect_timeout_s=args.detect_timeout,
        header_timeout_s=args.header_timeout, opaque_ports=opaque, drain_grace_s=args.drain_grace,
        controller=args.controller, token_file=args.token_file, controller_ca=args.controller_ca,
        identity_file=args.identity_file,
        identity_wait_s=args.identity_wait, series_idle_s=args.series_idle, max_authorities=args.max_authorities,
        route_metrics=not args.no_route_metrics, max_routes=args.max_routes,
        report_history_s=args.report_history, report_history_max_bytes=int(args.report_history_max_mb * (1 << 20)),
        log_level=args.log_level, health_file=args.health_file, cert_dir=args.cert_dir,
        mtls=args.mtls, tunnel_mux=not args.no_tunnel_mux, splice=not args.no_splice,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nodemesh.agent", description=__doc__)
    p.add_argument("--node", required=True, help="node name, as the cluster knows it")
    p.add_argument("--node-ip", default="", help="the node's address (fallback upstream source)")
    p.add_argument("--pod-cidr", action="append", default=[], help="this node's pod CIDR (repeat or comma)")
    p.add_argument("--controller", default="", help="controller gRPC host:port")
    p.add_argument("--controller-ca", default="", metavar="PEM",
                   help="speak TLS to the controller and verify its certificate with this CA (re-read per connect)")
    p.add_argument("--token-file", default="")
    p.add_argument("--identity-file", default="", help="sandbox objects.json dir, when no controller")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: CPUs usable)")
    p.add_argument("--listen-host", default="0.0.0.0")
    p.add_argument("--outbound-port", type=int, default=4140)
    p.add_argument("--inbound-port", type=int, default=4143)
    p.add_argument("--admin-host", default="0.0.0.0")
    p.add_argument("--admin-port", type=int, default=4191)
    p.add_argument("--no-transparent", action="store_true",
                   help="upstream connections use the node address, not the calling pod's")
    p.add_argument("--detect-timeout", type=float, default=1.0)
    p.add_argument("--header-timeout", type=float, default=10.0)
    p.add_argument("--drain-grace", type=float, default=30.0)
    p.add_argument("--opaque-ports", default=None, help="comma-separated; default 25,587,3306,...")
    p.add_argument("--identity-wait", type=float, default=AgentConfig.identity_wait_s,
                   help="seconds a connection of an unknown local-pod address waits for its identity (0: off)")
    p.add_argument("--series-idle", type=float, default=AgentConfig.series_idle_s,
                   help="drop a metric series unchanged for this many seconds")
    p.add_argument("--report-history", type=float, default=AgentConfig.report_history_s,
                   help="seconds of per-interval counts kept for the controller (replayed after it restarts)")
    p.add_argument("--report-history-max-mb", type=float, default=AgentConfig.report_history_max_bytes / (1 << 20),
                   help="memory bound of that history (compressed), in MiB")
    p.add_argument("--max-authorities", type=int, default=AgentConfig.max_authorities,
                   help="distinct authority label values per workload; more are counted as [other]")
    p.add_argument("--max-routes", type=int, default=AgentConfig.max_routes,
                   help="distinct routes (rt_route) per destination workload; more are counted as [other]")
    p.add_argument("--no-splice", action="store_true",
                   help="relay opaque TCP through Python instead of splice(2) (agent/splice.py)")
    p.add_argument("--no-route-metrics", action="store_true",
                   help="no per-route series (route_request_total, ...): `nodemesh routes` shows nothing")
    p.add_argument("--cert-dir", default="", metavar="DIR",
                   help="obtain a workload certificate (SPIFFE ID) for every pod of this node from the "
                        "controller; keys and certificates are kept in DIR (root only, tmpfs)")
    p.add_argument("--mtls", action="store_true",
                   help="send cross-node pod connections agent to agent over mTLS with the pods' workload "
                        "certificates, and terminate the ones arriving (port 15008); needs --cert-dir")
    p.add_argument("--no-tunnel-mux", action="store_true",
                   help="with --mtls: one TLS session per cross-node connection instead of streams multiplexed "
                        "on one session per pod pair (agent/mux.py); multiplexed carriers are then refused too")
    p.add_argument("--log-level", default="info")
    p.add_argument("--health-file", default="",
                   help="write ready/not-ready here every second, for the pod's exec probes")
    p.add_argument("--event-log", default=None, help="debug: append every observation as JSON to FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.mtls and not args.cert_dir:
        parser().error("--mtls needs --cert-dir (the workload certificates it speaks with)")
    config = build_config(args)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s %(name)s %(message)s")
    # Fork the workers now: only the data path is imported and no loop or thread exists yet (see
    # supervisor.py). The parent's own heavy modules are imported by Supervisor.run, after this.
    forked = fork_workers(config, args.event_log, max(1, config.workers))
    return uvloop.run(Supervisor(config, args.event_log, forked).run())


if __name__ == "__main__":
    sys.exit(main())
