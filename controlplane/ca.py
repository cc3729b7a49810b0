"""The mesh's certificate authority for workload identities (issue 13, item 1).

The controller holds one root key and signs short-lived leaf certificates whose only name is a
pod's SPIFFE ID (URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), from CSRs the agents send:
the key pairs are made on the pod's node and never leave it. What a leaf may name is decided
here from the cluster source (`controlplane/certify.py`), never from the CSR's contents.

The root is persisted by a `RootStore`: a directory (the sandbox: the controller's state dir) or a
Kubernetes Secret (`SecretRootStore`), created on first start. Rotation keeps the old root's
certificate in the trust bundle (`bundle_pem`), so leaves it signed keep verifying until they
expire while new ones chain to the new root; agents receive the bundle with every certificate and
whenever it changes. Keys are EC P-256 (fast handshakes, small certificates), `cryptography`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nodemesh.api.certs import generate_ca
from nodemesh.api.spiffe import SpiffeId

log = logging.getLogger("nodemesh.controlplane.ca")

ROOT_DAYS = 3650
DEFAULT_LEAF_TTL_S = 24 * 3600.0
MIN_RSA_BITS = 2048


class CSRError(ValueError):
    """A CSR the CA will not sign (malformed, bad signature, weak key)."""


@dataclass(frozen=True)
class RootMaterial:
    cert_pem: bytes          # the current root: signs new leaves
    key_pem: bytes
    previous_pem: bytes = b""  # older roots, certificates only: still trusted until they expire


class RootStore(Protocol):
    def load(self) -> RootMaterial | None:
        """The stored root, None when there is none yet."""
        ...

    def save(self, material: RootMaterial) -> None:
        ...


class FileRootStore:
    """The root in a directory: `workload-ca.crt`, `workload-ca.key` (0600), `workload-ca-previous.pem`."""

    CERT, KEY, PREVIOUS = "workload-ca.crt", "workload-ca.key", "workload-ca-previous.pem"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def load(self) -> RootMaterial | None:
        try:
            cert = (self.directory / self.CERT).read_bytes()
            key = (self.directory / self.KEY).read_bytes()
        except FileNotFoundError:
            return None
        prev = self.directory / self.PREVIOUS
        return RootMaterial(cert, key, prev.read_bytes() if prev.exists() else b"")

    def save(self, material: RootMaterial) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name, data, mode in ((self.KEY, material.key_pem, 0o600), (self.CERT, material.cert_pem, 0o644),
                                 (self.PREVIOUS, material.previous_pem, 0o644)):
            path = self.directory / name
            tmp = path.with_name(f".{name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)


class RootTaken(RuntimeError):
    """Another controller filled the root store first (its root is the one to use)."""


class SecretRootStore:
    """The root in a Kubernetes Secret (`ca.crt`, `ca.key`, `previous.pem`). The install ships the
    Secret empty (`nodemesh install --mtls`), so the controller needs get/update on that one name
    and no `create` (RBAC cannot narrow it to a name); a Secret that does not exist is created
    (an install that did not ship it, with its own grant). Every write carries the version read:
    two controllers starting at once — the second's update gets 409, and `RootTaken` when the
    first filled the root meanwhile (it is then read, not overwritten)."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        from kubernetes import client

        self._client = client
        self._api = client.CoreV1Api(api_client)
        self.namespace, self.name = namespace, name

    def load(self) -> RootMaterial | None:
        import base64

        try:
            secret = self._api.read_namespaced_secret(self.name, self.namespace)
        except self._client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = secret.data or {}
        if "ca.crt" not in data or "ca.key" not in data:
            return None
        return RootMaterial(base64.b64decode(data["ca.crt"]), base64.b64decode(data["ca.key"]),
                            base64.b64decode(data.get("previous.pem", "")))

    def save(self, material: RootMaterial) -> None:
        import base64

        c = self._client
        data = {k: base64.b64encode(v).decode() for k, v in
                (("ca.crt", material.cert_pem), ("ca.key", material.key_pem), ("previous.pem", material.previous_pem))}
        try:
            current = self._api.read_namespaced_secret(self.name, self.namespace)
        except c.ApiException as exc:
            if exc.status != 404:
                raise
            body = c.V1Secret(metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace,
                                                      labels={"app.kubernetes.io/part-of": "nodemesh"}),
                              type="Opaque", data=data)
            try:
                self._api.create_namespaced_secret(self.namespace, body)
                return
            except c.ApiException as exc2:
                if exc2.status != 409:
                    raise
                raise RootTaken(f"secret {self.namespace}/{self.name} was created meanwhile") from None
        first = not (current.data or {}).get("ca.key")
        fill: dict[str, bytes | str] = dict(data)
        current.data = fill   # metadata (resourceVersion, kubectl's annotation, labels) kept as read
        try:
            self._api.replace_namespaced_secret(self.name, self.namespace, current)
        except c.ApiException as exc:
            if exc.status == 409 and first:
                raise RootTaken(f"secret {self.namespace}/{self.name} was filled meanwhile") from None
            raise


def new_root(now: datetime.datetime, days: int = ROOT_DAYS) -> RootMaterial:
    cert, key = generate_ca(f"nodemesh workload root {now.strftime('%Y%m%dT%H%M%SZ')}", days, now)
    return RootMaterial(cert, key)


def split_pem(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle) if bundle.strip() else []


@dataclass(frozen=True)
class Issued:
    certificate_pem: bytes
    not_after: datetime.datetime


class WorkloadCA:
    """Signs workload leaves with the store's root (made on first use), serves the trust bundle."""

    def __init__(self, store: RootStore, trust_domain: str, leaf_ttl_s: float = DEFAULT_LEAF_TTL_S,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        if leaf_ttl_s <= 0:
            raise ValueError("the workload certificate lifetime must be positive")
        self.store = store
        self.trust_domain = trust_domain
        self.leaf_ttl_s = leaf_ttl_s
        self.clock = clock
        self.issued = 0
        material = store.load()
        if material is None:
            material = new_root(clock())
            try:
                store.save(material)
                log.info("event=workload_root_created trust_domain=%s", trust_domain)
            except RootTaken as exc:
                taken = store.load()   # another controller made the root first: use theirs
                if taken is None:
                    raise RuntimeError(f"{exc}, but holds no root") from None
                material = taken
                log.info("event=workload_root_adopted trust_domain=%s", trust_domain)
        self._use(material)

    def _use(self, material: RootMaterial) -> None:
        self.material = material
        self.root = x509.load_pem_x509_certificate(material.cert_pem)
        key = serialization.load_pem_private_key(material.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(  # noqa: TRY004 - a bad store is a config error: main prints it as one line
                "the workload root key must be an EC key")
        self._key = key

    def bundle_pem(self) -> bytes:
        """The roots a peer's leaf may chain to: the current one, then older ones not yet expired."""
        now = self.clock()
        older = [c for c in split_pem(self.material.previous_pem) if c.not_valid_after_utc > now]
        return self.material.cert_pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in older)

    def rotate(self) -> None:
        """A new root signs from now on; the old root's certificate stays in the bundle until it
        expires (its leaves live at most leaf_ttl_s, so it could be dropped after that)."""
        now = self.clock()
        fresh = new_root(now)
        keep = [c for c in split_pem(self.material.previous_pem) if c.not_valid_after_utc > now]
        previous = self.material.cert_pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in keep)
        material = RootMaterial(fresh.cert_pem, fresh.key_pem, previous)
        self.store.save(material)
        self._use(material)
        log.info("event=workload_root_rotated trust_domain=%s roots=%d", self.trust_domain, 1 + len(keep) + 1)

    def sign(self, csr_der: bytes, identity: SpiffeId, ttl_s: float | None = None) -> Issued:
        """A leaf for `identity` carrying the CSR's public key. The CSR only proves possession of
        the key: its subject and extensions are ignored."""
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as exc:
            raise CSRError(f"malformed CSR: {exc}") from None
        if not csr.is_signature_valid:
            raise CSRError("the CSR's signature does not match its key")
        public = csr.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            if public.key_size < MIN_RSA_BITS:
                raise CSRError(f"RSA key too small ({public.key_size} bits)")
        elif not isinstance(public, ec.EllipticCurvePublicKey):
            raise CSRError(f"unsupported key type {type(public).__name__}")
        now = self.clock()
        not_after = min(now + datetime.timedelta(seconds=ttl_s or self.leaf_ttl_s), self.root.not_valid_after_utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh")]))
                .issuer_name(self.root.subject).public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(seconds=60)).not_valid_after(not_after)
                # The identity is the URI SAN alone (SPIFFE X.509-SVID): critical, as the subject is empty of it.
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                               critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                             crl_sign=False, content_commitment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        self.issued += 1
        return Issued(cert.public_bytes(serialization.Encoding.PEM), not_after)


def build_ca(trust_domain: str, leaf_ttl_s: float, ca_dir: str = "", ca_secret: str = "",
             kubeconfig: str = "") -> WorkloadCA | None:
    """The CA the flags ask for (`--ca-dir` or `--ca-secret NAMESPACE/NAME`); None: no workload certificates."""
    if ca_dir and ca_secret:
        raise ValueError("--ca-dir and --ca-secret are exclusive: pick one")
    if ca_dir:
        return WorkloadCA(FileRootStore(ca_dir), trust_domain, leaf_ttl_s)
    if ca_secret:
        namespace, _, name = ca_secret.partition("/")
        if not namespace or not name:
            raise ValueError(f"--ca-secret takes NAMESPACE/NAME, not {ca_secret!r}")
        from kubernetes import client
        from nodemesh.controlplane.sources.kubernetes import load_configuration

        return WorkloadCA(SecretRootStore(client.ApiClient(load_configuration(kubeconfig)), namespace, name),
                          trust_domain, leaf_ttl_s)
    return None
