"""Workload certificates on the node: made, renewed and read here (issue 13, item 1).

The agent's parent keeps one certificate per pod of its node (`WorkloadCerts`): it makes the EC
P-256 key pair itself, sends the controller only a CSR naming the pod's uid (over the Connect
stream the agent's token opened), and writes key, certificate and trust bundle to a root-only
directory on the node (`--cert-dir`, a tmpfs in the DaemonSet). So the private keys never leave
the node, and the worker processes — which terminate and originate the mesh's mTLS — read them
from there (`CertReader`), picking up a renewed file for the next connection while the
connections already open keep the session they negotiated: a renewal touches no connection.

Renewal starts at half the lifetime (`renew_fraction`), with retries every `retry_s`, so a
controller outage shorter than half a lifetime costs nothing. Pods leaving the node lose their
files. The controller decides what identity a certificate names; the agent only asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nodemesh.api.gen import nodemesh_pb2 as pb

log = logging.getLogger("nodemesh.agent.certs")

BUNDLE = "trust-bundle.pem"
Requester = Callable[[str, bytes], Awaitable[pb.CertificateIssued]]


def _safe(uid: str) -> str:
    """A uid as a file name (uids are UUIDs; hand-written objects use namespace/name)."""
    return uid.replace("/", "_")


def make_key_and_csr() -> tuple[bytes, bytes]:
    """(private key PEM, CSR DER) for a new EC P-256 key. The CSR's subject is ignored by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            csr.public_bytes(serialization.Encoding.DER))


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class Held:
    spiffe_id: str
    not_before: float     # epoch seconds (when we got it)
    not_after: float
    renew_at: float


class WorkloadCerts:
    """Parent side: a current certificate for every local pod in `local_pods()` (uid list)."""

    def __init__(self, directory: str | os.PathLike[str], local_pods: Callable[[], list[str]], request: Requester,
                 *, renew_fraction: float = 0.5, poll_s: float = 1.0, retry_s: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.local_pods = local_pods
        self.request = request
        self.renew_fraction = renew_fraction
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.clock = clock
        self.held: dict[str, Held] = {}
        self._retry_at: dict[str, float] = {}
        self.issued = 0
        self.refused = 0
        self.renewed = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="workload-certs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Identity changed: look again now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop renewals for the agent's life
                log.exception("event=workload_certs_failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)

    async def sync_once(self) -> None:
        now = self.clock()
        wanted = set(self.local_pods())
        for uid in list(self.held.keys() - wanted):
            self._forget(uid)
        due = [uid for uid in wanted if (uid not in self.held or self.held[uid].renew_at <= now)
               and self._retry_at.get(uid, 0.0) <= now]
        if due:
            await asyncio.gather(*(self._obtain(uid) for uid in due))

    async def _obtain(self, uid: str) -> None:
        key_pem, csr_der = make_key_and_csr()
        try:
            answer = await self.request(uid, csr_der)
        except (ConnectionError, TimeoutError) as exc:
            self._retry_at[uid] = self.clock() + self.retry_s
            log.info("event=csr_deferred pod_uid=%s error=%r", uid, str(exc))
            return
        if answer.error or not answer.certificate_pem:
            self.refused += 1
            self._retry_at[uid] = self.clock() + max(self.retry_s, 10 * self.poll_s)
            log.warning("event=csr_refused pod_uid=%s reason=%r", uid, answer.error)
            return
        now = self.clock()
        not_after = answer.not_after_ms / 1000
        renewing = uid in self.held
        base = self.directory / _safe(uid)
        # Key first, then the certificate: a reader pairing a new certificate with the old key
        # fails one handshake at worst, never the other way round (the reader checks the pair).
        _write(base.with_suffix(".key"), key_pem, 0o600)
        _write(base.with_suffix(".crt"), answer.certificate_pem, 0o644)
        if answer.trust_bundle.roots_pem:
            self.set_bundle(answer.trust_bundle.roots_pem)
        self.held[uid] = Held(answer.spiffe_id, now, not_after, now + (not_after - now) * self.renew_fraction)
        self._retry_at.pop(uid, None)
        self.issued += 1
        self.renewed += renewing
        log.info("event=certificate_%s pod_uid=%s id=%s not_after=%s", "renewed" if renewing else "issued", uid,
                 answer.spiffe_id, datetime.datetime.fromtimestamp(not_after, datetime.UTC).isoformat())

    def set_bundle(self, roots_pem: bytes) -> None:
        path = self.directory / BUNDLE
        with contextlib.suppress(OSError):
            if path.read_bytes() == roots_pem:
                return
        _write(path, roots_pem, 0o644)

    def _forget(self, uid: str) -> None:
        self.held.pop(uid, None)
        self._retry_at.pop(uid, None)
        base = self.directory / _safe(uid)
        for suffix in (".crt", ".key"):
            with contextlib.suppress(FileNotFoundError):
                base.with_suffix(suffix).unlink()


class CertReader:
    """Worker side: TLS contexts for a local pod's certificate, rebuilt when its files change.

    Client and server contexts both require the peer's certificate and verify it against the
    trust bundle; the identity is the peer certificate's SPIFFE URI SAN (`peer_identity`), never
    a host name, so host-name checking is off.
    """

    def __init__(self, directory: str | os.PathLike[str], alpn: tuple[str, ...] = ()) -> None:
        self.directory = Path(directory)
        # ALPN protocols every context offers (client) or accepts (server): agent/mux.py's
        # MUX_ALPN when the agent multiplexes its tunnels.
        self.alpn = alpn
        self._cache: dict[tuple[str, bool], tuple[tuple[int, ...], ssl.SSLContext]] = {}

    def _stamp(self, *paths: Path) -> tuple[int, ...] | None:
        try:
            return tuple(x for p in paths for st in (p.stat(),) for x in (st.st_ino, st.st_mtime_ns))
        except FileNotFoundError:
            return None

    def context(self, uid: str, server: bool) -> ssl.SSLContext | None:
        """The context speaking as pod `uid`; None when this node holds no certificate for it (yet)."""
        base = self.directory / _safe(uid)
        crt, key, bundle = base.with_suffix(".crt"), base.with_suffix(".key"), self.directory / BUNDLE
        stamp = self._stamp(crt, key, bundle)
        if stamp is None:
            return None
        hit = self._cache.get((uid, server))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.alpn:
            ctx.set_alpn_protocols(list(self.alpn))
        try:
            ctx.load_cert_chain(crt, key)
            ctx.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:  # caught mid-renewal: the pair does not match yet
            log.info("event=certificate_unusable pod_uid=%s error=%r", uid, str(exc))
            return hit[1] if hit is not None else None
        self._cache[(uid, server)] = (stamp, ctx)
        return ctx

    def forget(self, uid: str) -> None:
        self._cache.pop((uid, True), None)
        self._cache.pop((uid, False), None)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The verified peer's SPIFFE ID (its certificate's URI SAN); "" when there is none."""
    if ssl_object is None:
        return ""
    cert = ssl_object.getpeercert()
    for entry in (cert or {}).get("subjectAltName", ()):
        kind, value = entry[0], entry[1]
        if kind == "URI" and isinstance(value, str) and value.startswith("spiffe://"):
            return value
    return ""
