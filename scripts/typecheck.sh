#!/usr/bin/env bash
# `npm run typecheck`: tsc without output, after installing node_modules when they are missing or
# do not match package-lock.json (tsc itself comes from there; `npx tsc` without it would fetch an
# unrelated package named tsc).
source "$(dirname "$0")/lib.sh"
ensure_node_modules
npx --no-install tsc -p tsconfig.json --noEmit
