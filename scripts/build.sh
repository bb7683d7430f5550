#!/usr/bin/env bash
# Builds the BPF objects (clang), the native addon (cmake-js over libbpf), the TypeScript (tsc) and
# the validators compiled from the CRD schemas in daemonset/crds.
# Fails loudly, naming the missing tool, if clang or the libbpf headers are not there.
source "$(dirname "$0")/lib.sh"

what=${1:-all}

build_bpf() {
  local clang=${CLANG:-clang}
  command -v "$clang" >/dev/null || die "clang is not installed ($clang): it compiles bpf/*.bpf.c (apt-get install -y clang llvm)"
  [[ -f /usr/include/bpf/bpf_helpers.h ]] || die "libbpf headers are missing: /usr/include/bpf/bpf_helpers.h (apt-get install -y libbpf-dev)"
  [[ -f /usr/include/linux/bpf.h ]] || die "kernel UAPI headers are missing: /usr/include/linux/bpf.h (apt-get install -y linux-libc-dev)"
  mkdir -p build/bpf
  local arch multiarch
  arch=$(uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
  multiarch=$(gcc -print-multiarch 2>/dev/null || echo "$(uname -m)-linux-gnu")
  for src in bpf/*.bpf.c; do
    local obj="build/bpf/$(basename "${src%.c}").o"
    say "clang $src -> $obj"
    "$clang" -O2 -g -Wall -Werror -target bpf "-D__TARGET_ARCH_${arch}" \
      -I "/usr/include/${multiarch}" -I bpf/include -c "$src" -o "$obj"
  done
}

build_native() {
  command -v "${CMAKE:-cmake}" >/dev/null || die "cmake is not installed (apt-get install -y cmake)"
  pkg-config --exists libbpf || die "libbpf is not found by pkg-config (apt-get install -y libbpf-dev pkg-config)"
  local napi
  napi=$(node -p "require('path').resolve(require('node-addon-api').include_dir)")
  say "cmake-js: native addon"
  npx --no-install cmake-js compile --log-level warn -d native -O build/native "--CDNODE_ADDON_API_DIR=${napi}" >&2 \
    || die "building the native addon failed (see the compiler output above)"
}

build_ts() {
  say "tsc"
  npx --no-install tsc -p tsconfig.json
  say "CRD schemas -> validators"
  node dist/src/config/generate-validators.js
}

case "$what" in
  bpf) build_bpf ;;
  native) build_native ;;
  ts) build_ts ;;
  all) build_bpf; build_native; build_ts ;;
  *) die "unknown build step: $what (bpf, native, ts or all)" ;;
esac
