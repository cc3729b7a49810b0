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
  apt_packages+=(nginx-light libnginx-mod-stream wrk nghttp2-client curl netcat-openbsd)
  apt_packages+=(ruby shellcheck)  # lint the Vagrantfile (ruby -c) and the shell scripts
  apt_packages+=(chromium)  # the dashboard's browser test (Playwright drives it; never `playwright install`)
  apt_packages+=(debootstrap buildah)  # tests/integration/image: build the Dockerfile without Docker
  apt_packages+=(bpftool)  # the eBPF tests check what is attached, loaded and freed
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

# --- eBPF capture (`--capture ebpf`, docs/redirector.md): bcc and the kernel headers it compiles against.
# Debian's bcc (python3-bpfcc) is built for Debian's python3; the project may run another interpreter
# (pyenv). A .pth in that interpreter's site-packages adds a directory holding only a link to Debian's
# `bcc` package, never the rest of Debian's dist-packages. bcc needs /lib/modules/$(uname -r)/build: a
# distribution kernel has it; a foreign one (a VM's, a CI runner's) gets the closest headers apt has.
# Optional for the mesh: without them `nodemesh check` says why and capture stays iptables.
ebpf_setup() {
  local kver debs=(python3-bpfcc) headers="" build
  kver=$(uname -r)
  build="/lib/modules/$kver/build"
  # Package lists may be stale when everything above was installed already.
  if [ ! -e "$build/include" ] || ! dpkg-query -W -f='${Status}' python3-bpfcc 2>/dev/null | grep -q "ok installed"; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  fi
  if [ ! -e "$build/include" ]; then
    if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
      headers="linux-headers-$kver"
    else
      # The closest by version: same major.minor if apt has it, else the newest not past ours.
      headers=$(apt-cache search --names-only '^linux-headers-[0-9.]+[-+].*-amd64$' 2>/dev/null \
        | awk '{print $1}' | grep -v -e '-rt-' -e '-cloud-' \
        | awk -v want="${kver%%-*}" 'BEGIN{split(want,w,".")} {v=$0; sub(/^linux-headers-/,"",v);
            split(v,p,/[.+-]/); d=(w[1]-p[1])*1000000+(w[2]-p[2])*1000+(w[3]-p[3]);
            if (d<0) d=-d*10; print d, $0}' | sort -n | head -1 | cut -d' ' -f2 || true)
    fi
    # (Debian's headers package depends on its kernel image: installed, never booted here.)
    [ -n "$headers" ] && debs+=("$headers")
  fi
  local need=()
  for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    echo "bootstrap: apt-get install ${need[*]} (eBPF capture)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
      || { echo "bootstrap: eBPF packages unavailable; capture stays iptables" >&2; return 0; }
  fi
  if [ ! -e "$build/include" ] && [ -n "$headers" ]; then
    src="/usr/src/linux-headers-${headers#linux-headers-}"
    if [ -d "$src" ]; then
      mkdir -p "/lib/modules/$kver"
      ln -sfn "$src" "$build"
      # Debian splits the headers: arch-specific in -amd64 (build), the rest in -common (source).
      local common
      common=$(readlink -f "/usr/lib/modules/${headers#linux-headers-}/source" 2>/dev/null || true)
      [ -n "$common" ] && [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$kver/source"
      echo "bootstrap: $build -> $src (closest headers to $kver)"
    fi
  fi
  local site link_dir=/usr/local/lib/nodemesh-bcc
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  if ! python3 -c 'import bcc' >/dev/null 2>&1 && [ -d /usr/lib/python3/dist-packages/bcc ]; then
    mkdir -p "$link_dir"
    ln -sfn /usr/lib/python3/dist-packages/bcc "$link_dir/bcc"
    echo "$link_dir" >"$site/nodemesh-bcc.pth"
  fi
  if python3 -c 'import bcc' >/dev/null 2>&1; then
    [ -r /sys/kernel/btf/vmlinux ] || echo "bootstrap: no /sys/kernel/btf/vmlinux (bcc uses the headers)" >&2
  else
    echo "bootstrap: bcc does not import; capture stays iptables" >&2
  fi
}
ebpf_setup
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "bootstrap: ok"
