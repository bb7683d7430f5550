#!/usr/bin/env bash
# cnitool, the CNI project's own command to run a network configuration list against a network
# namespace the way a container runtime does (ADD, CHECK, DEL with CNI_ARGS), for the tests of
# nodemesh-cni. Built once from the Go module proxy into a versioned cache outside the clone
# (NODEMESH_TOOLS_CACHE, default /var/cache/nodemesh); prints its path.
set -euo pipefail
say() { printf '» %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

VERSION=${NODEMESH_CNI_VERSION:-v1.3.1}
CACHE=${NODEMESH_TOOLS_CACHE:-/var/cache/nodemesh}
CNITOOL="$CACHE/cni-$VERSION/cnitool"

if [[ ! -x $CNITOOL ]]; then
  command -v go >/dev/null || die "go is not installed: it builds cnitool from the Go module proxy"
  say "building cnitool $VERSION (once; cached in $(dirname "$CNITOOL"))"
  mkdir -p "$(dirname "$CNITOOL")"
  GOBIN="$(dirname "$CNITOOL")" CGO_ENABLED=0 go install "github.com/containernetworking/cni/cnitool@$VERSION" >&2 \
    || die "building cnitool $VERSION failed (see above)"
fi
printf '%s\n' "$CNITOOL"
