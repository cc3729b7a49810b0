"""The controller's own TLS identity on Kubernetes: a CA it keeps in a Secret, a serving
certificate it renews, and the CA's certificate published in a ConfigMap (issue 13, item 4).

No cert-manager and no per-install secret to generate by hand: as istiod does with its root-cert
ConfigMap, the controller on start reads its serving CA from a Secret (`--tls-ca-secret`), makes
one if the Secret is empty (first start) and writes it back, then publishes the CA's certificate
alone (public) in a ConfigMap (`--tls-ca-configmap`) that agents mount and the CLI reads. The
serving certificate (names of the controller's Service, `--tls-hosts`) is signed by that CA at
every start and again before it expires, in memory only: the gRPC port takes it for new
handshakes through grpc's dynamic credentials and the web port through its `ssl.SSLContext`, so
open agent streams are never dropped for a renewal. Restarts reuse the CA, so what agents trust
does not change.

Both objects are created empty by the install manifest: the controller only reads and updates
them by name (RBAC `get`/`update` with `resourceNames`), and needs no `create`, which Kubernetes
cannot restrict to a name. Updates are read-modify-write with the read `resourceVersion`: two
controllers starting at once (a rollout) cannot overwrite each other's CA; the loser reads the
winner's.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from nodemesh.api.certs import generate_ca, issue_server_cert

log = logging.getLogger("nodemesh.controlplane.servingtls")

CA_CERT_KEY, CA_KEY_KEY = "ca.crt", "ca.key"
DEFAULT_CERT_TTL_S = 7 * 24 * 3600.0
CA_DAYS = 3650
RENEW_AT = 2 / 3           # of a certificate's life: renewed with a third of it left
MIN_RENEW_S = 1.0


class ServingTLSError(ValueError):
    """The serving identity cannot be provisioned (missing object, no permission): one line at start."""


def service_hosts(service: str, namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
    """The names a client in the cluster reaches a Service by: short, namespaced, .svc, FQDN."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
            f"{service}.{namespace}.svc.{cluster_domain}")


def parse_ref(flag: str, text: str) -> tuple[str, str]:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise ServingTLSError(f"{flag} takes NAMESPACE/NAME, not {text!r}")
    return namespace, name


class NamedObject:
    """One Secret or ConfigMap by name, read and updated with the real kubernetes client; never
    created when the install made it (see the module docstring), created only if it is missing."""

    def __init__(self, api_client: Any, kind: str, namespace: str, name: str) -> None:
        from kubernetes import client

        if kind not in ("Secret", "ConfigMap"):
            raise ValueError(kind)
        self._client = client
        self._api = client.CoreV1Api(api_client)
        self.kind, self.namespace, self.name = kind, namespace, name

    def _where(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def _call(self, verb: str, *args: Any) -> Any:
        method = getattr(self._api, f"{verb}_namespaced_{'secret' if self.kind == 'Secret' else 'config_map'}")
        return method(*args)

    def read(self) -> Any | None:
        """The object, None when it does not exist."""
        try:
            return self._call("read", self.name, self.namespace)
        except self._client.ApiException as exc:
            if exc.status == 404:
                return None
            raise ServingTLSError(f"cannot read {self._where()}: {exc.status} {exc.reason}") from None

    def data(self, obj: Any) -> dict[str, bytes]:
        raw = (obj.data or {}) if obj is not None else {}
        if self.kind == "Secret":
            return {k: base64.b64decode(v) for k, v in raw.items()}
        return {k: v.encode() for k, v in raw.items()}

    def write(self, current: Any | None, data: dict[str, bytes]) -> bool:
        """Set these keys on `current` (as read); False when someone else changed it since (409)."""
        c = self._client
        encoded = ({k: base64.b64encode(v).decode() for k, v in data.items()} if self.kind == "Secret"
                   else {k: v.decode() for k, v in data.items()})
        try:
            if current is None:
                meta = c.V1ObjectMeta(name=self.name, namespace=self.namespace,
                                      labels={"app.kubernetes.io/part-of": "nodemesh"})
                body = (c.V1Secret(metadata=meta, type="Opaque", data=encoded) if self.kind == "Secret"
                        else c.V1ConfigMap(metadata=meta, data=encoded))
                self._call("create", self.namespace, body)
            else:
                current.data = {**(current.data or {}), **encoded}
                self._call("replace", self.name, self.namespace, current)
        except c.ApiException as exc:
            if exc.status == 409:
                return False
            verb = "create" if current is None else "update"
            hint = (" (the install manifest creates it: kubectl apply it again)" if current is None and exc.status == 403
                    else "")
            raise ServingTLSError(f"cannot {verb} {self._where()}: {exc.status} {exc.reason}{hint}") from None
        return True


@dataclass(frozen=True)
class ServingCA:
    cert_pem: bytes
    key_pem: bytes


def provision_ca(secret: NamedObject, publish: NamedObject | None, now: datetime.datetime | None = None) -> ServingCA:
    """The CA from the Secret, made and stored on first start; its certificate published in the
    ConfigMap (only written when it differs). A lost update race is retried from a fresh read."""
    for _ in range(5):
        current = secret.read()
        data = secret.data(current)
        if CA_CERT_KEY in data and CA_KEY_KEY in data:
            ca = ServingCA(data[CA_CERT_KEY], data[CA_KEY_KEY])
            break
        cert, key = generate_ca("nodemesh controller CA", CA_DAYS, now)
        if secret.write(current, {CA_CERT_KEY: cert, CA_KEY_KEY: key}):
            log.info("event=controller_ca_created secret=%s/%s", secret.namespace, secret.name)
            ca = ServingCA(cert, key)
            break
    else:
        raise ServingTLSError(f"{secret.kind} {secret.namespace}/{secret.name} keeps changing under us")
    if publish is not None:
        for _ in range(5):
            current = publish.read()
            if publish.data(current).get(CA_CERT_KEY) == ca.cert_pem or publish.write(current, {CA_CERT_KEY: ca.cert_pem}):
                break
        else:
            raise ServingTLSError(f"{publish.kind} {publish.namespace}/{publish.name} keeps changing under us")
        log.info("event=controller_ca_published configmap=%s/%s", publish.namespace, publish.name)
    return ca


class ServingIdentity:
    """The serving certificate, signed by the CA for `hosts`, renewed at 2/3 of its life. Hands
    the current one to grpc (dynamic credentials: asked at every handshake) and to one
    `ssl.SSLContext` (reloaded in place: new connections get the new certificate)."""

    def __init__(self, ca: ServingCA, hosts: tuple[str, ...], ttl_s: float = DEFAULT_CERT_TTL_S,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        if not hosts:
            raise ServingTLSError("the controller's serving certificate needs at least one host name")
        if ttl_s <= 0:
            raise ServingTLSError("the serving certificate lifetime must be positive")
        self.ca, self.hosts, self.ttl_s, self.clock = ca, hosts, ttl_s, clock
        self.renewals = 0
        self._config: grpc.ServerCertificateConfiguration | None = None
        self._handed: grpc.ServerCertificateConfiguration | None = None
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._issue()

    def _issue(self) -> None:
        self.issued_at = self.clock()
        cert_pem, key_pem = issue_server_cert(self.ca.cert_pem, self.ca.key_pem, list(self.hosts),
                                              lifetime_s=self.ttl_s, now=self.issued_at)
        self.cert_pem = cert_pem
        self.not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
        self._config = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)])
        # load_cert_chain only reads files: a memfd keeps the key off every disk.
        fd = os.memfd_create("nodemesh-serving", os.MFD_CLOEXEC)
        try:
            os.write(fd, cert_pem + key_pem)
            self.ssl_context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def renew_due_in(self) -> float:
        due = self.issued_at + datetime.timedelta(seconds=self.ttl_s * RENEW_AT)
        return max(0.0, (due - self.clock()).total_seconds())

    def renew(self) -> None:
        self._issue()
        self.renewals += 1
        log.info("event=controller_cert_renewed not_after=%s", self.not_after.isoformat())

    def grpc_credentials(self) -> grpc.ServerCredentials:
        assert self._config is not None
        self._handed = self._config
        # (grpc-stubs type the fetcher without the None that grpc documents as "no change")
        return grpc.dynamic_ssl_server_credentials(self._config, self._fetch)  # type: ignore[arg-type]

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc's core before each handshake: None keeps the current certificate.
        if self._config is self._handed:
            return None
        self._handed = self._config
        return self._config

    async def run_renewals(self) -> None:
        """Renew before expiry, for the controller's life (a task; cancelled at stop)."""
        while True:
            await asyncio.sleep(max(MIN_RENEW_S, self.renew_due_in()))
            try:
                self.renew()
            except Exception:  # a failed renewal keeps the current certificate; try again soon
                log.exception("event=controller_cert_renewal_failed")
                await asyncio.sleep(MIN_RENEW_S * 30)


def build_serving_identity(ca_secret: str, ca_configmap: str, hosts: tuple[str, ...], ttl_s: float,
                           kubeconfig: str = "") -> ServingIdentity:
    """The controller's serving identity from its flags (`--tls-ca-secret`, `--tls-ca-configmap`)."""
    from kubernetes import client
    from nodemesh.controlplane.sources.kubernetes import load_configuration

    api = client.ApiClient(load_configuration(kubeconfig))
    secret = NamedObject(api, "Secret", *parse_ref("--tls-ca-secret", ca_secret))
    publish = NamedObject(api, "ConfigMap", *parse_ref("--tls-ca-configmap", ca_configmap)) if ca_configmap else None
    return ServingIdentity(provision_ca(secret, publish), hosts, ttl_s)
