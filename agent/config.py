"""The agent's configuration: one typed object, built once from flags/env, passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from nodemesh.api.model import ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT

DEFAULT_OPAQUE_PORTS = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)


@dataclass(frozen=True)
class AgentConfig:
    node: str                                   # node name, as the cluster knows it
    node_ip: str = ""                           # the node's own address (capture target, fallback source)
    pod_cidrs: tuple[str, ...] = ()             # this node's pod CIDR(s)
    listen_host: str = "0.0.0.0"
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    admin_host: str = "0.0.0.0"
    admin_port: int = ADMIN_PORT
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    transparent: bool = True                    # upstream keeps the calling pod's IP (IP_TRANSPARENT)
    detect_timeout_s: float = 1.0
    header_timeout_s: float = 10.0              # HTTP/1 request head must be complete by then (slowloris)
    connect_timeout_s: float = 5.0
    opaque_ports: tuple[int, ...] = DEFAULT_OPAQUE_PORTS
    drain_grace_s: float = 30.0
    controller: str = ""                        # host:port of the controller gRPC API; empty: none
    token_file: str = ""                        # bearer token presented to the controller
    controller_ca: str = ""                     # PEM CA the controller's TLS certificate must chain to
    identity_file: str = ""                     # sandbox objects.json dir, used when no controller
    report_interval_s: float = 1.0
    # A connection from/to an unknown address in this node's pod CIDR waits this long (at most)
    # for the address's identity before it is relayed and counted; 0 turns the wait off.
    identity_wait_s: float = 1.0
    series_idle_s: float = 600.0                # a series unchanged this long is dropped (retain-idle)
    # Per-interval increments kept for the controller (agent/history.py): a restarted controller
    # is given this much history back; past either bound the oldest intervals go.
    report_history_s: float = 900.0
    report_history_max_bytes: int = 64 << 20
    max_authorities: int = 100                  # distinct authority values per workload; more: [other]
    route_metrics: bool = True                  # per-route series (agent/routes.py), `nodemesh routes`
    max_routes: int = 100                       # distinct routes per destination workload; more: [other]
    watch_capture: bool = True                  # poll the node's netfilter for our capture hook (check)
    tap_max_rps: float = 100.0
    # Workload certificates (agent/certs.py): kept in this root-only directory on the node; "" = none.
    cert_dir: str = ""
    # Node-to-node mTLS (agent/tunnel.py): cross-node pod connections over TLS with the pods'
    # workload certificates; needs cert_dir. Off by default (first version, docs/architecture.md).
    mtls: bool = False
    # With mtls: cross-node connections are streams multiplexed on one TLS session per (source
    # pod, destination pod) (agent/mux.py); off: a TLS session per connection (and none accepted).
    tunnel_mux: bool = True
    # Opaque TCP relayed by splice(2) socket → pipe → socket (agent/splice.py) instead of copies
    # through Python; off: every byte goes through the transports as before.
    splice: bool = True
    splice_after_bytes: int = 1 << 20           # only connections that moved this much (bulk) are spliced
    health_file: str = ""                       # `ready`/`not-ready`, rewritten every second (pod-local probes)
    log_level: str = "info"
