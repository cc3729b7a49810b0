#!/usr/bin/env bash
# Shared by the k3s provisioners.

# The interface that carries this node's private-network address: flannel must use it, not the
# provider's NAT interface (which has the same address on every VM).
iface_of() {
  ip -o -4 addr show | awk -v ip="$1" '{ split($4, a, "/"); if (a[1] == ip) print $2 }' | head -n1
}

install_k3s() {
  # $1: server|agent; the rest: k3s flags.
  local role="$1" service=k3s
  shift
  [ "$role" = agent ] && service=k3s-agent
  if systemctl is-active --quiet "$service"; then
    echo "k3s ${role}: already running"
    return
  fi
  curl -sfL https://get.k3s.io |
    INSTALL_K3S_VERSION="$K3S_VERSION" K3S_TOKEN="$K3S_TOKEN" INSTALL_K3S_EXEC="$role" sh -s - "$@"
}
