#!/usr/bin/env bash
# Install everything nodemesh needs on a fresh Debian/Ubuntu machine, as root.
#   scripts/bootstrap.sh          runtime: netfilter tools, the Python package
#   scripts/bootstrap.sh --test   also the test peers (nginx, wrk, h2load, ...) and test extras
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_packages=(iptables ebtables conntrack iproute2 procps kmod psmisc)
# A fresh machine's python3 may have no pip yet (Debian ships it as a separate package).
python3 -m pip --version >/dev/null 2>&1 || apt_packages+=(python3-pip)
if [ "$want_test" = 1 ]; then
  apt_packages+=(nginx-light wrk nghttp2-client curl netcat-openbsd)
  apt_packages+=(ruby shellcheck)  # lint the Vagrantfile (ruby -c) and the shell scripts
  apt_packages+=(chromium)  # the dashboard's browser test (Playwright drives it; never `playwright install`)
  apt_packages+=(debootstrap buildah)  # tests/integration/image: build the Dockerfile without Docker
  apt_packages+=(prometheus)  # the stat backend equality test scrapes the sandbox agents with the real server
fi

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# nginx is a test peer we start ourselves; never leave Debian's default instance on :80.
if [ "$want_test" = 1 ] && command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now nginx >/dev/null 2>&1 || true
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "bootstrap: nodemesh needs Python >= 3.11 (python3 is $(python3 -V 2>&1))" >&2; exit 1; }
target="."
[ "$want_test" = 1 ] && target=".[test]"
pip_flags=(-q --disable-pip-version-check --root-user-action=ignore)
# Debian/Ubuntu mark their system Python "externally managed" (PEP 668); this machine-wide,
# root-only install of a system tool is what that marker guards, so say so explicitly.
if [ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
  pip_flags+=(--break-system-packages)
fi
log=$(mktemp)
if ! python3 -m pip install "${pip_flags[@]}" -e "$target" >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"
  echo "bootstrap: pip install failed" >&2; exit 1
fi
rm -f "$log"
python3 -c "import nodemesh.cli.main" || { echo "bootstrap: nodemesh did not install" >&2; exit 1; }
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "bootstrap: ok"
