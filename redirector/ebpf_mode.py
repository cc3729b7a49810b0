"""`--capture ebpf` in the redirector: the iptables Redirector for inbound and the return path,
plus the eBPF programs for outbound (redirector/ebpf.py), behind the same interface, so the
fail-open runner decides exactly as with iptables. Capture off (fail-open, shutdown) is one map
write that the very next connect() sees.

`choose()` probes the node once at start: whatever eBPF capture needs and is missing (no bcc, no
bpffs, no cgroup v2, a kernel that refuses the programs) falls back to iptables capture, with one
log line saying why. Never a crash loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from nodemesh.redirector import ebpf
from nodemesh.redirector.apply import Redirector
from nodemesh.redirector.config import CaptureConfig
from nodemesh.redirector.plan import Plan


class EbpfRedirector(Redirector):
    """A Redirector (the runner drives it as one) whose capture switch is also the eBPF one."""

    def __init__(self, inner: Redirector, capture: ebpf.EbpfCapture) -> None:
        super().__init__(inner.nf)
        self.inner = inner
        self.ebpf = capture

    def apply(self, plan: Plan, capture: bool = True) -> bool:
        changed = self.inner.apply(plan, capture)
        was = self.ebpf.enabled()
        if capture:
            self.sync_pods(plan.config.excluded_ips)   # new pods are not "rules missing"
        if was != capture:
            self.ebpf.set_enabled(capture)
            changed = True
        return changed

    def sync_pods(self, excluded: tuple[str, ...]) -> bool:
        """New pods get the programs, excluded ones lose them (the runner calls this every poll)."""
        return self.ebpf.sync(excluded)

    def set_capture(self, plan: Plan, capture: bool) -> bool:
        self.ebpf.set_enabled(capture)
        return self.inner.set_capture(plan, capture)

    def remove_capture_hooks(self, plan: Plan) -> bool:
        was = self.ebpf.enabled()
        self.ebpf.set_enabled(False)   # first: the next connect goes direct
        return self.inner.remove_capture_hooks(plan) or was

    def capture_hooked(self, plan: Plan) -> bool:
        return self.ebpf.enabled() or self.inner.capture_hooked(plan)

    def remove(self, plan: Plan | None = None) -> bool:
        removed = self.ebpf.remove()
        return self.inner.remove(plan) or removed


def choose(config: CaptureConfig, inner: Redirector, bpf_dir: str, cgroup_root: str,
           log: Callable[..., None]) -> tuple[CaptureConfig, Redirector]:
    """The capture this node can run: eBPF when asked and possible, else iptables (logged once)."""
    if config.capture != "ebpf":
        return config, inner
    found = ebpf.probe(bpf_dir, cgroup_root)
    capture = ebpf.EbpfCapture(config.node_ip, config.outbound_port, config.networks,
                               config.effective_skip_ports, bpf_dir, cgroup_root, log)
    if found.ok:
        try:
            compiled = capture.load()
        except (ebpf.EbpfError, OSError) as exc:
            found = ebpf.Probe(False, str(exc).splitlines()[0])
        else:
            log("capture_mode", mode="ebpf", reason=found.reason, programs="compiled" if compiled else "reused",
                bpf_dir=bpf_dir, cgroup_root=cgroup_root)
            return config, EbpfRedirector(inner, capture)
    log("capture_mode", mode="iptables", fallback_from="ebpf", reason=found.reason)
    # Whatever an earlier eBPF redirector left (pins, attachments) must not stay half alive.
    try:
        if capture.remove():
            log("ebpf_removed", reason="fallback", bpf_dir=bpf_dir)
    except OSError as exc:
        log("ebpf_remove_failed", error=str(exc))
    return replace(config, capture="iptables"), inner
