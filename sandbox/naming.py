"""Names of everything the sandbox creates: clusters, network namespaces, links, pods.

Every name a cluster puts on the machine starts with `nm-<cluster>-` (network namespaces,
`/etc/netns` directories) or is the one root-namespace link `nmsb<index>`, so teardown can find
all of it again from the cluster name and index alone, even after a crash half-way.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

DEFAULT_CLUSTER = "nodemesh"
# No dashes in cluster names: `nm-<cluster>-` must never be a prefix of another cluster's names.
_CLUSTER_RE = re.compile(r"^[a-z0-9]{1,12}$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
IFNAMSIZ = 15  # the kernel's limit on interface names, without the trailing NUL

# kube-controller-manager's alphabet for generated suffixes: no vowels, no confusable digits.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class NameError_(ValueError):
    """A name the sandbox cannot use."""


def check_cluster_name(name: str) -> str:
    if not _CLUSTER_RE.match(name):
        raise NameError_(f"invalid sandbox name {name!r}: use 1-12 lowercase letters or digits")
    return name


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL_RE.match(name))


def is_dns_subdomain(name: str) -> bool:
    return bool(_DNS_SUBDOMAIN_RE.match(name))


def netns_prefix(cluster: str) -> str:
    return f"nm-{cluster}-"


def node_name(k: int) -> str:
    return f"node{k}"


def node_netns(cluster: str, k: int) -> str:
    return f"nm-{cluster}-node{k}"


def underlay_netns(cluster: str) -> str:
    return f"nm-{cluster}-underlay"


def pod_netns(cluster: str, namespace: str, pod: str) -> str:
    # '.' cannot appear in a namespace or pod name (DNS labels), so the split is unambiguous.
    return f"nm-{cluster}-pod-{namespace}.{pod}"


def host_link(index: int) -> str:
    """The one link the sandbox puts in the root namespace."""
    name = f"nmsb{index}"
    assert len(name) <= IFNAMSIZ
    return name


def pod_host_veth(cni: str, namespace: str, pod: str) -> str:
    """Node-side veth of a pod, named like the CNI it imitates (flannel `veth*`, Calico `cali*`)."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    prefix = "cali" if cni == "routed" else "veth"
    return (prefix + digest)[:IFNAMSIZ]


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(n))


def template_hash(template: object) -> str:
    """pod-template-hash: a short stable hash of the pod template, spelled in the suffix alphabet."""
    import json

    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    value = int.from_bytes(digest[:8], "big")
    out = []
    for _ in range(10):
        value, rem = divmod(value, len(_SUFFIX_ALPHABET))
        out.append(_SUFFIX_ALPHABET[rem])
    return "".join(out)


def kube_chain(prefix: str, *parts: str) -> str:
    """kube-proxy's chain names: prefix + first 16 chars of base32(sha256(parts))."""
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]
