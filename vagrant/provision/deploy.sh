#!/usr/bin/env bash
# On the server, once every node has joined: install the mesh exactly as a cluster admin would
# (kubectl apply -f manifests/daemonset.yaml), then emojivoto twice: the upstream :v11 images in
# namespace `emojivoto`, and nodemesh's Python build of it (demo/emojivoto.yml) in `emojivoto-py`.
set -euo pipefail

kubectl() { k3s kubectl "$@"; }
REPO=/nodemesh
NODES="${NODES:-3}"

echo "deploy: waiting for $NODES Ready nodes"
for _ in $(seq 1 150); do
  ready="$(kubectl get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)"
  [ "$ready" -ge "$NODES" ] && break
  sleep 4
done
kubectl get nodes -o wide

kubectl apply -f "$REPO/manifests/daemonset.yaml"
kubectl -n nodemesh rollout status deploy/nodemesh-controller --timeout=300s
kubectl -n nodemesh rollout status ds/nodemesh-agent --timeout=300s

# Upstream emojivoto (docker.l5d.io/buoyantio/emojivoto-*:v11): pod specs untouched, no injection.
kubectl apply -f https://run.linkerd.io/emojivoto.yml
# Ours, in its own namespace: the same manifest with the namespace and the service hosts moved.
sed -e 's/^\(\s*namespace:\) emojivoto$/\1 emojivoto-py/' \
    -e 's/^  name: emojivoto$/  name: emojivoto-py/' \
    -e 's/\.emojivoto:/.emojivoto-py:/g' \
    "$REPO/demo/emojivoto.yml" | kubectl apply -f -
for ns in emojivoto emojivoto-py; do
  for d in emoji voting web vote-bot; do
    kubectl -n "$ns" rollout status "deploy/$d" --timeout=300s
  done
done

# Optional add-ons: Prometheus scraping the agents, Grafana with the dashboards.
if [ "${WITH_GRAFANA:-1}" = 1 ]; then
  kubectl apply -f "$REPO/manifests/prometheus.yaml" -f "$REPO/manifests/grafana.yaml"
  kubectl -n nodemesh rollout status deploy/nodemesh-prometheus --timeout=300s
  kubectl -n nodemesh rollout status deploy/nodemesh-grafana --timeout=300s
fi

kubectl get pods -A -o wide
echo "deploy: ok"
