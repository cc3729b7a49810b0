"""The channel a synchronous client opens to the controller's gRPC API (the CLI, the installer).

One place for how a client reaches the controller: TLS verified with the controller's CA when
there is one (the bearer token then travels encrypted), plaintext otherwise, with the channel
options the controller expects (api/model.py). The agent's link is asynchronous (agent/report.py).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from nodemesh.api.model import GRPC_CHANNEL_OPTIONS


def controller_channel(address: str, ca: str | Path | None, server_name: str | None = None,
                       roots: bytes | None = None) -> grpc.Channel:
    """A channel to `address`; an unreadable `ca` raises OSError (the caller says it its way).
    `roots` (PEM) instead of a file: the CA read from the cluster (cli/client.py). `server_name`:
    the name the certificate must carry when `address` is not it (a port-forward on 127.0.0.1
    verifies the controller under its Service's name)."""
    if ca is None and roots is None:
        return grpc.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
    if roots is None:
        roots = Path(str(ca)).read_bytes()
    options = [*GRPC_CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", server_name)] if server_name else [])]
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
