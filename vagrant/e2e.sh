#!/usr/bin/env bash
# From the host: bring the cluster up, install nodemesh and emojivoto, and check the mesh sees the
# traffic with the nodemesh CLI (pip install -e .. on the host), talking to the controller through
# the Kubernetes API port-forward, exactly as a user would.
#   vagrant/e2e.sh            # up + deploy + checks
#   vagrant/e2e.sh checks     # only the checks, on a running cluster
set -euo pipefail
cd "$(dirname "$0")"

SERVER_IP="${NODEMESH_SUBNET:-192.168.56}.10"
export KUBECONFIG="$PWD/.kube/config"

if [ "${1:-}" != checks ]; then
  vagrant up
  vagrant provision server --provision-with deploy
fi

mkdir -p .kube
vagrant ssh server -c "sudo cat /etc/rancher/k3s/k3s.yaml" 2>/dev/null |
  sed "s/127.0.0.1/$SERVER_IP/" >"$KUBECONFIG"
chmod 600 "$KUBECONFIG"

# The controller accepts tokens for its audience: the CLI's comes from the nodemesh-cli account.
NODEMESH_TOKEN="$(kubectl -n nodemesh create token nodemesh-cli --audience nodemesh-controller)"
export NODEMESH_TOKEN

fail=0
check() {
  echo "+ $*"
  if ! "$@"; then
    echo "FAILED: $*" >&2
    fail=1
  fi
}

check nodemesh check
# Give vote-bot a window of traffic to count.
sleep 30
for ns in emojivoto emojivoto-py; do
  check nodemesh stat deploy -n "$ns"
  nodemesh stat deploy -n "$ns" -o json >".stat-$ns.json"
  # web has traffic, and voting fails some requests (VoteDoughnut always fails, as upstream).
  check python3 - "$ns" ".stat-$ns.json" <<'PY'
import json, sys
ns, path = sys.argv[1], sys.argv[2]
rows = {r["name"]: r for r in json.load(open(path))}
web, voting = rows["web"], rows["voting"]
assert web["rps"] and web["rps"] > 0, f"{ns}: no requests seen for deploy/web: {web}"
assert voting["success"] is not None and voting["success"] < 1, f"{ns}: voting never failed: {voting}"
assert web["meshed"] == web["totalPods"], f"{ns}: web not meshed: {web}"
print(f"{ns}: web {web['rps']:.2f} rps, voting success {voting['success']:.1%}")
PY
  lines="$(timeout 20 nodemesh tap deploy/web -n "$ns" 2>/dev/null | head -n 5 | wc -l || true)"
  echo "tap deploy/web -n $ns: $lines lines"
  [ "$lines" -ge 1 ] || { echo "FAILED: tap showed nothing for $ns" >&2; fail=1; }
done

if [ "$fail" != 0 ]; then
  echo "e2e: FAILED" >&2
  exit 1
fi
echo "e2e: ok"
