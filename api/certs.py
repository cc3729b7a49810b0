"""Certificates for the controller's gRPC port: a self-signed CA and a server certificate it issues.

Agents (and the CLI) verify the controller with the CA, so the bearer token they send travels
inside TLS and only to the controller. Keys are EC P-256 (small, fast handshakes), made with the
`cryptography` library. Used by `nodemesh install --sandbox` (written into the sandbox's state
directory) and by whoever provisions the files the controller's `--tls-cert/--tls-key` read.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

CA_FILE, CERT_FILE, KEY_FILE = "controller-ca.crt", "controller.crt", "controller.key"


def _name(common_name: str):  # type: ignore[no-untyped-def]
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate_ca(common_name: str = "nodemesh controller CA", days: int = 3650,
                now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a new self-signed CA that can sign certificates: the
    controller's server CA here, the workload root in controlplane/ca.py."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    name = _name(common_name)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def issue_server_cert(ca_cert_pem: bytes, ca_key_pem: bytes, hosts: list[str], days: int = 365,
                      lifetime_s: float | None = None,
                      now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for a TLS server known by `hosts` (DNS names or IPs),
    valid `days` (or `lifetime_s` seconds: the controller's renewed certificate) from `now`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = now or datetime.datetime.now(datetime.UTC)
    life = datetime.timedelta(seconds=lifetime_s) if lifetime_s is not None else datetime.timedelta(days=days)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + life)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@dataclass(frozen=True)
class ControllerPki:
    ca: Path      # what agents and the CLI trust (public)
    cert: Path    # the controller's certificate
    key: Path     # its key (0600)


def write_controller_pki(directory: str | os.PathLike[str], hosts: list[str]) -> ControllerPki:
    """A CA and a server certificate for `hosts` in `directory` (the CA's key is not kept: a
    new certificate means a new CA here, which the install writes for everyone at once)."""
    d = Path(directory)
    ca_pem, ca_key = generate_ca()
    cert_pem, key_pem = issue_server_cert(ca_pem, ca_key, hosts)
    pki = ControllerPki(d / CA_FILE, d / CERT_FILE, d / KEY_FILE)
    for path, data, mode in ((pki.key, key_pem, 0o600), (pki.cert, cert_pem, 0o644), (pki.ca, ca_pem, 0o644)):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return pki
