#!/usr/bin/env -S GLIBC_TUNABLES=glibc.malloc.tcache_count=256 node --max-semi-space-size=16 --no-memory-reducer
// V8's young generation may grow to 16 MB a semi-space (V8's own default on a 64-bit host, set
// here so a small memory limit does not shrink it), and no --optimize-for-size: V8 grows the
// young generation only when the agent allocates fast, which is the L7 path under load, so an
// idle or L4-only node stays near its lean size (100 pods, idle: 68.8 against 66.9 MiB with a
// 1 MB young generation and --optimize-for-size). Under L7 load those two flags cost 20-40 %
// of requests/s and a third more CPU per request (README, "L7, fourth session"). The image's
// ENTRYPOINT (daemonset/Dockerfile) passes the same flags: the shebang is not read there.
// No memory reducer: its compacting collections came when a load dropped to a lower rate, 10-20 ms
// pauses while requests still flowed; the agent and the control plane trim their heap themselves
// once their loop is idle (src/shared/heap-trim.ts, README "L7, eleventh session").
// glibc's per-thread cache keeps up to 256 freed blocks of each small size instead of 7: the HTTP/2
// engine frees a burst of same-sized blocks as many streams end together, and past the 7th each
// went to the slower arena (malloc and free 9.8 -> 6.8 % of both agents' samples on the two-hop
// HTTP/2 row). Read by glibc at start, so it is not handed on to the processes nodemesh starts.
// V8's baseline compiler only (no TurboFan, `agent --jit baseline`) saves a few MiB more;
// TurboFan stays on by default (`--jit auto`): HBONE gains ~15% requests/s with it, and the L7
// path costs a third of the CPU per request without it; V8 cannot turn it on later, when a
// route arrives, so `baseline` is for L4-only nodes short of memory.
// Long-running processes log at info (one line per enrolled pod, per error); commands for humans
// log warnings and errors only. NODEMESH_LOG_LEVEL overrides both.
if (process.env.GLIBC_TUNABLES === 'glibc.malloc.tcache_count=256') delete process.env.GLIBC_TUNABLES;
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
