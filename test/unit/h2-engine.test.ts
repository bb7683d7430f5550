/**
 * The addon's HTTP/2 engine (native/src/h2.cc) on loopback sockets, between a real node:http2
 * client and server: many streams on one connection over one pooled upstream session, bodies
 * both ways with trailers, trailers-only answers, the proxy's own answers, header edits, a
 * request's time running out before and during its answer, resets either way, an upstream that
 * goes away, gRPC messages over the limit, and clients that break the protocol.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect as h2connect, constants, createServer as h2server, sensitiveHeaders, type ClientHttp2Session, type IncomingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import { connect } from 'node:net';
import { test, type TestContext } from 'node:test';

import { parseObject } from '../../src/config/objects.js';
import type { AuthorizationPolicy } from '../../src/config/security.js';
import { h2Engine, type H2Engine, type EngineGate, type EngineRoutes } from '../../src/datapath/native.js';
import { PolicyEngine, type ConnectionFacts } from '../../src/proxy/policy.js';
import { dialFd, engineFront, h2Frame, listening, until } from '../support/loopback.js';

interface Done {
  readonly stream: number;
  readonly status: number;
  readonly flag: string;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly grpcStatus: string;
}

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

interface Delivered {
  readonly conn: number;
  readonly status: number;
  readonly flag: string;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly grpcStatus: string | undefined;
  readonly ms: number;
  readonly routes: EngineRoutes | undefined;
  readonly target: number | undefined;
  readonly endpoint: number | undefined;
}

interface Rig {
  readonly port: number;
  readonly engine: H2Engine;
  readonly done: Done[];
  /** Streams the engine forwarded without a request() event. */
  readonly delivered: Delivered[];
  /** request() events so far. */
  readonly requests: { count: number };
  readonly refused: string[];
  /** Upstream connections the server accepted. */
  readonly upstream: { connections: number; streams: number };
  /** What to do with a stream (default: forward it as it came, pool "up"). */
  onRequest: (stream: number, method: string, path: string, authority: string, headers: string[]) => void;
  /** The engine's retry event (default: no). */
  onRetry: (stream: number, status: number) => boolean;
  /** The engine's dial event for routed streams (default: dialFailed). */
  onDial: (routes: EngineRoutes, target: number, endpoint: number) => void;
  /** Called with a stream's id as it ends, before its done() is recorded. */
  onDone?: (stream: number) => void;
  forward(stream: number, fields: string[], remove?: string[], add?: string[], retryOn?: number[], keep?: boolean, own?: boolean, gate?: EngineGate): Promise<void>;
}



async function rig(t: TestContext, app: (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => void): Promise<Rig> {
  const upstream = { connections: 0, streams: 0 };
  const server = h2server();
  server.on('connection', () => upstream.connections++);
  server.on('stream', (stream, headers) => {
    upstream.streams++;
    stream.on('error', () => undefined);
    app(stream, headers);
  });
  const upPort = await listening(server);
  const done: Done[] = [];
  const delivered: Delivered[] = [];
  const requests = { count: 0 };
  const refused: string[] = [];
  let opening: Promise<void> | undefined;
  const r: Rig = {
    port: 0,
    engine: undefined as unknown as H2Engine,
    done,
    delivered,
    requests,
    refused,
    upstream,
    onRequest: (stream, method, path, authority, headers) => {
      void r.forward(stream, [':method', method, ':scheme', 'http', ':authority', authority, ':path', path, ...headers]);
    },
    onRetry: () => false,
    onDial: (routes, target, endpoint) => r.engine.dialFailed(routes.targets[target]?.pools[endpoint] ?? ''),
    forward: async (stream, list, remove = [], add = [], retryOn = undefined, keep = false, own = false, gate = undefined) => {
      // The engine takes fields as one string, joined by NUL.
      const fields = list.join('\0');
      if (r.engine.forward(stream, 'up', fields, remove, add.join('\0'), retryOn, keep, own, gate)) return;
      // One dial for every stream that waits (as H2Host does).
      opening ??= dialFd(upPort).then((fd) => {
        r.engine.attach('up', fd, 0);
        opening = undefined;
      });
      await opening;
      assert.ok(r.engine.forward(stream, 'up', fields, remove, add.join('\0'), retryOn, keep, own, gate), 'a stream starts on the session just attached');
    },
  };
  const engine = h2Engine(
    {
      request: (_conn, stream, head) => {
        r.requests.count++;
        // "host", :authority, the fields, :method, :path.
        const parts = head.split('\0');
        const path = parts.pop() ?? '';
        const method = parts.pop() ?? '';
        r.onRequest(stream, method, path, parts[1] ?? '', parts.slice(2));
      },
      retry: (stream, status) => r.onRetry(stream, status),
      done: (stream, status, flag, bytesIn, bytesOut, grpcStatus) => {
        r.onDone?.(stream);
        done.push({ stream, status, flag, bytesIn, bytesOut, grpcStatus });
      },
      delivered: (conn, status, flag, bytesIn, bytesOut, grpcStatus, ms, routes, target, endpoint) => void delivered.push({ conn, status, flag, bytesIn, bytesOut, grpcStatus, ms, routes, target, endpoint }),
      dial: (_conn, routes, target, endpoint) => r.onDial(routes, target, endpoint),
      closed: () => undefined,
      refused: (_conn, reason) => void refused.push(reason),
    },
    { idleMs: 60_000, poolIdleMs: 60_000, maxHeaderListBytes: 16 * 1024, grpcMaxMessage: 4 << 20 },
  );
  (r as { engine: H2Engine }).engine = engine;
  const front = engineFront((id, fd) => engine.serve(id, fd));
  (r as { port: number }).port = await listening(front);
  t.after(() => {
    engine.destroy();
    front.close();
    server.close();
  });
  return r;
}

interface Answer {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  trailers: IncomingHttpHeaders | undefined;
  rst?: number;
}

function fetch(session: ClientHttp2Session, path: string, options: { method?: string; body?: Buffer; headers?: Record<string, string>; trailers?: Record<string, string> } = {}): Promise<Answer> {
  return new Promise((resolve) => {
    const req = session.request({ ':method': options.method ?? (options.body ? 'POST' : 'GET'), ':path': path, ...options.headers }, { endStream: !options.body, waitForTrailers: options.trailers !== undefined });
    if (options.trailers) req.once('wantTrailers', () => req.sendTrailers(options.trailers ?? {}));
    const a: Answer = { status: 0, headers: {}, body: Buffer.alloc(0), trailers: undefined };
    const chunks: Buffer[] = [];
    req.on('response', (h) => {
      a.status = Number(h[':status']);
      a.headers = h;
    });
    req.on('trailers', (t) => (a.trailers = t));
    req.on('data', (d: Buffer) => chunks.push(d));
    req.on('error', () => undefined);
    req.once('close', () => {
      a.body = Buffer.concat(chunks);
      if (req.rstCode !== constants.NGHTTP2_NO_ERROR) a.rst = req.rstCode;
      resolve(a);
    });
    if (options.body) req.end(options.body);
  });
}


/**
 * Echoes the request: its method, path and headers as answer headers (x-never-indexed: the fields
 * HPACK sent as never indexed), its body back, its trailers as answer trailers.
 */
function echo(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
  const chunks: Buffer[] = [];
  stream.on('data', (d: Buffer) => chunks.push(d));
  stream.on('end', () => {
    const neverIndexed = ((headers as Record<symbol, unknown>)[sensitiveHeaders] as string[] | undefined) ?? [];
    stream.respond(
      { ':status': 200, 'x-method': String(headers[':method']), 'x-path': String(headers[':path']), 'x-authority': String(headers[':authority']), 'x-seen': String(headers['x-in'] ?? ''), 'x-rid': String(headers['x-request-id'] ?? ''), 'x-never-indexed': neverIndexed.join(','), 'x-drop': 'me' },
      { waitForTrailers: true },
    );
    stream.once('wantTrailers', () => stream.sendTrailers({ 'x-trailer': 'end', 'x-had-trailer': String((stream as unknown as { trailers?: IncomingHttpHeaders }).trailers?.['x-req-trailer'] ?? '') }));
    stream.end(Buffer.concat(chunks));
  });
  stream.on('trailers', (t: IncomingHttpHeaders) => ((stream as unknown as { trailers?: IncomingHttpHeaders }).trailers = t));
}

test('h2 engine: 200 streams on one client connection go on one upstream session, bodies and trailers intact both ways, answer fields edited, per-request ids never indexed', async (t) => {
  const r = await rig(t, echo);
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  const base: Buffer = Buffer.alloc(300_000);
  for (let i = 0; i < base.length; i++) base[i] = (i * 7) & 0xff;
  r.onRequest = (stream, method, path, authority, headers) => void r.forward(stream, [':method', method, ':scheme', 'http', ':authority', authority, ':path', `/up${path}`, ...headers], ['x-drop'], ['x-added', 'yes']);
  // Each request's own id and trace context: never indexed upstream (they would churn HPACK's table).
  const ids = (i: number): Record<string, string> => ({ 'x-in': String(i), 'x-request-id': `req-${i}`, traceparent: `00-${String(i).padStart(32, '0')}-${String(i).padStart(16, '0')}-01` });
  const answers = await Promise.all(Array.from({ length: 200 }, (_, i) => fetch(session, `/p/${i}`, i % 10 === 0 ? { body: base.subarray(0, 1000 * i + 1), headers: ids(i), trailers: { 'x-req-trailer': `t${i}` } } : { headers: ids(i) })));
  answers.forEach((a, i) => {
    assert.equal(a.status, 200, `stream ${i}`);
    assert.equal(a.headers['x-never-indexed'], 'x-request-id,traceparent', `stream ${i}: only the per-request fields never indexed`);
    assert.equal(a.headers['x-path'], `/up/p/${i}`);
    assert.equal(a.headers['x-seen'], String(i));
    assert.equal(a.headers['x-drop'], undefined, 'removed');
    assert.equal(a.headers['x-added'], 'yes', 'added');
    assert.equal(a.trailers?.['x-trailer'], 'end', 'answer trailers passed');
    if (i % 10 === 0) {
      assert.ok(a.body.equals(base.subarray(0, 1000 * i + 1)), `body of stream ${i} intact`);
      assert.equal(a.trailers?.['x-had-trailer'], `t${i}`, 'request trailers passed');
    } else assert.equal(a.body.length, 0);
  });
  await until('every done()', () => r.done.length === 200);
  assert.equal(r.upstream.connections, 1, 'one upstream session');
  assert.equal(r.upstream.streams, 200);
  assert.ok(r.done.every((d) => d.flag === '-' && d.status === 200));
  const big = r.done.reduce((n, d) => n + d.bytesIn, 0);
  assert.equal(big, Array.from({ length: 20 }, (_, k) => 1000 * k * 10 + 1).reduce((a, b) => a + b, 0), 'request bytes counted');
});

test('h2 engine: with own, a stream goes upstream with its fields from the engine as they came, after the pseudo-header fields and additions from JS', async (t) => {
  const r = await rig(t, echo);
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  // JS sends only the pseudo-header fields and what it adds; the engine adds the client's own.
  r.onRequest = (stream, method, path, authority) => void r.forward(stream, [':method', method, ':scheme', 'http', ':authority', authority, ':path', path, 'x-added', 'yes'], [], [], undefined, false, true);
  const a = await fetch(session, '/own', { headers: { 'x-in': 'mine', traceparent: `00-${'1'.repeat(32)}-${'2'.repeat(16)}-01` } });
  assert.equal(a.status, 200);
  assert.equal(a.headers['x-seen'], 'mine', "the client's own field went upstream");
  assert.match(String(a.headers['x-rid']), UUID4, 'the id the engine gave the request (it had none) went upstream');
  assert.equal(a.headers['x-never-indexed'], 'traceparent,x-request-id', 'that id and the own trace context, never indexed');
});

/** Every stream passes: no policy applies. */
const OPEN: EngineGate = { id: 1, deny: [], allow: undefined };

test('h2 engine: with a gate, a connection\'s later streams with plain paths go on without asking JS (an id added when missing, bodies and trailers intact, reported in delivered()), others ask; undirect() ends it', async (t) => {
  const r = await rig(t, (stream, headers) => {
    if (headers['content-type'] === 'application/grpc') {
      stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      stream.once('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '7' }));
      stream.end();
      return;
    }
    echo(stream, headers);
  });
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  const asked: string[] = [];
  const seenIds: string[] = [];
  // As NativeH2Inbound forwards: pseudo-header fields, then the stream's own fields.
  r.onRequest = (stream, method, path, authority, headers) => {
    asked.push(path);
    seenIds.push(headers[headers.indexOf('x-request-id') + 1] ?? '');
    // A client that sends a host field and no :authority: the host field says it.
    const host = headers.indexOf('host');
    void r.forward(stream, [':method', method, ':scheme', 'http', ':authority', host >= 0 ? (headers[host + 1] ?? '') : authority, ':path', path], [], [], undefined, false, true, OPEN);
  };
  const first = await fetch(session, '/first');
  assert.equal(first.status, 200);
  assert.match(seenIds[0] ?? '', UUID4, 'a request without an id gets one from the engine, in what JS reads');
  assert.equal(first.headers['x-rid'], seenIds[0], 'and upstream');
  assert.deepEqual(asked, ['/first']);

  const body = Buffer.alloc(70_000, 7);
  const answers = await Promise.all(Array.from({ length: 50 }, (_, i) => fetch(session, `/d/${i}?q=${i}`, i % 5 === 0 ? { body, headers: { 'x-in': String(i), 'x-request-id': `mine-${i}` }, trailers: { 'x-req-trailer': `t${i}` } } : { headers: { 'x-in': String(i) } })));
  assert.deepEqual(asked, ['/first'], 'no request() event for the plain streams');
  const ids = new Set<string>();
  answers.forEach((a, i) => {
    assert.equal(a.status, 200, `stream ${i}`);
    assert.equal(a.headers['x-path'], `/d/${i}?q=${i}`);
    assert.equal(a.headers['x-method'], i % 5 === 0 ? 'POST' : 'GET');
    assert.equal(a.headers['x-seen'], String(i), 'its own fields went upstream');
    if (i % 5 === 0) {
      assert.equal(a.headers['x-rid'], `mine-${i}`, "the client's id kept");
      assert.ok(a.body.equals(body), `body of stream ${i} intact`);
      assert.equal(a.trailers?.['x-had-trailer'], `t${i}`, 'request trailers passed');
    } else {
      assert.match(String(a.headers['x-rid']), UUID4, 'a new version 4 UUID');
      ids.add(String(a.headers['x-rid']));
    }
    assert.equal(a.headers['x-never-indexed'], 'x-request-id', 'the id (added or the client\'s) never indexed');
    assert.equal(a.trailers?.['x-trailer'], 'end', 'answer trailers passed');
  });
  assert.equal(ids.size, 40, 'each id new');
  await until('every delivered()', () => r.delivered.length === 50);
  assert.ok(r.delivered.every((d) => d.status === 200 && d.flag === '-' && d.grpcStatus === undefined && d.ms > 0 && d.ms < 60_000));
  assert.equal(r.delivered.reduce((n, d) => n + d.bytesIn, 0), 10 * body.length, 'request bytes counted');
  assert.equal(r.delivered.reduce((n, d) => n + d.bytesOut, 0), 10 * body.length, 'answer bytes counted');
  assert.equal(new Set(r.delivered.map((d) => d.conn)).size, 1, 'under the client connection');

  // gRPC: its status from the trailers.
  const g = await fetch(session, '/pkg.Svc/Call', { body: Buffer.from([0, 0, 0, 0, 0]), headers: { 'content-type': 'application/grpc', te: 'trailers' } });
  assert.equal(g.trailers?.['grpc-status'], '7');
  await until('the gRPC stream delivered', () => r.delivered.length === 51);
  assert.equal(r.delivered[50]?.grpcStatus, '7');

  // Targets admission would change (a percent-encoding, a dot segment, an empty query) and a host field go to JS.
  for (const path of ['/a/%41', '/a/../b', '/a/./b', '/q?']) assert.equal((await fetch(session, path)).status, 200, path);
  assert.equal((await fetch(session, '/h', { headers: { host: 'other' } })).status, 200);
  assert.deepEqual(asked, ['/first', '/a/%41', '/a/../b', '/a/./b', '/q?', '/h']);

  r.engine.undirect();
  assert.equal((await fetch(session, '/after')).status, 200);
  assert.equal(asked.at(-1), '/after', 'asked again after undirect()');
  assert.equal(r.upstream.connections, 1, 'one upstream session throughout');
});

test('h2 engine: a policy\'s request gate: the streams it passes go on unread, each one the policy allows; it asks for the others', async (t) => {
  const r = await rig(t, echo);
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  const ap = (name: string, spec: Record<string, unknown>): AuthorizationPolicy => {
    const p = parseObject('t.yaml', { apiVersion: 'security.nodemesh.io/v1', kind: 'AuthorizationPolicy', metadata: { name, namespace: 'shop' }, spec });
    if (!('object' in p) || !p.object || !('authorizationPolicy' in p.object)) throw new Error(`refused: ${JSON.stringify(p)}`);
    return p.object.authorizationPolicy;
  };
  const policies = new PolicyEngine({
    mtlsMode: 'PERMISSIVE',
    peerAuthentications: [],
    authorizationPolicies: [
      ap('reads', {
        rules: [
          { to: [{ operation: { methods: ['GET', 'HEAD'], paths: ['/public/*', '/api/*', '/exact'] } }] },
          // Another caller's: never on this connection.
          { from: [{ source: { principals: ['cluster.local/ns/shop/sa/admin'] } }] },
          // Reads a header: the engine leaves these to JS.
          { to: [{ operation: { methods: ['POST'] } }], when: [{ key: 'request.headers[x-role]', values: ['ops'] }] },
          // Another port's.
          { to: [{ operation: { ports: ['9090'] } }] },
        ],
      }),
      ap('secrets', {
        action: 'DENY',
        rules: [
          { to: [{ operation: { paths: ['*.secret'] } }] },
          { to: [{ operation: { hosts: ['internal.example'] } }] },
          // Its header condition left out: every GET /api/x goes to JS.
          { to: [{ operation: { paths: ['/api/x'] } }], when: [{ key: 'request.headers[x-force]', values: ['yes'] }] },
        ],
      }),
    ],
  });
  const facts: ConnectionFacts = { sourceIp: '10.200.0.7', peer: { trustDomain: 'cluster.local', namespace: 'shop', serviceAccount: 'a' }, destination: { namespace: 'shop', labels: { app: 'web' } }, destinationIp: '10.200.0.9', destinationPort: 8080 };
  const gate = policies.requestGate(facts);
  assert.ok(gate);
  assert.equal(gate.allow?.length, 1, 'one ALLOW operation holds on this connection without reading headers');
  assert.equal(gate.deny.length, 3);
  const asked: string[] = [];
  r.onRequest = (stream, method, path, authority) => {
    asked.push(`${method} ${authority} ${path}`);
    void r.forward(stream, [':method', method, ':scheme', 'http', ':authority', authority, ':path', path], [], [], undefined, false, true, gate);
  };
  assert.equal((await fetch(session, '/first')).status, 200);
  const cases: ReadonlyArray<{ method?: string; path: string; authority?: string; unread: boolean }> = [
    { path: '/public/a', unread: true },
    { method: 'HEAD', path: '/api/y', unread: true },
    { path: '/public/a?x=1', unread: true },
    { path: '/exact', unread: true },
    { path: '/public/a', authority: 'Web.Shop:8080', unread: true },
    { path: '/exact/more', unread: false },
    { path: '/PUBLIC/a', unread: false },
    { path: '/public/x.secret', unread: false },
    { path: '/public/a', authority: 'internal.example:8080', unread: false },
    { path: '/public/a', authority: 'INTERNAL.example', unread: false },
    { path: '/api/x', unread: false },
    { path: '/other', unread: false },
    { method: 'POST', path: '/public/a', unread: false },
    { method: 'DELETE', path: '/public/a', unread: false },
  ];
  for (const c of cases) {
    const method = c.method ?? 'GET';
    const authority = c.authority ?? 'web.shop';
    const before = asked.length;
    const a = await fetch(session, c.path, { method, headers: { ':authority': authority } });
    assert.equal(a.status, 200);
    const unread = asked.length === before;
    assert.equal(unread, c.unread, `${method} ${authority} ${c.path}: ${unread ? 'unread' : 'asked'}`);
    // Whatever went unread, the policy allows.
    const path = c.path.split('?')[0] ?? '';
    if (unread) assert.ok(policies.authorizeRequest(facts, { method, host: authority, path, header: () => undefined }).allowed, `${method} ${c.path}: allowed by the policy`);
  }
  await until('every unread stream delivered', () => r.delivered.length === cases.filter((c) => c.unread).length);
});

/** An upstream that names itself in each answer (x-from), with the path and x-version it got; /api/slow answers after 300 ms. */
function tagged(name: string): (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => void {
  return (stream, headers) => {
    const answer = (): void => {
      if (stream.destroyed) return;
      stream.respond({ ':status': 200, 'x-from': name, 'x-path': String(headers[':path']), 'x-rid': String(headers['x-request-id'] ?? '') });
      stream.end('ok');
    };
    stream.resume();
    stream.on('end', () => (String(headers[':path']).startsWith('/api/slow') ? setTimeout(answer, 300) : answer()));
  };
}

test('h2 engine: with routes, a connection\'s later streams are routed in the engine (first matching rule, weighted split and round robin per request, reported with target and endpoint); what it cannot act on asks JS; the routes end with their time and at undirect()', async (t) => {
  const r = await rig(t, tagged('e0'));
  const ports = new Map<string, number>();
  for (const name of ['e1', 'e2', 'late']) {
    const server = h2server();
    server.on('stream', (stream, headers) => {
      stream.on('error', () => undefined);
      tagged(name)(stream, headers);
    });
    const port = await listening(server);
    ports.set(name, port);
    t.after(() => server.close());
    if (name !== 'late') r.engine.attach(name, await dialFd(port), 0);
  }
  // The engine asks for a session of a pool with none: "late" is dialled, "no-session" fails.
  const dials: string[] = [];
  r.onDial = (routes, target, endpoint) => {
    const pool = routes.targets[target]?.pools[endpoint] ?? '';
    dials.push(pool);
    const port = ports.get(pool);
    if (port === undefined) r.engine.dialFailed(pool);
    else void dialFd(port).then((fd) => r.engine.attach(pool, fd, 0));
  };
  const rules = (last: string): EngineRoutes['rules'] => [
    { match: { exact: true, path: '/js', headers: [] } },
    { match: { exact: false, path: '/api', method: 'POST', headers: [['x-version', 'v2']] }, backends: [[1, 1]] },
    { match: { exact: false, path: '/cold', headers: [] }, backends: [[2, 1]] },
    { match: { exact: false, path: '/late', headers: [] }, backends: [[3, 1]] },
    { match: { exact: false, path: last, headers: [] }, backends: [[0, 9], [1, 1]] },
  ];
  const targets: EngineRoutes['targets'] = [
    { key: 'shop/v1:80', pools: ['up', 'e1'], random: false },
    { key: 'shop/v2:80', pools: ['e2'], random: false },
    { key: 'shop/cold:80', pools: ['no-session'], random: false },
    { key: 'shop/late:80', pools: ['late'], random: false },
  ];
  const routes: EngineRoutes = { id: 1, ttlMs: -1, rules: rules('/d'), targets };
  let next: EngineRoutes = routes;
  const asked: string[] = [];
  r.onRequest = (stream, method, path, authority, headers) => {
    asked.push(`${method} ${path}`);
    // A client that sends a host field and no :authority: the host field says it.
    const host = headers.indexOf('host');
    void r.forward(stream, [':method', method, ':scheme', 'http', ':authority', host >= 0 ? (headers[host + 1] ?? '') : authority, ':path', path], [], [], undefined, false, true).then(() => r.engine.route(stream, next));
  };
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  assert.equal((await fetch(session, '/first')).status, 200);
  assert.deepEqual(asked, ['GET /first']);

  const answers = await Promise.all(Array.from({ length: 100 }, (_, i) => fetch(session, `/d/${i}`)));
  assert.deepEqual(asked, ['GET /first'], 'no request() event for the routed streams');
  const from = new Map<string, number>();
  for (const a of answers) {
    assert.equal(a.status, 200);
    assert.match(String(a.headers['x-rid']), UUID4, 'an id added');
    from.set(String(a.headers['x-from']), (from.get(String(a.headers['x-from'])) ?? 0) + 1);
  }
  assert.deepEqual(Object.fromEntries([...from].sort()), { e0: 45, e1: 45, e2: 10 }, '90/10 by weight, then round robin over the two endpoints');
  await until('every routed stream delivered', () => r.delivered.length === 100);
  const reported = new Map<string, number>();
  for (const d of r.delivered) {
    assert.equal(d.routes, routes, 'reported with the routes object JS gave');
    assert.ok(d.status === 200 && d.flag === '-' && d.ms > 0);
    const pool = targets[d.target ?? -1]?.pools[d.endpoint ?? -1] ?? '?';
    reported.set(pool, (reported.get(pool) ?? 0) + 1);
  }
  assert.deepEqual(Object.fromEntries([...reported].sort()), { e1: 45, e2: 10, up: 45 }, 'each report names where it went');

  // A method and an exact header are read; a repeated header, a rule the engine does not act on,
  // no matching rule, a host field and an endpoint whose pool has no session are JS's.
  const post = await fetch(session, '/api/x', { method: 'POST', headers: { 'x-version': 'v2' } });
  assert.equal(post.headers['x-from'], 'e2');
  const jsCases: Array<[string, Parameters<typeof fetch>[2]]> = [
    ['/api/x', { headers: { 'x-version': 'v2' } }],
    ['/api/x', { method: 'POST', headers: { 'x-version': ['v2', 'v2'] as unknown as string } }],
    ['/js', {}],
    ['/zzz', {}],
    ['/d/h', { headers: { host: 'web.shop' } }],
    ['/cold', {}],
  ];
  for (const [path, options] of jsCases) assert.equal((await fetch(session, path, options)).status, 200, path);
  assert.deepEqual(asked.slice(1), ['GET /api/x', 'POST /api/x', 'GET /js', 'GET /zzz', 'GET /d/h', 'GET /cold'], 'a pool whose dial failed: JS decides the stream');
  // Streams routed to a pool with no session wait for the one dialled on their behalf (one dial for all).
  const late = await Promise.all(Array.from({ length: 5 }, (_, i) => fetch(session, `/late/${i}`)));
  assert.deepEqual(late.map((a) => a.headers['x-from']), ['late', 'late', 'late', 'late', 'late']);
  assert.deepEqual(dials, ['no-session', 'late']);
  assert.equal(asked.length, 7, 'not asked');

  // Requests in flight per backend Service, for the retry budget.
  const slow = fetch(session, '/api/slow', { method: 'POST', headers: { 'x-version': 'v2' } });
  await until('the slow stream in flight', () => r.engine.inFlight('shop/v2:80') === 1);
  assert.equal((await slow).headers['x-from'], 'e2');
  await until('and out of flight', () => r.engine.inFlight('shop/v2:80') === 0);

  // Routes with a time limit are followed until it passes.
  next = { id: 2, ttlMs: 150, rules: rules('/'), targets };
  await fetch(session, '/js');
  const before = asked.length;
  assert.equal((await fetch(session, '/zzz')).status, 200);
  assert.equal(asked.length, before, 'the new routes (a "/" rule) route it');
  await new Promise((resolve) => setTimeout(resolve, 200));
  await fetch(session, '/zzz');
  assert.equal(asked.at(-1), 'GET /zzz', 'asked once their time passed');

  next = routes;
  await fetch(session, '/js');
  const held = asked.length;
  await fetch(session, '/d/1');
  assert.equal(asked.length, held);
  r.engine.undirect();
  await fetch(session, '/d/2');
  assert.equal(asked.at(-1), 'GET /d/2', 'asked again after undirect()');
});

test('h2 engine: a large answer streams with flow control (more than every window), a 100 Continue passes, the proxy answers, redirects and cuts', async (t) => {
  const huge = Buffer.alloc(40 << 20, 1);
  let stall: ServerHttp2Stream | undefined;
  const r = await rig(t, (stream, headers) => {
    if (headers[':path'] === '/huge') {
      stream.respond({ ':status': 200 });
      stream.end(huge);
    } else if (headers[':path'] === '/stall') {
      stream.respond({ ':status': 200 });
      stream.write('partial');
      stall = stream;
    } else if (headers[':path'] === '/continue') {
      // The app says go on before it reads the body.
      stream.additionalHeaders({ ':status': 100 });
      echo(stream, headers);
    } else if (headers[':path'] === '/slow') {
      setTimeout(() => {
        if (!stream.destroyed) stream.respond({ ':status': 200 }, { endStream: true });
      }, 2000);
    } else echo(stream, headers);
  });
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  const a = await fetch(session, '/huge');
  assert.equal(a.body.length, huge.length, '40 MiB through a 16 MiB connection window');
  r.onRequest = (stream, method, path, authority, headers) => {
    if (path === '/mine') return r.engine.respond(stream, 418, 'content-type\0text/plain', 'short and stout\n');
    if (path === '/moved') return r.engine.respond(stream, 301, 'location\0/there', '');
    if (path === '/late') return void setTimeout(() => r.engine.expire(stream, 504, 'content-type\0text/plain', 'too late\n'), 100);
    void r.forward(stream, [':method', method, ':scheme', 'http', ':authority', authority, ':path', path, ...headers]);
    if (path === '/stall') void until('the stalled answer', () => stall !== undefined).then(() => setTimeout(() => assert.equal(r.engine.expire(stream, 504, '', ''), 200, 'the status of the answer cut'), 100));
    if (path === '/slow') setTimeout(() => assert.equal(r.engine.expire(stream, 504, 'content-type\0text/plain', 'no answer in time\n'), 0), 200);
  };
  // An interim answer (100 Continue) is passed on before the answer.
  const cont = session.request({ ':method': 'POST', ':path': '/continue', expect: '100-continue' });
  const interim: number[] = [];
  cont.on('continue', () => {
    interim.push(100);
    cont.end('after the 100');
  });
  const contAnswer = await new Promise<string>((resolve) => {
    const chunks: Buffer[] = [];
    cont.on('data', (d: Buffer) => chunks.push(d));
    cont.once('close', () => resolve(Buffer.concat(chunks).toString()));
  });
  assert.deepEqual(interim, [100]);
  assert.equal(contAnswer, 'after the 100');
  const mine = await fetch(session, '/mine', { body: Buffer.alloc(100_000) });
  assert.equal(mine.status, 418);
  assert.equal(mine.body.toString(), 'short and stout\n');
  assert.equal((await fetch(session, '/moved')).headers.location, '/there');
  assert.equal((await fetch(session, '/late')).status, 504);
  const slow = await fetch(session, '/slow');
  assert.equal(slow.status, 504);
  assert.equal(slow.body.toString(), 'no answer in time\n');
  const cut = await fetch(session, '/stall');
  assert.equal(cut.status, 200);
  assert.equal(cut.rst, constants.NGHTTP2_CANCEL, 'the answer under way is reset');
  await until('every done()', () => r.done.length === 7);
  assert.deepEqual(r.done.map((d) => [d.status, d.flag]), [[200, '-'], [200, '-'], [418, ''], [301, ''], [504, ''], [504, ''], [200, '']]);
  assert.equal(r.done[2]?.bytesIn, 100_000, "the answered stream's body read and dropped");
  // The session serves on after all of it.
  assert.equal((await fetch(session, '/again', { body: Buffer.from('x') })).body.toString(), 'x');
});

test('h2 engine: resets pass both ways, a refused or lost upstream answers 503, gRPC messages over the limit never go upstream', async (t) => {
  let reached = 0;
  const r = await rig(t, (stream, headers) => {
    if (headers[':path'] === '/reset') return stream.close(constants.NGHTTP2_ENHANCE_YOUR_CALM);
    if (headers[':path'] === '/reset-late') {
      // The upstream connection is lost in the middle of the answer.
      stream.respond({ ':status': 200 });
      stream.write('some');
      return void setTimeout(() => stream.session?.destroy(), 50);
    }
    if (headers[':path'] === '/grpc') {
      stream.on('data', () => reached++);
      return;
    }
    if (headers[':path'] === '/hang') return;
    echo(stream, headers);
  });
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  const early = await fetch(session, '/reset');
  assert.equal(early.status, 503, 'reset before an answer: the proxy answers');
  const late = await fetch(session, '/reset-late');
  assert.equal(late.rst, constants.NGHTTP2_INTERNAL_ERROR, "the upstream lost during the answer: the client's stream is reset");
  // A gRPC message announcing 5 MiB: RESOURCE_EXHAUSTED from the proxy.
  const prefix = Buffer.from([0, 0, 0x50, 0, 0]);
  const grpc = await fetch(session, '/grpc', { body: Buffer.concat([prefix, Buffer.alloc(1000)]), headers: { 'content-type': 'application/grpc' } });
  assert.equal(grpc.headers['grpc-status'], '8');
  assert.match(String(grpc.headers['grpc-message']), /5242880 bytes is over the limit of 4194304/);
  assert.equal(reached, 0, 'none of it reached the server');
  // The client leaves with a stream in flight: its upstream stream is cancelled.
  const before = r.upstream.streams;
  const req = session.request({ ':path': '/hang' });
  req.on('error', () => undefined);
  await until('the hanging stream upstream', () => r.upstream.streams === before + 1);
  req.close(constants.NGHTTP2_CANCEL);
  await until('its done()', () => r.done.some((d) => d.flag === 'DC'));
  assert.deepEqual(r.done.map((d) => d.flag), ['UC', 'UPE', 'DPE', 'DC']);
  assert.equal(r.done[2]?.grpcStatus, '8');
  assert.equal((await fetch(session, '/fine')).status, 200, 'the connection serves on');
});

/** Raw bytes to the front; the GOAWAY error code that comes back (or 'none'). */
async function goaway(port: number, bytes: Buffer): Promise<string> {
  const s = connect(port, '127.0.0.1');
  let got = Buffer.alloc(0);
  s.on('data', (d: Buffer) => (got = Buffer.concat([got, d])));
  s.on('error', () => undefined);
  s.write(bytes);
  await Promise.race([once(s, 'close'), new Promise((resolve) => setTimeout(resolve, 3000))]);
  s.destroy();
  for (let o = 0; o + 9 <= got.length; ) {
    const len = got.readUIntBE(o, 3);
    if (got[o + 3] === 7) return `goaway:${got.readUInt32BE(o + 9 + 4)}`;
    o += 9 + len;
  }
  return 'none';
}

test('h2 engine: clients that break the protocol end with GOAWAY, counted, nothing routed', async (t) => {
  const r = await rig(t, echo);
  let routed = 0;
  r.onRequest = () => void routed++;
  const preface = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
  const frame = h2Frame;
  const settings = frame(4, 0, 0);
  assert.equal(await goaway(r.port, Buffer.concat([preface, settings, frame(0, 0, 0, Buffer.from('x'))])), 'goaway:1', 'DATA on stream 0');
  assert.equal(await goaway(r.port, Buffer.concat([preface, ...Array.from({ length: 20_000 }, () => settings)])), 'goaway:2', 'a SETTINGS flood');
  assert.equal(await goaway(r.port, Buffer.concat([preface, settings, ...Array.from({ length: 20_000 }, () => frame(6, 0, 0, Buffer.alloc(8)))])), 'goaway:2', 'a PING flood');
  assert.equal(await goaway(r.port, Buffer.concat([preface, settings, frame(1, 4, 1, Buffer.from([0xff, 0xff, 0xff, 0xff]))])), 'goaway:9', 'headers that do not decode');
  assert.equal(await goaway(r.port, Buffer.from('GET / HTTP/1.1\r\nhost: x\r\n\r\n')), 'goaway:1', 'no preface');
  assert.equal(routed, 0);
  assert.deepEqual(r.refused, ['h2_protocol_error', 'h2_flood', 'h2_flood', 'h2_compression_error', 'h2_bad_preface']);
});

test('h2 engine: retries send the kept body again (a retried code, a reset before any answer, a per-try timeout), not over 64 KiB; keptBody for mirrors', async (t) => {
  const seen = new Map<string, Buffer[]>();
  const r = await rig(t, (stream, headers) => {
    const path = String(headers[':path']);
    const chunks: Buffer[] = [];
    stream.on('data', (d: Buffer) => chunks.push(d));
    stream.on('end', () => {
      const bodies = seen.get(path) ?? [];
      bodies.push(Buffer.concat(chunks));
      seen.set(path, bodies);
      const first = bodies.length === 1;
      if (first && path.startsWith('/503')) return stream.respond({ ':status': 503 }, { endStream: true });
      if (first && path === '/reset') return stream.close(constants.NGHTTP2_INTERNAL_ERROR);
      if (first && path === '/slow') return;
      stream.respond({ ':status': 200, 'x-attempt': String(bodies.length) });
      stream.end(Buffer.concat(chunks));
    });
  });
  const session = h2connect(`http://127.0.0.1:${r.port}`);
  t.after(() => session.destroy());
  const asked: Array<[string, number]> = [];
  const paths = new Map<number, string>();
  const kept = new Map<string, Buffer | undefined>();
  const send = (stream: number): void => {
    const path = paths.get(stream) ?? '';
    void r.forward(stream, [':method', 'POST', ':scheme', 'http', ':authority', 'x', ':path', path], [], [], [503], path === '/keep');
    if (path === '/slow' && (seen.get('/slow')?.length ?? 0) === 0) setTimeout(() => {
      assert.equal(r.engine.abandon(stream), 1, 'the slow attempt given up');
      send(stream);
    }, 200);
  };
  r.onRequest = (stream, _m, path) => {
    paths.set(stream, path);
    send(stream);
  };
  r.onRetry = (stream, status) => {
    asked.push([paths.get(stream) ?? '', status]);
    setImmediate(() => send(stream));
    return true;
  };
  r.onDone = (stream) => kept.set(paths.get(stream) ?? '', r.engine.keptBody(stream));
  const body = Buffer.alloc(40_000, 7);
  const big = Buffer.alloc(100_000, 9);
  const [a503, reset, slow, tooBig, keep] = await Promise.all([
    fetch(session, '/503', { body }),
    fetch(session, '/reset', { body }),
    fetch(session, '/slow', { body }),
    fetch(session, '/503-big', { body: big }),
    fetch(session, '/keep', { body }),
  ]);
  assert.equal(a503.status, 200);
  assert.equal(a503.headers['x-attempt'], '2');
  assert.ok(a503.body.equals(body), 'the second attempt had the whole body');
  assert.equal(reset.status, 200, 'a reset before any answer: sent again');
  assert.ok(seen.get('/reset')?.every((b) => b.equals(body)));
  assert.equal(slow.status, 200, 'after abandon(): sent again');
  assert.ok(seen.get('/slow')?.[1]?.equals(body));
  assert.equal(tooBig.status, 503, 'over 64 KiB: the answer stands');
  assert.deepEqual(asked.sort(), [['/503', 503], ['/reset', 0]]);
  assert.equal(keep.status, 200);
  assert.ok(kept.get('/keep')?.equals(body), 'keptBody: the body as it came');
  assert.equal(kept.get('/503-big'), undefined, 'not kept whole');
  // The connection's window was not given twice for what went twice: it serves on.
  assert.equal((await fetch(session, '/after', { body: Buffer.alloc(2 << 20, 1) })).body.length, 2 << 20);
});
