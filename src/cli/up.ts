/**
 * `nodemesh up`, what `npm run demo` runs. For now: two local pods, the capture programs on the
 * client pod's cgroup, a relay on its 15001 listener, and one request over IPv4 and one over IPv6
 * to service addresses no host has. Prints what happened and removes everything it made.
 */
import { setTimeout as sleep } from 'node:timers/promises';

import { familyOf, formatHostPort, type SocketAddress } from '../agent/datapath/abi.js';
import { OutboundCapture, type CgroupCapture } from '../agent/datapath/capture.js';
import { probeBpf } from '../agent/datapath/native.js';
import { CaptureRelay, type RelayedConnection } from '../proxy/outbound/capture-relay.js';
import { holdBlackhole, type Blackhole } from '../runtime/blackhole.js';
import { runtimeConfigFromEnv } from '../runtime/config.js';
import { validatePodSpec } from '../runtime/pod-spec.js';
import { LocalPodRuntime } from '../runtime/pods.js';
import { waitForListener } from '../runtime/wait.js';
import type { PodRecord } from '../runtime/store.js';
import { preflight } from '../shared/preflight.js';
import { CLI_ENTRY } from '../shared/paths.js';
import type { DialResult } from './debug-tools.js';
import { table } from './output.js';

const NAMESPACE = 'nodemesh-demo';
const SERVICES = [
  { address: '10.96.0.10', port: 80 },
  { address: 'fd00:96::a', port: 80 },
] as const;
const SERVER_PORT = 8080;

type Progress = (step: string) => void;

/** Runs the dialer as the client pod's command and returns its JSON result. */
async function dialFromPod(runtime: LocalPodRuntime, client: PodRecord, service: SocketAddress): Promise<DialResult> {
  const child = runtime.exec(client, [process.execPath, CLI_ENTRY, 'debug', 'dial', service.address, String(service.port), '--bytes', '65536'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise((resolve) => child.once('close', resolve));
  return JSON.parse(out.trim().split('\n').pop() ?? '{}') as DialResult;
}

export async function up(progress: Progress, write: (text: string) => void): Promise<number> {
  progress('checking the machine (root, kernel, cgroup v2, bpffs, bpf())');
  await preflight(probeBpf);
  const runtime = new LocalPodRuntime(runtimeConfigFromEnv());
  const cleanups: Array<() => Promise<void>> = [];
  const relayed: RelayedConnection[] = [];
  let cleaning: Promise<void> | undefined;
  const cleanUp = (): Promise<void> =>
    (cleaning ??= (async () => {
      progress('cleaning up (relay, programs, pods, routes)');
      for (const c of cleanups.reverse()) await c().catch((e: unknown) => write(`cleanup: ${(e as Error).message}\n`));
    })());
  // Ctrl-C during the demo still removes everything it made.
  const onSignal = (): void => void cleanUp().then(() => process.exit(130));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    for (const stale of (await runtime.list()).filter((p) => p.namespace === NAMESPACE)) {
      progress(`removing pod ${stale.name} left by an earlier demo`);
      await runtime.remove(stale, 1000);
    }
    const holes: Blackhole[] = [];
    for (const s of SERVICES) holes.push(await holdBlackhole(s.address));
    cleanups.push(async () => {
      for (const h of holes) await h.release();
    });

    progress('creating pod demo-server (echo server on :8080)');
    const serverSpec = validatePodSpec({ name: 'demo-server', namespace: NAMESPACE, labels: ['app=echo'], command: [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', String(SERVER_PORT)] });
    const serverRecord = await runtime.create(serverSpec, { detached: true });
    cleanups.push(() => runtime.remove(serverRecord, 1000));
    await runtime.start(serverRecord);
    await waitForListener(serverRecord.ip4, SERVER_PORT, 10_000);

    progress('creating pod demo-client');
    const clientSpec = validatePodSpec({ name: 'demo-client', namespace: NAMESPACE, labels: ['app=client'], command: ['sleep', 'infinity'] });
    const client = await runtime.create(clientSpec, { detached: true });
    cleanups.push(() => runtime.remove(client, 1000));

    progress('loading the capture programs and attaching them to demo-client');
    const capture = await OutboundCapture.load();
    cleanups.push(async () => capture.close());
    const attached: CgroupCapture = await capture.attach(client.cgroupPath);
    cleanups.push(async () => attached.detach());

    const relay = new CaptureRelay({
      capture,
      pod: { name: client.name, namespace: client.namespace, netnsPath: client.netnsPath },
      route: (orig) => ({ host: orig.family === 4 ? serverRecord.ip4 : serverRecord.ip6, port: SERVER_PORT }),
      onConnection: (c) => relayed.push(c),
    });
    await relay.start();
    cleanups.push(() => relay.close());

    const rows: string[][] = [];
    for (const s of SERVICES) {
      const service: SocketAddress = { family: familyOf(s.address), address: s.address, port: s.port };
      progress(`demo-client dials ${formatHostPort(s.address, s.port)}`);
      const result = await dialFromPod(runtime, client, service);
      await sleep(50);
      const conn = relayed.shift();
      rows.push([
        formatHostPort(s.address, s.port),
        conn?.original ? formatHostPort(conn.original.address, conn.original.port) : '-',
        conn?.upstream ? formatHostPort(conn.upstream.host, conn.upstream.port) : '-',
        `${result.sent}/${result.received}`,
        result.intact ? 'yes' : `no${result.error ? ` (${result.error})` : ''}`,
        result.connectMs === undefined ? '-' : result.connectMs.toFixed(2),
        result.totalMs.toFixed(2),
      ]);
    }
    write('\n' + table(['DIALED', 'ORIGINAL DST (BPF MAP)', 'RELAYED TO (demo-server)', 'BYTES SENT/ECHOED', 'INTACT', 'CONNECT MS', 'TOTAL MS'], rows));
    const pending = capture.pending();
    write(`capture maps after the run: ${pending.connecting} connecting, ${pending.established} established-unread entries\n`);
    return rows.every((r) => r[4] === 'yes') ? 0 : 1;
  } finally {
    await cleanUp();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}
