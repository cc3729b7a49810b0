"""The per-cluster supervisor daemon: kubelet, kube-proxy and endpoint controller in one process.

`python -m nodemesh.sandbox.kubelet --cluster NAME` is started by `sandbox up` and outlives the
CLI. It watches the recorded objects and the infra record, and:
  - runs every container of every Pod as a process in the pod's netns (`ip netns exec`, so the
    pod's /etc/netns hosts file applies), env from the manifest, output to a log file;
  - restarts exited containers with the kubelet's back-off (10 s, 20 s, 40 s ... capped at 300 s,
    reset after 10 minutes of running) and counts restarts;
  - probes readiness (readinessProbe tcpSocket/httpGet, else the first containerPort) from the
    node's netns, like the kubelet dials the pod IP;
  - writes Pod status, then recomputes ReplicaSet/Deployment status and EndpointSlices, and
    re-renders every node's KUBE-* chains and every pod's hosts file *before* committing the new
    state, so "Ready" in the objects file means the ClusterIP already reaches that pod;
  - supervises hostNetwork node processes (start_node_process), restarted after 1 s, 2 s ... 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodemesh.sandbox import cgroups, kubeproxy, naming, objects, podspec, tokens
from nodemesh.sandbox.manifests import resolve_container_port
from nodemesh.sandbox.netlink import socket_in_netns
from nodemesh.sandbox.proctools import kill_all, pids_in_netns
from nodemesh.sandbox.state import DEFAULT_STATE_ROOT, ClusterState, now_rfc3339, write_json_atomic

log = logging.getLogger("nodemesh.sandbox.kubelet")

TICK = 0.1
NOT_READY_PROBE_INTERVAL = 0.25  # faster than the kubelet's, so a sandbox starts in seconds
READY_PROBE_PERIOD = 2.0  # default periodSeconds (Kubernetes: 10)
BACKOFF_RESET_AFTER = 600.0
NODE_PROCESS_KILL_GRACE_S = 40.0  # SIGTERM -> SIGKILL for node processes (pods: 3 s), see Container
POD_KILL_GRACE_S = 3.0  # a pod that sets no terminationGracePeriodSeconds (Kubernetes: 30 s)
BOOT_DELAY_S = 0.2  # a restarted node's containers start again after this (no back-off: a fresh boot)
REPLACED_BY = "sandbox.nodemesh.io/replaced-by"  # see cluster.py: DaemonSet rolling updates
KUBERNETES_SERVICE = ("default", "kubernetes")  # the API server's Service, when the sandbox runs one


@dataclass
class PodSetup:
    """What a pod's containers need on disk before they start: volumes, and a kubeconfig."""

    namespace: str
    name: str
    service_account: str
    pod_dir: Path
    volumes: dict[str, podspec.Volume]
    kubeconfig: Path | None  # None: automountServiceAccountToken is false


@dataclass
class Backoff:
    base: float
    cap: float

    def delay(self, restarts_so_far: int) -> float:
        """Delay before restart number `restarts_so_far + 1`: base, 2*base, 4*base ... capped."""
        return float(min(self.cap, self.base * (2 ** min(restarts_so_far, 30))))


@dataclass
class Probe:
    kind: str  # "tcp", "http" or "exec"
    port: int
    path: str = "/"
    command: list[str] = field(default_factory=list)  # exec: run in the container's netns and env
    initial_delay: float = 0.0
    period: float = READY_PROBE_PERIOD
    timeout: float = 1.0
    failure_threshold: int = 3
    scheme: str = "HTTP"  # httpGet: HTTPS is TLS without verifying the certificate, as a kubelet does


@dataclass
class Container:
    key: str
    netns: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    backoff: Backoff
    probe_netns: str = ""
    probe_ip: str = ""
    probe: Probe | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    started_wall: str = ""
    next_start: float = 0.0
    last_terminated: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    failures: int = 0
    next_probe: float = 0.0
    probing: bool = False
    # SIGTERM -> SIGKILL grace. Pods: 3 s (fast tests). Node processes: the agent drains for up to 30 s
    # (the DaemonSet's terminationGracePeriodSeconds is 45), and the redirector keeps the return path
    # until the agent is done; killing them at 3 s cut that drain at `nodemesh uninstall --sandbox`.
    # A pod's explicit terminationGracePeriodSeconds is honoured.
    kill_grace_s: float = POD_KILL_GRACE_S
    node: str = ""
    pod_uid: str = ""
    init_index: int = -1          # >= 0: an init container, run to completion in this order first
    completed: bool = False       # an init container that exited 0 (until the pod's node restarts)
    setup: PodSetup | None = None

    def state(self) -> dict[str, Any]:
        if self.proc is not None:
            return {"running": {"startedAt": self.started_wall}}
        if self.completed:
            return {"terminated": {"exitCode": 0, "reason": "Completed", **{
                k: v for k, v in self.last_terminated.items() if k in ("startedAt", "finishedAt")}}}
        if self.restarts or self.last_terminated:
            return {"waiting": {"reason": "CrashLoopBackOff",
                                "message": f"back-off restarting failed container ({self.key})"}}
        return {"waiting": {"reason": "ContainerCreating"}}


def image_env(bin_dir: Path | None = None) -> dict[str, str]:
    """What every container inherits from "the image": the sandbox runs processes, not images, so
    the image is this machine's Python environment as the kubelet was started with it. PYTHONPATH
    included: without it a process in a pod imported whichever nodemesh is installed in
    site-packages, not the tree that started the sandbox (a worktree's tests ran main's agent).
    `bin_dir` (first on PATH) holds `python`, the interpreter itself, as the image has it."""
    path = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env = {"PATH": f"{bin_dir}:{path}" if bin_dir else path}
    for key in ("PYTHONPATH",):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def build_env(container: dict[str, Any], pod: dict[str, Any], bin_dir: Path | None = None,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    field_values = {
        "metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"], "status.podIP": pod["status"].get("podIP", ""),
        "spec.nodeName": pod["spec"]["nodeName"], "status.hostIP": pod["status"].get("hostIP", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
    }
    env = {
        **image_env(bin_dir),
        "HOSTNAME": pod["metadata"]["name"], "HOME": "/root", "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1", **(extra or {}),
    }
    for e in container.get("env") or []:
        if "valueFrom" in e:
            env[e["name"]] = field_values.get(e["valueFrom"]["fieldRef"]["fieldPath"], "")
        else:
            env[e["name"]] = podspec.expand_vars(str(e.get("value", "")), env)
    return env


def probe_of(container: dict[str, Any]) -> Probe | None:
    spec = container.get("readinessProbe")
    if spec and "exec" in spec:
        return Probe(
            kind="exec", port=0, command=[str(a) for a in spec["exec"]["command"]],
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
            period=float(spec.get("periodSeconds", READY_PROBE_PERIOD)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
        )
    if spec:
        handler = spec.get("httpGet") or spec.get("tcpSocket")
        port = resolve_container_port(container, handler.get("port"))
        assert port is not None  # validated at apply
        return Probe(
            kind="http" if "httpGet" in spec else "tcp", port=port, path=handler.get("path", "/"),
            scheme=str(handler.get("scheme", "HTTP")).upper(),
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
            period=float(spec.get("periodSeconds", READY_PROBE_PERIOD)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
        )
    ports = container.get("ports") or []
    if ports:
        return Probe(kind="tcp", port=int(ports[0]["containerPort"]))
    return None


async def run_probe(ns: str, ip: str, probe: Probe) -> bool:
    loop = asyncio.get_running_loop()
    sock = socket_in_netns(ns)
    try:
        async with asyncio.timeout(probe.timeout):
            await loop.sock_connect(sock, (ip, probe.port))
            if probe.kind == "tcp":
                return True
            req = f"GET {probe.path} HTTP/1.0\r\nHost: {ip}:{probe.port}\r\nUser-Agent: kube-probe/1.30\r\n\r\n"
            if probe.scheme == "HTTPS":
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=ip)
                writer.write(req.encode())
                head = await reader.read(64)
                writer.close()
            else:
                await loop.sock_sendall(sock, req.encode())
                head = await loop.sock_recv(sock, 64)
            parts = head.split(b" ", 2)
            return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()


async def run_exec_probe(netns: str, env: dict[str, str], cwd: Path, probe: Probe) -> bool:
    """An exec probe: the command, in the container's netns and environment; exit 0 is success."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, *probe.command, env=env, cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return False
    try:
        async with asyncio.timeout(probe.timeout):
            return await proc.wait() == 0
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False


class Kubelet:
    def __init__(self, cluster: str, state: ClusterState) -> None:
        self.cluster = cluster
        self.state = state
        self.containers: dict[str, Container] = {}
        self.dying: list[subprocess.Popen[bytes]] = []
        self.seen_mtimes: tuple[float, float] = (0.0, 0.0)
        self.loaded_rv = -1
        self.dirty = True  # pod status to write
        self.applied_rules: dict[str, str] = {}  # node netns -> rendered KUBE-* plan
        self.applied_hosts: dict[str, str] = {}  # pod netns -> hosts file text
        self.pod_keys: dict[str, list[str]] = {}  # pod uid -> container keys
        self.terminated: dict[str, list[subprocess.Popen[bytes]]] = {}  # terminating pod uid -> its processes
        self.next_reload_at = 0.0  # a terminating pod's preStop wait ends: reload then
        self.stopping = False
        self.boots: dict[str, int] = {}  # node -> restarts handled (Sandbox.restart_node asks for more)
        self.bin_dir = state.dir / "bin"
        self.api_server = ""  # http://<ClusterIP>:<port> of the sandbox's API server, when it runs one

    # ----------------------------------------------------------------------------- desired
    def _mtimes(self) -> tuple[float, float]:
        def m(p: Path) -> float:
            try:
                return p.stat().st_mtime_ns
            except FileNotFoundError:
                return 0.0
        return (m(self.state.dir / "objects.json"), m(self.state.sandbox_file))

    def reload(self) -> None:
        infra = self.state.infra()
        if not infra:
            self.stopping = True  # torn down under us
            return
        nodes = {n["name"]: n for n in infra.get("nodes", [])}
        pod_backoff = Backoff(*infra.get("backoff", [10.0, 300.0]))
        node_backoff = Backoff(*infra.get("node_backoff", [1.0, 10.0]))
        desired: dict[str, Container] = {}
        pod_keys: dict[str, list[str]] = {}
        current = self.state.objects()
        self.loaded_rv = current.resource_version
        stopping_pods: set[str] = set()
        self.next_reload_at = 0.0
        self.api_server = _api_server_url(current.of_kind("Service"))
        for pod in current.of_kind("Pod"):
            node = nodes.get(pod["spec"]["nodeName"])
            if node is None:
                continue
            due = _stop_due(pod)
            if due is True:
                stopping_pods.add(pod["metadata"]["uid"])  # deletion began (and its preStop wait is over): stop, never restart
                continue
            if due:  # its preStop wait ends then: look again
                self.next_reload_at = min(self.next_reload_at or due, due)
            for c in self._pod_containers(pod, node, pod_backoff):
                pod_keys.setdefault(pod["metadata"]["uid"], []).append(c.key)
                desired[c.key] = c
        for pname, spec in (infra.get("node_processes") or {}).items():
            node = nodes.get(spec["node"])
            if node is None:
                continue
            key = f"node/{pname}"
            env = {**image_env(), "PYTHONUNBUFFERED": "1", "HOME": "/root",
                   **spec.get("env", {})}
            desired[key] = Container(
                key=key, netns=node["netns"], argv=list(spec["argv"]), env=env,
                cwd=self.state.dir / "nodeproc" / pname, log_path=self.state.node_process_log(node["name"], pname),
                backoff=node_backoff, kill_grace_s=NODE_PROCESS_KILL_GRACE_S, node=node["name"],
            )
        for key in list(self.containers):
            old = self.containers[key]
            new = desired.get(key)
            if new is None or (new.argv, new.env, new.netns, new.probe_ip) != (old.argv, old.env, old.netns,
                                                                               old.probe_ip):
                pod_uid = key.split("/")[1] if key.startswith("pod/") else ""
                if pod_uid in stopping_pods and old.proc is not None:
                    self.terminated.setdefault(pod_uid, []).append(old.proc)
                self._stop(old)
                del self.containers[key]
                log.info("event=container_removed key=%s", key)
        for key, c in desired.items():
            if key not in self.containers:
                self.containers[key] = c
                log.info("event=container_added key=%s netns=%s", key, c.netns)
        self.pod_keys = pod_keys
        live_uids = {p["metadata"]["uid"] for p in current.of_kind("Pod")}
        self.terminated = {uid: procs for uid, procs in self.terminated.items() if uid in live_uids}
        self.dirty = True
        for c in self.containers.values():  # an API server installed after the pod started
            if c.setup is not None:
                try:
                    self._write_kubeconfig(c.setup)
                    # ConfigMap volumes follow their ConfigMap while the pod runs, as a kubelet's
                    # sync does (an agent waits for the controller's CA to appear there).
                    for vol in c.setup.volumes.values():
                        if vol.kind == "configMap" and vol.host_path.is_dir():
                            _write_config_map(vol, c.setup.namespace, current)
                except OSError as exc:
                    log.error("event=kubeconfig_failed key=%s error=%r", c.key, exc)
        for name, count in (infra.get("node_boots") or {}).items():
            if count > self.boots.get(name, 0):
                self.restart_node(name, count)

    def _pod_containers(self, pod: dict[str, Any], node: dict[str, Any], backoff: Backoff) -> list[Container]:
        """The init containers (in order) and containers of one pod, ready to run."""
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        spec = pod["spec"]
        host_network = bool(spec.get("hostNetwork"))
        pod_dir = self.state.pod_workdir(ns, name)
        automount = spec.get("automountServiceAccountToken", True) is not False
        setup = PodSetup(ns, name, spec.get("serviceAccountName", "default"), pod_dir,
                         podspec.pod_volumes(pod, pod_dir, cgroups.node_paths(self.cluster, node["name"])),
                         pod_dir / "serviceaccount" / "kubeconfig" if automount else None)
        # Every pod gets KUBECONFIG (the file exists once the sandbox runs an API server): setting it
        # only then would change the env, and restart every pod, when the API server is installed.
        extra = {"KUBECONFIG": str(setup.kubeconfig)} if setup.kubeconfig else {}
        grace = spec.get("terminationGracePeriodSeconds")
        out = []
        specs = [(i, c) for i, c in enumerate(spec.get("initContainers") or [])] + \
            [(-1, c) for c in spec["containers"]]
        for init_index, c in specs:
            env = build_env(c, pod, self.bin_dir, extra)
            mounts = podspec.mount_map(c, setup.volumes)
            # Only what the manifest wrote is mapped: the kubelet's own paths (PATH, KUBECONFIG)
            # live under the state root, which a mountPath like /run/nodemesh would match.
            for e in c.get("env") or []:
                env[e["name"]] = podspec.map_paths(env[e["name"]], mounts)
            prefix = "init/" if init_index >= 0 else ""
            probe = probe_of(c) if init_index < 0 else None
            if probe is not None and probe.kind == "exec":
                probe.command = [podspec.map_paths(podspec.expand_vars(a, env), mounts) for a in probe.command]
            out.append(Container(
                key=f"pod/{uid}/{prefix}{c['name']}",
                netns=node["netns"] if host_network else naming.pod_netns(self.cluster, ns, name),
                argv=podspec.container_argv(c, env, mounts), env=env,
                cwd=Path(c.get("workingDir") or pod_dir),
                log_path=self.state.pod_log(ns, name, c["name"]), backoff=backoff,
                probe_netns=node["netns"], probe_ip=objects.pod_ip(pod), probe=probe,
                kill_grace_s=float(grace) if grace is not None else POD_KILL_GRACE_S,
                node=node["name"], pod_uid=uid, init_index=init_index, setup=setup,
            ))
        return out

    def _prepare(self, c: Container) -> None:
        """Volumes and kubeconfig on disk before a container starts (rewritten at every start:
        ConfigMap contents and tokens are fresh, an emptyDir keeps what it holds)."""
        if not self.bin_dir.joinpath("python").exists():
            self.bin_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.bin_dir.joinpath("python").symlink_to(sys.executable)
        setup = c.setup
        if setup is None:
            return
        objs = None
        for vol in setup.volumes.values():
            if vol.kind == "hostPath":
                kind = vol.spec.get("type", "")
                if kind == "FileOrCreate" and not vol.host_path.exists():
                    vol.host_path.parent.mkdir(parents=True, exist_ok=True)
                    vol.host_path.touch()
                elif kind == "DirectoryOrCreate":
                    vol.host_path.mkdir(parents=True, exist_ok=True)
                continue
            vol.host_path.mkdir(parents=True, exist_ok=True)
            if vol.kind == "configMap":
                objs = objs or self.state.objects()
                _write_config_map(vol, setup.namespace, objs)
            elif vol.kind == "projected":
                for source in vol.spec.get("sources") or []:
                    sat = source["serviceAccountToken"]
                    token = tokens.mint(self.state.dir, setup.namespace, setup.service_account,
                                        [sat["audience"]] if sat.get("audience") else [],
                                        int(sat.get("expirationSeconds", tokens.DEFAULT_TTL_S)))
                    (vol.host_path / sat["path"]).write_text(token)
        self._write_kubeconfig(setup)

    def _write_kubeconfig(self, setup: PodSetup) -> None:
        if setup.kubeconfig is None or not self.api_server or setup.kubeconfig.exists():
            return
        token = tokens.mint(self.state.dir, setup.namespace, setup.service_account, [tokens.API_AUDIENCE])
        setup.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        tmp = setup.kubeconfig.with_suffix(".tmp")
        tmp.write_text(podspec.kubeconfig(self.api_server, token, setup.namespace))
        tmp.replace(setup.kubeconfig)

    def restart_node(self, node: str, count: int) -> None:
        """A node restart, as the node sees a reboot: every process of the node dies at once
        (SIGKILL: its pods' containers, hostNetwork pods, node processes, anything else in its
        network namespaces), then everything starts again, init containers first, without back-off.
        Each pod on the pod network gets a new sandbox: a fresh netns and a new IP, as the CNI's
        IPAM hands out after a reboot (hostNetwork pods keep the node's). The node's own kernel
        state stays: its netns, addresses, iptables rules, conntrack."""
        log.info("event=node_restart node=%s boot=%d", node, count)
        now = time.monotonic()
        for c in self.containers.values():
            if c.node != node:
                continue
            if c.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    c.proc.wait(timeout=5)
                c.last_terminated = {"exitCode": 137, "reason": "Error", "startedAt": c.started_wall,
                                     "finishedAt": now_rfc3339()}
                c.proc = None
            c.ready = False
            c.failures = 0
            c.completed = False
            c.next_start = now + BOOT_DELAY_S
        from nodemesh.sandbox.netlink import netns_inode

        infra = self.state.infra()
        netns = [n["netns"] for n in infra.get("nodes", []) if n["name"] == node]
        netns += [naming.pod_netns(self.cluster, p["metadata"]["namespace"], p["metadata"]["name"])
                  for p in self.state.objects().of_kind("Pod") if p["spec"]["nodeName"] == node]
        inodes = {i for n in netns if (i := netns_inode(n)) is not None}
        leftovers = [p for p in pids_in_netns(inodes) if p != os.getpid()]
        if leftovers:
            log.info("event=node_restart_kill node=%s pids=%s", node, leftovers)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in list(self.dying):
            if p.poll() is None and any(c.node == node for c in self.containers.values()
                                        if getattr(p, "_nm_key", None) == c.key):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        # In a process of its own: pyroute2's NetNS cannot run inside our event loop, and in a
        # thread it forks helpers that inherit our signal wakeup fd (their SIGTERM stopped us).
        res = subprocess.run([sys.executable, "-m", "nodemesh.sandbox.kubelet", "--cluster", self.cluster,
                              "--state-root", str(self.state.dir.parent), "--renumber-node", node],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            log.error("event=renumber_failed node=%s error=%s", node, res.stderr.strip()[-500:])
        self.seen_mtimes = (0.0, 0.0)  # reload: the containers' probe address (and POD_IP env) changed
        self.boots[node] = count
        self.dirty = True


    # ----------------------------------------------------------------------------- processes
    def _start(self, c: Container) -> None:
        try:
            self._prepare(c)
        except OSError as exc:
            log.error("event=prepare_failed key=%s error=%r", c.key, exc)
        c.cwd.mkdir(parents=True, exist_ok=True)
        c.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["ip", "netns", "exec", c.netns, *c.argv]
        if c.pod_uid and c.node:
            # Every pod in a cgroup v2 directory of its own, as a real kubelet does (sandbox/cgroups.py).
            cgroup = cgroups.prepare_pod(self.cluster, c.node, c.pod_uid)
            if cgroup is not None:
                argv = cgroups.join_argv(cgroup, argv)
        with open(c.log_path, "ab") as logf:
            try:
                c.proc = subprocess.Popen(
                    argv, env=c.env, cwd=c.cwd, stdin=subprocess.DEVNULL,
                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                logf.write(f"sandbox: cannot start {c.argv!r}: {exc}\n".encode())
                c.proc = None
                c.last_terminated = {"exitCode": 128, "reason": "StartError", "finishedAt": now_rfc3339()}
                c.next_start = time.monotonic() + c.backoff.delay(c.restarts)
                return
        c.started_at = time.monotonic()
        c.started_wall = now_rfc3339()
        c.ready = c.probe is None and c.key.startswith("pod/")
        c.failures = 0
        c.next_probe = c.started_at + (c.probe.initial_delay if c.probe else 0)
        log.info("event=container_started key=%s pid=%d restarts=%d", c.key, c.proc.pid, c.restarts)
        self.dirty = True

    def _stop(self, c: Container) -> None:
        if c.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGTERM)
            c.proc._nm_grace = c.kill_grace_s  # type: ignore[attr-defined]
            c.proc._nm_key = c.key  # type: ignore[attr-defined]
            self.dying.append(c.proc)
            c.proc = None

    def _reap_dying(self) -> None:
        for p in list(self.dying):
            if p.poll() is not None:
                self.dying.remove(p)
                if any(p in procs for procs in self.terminated.values()):
                    self.dirty = True  # a deleted pod's container is gone: record it terminated
            elif not hasattr(p, "_nm_killed_at"):
                p._nm_killed_at = time.monotonic()  # type: ignore[attr-defined]
            elif time.monotonic() - p._nm_killed_at > getattr(p, "_nm_grace", 3.0):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)

    def supervise(self) -> None:
        now = time.monotonic()
        for c in self.containers.values():
            if c.proc is not None:
                code = c.proc.poll()
                if code is None:
                    continue
                ran = now - c.started_at
                c.last_terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                     "startedAt": c.started_wall, "finishedAt": now_rfc3339()}
                c.proc = None
                c.ready = False
                self.dirty = True
                if c.init_index >= 0 and code == 0:
                    c.completed = True
                    log.info("event=init_completed key=%s", c.key)
                    continue
                delay = c.backoff.delay(c.restarts if ran < BACKOFF_RESET_AFTER else 0)
                c.next_start = now + delay
                log.info("event=container_exited key=%s code=%s restart_in=%.1fs", c.key, code, delay)
            elif now >= c.next_start and not c.completed and self._may_start(c):
                if c.last_terminated:
                    c.restarts += 1
                self._start(c)

    def _may_start(self, c: Container) -> bool:
        """Init containers run one at a time, in order; the others wait for all of them."""
        if not c.pod_uid:
            return True
        for key in self.pod_keys.get(c.pod_uid, ()):
            other = self.containers.get(key)
            if other is None or other.init_index < 0:
                continue
            if c.init_index >= 0 and other.init_index >= c.init_index:
                continue
            if not other.completed:
                return False
        return True

    def schedule_probes(self) -> None:
        now = time.monotonic()
        for c in self.containers.values():
            if c.proc is None or c.probe is None or c.probing or now < c.next_probe:
                continue
            c.probing = True
            asyncio.get_running_loop().create_task(self._probe(c))

    async def _probe(self, c: Container) -> None:
        assert c.probe is not None
        try:
            if c.probe.kind == "exec":
                ok = await run_exec_probe(c.netns, c.env, c.cwd, c.probe)
            else:
                ok = await run_probe(c.probe_netns, c.probe_ip, c.probe)
        finally:
            c.probing = False
        if c.proc is None:
            return
        if ok:
            c.failures = 0
            if not c.ready:
                log.info("event=ready key=%s", c.key)
                c.ready = True
                self.dirty = True
        else:
            c.failures += 1
            if c.ready and c.failures >= c.probe.failure_threshold:
                log.info("event=not_ready key=%s", c.key)
                c.ready = False
                self.dirty = True
        c.next_probe = time.monotonic() + (c.probe.period if c.ready else NOT_READY_PROBE_INTERVAL)

    # ----------------------------------------------------------------------------- status
    def pod_status(self, pod: dict[str, Any]) -> dict[str, Any]:
        status = dict(pod["status"])
        uid = pod["metadata"]["uid"]
        if uid in self.terminated:
            return self._terminating_status(status, self.terminated[uid])
        self._publish_delayed_ip(pod, status)
        old_conditions = {c["type"]: c for c in status.get("conditions", [])}
        statuses = []
        any_started = False
        all_ready = True
        for cs in status.get("containerStatuses", []):
            c = self.containers.get(f"pod/{pod['metadata']['uid']}/{cs['name']}")
            if c is None:
                statuses.append(cs)
                all_ready = False
                continue
            new = {"name": cs["name"], "image": cs.get("image", ""), "imageID": "", "ready": c.ready,
                   "started": c.proc is not None, "restartCount": c.restarts, "state": c.state(),
                   "lastState": {"terminated": c.last_terminated} if c.last_terminated else {}}
            if c.proc is not None:
                new["containerID"] = f"sandbox://{c.proc.pid}"
                any_started = True
            all_ready = all_ready and c.ready
            statuses.append(new)
        status["containerStatuses"] = statuses
        if not status.get("podIP") and objects.pod_ip(pod):
            all_ready = False  # its status write lags (STATUS_DELAY_ANNOTATION): Ready comes with the IP
        initialized = True
        if status.get("initContainerStatuses"):
            inits = []
            for cs in status["initContainerStatuses"]:
                c = self.containers.get(f"pod/{pod['metadata']['uid']}/init/{cs['name']}")
                if c is None:
                    inits.append(cs)
                    initialized = False
                    continue
                initialized = initialized and c.completed
                inits.append({"name": cs["name"], "image": cs.get("image", ""), "imageID": "",
                              "ready": c.completed, "started": c.proc is not None, "restartCount": c.restarts,
                              "state": c.state(),
                              "lastState": {"terminated": c.last_terminated}
                              if c.last_terminated and not c.completed else {}})
            status["initContainerStatuses"] = inits
        if any_started or status.get("phase") == "Running":
            status["phase"] = "Running"
            status.setdefault("startTime", now_rfc3339())

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            text = "True" if ok else "False"
            prev = old_conditions.get(kind)
            if prev is not None and prev["status"] == text:
                return prev
            return {"type": kind, "status": text, "lastTransitionTime": now_rfc3339()}

        status["conditions"] = [
            cond("PodScheduled", True), cond("Initialized", initialized),
            cond("ContainersReady", all_ready), cond("Ready", all_ready),
        ]
        return status

    @staticmethod
    def _terminating_status(status: dict[str, Any], procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
        """A deleted pod's containers were stopped: not ready; terminated once every process exited."""
        status["conditions"] = [dict(c, status="False") if c["type"] in ("Ready", "ContainersReady") else c
                                for c in status.get("conditions", [])]
        if all(p.poll() is not None for p in procs):
            status["containerStatuses"] = [
                cs if "terminated" in (cs.get("state") or {}) else
                {**cs, "ready": False, "started": False,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": now_rfc3339()}}}
                for cs in status.get("containerStatuses", [])]
        else:
            status["containerStatuses"] = [{**cs, "ready": False} for cs in status.get("containerStatuses", [])]
        return status

    def _publish_delayed_ip(self, pod: dict[str, Any], status: dict[str, Any]) -> None:
        """A pod whose status write lags (objects.STATUS_DELAY_ANNOTATION): its IP goes into the
        status once a container has run that long."""
        annotations = pod["metadata"].get("annotations") or {}
        ip = annotations.get(objects.ASSIGNED_IP_ANNOTATION)
        if not ip or status.get("podIP"):
            return
        delay = float(annotations.get(objects.STATUS_DELAY_ANNOTATION, "0") or 0)
        started = [c.started_at for key in self.pod_keys.get(pod["metadata"]["uid"], [])
                   if (c := self.containers.get(key)) is not None and c.proc is not None]
        if started and time.monotonic() - min(started) >= delay:
            status["podIP"], status["podIPs"] = ip, [{"ip": ip}]
        else:
            self.dirty = True  # look again next tick

    def write_status(self) -> None:
        with self.state.objects_txn() as objs:
            foreign_change = objs.data.resource_version != self.loaded_rv
            for pod in objs.list("Pod"):
                new_status = self.pod_status(pod)
                if new_status != pod["status"]:
                    objs.put({**pod, "status": new_status})
            replaced = self._finish_replacements(objs)
            objects.derive(objs)
            # network before commit: once a pod reads Ready, its ClusterIP and DNS already work
            self.sync_network(objs.data.items)
            own_rv = objs.data.resource_version
        if not foreign_change and not replaced:
            # Only our own write is marked seen: an `apply` (objects) or a node process change
            # (sandbox.json) that landed since the last reload must still trigger one.
            self.loaded_rv = own_rv
            self.seen_mtimes = (self._mtimes()[0], self.seen_mtimes[1])
        self._write_runtime()

    @staticmethod
    def _finish_replacements(objs: objects.Objects) -> bool:
        """DaemonSet rolling update with surge: delete an old pod once the pod replacing it on its
        node is Ready (its containers are then stopped, with the pod's grace, by the next reload)."""
        changed = False
        for pod in objs.list("Pod"):
            successor = (pod["metadata"].get("annotations") or {}).get(REPLACED_BY)
            if not successor:
                continue
            ns = pod["metadata"]["namespace"]
            new = objs.get("Pod", ns, successor)
            if new is not None and objects.pod_ready(new):
                objs.delete("Pod", ns, pod["metadata"]["name"])
                log.info("event=pod_replaced old=%s/%s new=%s", ns, pod["metadata"]["name"], successor)
                changed = True
            elif new is None:  # the replacement went away (a newer apply): this one stays
                annotations = {k: v for k, v in pod["metadata"]["annotations"].items() if k != REPLACED_BY}
                objs.put({**pod, "metadata": {**pod["metadata"], "annotations": annotations}})
        return changed

    def sync_network(self, items: list[dict[str, Any]]) -> None:
        infra = self.state.infra()
        services = [o for o in items if o["kind"] == "Service"]
        slices = [o for o in items if o["kind"] == "EndpointSlice"]
        ports = kubeproxy.service_ports(services, slices)
        for node in infra.get("nodes", []):
            backend = node.get("iptables") or "nft"
            previous = self.applied_rules.get(node["netns"])
            if previous is None:  # first sync of this kubelet: learn the chains a previous one left
                saved = subprocess.run(["ip", "netns", "exec", node["netns"], f"iptables-{backend}-save", "-t", "nat"],
                                       capture_output=True, text=True, check=False)
                previous = saved.stdout if saved.returncode == 0 else ""
            plan = kubeproxy.render(ports, kubeproxy.chains_of(previous))
            if plan == previous:
                continue
            res = subprocess.run(["ip", "netns", "exec", node["netns"], f"iptables-{backend}-restore", "--noflush"],
                                 input=plan.encode(), capture_output=True, check=False)
            if res.returncode != 0:
                log.error("event=kube_proxy_sync_failed node=%s err=%s", node["name"],
                          res.stderr.decode().strip().replace("\n", " | "))
                continue
            # remember the chains we declared, minus the ones this plan deleted
            self.applied_rules[node["netns"]] = kubeproxy.render(ports)
        # hostNetwork pods (dnsPolicy ClusterFirstWithHostNet) resolve Service names in the node's netns.
        for node in infra.get("nodes", []):
            text = kubeproxy.render_hosts("", node["name"], node["ip"], services)
            if self.applied_hosts.get(node["netns"]) != text:
                write_etc_netns(node["netns"], text, kubeproxy.render_resolv("default"))
                self.applied_hosts[node["netns"]] = text
        for pod in (o for o in items if o["kind"] == "Pod"):
            if pod["spec"].get("hostNetwork"):
                continue
            ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
            pns = naming.pod_netns(self.cluster, ns, name)
            text = kubeproxy.render_hosts(ns, name, pod["status"].get("podIP", ""), services)
            if self.applied_hosts.get(pns) != text:
                write_etc_netns(pns, text, kubeproxy.render_resolv(ns))
                self.applied_hosts[pns] = text

    def _write_runtime(self) -> None:
        pids = {k: c.proc.pid for k, c in self.containers.items() if c.proc is not None}
        restarts = {k: c.restarts for k, c in self.containers.items()}
        write_json_atomic(self.state.runtime_file, {"kubelet": os.getpid(), "pids": pids, "restarts": restarts,
                                                    "node_boots": self.boots})

    # ----------------------------------------------------------------------------- loop
    async def run(self) -> None:
        self._kill_leftovers()
        problem = cgroups.ensure_mounts()
        if problem:
            log.warning("event=pod_cgroups_unavailable reason=%r effect=no_ebpf_capture", problem)
        self.boots = dict(self.state.infra().get("node_boots") or {})  # restarts asked before we ran
        while not self.stopping:
            mt = self._mtimes()
            if mt != self.seen_mtimes or (self.next_reload_at and time.time() >= self.next_reload_at):
                self.seen_mtimes = mt
                self.reload()
            # network first: a pod's hosts file exists before its process starts
            if self.dirty:
                self.dirty = False
                self.write_status()
            self.supervise()
            self.schedule_probes()
            self._reap_dying()
            if self.dirty:
                self.dirty = False
                self.write_status()
            await asyncio.sleep(TICK)
        self.shutdown()

    def _kill_leftovers(self) -> None:
        """A restarted kubelet starts every container afresh: stop what a previous one left."""
        from nodemesh.sandbox.netlink import list_cluster_netns, netns_inode

        inodes = {i for n in list_cluster_netns(self.cluster) if (i := netns_inode(n)) is not None}
        pids = [p for p in pids_in_netns(inodes) if p != os.getpid()]
        if pids:
            log.info("event=kill_leftovers pids=%s", pids)
            kill_all(pids, grace=1.0)

    def shutdown(self) -> None:
        pids = [c.proc.pid for c in self.containers.values() if c.proc is not None]
        pids += [p.pid for p in self.dying if p.poll() is None]
        kill_all(pids, grace=2.0)


def _write_config_map(vol: Any, namespace: str, objs: Any) -> None:
    """A configMap volume's files from the ConfigMap (none while it is missing: `optional`); each
    written by rename when it changed, so a reader never sees half a file."""
    cm = next((o for o in objs.of_kind("ConfigMap") if o["metadata"]["name"] == vol.spec["name"]
               and o["metadata"].get("namespace") == namespace), None)
    for key, text in ((cm or {}).get("data") or {}).items():
        path = vol.host_path / key
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == text:
                continue
        tmp = path.with_name(f".{key}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


def _stop_due(pod: dict[str, Any]) -> bool | float:
    """True once deletion began and the pod's preStop wait (objects.STOP_AT_ANNOTATION) is over;
    the time it will be over (epoch s) while waiting; False when the pod is not being deleted."""
    meta = pod["metadata"]
    if not meta.get("deletionTimestamp"):
        return False
    stop_at = float((meta.get("annotations") or {}).get(objects.STOP_AT_ANNOTATION) or 0)
    return True if time.time() >= stop_at else stop_at


def renumber_pods(cluster: str, state: ClusterState, node_name: str) -> None:
    """New IPs (and fresh netns) for a node's pods on the pod network, after a node restart."""
    from nodemesh.sandbox import netlink
    from nodemesh.sandbox.addressing import AddressPlan, allocate

    infra = state.infra()
    node = netlink.NodeInfo.from_json(next(n for n in infra["nodes"] if n["name"] == node_name))
    plan = AddressPlan(int(infra["index"]))
    with state.objects_txn() as objs:
        here = [p for p in objs.list("Pod") if p["spec"]["nodeName"] == node_name]
        used = {str(p["status"].get("podIP")) for p in here}  # old IPs too: a new one differs
        for pod in here:
            if pod["spec"].get("hostNetwork"):
                continue
            ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
            netlink.detach_pod(cluster, node, ns, name)
            ip = allocate(plan.pod_ip_candidates(node.index), used)
            used.add(ip)
            netlink.attach_pod(cluster, plan, node, ns, name, ip)
            objs.put({**pod, "status": {**pod["status"], "podIP": ip, "podIPs": [{"ip": ip}]}})
            log.info("event=pod_renumbered pod=%s/%s old=%s new=%s", ns, name, pod["status"].get("podIP"), ip)
        objects.derive(objs)


def _api_server_url(services: list[dict[str, Any]]) -> str:
    for svc in services:
        if (svc["metadata"].get("namespace"), svc["metadata"]["name"]) == KUBERNETES_SERVICE:
            port = svc["spec"]["ports"][0]["port"]
            return f"http://{svc['spec']['clusterIP']}:{port}"
    return ""


def write_etc_netns(pns: str, hosts: str, resolv: str) -> None:
    """Write /etc/netns/<pns>/{hosts,resolv.conf} in place: `ip netns exec` bind-mounts these
    files, and a running process keeps the inode, so a rename would hide updates from it."""
    d = Path("/etc/netns") / pns
    d.mkdir(parents=True, exist_ok=True)
    for fname, text in (("hosts", hosts), ("resolv.conf", resolv)):
        with open(d / fname, "a+") as f:
            f.seek(0)
            if f.read() != text:
                f.seek(0)
                f.truncate()
                f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nodemesh-sandbox-kubelet")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--state-root", default=str(DEFAULT_STATE_ROOT))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--renumber-node", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.renumber_node:  # run by the kubelet itself at a node restart (see Kubelet.restart_node)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        renumber_pods(args.cluster, ClusterState(Path(args.state_root) / args.cluster), args.renumber_node)
        return
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)  # the kubelet's log file is its own; events there help debugging
    state = ClusterState(Path(args.state_root) / naming.check_cluster_name(args.cluster))
    kubelet = Kubelet(args.cluster, state)
    loop = asyncio.new_event_loop()

    def stop() -> None:
        kubelet.stopping = True

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    try:
        loop.run_until_complete(kubelet.run())
    finally:
        loop.close()


if __name__ == "__main__":
    main()
