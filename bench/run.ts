/**
 * `npm run bench`: nodemesh L4 against direct pod-to-pod traffic and a sidecar-style peer
 * (HAProxy behind nft REDIRECT in each pod), all in the same run, on local pods of this machine.
 * Prints a table and writes bench/results/latest.json. Not a test: numbers, not assertions.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { holdBlackhole, type Blackhole } from '../src/runtime/blackhole.js';
import { runtimeEnv } from '../src/runtime/config.js';
import { validatePodSpec } from '../src/runtime/pod-spec.js';
import { waitForListener } from '../src/runtime/wait.js';
import { PACKAGE_ROOT } from '../src/shared/paths.js';
import { startSidecarPeer } from './sidecar-peer.js';
import { IPERF_PORT, agentCommand, benchLayout, measure, rssMiB, scenarioTable, writeNginxConf, type Scenario } from './tools.js';

const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 5);
const SERVICE_IP = '10.96.0.50';
const HTTP_PORT = 80;
const APP_HTTP = 8080;
const POD_COUNTS = (process.env['BENCH_PODS'] ?? '1,10,100').split(',').map(Number);
const RSS_SETTLE_MS = 15_000;
/** kernel (splice in the addon, the default) or js (node streams), to compare the two. */
const RELAY = process.env['BENCH_RELAY'] ?? 'kernel';

const say = (s: string): void => void process.stderr.write(`» ${s}\n`);

async function main(): Promise<void> {
  const layout = await benchLayout({ bridge: 'nmbb', podCidr4: { network: '10.202.0.0', prefix: 22 }, podCidr6: { network: 'fd00:6e62::', prefix: 64 }, namePrefix: 'nmb', node: 'bench' });
  const { config, runtime, work, pinRoot } = layout;
  const cleanups: Array<() => Promise<unknown>> = [];
  let agent: ChildProcess | undefined;
  const results: Record<string, unknown> = { relay: RELAY, machine: { cpus: (await import('node:os')).cpus().length, kernel: (await import('node:os')).release() }, seconds: SECONDS };
  try {
    const hole: Blackhole = await holdBlackhole(SERVICE_IP);
    cleanups.push(() => hole.release());

    const nginxConf = await writeNginxConf(work, APP_HTTP);
    say('creating pods: server (nginx :8080 with 1 KB responses, iperf3 :5201) and client');
    const server = await runtime.create(
      validatePodSpec({ name: 'server', labels: ['app=server'], command: ['sh', '-c', `nginx -c ${nginxConf} & exec iperf3 -s -p ${IPERF_PORT}`] }),
      { detached: true },
    );
    cleanups.push(() => runtime.remove(server, 1000));
    await runtime.start(server);
    const client = await runtime.create(validatePodSpec({ name: 'client', labels: ['app=client'], command: ['sleep', 'infinity'] }), { detached: true });
    cleanups.push(() => runtime.remove(client, 1000));
    await runtime.start(client);
    await waitForListener(server.ip4, APP_HTTP, 10_000);
    await waitForListener(server.ip4, IPERF_PORT, 10_000);

    say('direct pod to pod');
    const direct = await measure(runtime, client, server.ip4, APP_HTTP, () => [], SECONDS);

    say('sidecar peer: HAProxy + nft REDIRECT in both pods');
    const peer = await startSidecarPeer(runtime, work, client, server, SERVICE_IP, [
      { servicePort: HTTP_PORT, appPort: APP_HTTP, outboundPort: 15001, inboundPort: 15006 },
      { servicePort: IPERF_PORT, appPort: IPERF_PORT, outboundPort: 15002, inboundPort: 15007 },
    ]);
    const sidecar = await measure(runtime, client, SERVICE_IP, HTTP_PORT, peer.pids, SECONDS);
    await peer.stop();

    say('nodemesh L4: agent, capture, outbound + inbound proxy');
    const configDir = join(work, 'config');
    await mkdir(configDir);
    await writeFile(
      join(configDir, 'service.yaml'),
      `apiVersion: v1\nkind: Service\nmetadata: {name: server}\nspec:\n  clusterIP: ${SERVICE_IP}\n  selector: {app: server}\n  ports: [{name: http, port: ${HTTP_PORT}, targetPort: ${APP_HTTP}}, {name: iperf, port: ${IPERF_PORT}}]\n`,
    );
    // The agent checks pods against the runtime's subnets and cgroup subtree: it gets the same config.
    const env = { ...process.env, ...runtimeEnv(config), NODEMESH_LOG_LEVEL: 'warn' };
    const startAgent = (extra: ReadonlyArray<string> = []): ChildProcess => {
      const child = spawn(...agentCommand(['agent', ...extra, '--config-dir', configDir, '--bpf-root', pinRoot, '--metrics', '127.0.0.1:0', '--ready', '127.0.0.1:15921', '--admin', '127.0.0.1:15900', '--relay', RELAY]), { env, stdio: 'inherit' });
      agent = child;
      return child;
    };
    const stopAgent = async (child: ChildProcess): Promise<void> => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    };
    cleanups.push(async () => {
      if (agent) await stopAgent(agent);
      await rm(pinRoot, { recursive: true, force: true });
    });
    const waitVerified = async (n: number): Promise<void> => {
      for (let i = 0; i < 600; i++) {
        const body = await fetch('http://127.0.0.1:15900/pods').then((r) => r.json() as Promise<{ pods: Array<{ verified: boolean }> }>).catch(() => ({ pods: [] }));
        if (body.pods.length === n && body.pods.every((p) => p.verified)) return;
        await sleep(200);
      }
      throw new Error(`agent did not verify ${n} pods`);
    };
    const loaded = startAgent();
    await waitVerified(2);
    const mesh = await measure(runtime, client, SERVICE_IP, HTTP_PORT, () => [loaded.pid ?? 0], SECONDS);
    const rssAfterLoad = await rssMiB(loaded.pid ?? 0);
    await stopAgent(loaded);

    // The same with TurboFan (`--jit full`): what the default's lower memory costs in speed.
    say('nodemesh L4 with --jit full');
    const fullJit = startAgent(['--jit', 'full']);
    await waitVerified(2);
    const meshFullJit = await measure(runtime, client, SERVICE_IP, HTTP_PORT, () => [fullJit.pid ?? 0], SECONDS);
    const rssAfterLoadFullJit = await rssMiB(fullJit.pid ?? 0);

    // RSS by enrolled pods, from a fresh agent: what the pods cost, not what a load burst left
    // in the heap (that is rssAfterLoad). Pods stay captured across the restart (pinned links).
    say('agent RSS with more enrolled pods (fresh agent)');
    await stopAgent(fullJit);
    const fresh = startAgent();
    const rss: Record<string, { afterEnroll: number; steady: number }> = {};
    let pods = 2;
    for (const target of POD_COUNTS) {
      while (pods < target) {
        const p = await runtime.create(validatePodSpec({ name: `idle-${pods}`, command: ['sleep', 'infinity'] }), { detached: true });
        cleanups.push(() => runtime.remove(p, 1000));
        await runtime.start(p);
        pods++;
      }
      await waitVerified(Math.max(pods, 2));
      await sleep(1000);
      const afterEnroll = await rssMiB(fresh.pid ?? 0);
      // V8 gives back heap it grew during the enrollment burst once the agent is idle a while.
      await sleep(RSS_SETTLE_MS);
      rss[String(Math.max(target, pods))] = { afterEnroll, steady: await rssMiB(fresh.pid ?? 0) };
    }

    const ratio = (a: number, b: number): number => Math.round((a / b) * 100) / 100;
    // Proxy hops on the measured path: the sidecar peer has two (client and server sidecar);
    // nodemesh has one here, as both pods are on this node (same-node fast path).
    const hops = { sidecar: 2, nodemesh: 1 };
    const addedP90 = (s: Scenario): number => Math.round((s.latency.p90 - direct.latency.p90) * 1000) / 1000;
    Object.assign(results, { direct, sidecar, nodemesh: mesh, nodemeshFullJit: meshFullJit, agentRssMiB: rss, agentRssAfterLoadMiB: { baseline: rssAfterLoad, fullJit: rssAfterLoadFullJit }, ratios: {
      throughputVsSidecar: ratio(mesh.throughputGbps, sidecar.throughputGbps),
      keepAliveRpsVsSidecar: ratio(mesh.keepAliveRps, sidecar.keepAliveRps),
      newConnRpsVsSidecar: ratio(mesh.newConnRps, sidecar.newConnRps),
      newConnRpsVsSidecarFullJit: ratio(meshFullJit.newConnRps, sidecar.newConnRps),
      throughputVsDirect: ratio(mesh.throughputGbps, direct.throughputGbps),
      addedP90Ms: { sidecar: addedP90(sidecar), nodemesh: addedP90(mesh) },
      addedP90MsPerHop: { sidecar: addedP90(sidecar) / hops.sidecar, nodemesh: addedP90(mesh) / hops.nodemesh },
      proxyHops: hops,
    } });

    const rows: Array<[string, Scenario]> = [['direct', direct], ['sidecar (HAProxy+nft)', sidecar], ['nodemesh L4', mesh], ['nodemesh L4, --jit full', meshFullJit]];
    const lines = [
      ...scenarioTable(rows),
      '',
      `agent RSS (MiB) by enrolled pods, fresh agent, 1 s / ${RSS_SETTLE_MS / 1000} s after enrolling: ${Object.entries(rss).map(([n, m]) => `${n}: ${m.afterEnroll.toFixed(1)} / ${m.steady.toFixed(1)}`).join(', ')}; after the load runs: ${rssAfterLoad.toFixed(1)} (--jit full: ${rssAfterLoadFullJit.toFixed(1)})`,
      `ratios: ${JSON.stringify(results['ratios'])}`,
    ];
    process.stdout.write(lines.join('\n') + '\n');
    const outDir = join(PACKAGE_ROOT, 'bench', 'results');
    await mkdir(outDir, { recursive: true });
    await writeFile(join(outDir, 'latest.json'), JSON.stringify({ date: new Date().toISOString(), ...results }, null, 2) + '\n');
    say(`wrote ${join(outDir, 'latest.json')}`);
  } finally {
    say('cleaning up');
    // The agent goes first: pods removed under a running agent are reported as errors.
    if (agent && agent.exitCode === null && agent.signalCode === null) {
      const exited = new Promise((r) => agent?.once('exit', r));
      agent.kill('SIGTERM');
      await exited;
    }
    for (const c of cleanups.reverse()) await c().catch((e: unknown) => say(`cleanup: ${(e as Error).message}`));
    await layout.remove(say);
  }
}

await main();
