#!/usr/bin/env bash
# `npm run demo`: installs what is missing, builds if needed, runs `nodemesh up`.
source "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || die "the demo creates network namespaces, cgroups and BPF programs: run it as root"
ensure_all
remember_bpffs
status=0
node bin/nodemesh.js up "$@" || status=$?
restore_bpffs
exit $status
