# One image for every nodemesh process: the agent, the redirector, the controller and the CLI.
#
#   docker build -t nodemesh:0.1.0 .                            # iptables capture (default)
#   docker build --build-arg WITH_BCC=1 -t nodemesh:0.1.0 .     # plus python3-bpfcc: `install --capture ebpf`
#
# Debian's own Python (bookworm: 3.11) in a venv at /opt/nodemesh, and every Python dependency
# installed from a wheel (--only-binary=:all:): the image has no compiler and never needs one. A
# dependency that stops shipping a wheel fails the build at once instead of trying to compile.
# CI builds this file for real (buildah, from a debootstrapped bookworm): tests/integration/image/.
#
# The manifests choose the process with `command:` (python -m nodemesh.agent, ...), so the image
# has no entrypoint. It runs as root by default because the agent and the redirector need
# NET_ADMIN/NET_RAW, which Kubernetes only makes effective for uid 0; the controller's manifest
# runs it as nobody (65534).

ARG BASE_IMAGE=debian:bookworm-slim

# ---- build the wheel (the repository root is the `nodemesh` package; setup.py lists the rooms)
FROM ${BASE_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/build
WORKDIR /src
COPY . .
RUN /opt/build/bin/pip wheel --only-binary=:all: --no-deps --wheel-dir /wheels .

# ---- the runtime image
FROM ${BASE_IMAGE}
ARG WITH_BCC=0
ENV PATH=/opt/nodemesh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python, and the netfilter and routing tools the redirector drives. Debian's iptables package
# ships both the nft and the legacy backends (iptables-nft, iptables-legacy): the redirector
# detects which one the node's rules use and never touches the other (docs/redirector.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv iptables ebtables iproute2 conntrack \
 && rm -rf /var/lib/apt/lists/*

# Optional eBPF layer (`nodemesh install --capture ebpf`, redirector/ebpf.py): bcc's Python module
# is Debian's (python3-bpfcc, built for this python3), linked into the venv below. The kernel
# headers bcc compiles against are the node's (/lib/modules, /usr/src mounted read-only by the
# DaemonSet): an image cannot know the node's kernel. Without bcc the redirector falls back to
# iptables capture and logs why.
RUN if [ "$WITH_BCC" = "1" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3-bpfcc \
      && rm -rf /var/lib/apt/lists/*; \
    fi

COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/nodemesh \
 && if [ "$WITH_BCC" = "1" ]; then \
      ln -s /usr/lib/python3/dist-packages/bcc \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/bcc" \
      && python -c "import bcc"; \
    fi \
 && pip install --only-binary=:all: /wheels/*.whl \
 && rm -rf /wheels \
 && nodemesh --version \
 && python -c "import nodemesh.agent, nodemesh.redirector, nodemesh.controlplane"

CMD ["nodemesh", "--help"]
