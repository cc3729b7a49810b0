"""The image builds from the repository's Dockerfile on a machine without a compiler, and runs.

No Docker engine and no Docker Hub here, so the proof is built from what Debian itself ships:
`debootstrap --variant=minbase` of the Dockerfile's base suite (what `debian:bookworm-slim` is made
from) becomes the base image, and `buildah` (Debian's daemonless builder) builds the Dockerfile
unchanged on top of it, with `--pull-never`. The base has no compiler and the Dockerfile installs
every Python dependency with `--only-binary=:all:`, so a dependency without a wheel (python-iptables
once was one) fails the build instead of compiling. Then the built image's filesystem runs, in a
network namespace of its own: `nodemesh --version`, every entry point's `--help`, the redirector's
dry-run plan, and for real the controller, the agent (with its link to the controller) and the
redirector's fail-open runner, until `nodemesh check` inside the image says the node is captured.

Needs root, `debootstrap`, `buildah` (scripts/bootstrap.sh --test) and the Debian mirror and PyPI
(about 90 MB; ~2 min on the 2-core development machine).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[3]
MIRROR = "http://deb.debian.org/debian"
IMAGE = "localhost/nodemesh:image-test"
# Where the node's addresses live: only inside the namespace this test creates.
NODE_IP, POD_CIDR = "10.255.77.1", "10.255.78.0/24"
COMPILERS = ("gcc", "cc", "c++", "x86_64-linux-gnu-gcc", "clang")


def run(argv: list[str], timeout: float = 600, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def dockerfile_base() -> tuple[str, str]:
    """The Dockerfile's default base image and the Debian suite it is (`debian:SUITE-slim`)."""
    text = (REPO / "Dockerfile").read_text()
    m = re.search(r"^ARG BASE_IMAGE=(debian:(\w+)-slim)$", text, re.MULTILINE)
    assert m, "the Dockerfile's base must be debian:SUITE-slim (this test rebuilds it with debootstrap)"
    return m.group(1), m.group(2)


def host_trust_bundle() -> Path | None:
    """The CA bundle this machine trusts (it may sit behind a TLS-intercepting egress proxy)."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return Path(os.environ[var])
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


@dataclass
class Buildah:
    """buildah with a private store under the test's directory, removed afterwards."""

    root: Path

    def __call__(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return run(["buildah", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                    "--storage-driver", self.driver, *args], timeout=timeout, check=check)

    @property
    def driver(self) -> str:
        return os.environ.get("NODEMESH_TEST_STORAGE_DRIVER", "overlay")

    def cleanup(self) -> None:
        self("rm", "--all", check=False, timeout=120)
        self("rmi", "--all", "--force", check=False, timeout=120)
        run(["umount", "-R", str(self.root / "storage" / "overlay")], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the image and yield the root of its filesystem (a mounted working container)."""
    for tool in ("debootstrap", "buildah"):
        assert shutil.which(tool), f"{tool} missing: run scripts/bootstrap.sh --test"
    work = tmp_path_factory.mktemp("image")
    buildah = Buildah(work / "buildah")
    try:
        started = time.monotonic()
        base, suite = dockerfile_base()
        rootfs = work / "rootfs"
        run(["debootstrap", "--variant=minbase", suite, str(rootfs), MIRROR])
        assert not [c for c in COMPILERS if _in_rootfs(rootfs, c)], "the base must have no compiler"
        run(["tar", "-C", str(rootfs), "-cf", str(work / "base.tar"), "."])
        (work / "Base.Dockerfile").write_text("FROM scratch\nADD base.tar /\n")
        base_tag = f"localhost/{base}"
        buildah("bud", "--isolation", "chroot", "-f", str(work / "Base.Dockerfile"), "-t", base_tag, str(work))
        shutil.rmtree(rootfs)
        # The machine's CA bundle is offered to the build's ca-certificates (so pip reaches PyPI
        # through an intercepting proxy); it is mounted for RUN steps only.
        cas = work / "cas"
        cas.mkdir()
        bundle = host_trust_bundle()
        if bundle:
            shutil.copy(bundle, cas / "host-trust.crt")
        built = buildah("bud", "--isolation", "chroot", "--pull-never", "--layers=false",
                        "-v", f"{cas}:/usr/local/share/ca-certificates:ro",
                        "--build-arg", f"BASE_IMAGE={base_tag}", "-t", IMAGE, str(REPO), timeout=1200)
        assert "--only-binary=:all:" in built.stdout
        print(f"image built in {time.monotonic() - started:.0f} s (debootstrap + buildah)")
        ctr = buildah("from", "--pull-never", IMAGE).stdout.strip()
        yield Path(buildah("mount", ctr).stdout.strip())
    finally:
        buildah.cleanup()


def _in_rootfs(root: Path, name: str) -> bool:
    return any((root / d / name).exists() for d in ("usr/bin", "usr/local/bin", "bin", "usr/sbin"))


def in_image(root: Path, script: str, netns: str | None = None, timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run `script` (sh) inside the image's filesystem: a private mount namespace with /dev, /proc,
    /sys and /tmp of its own, the image's PATH, optionally in a network namespace."""
    mounts = (f"mount --bind /dev {root}/dev && mount -t proc proc {root}/proc && "
              f"mount -t sysfs sysfs {root}/sys && mount -t tmpfs tmpfs {root}/tmp && ")
    env = "env -i PATH=/opt/nodemesh/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PYTHONUNBUFFERED=1"
    inner = f"{mounts} exec chroot {root} {env} /bin/sh -c {_quote(script)}"
    argv = (["ip", "netns", "exec", netns] if netns else []) + ["unshare", "--mount", "--pid", "--fork",
                                                                "sh", "-c", inner]
    return run(argv, timeout=timeout, check=check)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def test_image_has_no_compiler_and_every_entry_point_starts(image_root: Path) -> None:
    out = in_image(image_root, "nodemesh --version").stdout
    assert out.strip() == "nodemesh 0.1.0"
    found = in_image(image_root, "for c in " + " ".join(COMPILERS) + "; do command -v $c; done; true").stdout
    assert found.strip() == "", f"compiler in the image: {found}"
    assert in_image(image_root, "python -c 'import iptc'", check=False).returncode != 0  # python-iptables is gone
    for module, words in (("nodemesh.agent", ["--pod-cidr"]), ("nodemesh.controlplane", ["--source"]),
                          ("nodemesh.redirector", ["plan", "apply", "remove", "fail-open", "run", "sysctls"])):
        usage = in_image(image_root, f"python -m {module} --help").stdout
        assert all(w in usage for w in words), (module, usage)
    plan = in_image(image_root, f"python -m nodemesh.redirector plan --dry-run --node-ip {NODE_IP} "
                                f"--pod-cidr {POD_CIDR}").stdout
    assert "NODEMESH_PREROUTING" in plan and f"--to-destination {NODE_IP}:4140" in plan


def test_image_runs_controller_agent_and_redirector(image_root: Path) -> None:
    """One node in a network namespace, every process from the image: `nodemesh check` (also from
    the image) passes, which needs the controller, the agent connected and ready, and the
    redirector's capture installed as the agent reads it."""
    netns = f"nmimg{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", netns])
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "node0", "type", "veth", "peer", "node0p"],
                    ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "node0"], ["ip", "link", "set", "node0", "up"]):
            run(["ip", "netns", "exec", netns, *cmd])
        objects = ('{"resourceVersion": "1", "items": [{"apiVersion": "v1", "kind": "Node", '
                   '"metadata": {"name": "node1", "uid": "u1", "resourceVersion": "1"}, '
                   '"status": {"conditions": [{"type": "Ready", "status": "True"}]}}]}')
        script = f"""
set -e
mkdir -p /tmp/state && echo '{objects}' > /tmp/state/objects.json && echo s3cret > /tmp/token
python -m nodemesh.redirector sysctls 2> /tmp/sysctls.log   # what the DaemonSet's init container runs
python -m nodemesh.controlplane --source sandbox --state-dir /tmp/state --listen 127.0.0.1 \\
    --token-file /tmp/token > /tmp/controller.log 2>&1 &
controller=$!
python -m nodemesh.agent --node node1 --node-ip {NODE_IP} --pod-cidr {POD_CIDR} --workers 1 \\
    --controller 127.0.0.1:8085 --token-file /tmp/token > /tmp/agent.log 2>&1 &
agent=$!
python -m nodemesh.redirector run --node-ip {NODE_IP} --pod-cidr {POD_CIDR} > /tmp/redirector.log 2>&1 &
redirector=$!
ok=1
for i in $(seq 1 150); do
  if nodemesh check --controller 127.0.0.1:8085 --token-file /tmp/token > /tmp/check.txt 2>&1; then ok=0; break; fi
  sleep 0.2
done
iptables-save -t nat | grep -c NODEMESH_PREROUTING > /tmp/rules.txt || true
kill -TERM $redirector; wait $redirector || true
iptables-save | grep -c NODEMESH > /tmp/rules-after.txt || true
kill -TERM $agent $controller; wait || true
for f in sysctls check rules rules-after controller agent redirector; do echo "=== $f"; cat /tmp/$f.*; done
exit $ok
"""
        res = in_image(image_root, script, netns=netns, timeout=180, check=False)
        print(res.stdout[-6000:])
        assert res.returncode == 0, f"nodemesh check never passed in the image:\n{res.stdout[-6000:]}"
        sections: dict[str, str] = {}
        for part in ("\n" + res.stdout).split("\n=== ")[1:]:
            name, _, body = part.partition("\n")
            sections[name.strip()] = body
        assert "capture installed on each node" in sections["check"]
        assert int(sections["rules"].strip()) >= 2        # the hook and our chain
        assert sections["rules-after"].strip() == "0"      # the redirector's SIGTERM removed everything
        assert "fork_posix" not in sections["agent"]       # issue 11 item 5, in the image too
        assert "key=net.ipv4.tcp_migrate_req value=1 status=set" in sections["sysctls"]
        assert "tcp_migrate_req" not in sections["agent"]
    finally:
        run(["ip", "netns", "del", netns], check=False)
