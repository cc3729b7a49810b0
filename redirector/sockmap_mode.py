"""`--accelerate sockmap` in the redirector: redirector/sockmap.py's programs beside whichever
capture runs, behind the Redirector interface the fail-open runner drives (so its shutdown removes
them with the rules).

`choose()` probes once at start: a node or kernel without what acceleration needs (no bcc, no
bpffs, no cgroup v2, no netns cookie, a verifier that refuses the programs) runs without it, with
one log line saying why. Never a crash loop: acceleration is an optimisation, capture does not
depend on it.
"""

from __future__ import annotations

from collections.abc import Callable

from nodemesh.redirector import sockmap
from nodemesh.redirector.apply import Redirector
from nodemesh.redirector.config import CaptureConfig
from nodemesh.redirector.plan import Plan


class AcceleratedRedirector(Redirector):
    """The capture's Redirector (iptables or eBPF), unchanged, plus acceleration removed with it."""

    def __init__(self, inner: Redirector, accel: sockmap.SockmapAccel) -> None:
        super().__init__(inner.nf)
        self.inner = inner
        self.accel = accel

    def apply(self, plan: Plan, capture: bool = True) -> bool:
        return self.inner.apply(plan, capture)

    def sync_pods(self, excluded: tuple[str, ...]) -> bool:
        sync = getattr(self.inner, "sync_pods", None)
        return bool(sync(excluded)) if sync is not None else False

    def set_capture(self, plan: Plan, capture: bool) -> bool:
        return self.inner.set_capture(plan, capture)

    def remove_capture_hooks(self, plan: Plan) -> bool:
        return self.inner.remove_capture_hooks(plan)

    def capture_hooked(self, plan: Plan) -> bool:
        return self.inner.capture_hooked(plan)

    def remove(self, plan: Plan | None = None) -> bool:
        removed = self.accel.remove()
        return self.inner.remove(plan) or removed


def choose(config: CaptureConfig, inner: Redirector, accelerate: str, bpf_dir: str, cgroup_root: str,
           log: Callable[..., None]) -> Redirector:
    """`inner` wrapped with acceleration when asked and possible; else `inner` (logged once)."""
    if accelerate != "sockmap":
        return inner
    accel = sockmap.SockmapAccel(config.node_ip, config.outbound_port, config.networks[0],
                                 outbound_pairs=config.capture == "ebpf", bpf_dir=bpf_dir,
                                 cgroup_root=cgroup_root, log=log)
    found = sockmap.probe(bpf_dir, cgroup_root)
    if found.ok:
        try:
            compiled = accel.load()
        except (sockmap.SockmapError, OSError) as exc:
            found = sockmap.Probe(False, str(exc).splitlines()[0])
        else:
            log("accelerate", mode="sockmap", capture=config.capture, programs="compiled" if compiled else "reused",
                pod_agent_hop="sockmap" if config.capture == "ebpf" else "stack (iptables capture NATs it)",
                agent_pod_hop="sockmap", bpf_dir=accel.dir, cgroup_root=cgroup_root)
            return AcceleratedRedirector(inner, accel)
    log("accelerate", mode="none", asked="sockmap", reason=found.reason)
    try:
        if accel.remove():
            log("sockmap_removed", reason="fallback", bpf_dir=accel.dir)
    except OSError as exc:
        log("sockmap_remove_failed", error=str(exc))
    return inner
