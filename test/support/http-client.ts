/**
 * A real HTTP/1.1 client for L7 tests, run inside a pod: `node http-client.js <json plan>`. Sends
 * the plan's requests one after the other over ONE keep-alive connection (a new one only if the
 * server closes it), and prints one JSON line: each answer's status, x-served-by, body size and
 * sha256, trailers; and how many connections it took.
 *
 * Plan: {host, port, requests: [{method?, path, headers?, body?: bytes, chunked?: boolean}], repeat?,
 * raw?: [bytes as latin1 text]}. Each raw entry goes on a connection of its own, as written; its
 * answer's status line is reported (or "closed" when the connection closed without one).
 */
import { createHash, randomBytes } from 'node:crypto';
import { Agent, request } from 'node:http';
import { connect, type Socket } from 'node:net';

export interface HttpPlan {
  readonly host: string;
  readonly port: number;
  readonly requests: ReadonlyArray<{ readonly method?: string; readonly path: string; readonly headers?: Record<string, string>; readonly body?: number; readonly chunked?: boolean }>;
  readonly repeat?: number;
  readonly raw?: ReadonlyArray<string>;
  /** Clients sending the plan at once, each on its own connection (default 1). */
  readonly parallel?: number;
  /** Upgrades to the "echo" protocol of http-app (or `protocol`): the answer's status line, and what came back of `send` after it. */
  readonly upgrades?: ReadonlyArray<{ readonly path: string; readonly send: string; readonly protocol?: string }>;
  /** A pause on the connection after this many requests (the test changes something meanwhile). */
  readonly pause?: { readonly after: number; readonly ms: number };
  /** Paced: the n-th request starts no sooner than n * intervalMs after the first (a steady rate). */
  readonly intervalMs?: number;
}

export interface HttpAnswer {
  readonly status: number;
  readonly servedBy: string;
  readonly bytes: number;
  readonly sha256: string;
  /** The request body's sha256, when it had one. */
  readonly sent?: string;
  readonly trailers: Record<string, string>;
  readonly headers: Record<string, string | string[] | undefined>;
  readonly error?: string;
  /** From the request's start to the answer's end. */
  readonly ms: number;
  /** The answer's body as text, when it is at most 4 KiB. */
  readonly text?: string;
}

export interface HttpRun {
  readonly answers: HttpAnswer[];
  readonly connections: number;
  /** Per raw entry: the answer's status line, or "closed". */
  readonly raw: string[];
  readonly upgrades: Array<{ status: string; echoed: string }>;
}

/** An upgrade request on a connection of its own; after a 101, `send` goes and its echo is read. */
function upgradeExchange(host: string, port: number, u: NonNullable<HttpPlan['upgrades']>[number]): Promise<{ status: string; echoed: string }> {
  return new Promise((resolve) => {
    let got = '';
    let head = '';
    const s = connect(port, host, () => s.write(`GET ${u.path} HTTP/1.1\r\nhost: ${host}\r\nconnection: upgrade\r\nupgrade: ${u.protocol ?? 'echo'}\r\n\r\n`));
    const done = (): void => {
      clearTimeout(timer);
      s.destroy();
      resolve({ status: (head || got).split('\r\n')[0] ?? 'closed', echoed: head ? got : '' });
    };
    const timer = setTimeout(done, 5000);
    s.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (head) {
        if (got.length >= u.send.length) done();
        return;
      }
      const end = got.indexOf('\r\n\r\n');
      if (end < 0) return;
      head = got.slice(0, end);
      got = got.slice(end + 4);
      if (!head.startsWith('HTTP/1.1 101')) return done();
      s.write(u.send);
    });
    s.on('close', done);
    s.on('error', done);
  });
}

function rawExchange(host: string, port: number, text: string): Promise<string> {
  return new Promise((resolve) => {
    let got = '';
    const s = connect(port, host, () => s.write(Buffer.from(text, 'latin1')));
    const done = (): void => {
      clearTimeout(timer);
      s.destroy();
      resolve(got.includes('\r\n') ? (got.split('\r\n')[0] ?? '') : 'closed');
    };
    const timer = setTimeout(done, 5000);
    s.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (got.includes('\r\n')) done();
    });
    s.on('close', done);
    s.on('error', done);
  });
}

/** The plan's requests, repeated, one after the other on one keep-alive connection. */
async function sequence(plan: HttpPlan, sockets: Set<Socket>, answers: HttpAnswer[]): Promise<void> {
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  let sent = 0;
  const start = performance.now();
  let n = 0;
  for (let i = 0; i < (plan.repeat ?? 1); i++) {
    for (const r of plan.requests) {
      if (plan.pause && sent++ === plan.pause.after) await new Promise((resolve) => setTimeout(resolve, plan.pause?.ms));
      const due = start + n++ * (plan.intervalMs ?? 0) - performance.now();
      if (due > 0) await new Promise((resolve) => setTimeout(resolve, due));
      answers.push(
        await new Promise<HttpAnswer>((resolve) => {
          const body = r.body === undefined ? undefined : randomBytes(r.body);
          const t0 = performance.now();
          const headers: Record<string, string | number> = { ...r.headers };
          if (body && !r.chunked) headers['content-length'] = body.length;
          const req = request({ host: plan.host, port: plan.port, method: r.method ?? (body ? 'POST' : 'GET'), path: r.path, headers, agent }, (res) => {
            const hash = createHash('sha256');
            let bytes = 0;
            const small: Buffer[] = [];
            res.on('data', (c: Buffer) => {
              hash.update(c);
              bytes += c.length;
              if (bytes <= 4096) small.push(c);
            });
            res.on('end', () =>
              resolve({
                status: res.statusCode ?? 0,
                servedBy: String(res.headers['x-served-by'] ?? ''),
                bytes,
                sha256: hash.digest('hex'),
                ...(body ? { sent: createHash('sha256').update(body).digest('hex') } : {}),
                trailers: { ...res.trailers } as Record<string, string>,
                headers: res.headers,
                ms: performance.now() - t0,
                ...(bytes <= 4096 ? { text: Buffer.concat(small).toString() } : {}),
              }),
            );
          });
          req.on('socket', (s: Socket) => sockets.add(s));
          req.on('error', (e) => resolve({ status: 0, servedBy: '', bytes: 0, sha256: '', trailers: {}, headers: {}, error: e.message, ms: performance.now() - t0 }));
          if (body && r.chunked) {
            // Several writes without a length: chunked on the wire.
            for (let o = 0; o < body.length; o += 65536) req.write(body.subarray(o, o + 65536));
            req.end();
          } else req.end(body);
        }),
      );
    }
  }
  agent.destroy();
}

async function main(): Promise<void> {
  const plan = JSON.parse(process.argv[2] ?? '{}') as HttpPlan;
  const sockets = new Set<Socket>();
  const answers: HttpAnswer[] = [];
  // Each of `parallel` clients on its own keep-alive connection, all at once.
  await Promise.all(Array.from({ length: plan.parallel ?? 1 }, () => sequence(plan, sockets, answers)));
  const raw: string[] = [];
  for (const text of plan.raw ?? []) raw.push(await rawExchange(plan.host, plan.port, text));
  const upgrades: HttpRun['upgrades'] = [];
  for (const u of plan.upgrades ?? []) upgrades.push(await upgradeExchange(plan.host, plan.port, u));
  const run: HttpRun = { answers, connections: sockets.size, raw, upgrades };
  process.stdout.write(`${JSON.stringify(run)}\n`);
}

await main();
