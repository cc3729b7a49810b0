"""Both sides of a relayed connection probe a silent peer (agent/sockets.py keepalive).

Without it a client that vanished without a FIN or RST (a deleted pod's veth, a lost close) held the
agent's two sockets and the server's connection for as long as nobody wrote. Accepted sockets inherit
the listener's settings (no call per connection); upstream sockets get them when created.
"""

from __future__ import annotations

import socket

from nodemesh.agent.sockets import (
    KEEPALIVE_CNT,
    KEEPALIVE_IDLE_S,
    KEEPALIVE_INTVL_S,
    listen_socket,
    upstream_socket,
)


def keepalive(sock: socket.socket) -> tuple[int, int, int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT))


def test_agent_accepted_and_upstream_sockets_keep_alive() -> None:
    want = (1, KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT)
    assert KEEPALIVE_IDLE_S + KEEPALIVE_INTVL_S * KEEPALIVE_CNT <= 30  # a dead peer found within half a minute
    listener = listen_socket("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname())
    listener.setblocking(True)
    accepted, _ = listener.accept()
    up, _ = upstream_socket(None)
    try:
        assert keepalive(accepted) == want      # inherited from the listener
        assert keepalive(up) == want
        assert keepalive(client)[0] == 0         # (a plain socket does not: the setting is ours)
    finally:
        for s in (listener, client, accepted, up):
            s.close()
