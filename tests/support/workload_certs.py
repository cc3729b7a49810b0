"""Workload certificates on disk as an agent's `--cert-dir` holds them (agent/certs.py reads
`<uid>.key`, `<uid>.crt` and `trust-bundle.pem`), signed by a real WorkloadCA: for the tunnel tests."""

from __future__ import annotations

from pathlib import Path

from nodemesh.agent.certs import make_key_and_csr
from nodemesh.api import spiffe
from nodemesh.controlplane.ca import WorkloadCA

TRUST_DOMAIN = "mesh.test"


def issue(ca: WorkloadCA, directory: Path, uid: str, sa: str, namespace: str = "ns") -> None:
    """A key made here and a certificate for `spiffe://mesh.test/ns/<namespace>/sa/<sa>`, as pod
    `uid`'s, in `directory` (made if missing), with the CA's bundle beside them."""
    key, csr = make_key_and_csr()
    directory.mkdir(exist_ok=True)
    (directory / f"{uid}.key").write_bytes(key)
    (directory / f"{uid}.crt").write_bytes(
        ca.sign(csr, spiffe.workload_id(TRUST_DOMAIN, namespace, sa)).certificate_pem)
    (directory / "trust-bundle.pem").write_bytes(ca.bundle_pem())
