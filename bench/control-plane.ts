/**
 * The control plane at mesh scale (part of `npm run bench`, or `npm run bench:control-plane`):
 * 1,000 Services and 10,000 endpoints (pods reported by 100 simulated agents, which are plain
 * gRPC clients that acknowledge what they get), then config edits timed from the file write to
 * each agent receiving the change: p50/p99 over all agents and edits. Also the control plane's
 * RSS, and a real agent's RSS for one node of that mesh. Sends no traffic. Not a test.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { credentials, makeClientConstructor, type ClientDuplexStream } from '@grpc/grpc-js';

import { CLI_ENTRY, PACKAGE_ROOT } from '../src/shared/paths.js';
import { freePort } from '../src/shared/ports.js';
import { discoveryService, type AgentMessage, type ControlPlaneMessage, type WireWorkload } from '../src/protocol/discovery.js';
import { rssMiB, removeCgroupTree } from './tools.js';

const SERVICES = Number(process.env['BENCH_CP_SERVICES'] ?? 1000);
const AGENTS = Number(process.env['BENCH_CP_AGENTS'] ?? 100);
const PODS_PER_AGENT = Number(process.env['BENCH_CP_PODS'] ?? 100);
const EDITS = Number(process.env['BENCH_CP_EDITS'] ?? 20);
/** Services are exported to their own namespace only (`exportTo: "."`): a node needs the namespaces its pods are in. */
const NAMESPACES = 20;
const say = (s: string): void => void process.stderr.write(`» ${s}\n`);


const ns = (i: number): string => `ns-${i % NAMESPACES}`;
const svcName = (i: number): string => `svc-${i}`;
const serviceYaml = (i: number, port: number): string =>
  `apiVersion: v1\nkind: Service\nmetadata: {name: ${svcName(i)}, namespace: ${ns(i)}, annotations: {networking.istio.io/exportTo: "."}}\nspec:\n  clusterIP: 10.${96 + (i >> 16)}.${(i >> 8) & 255}.${i & 255}\n  selector: {app: ${svcName(i)}}\n  ports: [{name: http, port: ${port}, targetPort: 8080}]\n`;

/** One simulated agent: says Hello, reports its pods, Acks everything, notes when each version came. */
class SimAgent {
  readonly received = new Map<number, { at: number; services: Set<string> }>();
  private call: ClientDuplexStream<AgentMessage, ControlPlaneMessage> | undefined;
  latest = 0;

  constructor(
    readonly node: string,
    readonly pods: WireWorkload[],
  ) {}

  start(address: string, Client: ReturnType<typeof makeClientConstructor>): void {
    const client = new Client(address, credentials.createInsecure(), { 'grpc.max_receive_message_length': 64 * 1024 * 1024 });
    const call = (client as unknown as { Stream(): ClientDuplexStream<AgentMessage, ControlPlaneMessage> }).Stream();
    this.call = call;
    call.write({ hello: { node: this.node, agentVersion: 'bench', capabilities: [], version: 0, digest: '' } });
    call.write({ pods: { pods: this.pods } });
    call.on('data', (m: ControlPlaneMessage) => {
      const at = performance.now();
      const version = m.snapshot?.version ?? m.delta?.version ?? 0;
      const resources = m.snapshot?.resources ?? m.delta?.upserts ?? [];
      const services = new Set(resources.flatMap((r) => (r.service ? [`${r.service.namespace}/${r.service.name}:${r.service.ports[0]?.port}`] : [])));
      this.received.set(version, { at, services });
      this.latest = version;
      call.write({ ack: { version } });
    });
    call.on('error', () => undefined);
  }

  stop(): void {
    this.call?.cancel();
  }
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

/** A real agent's memory as a node of that mesh, when it needs 5% of it and then all of it. */
export interface ScopedAgentMemory {
  needs5: { services: number; endpoints: number; rssMiB: number };
  needsAll: { services: number; endpoints: number; rssMiB: number };
}

export interface ControlPlaneBench {
  services: number;
  endpoints: number;
  agents: number;
  edits: number;
  propagationMs: { p50: number; p99: number; max: number };
  controlPlaneRssMiB: number;
  agentsInSyncAfterMs: number;
  agent: ScopedAgentMemory | undefined;
}

/**
 * One real agent (local pods, BPF, the proxy) as a node of the benchmark's mesh: first with one
 * pod in ns-0, so it needs that namespace's 50 Services and their 500 endpoints (5%), then with a
 * pod in every namespace (all of it). RSS after each has been applied and the agent idled.
 */
async function scopedAgentMemory(grpcAddress: string): Promise<ScopedAgentMemory> {
  const { LocalPodRuntime } = await import('../src/runtime/pods.js');
  const { validatePodSpec } = await import('../src/runtime/pod-spec.js');
  const id = Date.now().toString(36).slice(-5);
  const stateDir = `/tmp/nodemesh-benchcp-${id}`;
  const runtime = new LocalPodRuntime({
    stateDir,
    bridge: `nmbc${id}`,
    podCidr4: { network: '10.204.0.0', prefix: 24 },
    podCidr6: { network: 'fd00:6e64::', prefix: 64 },
    cgroupSubtree: `nodemesh-benchcp-${id}`,
    namePrefix: 'nmc',
    node: `bench-${id}`,
  });
  const pinRoot = `/sys/fs/bpf/nodemesh-benchcp-${id}`;
  const admin = await freePort();
  const cleanups: Array<() => Promise<unknown>> = [];
  const addPod = async (namespace: string): Promise<void> => {
    const p = await runtime.create(validatePodSpec({ name: `client-${namespace}`, namespace, labels: ['app=client'], command: ['sleep', 'infinity'] }), { detached: true });
    cleanups.push(() => runtime.remove(p, 1000));
    await runtime.start(p);
  };
  const held = async (): Promise<{ services: number; endpoints: number }> => {
    const body = (await (await fetch(`http://127.0.0.1:${admin}/config`)).json()) as { services: Array<{ endpoints: unknown[] }> };
    return { services: body.services.length, endpoints: body.services.reduce((n, s) => n + s.endpoints.length, 0) };
  };
  const settle = async (services: number, what: string): Promise<{ services: number; endpoints: number; rssMiB: number }> => {
    for (let i = 0; (await held().catch(() => ({ services: -1 }))).services !== services; i++) {
      if (i > 600) throw new Error(`the agent did not get the ${services} Services it needs (${what})`);
      await sleep(100);
    }
    say(`agent holds ${services} Services (${what}); idle 10 s`);
    await sleep(10_000);
    return { ...(await held()), rssMiB: Math.round((await rssMiB(agent.pid ?? 0)) * 10) / 10 };
  };
  let agent: ChildProcess = undefined as unknown as ChildProcess;
  try {
    await addPod('ns-0');
    const { agentCommand } = await import('./tools.js');
    agent = spawn(...agentCommand(['agent', '--control-plane', grpcAddress, '--node', `bench-${id}`, '--bpf-root', pinRoot, '--metrics', '127.0.0.1:0', '--ready', '127.0.0.1:0', '--admin', `127.0.0.1:${admin}`]), {
      env: { ...process.env, NODEMESH_STATE_DIR: stateDir, NODEMESH_LOG_LEVEL: 'warn', NODEMESH_BRIDGE: `nmbc${id}`, NODEMESH_POD_CIDR: '10.204.0.0/24', NODEMESH_POD_CIDR6: 'fd00:6e64::/64', NODEMESH_CGROUP_SUBTREE: `nodemesh-benchcp-${id}`, NODEMESH_NAME_PREFIX: 'nmc' },
      stdio: 'inherit',
    });
    cleanups.push(async () => {
      if (agent.exitCode === null && agent.signalCode === null) {
        const exited = new Promise((r) => agent.once('exit', r));
        agent.kill('SIGTERM');
        await exited;
      }
      await rm(pinRoot, { recursive: true, force: true });
    });
    const needs5 = await settle(SERVICES / NAMESPACES, 'one pod in ns-0: 5% of the mesh');
    for (let n = 1; n < NAMESPACES; n++) await addPod(ns(n));
    const needsAll = await settle(SERVICES, 'a pod in every namespace: all of the mesh');
    return { needs5, needsAll };
  } finally {
    for (const c of cleanups.reverse()) await c().catch((e: unknown) => say(`cleanup: ${(e as Error).message}`));
    await removeCgroupTree(runtime.config.cgroupSubtree).catch((e: unknown) => say(`cleanup: ${(e as Error).message}`));
    await rm(stateDir, { recursive: true, force: true });
  }
}

export async function benchControlPlane(): Promise<ControlPlaneBench> {
  const work = await mkdtemp(join(tmpdir(), 'nodemesh-bench-cp-'));
  const configDir = join(work, 'config');
  await mkdir(configDir);
  let cp: ChildProcess | undefined;
  const agents: SimAgent[] = [];
  try {
    say(`control plane: ${SERVICES} Services, ${AGENTS} simulated agents x ${PODS_PER_AGENT} pods`);
    // One file per Service, as operators split config; an edit touches one file.
    for (let i = 0; i < SERVICES; i++) await writeFile(join(configDir, `${svcName(i)}.yaml`), serviceYaml(i, 80));
    const [grpc, http] = [await freePort(), await freePort()];
    // BENCH_CP_NODE_FLAGS (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof") to profile the control plane.
    const flags = process.env['BENCH_CP_NODE_FLAGS']?.split(' ').filter((f) => f !== '') ?? [];
    cp = spawn(flags.length > 0 ? process.execPath : CLI_ENTRY, [...(flags.length > 0 ? [...flags, CLI_ENTRY] : []), 'control-plane', '--config-dir', configDir, '--listen', `127.0.0.1:${grpc}`, '--http', `127.0.0.1:${http}`], {
      env: { ...process.env, NODEMESH_LOG_LEVEL: 'warn' },
      stdio: 'inherit',
    });
    cp.once('exit', (code, signal) => say(`control plane exited (code ${code}, signal ${signal})`));
    const get = async (path: string): Promise<Response> => fetch(`http://127.0.0.1:${http}${path}`);
    for (let i = 0; (await get('/healthz/ready').catch(() => undefined))?.status !== 200; i++) {
      if (i > 300) throw new Error('control plane not ready');
      await sleep(100);
    }
    const Client = makeClientConstructor(discoveryService(), 'Discovery');
    const t0 = performance.now();
    for (let a = 0; a < AGENTS; a++) {
      const pods: WireWorkload[] = [];
      for (let j = 0; j < PODS_PER_AGENT; j++) {
        const n = a * PODS_PER_AGENT + j;
        const svc = n % SERVICES;
        pods.push({ uid: `uid-${n}`, namespace: ns(svc), name: `pod-${n}`, serviceAccount: 'default', labels: { app: svcName(svc) }, ip4: `10.${100 + (n >> 16)}.${(n >> 8) & 255}.${n & 255}`, ip6: '', node: `node-${a}` });
      }
      const agent = new SimAgent(`node-${a}`, pods);
      agent.start(`127.0.0.1:${grpc}`, Client);
      agents.push(agent);
    }
    const inSync = async (): Promise<boolean> => {
      const t = performance.now();
      const res = await get('/debug/nodes').catch((e: unknown) => say(`debug/nodes after ${Math.round(performance.now() - t)} ms: ${(e as Error).message} ${String((e as Error).cause)}`));
      if (!res) return false;
      const body = (await res.json()) as { nodes: Array<{ inSync: boolean; pods: number }> };
      return body.nodes.length === AGENTS && body.nodes.every((n) => n.inSync && n.pods === PODS_PER_AGENT);
    };
    for (let i = 0; !(await inSync()); i++) {
      if (i > 1200) throw new Error('agents did not get in sync within 120 s');
      await sleep(100);
    }
    const agentsInSyncAfterMs = performance.now() - t0;
    say(`all ${AGENTS} agents in sync after ${Math.round(agentsInSyncAfterMs)} ms`);
    const controlPlaneRssMiB = await rssMiB(cp.pid ?? 0);

    const samples: number[] = [];
    for (let e = 0; e < EDITS; e++) {
      const i = (e * 37) % SERVICES;
      const port = 1000 + e;
      const key = `${ns(i)}/${svcName(i)}:${port}`;
      const start = performance.now();
      await writeFile(join(configDir, `${svcName(i)}.yaml`), serviceYaml(i, port));
      const arrival = (a: SimAgent): number | undefined => {
        for (const r of a.received.values()) if (r.services.has(key) && r.at >= start) return r.at;
        return undefined;
      };
      for (let w = 0; agents.some((a) => arrival(a) === undefined); w++) {
        if (w > 1000) throw new Error(`edit ${e} did not reach every agent within 10 s`);
        await sleep(10);
      }
      for (const a of agents) samples.push((arrival(a) ?? NaN) - start);
      for (const a of agents) a.received.clear();
      await sleep(200);
    }
    samples.sort((x, y) => x - y);
    // BENCH_CP_AGENT=0 skips the real agent (it needs root, BPF and local pods).
    const agent = process.env['BENCH_CP_AGENT'] === '0' ? undefined : await scopedAgentMemory(`127.0.0.1:${grpc}`);
    const r = (n: number): number => Math.round(n * 10) / 10;
    return {
      services: SERVICES,
      endpoints: AGENTS * PODS_PER_AGENT,
      agents: AGENTS,
      edits: EDITS,
      propagationMs: { p50: r(percentile(samples, 50)), p99: r(percentile(samples, 99)), max: r(samples[samples.length - 1] ?? NaN) },
      controlPlaneRssMiB: r(controlPlaneRssMiB),
      agentsInSyncAfterMs: Math.round(agentsInSyncAfterMs),
      agent,
    };
  } finally {
    for (const a of agents) a.stop();
    if (cp && cp.exitCode === null && cp.signalCode === null) {
      const exited = new Promise((resolve) => cp?.once('exit', resolve));
      cp.kill('SIGTERM');
      await exited;
    }
    await rm(work, { recursive: true, force: true });
  }
}

// Run directly: `node dist/bench/control-plane.js`.
if (process.argv[1]?.endsWith('control-plane.js')) {
  const result = await benchControlPlane();
  process.stdout.write(
    [
      '| Services | endpoints | agents | edits | propagation p50 ms | p99 ms | max ms | control plane RSS MiB | all in sync after ms |',
      '|---|---|---|---|---|---|---|---|---|',
      `| ${result.services} | ${result.endpoints} | ${result.agents} | ${result.edits} | ${result.propagationMs.p50} | ${result.propagationMs.p99} | ${result.propagationMs.max} | ${result.controlPlaneRssMiB} | ${result.agentsInSyncAfterMs} |`,
      ...(result.agent
        ? [
            '',
            '| real agent, as a node that needs | Services | endpoints | RSS MiB |',
            '|---|---|---|---|',
            `| 5% of the mesh (one pod in ns-0) | ${result.agent.needs5.services} | ${result.agent.needs5.endpoints} | ${result.agent.needs5.rssMiB} |`,
            `| all of it (a pod in every namespace) | ${result.agent.needsAll.services} | ${result.agent.needsAll.endpoints} | ${result.agent.needsAll.rssMiB} |`,
          ]
        : []),
    ].join('\n') + '\n',
  );
  await mkdir(join(PACKAGE_ROOT, 'bench', 'results'), { recursive: true });
  await writeFile(join(PACKAGE_ROOT, 'bench', 'results', 'control-plane.json'), JSON.stringify({ date: new Date().toISOString(), ...result }, null, 2) + '\n');
  process.exit(0);
}
