/**
 * A real gRPC client (@grpc/grpc-js) for L7 tests, run inside a pod: `node grpc-client.js <json plan>`.
 * One channel (one HTTP/2 connection) for the whole plan; prints one JSON line with what came back.
 *
 * Plan: {host, port, unary?: {count, metadata?}, serverStream?: n, clientStream?: {messages, bytes},
 * bidi?: messages, fail?: true, raw?: [{hex, repeat?: {hex, times}}], then?: {waitFor, ping?, unary}}.
 * `then` comes last: one unary call (with the metadata `ping`) every 100 ms, keeping the connection
 * busy, until the file `waitFor` exists; then its unary calls, reported as `then`. Each raw entry (its bytes,
 * then `repeat` so many times) goes on a connection of its own after the client preface; what is reported is the GOAWAY's error code ("goaway:<code>"),
 * "closed" when the connection closed without one, or "timeout" after 5 s.
 */
import { Metadata, credentials, makeGenericClientConstructor, type ServiceError } from '@grpc/grpc-js';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';

import { ECHO_SERVICE } from './grpc-service.js';

export interface GrpcPlan {
  readonly host: string;
  readonly port: number;
  readonly unary?: { readonly count: number; readonly metadata?: Record<string, string>; readonly bytes?: number };
  readonly serverStream?: number;
  readonly clientStream?: { readonly messages: number; readonly bytes: number };
  readonly bidi?: number;
  readonly fail?: boolean;
  readonly raw?: ReadonlyArray<{ readonly hex: string; readonly repeat?: { readonly hex: string; readonly times: number } }>;
  readonly then?: { readonly waitFor: string; readonly ping?: Record<string, string>; readonly unary: { readonly count: number; readonly metadata?: Record<string, string> } };
}

export interface GrpcRun {
  /** Per unary call: the pod that answered (from the body), or the error's code. */
  readonly unary: Array<{ readonly pod?: string; readonly version?: string; readonly requestId?: string; readonly code?: number; readonly details?: string; readonly servedBy?: string }>;
  readonly serverStream?: { readonly messages: number; readonly pods: string[]; readonly code?: number };
  readonly clientStream?: { readonly messages?: number; readonly bytes?: number; readonly code?: number };
  readonly bidi?: { readonly echoed: number; readonly intact: boolean; readonly end: boolean; readonly code?: number };
  readonly fail?: { readonly code: number; readonly details: string };
  readonly raw?: string[];
  readonly then?: GrpcRun['unary'];
}

const PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');

/** Sends the preface and `bytes` on a connection of its own; the GOAWAY code the server answers with. */
function rawExchange(host: string, port: number, bytes: Buffer): Promise<string> {
  return new Promise((resolve) => {
    let got = Buffer.alloc(0);
    const s = connect(port, host, () => s.write(Buffer.concat([PREFACE, bytes])));
    const done = (why: string): void => {
      clearTimeout(timer);
      s.destroy();
      resolve(why);
    };
    const timer = setTimeout(() => done('timeout'), 5000);
    s.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      for (let o = 0; o + 9 <= got.length; ) {
        const length = got.readUIntBE(o, 3);
        if (got[o + 3] === 7 && o + 9 + 8 <= got.length) return done(`goaway:${got.readUInt32BE(o + 13)}`);
        o += 9 + length;
      }
    });
    s.on('close', () => done('closed'));
    s.on('error', () => undefined);
  });
}

type Call = { on(e: string, f: (v: never) => void): void; write(b: Buffer): boolean; end(): void };
type Client = Record<string, (...args: unknown[]) => Call>;

const plan = JSON.parse(process.argv[2] ?? '{}') as GrpcPlan;
const Ctor = makeGenericClientConstructor(ECHO_SERVICE, 'Echo');
const client = new Ctor(`${plan.host}:${plan.port}`, credentials.createInsecure()) as unknown as Client;
const parse = (b: Buffer): Record<string, unknown> => JSON.parse(b.toString()) as Record<string, unknown>;

function unary(md: Metadata, bytes: number): Promise<GrpcRun['unary'][number]> {
  return new Promise((resolve) => {
    let servedBy: string | undefined;
    const call = client['Unary']?.(Buffer.alloc(bytes, 1), md, (err: ServiceError | null, out?: Buffer) => {
      if (err) resolve({ code: err.code, details: err.details });
      else {
        const o = parse(out ?? Buffer.alloc(0));
        resolve({ pod: String(o['pod']), version: String(o['version']), requestId: String(o['requestId']), ...(servedBy ? { servedBy } : {}) });
      }
    });
    call?.on('metadata', (m: never) => (servedBy = String((m as Metadata).get('x-served-by')[0] ?? '')));
  });
}

async function main(): Promise<GrpcRun> {
  const run: { -readonly [K in keyof GrpcRun]: GrpcRun[K] } = { unary: [] };
  const calls = async (u: NonNullable<GrpcPlan['unary']>, into: GrpcRun['unary']): Promise<void> => {
    const md = new Metadata();
    for (const [k, v] of Object.entries(u.metadata ?? {})) md.set(k, v);
    for (let i = 0; i < u.count; i++) into.push(await unary(md, u.bytes ?? 16));
  };
  if (plan.unary) await calls(plan.unary, run.unary);
  if (plan.serverStream !== undefined) {
    const n = plan.serverStream;
    run.serverStream = await new Promise((resolve) => {
      const pods: string[] = [];
      const call = client['ServerStream']?.(Buffer.from([n]), new Metadata());
      call?.on('data', (b: never) => pods.push(String(parse(b as Buffer)['pod'])));
      call?.on('error', (e: never) => resolve({ messages: pods.length, pods, code: (e as ServiceError).code }));
      call?.on('end', () => resolve({ messages: pods.length, pods: [...new Set(pods)] }));
    });
  }
  if (plan.clientStream) {
    const { messages, bytes } = plan.clientStream;
    run.clientStream = await new Promise((resolve) => {
      const call = client['ClientStream']?.(new Metadata(), (err: ServiceError | null, out?: Buffer) => {
        if (err) resolve({ code: err.code });
        else {
          const o = parse(out ?? Buffer.alloc(0));
          resolve({ messages: Number(o['messages']), bytes: Number(o['bytes']) });
        }
      });
      for (let i = 0; i < messages; i++) call?.write(Buffer.alloc(bytes, i % 251));
      call?.end();
    });
  }
  if (plan.bidi !== undefined) {
    const n = plan.bidi;
    run.bidi = await new Promise((resolve) => {
      let echoed = 0;
      let intact = true;
      let end = false;
      const call = client['Bidi']?.(new Metadata());
      // One message at a time: the next goes when the previous came back (a real conversation).
      const send = (i: number): void => {
        if (i === n) call?.end();
        else call?.write(Buffer.from(`message ${i}`));
      };
      call?.on('data', (b: never) => {
        const text = (b as Buffer).toString();
        if (text.startsWith('{')) {
          end = parse(b as Buffer)['end'] === true;
          return;
        }
        if (text !== `message ${echoed}`) intact = false;
        echoed++;
        send(echoed);
      });
      call?.on('error', (e: never) => resolve({ echoed, intact, end, code: (e as ServiceError).code }));
      call?.on('end', () => resolve({ echoed, intact, end }));
      send(0);
    });
  }
  if (plan.raw) {
    const raw: string[] = [];
    for (const r of plan.raw) {
      const again = r.repeat ? Array.from({ length: r.repeat.times }, () => Buffer.from(r.repeat?.hex ?? '', 'hex')) : [];
      raw.push(await rawExchange(plan.host, plan.port, Buffer.concat([Buffer.from(r.hex, 'hex'), ...again])));
    }
    run.raw = raw;
  }
  if (plan.fail) {
    run.fail = await new Promise((resolve) => {
      client['Fail']?.(Buffer.alloc(1), new Metadata(), (err: ServiceError | null) => resolve({ code: err?.code ?? 0, details: err?.details ?? '' }));
    });
  }
  if (plan.then) {
    const { waitFor, ping, unary: after } = plan.then;
    const md = new Metadata();
    for (const [k, v] of Object.entries(ping ?? {})) md.set(k, v);
    while (!existsSync(waitFor)) {
      await unary(md, 16);
      await new Promise((r) => setTimeout(r, 100));
    }
    run.then = [];
    await calls(after, run.then);
  }
  return run;
}

main().then(
  (run) => {
    process.stdout.write(`${JSON.stringify(run)}\n`);
    process.exit(0);
  },
  (e: unknown) => {
    process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  },
);
