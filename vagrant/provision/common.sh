#!/usr/bin/env bash
# Every node: packages k3s and the image build need, kernel settings Kubernetes expects.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# docker.io builds the image; k3s runs it from its own containerd (provision/image.sh imports it).
apt-get install -y -qq --no-install-recommends ca-certificates curl iptables conntrack docker.io >/dev/null

swapoff -a
sed -i '/\sswap\s/s/^/#/' /etc/fstab

modprobe br_netfilter
modprobe overlay
cat >/etc/modules-load.d/nodemesh.conf <<'CONF'
br_netfilter
overlay
CONF
cat >/etc/sysctl.d/90-nodemesh.conf <<'CONF'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
CONF
sysctl --system >/dev/null
echo "common: ok"
