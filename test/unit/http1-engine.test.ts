/**
 * The addon's HTTP/1.1 engine (native/src/http1.cc) on loopback sockets, between a real node:http
 * client and server: keep-alive and pooled upstreams, bodies both framings with trailers, answers
 * without bodies, interim answers, answers until close, the proxy's own answers, header edits,
 * pipelining, handing a connection back, and malformed requests that never reach the server.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { Agent, createServer as httpServer, request, type IncomingMessage, type Server as HttpServer } from 'node:http';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { test, type TestContext } from 'node:test';

import { closeFd, http1Engine, type EngineGate, type EngineRoutes, type Http1Engine } from '../../src/datapath/native.js';
import { dialFd, engineFront, listening, until } from '../support/loopback.js';

interface Done {
  readonly status: number;
  readonly flag: string;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly detail: string;
}

interface Rig {
  readonly heads: Map<number, string>;
  readonly port: number;
  readonly upstreamPort: number;
  readonly engine: Http1Engine;
  readonly done: Done[];
  /** Requests the engine sent on without a head() event: [status, flag, bytesIn]. */
  readonly delivered: Array<[number, string, number]>;
  /** The same for routed ones, with where they went. */
  readonly routed: Array<{ readonly status: number; readonly flag: string; readonly ms: number; readonly routes: EngineRoutes | undefined; readonly target: number | undefined; readonly endpoint: number | undefined }>;
  readonly closed: string[];
  /** Requests and connections the upstream server saw. */
  readonly upstream: { requests: Array<{ method: string; url: string; headers: IncomingMessage['headers'] }>; connections: number };
  /** What to do with a request's head (default: forward to the upstream, pool "up"). */
  onHead: (id: number, method: string, target: string, headers: string[]) => void;
  /** The engine's retry event (default: the same head again, at once). */
  onRetry: (id: number, status: number) => boolean;
  /** Called with a request's id as it ends, before its done() is recorded. */
  onDone?: (id: number) => void;
  /** The engine's dial event for a routed request (default: dialFailed). */
  onDial: (id: number, routes: EngineRoutes, target: number, endpoint: number) => void;
}



/**
 * The engine between a front listener and `app` (a node:http request handler, or a raw server
 * for answers node:http would not write).
 */
async function rig(t: TestContext, app: (req: IncomingMessage, res: import('node:http').ServerResponse) => void, raw?: (s: Socket) => void, options: { idleMs?: number; headTimeoutMs?: number } = {}): Promise<Rig> {
  const upstream: Rig['upstream'] = { requests: [], connections: 0 };
  const server: Server | HttpServer = raw
    ? createServer(raw)
    : httpServer((req, res) => {
        upstream.requests.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
        app(req, res);
      });
  server.on('connection', () => upstream.connections++);
  const upPort = await listening(server);
  const done: Done[] = [];
  const delivered: Rig['delivered'] = [];
  const routed: Rig['routed'] = [];
  const closed: string[] = [];
  /** The head each connection's request went with (the engine's retry sends it again). */
  const heads = new Map<number, string>();
  const r: Rig = {
    heads,
    port: 0,
    upstreamPort: upPort,
    engine: undefined as unknown as Http1Engine,
    done,
    delivered,
    routed,
    closed,
    upstream,
    onDial: (id) => r.engine.dialFailed(id),
    onRetry: (id) => {
      void forwardWith(r, id, heads.get(id) ?? '', [], '');
      return true;
    },
    onHead: (id, method, target, headers) => {
      let head = `${method} ${target} HTTP/1.1\r\n`;
      for (let i = 0; i < headers.length; i += 2) if ((headers[i] ?? '').toLowerCase() !== 'connection') head += `${headers[i]}: ${headers[i + 1]}\r\n`;
      head += '\r\n';
      void forwardWith(r, id, head, [], '');
    },
  };
  const engine = http1Engine(
    {
      head: (id, method, target, _minor, headers) => r.onHead(id, method, target, headers),
      retry: (id, status) => r.onRetry(id, status),
      done: (id, status, flag, bytesIn, bytesOut, detail) => {
        r.onDone?.(id);
        done.push({ status, flag, bytesIn, bytesOut, detail });
      },
      delivered: (_id, status, flag, bytesIn, _bytesOut, ms, routes, target, endpoint) => {
        if (routes) routed.push({ status, flag, ms, routes, target, endpoint });
        else delivered.push([status, flag, bytesIn]);
      },
      dial: (id, routes, target, endpoint) => r.onDial(id, routes, target, endpoint),
      closed: (_id, reason) => void closed.push(reason),
    },
    { maxHeadBytes: 16 * 1024, idleMs: options.idleMs ?? 60_000, headTimeoutMs: options.headTimeoutMs ?? 60_000, poolIdleMs: 60_000, maxIdlePerPool: 8 },
  );
  (r as { engine: Http1Engine }).engine = engine;
  const front = engineFront((id, fd) => engine.serve(id, fd));
  (r as { port: number }).port = await listening(front);
  t.after(() => {
    engine.destroy();
    front.close();
    server.close();
    if ('closeAllConnections' in server) server.closeAllConnections();
  });
  return r;
}

/** Raw bytes to the front, and everything that comes back until the connection closes (or 2 s). */
async function rawExchange(port: number, bytes: string): Promise<string> {
  const s = connect(port, '127.0.0.1');
  const chunks: Buffer[] = [];
  s.on('data', (d: Buffer) => chunks.push(d));
  s.on('error', () => undefined);
  s.write(bytes);
  // A reset is an end too (events.once would reject on the error before the close).
  await Promise.race([new Promise((resolve) => s.once('close', resolve)), new Promise((resolve) => setTimeout(resolve, 2000))]);
  s.destroy();
  return Buffer.concat(chunks).toString('latin1');
}

/** One request through the front on `agent`; the answer's status, headers, body and trailers. */
function fetchOn(agent: Agent, port: number, path: string, options: { method?: string; body?: Buffer; chunked?: boolean; headers?: Record<string, string> } = {}): Promise<{ status: number; headers: IncomingMessage['headers']; body: Buffer; trailers: IncomingMessage['trailers'] }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...options.headers };
    if (options.body && !options.chunked) headers['content-length'] = String(options.body.length);
    const req = request({ host: '127.0.0.1', port, path, method: options.method ?? 'GET', agent, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (d: Buffer) => chunks.push(d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), trailers: res.trailers }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (options.body) {
      if (options.chunked) {
        // Several chunks, to cross reads.
        for (let i = 0; i < options.body.length; i += 100_000) req.write(options.body.subarray(i, i + 100_000));
      } else req.write(options.body);
    }
    req.end();
  });
}

/** Echoes the body, with its hash and size as trailers (chunked answer). */
const echo = (req: IncomingMessage, res: import('node:http').ServerResponse): void => {
  const hash = createHash('sha256');
  let bytes = 0;
  res.writeHead(200, { trailer: 'x-sha256, x-bytes' });
  req.on('data', (d: Buffer) => {
    hash.update(d);
    bytes += d.length;
    res.write(d);
  });
  req.on('end', () => {
    res.addTrailers({ 'x-sha256': hash.digest('hex'), 'x-bytes': String(bytes) });
    res.end();
  });
};

test('keep-alive: many requests on one client connection over one pooled upstream connection; bodies both framings and trailers intact; counts reported', async (t) => {
  const r = await rig(t, (req, res) => (req.url?.startsWith('/echo') ? echo(req, res) : res.end(`hello ${req.url ?? ''}`)));
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  for (let i = 0; i < 20; i++) {
    const a = await fetchOn(agent, r.port, `/n/${i}`);
    assert.equal(a.status, 200);
    assert.equal(a.body.toString(), `hello /n/${i}`);
  }
  assert.equal(r.upstream.connections, 1, 'one upstream connection, reused from the pool');
  const body = Buffer.alloc(3 << 20);
  for (let i = 0; i < body.length; i++) body[i] = (i * 7) & 0xff;
  const sha = createHash('sha256').update(body).digest('hex');
  for (const chunked of [false, true]) {
    const a = await fetchOn(agent, r.port, '/echo', { method: 'POST', body, chunked });
    assert.equal(a.status, 200);
    assert.equal(createHash('sha256').update(a.body).digest('hex'), sha, `chunked=${chunked}: the body came back intact`);
    assert.deepEqual([a.trailers['x-sha256'], a.trailers['x-bytes']], [sha, String(body.length)], 'trailers passed on');
  }
  assert.equal(r.done.length, 22);
  assert.ok(r.done.every((d) => d.status === 200 && d.flag === '-'));
  assert.deepEqual([r.done[20]?.bytesIn, r.done[20]?.bytesOut, r.done[21]?.bytesIn], [body.length, body.length, body.length], 'body bytes counted both ways');
  assert.equal(r.upstream.connections, 1, 'still one upstream connection');
});

test('malformed requests are refused with 400 or 431 and the reason, and never reach the server', async (t) => {
  const r = await rig(t, (_req, res) => res.end('should not be here'));
  const cases: Array<[string, string, string]> = [
    ['POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n', '400', 'HPE_UNEXPECTED_CONTENT_LENGTH'],
    ['POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n', '400', 'HPE_INVALID_TRANSFER_ENCODING'],
    ['POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n', '400', 'HPE_INVALID_TRANSFER_ENCODING'],
    ['GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab', '400', 'HPE_UNEXPECTED_CONTENT_LENGTH'],
    ['GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n', '400', 'HPE_INVALID_CONTENT_LENGTH'],
    ['GET / HTTP/1.1\r\nBad Header: x\r\n\r\n', '400', 'HPE_INVALID_HEADER_TOKEN'],
    ['GET / HTTP/1.1\r\nHost : x\r\n\r\n', '400', 'HPE_INVALID_HEADER_TOKEN'],
    ['GET / HTTP/1.1\r\nX-A: a\r\n folded\r\n\r\n', '400', 'HPE_INVALID_HEADER_TOKEN'],
    ['GET / HTTP/1.1\r\nX-A: a\x01b\r\n\r\n', '400', 'HPE_INVALID_HEADER_TOKEN'],
    ['GET / HTTP/1.1\nHost: x\n\n', '400', 'HPE_INVALID_REQUEST_LINE'],
    ['GET /a b HTTP/1.1\r\n\r\n', '400', 'HPE_INVALID_VERSION'],
    ['GET / HTTP/2.0\r\n\r\n', '400', 'HPE_INVALID_VERSION'],
    ['G(T / HTTP/1.1\r\n\r\n', '400', 'HPE_INVALID_METHOD'],
    ['POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n', '400', 'HPE_INVALID_CHUNK_SIZE'],
    [`GET / HTTP/1.1\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, '431', 'HPE_HEADER_OVERFLOW'],
    [`GET /${'a'.repeat(20_000)} HTTP/1.1\r\n\r\n`, '431', 'HPE_HEADER_OVERFLOW'],
  ];
  for (const [bytes, status] of cases) {
    const got = await rawExchange(r.port, bytes);
    assert.match(got, new RegExp(`^HTTP/1\\.1 ${status} `), `${JSON.stringify(bytes.slice(0, 60))}: ${got.slice(0, 80)}`);
    assert.match(got, /\r\nconnection: close\r\n/i);
  }
  // (The bad chunk is found once its request was routed: the head goes upstream only with the
  // body's first bytes, which refused it here.)
  assert.deepEqual(
    r.done.map((d) => [String(d.status), d.detail.split(':')[0]]),
    cases.map(([, s, code]) => [s, code]),
  );
  assert.ok(r.done.every((d) => d.flag === 'DPE'));
  assert.equal(r.upstream.requests.length, 0, 'nothing reached the server');
});

test('answers: HEAD and 204 without bodies, 100-continue passed on, an answer until close, pipelined requests in order, header edits', async (t) => {
  const r = await rig(t, (req, res) => {
    if (req.url === '/empty') return void res.writeHead(204).end();
    if (req.url === '/close') {
      // No length and no chunking: the body ends with the connection.
      res.useChunkedEncodingByDefault = false;
      res.shouldKeepAlive = false;
      res.writeHead(200, { 'x-drop': 'me', 'x-keep': 'yes' });
      return void res.end('until close');
    }
    res.writeHead(200, { 'content-length': 5, 'x-drop': 'me' });
    res.end(req.method === 'HEAD' ? undefined : 'hello');
  });
  r.onHead = (id, method, target, headers) => {
    let head = `${method} ${target} HTTP/1.1\r\n`;
    for (let i = 0; i < headers.length; i += 2) head += `${headers[i]}: ${headers[i + 1]}\r\n`;
    head += '\r\n';
    void forwardWith(r, id, head, ['x-drop'], 'x-added: 1\r\n');
  };
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const head = await fetchOn(agent, r.port, '/h', { method: 'HEAD' });
  assert.deepEqual([head.status, head.headers['content-length'], head.body.length], [200, '5', 0], 'HEAD: the length, no body');
  assert.equal(head.headers['x-drop'], undefined, 'removed from the answer');
  assert.equal(head.headers['x-added'], '1', 'added to the answer');
  const empty = await fetchOn(agent, r.port, '/empty');
  assert.equal(empty.status, 204);
  const cont = await fetchOn(agent, r.port, '/c', { method: 'POST', body: Buffer.from('abc'), headers: { expect: '100-continue' } });
  assert.deepEqual([cont.status, cont.body.toString()], [200, 'hello']);
  const untilClose = await rawExchange(r.port, 'GET /close HTTP/1.1\r\nHost: x\r\n\r\n');
  assert.match(untilClose, /^HTTP\/1\.1 200 OK\r\n/);
  assert.match(untilClose, /\r\nconnection: close\r\n/i, 'the client is told the connection ends the body');
  assert.match(untilClose, /\r\n\r\nuntil close$/);
  const pipelined = await rawExchange(r.port, 'GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
  assert.equal(pipelined.match(/HTTP\/1\.1 200 OK/g)?.length, 3, 'three answers, in order');
  assert.deepEqual(r.upstream.requests.slice(-3).map((q) => q.url), ['/1', '/2', '/3']);
});

/** To the rig's upstream, with answer edits. */
async function forwardWith(r: Rig, id: number, head: string, remove: string[], add: string, gate?: EngineGate): Promise<void> {
  r.heads.set(id, head);
  if (r.engine.forward(id, 'up', head, -1, remove, add, 0, undefined, false, gate)) return;
  r.engine.forward(id, 'up', head, await dialFd(r.upstreamPort), remove, add, 0, undefined, false, gate);
}

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** Forwards as the destination's side does (hop-by-hop fields out, chunked kept), with `gate`; records what it was asked. */
function asking(r: Rig, gate: EngineGate, asked: string[]): void {
  r.onHead = (id, method, target, headers) => {
    asked.push(`${method} ${target}`);
    let head = `${method} ${target} HTTP/1.1\r\n`;
    let chunked = false;
    for (let i = 0; i < headers.length; i += 2) {
      const name = (headers[i] ?? '').toLowerCase();
      if (name === 'transfer-encoding') chunked = true;
      if (!['connection', 'keep-alive', 'transfer-encoding', 'x-foo'].includes(name)) head += `${headers[i]}: ${headers[i + 1]}\r\n`;
    }
    head += `${chunked ? 'transfer-encoding: chunked\r\n' : ''}\r\n`;
    void forwardWith(r, id, head, [], '', gate);
  };
  r.onRetry = (id) => {
    void forwardWith(r, id, r.heads.get(id) ?? '', [], '', gate);
    return true;
  };
}

test('with a gate, a connection\'s later requests it passes go on an idle upstream connection without a head() event (hop-by-hop fields out, chunked kept, an id added when missing), reported in delivered(); others are asked; undirect() ends it', async (t) => {
  const r = await rig(t, (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (d: Buffer) => chunks.push(d));
    req.on('end', () => res.end(JSON.stringify({ url: req.url, rid: req.headers['x-request-id'] ?? '', conn: req.headers.connection ?? '', te: req.headers['transfer-encoding'] ?? '', x: req.headers['x-in'] ?? '', body: Buffer.concat(chunks).length })));
  });
  const asked: string[] = [];
  asking(r, { id: 1, deny: [{ hosts: [], notHosts: [], methods: ['DELETE'], notMethods: [], paths: [], notPaths: [] }], allow: undefined }, asked);
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const seen = async (path: string, options: Parameters<typeof fetchOn>[3] = {}): Promise<Record<string, string | number>> => {
    const a = await fetchOn(agent, r.port, path, options);
    assert.equal(a.status, 200, path);
    return JSON.parse(a.body.toString()) as Record<string, string | number>;
  };
  const first = await seen('/first');
  assert.match(String(first['rid']), UUID4, 'a request without an id gets one from the engine (JS read it too)');
  assert.deepEqual(asked, ['GET /first']);
  const plain = await seen('/a?x=1', { headers: { 'x-in': '1' } });
  assert.deepEqual([plain['url'], plain['x'], plain['conn']], ['/a?x=1', '1', ''], 'its own fields, no Connection');
  assert.match(String(plain['rid']), UUID4);
  assert.notEqual(plain['rid'], first['rid']);
  assert.equal((await seen('/b', { method: 'POST', body: Buffer.alloc(1000, 1) }))['body'], 1000);
  const chunked = await seen('/c', { method: 'POST', body: Buffer.alloc(3000, 2), chunked: true });
  assert.deepEqual([chunked['body'], chunked['te']], [3000, 'chunked'], 'chunked framing kept');
  assert.equal((await seen('/d', { headers: { 'x-request-id': 'mine' } }))['rid'], 'mine', "the client's id kept");
  assert.deepEqual(asked, ['GET /first'], 'none of those asked');
  await seen('/e', { method: 'DELETE' });
  await seen('/f/../g');
  await seen('/%41');
  assert.deepEqual(asked.slice(1), ['DELETE /e', 'GET /f/../g', 'GET /%41'], 'what the gate does not pass, and targets admission would change, are asked');
  r.engine.undirect();
  await seen('/h');
  assert.equal(asked.at(-1), 'GET /h', 'asked again after undirect()');
  assert.deepEqual(r.delivered, [[200, '-', 0], [200, '-', 1000], [200, '-', 3000], [200, '-', 0]]);
  assert.equal(r.upstream.connections, 1, 'one upstream connection throughout');
  // A Connection field that names another field: asked (the named field must go too).
  const raw = await rawExchange(r.port, 'GET /r1 HTTP/1.1\r\nHost: x\r\n\r\nGET /r2 HTTP/1.1\r\nHost: x\r\nConnection: x-foo, close\r\nX-Foo: 1\r\n\r\n');
  assert.equal(raw.match(/HTTP\/1\.1 200 OK/g)?.length, 2);
  assert.deepEqual(asked.slice(-2), ['GET /r1', 'GET /r2']);
});

test('with a gate: an unread request that meets the keep-alive race is asked (and goes on a new connection); one the client resets is reported DC', async (t) => {
  let served = 0;
  let slow = false;
  const r = await rig(t, () => undefined, (s) => {
    s.on('error', () => undefined);
    let requests = 0;
    s.on('data', (d: Buffer) => {
      // /slow is never answered. Otherwise each connection answers its first request and drops the second unanswered.
      if (d.toString('latin1').startsWith('GET /slow')) return void (slow = true);
      if (++requests === 1) s.write(`HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n${String(++served).padStart(2, '0')}`);
      else s.destroy();
    });
  });
  const asked: string[] = [];
  asking(r, { id: 1, deny: [], allow: undefined }, asked);
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  assert.equal((await fetchOn(agent, r.port, '/1')).body.toString(), '01');
  assert.equal((await fetchOn(agent, r.port, '/2')).body.toString(), '02', 'sent again on a new connection');
  assert.deepEqual(asked, ['GET /1', 'GET /2'], 'the second went unread, met the race, and was asked');
  assert.equal(r.upstream.connections, 2);
  assert.deepEqual(r.delivered, []);
  // The third goes unread on the idle connection; the client leaves before its answer.
  const s = connect(r.port, '127.0.0.1');
  s.on('error', () => undefined);
  await once(s, 'connect');
  s.write('GET /3 HTTP/1.1\r\nHost: x\r\n\r\n');
  await once(s, 'data');
  s.write('GET /slow HTTP/1.1\r\nHost: x\r\n\r\n');
  await until('the unread request at the server', () => slow);
  assert.equal(asked.length, 3, '/slow went unread');
  // Reset: a client that only closed its side would still wait for the answer.
  s.resetAndDestroy();
  await until('its report', () => r.delivered.length === 1);
  assert.deepEqual(r.delivered, [[0, 'DC', 0]]);
});

test('with routes, a connection\'s later requests are routed in the engine (first matching rule, weighted split and round robin per request over ONE keep-alive connection, reported with target and endpoint); a pool without an idle connection gets one dialled for the request; what it cannot act on is asked; the routes end with their time and at undirect()', async (t) => {
  /** An answer naming its server, and the request as that server saw it. */
  const tagged = (name: string) => (req: IncomingMessage, res: import('node:http').ServerResponse): void => {
    req.resume();
    const wait = req.url === '/api/slow' ? 300 : 0;
    setTimeout(() => res.end(JSON.stringify({ from: name, url: req.url, rid: req.headers['x-request-id'] ?? '', conn: req.headers.connection ?? '', foo: req.headers['x-foo'] ?? '' })), wait);
  };
  const r = await rig(t, tagged('e0'));
  const ports = new Map<string, number>([['up', r.upstreamPort]]);
  const connections = new Map<string, number>();
  for (const name of ['e1', 'e2', 'few']) {
    const server = httpServer(tagged(name));
    server.on('connection', () => connections.set(name, (connections.get(name) ?? 0) + 1));
    ports.set(name, await listening(server));
    t.after(() => {
      server.close();
      server.closeAllConnections();
    });
  }
  // A routed request whose pool has no idle connection: one is dialled for it ("no-session" fails; "hold" is kept back).
  const dials: string[] = [];
  const held: Array<() => void> = [];
  r.onDial = (id, routes, target, endpoint) => {
    const pool = routes.targets[target]?.pools[endpoint] ?? '';
    dials.push(pool);
    const port = ports.get(pool === 'hold' ? 'e1' : pool);
    if (port === undefined) return r.engine.dialFailed(id);
    const attach = (): void => void dialFd(port).then((fd) => held.push(() => assert.equal(r.engine.attach(id, fd), false, 'nothing waits for it: closed')));
    if (pool === 'hold') return attach();
    void dialFd(port).then((fd) => assert.equal(r.engine.attach(id, fd), true));
  };
  const rules = (last: string): EngineRoutes['rules'] => [
    { match: { exact: true, path: '/js', headers: [] } },
    { match: { exact: false, path: '/api', method: 'POST', headers: [['x-version', 'v2']] }, backends: [[1, 1]] },
    { match: { exact: false, path: '/cold', headers: [] }, backends: [[2, 1]] },
    { match: { exact: false, path: '/few', headers: [] }, backends: [[3, 1]] },
    { match: { exact: false, path: '/hold', headers: [] }, backends: [[4, 1]] },
    { match: { exact: false, path: last, headers: [] }, backends: [[0, 9], [1, 1]] },
  ];
  const targets: EngineRoutes['targets'] = [
    { key: 'shop/v1:80', pools: ['up', 'e1'], random: false },
    { key: 'shop/v2:80', pools: ['e2'], random: false },
    { key: 'shop/cold:80', pools: ['no-session'], random: false },
    { key: 'shop/few:80', pools: ['few'], random: false, maxRequests: 2 },
    { key: 'shop/hold:80', pools: ['hold'], random: false },
  ];
  const routes: EngineRoutes = { id: 1, ttlMs: -1, rules: rules('/d'), targets };
  let next: EngineRoutes = routes;
  const asked: string[] = [];
  const ask = r.onHead;
  r.onHead = (id, method, target, headers) => {
    asked.push(`${method} ${target}`);
    ask(id, method, target, headers);
    r.engine.route(id, next);
  };
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const seen = async (path: string, options: Parameters<typeof fetchOn>[3] = {}): Promise<Record<string, string>> => {
    const a = await fetchOn(agent, r.port, path, options);
    assert.equal(a.status, 200, path);
    return JSON.parse(a.body.toString()) as Record<string, string>;
  };
  assert.equal((await seen('/first')).from, 'e0');
  assert.deepEqual(asked, ['GET /first']);

  const from = new Map<string, number>();
  for (let i = 0; i < 100; i++) {
    const a = await seen(`/d/${i}?q=1`, { headers: { connection: 'keep-alive', 'x-foo': 'kept' } });
    assert.equal(a.url, `/d/${i}?q=1`);
    assert.match(a.rid ?? '', UUID4, 'an id added');
    assert.deepEqual([a.conn, a.foo], ['', 'kept'], 'hop-by-hop fields out, the others as they came');
    from.set(a.from ?? '', (from.get(a.from ?? '') ?? 0) + 1);
  }
  assert.deepEqual(asked, ['GET /first'], 'no head() event for the routed requests');
  assert.deepEqual(Object.fromEntries([...from].sort()), { e0: 45, e1: 45, e2: 10 }, '90/10 by weight over one client connection, then round robin over the two endpoints');
  assert.deepEqual(dials, ['e1', 'e2'], 'a connection dialled for the first request to each pool with none idle');
  await until('every routed request delivered', () => r.routed.length === 100);
  const reported = new Map<string, number>();
  for (const d of r.routed) {
    assert.equal(d.routes, routes, 'reported with the routes object JS gave');
    assert.ok(d.status === 200 && d.flag === '-' && d.ms > 0);
    const pool = targets[d.target ?? -1]?.pools[d.endpoint ?? -1] ?? '?';
    reported.set(pool, (reported.get(pool) ?? 0) + 1);
  }
  assert.deepEqual(Object.fromEntries([...reported].sort()), { e1: 45, e2: 10, up: 45 }, 'each report names where it went');

  // A method and an exact header are read. A repeated header a rule reads, a rule the engine does
  // not act on, no matching rule, a Connection field naming another, an absolute-form target and a
  // pool whose dial failed are asked.
  assert.equal((await seen('/api/x', { method: 'POST', headers: { 'x-version': 'v2' } })).from, 'e2');
  const cases: Array<[string, string]> = [
    ['GET /api/x', 'GET /api/x HTTP/1.1\r\nHost: x\r\nX-Version: v2\r\n\r\n'],
    ['POST /api/x', 'POST /api/x HTTP/1.1\r\nHost: x\r\nX-Version: v2\r\nx-version: v2\r\ncontent-length: 0\r\n\r\n'],
    ['GET /js', 'GET /js HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['GET /zzz', 'GET /zzz HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['GET /d/c', 'GET /d/c HTTP/1.1\r\nHost: x\r\nConnection: x-foo\r\nX-Foo: 1\r\n\r\n'],
    ['GET http://x/d/a', 'GET http://x/d/a HTTP/1.1\r\nHost: x\r\n\r\n'],
    ['GET /cold', 'GET /cold HTTP/1.1\r\nHost: x\r\n\r\n'],
  ];
  const before = asked.length;
  // The first request of each connection is asked (it gets the routes); the case follows on it.
  const raw = await rawExchange(r.port, cases.map(([, bytes]) => `GET /first HTTP/1.1\r\nHost: x\r\n\r\n${bytes}`).join('').replace(/\r\n\r\n$/, '\r\nConnection: close\r\n\r\n'));
  assert.equal(raw.match(/HTTP\/1\.1 200 OK/g)?.length, cases.length * 2);
  assert.deepEqual(asked.slice(before).filter((a) => a !== 'GET /first'), cases.map(([what]) => what));
  assert.ok(dials.includes('no-session'));

  // Requests in flight per backend Service, for the retry budget.
  const slow = seen('/api/slow', { method: 'POST', headers: { 'x-version': 'v2' } });
  await until('the slow request in flight', () => r.engine.inFlight('shop/v2:80') === 1);
  assert.equal((await slow).from, 'e2');
  await until('and out of flight', () => r.engine.inFlight('shop/v2:80') === 0);

  // A target's maxRequests: its connections close after that many answers.
  for (let i = 0; i < 4; i++) assert.equal((await seen('/few')).from, 'few');
  assert.equal(connections.get('few'), 2);

  // A connection handed back (release) right after a routed request: that request is reported first.
  let reportedAtRelease: number[] = [];
  const asking = r.onHead;
  r.onHead = (id, method, target, headers) => {
    if (target !== '/release') return asking(id, method, target, headers);
    const before = r.routed.length;
    const back = r.engine.release(id);
    reportedAtRelease = [before, r.routed.length];
    if (back) closeFd(back.fd);
  };
  const routedBefore = r.routed.length;
  await rawExchange(r.port, 'GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /d/9 HTTP/1.1\r\nHost: x\r\n\r\nGET /release HTTP/1.1\r\nHost: x\r\n\r\n');
  assert.deepEqual(reportedAtRelease, [routedBefore, routedBefore + 1], 'the routed request reported as its connection was released, not after');
  r.onHead = asking;

  // The client leaves while its routed request waits for a connection: reported DC, the late connection closed.
  const leaving = connect(r.port, '127.0.0.1');
  leaving.on('error', () => undefined);
  leaving.write('GET /first HTTP/1.1\r\nHost: x\r\n\r\n');
  await once(leaving, 'data');
  const reports = r.routed.length;
  leaving.write('GET /hold HTTP/1.1\r\nHost: x\r\n\r\n');
  await until('its dial', () => held.length === 1);
  leaving.resetAndDestroy();
  await until('its report', () => r.routed.length === reports + 1);
  assert.deepEqual([r.routed.at(-1)?.status, r.routed.at(-1)?.flag, r.routed.at(-1)?.target], [0, 'DC', 4]);
  held[0]?.();
  assert.equal(r.engine.inFlight('shop/hold:80'), 0);

  // Routes with a time limit are followed until it passes.
  next = { id: 2, ttlMs: 150, rules: rules('/'), targets };
  await seen('/js');
  const held2 = asked.length;
  await seen('/zzz');
  assert.equal(asked.length, held2, 'the new routes (a "/" rule) route it');
  await new Promise((resolve) => setTimeout(resolve, 200));
  await seen('/zzz');
  assert.equal(asked.at(-1), 'GET /zzz', 'asked once their time passed');

  next = routes;
  await seen('/js');
  const kept = asked.length;
  await seen('/d/1');
  assert.equal(asked.length, kept);
  r.engine.undirect();
  await seen('/d/2');
  assert.equal(asked.at(-1), 'GET /d/2', 'asked again after undirect()');
});

test('the upstream fails: closed before its answer (503, UC), cut within its body (the client is reset, UPE)', async (t) => {
  let n = 0;
  const r = await rig(t, () => undefined, (s) => {
    s.on('error', () => undefined);
    s.once('data', () => {
      if (n++ === 0) s.destroy();
      else s.end('HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part');
    });
  });
  const before = await rawExchange(r.port, 'GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
  assert.match(before, /^HTTP\/1\.1 503 Service Unavailable\r\n/);
  const cut = await rawExchange(r.port, 'GET /b HTTP/1.1\r\nHost: x\r\n\r\n');
  assert.match(cut, /^HTTP\/1\.1 200 OK\r\n[\s\S]*only part$/, 'what came was passed on, then the connection ended');
  assert.deepEqual(r.done.map((d) => [d.status, d.flag]), [[503, 'UC'], [200, 'UPE']]);
});

test('release: a connection handed back at a request has its fd and the bytes read from it, that request first', async (t) => {
  const r = await rig(t, (_req, res) => res.end('x'));
  let back: { fd: number; buffered: Buffer } | undefined;
  r.onHead = (id) => {
    back = r.engine.release(id);
  };
  const s = connect(r.port, '127.0.0.1');
  s.write('GET /upgrade-me HTTP/1.1\r\nHost: x\r\n\r\nmore bytes');
  for (let i = 0; i < 100 && !back; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  assert.ok(back, 'released');
  assert.match(back.buffered.toString(), /^GET \/upgrade-me HTTP\/1\.1\r\n[\s\S]*\r\n\r\n(more bytes)?$/);
  // The fd is the client's connection: what is written to it reaches the client.
  const answered = once(s, 'data') as Promise<[Buffer]>;
  const { Socket: NetSocket } = await import('node:net');
  const adopted = new NetSocket({ fd: back.fd, readable: true, writable: true });
  adopted.end('HTTP/1.1 204 No Content\r\n\r\n');
  assert.match((await answered)[0].toString(), /^HTTP\/1\.1 204/);
  s.destroy();
  assert.equal(r.engine.stats().clients, 0, 'the engine keeps nothing of it');
});

test('the keep-alive race: a request on an idle pooled connection its server closes unanswered goes again once, on a new connection', async (t) => {
  let served = 0;
  const r = await rig(t, () => undefined, (s) => {
    s.on('error', () => undefined);
    let requests = 0;
    s.on('data', () => {
      // Each connection answers its first request and drops the second unanswered.
      if (++requests === 1) s.write(`HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n${String(++served).padStart(2, '0')}`);
      else s.destroy();
    });
  });
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  assert.equal((await fetchOn(agent, r.port, '/1')).body.toString(), '01');
  assert.equal((await fetchOn(agent, r.port, '/2')).body.toString(), '02', 'sent again on a new connection');
  assert.equal(r.upstream.connections, 2);
  assert.deepEqual(r.done.map((d) => [d.status, d.flag]), [[200, '-'], [200, '-']]);
});

test('timeouts: a head that does not come whole is answered 408; an exchange with nothing passing is closed', async (t) => {
  const r = await rig(t, () => undefined, (s) => s.on('error', () => undefined), { idleMs: 2500, headTimeoutMs: 1000 });
  // Slowloris: a head begun and never ended.
  const slow = connect(r.port, '127.0.0.1');
  const answer: Buffer[] = [];
  slow.on('data', (d: Buffer) => answer.push(d));
  slow.write('GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ');
  await new Promise((resolve) => slow.once('close', resolve));
  assert.match(Buffer.concat(answer).toString(), /^HTTP\/1\.1 408 Request Timeout\r\n/);
  assert.deepEqual(r.done.map((d) => [d.status, d.flag, d.detail.split(':')[0]]), [[408, 'DPE', 'HPE_HEADERS_TIMEOUT']]);
  // An upstream that takes the request and never answers: nothing passes, the client is closed.
  const stalled = connect(r.port, '127.0.0.1');
  stalled.on('error', () => undefined);
  stalled.write('GET /never HTTP/1.1\r\nHost: x\r\n\r\n');
  await new Promise((resolve) => stalled.once('close', resolve));
  assert.deepEqual(r.closed.at(-1), 'idle');
  assert.equal(r.engine.stats().clients, 0);
});

test('expire: a request whose time ran out is answered by the proxy when nothing of its answer went out (the connection goes on), and reported as cut otherwise', async (t) => {
  const r = await rig(t, (req, res) => {
    if (req.url === '/slow') return void setTimeout(() => res.end('late'), 1500);
    res.writeHead(200, { 'content-length': 10 });
    res.write('part');
    setTimeout(() => res.end('rest!!'), 1500);
  });
  const ids: number[] = [];
  const forward = r.onHead;
  r.onHead = (id, method, target, headers) => {
    ids.push(id);
    forward(id, method, target, headers);
  };
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const slow = fetchOn(agent, r.port, '/slow');
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(r.engine.expire(ids[0] ?? 0, Buffer.from('HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\n\r\n'), 504), 0, 'answered by the proxy');
  assert.equal((await slow).status, 504);
  assert.deepEqual(r.done.map((d) => [d.status, d.flag]), [[504, '-']], 'reported as the proxy answer');
  assert.equal(r.engine.expire(ids[0] ?? 0, Buffer.alloc(0), 504), -1, 'nothing in flight any more');
  // The same keep-alive connection serves on.
  const next = fetchOn(agent, r.port, '/partial');
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(ids[1], ids[0], 'the next request came on the same connection');
  assert.equal(r.engine.expire(ids[1] ?? 0, Buffer.alloc(0), 504), 200, 'under way: the status of the answer to cut');
  r.engine.close(ids[1] ?? 0);
  await assert.rejects(next, 'the client sees its answer cut');
});

test('a route\'s retry: an answer with a code it retries on is dropped and the request goes again when the caller says so; a reset before any answer too; otherwise the answer stands', async (t) => {
  let n = 0;
  const r = await rig(t, () => undefined, (sock) => {
    sock.on('error', () => undefined);
    sock.on('data', () => {
      n++;
      // 1: a 503; 2: a reset; 3: a 200; 4: a 503 the caller lets stand.
      if (n === 2) return void sock.destroy();
      const [status, body] = n === 1 || n === 4 ? ['503 Service Unavailable', 'no'] : ['200 OK', 'ok'];
      sock.write(`HTTP/1.1 ${status}\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
    });
  });
  const asked: number[] = [];
  let allow = true;
  r.onHead = (id, method, target) => {
    const head = `${method} ${target} HTTP/1.1\r\nhost: x\r\n\r\n`;
    r.heads.set(id, head);
    void dialFd(r.upstreamPort).then((fd) => r.engine.forward(id, 'up', head, fd, [], '', 0, [503]));
  };
  r.onRetry = (id, status) => {
    asked.push(status);
    if (!allow) return false;
    // Later, as a backoff would: a new connection each time.
    setTimeout(() => void dialFd(r.upstreamPort).then((fd) => r.engine.forward(id, 'up', r.heads.get(id) ?? '', fd, [], '', 0, [503])), 10);
    return true;
  };
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const first = await fetchOn(agent, r.port, '/a');
  assert.deepEqual([first.status, first.body.toString()], [200, 'ok'], 'the 503 and the reset were retried');
  assert.deepEqual(asked, [503, 0]);
  allow = false;
  const second = await fetchOn(agent, r.port, '/b');
  assert.deepEqual([second.status, second.body.toString()], [503, 'no'], 'not retried: the answer stands');
  assert.deepEqual(asked, [503, 0, 503]);
  assert.deepEqual(r.done.map((d) => [d.status, d.flag]), [[200, '-'], [503, '-']]);
});

test('a route\'s retry with a request body: the body (either framing, up to 64 KiB) is kept and sent again whole; a larger one is not retried; a per-try abandon says which', async (t) => {
  // Each request's body as the server read it: the first of each path is answered 503, the next 200.
  const seen = new Map<string, string[]>();
  const silent = new Set<string>();
  const r = await rig(t, (req, res) => {
    const hash = createHash('sha256');
    req.on('data', (d: Buffer) => hash.update(d));
    req.on('end', () => {
      const path = req.url ?? '';
      const bodies = seen.get(path) ?? [];
      bodies.push(hash.digest('hex'));
      seen.set(path, bodies);
      // A silent path never answers its first attempt (a per-try timeout gives it up).
      if (silent.has(path) && bodies.length === 1) return;
      if (bodies.length === 1) return void res.writeHead(503, { 'content-length': '2' }).end('no');
      res.writeHead(200, { 'content-length': '2' }).end('ok');
    });
  });
  const asked: number[] = [];
  const ids = new Map<string, number>();
  r.onHead = (id, method, target, headers) => {
    let head = `${method} ${target} HTTP/1.1\r\n`;
    for (let i = 0; i < headers.length; i += 2) if ((headers[i] ?? '').toLowerCase() !== 'connection') head += `${headers[i]}: ${headers[i + 1]}\r\n`;
    head += '\r\n';
    r.heads.set(id, head);
    ids.set(target, id);
    void dialFd(r.upstreamPort).then((fd) => r.engine.forward(id, 'up', head, fd, [], '', 0, [503]));
  };
  r.onRetry = (id, status) => {
    asked.push(status);
    setTimeout(() => void dialFd(r.upstreamPort).then((fd) => r.engine.forward(id, 'up', r.heads.get(id) ?? '', fd, [], '', 0, [503])), 10);
    return true;
  };
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
  const small = Buffer.alloc(40_000, 'a');
  const one = await fetchOn(agent, r.port, '/length', { method: 'POST', body: small });
  assert.deepEqual([one.status, one.body.toString()], [200, 'ok'], 'retried after the 503');
  assert.deepEqual(seen.get('/length'), [sha(small), sha(small)], 'the same body both times');
  const chunked = Buffer.alloc(60_000, 'b');
  const two = await fetchOn(agent, r.port, '/chunked', { method: 'POST', body: chunked, chunked: true });
  assert.deepEqual([two.status, two.body.toString()], [200, 'ok']);
  assert.deepEqual(seen.get('/chunked'), [sha(chunked), sha(chunked)], 'chunked: the same body both times');
  assert.deepEqual(asked, [503, 503]);
  // Over 64 KiB: not kept, so the 503 stands and the caller is not asked.
  const large = Buffer.alloc(100_000, 'c');
  const three = await fetchOn(agent, r.port, '/large', { method: 'POST', body: large });
  assert.deepEqual([three.status, three.body.toString()], [503, 'no'], 'too large to send again: the answer stands');
  assert.deepEqual(asked, [503, 503]);
  // A per-try timeout: an attempt with its body read whole is given up and goes again (1).
  silent.add('/slow');
  const slow = fetchOn(agent, r.port, '/slow', { method: 'POST', body: small });
  while ((seen.get('/slow')?.length ?? 0) < 1) await new Promise((resolve) => setTimeout(resolve, 5));
  const id = ids.get('/slow') ?? -1;
  assert.equal(r.engine.abandon(id), 1);
  void dialFd(r.upstreamPort).then((fd) => r.engine.forward(id, 'up', r.heads.get(id) ?? '', fd, [], '', 0, [503]));
  const four = await slow;
  assert.deepEqual([four.status, four.body.toString()], [200, 'ok']);
  assert.deepEqual(seen.get('/slow'), [sha(small), sha(small)]);
  // Over 64 KiB it cannot go again: -1, and nothing changes (the caller expires it).
  silent.add('/slow-large');
  const slowLarge = fetchOn(agent, r.port, '/slow-large', { method: 'POST', body: large });
  while ((seen.get('/slow-large')?.length ?? 0) < 1) await new Promise((resolve) => setTimeout(resolve, 5));
  const big = ids.get('/slow-large') ?? -1;
  assert.equal(r.engine.abandon(big), -1);
  assert.equal(r.engine.expire(big, Buffer.from('HTTP/1.1 504 Gateway Timeout\r\ncontent-length: 0\r\n\r\n'), 504), 0);
  assert.equal((await slowLarge).status, 504);
  // Counted once each, with the body's bytes once (not once per attempt).
  assert.deepEqual(
    r.done.map((d) => [d.status, d.flag, d.bytesIn]),
    [[200, '-', 40_000], [200, '-', 60_000], [503, '-', 100_000], [200, '-', 40_000], [504, '-', 100_000]],
  );
});

test('keptBody: a request forwarded with keep has its body as it was sent when it ends (a mirror\'s copy); over 64 KiB, or not kept, nothing', async (t) => {
  const r = await rig(t, (req, res) => {
    req.resume();
    req.on('end', () => res.writeHead(200, { 'content-length': '2' }).end('ok'));
  });
  const kept: Array<string | undefined> = [];
  let keep = true;
  r.onHead = (id, method, target, headers) => {
    let head = `${method} ${target} HTTP/1.1\r\n`;
    for (let i = 0; i < headers.length; i += 2) if ((headers[i] ?? '').toLowerCase() !== 'connection') head += `${headers[i]}: ${headers[i + 1]}\r\n`;
    head += '\r\n';
    void dialFd(r.upstreamPort).then((fd) => r.engine.forward(id, 'up', head, fd, [], '', 0, undefined, keep));
  };
  // Asked when the request ends (as the client side's done() asks it).
  r.onDone = (id) => void kept.push(r.engine.keptBody(id)?.toString('latin1'));
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  t.after(() => agent.destroy());
  await fetchOn(agent, r.port, '/a', { method: 'POST', body: Buffer.from('hello') });
  await fetchOn(agent, r.port, '/b', { method: 'POST', body: Buffer.alloc(10, 'z'), chunked: true });
  await fetchOn(agent, r.port, '/c');
  await fetchOn(agent, r.port, '/d', { method: 'POST', body: Buffer.alloc(70_000, 'y') });
  keep = false;
  await fetchOn(agent, r.port, '/e', { method: 'POST', body: Buffer.from('hello') });
  assert.deepEqual(kept, ['hello', 'a\r\nzzzzzzzzzz\r\n0\r\n\r\n', '', undefined, undefined]);
});

test('upgrades: a 101 joins the client and a connection of its own byte for byte until both ended (done 101 with the bytes); a refused upgrade is answered and the connection closes', async (t) => {
  let connections = 0;
  const r = await rig(t, () => undefined, (s) => {
    connections++;
    s.on('error', () => undefined);
    let head = '';
    const onHead = (d: Buffer): void => {
      head += d.toString('latin1');
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      s.off('data', onHead);
      if (!/^GET \/ws /.test(head) || !/\r\nupgrade: echo\r\n/i.test(head)) {
        s.end('HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n');
        return;
      }
      s.write('HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n');
      // Whatever came after the head, then everything: echoed upper-cased, until the client ends.
      const rest = head.slice(end + 4);
      if (rest.length > 0) s.write(rest.toUpperCase());
      s.on('data', (more: Buffer) => s.write(more.toString('latin1').toUpperCase()));
    };
    s.on('data', onHead);
  });
  r.onHead = (id, method, target, headers) => {
    let head = `${method} ${target} HTTP/1.1\r\n`;
    for (let i = 0; i < headers.length; i += 2) head += `${headers[i]}: ${headers[i + 1]}\r\n`;
    void forwardWith(r, id, `${head}\r\n`, [], '');
  };
  const s = connect(r.port, '127.0.0.1');
  let got = '';
  s.on('data', (d: Buffer) => (got += d.toString('latin1')));
  s.write('GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nearly ');
  for (let i = 0; i < 100 && !got.includes('\r\n\r\n'); i++) await new Promise((resolve) => setTimeout(resolve, 10));
  assert.match(got, /^HTTP\/1\.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n/);
  const big = 'x'.repeat(300_000);
  s.write(`hello ${big}`);
  s.end();
  await once(s, 'close');
  assert.equal(got.slice(got.indexOf('\r\n\r\n') + 4), `EARLY HELLO ${big.toUpperCase()}`, 'both ways, in order, 300 KB through');
  assert.deepEqual(r.done.map((d) => [d.status, d.flag, d.bytesIn, d.bytesOut]), [[101, '-', 6 + 6 + big.length, 12 + big.length]]);
  // Refused: the answer, then the connection ends; each upgrade had a connection of its own.
  const refused = await rawExchange(r.port, 'GET /other HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: other\r\n\r\n');
  assert.match(refused, /^HTTP\/1\.1 426 Upgrade Required\r\n[\s\S]*connection: close\r\n\r\n$/);
  assert.equal(connections, 2);
});
