/**
 * Small network tools that run inside pods for the demo and the tests: an echo server that logs
 * each peer, and a dialer that sends bytes and checks what comes back. They write JSON lines to
 * stdout because their output is read by programs.
 */
import { createHash, randomBytes } from 'node:crypto';
import { appendFileSync } from 'node:fs';
import { connect, createServer, Socket, type Server } from 'node:net';
import { performance } from 'node:perf_hooks';

import { listenError } from '../shared/ports.js';

/** Resolves once it listens on every address; a port that is taken fails with NM_ERR_PORT_IN_USE. */
export async function echoServer(port: number, logFile: string | undefined, resetAfter?: number, extraPorts: ReadonlyArray<number> = []): Promise<void> {
  const onConnection = (socket: Socket): void => {
    const peer = { address: socket.remoteAddress, port: socket.remotePort, local: socket.localAddress, localPort: socket.localPort };
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      if (logFile) appendFileSync(logFile, JSON.stringify({ ...peer, bytes: socket.bytesRead }) + '\n');
    });
    if (resetAfter !== undefined) {
      // An upstream that dies mid-response: part of an answer, then a reset (tests of the relay).
      socket.write(Buffer.alloc(resetAfter, 0x61), () => setTimeout(() => socket.resetAndDestroy(), 50));
      return;
    }
    socket.pipe(socket);
  };
  // A graceful server, as a pod's application should be: on SIGTERM it stops accepting and exits
  // once its open connections have ended (or after 2 s).
  const servers: Server[] = [];
  process.once('SIGTERM', () => {
    let open = servers.length;
    for (const s of servers) s.close(() => --open === 0 && process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  });
  const listen = async (host: string, p: number): Promise<void> => {
    const server = createServer({ allowHalfOpen: true }, onConnection);
    servers.push(server);
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e) => reject(listenError(e, { host, port: p }, 'port')));
      server.listen({ host, port: p, ipv6Only: host === '::' }, () => resolve());
    });
  };
  for (const host of ['0.0.0.0', '::']) await listen(host, port);
  // More ports (IPv4 only): tests of what many destinations do to the metrics.
  for (const p of extraPorts) await listen('0.0.0.0', p);
}

/** Dials host on every port of a range, `parallel` at a time; how many came back intact. */
export async function dialPorts(host: string, from: number, to: number, parallel: number): Promise<{ ok: number; failed: number }> {
  let next = from;
  let ok = 0;
  let failed = 0;
  const worker = async (): Promise<void> => {
    while (next <= to) {
      const port = next++;
      if ((await dial(host, port, 16, { timeoutMs: 5000 })).intact) ok++;
      else failed++;
    }
  };
  await Promise.all(Array.from({ length: parallel }, () => worker()));
  return { ok, failed };
}

export interface DialResult {
  readonly ok: boolean;
  readonly error?: string;
  readonly sent: number;
  readonly received: number;
  readonly intact: boolean;
  readonly local?: string;
  readonly localPort?: number;
  readonly connectMs?: number;
  readonly totalMs: number;
}

/** Dials host:port, sends `bytes` random bytes, half-closes, and compares the echo. */
export async function dial(host: string, port: number, bytes: number, options: { mark?: number; timeoutMs?: number; holdMs?: number; marker?: string } = {}): Promise<DialResult> {
  // A marker repeated (a packet capture can look for it) or random bytes.
  const payload = options.marker ? Buffer.from(options.marker.repeat(Math.ceil(bytes / options.marker.length))).subarray(0, bytes) : randomBytes(bytes);
  const sentHash = createHash('sha256').update(payload).digest('hex');
  const t0 = performance.now();
  let socket: Socket;
  let connectMs: number | undefined;
  try {
    if (options.mark !== undefined) {
      // A marked socket made from this process (and so this pod's cgroup) through the addon.
      const { connectInNetns } = await import('../datapath/native.js');
      const fd = await connectInNetns({ netns: '/proc/thread-self/ns/net', host, port, mark: options.mark, timeoutMs: options.timeoutMs ?? 5000 });
      socket = new Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
    } else {
      socket = await new Promise<Socket>((resolve, reject) => {
        const s = connect({ host, port, allowHalfOpen: true, timeout: options.timeoutMs ?? 5000 });
        s.once('connect', () => resolve(s));
        s.once('timeout', () => reject(Object.assign(new Error('connect timeout'), { code: 'ETIMEDOUT' })));
        s.once('error', reject);
      });
    }
    connectMs = performance.now() - t0;
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { context?: { errnoCode?: string } };
    return { ok: false, error: err.context?.errnoCode ?? err.code ?? err.message, sent: 0, received: 0, intact: false, totalMs: performance.now() - t0 };
  }
  const hash = createHash('sha256');
  let received = 0;
  return new Promise<DialResult>((resolve) => {
    socket.setTimeout(options.timeoutMs ?? 10_000, () => socket.destroy(new Error('idle timeout')));
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length;
      hash.update(chunk);
    });
    socket.once('error', (e: NodeJS.ErrnoException) =>
      resolve({ ok: false, error: e.code ?? e.message, sent: bytes, received, intact: false, totalMs: performance.now() - t0 }),
    );
    socket.once('end', () => {
      const intact = received === bytes && hash.digest('hex') === sentHash;
      resolve({
        ok: intact,
        sent: bytes,
        received,
        intact,
        local: socket.localAddress ?? '',
        localPort: socket.localPort ?? 0,
        ...(connectMs === undefined ? {} : { connectMs }),
        totalMs: performance.now() - t0,
      });
      socket.destroy();
    });
    // With holdMs the connection stays open that long after the bytes went out.
    if (options.holdMs) {
      socket.write(payload);
      setTimeout(() => socket.end(), options.holdMs);
    } else socket.end(payload);
  });
}

export interface LoadResult {
  /** "host:port" -> requests whose bytes came back intact, and failures by error. */
  readonly targets: Record<string, { ok: number; failed: number; errors: Record<string, number> }>;
  readonly seconds: number;
}

/**
 * A steady load for the demo: every target gets `rate` requests a second (a new connection each,
 * 1 KiB sent and checked on the way back), for `durationMs` or until SIGTERM/SIGINT. At most
 * 64 requests are in flight: a stalled target slows the load instead of piling up sockets.
 */
export async function load(targets: ReadonlyArray<{ host: string; port: number }>, rate: number, durationMs: number): Promise<LoadResult> {
  const result: LoadResult['targets'] = {};
  const started = performance.now();
  let inFlight = 0;
  let stopping = false;
  const stop = (): void => void (stopping = true);
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  const timers = targets.map((t) => {
    const key = `${t.host.includes(':') ? `[${t.host}]` : t.host}:${t.port}`;
    const counts = (result[key] = { ok: 0, failed: 0, errors: {} as Record<string, number> });
    return setInterval(() => {
      if (stopping || inFlight >= 64) return;
      inFlight++;
      void dial(t.host, t.port, 1024, { timeoutMs: 5000 }).then((r) => {
        inFlight--;
        if (r.ok) counts.ok++;
        else {
          counts.failed++;
          const why = r.error ?? 'not intact';
          counts.errors[why] = (counts.errors[why] ?? 0) + 1;
        }
      });
    }, 1000 / rate);
  });
  while (!stopping && performance.now() - started < durationMs) await new Promise((r) => setTimeout(r, 100));
  for (const t of timers) clearInterval(t);
  while (inFlight > 0) await new Promise((r) => setTimeout(r, 20));
  return { targets: result, seconds: (performance.now() - started) / 1000 };
}

export interface FloodResult {
  /** Connections that opened and were still open after holdMs (the proxy kept them). */
  readonly held: number;
  /** Connections that failed, by error (a refusal by the proxy is a reset). */
  readonly failed: Record<string, number>;
}

/**
 * Opens `count` connections to host:port at once and keeps them open for holdMs (tests of
 * connection limits and fd exhaustion): a connection counts as held when it is still open then.
 */
export async function flood(host: string, port: number, count: number, holdMs: number): Promise<FloodResult> {
  const sockets: Socket[] = [];
  const failed: Record<string, number> = {};
  const errored = new Set<Socket>();
  for (let i = 0; i < count; i++) {
    const s = connect({ host, port });
    s.on('error', (e: NodeJS.ErrnoException) => {
      errored.add(s);
      const why = e.code ?? e.message;
      failed[why] = (failed[why] ?? 0) + 1;
    });
    // A proxy that refuses closes the connection: an end without an error counts too.
    s.on('end', () => {
      if (errored.has(s)) return;
      errored.add(s);
      failed['EOF'] = (failed['EOF'] ?? 0) + 1;
    });
    s.resume();
    sockets.push(s);
  }
  await new Promise((resolve) => setTimeout(resolve, holdMs));
  const held = sockets.filter((s) => !errored.has(s) && !s.destroyed && s.readyState === 'open').length;
  for (const s of sockets) s.destroy();
  return { held, failed };
}

/** New connections one after the other at a steady rate: percentiles of connect-to-echo time (ms). */
export async function dialSeries(host: string, port: number, count: number, rate: number): Promise<{ n: number; failed: number; p50: number; p99: number; max: number }> {
  const times: number[] = [];
  let failed = 0;
  const start = performance.now();
  for (let i = 0; i < count; i++) {
    const due = start + (i * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const r = await dial(host, port, 1024, { timeoutMs: 10_000 });
    if (r.intact) times.push(r.totalMs);
    else failed++;
  }
  times.sort((a, b) => a - b);
  const at = (q: number): number => times[Math.min(times.length - 1, Math.floor(q * times.length))] ?? 0;
  return { n: times.length, failed, p50: at(0.5), p99: at(0.99), max: times[times.length - 1] ?? 0 };
}
