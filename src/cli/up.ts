/**
 * `nodemesh up`, what `npm run demo` runs: the control plane on examples/mesh, two nodes on this
 * machine (an agent each, connected to it), the example's workload pods spread over both, and a
 * load generator pod calling every Service through the mesh. It prints progress, then (on Ctrl-C
 * or after --duration) a table of requests per Service and endpoint read from the agents' metrics
 * endpoints, with the node that served each and whether it came over mTLS, and removes everything
 * it made.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { probeBpf } from '../datapath/native.js';
import { holdBlackhole, type Blackhole } from '../runtime/blackhole.js';
import { podCidrList, runtimeConfigFromEnv } from '../runtime/config.js';
import { validatePodSpec } from '../runtime/pod-spec.js';
import { LocalPodRuntime } from '../runtime/pods.js';
import type { PodRecord } from '../runtime/store.js';
import { waitForPodListener } from '../runtime/wait.js';
import { NodemeshError } from '../shared/errors.js';
import { CLI_ENTRY, PACKAGE_ROOT } from '../shared/paths.js';
import { preflight } from './preflight.js';
import type { LoadResult } from './debug-tools.js';
import { table } from './output.js';

const EXAMPLES = join(PACKAGE_ROOT, 'examples', 'mesh');
const NAMESPACE = 'shop';
const APP_PORT = 8080;
/** The example's Services (examples/mesh/*.yaml): what loadgen calls. */
const TARGETS = ['10.96.100.10:80', '[fd00:96::100:10]:80', '10.96.100.11:80', '10.96.100.12:80'];
/** Addresses the example has besides the targets (reviews' versions): held as blackholes too. */
const OTHER_ADDRESSES = ['10.96.100.21', '10.96.100.22'];
const PORTS = { grpcTls: 15012, cpHttp: 15014 } as const;
/** Each node's agent has its own host ports, as two machines would. */
const NODE_PORTS = [
  { metrics: 15020, ready: 15021, admin: 15000 },
  { metrics: 15120, ready: 15121, admin: 15100 },
] as const;
/** The demo's agents pin under their own folder, so a real agent's pins are never touched. */
const PIN_BASE = '/sys/fs/bpf/nodemesh-demo';

/** `node`: 0 is this machine's node (where loadgen runs too), 1 the second node. */
const WORKLOADS: ReadonlyArray<{ name: string; labels: string[]; node: 0 | 1 }> = [
  { name: 'frontend', labels: ['app=frontend', 'version=v1'], node: 0 },
  { name: 'reviews-v1', labels: ['app=reviews', 'version=v1'], node: 0 },
  { name: 'reviews-v2', labels: ['app=reviews', 'version=v2'], node: 1 },
  { name: 'ratings', labels: ['app=ratings', 'version=v1'], node: 1 },
];

export interface UpOptions {
  /** Stop after this long; undefined: run until Ctrl-C. */
  readonly durationMs: number | undefined;
  /** Requests per second to each Service address. */
  readonly rate: number;
}

type Progress = (step: string) => void;

async function portFree(port: number): Promise<boolean> {
  const { createServer } = await import('node:net');
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

async function waitHttp(url: string, timeoutMs: number, what: string, child: ChildProcess, log: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new NodemeshError('NM_ERR_DEMO', `${what} exited (${child.exitCode ?? child.signalCode}) while starting`, { context: { path: log }, hint: `read ${log}` });
    const status = await fetch(url).then((r) => r.status).catch(() => 0);
    if (status === 200) return;
    if (Date.now() > deadline) throw new NodemeshError('NM_ERR_DEMO', `${what} did not become ready within ${timeoutMs / 1000} s (${url})`, { context: { path: log }, hint: `read ${log}` });
    await sleep(200);
  }
}

export interface EndpointRow {
  service: string;
  workload: string;
  version: string;
  /** connection_security_policy: mutual_tls, or none (plaintext). */
  security: string;
  connections: number;
  bytesIn: number;
  bytesOut: number;
}

/** Counts per (Service, workload, version, security) from Istio's TCP metrics, as the destination side reported them. */
export function requestsByEndpoint(metrics: string): EndpointRow[] {
  const rows = new Map<string, EndpointRow>();
  for (const line of metrics.split('\n')) {
    const m = /^(istio_tcp_connections_opened_total|istio_tcp_received_bytes_total|istio_tcp_sent_bytes_total)\{(.*)\} (\S+)$/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (labels['reporter'] !== 'destination') continue;
    const key = `${labels['destination_service']}|${labels['destination_workload']}|${labels['destination_version']}|${labels['connection_security_policy']}`;
    const row = rows.get(key) ?? {
      service: labels['destination_service'] ?? '',
      workload: labels['destination_workload'] ?? '',
      version: labels['destination_version'] ?? '',
      security: labels['connection_security_policy'] ?? 'none',
      connections: 0,
      bytesIn: 0,
      bytesOut: 0,
    };
    const value = Number(m[3]);
    if (m[1] === 'istio_tcp_connections_opened_total') row.connections += value;
    else if (m[1] === 'istio_tcp_received_bytes_total') row.bytesIn += value;
    else row.bytesOut += value;
    rows.set(key, row);
  }
  return [...rows.values()].sort((a, b) => (a.service + a.version < b.service + b.version ? -1 : 1));
}

export async function up(options: UpOptions, progress: Progress, write: (text: string) => void): Promise<number> {
  progress('checking the machine (root, kernel, cgroup v2, bpffs, bpf())');
  await preflight(probeBpf);
  for (const [what, port] of [...Object.entries(PORTS), ...NODE_PORTS.flatMap((p, i) => Object.entries(p).map(([k, v]) => [`node ${i + 1} ${k}`, v] as const))]) {
    if (!(await portFree(port))) {
      throw new NodemeshError('NM_ERR_DEMO', `port ${port} (${what}) on 127.0.0.1 is taken: is a nodemesh agent or control plane already running?`, { context: { detail: String(port) }, hint: 'stop it (or the earlier demo) and run the demo again' });
    }
  }
  const runtimeConfig = runtimeConfigFromEnv();
  const runtime = new LocalPodRuntime(runtimeConfig);
  const nodes = [runtimeConfig.node, `${runtimeConfig.node}-b`] as const;
  const work = await mkdtemp(join(tmpdir(), 'nodemesh-demo-'));
  const cleanups: Array<() => Promise<unknown>> = [async () => rm(work, { recursive: true, force: true })];
  let cleaning: Promise<void> | undefined;
  const cleanUp = (): Promise<void> =>
    (cleaning ??= (async () => {
      progress('cleaning up (load, agent, control plane, pods, routes, pins)');
      for (const c of cleanups.reverse()) await c().catch((e: unknown) => write(`cleanup: ${(e as Error).message}\n`));
    })());
  let interrupted = false;
  let loadgen: ChildProcess | undefined;
  // Ctrl-C ends the load; the summary is printed, then everything is removed.
  const onSignal = (): void => {
    if (interrupted) return;
    interrupted = true;
    progress('stopping (Ctrl-C): summary, then clean-up');
    loadgen?.kill('SIGTERM');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const start = (name: string, args: string[]): { child: ChildProcess; log: string } => {
    const log = join(work, `${name}.log`);
    const out = openSync(log, 'w');
    // Its own process group: Ctrl-C in the terminal reaches the demo, which first reads the
    // agent's metrics for the summary and then stops these itself.
    const child = spawn(process.execPath, [join(PACKAGE_ROOT, 'bin', 'nodemesh.js'), ...args], { stdio: ['ignore', out, out], detached: true, env: { ...process.env, NODEMESH_LOG_LEVEL: 'info' } });
    closeSync(out);
    cleanups.push(async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      }
    });
    return { child, log };
  };
  try {
    for (const stale of (await runtime.list()).filter((p) => p.namespace === NAMESPACE)) {
      progress(`removing pod ${stale.name} left by an earlier demo`);
      await runtime.remove(stale, 1000);
    }
    const holes: Blackhole[] = [];
    cleanups.push(async () => {
      for (const h of holes) await h.release();
    });
    for (const a of [...TARGETS.map((t) => t.replace(/^\[?([^\]]+?)\]?:\d+$/, '$1')), ...OTHER_ADDRESSES]) holes.push(await holdBlackhole(a));

    progress(`starting the control plane on ${EXAMPLES} (gRPC over TLS 127.0.0.1:${PORTS.grpcTls}, HTTP :${PORTS.cpHttp}; its CA in ${work}/ca)`);
    const caDir = join(work, 'ca');
    const cp = start('control-plane', ['control-plane', '--config-dir', EXAMPLES, '--listen-tls', `127.0.0.1:${PORTS.grpcTls}`, '--ca-dir', caDir, '--http', `127.0.0.1:${PORTS.cpHttp}`, '--pod-cidrs', podCidrList(runtimeConfig)]);
    await waitHttp(`http://127.0.0.1:${PORTS.cpHttp}/healthz/ready`, 15_000, 'the control plane', cp.child, cp.log);

    cleanups.push(() => rm(PIN_BASE, { recursive: true, force: true }));
    const agents: Array<{ child: ChildProcess; log: string }> = [];
    for (const [i, node] of nodes.entries()) {
      const ports = NODE_PORTS[i] ?? NODE_PORTS[0];
      progress(`starting the agent of node ${node} (metrics :${ports.metrics}, admin :${ports.admin})`);
      const agent = start(`agent-${node}`, ['agent', '--control-plane', `127.0.0.1:${PORTS.grpcTls}`, '--ca-root', join(caDir, 'root-cert.pem'), '--node', node, '--bpf-root', join(PIN_BASE, node), '--metrics', `127.0.0.1:${ports.metrics}`, '--ready', `127.0.0.1:${ports.ready}`, '--admin', `127.0.0.1:${ports.admin}`]);
      await waitHttp(`http://127.0.0.1:${ports.ready}/healthz/ready`, 15_000, `the agent of ${node}`, agent.child, agent.log);
      agents.push(agent);
    }

    const pods: PodRecord[] = [];
    for (const w of WORKLOADS) {
      progress(`creating pod ${NAMESPACE}/${w.name} on ${nodes[w.node]} (${w.labels.join(', ')}; echo server on :${APP_PORT})`);
      const spec = validatePodSpec({ name: w.name, namespace: NAMESPACE, node: nodes[w.node], serviceAccount: w.name.replace(/-v\d$/, ''), labels: w.labels, command: [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', String(APP_PORT)] });
      const record = await runtime.create(spec, { detached: true });
      cleanups.push(() => runtime.remove(record, 1000));
      const { record: running } = await runtime.start(record);
      // Seen from inside the pod: a dial from the host would go through the mesh once the agent
      // serves the pod, and show in the summary as a plaintext connection.
      await waitForPodListener(running.pid, APP_PORT, 10_000);
      pods.push(running);
    }
    progress(`creating pod ${NAMESPACE}/loadgen on ${nodes[0]}`);
    const loadSpec = validatePodSpec({ name: 'loadgen', namespace: NAMESPACE, serviceAccount: 'loadgen', labels: ['app=loadgen'], command: ['sleep', 'infinity'] });
    const loadRecord = await runtime.create(loadSpec, { detached: true });
    cleanups.push(() => runtime.remove(loadRecord, 1000));
    const { record: loadPod } = await runtime.start(loadRecord);

    progress('waiting for the agents to enroll and verify every pod');
    const expected = nodes.map((_, i) => WORKLOADS.filter((w) => w.node === i).length + (i === 0 ? 1 : 0));
    for (let i = 0; ; i++) {
      const verified = await Promise.all(
        NODE_PORTS.map(async (ports) => {
          const body = (await fetch(`http://127.0.0.1:${ports.admin}/pods`).then((r) => r.json()).catch(() => ({ pods: [] }))) as { pods: Array<{ namespace: string; verified: boolean }> };
          return body.pods.filter((p) => p.namespace === NAMESPACE && p.verified).length;
        }),
      );
      if (verified.every((n, k) => n === expected[k])) break;
      if (i > 150) {
        const logs = agents.map((a) => a.log).join(', ');
        throw new NodemeshError('NM_ERR_DEMO', `the agents verified ${verified.join(' and ')} of ${expected.join(' and ')} pods within 30 s`, { context: { path: logs }, hint: `read ${logs}` });
      }
      await sleep(200);
    }

    write(
      [
        '',
        'the mesh is up. Look at:',
        ...nodes.flatMap((node, i) => [
          `  node ${node}:`,
          `    http://127.0.0.1:${NODE_PORTS[i]?.metrics}/metrics          its Prometheus metrics (istio_tcp_*, nodemesh_*)`,
          `    http://127.0.0.1:${NODE_PORTS[i]?.admin}/pods  /config   its agent's enrolled pods and routing tables`,
        ]),
        `  http://127.0.0.1:${PORTS.cpHttp}/debug/nodes     every node and its config version`,
        `  http://127.0.0.1:${PORTS.cpHttp}/debug/snapshot?node=${nodes[0]}`,
        `  nodemesh status --admin 127.0.0.1:${NODE_PORTS[1].admin}    nodemesh status --control-plane 127.0.0.1:15014`,
        `  edit ${EXAMPLES}/*.yaml: the agents apply it within a second`,
        `  logs: ${work}/{control-plane,${nodes.map((n) => `agent-${n}`).join(',')}}.log`,
        '',
      ].join('\n') + '\n',
    );
    const duration = options.durationMs ?? 24 * 3600_000;
    progress(`loadgen calls ${TARGETS.join(', ')} at ${options.rate}/s each ${options.durationMs === undefined ? 'until Ctrl-C' : `for ${duration / 1000} s`}`);
    loadgen = runtime.exec(loadPod, [process.execPath, CLI_ENTRY, 'debug', 'load', ...TARGETS, '--rate', String(options.rate), '--duration', String(duration)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let output = '';
    loadgen.stdout?.on('data', (d: Buffer) => (output += d.toString()));
    const done = new Promise((resolve) => loadgen?.once('close', resolve));
    const t0 = Date.now();
    const ticker = setInterval(() => {
      void Promise.all(NODE_PORTS.map((p) => fetch(`http://127.0.0.1:${p.metrics}/metrics`).then((r) => r.text())))
        .then((all) => progress(`${Math.round((Date.now() - t0) / 1000)} s: ${all.flatMap(requestsByEndpoint).reduce((n, r) => n + r.connections, 0)} requests served`))
        .catch(() => undefined);
    }, 5000);
    await done;
    clearInterval(ticker);
    const result = JSON.parse(output.trim().split('\n').pop() ?? '{}') as LoadResult;
    const rows: Array<EndpointRow & { node: string }> = [];
    for (const [i, node] of nodes.entries()) {
      const metrics = await fetch(`http://127.0.0.1:${NODE_PORTS[i]?.metrics}/metrics`)
        .then((r) => r.text())
        .catch((e: unknown) => {
          write(`the metrics of node ${node} could not be read (${(e as Error).message}); see ${agents[i]?.log}\n`);
          return '';
        });
      rows.push(...requestsByEndpoint(metrics).map((r) => ({ ...r, node })));
    }
    rows.sort((a, b) => (a.service + a.version < b.service + b.version ? -1 : 1));
    write(
      '\nrequests per Service and endpoint (each node\'s metrics, reporter="destination"):\n' +
        table(
          ['SERVICE', 'WORKLOAD', 'VERSION', 'REQUESTS', 'BYTES IN', 'BYTES OUT', 'NODE', 'MTLS'],
          rows.map((r) => [r.service, r.workload, r.version, String(r.connections), String(r.bytesIn), String(r.bytesOut), r.node, r.security === 'mutual_tls' ? 'yes' : 'no']),
        ),
    );
    const targets = Object.entries(result.targets ?? {});
    write(
      `\nwhat loadgen saw in ${(result.seconds ?? 0).toFixed(1)} s:\n` +
        table(
          ['TARGET', 'OK', 'FAILED', 'ERRORS'],
          targets.map(([t, c]) => [t, String(c.ok), String(c.failed), Object.entries(c.errors).map(([e, n]) => `${e}: ${n}`).join(', ') || '-']),
        ),
    );
    const ok = targets.length === TARGETS.length && targets.every(([, c]) => c.ok > 0 && c.failed === 0) && rows.length >= 4;
    return ok ? 0 : 1;
  } finally {
    await cleanUp();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}
