#!/usr/bin/env bash
# `npm test`: installs what is missing, builds if needed, then runs every test with node's test
# runner. Integration tests need root: they make network namespaces, cgroups and BPF links.
# The last test file fails the run if any test left something behind.
source "$(dirname "$0")/lib.sh"
[[ $(id -u) -eq 0 ]] || die "the tests create network namespaces, cgroups and BPF programs: run them as root"
ensure_all
# Unit tests first, then integration, then test/zz-leaks.test.js, which must run last.
mapfile -t files < <(find dist/test/unit -name '*.test.js' | sort; find dist/test/integration -name '*.test.js' | sort)
files+=(dist/test/zz-leaks.test.js)
export NODEMESH_LOG_LEVEL=${NODEMESH_LOG_LEVEL:-warn}
remember_bpffs
status=0
node --test --test-concurrency=1 --test-reporter=spec "${files[@]}" || status=$?
restore_bpffs
exit $status
