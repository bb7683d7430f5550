#!/usr/bin/env node
// The CLI logs warnings and errors only, unless NODEMESH_LOG_LEVEL says otherwise.
process.env.NODEMESH_LOG_LEVEL ??= 'warn';
await import('../dist/src/cli/main.js');
