# Shared steps of build.sh, test.sh and demo.sh: install what is missing, build what changed.
# shellcheck shell=bash
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '» %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian packages the build and the runtime need, and a file or command that proves each is there.
SYSTEM_PACKAGES=(
  "clang:cmd:clang"
  "llvm:cmd:llvm-strip"
  "libbpf-dev:file:/usr/include/bpf/libbpf.h"
  "libelf-dev:file:/usr/include/libelf.h"
  "zlib1g-dev:file:/usr/include/zlib.h"
  "pkg-config:cmd:pkg-config"
  "cmake:cmd:cmake"
  "make:cmd:make"
  "g++:cmd:g++"
  "iproute2:cmd:ip"
  "bpftool:cmd:bpftool"
  "nftables:cmd:nft"
  "python3:cmd:python3"
  "tcpdump:cmd:tcpdump"
  "linux-libc-dev:file:/usr/include/linux/bpf.h"
  "libnghttp2-dev:file:/usr/include/nghttp2/nghttp2.h"
  # The reference CNI plugins (bridge, host-local): the tests run nodemesh-cni chained after them.
  "containernetworking-plugins:file:/usr/lib/cni/bridge"
)

ensure_system() {
  local missing=() entry pkg kind what
  for entry in "${SYSTEM_PACKAGES[@]}"; do
    IFS=: read -r pkg kind what <<<"$entry"
    if [[ $kind == cmd ]]; then
      command -v "$what" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$what" >/dev/null 2>&1 || missing+=("$pkg")
    else
      [[ -e $what ]] || missing+=("$pkg")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]]; then
    die "missing system packages: ${missing[*]}. Install them as root: apt-get install -y ${missing[*]}"
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing system packages: ${missing[*]}, and apt-get is not available to install them"
  say "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

# npm ci when node_modules does not match package-lock.json.
ensure_node_modules() {
  local want have=""
  want=$(sha256sum package-lock.json | cut -d' ' -f1)
  [[ -f node_modules/.nodemesh-lock ]] && have=$(cat node_modules/.nodemesh-lock)
  if [[ $want != "$have" ]]; then
    say "installing npm dependencies (npm ci)"
    npm ci --no-audit --no-fund >&2
    echo "$want" >node_modules/.nodemesh-lock
  fi
}

source_hash() {
  find src test bench bpf native bin scripts daemonset package.json package-lock.json tsconfig.json -type f \
    -not -path '*/node_modules/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

# Builds when a source changed since the last good build.
ensure_build() {
  local want have=""
  want=$(source_hash)
  [[ -f build/.stamp ]] && have=$(cat build/.stamp)
  if [[ $want != "$have" || ! -f build/native/Release/nodemesh_native.node || ! -x build/cni/nodemesh-cni ]]; then
    bash scripts/build.sh all
    echo "$want" >build/.stamp
  fi
}

ensure_all() {
  ensure_system
  ensure_node_modules
  ensure_build
}

# bpffs is mounted by nodemesh when missing. A test or demo run that mounted it unmounts it again
# at the end, if only the kernel's own preload entries (maps.debug, progs.debug) are left in it.
bpffs_mounted() { awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/self/mounts; }

BPFFS_WAS_MOUNTED=1
remember_bpffs() { bpffs_mounted && BPFFS_WAS_MOUNTED=1 || BPFFS_WAS_MOUNTED=0; }

restore_bpffs() {
  [[ $BPFFS_WAS_MOUNTED -eq 0 ]] && bpffs_mounted || return 0
  local left
  left=$(find /sys/fs/bpf -mindepth 1 -maxdepth 1 ! -name maps.debug ! -name progs.debug | head -1)
  if [[ -z $left ]]; then
    umount /sys/fs/bpf
  else
    say "leaving /sys/fs/bpf mounted: it holds $left"
  fi
}
