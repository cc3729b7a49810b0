"""The iptables backend choice (redirector/backend.py): a table over what each backend holds, and
what the probe runs — never a legacy read with `-t`, never a legacy read at all when no legacy table
exists (reading one creates it). Real namespaces: tests/integration/redirector/
test_redirector_backend_isolation.py."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from nodemesh.redirector.backend import Ruleset, choose, detect_backend, detect_eb_backend

KUBE = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n"
CANARY = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"
RULES3 = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -j ACCEPT\n-A INPUT -j ACCEPT\nCOMMIT\n"
RULES1 = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n"
EMPTY_TABLE = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"


def rs(text: str | None) -> Ruleset:
    return Ruleset.parse(1, "") if text is None else Ruleset.parse(0, text)


@pytest.mark.parametrize(("nft", "legacy", "default", "want"), [
    (KUBE, "", "nft", "nft"),
    ("", KUBE, "nft", "legacy"),
    (RULES3, KUBE, "nft", "legacy"),          # kube-proxy's chains beat a larger unrelated ruleset
    (KUBE, RULES3, "legacy", "nft"),
    ("", CANARY, "nft", "legacy"),            # kubelet's canary alone says where the node's iptables is
    (RULES1, RULES3, "nft", "legacy"),        # no KUBE-* anywhere: more rules wins
    (RULES3, RULES1, "legacy", "nft"),
    ("", EMPTY_TABLE, "nft", "nft"),          # an empty legacy table (e.g. left by a reader) is no vote
    ("", "", "nft", "nft"),                   # nothing anywhere: what `iptables` points to
    ("", "", "legacy", "legacy"),
    (None, "", "nft", "legacy"),              # nft cannot be read (no nf_tables): the other one
    (None, RULES1, "nft", "legacy"),
])
def test_redirector_backend_choice(nft: str | None, legacy: str | None, default: str, want: str) -> None:
    assert choose(rs(nft), rs(legacy), default) == want  # type: ignore[arg-type]


class FakeNode:
    """Answers the probe's commands from canned state; records every command."""

    def __init__(self, nft: str, legacy_names: str, legacy: str = "") -> None:
        self.nft, self.legacy_names, self.legacy = nft, legacy_names, legacy
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(argv))
        if argv[0] == "cat":
            return (0, self.legacy_names) if argv[1].endswith("/ip_tables_names") else (0, "")
        if argv[0] == "iptables-nft-save":
            return 0, self.nft
        if argv[0] == "iptables-legacy-save":
            return 0, self.legacy
        if argv[0] == "ebtables-legacy":
            return 255, ""
        raise AssertionError(f"unexpected command {argv}")


def test_redirector_backend_probe_never_reads_a_missing_legacy_table() -> None:
    node = FakeNode(KUBE, legacy_names="")
    assert detect_backend(run=node) == "nft"
    assert [c[0] for c in node.calls] == ["iptables-nft-save", "cat", "cat"]


def test_redirector_backend_probe_reads_existing_legacy_tables_without_t() -> None:
    node = FakeNode("", legacy_names="nat\nmangle\n", legacy=KUBE)
    assert detect_backend(run=node) == "legacy"
    legacy = [c for c in node.calls if c[0].startswith("iptables-legacy")]
    assert legacy == [["iptables-legacy-save"]]   # no -t: dumps only tables that exist


def test_redirector_eb_backend_follows_iptables_where_the_kernel_can() -> None:
    node = FakeNode("", "")
    assert detect_eb_backend("nft", run=node) == "nft" and node.calls == []
    assert detect_eb_backend("legacy", run=node) == "nft"       # this kernel: no legacy ebtables
    assert detect_eb_backend("legacy", run=lambda argv: (0, "")) == "legacy"
