/**
 * `npm run bench:memory`: where the agent's resident memory goes with N enrolled pods
 * (BENCH_PODS, default 100). Starts N idle local pods and one agent, waits until every pod is
 * verified and the agent has been idle a while, then prints VmRSS and a breakdown of
 * /proc/PID/smaps (node binary, other files, V8 and malloc heap, thread stacks). Not a test.
 * BENCH_GROW=1 starts the agent with 2 pods and adds the others while it runs (as npm run bench
 * does). BENCH_NODE_FLAGS (e.g. "--max-opt=1") runs the agent under `node FLAGS` instead of the flags
 * of bin/nodemesh.js, to compare.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { runtimeEnv } from '../src/runtime/config.js';
import { validatePodSpec } from '../src/runtime/pod-spec.js';
import { agentCommand, benchLayout, cpuSeconds } from './tools.js';

const PODS = Number(process.env['BENCH_PODS'] ?? 100);
const SETTLE_MS = Number(process.env['BENCH_SETTLE_MS'] ?? 15_000);
const say = (s: string): void => void process.stderr.write(`» ${s}\n`);

interface Breakdown {
  rssKiB: number;
  byKind: Record<string, number>;
  threads: number;
}

/** Resident KiB per kind of mapping, from /proc/PID/smaps. */
async function breakdown(pid: number): Promise<Breakdown> {
  const smaps = await readFile(`/proc/${pid}/smaps`, 'utf8');
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const byKind: Record<string, number> = {};
  let kind = '';
  for (const line of smaps.split('\n')) {
    const head = /^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      const [, perms, name] = head as unknown as [string, string, string];
      if (name.endsWith('/node') || name.endsWith('/nodejs')) kind = `node binary ${perms}`;
      else if (name.endsWith('.node')) kind = 'native addon';
      else if (name.startsWith('/')) kind = 'other files';
      else if (name === '[heap]') kind = 'malloc [heap]';
      else if (name.startsWith('[stack')) kind = 'main stack';
      else if (name === '') kind = perms === 'rw-p' ? 'anonymous rw (V8 heap, malloc arenas, thread stacks)' : `anonymous ${perms}`;
      else kind = name;
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss) byKind[kind] = (byKind[kind] ?? 0) + Number(rss[1]);
  }
  return {
    rssKiB: Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1]),
    byKind,
    threads: Number(/Threads:\s+(\d+)/.exec(status)?.[1]),
  };
}

async function main(): Promise<void> {
  const layout = await benchLayout({ label: 'benchmem', bridge: 'nmbm', podCidr4: { network: '10.203.0.0', prefix: 22 }, podCidr6: { network: 'fd00:6e63::', prefix: 64 }, namePrefix: 'nmm', node: 'bench' });
  const { config, runtime, work, pinRoot } = layout;
  const cleanups: Array<() => Promise<unknown>> = [];
  let agent: ChildProcess | undefined;
  try {
    const configDir = join(work, 'config');
    await mkdir(configDir);
    await writeFile(join(configDir, 'service.yaml'), 'apiVersion: v1\nkind: Service\nmetadata: {name: idle}\nspec:\n  clusterIP: 10.96.0.60\n  selector: {app: idle}\n  ports: [{port: 80}]\n');
    const addPods = async (from: number, to: number): Promise<void> => {
      for (let i = from; i < to; i++) {
        const p = await runtime.create(validatePodSpec({ name: `idle-${i}`, labels: ['app=idle'], command: ['sleep', 'infinity'] }), { detached: true });
        cleanups.push(() => runtime.remove(p, 1000));
        await runtime.start(p);
      }
    };
    // BENCH_GROW=1: the agent starts with 2 pods and enrolls the others as they come (as in npm run bench).
    const grow = process.env['BENCH_GROW'] === '1';
    const before = grow ? Math.min(2, PODS) : PODS;
    say(`creating ${before} idle pods`);
    await addPods(0, before);
    // The agent checks pods against the runtime's subnets and cgroup subtree: it gets the same config.
    const env = { ...process.env, ...runtimeEnv(config), NODEMESH_LOG_LEVEL: 'warn' };
    agent = spawn(...agentCommand(['agent', '--config-dir', configDir, '--bpf-root', pinRoot, '--metrics', '127.0.0.1:0', '--ready', '127.0.0.1:0', '--admin', '127.0.0.1:15901']), { env, stdio: 'inherit' });
    cleanups.push(async () => {
      if (agent && agent.exitCode === null && agent.signalCode === null) {
        const exited = new Promise((r) => agent?.once('exit', r));
        agent.kill('SIGTERM');
        await exited;
      }
      await rm(pinRoot, { recursive: true, force: true });
    });
    if (grow) {
      say(`creating ${PODS - before} more while the agent runs`);
      await addPods(before, PODS);
    }
    say('waiting for the agent to verify every pod');
    for (let i = 0; ; i++) {
      const body = await fetch('http://127.0.0.1:15901/pods').then((r) => r.json() as Promise<{ pods: Array<{ verified: boolean }> }>).catch(() => ({ pods: [] }));
      if (body.pods.length === PODS && body.pods.every((p) => p.verified)) break;
      if (i > 600) throw new Error(`agent did not verify ${PODS} pods`);
      await sleep(200);
    }
    const enrolled = await breakdown(agent.pid ?? 0);
    say(`all verified; idle for ${SETTLE_MS / 1000} s`);
    const cpuBefore = await cpuSeconds([agent.pid ?? 0]);
    await sleep(SETTLE_MS);
    const idleCpuMsPerS = ((await cpuSeconds([agent.pid ?? 0])) - cpuBefore) * 1000 / (SETTLE_MS / 1000);
    const steady = await breakdown(agent.pid ?? 0);
    const heap = (await fetch('http://127.0.0.1:15901/debug/memory').then((r) => r.json())) as Record<string, number>;
    const mib = (k: number): string => (k / 1024).toFixed(1);
    const kinds = Object.keys(steady.byKind).sort((a, b) => (steady.byKind[b] ?? 0) - (steady.byKind[a] ?? 0));
    process.stdout.write(
      [
        `agent with ${PODS} enrolled pods${grow ? ' (enrolled as they came)' : ''}: VmRSS ${mib(enrolled.rssKiB)} MiB when all verified, ${mib(steady.rssKiB)} MiB after ${SETTLE_MS / 1000} s idle; ${steady.threads} threads; CPU while idle ${idleCpuMsPerS.toFixed(1)} ms/s`,
        `V8 heap after idle: total ${mib((heap['heapTotal'] ?? 0) / 1024)} MiB, used ${mib((heap['heapUsed'] ?? 0) / 1024)} MiB, external ${mib((heap['external'] ?? 0) / 1024)} MiB`,
        '| mapping | MiB (verified) | MiB (idle) |',
        '|---|---|---|',
        ...kinds.map((k) => `| ${k} | ${mib(enrolled.byKind[k] ?? 0)} | ${mib(steady.byKind[k] ?? 0)} |`),
      ].join('\n') + '\n',
    );
  } finally {
    say('cleaning up');
    for (const c of cleanups.reverse()) await c().catch((e: unknown) => say(`cleanup: ${(e as Error).message}`));
    await layout.remove(say);
  }
}

await main();
