"""emojivoto, re-implemented in Python and wire-compatible with BuoyantIO/emojivoto.

Four programs, each `python -m nodemesh.demo.emojivoto.<name>`: `web` (HTTP/1.1 front end),
`emoji` (EmojiService over gRPC), `voting` (VotingService over gRPC, VoteDoughnut fails by design)
and `votebot` (the load generator, which counts what it saw).
"""

import os as _os

# grpc's default c-ares resolver reads /etc/resolv.conf itself and ignores /etc/hosts and NSS, which
# breaks in the sandbox (names come from its hosts file) and surprises in clusters. grpc reads this
# when it initialises, so it is set here, before any module of the app imports grpc. setdefault: an
# operator's explicit choice wins.
_os.environ.setdefault("GRPC_DNS_RESOLVER", "native")
