/**
 * `npm run bench:l7-parsers`: what terminating HTTP/1.1 costs a node proxy with each candidate
 * parser, measured in one run so issue 14's L7 path is built on the numbers. One proxy process on
 * loopback takes keep-alive requests (wrk, one thread, 32 connections) and forwards each to nginx
 * (1 KB answers) over pooled keep-alive upstream connections:
 *
 *   node:http  http.createServer, and http.request through a keep-alive Agent
 *   undici     http.createServer, and undici's Pool (llhttp in WebAssembly) upstream
 *   llhttp     net sockets both ways, framed by node's own llhttp binding (HTTPParser) driven
 *              directly: requests and answers parsed, routed and written by this code, no
 *              IncomingMessage or ServerResponse objects
 *   addon      nodemesh's own engine (native/src/http1.cc): heads and bodies framed in C++ on the
 *              JS thread's loop, JS called once per request with the head to route it (the
 *              forwarded head built in JS, as the node proxy builds it), pooled upstreams there
 *   haproxy    the sidecar-style peer: HAProxy in `mode http`, one thread
 *
 * Reported: requests/s at full load, and the proxy's CPU per 1000 requests at full load (from
 * /proc). Numbers, not assertions; loopback only.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer as httpServer, request as httpRequest, Agent } from 'node:http';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect as netConnect, createServer as netServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';

import { cpuSeconds, wrkLocal, writeNginxConf } from './tools.js';

const CANDIDATES = ['node:http', 'undici', 'llhttp', 'addon', 'haproxy'] as const;
type Candidate = (typeof CANDIDATES)[number];
const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 5);
const PORTS = { nginx: 18180, proxy: 18181 };
/** Upstream connections each proxy keeps to nginx. */
const POOL = 64;

const say = (s: string): void => void process.stderr.write(`» ${s}\n`);

/** Hop-by-hop headers (RFC 9110 7.6.1): never forwarded. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade']);

async function proxyNodeHttp(upstreamPort: number): Promise<void> {
  const agent = new Agent({ keepAlive: true, maxSockets: POOL, maxFreeSockets: POOL });
  httpServer({ keepAliveTimeout: 60_000 }, (req, res) => {
    const headers: Record<string, string | string[]> = {};
    for (const [k, v] of Object.entries(req.headers)) if (v !== undefined && !HOP_BY_HOP.has(k)) headers[k] = v;
    const up = httpRequest({ host: '127.0.0.1', port: upstreamPort, method: req.method, path: req.url, headers, agent }, (answer) => {
      const out: Record<string, string | string[]> = {};
      for (const [k, v] of Object.entries(answer.headers)) if (v !== undefined && !HOP_BY_HOP.has(k)) out[k] = v;
      res.writeHead(answer.statusCode ?? 502, out);
      answer.pipe(res);
    });
    up.on('error', () => res.writeHead(502).end());
    req.pipe(up);
  }).listen(PORTS.proxy, '127.0.0.1', () => process.stdout.write('listening\n'));
}

async function proxyUndici(upstreamPort: number): Promise<void> {
  const { Pool } = await import('undici');
  const pool = new Pool(`http://127.0.0.1:${upstreamPort}`, { connections: POOL, pipelining: 1 });
  httpServer({ keepAliveTimeout: 60_000 }, (req, res) => {
    const headers: Record<string, string | string[]> = {};
    for (const [k, v] of Object.entries(req.headers)) if (v !== undefined && !HOP_BY_HOP.has(k) && k !== 'host') headers[k] = v;
    const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined;
    pool
      .request({ method: req.method as 'GET', path: req.url ?? '/', headers, body: hasBody ? req : null })
      .then(({ statusCode, headers: answerHeaders, body }) => {
        const out: Record<string, string | string[]> = {};
        for (const [k, v] of Object.entries(answerHeaders)) if (v !== undefined && !HOP_BY_HOP.has(k)) out[k] = v;
        res.writeHead(statusCode, out);
        body.pipe(res);
      })
      .catch(() => res.writeHead(502).end());
  }).listen(PORTS.proxy, '127.0.0.1', () => process.stdout.write('listening\n'));
}

/** Node's llhttp binding, as lib/_http_common.js drives it (an internal API: fine for a measurement). */
interface RawParser {
  initialize(type: number, resource: object, maxHeaderSize: number, lenient: number): void;
  execute(data: Buffer): number | Error;
  finish(): void;
  [k: number]: unknown;
}
interface ParserClass {
  new (): RawParser;
  readonly REQUEST: number;
  readonly RESPONSE: number;
}
// The callbacks' slots, as node exports them (HTTPParser.kOnHeaders, ...).
const slots = (HTTPParser: ParserClass): { headers: number; headersComplete: number; body: number; messageComplete: number } => {
  const k = HTTPParser as unknown as Record<string, number>;
  return { headers: k['kOnHeaders'] ?? 1, headersComplete: k['kOnHeadersComplete'] ?? 2, body: k['kOnBody'] ?? 3, messageComplete: k['kOnMessageComplete'] ?? 4 };
};

/**
 * One client connection, one upstream connection at a time from a pool: each request is parsed
 * (method, target, headers: what routing needs), written upstream in its own framing, and its
 * answer parsed and written back. No pipelining (wrk does not pipeline).
 */
async function proxyLlhttp(upstreamPort: number): Promise<void> {
  const { HTTPParser, methods } = (process as unknown as { binding(name: string): { HTTPParser: ParserClass; methods: string[] } }).binding('http_parser');
  const { headers: K_ON_HEADERS, headersComplete: K_ON_HEADERS_COMPLETE, body: K_ON_BODY, messageComplete: K_ON_MESSAGE_COMPLETE } = slots(HTTPParser);
  const idle: Array<{ socket: Socket; parser: RawParser; onAnswer: (head: string | null, body: Buffer | null, done: boolean) => void }> = [];
  const upstream = (): (typeof idle)[number] => {
    const reuse = idle.pop();
    if (reuse) return reuse;
    const socket = netConnect(upstreamPort, '127.0.0.1');
    socket.setNoDelay(true);
    const parser = new HTTPParser();
    parser.initialize(HTTPParser.RESPONSE, {}, 16 * 1024, 0);
    const conn = { socket, parser, onAnswer: (_h: string | null, _b: Buffer | null, _d: boolean): void => undefined };
    // Headers come with onHeadersComplete, or before it through onHeaders (flushed by llhttp).
    let flushed: string[] = [];
    parser[K_ON_HEADERS] = (h: string[]): void => void flushed.push(...h);
    parser[K_ON_HEADERS_COMPLETE] = (_maj: number, _min: number, given: string[] | undefined, _method: number, _url: string, status: number, statusMessage: string): void => {
      const headers = given ?? flushed;
      flushed = [];
      let head = `HTTP/1.1 ${status} ${statusMessage}\r\n`;
      for (let i = 0; i < headers.length; i += 2) if (!HOP_BY_HOP.has((headers[i] ?? '').toLowerCase())) head += `${headers[i]}: ${headers[i + 1]}\r\n`;
      conn.onAnswer(head, null, false);
    };
    parser[K_ON_BODY] = (b: Buffer): void => conn.onAnswer(null, b, false);
    parser[K_ON_MESSAGE_COMPLETE] = (): void => conn.onAnswer(null, null, true);
    socket.on('data', (d: Buffer) => parser.execute(d));
    socket.on('error', () => socket.destroy());
    return conn;
  };
  netServer((client) => {
    client.setNoDelay(true);
    const parser = new HTTPParser();
    parser.initialize(HTTPParser.REQUEST, {}, 16 * 1024, 0);
    let flushed: string[] = [];
    let flushedUrl = '';
    parser[K_ON_HEADERS] = (h: string[], u: string): void => {
      flushed.push(...h);
      flushedUrl += u;
    };
    parser[K_ON_HEADERS_COMPLETE] = (_maj: number, _min: number, given: string[] | undefined, method: number, givenUrl: string | undefined): void => {
      const headers = given ?? flushed;
      const url = givenUrl ?? flushedUrl;
      flushed = [];
      flushedUrl = '';
      let head = `${methods[method]} ${url} HTTP/1.1\r\n`;
      for (let i = 0; i < headers.length; i += 2) if (!HOP_BY_HOP.has((headers[i] ?? '').toLowerCase())) head += `${headers[i]}: ${headers[i + 1]}\r\n`;
      const up = upstream();
      // Streamed as it comes: the head as soon as it is parsed, then each body chunk (re-chunked
      // when the answer had no length).
      let chunked = false;
      up.onAnswer = (h, b, done): void => {
        if (h !== null) {
          chunked = !/\r\ncontent-length:/i.test(h);
          client.write(`${h}${chunked ? 'transfer-encoding: chunked\r\n' : ''}\r\n`);
        }
        if (b !== null) client.write(chunked ? Buffer.concat([Buffer.from(`${b.length.toString(16)}\r\n`), b, Buffer.from('\r\n')]) : Buffer.from(b));
        if (!done) return;
        if (chunked) client.write('0\r\n\r\n');
        idle.push(up);
      };
      // The benchmark's requests carry no body (GET): the request goes whole.
      up.socket.write(`${head}\r\n`);
    };
    client.on('data', (d: Buffer) => {
      const r = parser.execute(d);
      if (r instanceof Error) client.destroy();
    });
    client.on('error', () => client.destroy());
  }).listen(PORTS.proxy, '127.0.0.1', () => process.stdout.write('listening\n'));
}

/**
 * The addon's engine, driven as the node proxy drives it: per request, JS gets the head, builds
 * the upstream head (hop-by-hop headers out) and names the pool; a pool with no idle connection
 * gets one dialled by node:net and handed over by fd.
 */
async function proxyAddon(upstreamPort: number): Promise<void> {
  const { http1Engine, dupFd } = await import('../src/datapath/native.js');
  const { socketFd } = await import('../src/proxy/pod-listener.js');
  const dial = (): Promise<number> =>
    new Promise((resolve, reject) => {
      const s = netConnect(upstreamPort, '127.0.0.1', () => {
        s.setNoDelay(true);
        const fd = dupFd(socketFd(s) ?? -1);
        s.destroy();
        resolve(fd);
      });
      s.once('error', reject);
    });
  const engine = http1Engine(
    {
      head: (id, method, target, _minor, headers) => {
        let head = `${method} ${target} HTTP/1.1\r\n`;
        // The body is passed as it is framed: a chunked one keeps its Transfer-Encoding.
        for (let i = 0; i < headers.length; i += 2) {
          const name = (headers[i] ?? '').toLowerCase();
          if (!HOP_BY_HOP.has(name) || name === 'transfer-encoding') head += `${headers[i]}: ${headers[i + 1]}\r\n`;
        }
        head += '\r\n';
        if (engine.forward(id, 'nginx', head, -1, [], '')) return;
        dial().then(
          (fd) => engine.forward(id, 'nginx', head, fd, [], ''),
          () => engine.respond(id, 'HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n', false, 502),
        );
      },
      retry: () => false,
      done: () => undefined,
      delivered: () => undefined,
      dial: () => undefined,
      closed: () => undefined,
    },
    { maxHeadBytes: 16 * 1024, idleMs: 60_000, headTimeoutMs: 60_000, poolIdleMs: 60_000, maxIdlePerPool: POOL },
  );
  let served = 0;
  netServer({ pauseOnConnect: true }, (client) => {
    const fd = socketFd(client);
    if (fd === undefined) return void client.destroy();
    engine.serve(++served, dupFd(fd));
    client.destroy();
  }).listen(PORTS.proxy, '127.0.0.1', () => process.stdout.write('listening\n'));
}

async function haproxyConf(work: string, upstreamPort: number): Promise<string> {
  const path = join(work, 'haproxy.cfg');
  await writeFile(
    path,
    [
      'global',
      '  nbthread 1',
      '  maxconn 4096',
      'defaults',
      '  mode http',
      '  option http-keep-alive',
      '  timeout connect 5s',
      '  timeout client 60s',
      '  timeout server 60s',
      'frontend in',
      `  bind 127.0.0.1:${PORTS.proxy}`,
      '  default_backend app',
      'backend app',
      '  http-reuse always',
      `  server nginx 127.0.0.1:${upstreamPort}`,
      '',
    ].join('\n'),
  );
  return path;
}

const wrk = async (port: number): Promise<{ rps: number; requests: number }> => wrkLocal(port, SECONDS);

async function untilListening(child: ChildProcess, port: number): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const s = netConnect(port, '127.0.0.1');
      s.once('connect', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (up) return;
    if (child.exitCode !== null) throw new Error(`the proxy exited (${child.exitCode})`);
    await sleep(50);
  }
  throw new Error(`nothing listens on ${port}`);
}

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'nodemesh-bench-l7-'));
  const children: ChildProcess[] = [];
  try {
    const nginx = spawn('nginx', ['-c', await writeNginxConf(work, PORTS.nginx)], { stdio: 'inherit' });
    children.push(nginx);
    await untilListening(nginx, PORTS.nginx);
    const direct = await wrk(PORTS.nginx);
    const rows = ['| proxy | keep-alive req/s | proxy CPU µs / request |', '|---|---|---|', `| (direct to nginx) | ${Math.round(direct.rps)} | - |`];
    const self = fileURLToPath(import.meta.url);
    for (const candidate of CANDIDATES) {
      const proxy =
        candidate === 'haproxy'
          ? spawn('haproxy', ['-f', await haproxyConf(work, PORTS.nginx)], { stdio: ['ignore', 'ignore', 'inherit'] })
          : spawn(process.execPath, [self, 'proxy', candidate, String(PORTS.nginx)], { stdio: ['ignore', 'ignore', 'inherit'] });
      children.push(proxy);
      try {
        await untilListening(proxy, PORTS.proxy);
        await wrk(PORTS.proxy); // warm-up: JIT, pools
        const pid = proxy.pid ?? 0;
        const cpu0 = await cpuSeconds([pid]);
        const run = await wrk(PORTS.proxy);
        const cpu1 = await cpuSeconds([pid]);
        const usPerRequest = ((cpu1 - cpu0) / run.requests) * 1e6;
        rows.push(`| ${candidate} | ${Math.round(run.rps)} | ${usPerRequest.toFixed(1)} |`);
        say(`${candidate}: ${Math.round(run.rps)} req/s, ${usPerRequest.toFixed(1)} µs CPU per request`);
      } finally {
        proxy.kill('SIGTERM');
        await new Promise((resolve) => (proxy.exitCode !== null || proxy.signalCode !== null ? resolve(undefined) : proxy.once('exit', resolve)));
      }
    }
    process.stdout.write(`\nHTTP/1.1 keep-alive through one proxy process, ${SECONDS} s per run, 1 KB answers\n\n${rows.join('\n')}\n`);
  } finally {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
    await rm(work, { recursive: true, force: true });
  }
}

const [role, candidate, port] = process.argv.slice(2);
if (role === 'proxy') {
  const run: Record<Exclude<Candidate, 'haproxy'>, (p: number) => Promise<void>> = { 'node:http': proxyNodeHttp, undici: proxyUndici, llhttp: proxyLlhttp, addon: proxyAddon };
  await run[candidate as Exclude<Candidate, 'haproxy'>](Number(port));
} else {
  await main();
}
