#!/usr/bin/env bash
# `npm run bench`: installs the load tools and the sidecar peer (iperf3, wrk, HAProxy, nft,
# nginx as the app) from Debian's packages, builds if needed, runs bench/run.ts.
# BENCH_SECONDS (default 5) and BENCH_PODS (default 1,10,100) tune it. `bench.sh memory`: see below.
source "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || die "the benchmark creates network namespaces, cgroups and BPF programs: run it as root"
# `npm run bench:memory` (bench/memory.ts): the agent's RSS with N pods and where it goes; no load tools.
if [[ ${1:-} == memory ]]; then
  ensure_all
  remember_bpffs
  status=0
  NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn} node dist/bench/memory.js || status=$?
  restore_bpffs
  exit $status
fi
# `npm run bench:hardening` (bench/hardening.ts): what one pod's stalled connects and a scrape loop
# cost another pod's latency.
if [[ ${1:-} == hardening ]]; then
  SYSTEM_PACKAGES+=("nftables:cmd:nft" "nginx-light:cmd:nginx")
  ensure_all
  mkdir -p build/bench
  if [[ ! build/bench/latency -nt bench/latency.c ]]; then
    cc -O2 -Wall -Wextra -Werror -o build/bench/latency bench/latency.c || die "cannot build bench/latency.c (needs a C compiler: apt-get install gcc)"
  fi
  remember_bpffs
  status=0
  NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn} node dist/bench/hardening.js || status=$?
  restore_bpffs
  exit $status
fi
# `npm run bench:control-plane` (bench/control-plane.ts): config propagation and memory at mesh scale.
if [[ ${1:-} == control-plane ]]; then
  ensure_all
  remember_bpffs
  status=0
  NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn} node dist/bench/control-plane.js || status=$?
  restore_bpffs
  exit $status
fi
SYSTEM_PACKAGES+=("iperf3:cmd:iperf3" "wrk:cmd:wrk" "haproxy:cmd:haproxy" "nftables:cmd:nft" "nginx-light:cmd:nginx")
ensure_all
# The fixed-rate latency client (microsecond resolution), built with the system C compiler.
mkdir -p build/bench
if [[ ! build/bench/latency -nt bench/latency.c ]]; then
  cc -O2 -Wall -Wextra -Werror -o build/bench/latency bench/latency.c || die "cannot build bench/latency.c (needs a C compiler: apt-get install gcc)"
fi
remember_bpffs
status=0
NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn} node dist/bench/run.js || status=$?
restore_bpffs
# The control plane at mesh scale (no pods, no traffic): propagation p50/p99, memory.
[[ $status -ne 0 ]] || NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn} node dist/bench/control-plane.js || status=$?
# One pod's misbehaviour against another pod's latency.
if [[ $status -eq 0 ]]; then
  remember_bpffs
  NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn} node dist/bench/hardening.js || status=$?
  restore_bpffs
fi
exit $status
