#!/usr/bin/env bash
# A worker node joining the server with the shared token.
set -euo pipefail
# shellcheck source=lib.sh
. /nodemesh/vagrant/provision/lib.sh

iface="$(iface_of "$NODE_IP")"
[ -n "$iface" ] || { echo "k3s-agent: no interface holds $NODE_IP" >&2; exit 1; }

for _ in $(seq 1 150); do
  curl -ksf "https://$SERVER_IP:6443/cacerts" >/dev/null && break
  echo "k3s-agent: waiting for the server at $SERVER_IP:6443"
  sleep 4
done

install_k3s agent --server "https://$SERVER_IP:6443" \
  --node-ip "$NODE_IP" --flannel-iface "$iface"
echo "k3s-agent: ok"
