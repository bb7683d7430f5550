#!/usr/bin/env -S node --max-semi-space-size=1 --optimize-for-size
// The agent is a long-running daemon on every node, and bytes are copied in the kernel, not in
// JS: a 1 MB young generation and V8's optimize-for-size heuristics keep its RSS with 100 pods
// at about 60 instead of 101 MiB (README, Performance, has the measurements).
// Long-running processes log at info (one line per enrolled pod, per error); commands for humans
// log warnings and errors only. NODEMESH_LOG_LEVEL overrides both.
process.env.NODEMESH_LOG_LEVEL ??= ['agent', 'control-plane'].includes(process.argv[2] ?? '') ? 'info' : 'warn';
await import('../dist/src/cli/main.js');
