/** Runs `nodemesh agent` as its own process inside a test sandbox, on free loopback ports. */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import type { EnrolledPodStatus } from '../../src/agent/agent.js';
import type { NodeSyncStatus } from '../../src/control-plane/server.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import { podCidrList } from '../../src/runtime/config.js';
import { freePort } from '../../src/shared/ports.js';
import { waitFor, type Sandbox } from './sandbox.js';

export interface AgentConfigDump {
  version: number;
  warnings: Array<{ object: string; message: string }>;
  services: Array<{
    service: string;
    policy: { source?: string; loadBalancing: string; maxConnections: number };
    endpoints: Array<{ pod: string; port: number; activeConnections: number; ejected: boolean }>;
    /** An HTTP port routed per request: its matches in the order they are tried. */
    http?: Array<{ route: string; rule: number; match: { path: string }; backends: Array<{ backend: string; weight: number }> }>;
  }>;
}

export interface AgentPorts {
  readonly metrics: number;
  readonly ready: number;
  readonly admin: number;
}

export interface AgentProcess {
  readonly configDir: string;
  readonly pinRoot: string;
  readonly ports: AgentPorts;
  child: ChildProcess;
  /** Everything the agent logged (JSON lines). */
  log(): string;
  pods(): Promise<EnrolledPodStatus[]>;
  metrics(): Promise<string>;
  /** The admin API's /config: the routing tables the proxy serves from. */
  config(): Promise<AgentConfigDump>;
  ready(): Promise<number>;
  waitForPods(check: (pods: EnrolledPodStatus[]) => boolean, what: string): Promise<EnrolledPodStatus[]>;
  kill(signal: NodeJS.Signals): Promise<void>;
  /** Starts it again; waits until it is ready unless `waitReady` is false. */
  restart(options?: { waitReady?: boolean }): Promise<void>;
  writeConfig(file: string, yaml: string): Promise<void>;
}


/** Counter value of a metric line whose labels include all of `labels`. */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number {
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) total += Number(line.split(' ').pop());
  }
  return total;
}

/**
 * Checks that the addon's engines used channels for tunnelled HTTP/1.1 on `counted` (at least
 * `atLeast`; none when `atLeast` is 0, as with node:http2's HBONE), then waits until no agent
 * holds a channel open or unclaimed (the connections ended, pooled ones idled out).
 */
export async function checkChannels(counted: AgentProcess, atLeast: number, agents: ReadonlyArray<AgentProcess>, ms: number): Promise<void> {
  const made = metricValue(await counted.metrics(), 'nodemesh_http_channels_total');
  if (atLeast > 0) assert.ok(made >= atLeast, `tunnelled HTTP/1.1 went on channels: ${made} made, want ${atLeast} or more`);
  else assert.equal(made, 0, 'no channel without the addon\'s HBONE engine');
  for (const agent of agents) {
    await waitFor(async () => {
      const m = await agent.metrics();
      return metricValue(m, 'nodemesh_http_channels', { state: 'open' }) === 0 && metricValue(m, 'nodemesh_http_channels', { state: 'unclaimed' }) === 0;
    }, ms, 'no channel left once the connections ended');
  }
}

/**
 * Where the agent gets its config: YAML files (standalone) or a control plane's gRPC address
 * (with caRoot: its TLS port, checked against that root file).
 */
export type AgentConfigSource = Record<string, string> | { readonly controlPlane: string; readonly tokenFile?: string; readonly caRoot?: string };

/**
 * `node`: the node the agent serves (default: the sandbox's node, where its pods go unless they
 * name another); each node has its own pin root, ports and run folder.
 */
export async function startAgent(
  sb: Sandbox,
  source: AgentConfigSource,
  options: { args?: ReadonlyArray<string>; prefix?: ReadonlyArray<string>; node?: string; waitReady?: boolean; /** The host ports of this agent (a second agent taking the node over shares them). */ ports?: AgentPorts; /** Added to the agent's environment. */ env?: Readonly<Record<string, string>> } = {},
): Promise<AgentProcess> {
  const node = options.node ?? sb.config.node;
  const isRemote = typeof source['controlPlane'] === 'string' && Object.keys(source).every((k) => k === 'controlPlane' || k === 'tokenFile' || k === 'caRoot');
  const controlPlane = isRemote ? (source as { controlPlane: string }).controlPlane : undefined;
  const tokenFile = isRemote ? (source as { tokenFile?: string }).tokenFile : undefined;
  const caRoot = isRemote ? (source as { caRoot?: string }).caRoot : undefined;
  const config: Record<string, string> = controlPlane === undefined ? (source as Record<string, string>) : {};
  const configDir = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-config-`));
  for (const [file, yaml] of Object.entries(config)) await writeFile(join(configDir, file), yaml);
  const pinRoot = join(sb.bpffsDir, node === sb.config.node ? 'agent' : `agent-${node}`);
  const { metrics, ready, admin } = options.ports ?? { metrics: await freePort(), ready: await freePort(), admin: await freePort() };
  let output = '';
  // The log as it is when a wait gave up, not when it began.
  const withLog = (e: Error): never => {
    throw new Error(`${e.message}; log: ${output}`);
  };
  const spawnAgent = (): ChildProcess => {
    // `prefix`: a command that runs the agent (prlimit ... --).
    const [command = process.execPath, ...prefixArgs] = [...(options.prefix ?? []), process.execPath];
    const child = spawn(
      command,
      [...prefixArgs, CLI_ENTRY, 'agent', ...(controlPlane === undefined ? ['--config-dir', configDir] : ['--control-plane', controlPlane, ...(tokenFile === undefined ? [] : ['--token-file', tokenFile]), ...(caRoot === undefined ? [] : ['--ca-root', caRoot])]), '--bpf-root', pinRoot, '--metrics', `127.0.0.1:${metrics}`, '--ready', `127.0.0.1:${ready}`, '--admin', `127.0.0.1:${admin}`, '--node', node, ...(options.args ?? [])],
      { env: { ...sb.env, NODEMESH_LOG_LEVEL: 'info', ...options.env }, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    child.stdout?.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (output += d.toString()));
    return child;
  };
  const get = async (port: number, path: string): Promise<Response> => fetch(`http://127.0.0.1:${port}${path}`);
  const agent: AgentProcess = {
    configDir,
    pinRoot,
    ports: { metrics, ready, admin },
    child: spawnAgent(),
    log: () => output,
    pods: async () => ((await (await get(admin, '/pods')).json()) as { pods: EnrolledPodStatus[] }).pods,
    metrics: async () => (await get(metrics, '/metrics')).text(),
    config: async () => (await (await get(admin, '/config')).json()) as AgentConfigDump,
    ready: async () => (await get(ready, '/healthz/ready')).status,
    async waitForPods(check, what) {
      let last: EnrolledPodStatus[] = [];
      await waitFor(async () => check((last = await agent.pods().catch(() => []))), 15_000, what).catch((e: Error) => withLog(new Error(`${e.message} (agent pods: ${JSON.stringify(last)})`)));
      return last;
    },
    async kill(signal) {
      const child = agent.child;
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill(signal);
      await exited;
    },
    async restart(options = {}) {
      agent.child = spawnAgent();
      if (options.waitReady === false) return;
      await waitFor(async () => (await agent.ready().catch(() => 0)) === 200, 15_000, 'agent ready after restart');
    },
    async writeConfig(file, yaml) {
      await writeFile(join(configDir, file), yaml);
    },
  };
  sb.defer(async () => {
    await agent.kill('SIGTERM');
    await rm(configDir, { recursive: true, force: true });
    // Unpinning the links detaches every program the agent left on the pods.
    await rm(pinRoot, { recursive: true, force: true });
  });
  if (options.waitReady === false) {
    // Up enough to answer on its metrics port.
    await waitFor(async () => (await agent.metrics().catch(() => undefined)) !== undefined, 15_000, 'agent metrics').catch(withLog);
    return agent;
  }
  await waitFor(async () => (await agent.ready().catch(() => 0)) === 200, 15_000, 'agent ready').catch(withLog);
  return agent;
}

export function serviceYaml(name: string, ips: string[], selector: Record<string, string>, port = 80, targetPort = 8080, portName = 'tcp'): string {
  return [
    'apiVersion: v1',
    'kind: Service',
    `metadata: {name: ${name}, namespace: default}`,
    'spec:',
    `  clusterIPs: [${ips.join(', ')}]`,
    `  selector: {${Object.entries(selector).map(([k, v]) => `${k}: ${v}`).join(', ')}}`,
    `  ports: [{name: ${portName}, port: ${port}, targetPort: ${targetPort}}]`,
    '',
  ].join('\n');
}

export interface ControlPlaneProcess {
  readonly configDir: string;
  /** gRPC address for `agent --control-plane`: plaintext, loopback. */
  readonly address: string;
  /** gRPC over TLS, for `agent --control-plane ... --ca-root caRoot`. */
  readonly tlsAddress: string;
  /** The CA's root-cert.pem (in its --ca-dir, made at its first start). */
  readonly caRoot: string;
  readonly httpPort: number;
  log(): string;
  writeConfig(file: string, yaml: string): Promise<void>;
  nodes(): Promise<{ version: number; nodes: NodeSyncStatus[] }>;
  metrics(): Promise<string>;
  kill(signal: NodeJS.Signals): Promise<void>;
  restart(): Promise<void>;
}

/** Runs `nodemesh control-plane` on a config folder of its own, on free loopback ports. */
/** `certTtl`: the workload certificates' lifetime (--cert-ttl), e.g. '20s' to see renewals. */
export async function startControlPlane(sb: Sandbox, config: Record<string, string>, options: { agentTokens?: string; certTtl?: string } = {}): Promise<ControlPlaneProcess> {
  const configDir = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-cp-`));
  for (const [file, yaml] of Object.entries(config)) await writeFile(join(configDir, file), yaml);
  const caDir = `${configDir}-ca`;
  const [grpc, grpcTls, http] = [await freePort(), await freePort(), await freePort()];
  let output = '';
  let child: ChildProcess;
  const spawnCp = (): ChildProcess => {
    const tokens = options.agentTokens === undefined ? [] : ['--agent-tokens', options.agentTokens];
    const ttl = options.certTtl === undefined ? [] : ['--cert-ttl', options.certTtl];
    const c = spawn(process.execPath, [CLI_ENTRY, 'control-plane', '--config-dir', configDir, '--listen', `127.0.0.1:${grpc}`, '--listen-tls', `127.0.0.1:${grpcTls}`, '--ca-dir', caDir, '--http', `127.0.0.1:${http}`, '--pod-cidrs', podCidrList(sb.config), ...tokens, ...ttl], {
      env: { ...sb.env, NODEMESH_LOG_LEVEL: 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    c.stdout?.on('data', (d: Buffer) => (output += d.toString()));
    c.stderr?.on('data', (d: Buffer) => (output += d.toString()));
    return c;
  };
  const get = async (path: string): Promise<Response> => fetch(`http://127.0.0.1:${http}${path}`);
  const ready = async (): Promise<void> =>
    waitFor(async () => (await get('/healthz/ready').catch(() => undefined))?.status === 200, 15_000, 'control plane ready').catch((e: Error) => {
      // The log as it is when the wait gave up, not when it began.
      throw new Error(`${e.message}; log: ${output}`);
    });
  const cp: ControlPlaneProcess = {
    configDir,
    address: `127.0.0.1:${grpc}`,
    tlsAddress: `127.0.0.1:${grpcTls}`,
    httpPort: http,
    caRoot: join(caDir, 'root-cert.pem'),
    log: () => output,
    writeConfig: (file, yaml) => writeFile(join(configDir, file), yaml),
    nodes: async () => (await (await get('/debug/nodes')).json()) as { version: number; nodes: NodeSyncStatus[] },
    metrics: async () => (await get('/metrics')).text(),
    async kill(signal) {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill(signal);
      await exited;
    },
    async restart() {
      child = spawnCp();
      await ready();
    },
  };
  child = spawnCp();
  sb.defer(async () => {
    await cp.kill('SIGTERM');
    await rm(configDir, { recursive: true, force: true });
    await rm(caDir, { recursive: true, force: true });
  });
  await ready();
  return cp;
}
