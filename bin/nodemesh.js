#!/usr/bin/env node
// Long-running processes log at info (one line per enrolled pod, per error); commands for humans
// log warnings and errors only. NODEMESH_LOG_LEVEL overrides both.
process.env.NODEMESH_LOG_LEVEL ??= ['agent', 'control-plane'].includes(process.argv[2] ?? '') ? 'info' : 'warn';
await import('../dist/src/cli/main.js');
