"""The controller's configuration: one typed object, built once from flags, passed down."""

from __future__ import annotations

from dataclasses import dataclass

from nodemesh.api.model import CONTROLLER_GRPC_PORT, CONTROLLER_WEB_PORT

DEFAULT_OPAQUE_PORTS = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)


@dataclass(frozen=True)
class ControllerConfig:
    source: str = "sandbox"                     # "sandbox" | "kubernetes"
    state_dir: str = ""                         # sandbox: directory holding objects.json
    kubeconfig: str = ""                        # kubernetes: path; empty means in-cluster config
    listen: str = "127.0.0.1"
    grpc_port: int = CONTROLLER_GRPC_PORT
    web_port: int = CONTROLLER_WEB_PORT
    # Mesh config pushed to every agent with its identity; agents apply it live (their flags are
    # what holds until the first identity arrives). Ports never captured are the redirector's
    # --skip-ports: a proxy cannot un-capture a connection.
    opaque_ports: tuple[int, ...] = DEFAULT_OPAQUE_PORTS
    excluded_namespaces: tuple[str, ...] = ("kube-system", "nodemesh")
    captured_namespaces: tuple[str, ...] = ()   # when set, only these namespaces are captured
    tap_max_rps: float = 100.0
    # Tap redaction, done by the agents (agent/redact.py): Authorization, Proxy-Authorization, Cookie
    # and Set-Cookie always; these more; with tap_show_headers, every header not listed.
    tap_redact_headers: tuple[str, ...] = ()
    tap_show_headers: tuple[str, ...] = ()
    tap_redact_query: bool = False
    tap_max_taps: int = 10                      # concurrent taps; more are refused (RESOURCE_EXHAUSTED)
    # Identity pushes are coalesced: a rollout touches many objects in a burst.
    identity_debounce_s: float = 0.05
    # Send a big identity message zlib-compressed to agents whose hello offers it (identityfeed.py);
    # False: plain to every agent, as controllers before it.
    identity_compression: bool = True
    # Reports are ingested by one task, at most this many ms of it per event-loop turn, fed by a
    # bounded queue (a full queue holds the agents' streams back: gRPC flow control, their rings).
    # So a store that cannot keep up delays acks, not new agents' streams, identity or taps
    # (docs/scale.md, fourth stop). 0: each stream ingests its reports inline, as before.
    ingest_turn_ms: float = 20.0
    ingest_queue: int = 2000
    # Python's cyclic collector: long-lived objects are frozen (gc.freeze) so a full collection
    # does not walk the ~2 M objects 1,000 agents' series refs make (a ~1 s pause of everything);
    # they are thawed and collected when they have grown by half, or hourly (--no-gc-freeze: off).
    gc_freeze: bool = True
    # How long buckets are kept (--retention; the longest stat window is 1 h), after how long
    # per-second blocks are merged into minute blocks (--downsample-after; 0: never), and minute
    # blocks into 5-minute blocks (--coarsen-after; 0: never). The defaults keep windows up to
    # 2 min exact and an hour at N=1000 (300,000 keys) in ~0.3 GB (docs/scale.md).
    retention_s: int = 3600
    downsample_after_s: int = 120
    coarsen_after_s: int = 900
    # Routes per destination workload across all agents (each agent caps its own: --max-routes).
    max_routes: int = 100
    # An agent whose last report is older than this is reported as not connected by Check.
    agent_stale_s: float = 10.0
    sandbox_poll_s: float = 0.1
    log_level: str = "warning"
    # Authentication of the gRPC API (controlplane/auth.py, docs/controlplane.md "Authentication").
    token_file: str = ""                        # static bearer token (the sandbox's controller.token)
    token_review: bool = False                  # check projected ServiceAccount tokens with TokenReview
    token_audiences: tuple[str, ...] = ("nodemesh-controller",)
    auth_namespace: str = "nodemesh"            # where the default agent/CLI ServiceAccounts live
    token_review_agents: tuple[str, ...] = ()   # users/`group:G` allowed to Connect; () = the agent SA
    token_review_readers: tuple[str, ...] = ()  # allowed stat/edges/check/tap; () = the nodemesh-cli SA
    token_review_scrapers: tuple[str, ...] = ()  # may read agents' /metrics; () = the nodemesh-prometheus SA
    token_cache_s: float = 60.0
    insecure_open_api: bool = False             # allow no auth on a non-loopback address
    tls_cert: str = ""                          # PEM files: the gRPC port speaks TLS (tokens never in clear)
    tls_key: str = ""
    # Or the controller provisions its own TLS identity (controlplane/servingtls.py): its CA kept in
    # this Secret (NAMESPACE/NAME), the CA certificate published in this ConfigMap, a serving
    # certificate for tls_hosts (default: the Service's names in auth_namespace) renewed before
    # expiry; both ports (gRPC and web) then speak TLS.
    tls_ca_secret: str = ""
    tls_ca_configmap: str = ""
    tls_hosts: tuple[str, ...] = ()
    tls_cert_ttl_s: float = 7 * 24 * 3600.0
    # Workload certificates (controlplane/ca.py): the CA's root in a directory or a Secret; none: no CA.
    ca_dir: str = ""
    ca_secret: str = ""                         # NAMESPACE/NAME
    trust_domain: str = "cluster.local"
    workload_cert_ttl_s: float = 24 * 3600.0
    mtls_required_namespaces: tuple[str, ...] = ()  # fail closed: cross-node only over mTLS (agents' --mtls)
    # Base URL of a Grafana holding manifests/grafana/; the dashboard's workload page links to it.
    grafana_url: str = ""
    # Where stat/edges/routes are answered from (controlplane/promstore.py): "memory" (the agents'
    # reports, kept here) or "prometheus" (PromQL against prometheus_url); a request may ask for either.
    stat_backend: str = "memory"
    # False (--no-ingest): the controller keeps no metrics of its own — agents' reports are
    # acknowledged and dropped, every stat/edges/routes answer and the dashboard come from
    # Prometheus (stat_backend "prometheus"): a cluster past one controller's ingest (scale.md).
    ingest: bool = True
    prometheus_url: str = ""
    prometheus_timeout_s: float = 10.0
