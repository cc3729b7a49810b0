"""nodemesh: a service mesh for Kubernetes with one agent per node instead of a sidecar per pod.

The repository root is this package; each top-level folder is one room of the architecture
(see docs/architecture.md): `api`, `redirector`, `agent`, `controlplane`, `cli`, `sandbox`, `demo`.
"""

__version__ = "0.1.0"
