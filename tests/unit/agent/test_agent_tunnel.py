"""The mTLS tunnel's pieces without sockets (agent/tunnel.py): the CONNECT head, the sans-IO TLS
server against a real OpenSSL client (bytes pumped between memory BIOs), and the receiving side's
check that a client certificate names the pod owning the source address — a spoofed address or a
certificate of another workload is refused, a certificate from another CA fails the handshake."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from nodemesh.agent.certs import CertReader, peer_identity
from nodemesh.agent.podindex import PodIndex
from nodemesh.agent.tunnel import TlsServer, Tunnel, connect_head, parse_head
from nodemesh.api.gen import nodemesh_pb2 as pb
from nodemesh.controlplane.ca import FileRootStore, WorkloadCA
from workload_certs import issue

CLIENT_IP, WEB_IP = "10.244.1.5", "10.244.2.7"


def test_agent_tunnel_connect_head() -> None:
    head = connect_head(("10.244.2.7", 8080))
    assert head == b"CONNECT 10.244.2.7:8080 HTTP/1.1\r\n\r\n"
    assert parse_head(head + b"GET / HTTP/1.1\r\n") == (("10.244.2.7", 8080), b"GET / HTTP/1.1\r\n", "")
    assert parse_head(head[:10]) == (None, b"", "")  # more bytes needed
    assert parse_head(b"GET / HTTP/1.1\r\n\r\n")[2] == "not a CONNECT head"
    assert parse_head(b"CONNECT x:y HTTP/1.1\r\n\r\n")[2] == "bad CONNECT target"
    assert parse_head(b"A" * 2000)[2] == "tunnel head too long"


def handshake(client_ctx: ssl.SSLContext, server: TlsServer) -> ssl.SSLObject:
    """Pump a real OpenSSL client against the sans-IO server until both are done."""
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(cin, cout, server_hostname="tunnel.nodemesh.invalid")
    for _ in range(10):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        plain, closed = server.receive(cout.read())
        assert plain == b"" and not closed
        cin.write(server.output())
        if done and server.handshaken:
            return client
    raise AssertionError("handshake did not finish")


def index(this_node: str = "node2") -> PodIndex:
    idx = PodIndex(this_node)
    snap = pb.IdentitySnapshot(resource_version="1")
    for name, ip, node, sa in (("client", CLIENT_IP, "node1", "client"), ("web", WEB_IP, "node2", "web")):
        snap.pods.append(pb.Pod(ip=ip, ips=[ip], namespace="ns", name=f"{name}-1", node=node, uid=f"uid-{name}",
                                ready=True, service_account=sa,
                                owner=pb.Resource(namespace="ns", type="deployment", name=name)))
    idx.update(snap)
    return idx


def test_agent_tunnel_tls_server_and_client_check(tmp_path: Path) -> None:
    ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test")
    issue(ca, tmp_path / "n2", "uid-web", "web")
    issue(ca, tmp_path / "n1", "uid-client", "client")
    issue(ca, tmp_path / "n1", "uid-web-stolen", "web")  # a valid certificate, of another workload
    server_ctx = CertReader(tmp_path / "n2").context("uid-web", server=True)
    tunnel = Tunnel(index(), CertReader(tmp_path / "n2"))

    server = TlsServer(server_ctx)  # type: ignore[arg-type]
    client = handshake(CertReader(tmp_path / "n1").context("uid-client", server=False), server)  # type: ignore[arg-type]
    assert peer_identity(client) == "spiffe://mesh.test/ns/ns/sa/web"
    client_id = peer_identity(server.obj)
    assert client_id == "spiffe://mesh.test/ns/ns/sa/client"
    # The pod behind the source address is `client`: accepted from its address only.
    assert tunnel.verify_client(client_id, (CLIENT_IP, 40000))
    assert not tunnel.verify_client(client_id, (WEB_IP, 40000))         # someone else's address
    assert not tunnel.verify_client(client_id, ("10.244.9.9", 40000))   # nobody's address

    # A certificate of workload `web` presented from the client pod's address: refused.
    stolen = TlsServer(server_ctx)  # type: ignore[arg-type]
    handshake(CertReader(tmp_path / "n1").context("uid-web-stolen", server=False), stolen)  # type: ignore[arg-type]
    assert not tunnel.verify_client(peer_identity(stolen.obj), (CLIENT_IP, 40000))

    # A leaf from another CA: the handshake fails on the server (no certificate it trusts).
    other = WorkloadCA(FileRootStore(tmp_path / "other"), "mesh.test")
    issue(other, tmp_path / "x", "uid-client", "client")
    (tmp_path / "x" / "trust-bundle.pem").write_bytes(ca.bundle_pem())  # it trusts our server
    with pytest.raises(ssl.SSLError):
        handshake(CertReader(tmp_path / "x").context("uid-client", server=False), TlsServer(server_ctx))  # type: ignore[arg-type]


def test_agent_tunnel_tls_server_relays_both_ways(tmp_path: Path) -> None:
    ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test")
    issue(ca, tmp_path / "n", "s", "web")
    issue(ca, tmp_path / "n", "c", "client")
    server = TlsServer(CertReader(tmp_path / "n").context("s", server=True))  # type: ignore[arg-type]
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = CertReader(tmp_path / "n").context("c", server=False).wrap_bio(  # type: ignore[union-attr]
        cin, cout, server_hostname="tunnel.nodemesh.invalid")
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            server.receive(cout.read())
            cin.write(server.output())
    server.receive(cout.read())  # the client's Finished
    cin.write(server.output())   # session tickets
    client.write(b"request bytes")
    plain, closed = server.receive(cout.read())
    assert (plain, closed) == (b"request bytes", False)
    cin.write(server.send(b"response bytes"))
    assert client.read(100) == b"response bytes"
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()  # sends close_notify, waits for the server's
    plain, closed = server.receive(cout.read())
    assert (plain, closed) == (b"", True)


def test_agent_tunnel_close_notify_is_a_half_close(tmp_path: Path) -> None:
    """Both ends sans-IO (TlsSession, as the two agents run them): the client's shut() (its
    close_notify) reaches the server as the end of the client's stream, and the server still
    sends its whole answer, which the client still reads; then the server's close_notify ends it.
    Writing after one's own shut() sends nothing."""
    from nodemesh.agent.tunnel import TUNNEL_SNI, TlsSession

    ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test")
    issue(ca, tmp_path / "n2", "uid-web", "web")
    issue(ca, tmp_path / "n1", "uid-client", "client")
    server = TlsSession(CertReader(tmp_path / "n2").context("uid-web", server=True))  # type: ignore[arg-type]
    client = TlsSession(CertReader(tmp_path / "n1").context("uid-client", server=False),  # type: ignore[arg-type]
                        server_side=False, server_hostname=TUNNEL_SNI)
    to_server = client.start()
    for _ in range(10):
        _, closed = server.receive(to_server)
        assert not closed
        plain, closed = client.receive(server.output())
        assert plain == b"" and not closed
        to_server = client.output()
        if client.handshaken and server.handshaken and not to_server:
            break
    assert client.handshaken and server.handshaken
    assert peer_identity(client.obj) == "spiffe://mesh.test/ns/ns/sa/web"

    to_server = client.send(b"request") + client.shut()
    plain, closed = server.receive(to_server)
    assert (plain, closed) == (b"request", True)
    answer = b"x" * 100_000  # several records
    plain, closed = client.receive(server.send(answer))
    assert (plain, closed) == (answer, False)
    plain, closed = client.receive(server.shut())
    assert (plain, closed) == (b"", True)
    assert client.shut() == b""  # idempotent: its close_notify went already


def test_agent_tunnel_resumes_a_session_per_pod_pair(tmp_path: Path) -> None:
    """The source agent's next tunnel between the same two pods resumes the session the far side
    issued a ticket for: a resumed handshake, and both sides still see the identities verified at
    the full one. A renewed client certificate (a new context) or an expired entry: no resumption."""
    from nodemesh.agent.tunnel import SESSION_TTL_S, TUNNEL_SNI, TlsSession

    ca = WorkloadCA(FileRootStore(tmp_path / "ca"), "mesh.test")
    issue(ca, tmp_path / "n2", "uid-web", "web")
    issue(ca, tmp_path / "n1", "uid-client", "client")
    (tmp_path / "n1" / "uid-web.crt").symlink_to(tmp_path / "n2" / "uid-web.crt")  # the index needs no key here
    now = [1000.0]
    tunnel = Tunnel(index("node1"), CertReader(tmp_path / "n1"), clock=lambda: now[0])
    server_ctx = CertReader(tmp_path / "n2").context("uid-web", server=True)

    def connect() -> tuple[TlsSession, TlsSession]:
        plan = tunnel.plan((CLIENT_IP, 40000), (WEB_IP, 8080))
        assert plan is not None
        planned.append(plan.server_id)
        client = TlsSession(plan.context, server_side=False, server_hostname=TUNNEL_SNI, session=plan.session)
        server = TlsSession(server_ctx)  # type: ignore[arg-type]
        out = client.start()
        while not (client.handshaken and server.handshaken) or out:
            server.receive(out)
            client.receive(server.output())
            out = client.output()
        assert tunnel.check_server(client.obj, plan) == "spiffe://mesh.test/ns/ns/sa/web"
        assert peer_identity(server.obj) == "spiffe://mesh.test/ns/ns/sa/client"
        client.receive(server.send(b"first answer"))  # its tickets ride along
        tunnel.keep_session(plan, client.obj.session)
        return client, server

    planned: list[str] = []
    first, _ = connect()
    assert not first.obj.session_reused
    second, server = connect()
    assert second.obj.session_reused and server.obj.session_reused
    # The connection's labels name the server before its handshake: the default trust domain until
    # one was verified, then the mesh's (learned from the first handshake).
    assert planned == ["spiffe://cluster.local/ns/ns/sa/web", "spiffe://mesh.test/ns/ns/sa/web"]
    assert tunnel.plan((CLIENT_IP, 40000), (WEB_IP, 8080)).session is not None  # type: ignore[union-attr]
    now[0] += SESSION_TTL_S + 1
    assert tunnel.plan((CLIENT_IP, 40000), (WEB_IP, 8080)).session is None  # type: ignore[union-attr]
    connect()
    issue(ca, tmp_path / "n1", "uid-client", "client")  # renewed: CertReader makes a new context
    os.utime(tmp_path / "n1" / "uid-client.crt", ns=(1, 1))
    assert tunnel.plan((CLIENT_IP, 40000), (WEB_IP, 8080)).session is None  # type: ignore[union-attr]
