#!/usr/bin/env bash
# `npm run bench`: installs the load tools and the sidecar peer (iperf3, wrk, HAProxy, nft,
# nginx as the app) from Debian's packages, builds if needed, runs bench/run.ts, then the control
# plane, the two-node (HBONE) and the hardening benchmarks. BENCH_SECONDS (default 5) and
# BENCH_PODS (default 1,10,100) tune it. `bench.sh memory|control-plane|two-hop|hardening` runs one
# of the others alone (see below).
source "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || die "the benchmark creates network namespaces, cgroups and BPF programs: run it as root"

# The fixed-rate latency client (microsecond resolution), built with the system C compiler.
build_latency() {
  mkdir -p build/bench
  if [[ ! build/bench/latency -nt bench/latency.c ]]; then
    cc -O2 -Wall -Wextra -Werror -o build/bench/latency bench/latency.c || die "cannot build bench/latency.c (needs a C compiler: apt-get install gcc)"
  fi
}

# Runs dist/bench/$1.js with bpffs as the run found it afterwards; returns its status.
run_bench() {
  local status=0
  remember_bpffs
  NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn} node "dist/bench/$1.js" || status=$?
  restore_bpffs
  return $status
}

case ${1:-} in
  # `npm run bench:memory` (bench/memory.ts): the agent's RSS with N pods and where it goes; no load tools.
  memory | control-plane)
    # `npm run bench:control-plane` (bench/control-plane.ts): config propagation and memory at mesh scale.
    ensure_all
    run_bench "$1"
    exit $?
    ;;
  # `npm run bench:hardening` (bench/hardening.ts): what one pod's stalled connects and a scrape
  # loop cost another pod's latency.
  hardening)
    SYSTEM_PACKAGES+=("nftables:cmd:nft" "nginx-light:cmd:nginx")
    ensure_all
    build_latency
    run_bench hardening
    exit $?
    ;;
  # `npm run bench:two-hop` (bench/two-hop.ts): client and server pods on two nodes, through both
  # node proxies over HBONE, against direct and the sidecar peer.
  two-hop)
    SYSTEM_PACKAGES+=("iperf3:cmd:iperf3" "wrk:cmd:wrk" "nghttp2-client:cmd:h2load" "haproxy:cmd:haproxy" "nftables:cmd:nft" "nginx-light:cmd:nginx")
    ensure_all
    build_latency
    run_bench two-hop
    exit $?
    ;;
  # `npm run bench:tunnel-layers` (bench/tunnel-layers.ts): what TCP, TLS and HTTP/2 each cost
  # in node on the HBONE data path, two relays on loopback.
  tunnel-layers)
    SYSTEM_PACKAGES+=("iperf3:cmd:iperf3" "wrk:cmd:wrk" "nginx-light:cmd:nginx")
    ensure_all
    run_bench tunnel-layers
    exit $?
    ;;
  # `npm run bench:l7` (bench/l7.ts): HTTP/1.1 through the node proxy's L7 path, one node,
  # against direct, the HAProxy mode http pair and nodemesh's L4 path.
  l7)
    SYSTEM_PACKAGES+=("wrk:cmd:wrk" "nghttp2-client:cmd:h2load" "haproxy:cmd:haproxy" "nftables:cmd:nft" "nginx-light:cmd:nginx")
    ensure_all
    build_latency
    run_bench l7
    exit $?
    ;;
  # `npm run bench:l7-parsers` (bench/l7-parsers.ts): HTTP/1.1 through one proxy process built on
  # each candidate parser (node:http, undici, llhttp driven directly) and HAProxy, on loopback.
  l7-parsers)
    SYSTEM_PACKAGES+=("wrk:cmd:wrk" "haproxy:cmd:haproxy" "nginx-light:cmd:nginx")
    ensure_all
    run_bench l7-parsers
    exit $?
    ;;
esac
SYSTEM_PACKAGES+=("iperf3:cmd:iperf3" "wrk:cmd:wrk" "nghttp2-client:cmd:h2load" "haproxy:cmd:haproxy" "nftables:cmd:nft" "nginx-light:cmd:nginx")
ensure_all
build_latency
status=0
run_bench run || status=$?
# The control plane at mesh scale (no pods, no traffic): propagation p50/p99, memory.
[[ $status -ne 0 ]] || run_bench control-plane || status=$?
# Two nodes: through both proxies over HBONE.
[[ $status -ne 0 ]] || run_bench two-hop || status=$?
# The layers of the HBONE data path in node, one by one.
[[ $status -ne 0 ]] || run_bench tunnel-layers || status=$?
# One pod's misbehaviour against another pod's latency.
[[ $status -ne 0 ]] || run_bench hardening || status=$?
# HTTP through the L7 path against the HAProxy mode http pair.
[[ $status -ne 0 ]] || run_bench l7 || status=$?
exit $status
