# One image for every nodemesh process: the agent, the redirector, the controller and the CLI.
#
#   docker build -t nodemesh:0.1.0 .                            # iptables capture (default)
#   docker build --build-arg WITH_BCC=1 -t nodemesh:0.1.0 .     # plus python3-bpfcc (eBPF tooling; capture uses iptables)
#
# The manifests choose the process with `command:` (python -m nodemesh.agent, ...), so the image
# has no entrypoint. It runs as root by default because the agent and the redirector need
# NET_ADMIN/NET_RAW, which Kubernetes only makes effective for uid 0; the controller's manifest
# runs it as nobody (65534).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build the wheel (the repository root is the `nodemesh` package; setup.py lists the rooms)
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- the runtime image
FROM ${PYTHON_IMAGE}
ARG WITH_BCC=0
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Netfilter and routing tools the redirector drives. Debian's iptables package ships both the
# nft and the legacy backends (iptables-nft, iptables-legacy): the node's kube-proxy decides
# which one the host uses, and the redirector must use the same.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ebtables iproute2 conntrack \
 && rm -rf /var/lib/apt/lists/*

# Optional eBPF layer. bcc's Python module is built for Debian's python3 (3.11 in bookworm, the
# same minor as this image's Python), so it is linked into this interpreter's site-packages.
RUN if [ "$WITH_BCC" = "1" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3-bpfcc \
      && ln -s /usr/lib/python3/dist-packages/bcc /usr/local/lib/python3.11/site-packages/bcc \
      && python -c "import bcc" \
      && rm -rf /var/lib/apt/lists/*; \
    fi

COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
 && nodemesh --help >/dev/null \
 && python -c "import nodemesh.agent, nodemesh.redirector, nodemesh.controlplane"

CMD ["nodemesh", "--help"]
