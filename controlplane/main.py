"""Run a controller: cluster source, gRPC API and web app, started and stopped as one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
from dataclasses import dataclass

import grpc
from aiohttp import web
from nodemesh.controlplane.auth import AccessPolicy, Authenticator, build_authenticator
from nodemesh.controlplane.ca import build_ca
from nodemesh.controlplane.config import ControllerConfig
from nodemesh.controlplane.controller import Controller
from nodemesh.controlplane.server import server_credentials, start_grpc_server
from nodemesh.controlplane.servingtls import ServingIdentity, build_serving_identity, service_hosts
from nodemesh.controlplane.sources import ClusterSource
from nodemesh.controlplane.web import build_app

log = logging.getLogger("nodemesh.controlplane")

CONTROLLER_SERVICE = "nodemesh-controller"  # the install's Service: the serving certificate's default names


def build_source(config: ControllerConfig) -> ClusterSource:
    if config.source == "sandbox":
        from nodemesh.controlplane.sources.sandbox import SandboxSource

        if not config.state_dir:
            raise ValueError("--source sandbox needs --state-dir")
        return SandboxSource(config.state_dir, poll_s=config.sandbox_poll_s)
    if config.source == "kubernetes":
        from nodemesh.controlplane.sources.kubernetes import KubernetesSource, load_configuration

        return KubernetesSource(load_configuration(config.kubeconfig))
    raise ValueError(f"unknown source {config.source!r}: expected sandbox or kubernetes")


@dataclass
class RunningController:
    controller: Controller
    grpc_server: grpc.aio.Server
    grpc_port: int
    web_runner: web.AppRunner
    web_port: int
    serving: ServingIdentity | None = None       # --tls-ca-secret: the renewed serving certificate
    renewals: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self.renewals is not None:
            self.renewals.cancel()
        await self.grpc_server.stop(grace=1.0)
        await self.web_runner.cleanup()
        await self.controller.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configure_auth(config: ControllerConfig) -> Authenticator | None:
    """The API's authenticator from the flags; refuses an open API on a reachable address."""
    if config.token_review and config.source != "kubernetes":
        raise ValueError("--token-review needs --source kubernetes (the sandbox uses --token-file)")
    policy = AccessPolicy.for_namespace(config.auth_namespace, config.token_review_agents,
                                        config.token_review_readers, config.token_review_scrapers)
    authenticator = build_authenticator(config.token_file, config.token_review, config.token_audiences,
                                        policy, config.kubeconfig, config.token_cache_s)
    if authenticator is not None:
        log.info("event=auth_enabled mode=%s", "token_review" if config.token_review else "token_file")
        return authenticator
    if not _is_loopback(config.listen) and not config.insecure_open_api:
        raise ValueError(f"refusing to serve the gRPC API without authentication on {config.listen}: "
                         "pass --token-file or --token-review (or --insecure-open-api on a trusted network)")
    log.warning("event=auth_disabled listen=%s warning='the gRPC API is OPEN: anyone who can reach "
                "port %d can read stats, open taps and report metrics; dev mode only (use --token-file "
                "or --token-review)'", config.listen, config.grpc_port)
    return None


async def start(config: ControllerConfig, source: ClusterSource | None = None,
                authenticator: Authenticator | None = None) -> RunningController:
    """Start everything; ports 0 in `config` pick free ports (see RunningController).
    `authenticator` (tests) replaces the one the config asks for."""
    if authenticator is None:
        authenticator = configure_auth(config)
    controller = Controller(config, source if source is not None else build_source(config))
    controller.ca = build_ca(config.trust_domain, config.workload_cert_ttl_s, config.ca_dir, config.ca_secret,
                             config.kubeconfig)
    serving = serving_identity(config)
    await controller.start()
    credentials = serving.grpc_credentials() if serving else server_credentials(config.tls_cert, config.tls_key)
    if credentials is None and authenticator is not None and not _is_loopback(config.listen):
        log.warning("event=grpc_plaintext listen=%s warning='bearer tokens cross the network in clear: "
                    "pass --tls-cert/--tls-key'", config.listen)
    grpc_server, grpc_port = await start_grpc_server(controller, config.listen, config.grpc_port, authenticator,
                                                     credentials)
    runner = web.AppRunner(build_app(controller, authenticator), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.listen, config.web_port,
                       ssl_context=serving.ssl_context if serving is not None else None)
    await site.start()
    web_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("event=controller_started grpc_port=%d web_port=%d source=%s tls=%s", grpc_port, web_port,
             config.source, "self-provisioned" if serving else ("grpc" if credentials else "off"))
    renewals = asyncio.create_task(serving.run_renewals()) if serving is not None else None
    return RunningController(controller, grpc_server, grpc_port, runner, web_port, serving, renewals)


def serving_identity(config: ControllerConfig) -> ServingIdentity | None:
    """--tls-ca-secret: the controller's own CA (Secret) and serving certificate, the CA published
    in --tls-ca-configmap (controlplane/servingtls.py); None otherwise."""
    if not config.tls_ca_secret:
        if config.tls_ca_configmap or config.tls_hosts:
            raise ValueError("--tls-ca-configmap and --tls-hosts go with --tls-ca-secret")
        return None
    if config.tls_cert or config.tls_key:
        raise ValueError("--tls-ca-secret and --tls-cert/--tls-key are exclusive: pick one")
    if config.source != "kubernetes":
        raise ValueError("--tls-ca-secret needs --source kubernetes (the sandbox uses --tls-cert/--tls-key)")
    hosts = config.tls_hosts or service_hosts(CONTROLLER_SERVICE, config.auth_namespace)
    return build_serving_identity(config.tls_ca_secret, config.tls_ca_configmap, hosts, config.tls_cert_ttl_s,
                                  config.kubeconfig)


def parse_args(argv: list[str] | None = None) -> ControllerConfig:
    p = argparse.ArgumentParser(prog="python -m nodemesh.controlplane",
                                description="nodemesh controller: cluster source, agent streams, stat/tap API")
    p.add_argument("--source", choices=("sandbox", "kubernetes"), default="sandbox")
    p.add_argument("--state-dir", default="", help="sandbox: directory of objects.json")
    p.add_argument("--kubeconfig", default="", help="kubernetes: kubeconfig path (default: in-cluster)")
    p.add_argument("--in-cluster", action="store_true", help="kubernetes: use the pod's service account")
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=ControllerConfig.grpc_port)
    p.add_argument("--web-port", type=int, default=ControllerConfig.web_port)
    p.add_argument("--excluded-namespaces", default=",".join(ControllerConfig.excluded_namespaces))
    p.add_argument("--opaque-ports", default=",".join(map(str, ControllerConfig.opaque_ports)))
    p.add_argument("--captured-namespaces", default="",
                   help="only these namespaces are captured (comma-separated; default: all not excluded)")
    p.add_argument("--tap-max-rps", type=float, default=ControllerConfig.tap_max_rps)
    p.add_argument("--tap-redact-headers", default="", metavar="H1,H2",
                   help="more headers whose values tap redacts (Authorization, Proxy-Authorization, Cookie and "
                        "Set-Cookie always are)")
    p.add_argument("--tap-show-headers", default="", metavar="H1,H2",
                   help="allow list: tap shows only these headers' values, redacts the rest")
    p.add_argument("--tap-redact-query", action="store_true", help="tap redacts query-string values")
    p.add_argument("--tap-max-taps", type=int, default=ControllerConfig.tap_max_taps,
                   help="concurrent taps; more are refused")
    p.add_argument("--max-routes", type=int, default=ControllerConfig.max_routes,
                   help="routes per destination workload across all agents; more are counted as [other]")
    p.add_argument("--retention", type=int, default=ControllerConfig.retention_s, metavar="SECONDS",
                   help="how long the in-memory store keeps traffic (60..3600): the longest stat window it answers")
    p.add_argument("--downsample-after", type=int, default=ControllerConfig.downsample_after_s, metavar="SECONDS",
                   help="per-second blocks older than this are merged into minute blocks (0: never); windows "
                        "longer than this have their far edge rounded to the minute")
    p.add_argument("--coarsen-after", type=int, default=ControllerConfig.coarsen_after_s, metavar="SECONDS",
                   help="minute blocks older than this are merged into 5-minute blocks (0: never); windows "
                        "longer than this have their far edge rounded to 5 minutes")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--grafana-url", default="", metavar="URL",
                   help="Grafana base URL (with manifests/grafana/ loaded): the dashboard links workloads to it")
    p.add_argument("--stat-backend", choices=("memory", "prometheus"), default=ControllerConfig.stat_backend,
                   help="where stat/edges/routes are answered from when a request does not say")
    p.add_argument("--no-ingest", dest="ingest", action="store_false",
                   help="keep no metrics here: acknowledge the agents' reports and drop them; every answer comes "
                        "from Prometheus (needs --stat-backend prometheus)")
    p.add_argument("--ingest-turn-ms", type=float, default=ControllerConfig.ingest_turn_ms, metavar="MS",
                   help="reports are ingested at most this long per event-loop turn, so new agents, identity and "
                        "taps never wait behind a backlog of them (0: each stream ingests inline)")
    p.add_argument("--no-gc-freeze", action="store_true",
                   help="let Python's cyclic collector walk every object in full collections (by default the "
                        "long-lived ones are frozen, and thawed and collected when they grew by half or hourly)")
    p.add_argument("--prometheus-url", default="", metavar="URL",
                   help="Prometheus scraping the agents (e.g. http://prometheus.nodemesh.svc:9090): "
                        "enables --backend prometheus")
    p.add_argument("--prometheus-timeout", type=float, default=ControllerConfig.prometheus_timeout_s,
                   metavar="SECONDS", help="longest wait for Prometheus' answers to one request")
    auth = p.add_argument_group("authentication of the gRPC API (docs/controlplane.md)")
    auth.add_argument("--token-file", default="", metavar="PATH",
                      help="accept the bearer token in this file (re-read when it changes); the sandbox's mode")
    auth.add_argument("--token-review", action="store_true",
                      help="accept projected ServiceAccount tokens checked with the TokenReview API "
                           "(--source kubernetes)")
    auth.add_argument("--token-audience", default=",".join(ControllerConfig.token_audiences),
                      help="audiences a reviewed token must carry (comma-separated)")
    auth.add_argument("--token-review-agents", default="",
                      help="users or group:NAME allowed to Connect as agents "
                           "(default system:serviceaccount:$POD_NAMESPACE:nodemesh-agent)")
    auth.add_argument("--token-review-readers", default="",
                      help="users or group:NAME allowed stat/edges/check/tap "
                           "(default system:serviceaccount:$POD_NAMESPACE:nodemesh-cli)")
    auth.add_argument("--token-review-scrapers", default="",
                      help="users or group:NAME allowed to read the agents' /metrics "
                           "(default system:serviceaccount:$POD_NAMESPACE:nodemesh-prometheus)")
    auth.add_argument("--tls-cert", default="", metavar="PEM",
                      help="serve the gRPC API over TLS with this certificate (agents and the CLI verify it)")
    auth.add_argument("--tls-key", default="", metavar="PEM", help="the key of --tls-cert")
    auth.add_argument("--tls-ca-secret", default="", metavar="NAMESPACE/NAME",
                      help="provision our own TLS (gRPC and web ports): the CA kept in this Secret (made on first "
                           "start), a serving certificate renewed before expiry (--source kubernetes)")
    auth.add_argument("--tls-ca-configmap", default="", metavar="NAMESPACE/NAME",
                      help="with --tls-ca-secret: publish the CA certificate (ca.crt) here for agents and the CLI")
    auth.add_argument("--tls-hosts", default="", metavar="NAME,...",
                      help="with --tls-ca-secret: names in the serving certificate (default: the Service "
                           f"{CONTROLLER_SERVICE}'s names in $POD_NAMESPACE)")
    auth.add_argument("--tls-cert-ttl", type=float, default=ControllerConfig.tls_cert_ttl_s, metavar="S",
                      help="with --tls-ca-secret: serving certificate lifetime in seconds (renewed at 2/3)")
    ca = p.add_argument_group("workload certificates (docs/controlplane.md)")
    ca.add_argument("--ca-dir", default="", metavar="DIR",
                    help="be the mesh's CA, its root kept in DIR (made on first start)")
    ca.add_argument("--ca-secret", default="", metavar="NAMESPACE/NAME",
                    help="be the mesh's CA, its root kept in this Kubernetes Secret (made on first start)")
    ca.add_argument("--trust-domain", default=ControllerConfig.trust_domain,
                    help="the SPIFFE trust domain of workload identities")
    ca.add_argument("--workload-cert-ttl", type=float, default=ControllerConfig.workload_cert_ttl_s, metavar="S",
                    help="lifetime of a workload certificate in seconds (agents renew at half of it)")
    ca.add_argument("--mtls-required-namespaces", default="", metavar="NS,...",
                    help="pods of these namespaces take cross-node connections only over mTLS (agents with "
                         "--mtls): no plaintext fallback, plaintext from another node reset")
    auth.add_argument("--insecure-open-api", action="store_true",
                      help="serve without authentication on a non-loopback address (trusted networks only)")
    a = p.parse_args(argv)
    if a.source == "sandbox" and not a.state_dir:
        p.error("--source sandbox needs --state-dir")
    if a.token_file and a.token_review:
        p.error("--token-file and --token-review are exclusive: pick one")
    if a.stat_backend == "prometheus" and not a.prometheus_url:
        p.error("--stat-backend prometheus needs --prometheus-url")
    if not a.ingest and a.stat_backend != "prometheus":
        p.error("--no-ingest needs --stat-backend prometheus (the controller then keeps no metrics to answer from)")
    if not 60 <= a.retention <= 3600:
        p.error("--retention must be between 60 and 3600 seconds")
    if a.downsample_after and not 60 <= a.downsample_after <= a.retention:
        p.error("--downsample-after must be 0 (never) or between 60 seconds and --retention")
    # Not tied to the others: past --retention it is never reached, without minutes (or before
    # them) 5 minutes are merged from minutes only — so --retention or --downsample-after alone
    # never turn the default into an error.
    if a.coarsen_after and a.coarsen_after < 60:
        p.error("--coarsen-after must be 0 (never) or at least 60 seconds")
    if a.token_review and a.source != "kubernetes":
        p.error("--token-review needs --source kubernetes (the sandbox uses --token-file)")
    if a.tls_ca_secret and (a.tls_cert or a.tls_key):
        p.error("--tls-ca-secret and --tls-cert/--tls-key are exclusive: pick one")
    if a.tls_ca_secret and a.source != "kubernetes":
        p.error("--tls-ca-secret needs --source kubernetes (the sandbox uses --tls-cert/--tls-key)")
    if (a.tls_ca_configmap or a.tls_hosts) and not a.tls_ca_secret:
        p.error("--tls-ca-configmap and --tls-hosts go with --tls-ca-secret")
    if a.tls_cert_ttl <= 0:
        p.error("--tls-cert-ttl must be positive")
    return ControllerConfig(
        source=a.source, state_dir=a.state_dir, kubeconfig="" if a.in_cluster else a.kubeconfig,
        listen=a.listen, grpc_port=a.grpc_port, web_port=a.web_port,
        excluded_namespaces=tuple(n for n in a.excluded_namespaces.split(",") if n),
        captured_namespaces=tuple(n for n in a.captured_namespaces.split(",") if n),
        tap_max_taps=a.tap_max_taps, tap_redact_headers=_csv(a.tap_redact_headers),
        tap_show_headers=_csv(a.tap_show_headers), tap_redact_query=a.tap_redact_query,
        opaque_ports=tuple(int(x) for x in a.opaque_ports.split(",") if x),
        tap_max_rps=a.tap_max_rps, log_level=a.log_level, max_routes=a.max_routes,
        retention_s=a.retention, downsample_after_s=a.downsample_after, coarsen_after_s=a.coarsen_after,
        token_file=a.token_file, token_review=a.token_review,
        token_audiences=_csv(a.token_audience),
        # Read here, once: the Deployment sets POD_NAMESPACE from the downward API.
        auth_namespace=os.environ.get("POD_NAMESPACE") or ControllerConfig.auth_namespace,
        token_review_agents=_csv(a.token_review_agents), token_review_readers=_csv(a.token_review_readers),
        token_review_scrapers=_csv(a.token_review_scrapers),
        insecure_open_api=a.insecure_open_api, grafana_url=a.grafana_url,
        stat_backend=a.stat_backend, ingest=a.ingest, prometheus_url=a.prometheus_url,
        ingest_turn_ms=a.ingest_turn_ms, gc_freeze=not a.no_gc_freeze,
        prometheus_timeout_s=a.prometheus_timeout,
        tls_cert=a.tls_cert, tls_key=a.tls_key, tls_ca_secret=a.tls_ca_secret, tls_ca_configmap=a.tls_ca_configmap,
        tls_hosts=_csv(a.tls_hosts), tls_cert_ttl_s=a.tls_cert_ttl,
        ca_dir=a.ca_dir, ca_secret=a.ca_secret, trust_domain=a.trust_domain,
        workload_cert_ttl_s=a.workload_cert_ttl, mtls_required_namespaces=_csv(a.mtls_required_namespaces),
    )


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


async def run(config: ControllerConfig) -> None:
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if running.controller.ca is not None:  # SIGHUP: rotate the workload root (docs/controlplane.md)
        loop.add_signal_handler(signal.SIGHUP, running.controller.rotate_workload_root)
    await stop.wait()
    await running.stop()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        asyncio.run(run(config))
    except Exception as exc:
        # Startup errors a user can fix (bad kubeconfig, port taken) are one line, not a traceback.
        if not isinstance(exc, (ValueError, OSError)) and type(exc).__name__ != "ConfigException":
            raise
        raise SystemExit(f"nodemesh controller: {exc}") from None
