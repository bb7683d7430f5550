#!/usr/bin/env bash
# Builds the BPF objects (clang), the native addon (cmake-js over libbpf), the nodemesh-cni plugin
# (go, its one dependency from the Go module proxy), the TypeScript (tsc) and the validators
# compiled from the CRD schemas in daemonset/.
# Like `npm test` and `npm run demo`, it first installs what the step needs and is missing: the
# Debian packages (clang, libbpf-dev, cmake...; as root with apt-get, else one line naming them)
# and node_modules (npm ci), so `npm run build` works on a fresh clone. Each step checks its tools
# again and fails loudly, naming the missing one.
source "$(dirname "$0")/lib.sh"

what=${1:-all}
# An unknown step is refused before anything is installed.
case "$what" in
  bpf | native | cni | ts | all) ;;
  *) die "unknown build step: $what (bpf, native, cni, ts or all)" ;;
esac

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
  [[ -f /usr/include/nghttp2/nghttp2.h ]] || die "nghttp2's header is missing: /usr/include/nghttp2/nghttp2.h (apt-get install -y libnghttp2-dev)"
  local napi nodedir
  napi=$(node -p "require('path').resolve(require('node-addon-api').include_dir)")
  # The running node's own headers (node's builds and Debian's libnode-dev put them in
  # <prefix>/include/node): cmake-js would otherwise download them from nodejs.org.
  nodedir=$(node -p "require('path').resolve(process.execPath, '../..')")
  [[ -f $nodedir/include/node/node.h ]] || die "node's headers are missing: $nodedir/include/node/node.h (Debian's node: apt-get install -y libnode-dev)"
  say "cmake-js: native addon"
  npm_config_nodedir="$nodedir" npx --no-install cmake-js compile --log-level warn -d native -O build/native "--CDNODE_ADDON_API_DIR=${napi}" >&2 \
    || die "building the native addon failed (see the compiler output above)"
}

# A static binary: the container runtime runs it on the node, where neither node nor our
# libraries are.
build_cni() {
  command -v go >/dev/null || die "go is not installed: it builds the nodemesh-cni plugin (native/cni)"
  say "go: nodemesh-cni"
  mkdir -p build/cni
  (cd native/cni && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o ../../build/cni/nodemesh-cni .) >&2 \
    || die "building nodemesh-cni failed (see the go output above)"
}

build_ts() {
  say "tsc"
  npx --no-install tsc -p tsconfig.json
  say "CRD schemas -> validators"
  node dist/src/config/generate-validators.js
}

# What each step needs: the BPF objects only the compilers, the TypeScript only node_modules,
# the addon both (node-addon-api's headers and cmake-js come from node_modules).
case "$what" in
  bpf) ensure_system; build_bpf ;;
  native) ensure_system; ensure_node_modules; build_native ;;
  cni) build_cni ;;
  ts) ensure_node_modules; build_ts ;;
  all)
    ensure_system
    ensure_node_modules
    # Hashed before building, stamped after: `npm test` and `npm run demo` (ensure_build) then
    # do not build again what `npm run build` just built, and an edit made during the build is
    # still seen as a change.
    stamp=$(source_hash)
    build_bpf
    build_native
    build_cni
    build_ts
    mkdir -p build
    echo "$stamp" >build/.stamp
    ;;
esac
