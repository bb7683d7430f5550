/**
 * `npm run bench:l7` (and part of `npm run bench`): HTTP/1.1 through the node proxy's L7 path
 * (issue 14), one hop (client and server pods on one node), in the same run as its peers:
 *   direct             client pod to server pod, no proxy
 *   HAProxy http pair  the sidecar-style L7 peer: HAProxy in `mode http` (one thread) in each pod
 *                      behind nft REDIRECT, both parsing every request
 *   nodemesh L4        the Service without L7 config: the kernel relay
 *   nodemesh L7        the same Service with an HTTPRoute on its HTTP port: each request parsed,
 *                      routed and forwarded over pooled upstream connections
 *   nodemesh L7 server the Service without a route, its pod under an AuthorizationPolicy with a
 *                      request rule: each request read and authorized on the destination's side
 *   nodemesh L7 both   the route and the policy: read on both sides, as a sidecar pair does
 * Keep-alive requests/s (wrk, one thread, 32 connections), p50/p90/p99 at 1000 requests/s of 1 KB
 * over 10 connections, and proxy CPU per 1000 requests. And HTTP/2 (h2c, prior knowledge; nginx
 * answering on a second port): h2load's keep-alive requests/s (32 connections, 10 streams each)
 * and proxy CPU per 1000 requests, direct, through an HAProxy h2 pair, and through nodemesh's L7
 * path with an HTTPRoute on the HTTP/2 port. BENCH_ROUNDS=3 runs the peers and nodemesh rows in
 * three alternating rounds and reports medians (below). Writes bench/results/l7.json. Numbers,
 * not assertions.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { holdBlackhole } from '../src/runtime/blackhole.js';
import { runtimeEnv } from '../src/runtime/config.js';
import { validatePodSpec } from '../src/runtime/pod-spec.js';
import { LocalPodRuntime } from '../src/runtime/pods.js';
import type { PodRecord } from '../src/runtime/store.js';
import { waitForPodListener } from '../src/runtime/wait.js';
import { PACKAGE_ROOT } from '../src/shared/paths.js';
import { startSidecarPeer } from './sidecar-peer.js';
import { agentCommand, benchLayout, cpuSeconds, latencyFixedRate, h2Table, measureH2 as measureH2With, medianRun, ratioRange, roundRatio, writeNginxConf, wrk, type H2Scenario, type Latency } from './tools.js';

const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 5);
const SERVICE_IP = '10.96.0.53';
const HTTP_PORT = 80;
const APP_HTTP = 8080;
const H2_PORT = 81;
const APP_H2 = 8081;
const ADMIN = 15902;
/** BENCH_AGENT_ARGS="--jit full": extra agent flags, to compare settings (as bench/two-hop.ts). */
const AGENT_ARGS = (process.env['BENCH_AGENT_ARGS'] ?? '').split(' ').filter((a) => a !== '');
/**
 * BENCH_ROUNDS=N (default 1): the peers and the nodemesh rows N times, alternating, each row's
 * median run reported (by requests/s) and each ratio as the median of the rounds' own ratios
 * (a nodemesh run against the peer's run of the same round), with their range: this machine's
 * speed drifts by 15 % or more between runs, so one round's ratio can be off by that much.
 */
const ROUNDS = Math.max(1, Math.floor(Number(process.env['BENCH_ROUNDS'] ?? 1)) || 1);
/** BENCH_L7_ONLY=client|server|both|h2: that nodemesh row alone (profiling: BENCH_NODE_FLAGS="--cpu-prof --cpu-prof-dir=DIR"), nothing written. */
const ONLY = ((v) => (v === 'client' || v === 'server' || v === 'both' || v === 'h2' ? v : undefined))(process.env['BENCH_L7_ONLY']);

const say = (s: string): void => void process.stderr.write(`» ${s}\n`);

interface HttpScenario {
  keepAliveRps: number;
  latency: Latency;
  /** CPU seconds the proxies spent per 1000 keep-alive requests (null: no proxy). */
  proxyCpuSecPer1000Req: number | null;
}

async function measure(runtime: LocalPodRuntime, client: PodRecord, host: string, port: number, pids: () => number[]): Promise<HttpScenario> {
  await wrk(runtime, client, host, port, 1, true); // warm-up: JIT, pools
  const cpu0 = await cpuSeconds(pids());
  const ka = await wrk(runtime, client, host, port, SECONDS, true);
  const cpu1 = await cpuSeconds(pids());
  const latency = await latencyFixedRate(runtime, client, host, port, SECONDS);
  return { keepAliveRps: ka.rps, latency, proxyCpuSecPer1000Req: pids().length > 0 ? ((cpu1 - cpu0) / ka.requests) * 1000 : null };
}

/** An AuthorizationPolicy on the server pod with a request rule (GET and HEAD anywhere): its HTTP port is read per request on the destination's side. */
const POLICY = '---\napiVersion: security.nodemesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: server-reads, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{to: [{operation: {methods: [GET, HEAD]}}]}]\n';

const measureH2 = (runtime: LocalPodRuntime, client: PodRecord, host: string, port: number, pids: () => number[]): Promise<H2Scenario> => measureH2With(runtime, client, host, port, pids, SECONDS);

function serviceYaml(routed: boolean, authorized = false): string {
  const ports = `ports: [{name: http, port: ${HTTP_PORT}, targetPort: ${APP_HTTP}}, {name: http2, port: ${H2_PORT}, targetPort: ${APP_H2}}]`;
  const svc = `apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: default}\nspec:\n  clusterIP: ${SERVICE_IP}\n  selector: {app: server}\n  ${ports}\n`;
  const backend = `---\napiVersion: v1\nkind: Service\nmetadata: {name: server-v1, namespace: default}\nspec:\n  clusterIP: 10.96.0.54\n  selector: {app: server}\n  ${ports}\n`;
  const route = [HTTP_PORT, H2_PORT].map((p) => `---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: server-${p}, namespace: default}\nspec:\n  parentRefs: [{kind: Service, name: server, port: ${p}}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: server-v1, port: ${p}}]\n`).join('');
  return (routed ? svc + backend + route : svc) + (authorized ? POLICY : '');
}

/** Each row's runs, one per round, in order. */
interface Rounds {
  readonly sidecar: HttpScenario[];
  readonly sidecarH2: H2Scenario[];
  readonly l4: HttpScenario[];
  readonly l7: HttpScenario[];
  readonly l7Server: HttpScenario[];
  readonly l7Both: HttpScenario[];
  readonly l7H2: H2Scenario[];
}

async function main(): Promise<void> {
  const layout = await benchLayout({ workPrefix: 'nodemesh-bench-l7-', bridge: 'nmbl', podCidr4: { network: '10.204.0.0', prefix: 24 }, podCidr6: { network: 'fd00:6e64::', prefix: 64 }, namePrefix: 'nml', node: 'bench' });
  const { config, runtime, work, pinRoot } = layout;
  const cleanups: Array<() => Promise<unknown>> = [];
  let agent: ChildProcess | undefined;
  try {
    for (const ip of [SERVICE_IP, '10.96.0.54']) {
      const hole = await holdBlackhole(ip);
      cleanups.push(() => hole.release());
    }
    const nginxConf = await writeNginxConf(work, APP_HTTP, APP_H2);
    say('creating pods: server (nginx :8080, 1 KB answers) and client');
    const server = await runtime.create(validatePodSpec({ name: 'server', labels: ['app=server'], command: ['nginx', '-c', nginxConf] }), { detached: true });
    cleanups.push(() => runtime.remove(server, 1000));
    const started = (await runtime.start(server)).record;
    const client = await runtime.create(validatePodSpec({ name: 'client', labels: ['app=client'], command: ['sleep', 'infinity'] }), { detached: true });
    cleanups.push(() => runtime.remove(client, 1000));
    await runtime.start(client);
    await waitForPodListener(started.pid, APP_HTTP, 10_000);
    await waitForPodListener(started.pid, APP_H2, 10_000);

    const configDir = join(work, 'config');
    await mkdir(configDir);
    const env = { ...process.env, ...runtimeEnv(config), NODEMESH_LOG_LEVEL: 'warn' };
    const runAgent = async <T>(routed: boolean, authorized: boolean, run: (pids: () => number[]) => Promise<T>): Promise<T> => {
      await writeFile(join(configDir, 'mesh.yaml'), serviceYaml(routed, authorized));
      const child = spawn(...agentCommand(['agent', ...AGENT_ARGS, '--config-dir', configDir, '--bpf-root', pinRoot, '--metrics', '127.0.0.1:0', '--ready', '127.0.0.1:0', '--admin', `127.0.0.1:${ADMIN}`]), { env, stdio: 'inherit' });
      agent = child;
      try {
        for (let i = 0; ; i++) {
          const body = await fetch(`http://127.0.0.1:${ADMIN}/pods`).then((r) => r.json() as Promise<{ pods: Array<{ verified: boolean }> }>).catch(() => ({ pods: [] }));
          if (body.pods.length === 2 && body.pods.every((p) => p.verified)) break;
          if (i > 300) throw new Error('the agent did not verify the pods');
          await sleep(100);
        }
        return await run(() => [child.pid ?? 0]);
      } finally {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
        agent = undefined;
      }
    };
    cleanups.push(() => rm(pinRoot, { recursive: true, force: true }));
    if (ONLY === 'h2') {
      const row = await runAgent(true, false, (pids) => measureH2(runtime, client, SERVICE_IP, H2_PORT, pids));
      process.stdout.write(`${JSON.stringify({ only: ONLY, ...row })}\n`);
      return;
    }
    if (ONLY) {
      // One nodemesh row alone (profiling), nothing written.
      const [routed, authorized] = ({ client: [true, false], server: [false, true], both: [true, true] } as const)[ONLY];
      const row = await runAgent(routed, authorized, (pids) => measure(runtime, client, SERVICE_IP, HTTP_PORT, pids));
      process.stdout.write(`${JSON.stringify({ only: ONLY, ...row })}\n`);
      return;
    }
    say('direct pod to pod');
    const direct = await measure(runtime, client, server.ip4, APP_HTTP, () => []);
    const directH2 = await measureH2(runtime, client, server.ip4, APP_H2, () => []);

    const http1 = (pids: () => number[]): Promise<HttpScenario> => measure(runtime, client, SERVICE_IP, HTTP_PORT, pids);
    const runs: Rounds = { sidecar: [], sidecarH2: [], l4: [], l7: [], l7Server: [], l7Both: [], l7H2: [] };
    for (let round = 1; round <= ROUNDS; round++) {
      const of = ROUNDS > 1 ? ` (round ${round} of ${ROUNDS})` : '';
      // The agent that stopped left its capture pinned (as an agent does for the next one): the
      // pods' traffic would still go to a proxy that is gone. Its pins removed, nothing is attached.
      if (round > 1) await rm(pinRoot, { recursive: true, force: true });
      say(`sidecar peer: HAProxy mode http + nft REDIRECT in both pods${of}`);
      const peer = await startSidecarPeer(runtime, work, client, server, SERVICE_IP, [{ servicePort: HTTP_PORT, appPort: APP_HTTP, outboundPort: 15001, inboundPort: 15006 }], undefined, 'http');
      runs.sidecar.push(await measure(runtime, client, SERVICE_IP, HTTP_PORT, peer.pids));
      await peer.stop();
      say(`sidecar peer, HTTP/2: HAProxy mode http with proto h2 on both sides${of}`);
      const peerH2 = await startSidecarPeer(runtime, work, client, server, SERVICE_IP, [{ servicePort: H2_PORT, appPort: APP_H2, outboundPort: 15001, inboundPort: 15006 }], undefined, 'h2');
      runs.sidecarH2.push(await measureH2(runtime, client, SERVICE_IP, H2_PORT, peerH2.pids));
      await peerH2.stop();

      say(`nodemesh L4 (no L7 config: kernel relay)${of}`);
      runs.l4.push(await runAgent(false, false, http1));
      say(`nodemesh L7 (an HTTPRoute on the HTTP port: each request routed)${of}`);
      runs.l7.push(await runAgent(true, false, http1));
      say(`nodemesh L7 server side (a request-level AuthorizationPolicy on the server pod)${of}`);
      runs.l7Server.push(await runAgent(false, true, http1));
      say(`nodemesh L7 both sides (the route and the policy)${of}`);
      runs.l7Both.push(await runAgent(true, true, http1));
      say(`nodemesh L7, HTTP/2: an HTTPRoute on the h2 port (each stream routed, multiplexed upstream)${of}`);
      runs.l7H2.push(await runAgent(true, false, (pids) => measureH2(runtime, client, SERVICE_IP, H2_PORT, pids)));
    }
    const sidecar = medianRun(runs.sidecar);
    const sidecarH2 = medianRun(runs.sidecarH2);
    const l4 = medianRun(runs.l4);
    const l7 = medianRun(runs.l7);
    const l7Server = medianRun(runs.l7Server);
    const l7Both = medianRun(runs.l7Both);
    const l7H2 = medianRun(runs.l7H2);

    const f = (n: number | null, d = 2): string => (n === null ? '-' : n.toFixed(d));
    const rows: Array<[string, HttpScenario]> = [
      ['direct', direct],
      ['HAProxy mode http pair (2 hops)', sidecar],
      ['nodemesh L4 (1 hop)', l4],
      ['nodemesh L7 (1 hop)', l7],
      ['nodemesh L7 server side (1 hop)', l7Server],
      ['nodemesh L7 both sides (1 hop)', l7Both],
    ];
    const added = (s: HttpScenario): number => Math.round((s.latency.p90 - direct.latency.p90) * 1000) / 1000;
    const ratios = {
      rounds: ROUNDS,
      l7KeepAliveRpsVsHaproxyPair: roundRatio(runs.l7, runs.sidecar),
      l7ServerKeepAliveRpsVsHaproxyPair: roundRatio(runs.l7Server, runs.sidecar),
      l7BothKeepAliveRpsVsHaproxyPair: roundRatio(runs.l7Both, runs.sidecar),
      addedP90Ms: { haproxyPair: added(sidecar), nodemeshL7: added(l7), nodemeshL7Server: added(l7Server), nodemeshL7Both: added(l7Both), nodemeshL4: added(l4) },
      // vCPU per 1000 requests/s equals CPU seconds per 1000 requests.
      h2KeepAliveRpsVsHaproxyPair: roundRatio(runs.l7H2, runs.sidecarH2),
      ...(ROUNDS > 1 ? { rangeOverRounds: { l7: ratioRange(runs.l7, runs.sidecar), l7Server: ratioRange(runs.l7Server, runs.sidecar), l7Both: ratioRange(runs.l7Both, runs.sidecar), h2: ratioRange(runs.l7H2, runs.sidecarH2) } } : {}),
      vcpuPer1000Rps: { haproxyH2Pair: sidecarH2.proxyCpuSecPer1000Req, nodemeshL7H2: l7H2.proxyCpuSecPer1000Req, haproxyPair: sidecar.proxyCpuSecPer1000Req, nodemeshL7: l7.proxyCpuSecPer1000Req, nodemeshL7Server: l7Server.proxyCpuSecPer1000Req, nodemeshL7Both: l7Both.proxyCpuSecPer1000Req },
    };
    process.stdout.write(
      [
        `\nHTTP/1.1, 1 KB answers, one node, ${SECONDS} s runs${ROUNDS > 1 ? `, the median of ${ROUNDS} alternating rounds` : ''}`,
        '',
        '| path | keep-alive req/s | p50 ms | p90 ms | p99 ms | proxy CPU s / 1000 req |',
        '|---|---|---|---|---|---|',
        ...rows.map(([n, s]) => `| ${n} | ${f(s.keepAliveRps, 0)} | ${f(s.latency.p50, 3)} | ${f(s.latency.p90, 3)} | ${f(s.latency.p99, 3)} | ${f(s.proxyCpuSecPer1000Req, 3)} |`),
        '',
        `ratios: ${JSON.stringify(ratios)}`,
        '',
        ...h2Table('HTTP/2 (h2c), 1 KB answers, h2load 32 connections x 10 streams', [['direct', directH2], ['HAProxy h2 pair (2 hops)', sidecarH2], ['nodemesh L7 h2 (1 hop)', l7H2]]),
        '',
      ].join('\n'),
    );
    const outDir = join(PACKAGE_ROOT, 'bench', 'results');
    await mkdir(outDir, { recursive: true });
    await writeFile(join(outDir, 'l7.json'), JSON.stringify({ date: new Date().toISOString(), seconds: SECONDS, rounds: ROUNDS, direct, haproxyHttpPair: sidecar, nodemeshL4: l4, nodemeshL7: l7, nodemeshL7Server: l7Server, nodemeshL7Both: l7Both, h2: { direct: directH2, haproxyPair: sidecarH2, nodemeshL7: l7H2 }, ratios }, null, 2) + '\n');
  } finally {
    say('cleaning up');
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
