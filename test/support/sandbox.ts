/**
 * Everything a test creates lives in its own sandbox: a state folder, a bridge, subnets, a cgroup
 * subtree, a bpffs folder and netns/veth names with the "nmt" prefix. cleanup() removes all of
 * it, and the test registers it with t.after() so it runs when the test fails too.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { TestContext } from 'node:test';

import { hostAddress, runtimeEnv, type RuntimeConfig } from '../../src/runtime/config.js';
import { LocalPodRuntime } from '../../src/runtime/pods.js';
import { validatePodSpec } from '../../src/runtime/pod-spec.js';
import type { PodRecord } from '../../src/runtime/store.js';
import { holdBlackhole } from '../../src/runtime/blackhole.js';
import { findCgroup2Mount, removeCgroupTree } from '../../src/runtime/cgroup.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import { waitForPodListener } from '../../src/runtime/wait.js';
import { ensureBpffs, releaseBpffs } from '../../src/cli/preflight.js';
import type { DialResult } from '../../src/cli/debug-tools.js';

export const TEST_PREFIX = 'nmt';
export const TEST_CGROUP_PREFIX = 'nodemesh-test-';
export const TEST_BPFFS_PREFIX = '/sys/fs/bpf/nodemesh-test-';
export const TEST_STATE_PREFIX = '/tmp/nodemesh-test-';

export interface Sandbox {
  readonly id: string;
  readonly config: RuntimeConfig;
  readonly runtime: LocalPodRuntime;
  readonly bpffsDir: string;
  /** Environment for CLI processes that should use this sandbox. */
  readonly env: NodeJS.ProcessEnv;
  /** Starts a pod running `nodemesh debug echo-server`; connections() excludes the readiness probe. */
  echoPod(name: string, port: number, labels?: string[], options?: PodOptions): Promise<{ record: PodRecord; connections(): Promise<ConnectionLogEntry[]> }>;
  /** A pod running `command`, ready once something listens on `port` inside it. */
  serverPod(name: string, command: ReadonlyArray<string>, port: number, labels?: string[], options?: PodOptions): Promise<PodRecord>;
  /** Runs `argv` inside a pod to its end; its stdout (it must exit 0 within timeoutMs, default 60 s, or it is killed). */
  execIn(pod: Pick<PodRecord, 'name' | 'cgroupPath' | 'netns'>, argv: ReadonlyArray<string>, timeoutMs?: number): Promise<string>;
  /** A pod whose own command just sleeps; tests exec into it. */
  idlePod(name: string, labels?: string[], options?: PodOptions): Promise<PodRecord>;
  /** Runs `nodemesh debug dial` inside a pod (or one of its container cgroups: give that as cgroupPath) and returns its result. */
  dialFrom(pod: Pick<PodRecord, 'name' | 'cgroupPath' | 'netns'>, host: string, port: number, options?: { bytes?: number; mark?: boolean; holdMs?: number; marker?: string }): Promise<DialResult>;
  /**
   * Starts a long-lived process in a cgroup and netns (a container of a pod this test laid out
   * itself), as a pod's process; killed by its PID at cleanup, before the cgroups go.
   */
  startIn(where: Pick<PodRecord, 'cgroupPath' | 'netns'>, argv: ReadonlyArray<string>): ChildProcess;
  /** Holds a host blackhole route for a service address until cleanup. */
  blackhole(address: string): Promise<void>;
  /** Registers an extra cleanup step (runs first-in, last-out). */
  defer(step: () => Promise<unknown> | unknown): void;
  cleanup(): Promise<void>;
}

/** Where a test pod runs (default: the sandbox's node) and as whom (default: the default service account). */
export interface PodOptions {
  readonly node?: string;
  readonly serviceAccount?: string;
}

export async function createSandbox(t: TestContext): Promise<Sandbox> {
  const id = randomBytes(3).toString('hex');
  const octet = 1 + (randomBytes(1)[0] ?? 0) % 250;
  const config: RuntimeConfig = {
    stateDir: `${TEST_STATE_PREFIX}${id}`,
    bridge: `${TEST_PREFIX}b${id}`,
    podCidr4: { network: `10.201.${octet}.0`, prefix: 24 },
    podCidr6: { network: `fd00:6e74:${octet.toString(16)}::`, prefix: 64 },
    cgroupSubtree: `${TEST_CGROUP_PREFIX}${id}`,
    namePrefix: TEST_PREFIX,
    node: `test-${id}`,
  };
  const runtime = new LocalPodRuntime(config);
  const bpffsDir = `${TEST_BPFFS_PREFIX}${id}`;
  // Mounted here if it was not: unmounted again at cleanup, as the npm scripts do (lib.sh).
  const mountedBpffs = await ensureBpffs();
  await mkdir(bpffsDir, { recursive: true });
  const deferred: Array<() => Promise<unknown> | unknown> = [];
  const env: NodeJS.ProcessEnv = { ...process.env, ...runtimeEnv(config) };

  const sandbox: Sandbox = {
    id,
    config,
    runtime,
    bpffsDir,
    env,
    async echoPod(name, port, labels = ['app=echo'], options = {}) {
      const log = join(config.stateDir, `${name}.connections.jsonl`);
      const spec = validatePodSpec({ name, labels, ...options, command: [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', String(port), '--log', log] });
      const record = await runtime.create(spec, { detached: true });
      const { record: running } = await runtime.start(record);
      // Seen from inside the pod: from the host, a pod the agent already serves accepts on any
      // port (its inbound listener is steered there) before the application listens.
      await waitForPodListener(running.pid, port, 10_000);
      const host = hostAddress(config.podCidr4, 4, 1);
      const connections = async (): Promise<ConnectionLogEntry[]> => (await readConnectionLog(log)).filter((c) => c.address !== host);
      return { record: running, connections };
    },
    async serverPod(name, command, port, labels = [], options = {}) {
      const spec = validatePodSpec({ name, labels, ...options, command: [...command] });
      const { record } = await runtime.start(await runtime.create(spec, { detached: true }));
      await waitForPodListener(record.pid, port, 10_000);
      return record;
    },
    async execIn(pod, argv, timeoutMs = 60_000) {
      const child = runtime.exec(pod, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      const output = await collect(child).finally(() => clearTimeout(timer));
      if (output.code !== 0) throw new Error(`${argv.join(' ').slice(0, 200)} in ${pod.name} exited ${output.code ?? child.signalCode}${child.signalCode === 'SIGKILL' ? ` (killed after ${timeoutMs} ms)` : ''}: ${output.stderr.slice(-2000)}`);
      return output.stdout;
    },
    async idlePod(name, labels = [], options = {}) {
      const spec = validatePodSpec({ name, labels, ...options, command: ['sleep', 'infinity'] });
      const record = await runtime.create(spec, { detached: true });
      return (await runtime.start(record)).record;
    },
    async dialFrom(pod, host, port, options = {}) {
      const argv = [process.execPath, CLI_ENTRY, 'debug', 'dial', host, String(port), '--bytes', String(options.bytes ?? 4096)];
      if (options.mark) argv.push('--mark');
      if (options.holdMs) argv.push('--hold', String(options.holdMs));
      if (options.marker) argv.push('--marker', options.marker);
      const child = runtime.exec(pod, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
      const output = await collect(child);
      const line = output.stdout.trim().split('\n').pop() ?? '';
      try {
        return JSON.parse(line) as DialResult;
      } catch {
        throw new Error(`dial from ${pod.name} printed no result: stdout=${output.stdout} stderr=${output.stderr}`);
      }
    },
    startIn(where, argv) {
      const child = runtime.exec(where, argv, { stdio: 'ignore' });
      deferred.push(async () => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGKILL');
        await exited;
      });
      return child;
    },
    async blackhole(address) {
      const hole = await holdBlackhole(address);
      deferred.push(() => hole.release());
    },
    defer(step) {
      deferred.push(step);
    },
    async cleanup() {
      const errors: unknown[] = [];
      for (const step of deferred.reverse()) {
        try {
          await step();
        } catch (e) {
          errors.push(e);
        }
      }
      for (const pod of (await runtime.store.scan().catch(() => ({ records: [] }))).records) {
        await runtime.remove(pod, 500).catch((e: unknown) => errors.push(e));
      }
      await rm(bpffsDir, { recursive: true, force: true }).catch((e: unknown) => errors.push(e));
      if (mountedBpffs) await releaseBpffs().catch((e: unknown) => errors.push(e));
      // The nodes' pod cgroups outlive their pods (the gates sat on them): the subtree goes last.
      await removeCgroupTree(join(await findCgroup2Mount(), config.cgroupSubtree)).catch((e: unknown) => errors.push(e));
      await rm(config.stateDir, { recursive: true, force: true });
      if (errors.length > 0) throw new AggregateError(errors, `sandbox ${id} cleanup failed`);
    },
  };
  t.after(() => sandbox.cleanup());
  return sandbox;
}


export async function waitFor(check: () => Promise<boolean> | boolean, timeoutMs: number, what: string, intervalMs = 25): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

export async function collect(child: ChildProcess): Promise<{ code: number | null; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', (c) => resolve(c));
  });
  return { code, stdout, stderr };
}

/** Runs the nodemesh CLI with the given environment. */
export async function cli(args: ReadonlyArray<string>, env: NodeJS.ProcessEnv, prefix: ReadonlyArray<string> = []): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const argv = [...prefix, process.execPath, CLI_ENTRY, ...args];
  const child = spawn(argv[0] ?? '', argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'] });
  return collect(child);
}

export interface ConnectionLogEntry {
  readonly address: string;
  readonly port: number;
  readonly local: string;
  readonly localPort: number;
  readonly bytes: number;
}

export async function readConnectionLog(path: string): Promise<ConnectionLogEntry[]> {
  try {
    const text = await readFile(path, 'utf8');
    return text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as ConnectionLogEntry);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}
