#!/usr/bin/env bash
# Build the nodemesh image from the synced repository and import it into k3s's containerd, so
# the manifests' `imagePullPolicy: IfNotPresent` finds it without any registry.
set -euo pipefail

IMAGE="${IMAGE:-ghcr.io/nodemesh/nodemesh:0.1.0}"
cd /nodemesh
docker build --build-arg "WITH_BCC=${WITH_BCC:-0}" -t "$IMAGE" .
docker save "$IMAGE" | k3s ctr images import -
k3s ctr images ls -q | grep -F "$IMAGE"
echo "image: $IMAGE imported"
