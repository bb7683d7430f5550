/**
 * `npm run bench:hardening`: what one pod's misbehaviour costs the others (issue 11), in the same
 * run, on local pods of this machine:
 *  - new-connection latency of a healthy pod, alone, and while another pod keeps 20 connects
 *    hanging on a destination that drops SYNs (before the fix, those held libuv's pool threads);
 *  - request latency of a healthy pod (keep-alive, 1000 req/s), alone, and while something
 *    scrapes the node's /metrics 50 times a second.
 * Prints a table and writes bench/results/hardening.json. Numbers, not assertions.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { holdBlackhole } from '../src/runtime/blackhole.js';
import { runtimeEnv } from '../src/runtime/config.js';
import { run } from '../src/shared/exec.js';
import { validatePodSpec } from '../src/runtime/pod-spec.js';
import type { PodRecord } from '../src/runtime/store.js';
import { waitForListener } from '../src/runtime/wait.js';
import { CLI_ENTRY, PACKAGE_ROOT } from '../src/shared/paths.js';
import { agentCommand, benchLayout, execIn, latencyFixedRate, type Latency } from './tools.js';

const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 5);
const HEALTHY_IP = '10.96.0.80';
const STUCK_IP = '10.96.0.81';
const say = (s: string): void => void process.stderr.write(`» ${s}\n`);

interface Series {
  readonly n: number;
  readonly failed: number;
  readonly p50: number;
  readonly p99: number;
  readonly max: number;
}

async function main(): Promise<void> {
  const layout = await benchLayout({ bridge: 'nmbh', podCidr4: { network: '10.203.0.0', prefix: 24 }, podCidr6: { network: 'fd00:6e63::', prefix: 64 }, namePrefix: 'nmb', node: 'bench' });
  const { config, runtime, work, pinRoot } = layout;
  const cleanups: Array<() => Promise<unknown>> = [];
  let agent: ChildProcess | undefined;
  try {
    for (const ip of [HEALTHY_IP, STUCK_IP]) {
      const hole = await holdBlackhole(ip);
      cleanups.push(() => hole.release());
    }
    const pod = async (name: string, labels: string[], command: string[]): Promise<PodRecord> => {
      const record = await runtime.create(validatePodSpec({ name, labels, command }), { detached: true });
      cleanups.push(() => runtime.remove(record, 1000));
      return (await runtime.start(record)).record;
    };
    const nginxConf = join(work, 'nginx.conf');
    await writeFile(
      nginxConf,
      `daemon off; worker_processes 1; pid ${work}/nginx.pid; error_log stderr;\nevents { worker_connections 4096; }\nhttp { access_log off; keepalive_requests 1000000; server { listen 8080; location / { return 200 "${'x'.repeat(1024)}"; } } }\n`,
    );
    say('pods: server (nginx :8080, echo :9000), stuck (drops SYNs to :9090), healthy and stalling clients');
    const server = await pod('server', ['app=server'], ['sh', '-c', `nginx -c ${nginxConf} & exec ${process.execPath} ${CLI_ENTRY} debug echo-server --port 9000`]);
    const stuck = await pod('stuck', ['app=stuck'], [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', '9090']);
    const healthy = await pod('healthy', ['app=healthy'], ['sleep', 'infinity']);
    const stalling = await pod('stalling', ['app=stalling'], ['sleep', 'infinity']);
    await waitForListener(server.ip4, 8080, 10_000);
    await waitForListener(server.ip4, 9000, 10_000);
    await waitForListener(stuck.ip4, 9090, 10_000);
    for (const args of [['add', 'table', 'inet', 'nmb'], ['add', 'chain', 'inet', 'nmb', 'input', '{ type filter hook input priority 0 ; }'], ['add', 'rule', 'inet', 'nmb', 'input', 'tcp', 'dport', '9090', 'tcp', 'flags', 'syn', 'drop']]) {
      await run('ip', ['netns', 'exec', stuck.netns, 'nft', ...args]);
    }

    const configDir = join(work, 'config');
    await mkdir(configDir);
    const svc = (name: string, ip: string, app: string, ports: string): string => `apiVersion: v1\nkind: Service\nmetadata: {name: ${name}}\nspec:\n  clusterIP: ${ip}\n  selector: {app: ${app}}\n  ports: [${ports}]\n---\n`;
    await writeFile(join(configDir, 'services.yaml'), svc('server', HEALTHY_IP, 'server', '{name: http, port: 80, targetPort: 8080}, {name: echo, port: 9000}') + svc('stuck', STUCK_IP, 'stuck', '{name: tcp, port: 80, targetPort: 9090}'));
    // The agent checks pods against the runtime's subnets and cgroup subtree: it gets the same config.
    const env = { ...process.env, ...runtimeEnv(config), NODEMESH_LOG_LEVEL: 'warn' };
    agent = spawn(...agentCommand(['agent', '--config-dir', configDir, '--bpf-root', pinRoot, '--metrics', '127.0.0.1:15922', '--ready', '127.0.0.1:15923', '--admin', '127.0.0.1:15924']), { env, stdio: 'inherit' });
    const started = agent;
    cleanups.push(async () => {
      if (started.exitCode === null && started.signalCode === null) {
        const exited = new Promise((r) => started.once('exit', r));
        started.kill('SIGTERM');
        await exited;
      }
      await rm(pinRoot, { recursive: true, force: true });
    });
    for (let i = 0; ; i++) {
      const status = await fetch('http://127.0.0.1:15923/healthz/ready').then((r) => r.status).catch(() => 0);
      if (status === 200) break;
      if (i > 300) throw new Error('the agent did not get ready');
      await sleep(100);
    }

    const count = Math.max(100, SECONDS * 100);
    const series = async (): Promise<Series> => JSON.parse((await execIn(runtime, healthy, [process.execPath, CLI_ENTRY, 'debug', 'dial-series', HEALTHY_IP, '9000', '--count', String(count), '--rate', '100'])).stdout.trim().split('\n').pop() ?? '{}') as Series;

    say(`new connections from a healthy pod, alone (${count} at 100/s)`);
    const alone = await series();
    say('the same while another pod keeps 20 connects hanging on a SYN-dropping destination');
    const flood = execIn(runtime, stalling, [process.execPath, CLI_ENTRY, 'debug', 'flood', STUCK_IP, '80', '--connections', '20', '--hold', String(SECONDS * 1000 + 6000)]);
    await sleep(500);
    const stalled = await series();
    await flood;

    say('keep-alive requests from the healthy pod at 1000/s, alone');
    const quiet = await latencyFixedRate(runtime, healthy, HEALTHY_IP, 80, SECONDS);
    say('the same while /metrics is scraped 50 times a second');
    let scraping = true;
    const scrapes = (async () => {
      let n = 0;
      while (scraping) {
        const t = performance.now();
        await fetch('http://127.0.0.1:15922/metrics').then((r) => r.text()).catch(() => '');
        n++;
        await sleep(Math.max(0, 20 - (performance.now() - t)));
      }
      return n;
    })();
    const scraped = await latencyFixedRate(runtime, healthy, HEALTHY_IP, 80, SECONDS);
    scraping = false;
    const scrapeCount = await scrapes;

    const row = (what: string, s: Series): string => `${what.padEnd(46)} ${s.p50.toFixed(2).padStart(8)} ${s.p99.toFixed(2).padStart(8)} ${s.max.toFixed(2).padStart(9)} ${String(s.failed).padStart(7)}`;
    const lat = (what: string, l: Latency): string => `${what.padEnd(46)} ${l.p50.toFixed(3).padStart(8)} ${l.p99.toFixed(3).padStart(8)} ${l.rps.toFixed(0).padStart(9)}`;
    process.stdout.write(
      [
        '',
        `new connections of a healthy pod (ms)${' '.repeat(9)}      p50      p99       max  failed`,
        row('alone', alone),
        row('while 20 connects hang in another pod', stalled),
        '',
        `keep-alive requests, 1000/s (ms)${' '.repeat(14)}      p50      p99     req/s`,
        lat('alone', quiet),
        lat(`while /metrics is scraped ${(scrapeCount / SECONDS).toFixed(0)}/s`, scraped),
        '',
      ].join('\n'),
    );
    await mkdir(join(PACKAGE_ROOT, 'bench', 'results'), { recursive: true });
    await writeFile(join(PACKAGE_ROOT, 'bench', 'results', 'hardening.json'), JSON.stringify({ seconds: SECONDS, newConnections: { alone, stalled }, keepAlive: { quiet, scraped, scrapesPerSecond: scrapeCount / SECONDS } }, null, 2) + '\n');
  } finally {
    for (const c of cleanups.reverse()) await c().catch((e: unknown) => say(`cleanup: ${(e as Error).message}`));
    await layout.remove(say);
  }
}

await main();
