"""Node-to-node mTLS (issue 13, item 2; `install --sandbox --mtls`): a marker sent cross-node never
crosses the underlay in clear.

A cluster of its own (the package's shared one runs without --mtls): `client` (ServiceAccount
`client`) on node1, `web` (ServiceAccount `web`, HTTP/1 server echoing the query's secret in a
Set-Cookie) on node2. Each agent holds its pods' workload certificates (agent/certs.py). An
AF_PACKET capture bound to node2's underlay interface (the node-to-node link, as tcpdump -i
would see it) records every TCP payload while the client sends requests carrying a marker in the
path and a header, to the pod IP and to the Service: the client gets every answer (with
the marker echoed back), the capture holds TLS records to port 15008 and no byte of the marker in
either direction — while a control marker sent to a server in a namespace the mesh does not
capture (kube-system, same node, same link) is in the capture in clear. `nodemesh tap` shows tls=true with the identities the agents verified from the
certificates: the client's on node2's inbound side, the server's on node1's outbound side.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodemesh.api.model import ADMIN_PORT
from nodemesh.manifests.sandbox_install import (
    CONTROLLER_PROCESS,
    agent_process,
    install_sandbox,
    uninstall_sandbox,
)
from nodemesh.sandbox.cluster import Sandbox
from nodemesh.sandbox.testing import TapStream, agent_admin_request, deployment, running_sandbox
from prometheus_client.parser import text_string_to_metric_families
from trust_harness import PEERS, PY

NS = "mt"
MARKER = "MARKER-7f3a91c2-plaintext"
CONTROL = "CONTROL-55be0d17-plaintext"

CLIENT = f"""
import http.client, json, sys
ok = failed = echoed = 0
for host in sys.argv[1:]:
    for i in range(20):
        try:
            c = http.client.HTTPConnection(host, 8080, timeout=3)
            c.request("GET", "/?secret={MARKER}-" + str(i), headers={{"X-Marker": "{MARKER}-header"}})
            r = c.getresponse()
            r.read()
            ok += r.status == 200
            echoed += "{MARKER}" in (r.getheader("Set-Cookie") or "")
            c.close()
        except OSError as exc:
            failed += 1
            print(repr(exc), file=sys.stderr)
print(json.dumps({{"ok": ok, "failed": failed, "echoed": echoed}}))
"""


def manifest() -> str:
    def deploy(name: str, node: str, argv: list[str], port: int | None, ns: str = NS) -> str:
        account = f"\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        return account + "---" + deployment(name, ns, argv, ports=[port] if port else [], node=node,
                                            service_account=name)
    return "---".join([
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n",
        deploy("web", "node2", [PY, PEERS, "http1-server", "8080"], 8080),
        (f"\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n"
         f"  selector: {{app: web}}\n  ports:\n  - {{port: 8080, targetPort: 8080}}\n"),
        deploy("client", "node1", ["sleep", "infinity"], None),
        # Server-first and half-close, on node2 (namespace mt requires mTLS: no plaintext path).
        deploy("halfclose", "node2", [PY, PEERS, "halfclose-server", "7000"], 7000),
        # The control: a server in a namespace the mesh does not capture (kube-system), on node2:
        # the client's requests to it cross the same link in plaintext, so the capture must see them.
        deploy("plain", "node2", [PY, PEERS, "http1-server", "8080"], 8080, ns="kube-system"),
        "\napiVersion: v1\nkind: Namespace\nmetadata: {name: mt2}\n",
        deploy("web2", "node2", [PY, PEERS, "http1-server", "8080"], 8080, ns="mt2"),
    ])


@pytest.fixture(scope="module")
def mtls_cluster() -> Iterator[Sandbox]:
    with running_sandbox(nodes=2, cni="bridge", manifests=[manifest()], timeout=90) as sb:
        # 8 s certificates: renewed every ~4 s, so the tests below run across several renewals.
        # Namespace mt requires mTLS (fail closed); mt2 does not.
        install_sandbox(sb.name, timeout=90, progress=lambda msg: None, mtls=True, cert_ttl_s=8.0,
                        mtls_required=(NS,))
        try:
            yield sb
        finally:
            with contextlib.suppress(Exception):
                uninstall_sandbox(sb.name)


def pod(sb: Sandbox, app: str) -> dict:
    (p,) = [p for p in sb.pods(NS) if p["metadata"]["labels"].get("app") == app]
    return p


def underlay_interface(sb: Sandbox, node: str) -> str:
    """The node's interface holding its InternalIP: its end of the node-to-node link."""
    out = sb.node_exec(node, ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f" {sb.node(node).ip}/" in line:
            return line.split()[1].split("@")[0]
    raise AssertionError(f"no interface with {sb.node(node).ip} on {node}: {out}")


def agent_logs(sb: Sandbox) -> str:
    return "\n".join(sb.node_process_log(n, agent_process(n)).read_text()[-3000:] for n in ("node1", "node2"))


def wait_for_certificates(sb: Sandbox, timeout: float = 30.0) -> None:
    state = Path(sb.state_dir)
    wanted = [(pod(sb, "client"), "node1"), (pod(sb, "web"), "node2")]
    deadline = time.monotonic() + timeout
    while not all((state / "certs" / node / f"{p['metadata']['uid']}.crt").exists() for p, node in wanted):
        assert time.monotonic() < deadline, "workload certificates not issued"
        time.sleep(0.2)


def test_trust_mtls_marker_never_crosses_the_underlay_in_clear(mtls_cluster: Sandbox, tmp_path: Path) -> None:
    sb = mtls_cluster
    wait_for_certificates(sb)
    web_ip = pod(sb, "web")["status"]["podIP"]
    (plain,) = [p for p in sb.pods("kube-system") if p["metadata"]["labels"].get("app") == "plain"]
    svc_ip = next(s for s in sb.objects().of_kind("Service")
                  if s["metadata"]["name"] == "web" and s["metadata"]["namespace"] == NS)["spec"]["clusterIP"]
    iface = underlay_interface(sb, "node2")
    out = tmp_path / "underlay.bin"
    cap = subprocess.Popen(["ip", "netns", "exec", sb.node("node2").netns, PY, PEERS, "capture", "12", "0",
                            str(out), iface], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        client_ns = sb.pod_netns(NS, pod(sb, "client")["metadata"]["name"])
        res = subprocess.run(["ip", "netns", "exec", client_ns, PY, "-c", CLIENT, web_ip, svc_ip],
                             capture_output=True, text=True, timeout=150, check=False)
        control = subprocess.run(["ip", "netns", "exec", client_ns, PY, "-c", CLIENT.replace(MARKER, CONTROL),
                                  plain["status"]["podIP"]], capture_output=True, text=True, timeout=150, check=False)
    finally:
        stdout, err = cap.communicate(timeout=60)
    assert res.returncode == 0, (res.stderr, agent_logs(sb))
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result == {"ok": 40, "failed": 0, "echoed": 40}, (result, res.stderr[-2000:], agent_logs(sb))
    assert cap.returncode == 0, err
    data = out.read_bytes()
    assert int(stdout.strip()) > 40 and len(data) > 5000, (stdout, len(data))  # the traffic was seen
    # The capture does see plaintext when there is some: the control's marker, sent to a pod the
    # mesh does not capture, is there.
    assert json.loads(control.stdout.strip().splitlines()[-1])["ok"] == 20, control.stderr[-1000:]
    assert CONTROL.encode() in data, "the capture missed the control's plaintext: it proves nothing"
    assert MARKER.encode() not in data, "the marker crossed the node-to-node link in clear"
    # No plaintext HTTP but the control's (the mesh's own links are TLS too: controller, tunnels).
    assert data.count(b"X-Marker") == data.count(CONTROL.encode() + b"-header")
    assert data.count(b"\x17\x03\x03") >= 40  # TLS application-data records
    log = sb.node_process_log("node2", agent_process("node2")).read_text()
    assert "event=mtls_refused" not in log, log[-3000:]
    # The agents count their tunnels on /metrics: node1 originated the client's connections to
    # web through tunnels, node2 terminated them; none refused.
    events = {n: tunnel_events(sb, n) for n in ("node1", "node2")}
    assert events["node1"].get(("originated", ""), 0) >= 1, events
    assert events["node2"].get(("terminated", ""), 0) >= events["node1"][("originated", "")], events
    assert not any(event == "refused" for event, _ in events["node2"]), events


def tunnel_events(sb: Sandbox, node: str) -> dict[tuple[str, str], float]:
    """nodemesh_tunnel_events_total on a node's agent, by (event, reason)."""
    url = f"http://{sb.node(node).ip}:{ADMIN_PORT}/metrics"
    with urllib.request.urlopen(agent_admin_request(sb.state_dir, url), timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nodemesh_tunnel_events_total":
                out[(sample.labels["event"], sample.labels["reason"])] = sample.value
    return out


def test_trust_mtls_tap_shows_the_verified_identities(mtls_cluster: Sandbox) -> None:
    """`nodemesh tap deploy/web`: the inbound side names the client's SPIFFE ID (from its
    certificate), the outbound side the server's; both say tls=true."""
    sb = mtls_cluster
    wait_for_certificates(sb)
    env = {k: v for k, v in os.environ.items() if k not in ("NODEMESH_CONTROLLER", "NODEMESH_TOKEN")}
    env["NODEMESH_SANDBOX"] = sb.name
    # A tap of a workload opens on the nodes running it: web's (inbound) on node2, client's
    # (outbound) on node1.
    taps = {app: TapStream([PY, "-m", "nodemesh", "tap", f"deploy/{app}", "-n", NS], env) for app in ("web", "client")}
    client_ns = sb.pod_netns(NS, pod(sb, "client")["metadata"]["name"])
    web_ip = pod(sb, "web")["status"]["podIP"]
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            subprocess.run(["ip", "netns", "exec", client_ns, PY, "-c", CLIENT, web_ip], capture_output=True,
                           text=True, timeout=60, check=False)
            if any("proxy=in " in x for x in taps["web"].snapshot()) \
                    and any("proxy=out" in x for x in taps["client"].snapshot()):
                break
    finally:
        stopped = {app: t.stop() for app, t in taps.items()}
    inbound = [x for x in taps["web"].snapshot() if "proxy=in " in x]
    outbound = [x for x in taps["client"].snapshot() if "proxy=out" in x]
    assert inbound and outbound, (stopped, taps["web"].snapshot()[:5], taps["client"].snapshot()[:5])
    assert all("tls=true client_id=spiffe://cluster.local/ns/mt/sa/client" in x for x in inbound), inbound[:5]
    assert all("tls=true server_id=spiffe://cluster.local/ns/mt/sa/web" in x for x in outbound), outbound[:5]


ROTATION_LOAD = r"""
import http.client, json, sys, time
ok = failed = 0
errors = []
end = time.monotonic() + float(sys.argv[2])
keep = http.client.HTTPConnection(sys.argv[1], 8080, timeout=5)
while time.monotonic() < end:
    for fresh in (True, False):
        try:
            c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=5) if fresh else keep
            c.request("GET", "/?secret=rotation")
            r = c.getresponse()
            r.read()
            ok += r.status == 200
            failed += r.status != 200
            if fresh:
                c.close()
        except OSError as exc:
            failed += 1
            errors.append(repr(exc))
    time.sleep(0.02)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""


def test_trust_mtls_certificate_and_root_rotation_under_load_fail_nothing(mtls_cluster: Sandbox) -> None:
    """Requests on new connections (a handshake each) and on one kept-alive tunnel, for 20 s,
    while the 8 s leaves renew (~4 s) and the controller's root is rotated (SIGHUP): 0 failures,
    and the leaves in use afterwards chain to the new root."""
    from cryptography import x509

    sb = mtls_cluster
    wait_for_certificates(sb)
    state = Path(sb.state_dir)
    web = pod(sb, "web")
    leaf = state / "certs" / "node2" / f"{web['metadata']['uid']}.crt"
    first_leaf = leaf.read_bytes()
    root_before = (state / "workload-ca" / "workload-ca.crt").read_bytes()
    client_ns = sb.pod_netns(NS, pod(sb, "client")["metadata"]["name"])
    load = subprocess.Popen(["ip", "netns", "exec", client_ns, PY, "-c", ROTATION_LOAD, web["status"]["podIP"], "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(6)
        pid = sb.node_process_pid(CONTROLLER_PROCESS)
        assert pid, "controller not running"
        os.kill(pid, signal.SIGHUP)  # rotate the workload root mid-load
        out, err = load.communicate(timeout=90)
    finally:
        if load.poll() is None:
            load.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["failed"] == 0 and result["ok"] > 100, (result, err[-1000:], agent_logs(sb))
    root_after = (state / "workload-ca" / "workload-ca.crt").read_bytes()
    assert root_after != root_before
    assert leaf.read_bytes() != first_leaf  # renewed during the load
    deadline = time.monotonic() + 15
    while x509.load_pem_x509_certificate(leaf.read_bytes()).issuer != \
            x509.load_pem_x509_certificate(root_after).subject:
        assert time.monotonic() < deadline, "leaf not moved to the new root"
        time.sleep(0.5)
    bundle = x509.load_pem_x509_certificates((state / "certs" / "node1" / "trust-bundle.pem").read_bytes())
    assert len(bundle) == 2  # old and new root, while old leaves may still be in use


HOST_GET = r"""
import http.client, json, sys
ok = failed = 0
for i in range(5):
    try:
        c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=3)
        c.request("GET", "/")
        ok += c.getresponse().status == 200
        c.close()
    except OSError:
        failed += 1
print(json.dumps({"ok": ok, "failed": failed}))
"""


def test_trust_mtls_required_namespace_refuses_plaintext_from_another_node(mtls_cluster: Sandbox) -> None:
    """Namespace `mt` requires mTLS: a process on node1 that is no pod (no certificate, never
    tunnelled) reaching `web` on node2 in plaintext is reset by node2's agent; the same to `web2`
    (namespace mt2, captured, not required) gets through — fail-open stays the default."""
    sb = mtls_cluster
    wait_for_certificates(sb)
    web_ip = pod(sb, "web")["status"]["podIP"]
    (web2,) = [p for p in sb.pods("mt2") if p["metadata"]["labels"].get("app") == "web2"]

    def from_node1(ip: str) -> dict:
        res = sb.node_exec("node1", [PY, "-c", HOST_GET, ip], capture_output=True, text=True, timeout=60)
        return json.loads(res.stdout.strip().splitlines()[-1])

    assert from_node1(web2["status"]["podIP"]) == {"ok": 5, "failed": 0}
    assert from_node1(web_ip) == {"ok": 0, "failed": 5}
    log = sb.node_process_log("node2", agent_process("node2")).read_text()
    assert "reason=plaintext_to_required" in log
    # ... while the meshed client pod, tunnelled, still reaches it.
    client_ns = sb.pod_netns(NS, pod(sb, "client")["metadata"]["name"])
    res = subprocess.run(["ip", "netns", "exec", client_ns, PY, "-c", HOST_GET, web_ip], capture_output=True,
                         text=True, timeout=60, check=False)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"ok": 5, "failed": 0}


def edges_json(sb: Sandbox, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("NODEMESH_CONTROLLER", "NODEMESH_TOKEN")}
    env["NODEMESH_SANDBOX"] = sb.name
    res = subprocess.run([PY, "-m", "nodemesh", "edges", *args, "-o", "json"], env=env, capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_trust_mtls_edges_show_identities_and_which_edges_are_secured(mtls_cluster: Sandbox) -> None:
    """`nodemesh edges deploy -n mt`: client -> web crossed nodes inside mTLS tunnels, so it is
    secured and names both identities the agents verified from certificates (the client's by
    node2's agent, the server's by node1's); client -> plain (kube-system, not captured, same
    link) went in plaintext: not secured, with the reason. The table says the same."""
    sb = mtls_cluster
    wait_for_certificates(sb)
    client_ns = sb.pod_netns(NS, pod(sb, "client")["metadata"]["name"])
    (plain,) = [p for p in sb.pods("kube-system") if p["metadata"]["labels"].get("app") == "plain"]
    deadline = time.monotonic() + 45
    while True:
        res = subprocess.run(["ip", "netns", "exec", client_ns, PY, "-c", CLIENT, pod(sb, "web")["status"]["podIP"],
                              plain["status"]["podIP"]], capture_output=True, text=True, timeout=90, check=False)
        assert json.loads(res.stdout.strip().splitlines()[-1])["ok"] == 40, res.stderr[-1000:]
        found = {(e["src"], e["dst"]): e for e in edges_json(sb, "deploy", "-n", NS)}
        if ("client", "web") in found and ("client", "plain") in found or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    web, plain_edge = found.get(("client", "web")), found.get(("client", "plain"))
    assert web is not None and plain_edge is not None, found
    assert web == {"src": "client", "src_namespace": NS, "dst": "web", "dst_namespace": NS, "secured": True,
                   "client_id": f"spiffe://cluster.local/ns/{NS}/sa/client",
                   "server_id": f"spiffe://cluster.local/ns/{NS}/sa/web", "no_tls_reason": ""}, web
    assert not plain_edge["secured"] and plain_edge["client_id"] == plain_edge["server_id"] == "", plain_edge
    assert plain_edge["no_tls_reason"].startswith("not mTLS"), plain_edge
    env = {k: v for k, v in os.environ.items() if k not in ("NODEMESH_CONTROLLER", "NODEMESH_TOKEN")}
    env["NODEMESH_SANDBOX"] = sb.name
    table = subprocess.run([PY, "-m", "nodemesh", "edges", "deploy", "-n", NS, "-o", "wide"], env=env,
                           capture_output=True, text=True, timeout=30, check=True).stdout
    rows = {tuple(line.split()[:2]): line.split() for line in table.splitlines()[1:]}
    assert rows[("client", "web")][4:7] == ["yes", f"spiffe://cluster.local/ns/{NS}/sa/client",
                                             f"spiffe://cluster.local/ns/{NS}/sa/web"], table
    assert rows[("client", "plain")][4] == "no", table


def test_trust_mtls_half_close_crosses_the_tunnel(mtls_cluster: Sandbox) -> None:
    """A server-first peer on node2 that answers only after the client's EOF: the client on node1
    reads the greeting, sends 100 kB, shuts down its write side, and reads the server's whole
    answer (digest of what it sent + 300 kB) to EOF, through the mTLS tunnel (namespace mt requires
    it: a plaintext connection would be refused). The tunnel carries each direction's end as
    TLS close_notify (agent/tunnel.py)."""
    sb = mtls_cluster
    wait_for_certificates(sb)
    client_ns = sb.pod_netns(NS, pod(sb, "client")["metadata"]["name"])
    ip = pod(sb, "halfclose")["status"]["podIP"]
    log_path = sb.node_process_log("node2", agent_process("node2"))
    before = len(log_path.read_text())
    res = subprocess.run(["ip", "netns", "exec", client_ns, PY, PEERS, "halfclose-client", ip, "7000", "10"],
                         capture_output=True, text=True, timeout=150, check=False)
    assert res.returncode == 0, (res.stderr[-2000:], agent_logs(sb))
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result == {"ok": 10, "problems": []}, (result, agent_logs(sb))
    assert "event=mtls_refused" not in log_path.read_text()[before:]


BURST = r"""
import http.client, json, sys, threading
ok = []
def one(i):
    try:
        c = http.client.HTTPConnection(sys.argv[1], 8080, timeout=5)
        c.request("GET", "/?secret=burst-" + str(i))
        r = c.getresponse()
        r.read()
        ok.append(r.status == 200)
        c.close()
    except OSError as exc:
        print(repr(exc), file=sys.stderr)
threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"ok": sum(ok), "failed": 20 - sum(ok)}))
"""


def test_trust_mtls_connections_of_one_pod_pair_share_one_carrier(mtls_cluster: Sandbox) -> None:
    """20 concurrent new connections from `client` to `web` (a request each) ride ONE multiplexed carrier
    (agent/mux.py): node1's agent counts 20 more tunnelled connections (`originated`) and exactly
    one more carrier, node2's one more carrier accepted and 20 more terminated. The 8 s leaves
    renew every ~4 s (client's and web's: a renewal every ~2 s) and a renewal moves new streams to
    a new carrier, so a burst that straddles one (2 carriers) or finds the last burst's carrier
    still current (0) is tried again."""
    sb = mtls_cluster
    wait_for_certificates(sb)
    client_ns = sb.pod_netns(NS, pod(sb, "client")["metadata"]["name"])
    web_ip = pod(sb, "web")["status"]["podIP"]
    def settled() -> dict[str, dict[tuple[str, str], float]]:
        """Both agents' counters once they stopped moving (workers report to the parent, which
        serves /metrics, every second or so)."""
        last = None
        for _ in range(20):
            now = {n: tunnel_events(sb, n) for n in ("node1", "node2")}
            if now == last:
                return now
            last = now
            time.sleep(1.2)
        raise AssertionError(f"tunnel counters never settled: {last}")

    seen = []
    for _ in range(6):
        before = settled()
        res = subprocess.run(["ip", "netns", "exec", client_ns, PY, "-c", BURST, web_ip], capture_output=True,
                             text=True, timeout=90, check=False)
        assert json.loads(res.stdout.strip().splitlines()[-1]) == {"ok": 20, "failed": 0}, res.stderr
        after = settled()

        got = tuple(after[node].get((event, ""), 0) - before[node].get((event, ""), 0)
                    for node, event in (("node1", "originated"), ("node1", "carrier_opened"),
                                        ("node2", "terminated"), ("node2", "carrier_accepted")))
        seen.append((*got, {f"{n}:{e}:{r}": after[n][(e, r)] - before[n].get((e, r), 0)
                            for n in after for (e, r) in after[n] if e.startswith("carrier")
                            and after[n][(e, r)] != before[n].get((e, r), 0)}))
        if got == (20, 1, 20, 1):
            return
        assert got[0] == got[2] == 20, seen   # every connection tunnelled, each a stream
        time.sleep(4.5)                       # a renewal will have passed: the next burst opens one
    logs = [line for n in ("node1", "node2")
            for line in sb.node_process_log(n, agent_process(n)).read_text().splitlines()
            if "event=carrier" in line]
    raise AssertionError(f"no burst of 20 on exactly one new carrier: {seen}\n" + "\n".join(logs[-60:]))
