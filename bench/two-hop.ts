/**
 * `npm run bench:two-hop` (and part of `npm run bench`): a client pod on node A, a server pod on
 * node B, both on this machine, in the same run: direct pod to pod; the sidecar peer (HAProxy
 * behind nft REDIRECT in each pod) in plaintext and with mutual TLS between the HAProxies; and
 * nodemesh through both node proxies, with an HBONE tunnel (mutual TLS, HTTP/2) between them and
 * in plaintext (the server's PeerAuthentication set to DISABLE, so A sends plain TCP to B's
 * inbound listener). L7 over two hops: nodemesh with an HTTPRoute on the Service (each request
 * routed on A) and a request-level AuthorizationPolicy on the server (each request authorized on
 * B), inside HBONE; against HAProxy in `mode http` in both pods with mutual TLS between them; and
 * the same over HTTP/2 (h2c, h2load's keep-alive requests/s and CPU) against HAProxy `proto h2`
 * pairs with mutual TLS. Throughput, keep-alive and new-connection requests/s, p50/p90/p99 at a fixed
 * rate of 1 KB requests, proxy CPU per 1000 requests, and the tunnel reuse. BENCH_L7_ONLY=1
 * BENCH_L7_H2=1 adds the HTTP/2 row to the L7 row alone. BENCH_ROUNDS=N (default 3) runs the L7
 * rows, their peers and direct N times, alternating (the agents restarted each round, taking over
 * the pods): each L7 ratio is the median of the rounds' own ratios, with their range, since this
 * machine's speed drifts by 15 % or more between runs. Writes bench/results/two-hop.json.
 * Numbers, not assertions.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { holdBlackhole } from '../src/runtime/blackhole.js';
import { runtimeEnv } from '../src/runtime/config.js';
import { validatePodSpec } from '../src/runtime/pod-spec.js';
import { waitForListener } from '../src/runtime/wait.js';
import { PACKAGE_ROOT } from '../src/shared/paths.js';
import { startSidecarPeer, writeSidecarTls } from './sidecar-peer.js';
import { IPERF_PORT, agentCommand, benchLayout, measure as measureWith, h2Table, measureH2 as measureH2With, median, medianRun, ratioRange, roundRatio, rssMiB, scenarioTable, writeNginxConf, type H2Scenario, type Scenario } from './tools.js';
import type { PodRecord } from '../src/runtime/store.js';

const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 5);
/** BENCH_HBONE_ONLY=1: the HBONE row alone (profiling: BENCH_NODE_FLAGS="--cpu-prof --cpu-prof-dir=DIR"), nothing written. */
const HBONE_ONLY = process.env['BENCH_HBONE_ONLY'] === '1';
/** BENCH_L7_ONLY=1: the L7 row alone (profiling, as HBONE_ONLY), nothing written. */
const L7_ONLY = process.env['BENCH_L7_ONLY'] === '1';
/** BENCH_AGENT_ARGS="--jit full": extra agent flags, to compare settings in the same way. */
const AGENT_ARGS = (process.env['BENCH_AGENT_ARGS'] ?? '').split(' ').filter((a) => a !== '');
const ROUNDS = Math.max(1, Math.floor(Number(process.env['BENCH_ROUNDS'] ?? 3)) || 1);
const SERVICE_IP = '10.96.0.52';
const HTTP_PORT = 80;
const APP_HTTP = 8080;
/** HTTP/2 with prior knowledge (h2c): the Service's port and nginx's. */
const H2_PORT = 81;
const APP_H2 = 8081;
const PORTS = { grpcTls: 15812, cpHttp: 15814, a: { metrics: 15820, ready: 15821, admin: 15800 }, b: { metrics: 15830, ready: 15831, admin: 15801 } };

const say = (s: string): void => void process.stderr.write(`» ${s}\n`);

async function metric(port: number, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) total += Number(line.split(' ').pop());
  }
  return total;
}

async function main(): Promise<void> {
  const layout = await benchLayout({ bridge: 'nmbt', podCidr4: { network: '10.203.0.0', prefix: 24 }, podCidr6: { network: 'fd00:6e63::', prefix: 64 }, namePrefix: 'nmt', node: 'bench-a' });
  const { config, runtime, work, pinRoot: pinBase } = layout;
  const children: ChildProcess[] = [];
  const cleanups: Array<() => Promise<unknown>> = [];
  const measure = (client: PodRecord, host: string, httpPort: number, pids: () => number[]): Promise<Scenario> => measureWith(runtime, client, host, httpPort, pids, SECONDS);
  const measureH2 = (client: PodRecord, host: string, port: number, pids: () => number[]): Promise<H2Scenario> => measureH2With(runtime, client, host, port, pids, SECONDS);
  try {
    const hole = await holdBlackhole(SERVICE_IP);
    cleanups.push(() => hole.release());
    const nginxConf = await writeNginxConf(work, APP_HTTP, APP_H2);
    const env = { ...process.env, ...runtimeEnv(config), NODEMESH_LOG_LEVEL: 'warn' };
    const start = (args: string[]): ChildProcess => {
      const child = spawn(...agentCommand(args), { env, stdio: 'inherit' });
      children.push(child);
      return child;
    };

    // The control plane and both agents first: the pods are handed over as they start.
    const caDir = join(work, 'ca');
    const configDir = join(work, 'config');
    await mkdir(configDir);
    await writeFile(
      join(configDir, 'service.yaml'),
      `apiVersion: v1\nkind: Service\nmetadata: {name: server}\nspec:\n  clusterIP: ${SERVICE_IP}\n  selector: {app: server}\n  ports: [{name: http, port: ${HTTP_PORT}, targetPort: ${APP_HTTP}}, {name: http2, port: ${H2_PORT}, targetPort: ${APP_H2}}, {name: tcp-iperf, port: ${IPERF_PORT}}]\n`,
    );
    say('control plane (TLS) and two agents, nodes bench-a and bench-b');
    start(['control-plane', '--config-dir', configDir, '--listen-tls', `127.0.0.1:${PORTS.grpcTls}`, '--ca-dir', caDir, '--http', `127.0.0.1:${PORTS.cpHttp}`]);
    for (let i = 0; (await fetch(`http://127.0.0.1:${PORTS.cpHttp}/healthz/ready`).then((r) => r.status).catch(() => 0)) !== 200; i++) {
      if (i > 100) throw new Error('the control plane did not become ready');
      await sleep(200);
    }
    const agents: Record<'a' | 'b', ChildProcess> = { a: undefined as unknown as ChildProcess, b: undefined as unknown as ChildProcess };
    const startAgents = async (): Promise<void> => {
      for (const n of ['a', 'b'] as const) {
        const p = PORTS[n];
        agents[n] = start(['agent', '--node', `bench-${n}`, '--control-plane', `127.0.0.1:${PORTS.grpcTls}`, '--ca-root', join(caDir, 'root-cert.pem'), '--bpf-root', `${pinBase}/${n}`, '--metrics', `127.0.0.1:${p.metrics}`, '--ready', `127.0.0.1:${p.ready}`, '--admin', `127.0.0.1:${p.admin}`, ...AGENT_ARGS]);
        for (let i = 0; (await fetch(`http://127.0.0.1:${p.ready}/healthz/ready`).then((r) => r.status).catch(() => 0)) !== 200; i++) {
          if (i > 100) throw new Error(`the agent of bench-${n} did not become ready`);
          await sleep(200);
        }
      }
    };
    // The agents go (the pods stay, captured by their pinned links but unserved): direct and the
    // sidecar peer need the pods without capture, so the pins go too.
    const stopAgents = async (): Promise<void> => {
      for (const c of [agents.a, agents.b]) {
        if (c.exitCode !== null || c.signalCode !== null) continue;
        const exited = new Promise((r) => c.once('exit', r));
        c.kill('SIGTERM');
        await exited;
      }
      await rm(pinBase, { recursive: true, force: true });
    };
    await startAgents();
    cleanups.push(() => rm(pinBase, { recursive: true, force: true }));

    say('pods: server on bench-b (nginx :8080 and h2c :8081 with 1 KB responses, iperf3 :5201), client on bench-a');
    const server = await runtime.create(validatePodSpec({ name: 'server', node: 'bench-b', serviceAccount: 'server', labels: ['app=server'], command: ['sh', '-c', `nginx -c ${nginxConf} & exec iperf3 -s -p ${IPERF_PORT}`] }), { detached: true });
    cleanups.push(() => runtime.remove(server, 1000));
    await runtime.start(server);
    const client = await runtime.create(validatePodSpec({ name: 'client', node: 'bench-a', serviceAccount: 'client', labels: ['app=client'], command: ['sleep', 'infinity'] }), { detached: true });
    cleanups.push(() => runtime.remove(client, 1000));
    await runtime.start(client);
    await waitForListener(server.ip4, APP_HTTP, 10_000);
    await waitForListener(server.ip4, APP_H2, 10_000);
    await waitForListener(server.ip4, IPERF_PORT, 10_000);

    /** Writes (or, with '', removes) a config file and waits until both agents acknowledged it. */
    const applyConfig = async (file: string, yaml: string): Promise<void> => {
      const before = (await fetch(`http://127.0.0.1:${PORTS.cpHttp}/debug/nodes`).then((r) => r.json()) as { version: number }).version;
      if (yaml === '') await rm(join(configDir, file), { force: true });
      else await writeFile(join(configDir, file), yaml);
      for (let i = 0; ; i++) {
        const { version, nodes } = (await fetch(`http://127.0.0.1:${PORTS.cpHttp}/debug/nodes`).then((r) => r.json())) as { version: number; nodes: Array<{ inSync: boolean; ackedVersion: number }> };
        if (version > before && nodes.length === 2 && nodes.every((n) => n.inSync && n.ackedVersion === version)) break;
        if (i > 100) throw new Error(`the agents did not take ${file}`);
        await sleep(100);
      }
    };

    /** Waits until both (restarted) agents serve their pod: verified, certified, with the control plane's latest config. */
    const podsServed = async (): Promise<void> => {
      for (let i = 0; ; i++) {
        const { version } = (await fetch(`http://127.0.0.1:${PORTS.cpHttp}/debug/nodes`).then((r) => r.json())) as { version: number };
        const views = await Promise.all(
          (['a', 'b'] as const).map((n) =>
            fetch(`http://127.0.0.1:${PORTS[n].admin}/pods`)
              .then((r) => r.json() as Promise<{ controlPlane?: { version: number }; pods: Array<{ verified: boolean; configured: boolean; certified: boolean }> }>)
              .catch(() => undefined),
          ),
        );
        if (views.every((v) => v?.controlPlane?.version === version && v.pods.length === 1 && v.pods.every((p) => p.verified && p.configured && p.certified))) return;
        if (i > 300) throw new Error(`the restarted agents did not serve their pods: ${JSON.stringify(views)}`);
        await sleep(100);
      }
    };

    /** An HTTPRoute on the Service (read on A) and a request-level AuthorizationPolicy on the server (read on B). */
    const l7Yaml = [
      `apiVersion: v1\nkind: Service\nmetadata: {name: server-v1}\nspec:\n  clusterIP: 10.96.0.57\n  selector: {app: server}\n  ports: [{name: http, port: ${HTTP_PORT}, targetPort: ${APP_HTTP}}, {name: http2, port: ${H2_PORT}, targetPort: ${APP_H2}}]\n`,
      ...[HTTP_PORT, H2_PORT].map((p) => `apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: server-${p}}\nspec:\n  parentRefs: [{kind: Service, name: server, port: ${p}}]\n  rules: [{backendRefs: [{name: server-v1, port: ${p}}]}]\n`),
      `apiVersion: security.nodemesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: server-reads}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{to: [{operation: {methods: [GET, HEAD]}}]}, {to: [{operation: {ports: ["${IPERF_PORT}"]}}]}]\n`,
    ].join('---\n');
    if (L7_ONLY) {
      await applyConfig('l7.yaml', l7Yaml);
      const both = (): number[] => [agents.a.pid ?? 0, agents.b.pid ?? 0];
      const row = await measure(client, SERVICE_IP, HTTP_PORT, both);
      process.stdout.write(scenarioTable([['nodemesh L7 two hops (route on A, policy on B), HBONE mTLS', row]]).join('\n') + '\n');
      if (process.env['BENCH_L7_H2'] === '1') process.stdout.write(`${JSON.stringify({ h2: await measureH2(client, SERVICE_IP, H2_PORT, both) })}\n`);
      return;
    }
    say('nodemesh, two hops: A proxy -> HBONE (mutual TLS, HTTP/2) -> B proxy');
    const pids = (): number[] => [agents.a.pid ?? 0, agents.b.pid ?? 0];
    const fds = async (): Promise<number[]> => Promise.all(pids().map(async (pid) => (await readdir(`/proc/${pid}/fd`)).length));
    const fdsBefore = await fds();
    const mtls = await measure(client, SERVICE_IP, HTTP_PORT, pids);
    // 5 s after the load its connections have drained (a few take a second or two to close both
    // ways): what the agents hold beyond what they held before would be a leak.
    await sleep(5000);
    const fdsAfter = await fds();
    const tunnels = await metric(PORTS.a.metrics, 'nodemesh_hbone_tunnels_opened_total');
    const tunnelled = await metric(PORTS.a.metrics, 'nodemesh_proxied_connections_total', { path: 'hbone' });
    // What carrying the load left the agents at (their flags decide much of it: --jit, the young generation).
    const agentRss = { a: await rssMiB(agents.a.pid ?? 0), b: await rssMiB(agents.b.pid ?? 0) };
    if (HBONE_ONLY) {
      process.stdout.write([...scenarioTable([['nodemesh two hops, HBONE mTLS', mtls]]), '', `tunnels: ${tunnels} opened for ${tunnelled} connections; agent RSS after the load: A ${agentRss.a.toFixed(1)} MiB, B ${agentRss.b.toFixed(1)} MiB; open fds A, B before the load ${fdsBefore.join(', ')}, 5 s after ${fdsAfter.join(', ')}`].join('\n') + '\n');
      return;
    }

    say('nodemesh L7, two hops in HBONE: an HTTPRoute read on A, a request-level AuthorizationPolicy read on B');
    await applyConfig('l7.yaml', l7Yaml);
    const l7 = await measure(client, SERVICE_IP, HTTP_PORT, pids);
    if ((await metric(PORTS.b.metrics, 'istio_requests_total', { reporter: 'destination' })) === 0) throw new Error('the L7 run was not read on the server\'s node');
    say('nodemesh L7 HTTP/2, two hops in HBONE: the route on the h2c port read on A (each stream routed), the policy on B');
    // Read as HTTP/2 by the addon's engine on both nodes: A routes each stream, B authorizes it.
    const h2Served = async (): Promise<number[]> => [await metric(PORTS.a.metrics, 'nodemesh_http2_connections_total', { side: 'client', engine: 'addon' }), await metric(PORTS.b.metrics, 'nodemesh_http2_connections_total', { side: 'server', engine: 'addon' })];
    const h2Before = await h2Served();
    const l7H2 = await measureH2(client, SERVICE_IP, H2_PORT, pids);
    const h2After = await h2Served();
    if (h2After.some((n, i) => n === h2Before[i])) throw new Error(`the L7 HTTP/2 run was not read by both nodes' HTTP/2 engines (connections before ${h2Before.join(', ')}, after ${h2After.join(', ')})`);
    await applyConfig('l7.yaml', '');

    say('nodemesh, two hops in plaintext: the server\'s PeerAuthentication DISABLE, A -> B\'s inbound listener');
    await applyConfig('plaintext.yaml', 'apiVersion: security.nodemesh.io/v1\nkind: PeerAuthentication\nmetadata: {name: server-plaintext, namespace: default}\nspec:\n  selector: {matchLabels: {app: server}}\n  mtls: {mode: DISABLE}\n');
    const outboundBefore = await metric(PORTS.a.metrics, 'nodemesh_proxied_connections_total', { path: 'outbound' });
    const plain = await measure(client, SERVICE_IP, HTTP_PORT, pids);
    if ((await metric(PORTS.a.metrics, 'nodemesh_proxied_connections_total', { path: 'outbound' })) === outboundBefore) throw new Error('the plaintext run did not take the plaintext path');

    if (ROUNDS > 1) {
      // What the restarted agents of the further rounds start with.
      await applyConfig('plaintext.yaml', '');
      await applyConfig('l7.yaml', l7Yaml);
    }
    await stopAgents();

    say('direct pod to pod');
    const direct = await measure(client, server.ip4, APP_HTTP, () => []);
    say('sidecar peer: HAProxy + nft REDIRECT in both pods (plaintext)');
    const peer = await startSidecarPeer(runtime, work, client, server, SERVICE_IP, [
      { servicePort: HTTP_PORT, appPort: APP_HTTP, outboundPort: 15001, inboundPort: 15006 },
      { servicePort: IPERF_PORT, appPort: IPERF_PORT, outboundPort: 15002, inboundPort: 15007 },
    ]);
    const sidecar = await measure(client, SERVICE_IP, HTTP_PORT, peer.pids);
    await peer.stop();
    say('sidecar peer: HAProxy + nft REDIRECT in both pods, mutual TLS 1.3 between them (P-256 certificates)');
    const peerTls = await startSidecarPeer(runtime, work, client, server, SERVICE_IP, [
      { servicePort: HTTP_PORT, appPort: APP_HTTP, outboundPort: 15001, inboundPort: 15006 },
      { servicePort: IPERF_PORT, appPort: IPERF_PORT, outboundPort: 15002, inboundPort: 15007 },
    ], await writeSidecarTls(work));
    const sidecarMtls = await measure(client, SERVICE_IP, HTTP_PORT, peerTls.pids);
    await peerTls.stop();
    /** The L7 peers and direct HTTP/2, once per round. */
    const l7Peers = async (of: string): Promise<{ http: Scenario; h2: H2Scenario; directH2: H2Scenario }> => {
      say(`sidecar peer, L7: HAProxy mode http + nft REDIRECT in both pods, mutual TLS between them${of}`);
      const peerHttpTls = await startSidecarPeer(runtime, work, client, server, SERVICE_IP, [
        { servicePort: HTTP_PORT, appPort: APP_HTTP, outboundPort: 15001, inboundPort: 15006 },
        { servicePort: IPERF_PORT, appPort: IPERF_PORT, outboundPort: 15002, inboundPort: 15007, opaque: true },
      ], await writeSidecarTls(work), 'http');
      const http = await measure(client, SERVICE_IP, HTTP_PORT, peerHttpTls.pids);
      await peerHttpTls.stop();
      say(`sidecar peer, L7 HTTP/2: HAProxy mode http with proto h2 on both sides + nft REDIRECT, mutual TLS between them${of}`);
      const peerH2Tls = await startSidecarPeer(runtime, work, client, server, SERVICE_IP, [{ servicePort: H2_PORT, appPort: APP_H2, outboundPort: 15001, inboundPort: 15006 }], await writeSidecarTls(work), 'h2');
      const h2 = await measureH2(client, SERVICE_IP, H2_PORT, peerH2Tls.pids);
      await peerH2Tls.stop();
      return { http, h2, directH2: await measureH2(client, server.ip4, APP_H2, () => []) };
    };
    const peers = [await l7Peers(ROUNDS > 1 ? ` (round 1 of ${ROUNDS})` : '')];
    const directs = [direct];
    const l7s = [l7];
    const l7H2s = [l7H2];
    // The further rounds: the L7 rows, direct and the L7 peers again, the agents restarted with the
    // L7 config (they take the pods over from their store, as after an upgrade).
    for (let round = 2; round <= ROUNDS; round++) {
      const of = ` (round ${round} of ${ROUNDS})`;
      say(`nodemesh L7, HTTP/1.1 and HTTP/2, two hops in HBONE${of}`);
      await startAgents();
      await podsServed();
      l7s.push(await measure(client, SERVICE_IP, HTTP_PORT, pids));
      l7H2s.push(await measureH2(client, SERVICE_IP, H2_PORT, pids));
      await stopAgents();
      say(`direct pod to pod${of}`);
      directs.push(await measure(client, server.ip4, APP_HTTP, () => []));
      peers.push(await l7Peers(of));
    }
    const sidecarHttpMtls = medianRun(peers.map((p) => p.http));
    const sidecarH2Mtls = medianRun(peers.map((p) => p.h2));
    const directH2 = medianRun(peers.map((p) => p.directH2));
    const l7Median = medianRun(l7s);
    const l7H2Median = medianRun(l7H2s);
    /** Each round's added p90 (against that round's direct run), and their median. */
    const addedP90s = (runs: ReadonlyArray<Scenario>): number[] => runs.map((s, i) => Math.round((s.latency.p90 - (directs[i] ?? direct).latency.p90) * 1000) / 1000);

    const ratio = (a: number, b: number): number => Math.round((a / b) * 100) / 100;
    const addedP90 = (s: Scenario): number => Math.round((s.latency.p90 - direct.latency.p90) * 1000) / 1000;
    const l7Peer = peers.map((p) => p.http);
    const h2Peer = peers.map((p) => p.h2);
    const results = {
      date: new Date().toISOString(),
      seconds: SECONDS,
      direct,
      sidecarPlaintext: sidecar,
      sidecarMtls,
      nodemeshPlaintext: plain,
      nodemeshHbone: mtls,
      rounds: ROUNDS,
      sidecarHttpMtls,
      nodemeshL7Hbone: l7Median,
      h2: { direct: directH2, sidecarH2Mtls, nodemeshL7H2Hbone: l7H2Median },
      l7Rounds: { direct: directs, sidecarHttpMtls: l7Peer, nodemeshL7Hbone: l7s, sidecarH2Mtls: h2Peer, nodemeshL7H2Hbone: l7H2s },
      tunnels: { opened: tunnels, connections: tunnelled, connectionsPerTunnel: tunnels > 0 ? Math.round(tunnelled / tunnels) : null },
      agentRssMiBAfterHbone: agentRss,
      agentOpenFds: { beforeHbone: fdsBefore, afterHbone: fdsAfter },
      // The targets compare the mTLS rows: nodemesh HBONE against the HAProxy mTLS pair.
      ratios: {
        hboneKeepAliveVsSidecarMtls: ratio(mtls.keepAliveRps, sidecarMtls.keepAliveRps),
        hboneThroughputVsSidecarMtls: ratio(mtls.throughputGbps, sidecarMtls.throughputGbps),
        hboneNewConnVsSidecarMtls: ratio(mtls.newConnRps, sidecarMtls.newConnRps),
        hboneCpuPer1000VsSidecarMtls: ratio(mtls.proxyCpuSecPer1000Req ?? 0, sidecarMtls.proxyCpuSecPer1000Req ?? 1),
        plaintextKeepAliveVsSidecarPlaintext: ratio(plain.keepAliveRps, sidecar.keepAliveRps),
        // The L7 ones: the median of the rounds' own ratios (a nodemesh run against the peer's run of the same round).
        l7KeepAliveVsSidecarHttpMtls: roundRatio(l7s, l7Peer),
        l7CpuPer1000VsSidecarHttpMtls: ratio(l7Median.proxyCpuSecPer1000Req ?? 0, sidecarHttpMtls.proxyCpuSecPer1000Req ?? 1),
        l7H2KeepAliveVsSidecarH2Mtls: roundRatio(l7H2s, h2Peer),
        l7H2CpuPer1000VsSidecarH2Mtls: ratio(l7H2Median.proxyCpuSecPer1000Req ?? 0, sidecarH2Mtls.proxyCpuSecPer1000Req ?? 1),
        addedP90Ms: { sidecarPlaintext: addedP90(sidecar), sidecarMtls: addedP90(sidecarMtls), nodemeshPlaintext: addedP90(plain), nodemeshHbone: addedP90(mtls), sidecarHttpMtls: median(addedP90s(l7Peer)), nodemeshL7Hbone: median(addedP90s(l7s)) },
        ...(ROUNDS > 1
          ? { l7Rounds: { rounds: ROUNDS, keepAliveRange: ratioRange(l7s, l7Peer), h2KeepAliveRange: ratioRange(l7H2s, h2Peer), addedP90Ms: { sidecarHttpMtls: addedP90s(l7Peer), nodemeshL7Hbone: addedP90s(l7s) } } }
          : {}),
      },
    };
    const rows: Array<[string, Scenario]> = [
      ['direct', direct],
      ['sidecar (HAProxy+nft), plaintext', sidecar],
      ['sidecar (HAProxy+nft), mTLS', sidecarMtls],
      ['nodemesh two hops, plaintext', plain],
      ['nodemesh two hops, HBONE mTLS', mtls],
      ['sidecar L7 (HAProxy mode http), mTLS', sidecarHttpMtls],
      ['nodemesh L7 two hops (route on A, policy on B), HBONE mTLS', l7Median],
    ];
    process.stdout.write(
      [
        ...scenarioTable(rows),
        ...(ROUNDS > 1 ? ['', `(the L7 rows: the median run of ${ROUNDS} alternating rounds; direct as measured in round 1)`] : []),
        '',
        ...h2Table('HTTP/2 (h2c), 1 KB answers, h2load 32 connections x 10 streams', [['direct', directH2], ['sidecar L7 h2 (HAProxy proto h2), mTLS', sidecarH2Mtls], ['nodemesh L7 h2 two hops (route on A, policy on B), HBONE mTLS', l7H2Median]]),
        '',
        `tunnels: ${tunnels} opened for ${tunnelled} connections; agent RSS after the HBONE load: A ${agentRss.a.toFixed(1)} MiB, B ${agentRss.b.toFixed(1)} MiB; open fds A, B before it ${fdsBefore.join(', ')}, 5 s after ${fdsAfter.join(', ')}; ratios: ${JSON.stringify(results.ratios)}`,
      ].join('\n') + '\n',
    );
    const outDir = join(PACKAGE_ROOT, 'bench', 'results');
    await mkdir(outDir, { recursive: true });
    await writeFile(join(outDir, 'two-hop.json'), JSON.stringify(results, null, 2) + '\n');
    say(`wrote ${join(outDir, 'two-hop.json')}`);
  } finally {
    say('cleaning up');
    for (const c of children.reverse()) {
      if (c.exitCode !== null || c.signalCode !== null) continue;
      const exited = new Promise((r) => c.once('exit', r));
      c.kill('SIGTERM');
      await exited;
    }
    for (const c of cleanups.reverse()) await c().catch((e: unknown) => say(`cleanup: ${(e as Error).message}`));
    await layout.remove(say);
  }
}

await main();
