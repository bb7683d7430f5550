/** Load generators run inside the client pod (so capture applies), and their output parsed. */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';

import type { RuntimeConfig } from '../src/runtime/config.js';
import { LocalPodRuntime } from '../src/runtime/pods.js';
import type { PodRecord } from '../src/runtime/store.js';
import { CLI_ENTRY, PACKAGE_ROOT } from '../src/shared/paths.js';
import { isBpffsMounted, preflight, releaseBpffs } from '../src/cli/preflight.js';
import { probeBpf } from '../src/datapath/native.js';

export interface Output {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

export const LATENCY_TOOL = join(PACKAGE_ROOT, 'build', 'bench', 'latency');

export async function execIn(runtime: LocalPodRuntime, pod: PodRecord, argv: string[]): Promise<Output> {
  const child: ChildProcess = runtime.exec(pod, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  if (code !== 0) throw new Error(`${argv.join(' ')} failed (exit ${code}): ${stderr || stdout}`);
  return { code, stdout, stderr };
}

const url = (host: string, port: number): string => `http://${host.includes(':') ? `[${host}]` : host}:${port}/`;

/** Gbit/s at the receiver from `iperf3 -J` output. */
export function parseIperf(stdout: string, target: string): number {
  const report = JSON.parse(stdout) as { error?: string; end?: { sum_received?: { bits_per_second: number } } };
  const bps = report.end?.sum_received?.bits_per_second;
  if (report.error || bps === undefined) throw new Error(`iperf3 to ${target}: ${report.error ?? 'no result'}`);
  return bps / 1e9;
}

/** Single-stream TCP throughput in Gbit/s (iperf3, receiver side). */
export async function iperf(runtime: LocalPodRuntime, client: PodRecord, host: string, port: number, seconds: number): Promise<number> {
  const out = await execIn(runtime, client, ['iperf3', '-c', host, '-p', String(port), '-t', String(seconds), '-J']);
  return parseIperf(out.stdout, `${host}:${port}`);
}

/** The wrk arguments of every benchmark: one thread, 32 connections; keepAlive false sends Connection: close. */
export function wrkArgs(seconds: number, keepAlive: boolean): string[] {
  return ['wrk', '-t1', '-c32', `-d${seconds}s`, ...(keepAlive ? [] : ['-H', 'Connection: close'])];
}

/** The rate and count from wrk's output; a run that saw errors is refused (failed requests would make a path look fast). */
export function parseWrk(stdout: string, target: string): { rps: number; requests: number } {
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(stdout)?.[1]);
  const requests = Number(/(\d+) requests in/.exec(stdout)?.[1]);
  if (!Number.isFinite(rps)) throw new Error(`wrk printed no rate: ${stdout}`);
  const errors = /Non-2xx or 3xx responses: (\d+)|Socket errors: .*/.exec(stdout);
  if (errors) throw new Error(`wrk saw errors against ${target}: ${errors[0]}`);
  return { rps, requests };
}

/** A command on this host (loopback only), its standard output once it ends. */
export async function outputOf(argv: ReadonlyArray<string>): Promise<string> {
  const [command = '', ...args] = argv;
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise((resolve) => child.once('close', resolve));
  return out;
}

/** Keep-alive requests/s with wrk from this host to 127.0.0.1:port (loopback benchmarks). */
export async function wrkLocal(port: number, seconds: number): Promise<{ rps: number; requests: number }> {
  return parseWrk(await outputOf([...wrkArgs(seconds, true), `http://127.0.0.1:${port}/`]), `127.0.0.1:${port}`);
}

/** Requests per second with wrk; keepAlive false sends Connection: close (new connections/s). */
export async function wrk(runtime: LocalPodRuntime, client: PodRecord, host: string, port: number, seconds: number, keepAlive: boolean): Promise<{ rps: number; requests: number }> {
  const out = await execIn(runtime, client, [...wrkArgs(seconds, keepAlive), url(host, port)]);
  return parseWrk(out.stdout, `${host}:${port}`);
}

/** Keep-alive requests/s over HTTP/2 with prior knowledge (h2load: 32 connections, 10 streams each). */
export async function h2load(runtime: LocalPodRuntime, client: PodRecord, host: string, port: number, seconds: number): Promise<{ rps: number; requests: number }> {
  const out = await execIn(runtime, client, ['h2load', '-c32', '-m10', '-t1', `-D${seconds}`, url(host, port)]);
  const rps = Number(/finished in [\d.]+m?s, ([\d.]+) req\/s/.exec(out.stdout)?.[1]);
  const done = /requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored/.exec(out.stdout);
  if (!Number.isFinite(rps) || !done) throw new Error(`h2load printed no rate: ${out.stdout}`);
  if (Number(done[4]) > 0 || Number(done[5]) > 0) throw new Error(`h2load saw failures against ${host}:${port}: ${done[0]}`);
  const codes = /status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx/.exec(out.stdout);
  if (codes && (Number(codes[3]) > 0 || Number(codes[4]) > 0)) throw new Error(`h2load saw error answers against ${host}:${port}: ${codes[0]}`);
  return { rps, requests: Number(done[3]) };
}

export interface Latency {
  readonly p50: number;
  readonly p90: number;
  readonly p99: number;
  readonly rps: number;
}

/**
 * Latency percentiles in ms at a fixed 1000 requests/s over 10 keep-alive connections, from
 * bench/latency.c (open loop, microsecond resolution; hey's 0.1 ms steps were too coarse).
 */
export async function latencyFixedRate(runtime: LocalPodRuntime, client: PodRecord, host: string, port: number, seconds: number): Promise<Latency> {
  const out = await execIn(runtime, client, [LATENCY_TOOL, host, String(port), '1000', String(seconds), '10']);
  const r = JSON.parse(out.stdout.trim().split('\n').pop() ?? '{}') as { requests: number; errors: number; missing: number; p50: number; p90: number; p99: number };
  if (!(r.requests > 0) || r.errors > 0 || r.missing > 0) throw new Error(`latency run against ${host}:${port} failed: ${out.stdout} ${out.stderr}`);
  return { p50: r.p50, p90: r.p90, p99: r.p99, rps: r.requests / seconds };
}

/** User+system CPU seconds of processes, from /proc/PID/stat (clock ticks of 100 Hz). */
export async function cpuSeconds(pids: ReadonlyArray<number>): Promise<number> {
  const { readFile } = await import('node:fs/promises');
  let ticks = 0;
  for (const pid of pids) {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    ticks += Number(fields[11] ?? 0) + Number(fields[12] ?? 0);
  }
  return ticks / 100;
}

export async function rssMiB(pid: number): Promise<number> {
  const { readFile } = await import('node:fs/promises');
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1]) / 1024;
}

/**
 * How the bench starts the agent: through bin/nodemesh.js (so with the V8 flags it ships with),
 * or under `node $BENCH_NODE_FLAGS` when that is set, to compare flags in the same run.
 */
export function agentCommand(args: ReadonlyArray<string>): [string, string[]] {
  const flags = process.env['BENCH_NODE_FLAGS']?.split(' ').filter((f) => f !== '');
  return flags ? [process.execPath, [...flags, CLI_ENTRY, ...args]] : [CLI_ENTRY, [...args]];
}

/** Removes a benchmark's cgroup subtree (the nodes' pod cgroups outlive their pods). */
/** What one benchmark run lays out on this machine, every name carrying one id. */
export interface BenchLayout {
  readonly id: string;
  readonly config: RuntimeConfig;
  readonly runtime: LocalPodRuntime;
  /** A folder of its own for configs, certificates and logs. */
  readonly work: string;
  /** Where its agents pin their BPF objects. */
  readonly pinRoot: string;
  /** Takes away the cgroup subtree, the work folder and the runtime's state (after the run's own cleanups); failures go to `report`. */
  remove(report: (message: string) => void): Promise<void>;
}

/**
 * A pod runtime of its own for a benchmark run, once the datapath's preflight passed: bridge
 * `<bridge><id>`, the given pod ranges, cgroup subtree, state folder and bpffs folder
 * `nodemesh-<label>-<id>`, a work folder. bpffs, when the preflight mounted it, is unmounted again
 * by remove() if nothing is left pinned (as the test sandbox does): a bench run straight with node,
 * not through scripts/bench.sh, leaves the machine as it found it too.
 */
export async function benchLayout(o: { readonly label?: string; readonly workPrefix?: string; readonly bridge: string; readonly podCidr4: RuntimeConfig['podCidr4']; readonly podCidr6: RuntimeConfig['podCidr6']; readonly namePrefix: string; readonly node: string }): Promise<BenchLayout> {
  const mountedBpffs = !(await isBpffsMounted());
  await preflight(probeBpf);
  const id = Date.now().toString(36).slice(-5);
  const label = o.label ?? 'bench';
  const config: RuntimeConfig = {
    stateDir: `/tmp/nodemesh-${label}-${id}`,
    bridge: `${o.bridge}${id}`,
    podCidr4: o.podCidr4,
    podCidr6: o.podCidr6,
    cgroupSubtree: `nodemesh-${label}-${id}`,
    namePrefix: o.namePrefix,
    node: o.node,
  };
  const work = await mkdtemp(join(tmpdir(), o.workPrefix ?? `nodemesh-${label}-`));
  return {
    id,
    config,
    runtime: new LocalPodRuntime(config),
    work,
    pinRoot: `/sys/fs/bpf/nodemesh-${label}-${id}`,
    async remove(report) {
      await removeCgroupTree(config.cgroupSubtree).catch((e: unknown) => report(`cleanup: ${(e as Error).message}`));
      await rm(work, { recursive: true, force: true });
      await rm(config.stateDir, { recursive: true, force: true });
      if (mountedBpffs) await releaseBpffs().catch((e: unknown) => report(`cleanup: ${(e as Error).message}`));
    },
  };
}

export async function removeCgroupTree(subtree: string): Promise<void> {
  const { findCgroup2Mount, removeCgroupTree: remove } = await import('../src/runtime/cgroup.js');
  await remove(join(await findCgroup2Mount(), subtree));
}

/** One path's numbers: what `npm run bench` reports for direct, the sidecar peer and nodemesh. */
export interface Scenario {
  throughputGbps: number;
  keepAliveRps: number;
  newConnRps: number;
  latency: Latency;
  proxyCpuSecPer1000Req: number | null;
}

export const IPERF_PORT = 5201;

/**
 * Throughput (iperf3 to IPERF_PORT), keep-alive and new-connection requests/s (wrk), latency at a
 * fixed rate, and the CPU the proxies (`proxyPids`) spent per 1000 keep-alive requests.
 */
export async function measure(runtime: LocalPodRuntime, client: PodRecord, host: string, httpPort: number, proxyPids: () => number[], seconds: number): Promise<Scenario> {
  const throughputGbps = await iperf(runtime, client, host, IPERF_PORT, seconds);
  const cpu0 = await cpuSeconds(proxyPids());
  const ka = await wrk(runtime, client, host, httpPort, seconds, true);
  const cpu1 = await cpuSeconds(proxyPids());
  const nc = await wrk(runtime, client, host, httpPort, seconds, false);
  const latency = await latencyFixedRate(runtime, client, host, httpPort, seconds);
  const pids = proxyPids();
  return { throughputGbps, keepAliveRps: ka.rps, newConnRps: nc.rps, latency, proxyCpuSecPer1000Req: pids.length > 0 ? ((cpu1 - cpu0) / ka.requests) * 1000 : null };
}

/** The markdown table of scenarios the benchmarks print. */
export function scenarioTable(rows: ReadonlyArray<readonly [string, Scenario]>): string[] {
  const f = (n: number | null, d = 2): string => (n === null ? '-' : n.toFixed(d));
  return [
    '| path | throughput Gbit/s | keep-alive req/s | new conn/s | p50 ms | p90 ms | p99 ms | proxy CPU s / 1000 req |',
    '|---|---|---|---|---|---|---|---|',
    ...rows.map(([n, s]) => `| ${n} | ${f(s.throughputGbps)} | ${f(s.keepAliveRps, 0)} | ${f(s.newConnRps, 0)} | ${f(s.latency.p50, 3)} | ${f(s.latency.p90, 3)} | ${f(s.latency.p99, 3)} | ${f(s.proxyCpuSecPer1000Req, 3)} |`),
  ];
}

/** The markdown table of h2load rows the benchmarks print (the table's heading line first). */
export function h2Table(heading: string, rows: ReadonlyArray<readonly [string, H2Scenario]>): string[] {
  const f = (n: number | null, d: number): string => (n === null ? '-' : n.toFixed(d));
  return [heading, '', '| path | keep-alive req/s | proxy CPU s / 1000 req |', '|---|---|---|', ...rows.map(([n, x]) => `| ${n} | ${f(x.keepAliveRps, 0)} | ${f(x.proxyCpuSecPer1000Req, 3)} |`)];
}

/**
 * The benchmarks' app: nginx on `port` (v4 and v6) answering every request with 1 KB, and with
 * `h2Port` the same over HTTP/2 with prior knowledge there. Returns the config's path.
 */
export async function writeNginxConf(work: string, port: number, h2Port?: number): Promise<string> {
  const { writeFile } = await import('node:fs/promises');
  const path = join(work, 'nginx.conf');
  const answer = `location / { return 200 "${'x'.repeat(1024)}"; }`;
  const h2 = h2Port === undefined ? '' : ` http2_max_requests 1000000; server { listen ${h2Port} http2; listen [::]:${h2Port} http2; ${answer} }`;
  await writeFile(
    path,
    `daemon off; worker_processes 1; pid ${work}/nginx.pid; error_log stderr;\nevents { worker_connections 4096; }\nhttp { access_log off; keepalive_requests 1000000; server { listen ${port}; listen [::]:${port}; ${answer} }${h2} }\n`,
  );
  return path;
}

/** HTTP/2 measured by h2load: requests/s and proxy CPU (no fixed-rate latency: the latency client speaks HTTP/1.1). */
export interface H2Scenario {
  keepAliveRps: number;
  proxyCpuSecPer1000Req: number | null;
}

/** h2load's keep-alive requests/s over `seconds` after a 1 s warm-up, with the CPU of `pids` per 1000 requests. */
export async function measureH2(runtime: LocalPodRuntime, client: PodRecord, host: string, port: number, pids: () => number[], seconds: number): Promise<H2Scenario> {
  await h2load(runtime, client, host, port, 1); // warm-up
  const cpu0 = await cpuSeconds(pids());
  const r = await h2load(runtime, client, host, port, seconds);
  const cpu1 = await cpuSeconds(pids());
  return { keepAliveRps: r.rps, proxyCpuSecPer1000Req: pids().length > 0 ? ((cpu1 - cpu0) / r.requests) * 1000 : null };
}

/** The run with the median requests/s (the lower middle one of an even count): a real run, its latency and CPU with it. */
export function medianRun<T extends { readonly keepAliveRps: number }>(runs: ReadonlyArray<T>): T {
  const sorted = [...runs].sort((a, b) => a.keepAliveRps - b.keepAliveRps);
  const run = sorted[Math.floor((sorted.length - 1) / 2)];
  if (!run) throw new Error('no run to report');
  return run;
}

/** Each round's ratio: a nodemesh run against the peer's run of the same round. */
function roundRatios(ours: ReadonlyArray<{ readonly keepAliveRps: number }>, peer: ReadonlyArray<{ readonly keepAliveRps: number }>): number[] {
  return ours.map((o, i) => o.keepAliveRps / (peer[i]?.keepAliveRps ?? Number.NaN)).sort((a, b) => a - b);
}

const twoPlaces = (n: number): number => Math.round(n * 100) / 100;

/** The median of the rounds' ratios. */
export function roundRatio(ours: ReadonlyArray<{ readonly keepAliveRps: number }>, peer: ReadonlyArray<{ readonly keepAliveRps: number }>): number {
  return twoPlaces(median(roundRatios(ours, peer)));
}

/** The lowest and highest of the rounds' ratios. */
export function ratioRange(ours: ReadonlyArray<{ readonly keepAliveRps: number }>, peer: ReadonlyArray<{ readonly keepAliveRps: number }>): [number, number] {
  const r = roundRatios(ours, peer);
  return [twoPlaces(r[0] ?? Number.NaN), twoPlaces(r[r.length - 1] ?? Number.NaN)];
}

/** The median of some numbers (the lower middle one of an even count). */
export function median(values: ReadonlyArray<number>): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)] ?? Number.NaN;
}
