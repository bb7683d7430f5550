#!/usr/bin/env -S node --max-semi-space-size=1 --optimize-for-size
// The agent is a long-running daemon on every node, and bytes are copied in the kernel, not in
// JS: a 1 MB young generation and V8's optimize-for-size heuristics keep its RSS with 100 pods
// at about 64 instead of 101 MiB, and V8's baseline compiler only (no TurboFan, `agent --jit
// baseline`) at 57 (README, Performance, has the measurements). TurboFan stays on by default
// (`--jit auto`): HBONE gains ~15% requests/s with it, and the L7 path (HTTP parsed in JS) costs
// a third of the CPU per request (bench/l7.ts: 146 against 446 µs); V8 cannot turn it on later,
// when a route arrives, so `baseline` is for L4-only nodes short of memory.
// Long-running processes log at info (one line per enrolled pod, per error); commands for humans
// log warnings and errors only. NODEMESH_LOG_LEVEL overrides both.
process.env.NODEMESH_LOG_LEVEL ??= ['agent', 'control-plane'].includes(process.argv[2] ?? '') ? 'info' : 'warn';
const args = process.argv.slice(2);
const jitArg = args.find((a) => a.startsWith('--jit=')) ?? (args.includes('--jit') ? `--jit=${args[args.indexOf('--jit') + 1]}` : '--jit=auto');
const jit = jitArg.slice('--jit='.length);
if (args[0] === 'agent' && jit === 'baseline') {
  // Set before any module loads: loading them already makes V8 optimise hot functions.
  (await import('node:v8')).setFlagsFromString('--max-opt=1');
}
try {
  await import('../dist/src/cli/main.js');
} catch (e) {
  // Before `npm run build` there is no dist/ (or no node_modules): say so in nodemesh's error
  // form, with what to run, not with a loader stack. Anything else is a bug and keeps its stack.
  if (e?.code !== 'ERR_MODULE_NOT_FOUND') throw e;
  process.stderr.write(`error NM_ERR_NATIVE_MISSING: nodemesh is not built or its dependencies are not installed: ${String(e.message).split('\n')[0]}\n  fix: npm run build (it runs npm ci first when node_modules is missing)\n`);
  process.exitCode = 1;
}
