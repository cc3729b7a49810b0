"""Which workload certificate an agent may have: the pod must run on the agent's own node.

An agent asks (over its authenticated Connect stream) for a certificate for one pod, by uid. The
identity in the certificate comes from the cluster source — the pod's namespace and
ServiceAccount — never from the CSR; and a pod of another node is refused, so a compromised node
can only speak as the pods it already runs (as Istio's ztunnel and Linkerd's identity service
bind a proxy's certificate to what it hosts).
"""

from __future__ import annotations

import logging

from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.api.spiffe import workload_id
from nodemesh.controlplane.ca import CSRError, WorkloadCA
from nodemesh.controlplane.registry import PodRecord, WorkloadRegistry

log = logging.getLogger("nodemesh.controlplane.certify")


def find_pod(registry: WorkloadRegistry, uid: str) -> PodRecord | None:
    for pod in registry.pods():
        if pod.uid == uid:
            return pod
    return None


def trust_bundle(ca: WorkloadCA) -> pb.TrustBundle:
    return pb.TrustBundle(trust_domain=ca.trust_domain, roots_pem=ca.bundle_pem())


def certify(ca: WorkloadCA, registry: WorkloadRegistry, agent_node: str,
            request: pb.CertificateSigningRequest) -> pb.CertificateIssued:
    """Sign `request` for the agent of `agent_node`, or say why not (the `error` field)."""
    answer = pb.CertificateIssued(id=request.id, pod_uid=request.pod_uid)
    pod = find_pod(registry, request.pod_uid)
    if pod is None:
        answer.error = f"unknown pod uid {request.pod_uid!r}"
    elif not agent_node or pod.node != agent_node:
        answer.error = (f"pod {pod.namespace}/{pod.name} runs on node {pod.node or '<none>'}, "
                        f"not on this agent's node {agent_node or '<none>'}")
    elif pod.host_network:
        answer.error = f"pod {pod.namespace}/{pod.name} uses the host network: it has no identity of its own"
    elif not pod.running:
        answer.error = f"pod {pod.namespace}/{pod.name} is {pod.phase}"
    else:
        try:
            identity = workload_id(ca.trust_domain, pod.namespace, pod.service_account)
            issued = ca.sign(request.csr_der, identity)
        except (CSRError, ValueError) as exc:
            answer.error = str(exc)
        else:
            answer.certificate_pem = issued.certificate_pem
            answer.spiffe_id = str(identity)
            answer.not_after_ms = int(issued.not_after.timestamp() * 1000)
            answer.trust_bundle.CopyFrom(trust_bundle(ca))
            log.debug("event=certificate_issued node=%s pod=%s/%s id=%s", agent_node, pod.namespace, pod.name,
                      identity)
            return answer
    log.warning("event=csr_refused node=%s pod_uid=%s reason=%r", agent_node, request.pod_uid, answer.error)
    return answer
