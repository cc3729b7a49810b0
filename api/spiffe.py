"""Workload identity in SPIFFE form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service account>`.

The one spelling the controller's CA writes into a certificate's URI SAN and the agent reads back
from a peer's certificate (Istio and Linkerd use the same path shape, so identities read alike).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def _valid_segment(text: str) -> bool:
    return bool(text) and "/" not in text and text not in (".", "..")


def workload_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """The identity of a pod running as `service_account` in `namespace`; ValueError when a part
    cannot be a path segment (an empty or slashed name would name someone else)."""
    for what, text in (("trust domain", trust_domain), ("namespace", namespace),
                       ("service account", service_account or "default")):
        if not _valid_segment(text):
            raise ValueError(f"invalid {what} for a SPIFFE ID: {text!r}")
    return SpiffeId(trust_domain, namespace, service_account or "default")


def parse(uri: str) -> SpiffeId:
    """`spiffe://td/ns/N/sa/S` -> SpiffeId; ValueError on anything else."""
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a SPIFFE ID: {uri!r}")
    parts = uri[len(SCHEME):].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        raise ValueError(f"not a workload SPIFFE ID (spiffe://<td>/ns/<ns>/sa/<sa>): {uri!r}")
    return workload_id(parts[0], parts[2], parts[4])
