#!/usr/bin/env bash
# The control-plane node. flannel (vxlan) over the private network: pods hang off the cni0 bridge,
# the CNI style nodemesh's capture was designed on first.
set -euo pipefail
# shellcheck source=lib.sh
. /nodemesh/vagrant/provision/lib.sh

iface="$(iface_of "$NODE_IP")"
[ -n "$iface" ] || { echo "k3s-server: no interface holds $NODE_IP" >&2; exit 1; }

install_k3s server \
  --node-ip "$NODE_IP" --advertise-address "$NODE_IP" --flannel-iface "$iface" \
  --tls-san "$SERVER_IP" --write-kubeconfig-mode 0644 --disable traefik

for _ in $(seq 1 120); do
  k3s kubectl get --raw /readyz >/dev/null 2>&1 && break
  sleep 2
done
k3s kubectl get nodes -o wide
echo "k3s-server: ok"
