"""The channel a synchronous client opens to the controller's gRPC API (the CLI, the installer).

One place for how a client reaches the controller: TLS verified with the controller's CA when
there is one (the bearer token then travels encrypted), plaintext otherwise, with the channel
options the controller expects (api/model.py). The agent's link is asynchronous (agent/report.py).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from nodemesh.api.model import GRPC_CHANNEL_OPTIONS


def controller_channel(address: str, ca: str | Path | None) -> grpc.Channel:
    """A channel to `address`; an unreadable `ca` raises OSError (the caller says it its way)."""
    if ca is None:
        return grpc.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS)
    roots = Path(ca).read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots),
                               options=GRPC_CHANNEL_OPTIONS)
