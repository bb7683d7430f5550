/** L7 routing in the config model and the proxy's matcher: protocols, precedence, matches, the store's checks. */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { checkRouteRefs, parseRoute } from '../../src/config/route.js';
import { parseService, portProtocol } from '../../src/config/service.js';
import { MeshSnapshot, type Workload } from '../../src/config/snapshot.js';
import { ConfigDirReader, ConfigStore } from '../../src/config/store.js';
import { DEFAULT_SERVICE_POLICY, parseTrafficPolicy } from '../../src/config/traffic-policy.js';
import { applyHeaderChanges, matchRequest, redirectLocation, rewritePath, routeRequest } from '../../src/proxy/http/outbound.js';
import { classify, newRequestId } from '../../src/proxy/http/common.js';
import { answerEdits } from '../../src/proxy/http/native-outbound.js';
import { EngineRoutePlans } from '../../src/proxy/http/engine-routes.js';
import { LoadBalancer } from '../../src/proxy/pool/load-balancer.js';

test('port protocols: appProtocol first, else the name prefix; unknown when neither says', () => {
  const cases: Array<[string, string, string]> = [
    ['http', '', 'http'],
    ['http-web', '', 'http'],
    ['web', 'http', 'http'],
    ['grpc-api', '', 'grpc'],
    ['', 'kubernetes.io/h2c', 'http2'],
    ['http2', '', 'http2'],
    ['tcp-db', '', 'opaque'],
    ['http', 'tcp', 'opaque'],
    ['web', '', 'unknown'],
    ['', '', 'unknown'],
    ['HTTP', '', 'http'],
  ];
  for (const [name, appProtocol, want] of cases) assert.equal(portProtocol({ name, appProtocol }), want, `${name}/${appProtocol}`);
});

const routeDoc = (name: string, rules: unknown[]): Record<string, unknown> => ({
  apiVersion: 'gateway.networking.k8s.io/v1',
  kind: 'HTTPRoute',
  metadata: { namespace: 'shop', name },
  spec: { parentRefs: [{ kind: 'Service', name: 'web', port: 80 }], rules },
});
const to = (backend: string, extra: Record<string, unknown> = {}): Record<string, unknown> => ({ backendRefs: [{ name: backend, port: 80 }], ...extra });
const facts = (path: string, headers: Record<string, string> = {}, method = 'GET', query = ''): { method: string; path: string; query: string; headers: Record<string, string> } => ({ method, path, query, headers });

test('matches: PathPrefix element by element, Exact, whole-string regex, method, headers (case-insensitive names), query parameters (first value)', () => {
  const m = (match: Record<string, unknown>) => {
    const first = parseRoute(routeDoc('r', [to('a', { matches: [match] })])).rules[0]?.matches[0];
    assert.ok(first);
    return first;
  };
  const prefix = m({ path: { type: 'PathPrefix', value: '/abc/' } });
  assert.deepEqual(['/abc', '/abc/', '/abc/def', '/abcd', '/ab'].map((p) => matchRequest(prefix, facts(p))), [true, true, true, false, false]);
  const exact = m({ path: { type: 'Exact', value: '/abc' } });
  assert.deepEqual(['/abc', '/abc/', '/abcd'].map((p) => matchRequest(exact, facts(p))), [true, false, false]);
  const regex = m({ path: { type: 'RegularExpression', value: '/v[0-9]+/items' } });
  assert.deepEqual(['/v1/items', '/v12/items', '/x/v1/items', '/v1/items/1'].map((p) => matchRequest(regex, facts(p))), [true, true, false, false]);
  const headers = m({ method: 'POST', headers: [{ name: 'X-Version', value: 'v2' }, { type: 'RegularExpression', name: 'x-user', value: 'beta-.*' }] });
  assert.equal(matchRequest(headers, facts('/', { 'x-version': 'v2', 'x-user': 'beta-7' }, 'POST')), true);
  assert.equal(matchRequest(headers, facts('/', { 'x-version': 'v2', 'x-user': 'beta-7' }, 'GET')), false, 'method');
  assert.equal(matchRequest(headers, facts('/', { 'x-version': 'V2', 'x-user': 'beta-7' }, 'POST')), false, 'values are case-sensitive');
  assert.equal(matchRequest(headers, facts('/', { 'x-version': 'v2' }, 'POST')), false, 'a missing header does not match');
  const query = m({ queryParams: [{ name: 'tier', value: 'gold' }] });
  assert.deepEqual(['tier=gold', 'tier=gold&tier=x', 'tier=x&tier=gold', 'Tier=gold', ''].map((q) => matchRequest(query, facts('/', {}, 'GET', q))), [true, true, false, false, false]);
});

const workload = (name: string, app: string, n: number): Workload => ({ uid: `u-${name}`, name, namespace: 'shop', serviceAccount: 'default', labels: { app }, ip4: `10.200.0.${n}`, ip6: '' });
const svc = (name: string, ip: string, port = '{name: http, port: 80, targetPort: 8080}'): string => `apiVersion: v1\nkind: Service\nmetadata: {name: ${name}, namespace: shop}\nspec: {clusterIP: ${ip}, selector: {app: ${name}}, ports: [${port}]}\n---\n`;

test('precedence: routes on one HTTP port merge; Exact, regex, longest prefix, method, most headers, most query parameters, then name and order', async () => {
  const rules = (...r: unknown[]): unknown[] => r;
  const a = parseRoute(routeDoc('a', rules(to('root'), to('api', { matches: [{ path: { value: '/api' } }] }), to('hdr', { matches: [{ path: { value: '/api' }, headers: [{ name: 'x-v', value: '2' }] }] }))));
  const b = parseRoute(routeDoc('b', rules(to('exact', { matches: [{ path: { type: 'Exact', value: '/api/health' } }] }), to('regex', { matches: [{ path: { type: 'RegularExpression', value: '/api/v[0-9]' } }] }), to('long', { matches: [{ path: { value: '/api/items' } }] }), to('post', { matches: [{ path: { value: '/api' }, method: 'POST' }] }))));
  const names = ['web', 'root', 'api', 'hdr', 'exact', 'regex', 'long', 'post'];
  const services = names.map((n, i) => svc(n, `10.96.7.${i + 1}`)).join('');
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  try {
    await writeFile(join(dir, 'svc.yaml'), services);
    const store = new ConfigStore(new ConfigDirReader(dir), { onLoad: () => undefined });
    await store.load();
    const c = store.current();
    const snap = new MeshSnapshot(1, c.services, names.map((n, i) => workload(n, n, i + 1)), [], [b, a]);
    const web = snap.service({ family: 4, address: '10.96.7.1', port: 80 });
    assert.ok(web?.http, 'the HTTP port is routed per request');
    assert.equal(web.split, undefined);
    assert.deepEqual(web.http.routes, ['HTTPRoute shop/a', 'HTTPRoute shop/b']);
    assert.deepEqual(
      web.http.entries.map((e) => e.backends[0]?.target.service.name),
      ['exact', 'regex', 'long', 'post', 'hdr', 'api', 'root'],
    );
    const lb = new LoadBalancer();
    const go = (path: string, headers: Record<string, string> = {}, method = 'GET'): string | undefined => {
      const e = routeRequest(web.http?.entries ?? [], facts(path, headers, method));
      return e ? lb.pickWeighted(`${web.key}#${e.route}#${e.rule}`, e.backends)?.target.service.name : undefined;
    };
    assert.deepEqual(
      [go('/api/health'), go('/api/v1'), go('/api/items/3'), go('/api/x', {}, 'POST'), go('/api/x', { 'x-v': '2' }), go('/api/x'), go('/other'), go('/api/healthz')],
      ['exact', 'regex', 'long', 'post', 'hdr', 'api', 'root', 'api'],
    );
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('the store: a route that matches requests needs a parent port that may speak HTTP (said, or sniffed when it says nothing); field named, last good kept; a split alone may go on any port', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const routeYaml = (matches: string): string =>
    `apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: web, port: 80}]\n  rules: [{${matches}backendRefs: [{name: v1, port: 80, weight: 9}, {name: v2, port: 80, weight: 1}]}]\n`;
  const webPort = async (port: string): Promise<void> => writeFile(join(dir, 'svc.yaml'), svc('web', '10.96.8.1', port) + svc('v1', '10.96.8.2') + svc('v2', '10.96.8.3'));
  await webPort('{name: web, port: 80, targetPort: 8080}');
  await writeFile(join(dir, 'route.yaml'), routeYaml(''));
  const store = new ConfigStore(new ConfigDirReader(dir), { onLoad: () => undefined });
  await store.load();
  assert.deepEqual(store.lastRejected(), []);
  const pods = [workload('v1', 'v1', 2), workload('v2', 'v2', 3)];
  const parent = (): ReturnType<MeshSnapshot['service']> => {
    const c = store.current();
    return new MeshSnapshot(1, c.services, pods, [], c.routes).service({ family: 4, address: '10.96.8.1', port: 80 });
  };
  assert.ok(parent()?.split, 'a port that says no protocol, a split alone: connections are split');
  assert.equal(parent()?.http, undefined);
  // Matches on a port that says nothing: accepted, routed per request once sniffing finds HTTP.
  await writeFile(join(dir, 'route.yaml'), routeYaml('matches: [{headers: [{name: x-v, value: "2"}]}], '));
  await store.load();
  assert.deepEqual(store.lastRejected(), []);
  assert.equal(parent()?.http?.entries.length, 1, 'HTTP entries, for the connections sniffed as HTTP');
  // A port that says it speaks something else cannot take them: refused, the last good route kept.
  await webPort('{name: tcp-web, port: 80, targetPort: 8080}');
  await store.load();
  const rejected = store.lastRejected();
  assert.deepEqual(rejected.map((r) => [r.object, r.field, r.keptLastGood]), [['HTTPRoute shop/r', 'spec.parentRefs[0].port', true]]);
  assert.match(rejected[0]?.message ?? '', /speaks opaque, whose requests nodemesh cannot read/);
  // Once the port says it speaks HTTP, the same route applies per request.
  await webPort('{name: web, port: 80, targetPort: 8080, appProtocol: http}');
  await store.load();
  assert.deepEqual(store.lastRejected(), []);
  assert.equal(parent()?.http?.entries.length, 1);
});

test('filters: header changes (remove, set, add), prefix and full path rewrites, redirect locations', () => {
  const raw = ['Host', 'web', 'X-Secret', 's', 'x-env', 'dev', 'Accept', '*/*', 'x-env', 'dev2'];
  assert.deepEqual(applyHeaderChanges(raw, { set: [['x-env', 'prod']], add: [['x-trace', '1'], ['accept', 'text/plain']], remove: ['x-secret'] }), ['Host', 'web', 'Accept', '*/*', 'x-env', 'prod', 'x-trace', '1', 'accept', 'text/plain']);
  const prefix = (value: string) => ({ type: 'PathPrefix' as const, value });
  const replace = (value: string) => ({ type: 'ReplacePrefixMatch' as const, value });
  const cases: Array<[string, string, string, string, string]> = [
    // path, query, matched prefix, replacement, result
    ['/foo/bar', '', '/foo', '/xyz', '/xyz/bar'],
    ['/foo', 'a=1', '/foo', '/xyz', '/xyz?a=1'],
    ['/foo/bar', '', '/foo', '/', '/bar'],
    ['/foo', '', '/foo', '/', '/'],
    ['/foo/bar', '', '/foo', '/xyz/', '/xyz/bar'],
    ['/foo/bar', '', '/', '/xyz', '/xyz/foo/bar'],
  ];
  for (const [path, query, matched, to, want] of cases) assert.equal(rewritePath(path, query, replace(to), prefix(matched)), want, `${path} ${matched} -> ${to}`);
  assert.equal(rewritePath('/a/b', 'q=1', { type: 'ReplaceFullPath', value: '/c' }, prefix('/a')), '/c?q=1');
  const redirect = (extra: Record<string, unknown>) => ({ type: 'RequestRedirect' as const, statusCode: 301, ...extra });
  assert.equal(redirectLocation(redirect({}), prefix('/'), '/a', 'q=1', 'web:8080'), 'http://web:8080/a?q=1', 'the request\'s own scheme, host, port and path');
  assert.equal(redirectLocation(redirect({ scheme: 'https' }), prefix('/'), '/a', '', 'web:8080'), 'https://web/a', 'a new scheme: its well-known port');
  assert.equal(redirectLocation(redirect({ hostname: 'new.example', port: 8443, path: { type: 'ReplacePrefixMatch', value: '/v2' } }), prefix('/v1'), '/v1/items', '', 'web'), 'http://new.example:8443/v2/items');
  assert.equal(redirectLocation(redirect({ port: 80 }), prefix('/'), '/', '', '[fd00::1]:8080'), 'http://[fd00::1]/', 'IPv6 host, port 80 not written');
});

test('answer header changes on the engine: removed names, then added lines, the same result as applying the changes one by one', () => {
  const changes = [
    { set: [['X-Mesh', 'one'] as [string, string]], add: [['x-trace', 'a'] as [string, string]], remove: ['server'] },
    { set: [['x-trace', 'b'] as [string, string]], add: [['Set-Cookie', 'k=v'] as [string, string]], remove: [] },
  ];
  const edits = answerEdits(changes);
  assert.deepEqual(new Set(edits.remove), new Set(['x-mesh', 'x-trace', 'server']));
  assert.equal(edits.add, 'X-Mesh: one\r\nx-trace: b\r\nSet-Cookie: k=v\r\n');
  // What the engine does (the upstream's headers minus the removed names, then the added lines)
  // against what node:http's path does (each change applied in turn).
  const upstream = ['Server', 'nginx', 'X-Trace', 'up', 'content-length', '5'];
  const engine = [...upstream.flatMap((v, i, a) => (i % 2 === 0 && !edits.remove.includes(v.toLowerCase()) ? [v, a[i + 1] ?? ''] : [])), ...edits.add.split('\r\n').filter(Boolean).flatMap((l) => l.split(': '))];
  let reference = upstream;
  for (const c of changes) reference = applyHeaderChanges(reference, c);
  const asSet = (raw: string[]): Set<string> => new Set(raw.flatMap((v, i) => (i % 2 === 0 ? [`${v.toLowerCase()}=${raw[i + 1] ?? ''}`] : [])));
  assert.deepEqual(asSet(engine), asSet(reference));
});

test('outlier detection on answers: a run of 5xx or gateway errors ejects, anything else clears the run; ejections end at the next sweep', () => {
  let now = 1_000_000;
  const lb = new LoadBalancer(() => now);
  const e = (n: number) => ({ workload: workload(`w${n}`, 'pool', n), port: 8080 });
  const eps = [e(1), e(2), e(3), e(4)];
  const policy = { ...DEFAULT_SERVICE_POLICY, outlier: { ...DEFAULT_SERVICE_POLICY.outlier, consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, baseEjectionMs: 1000, intervalMs: 400 } };
  const target = { key: 'shop/pool:80', endpoints: eps, policy } as unknown as Parameters<LoadBalancer['answered']>[0];
  const [a, b, c] = eps as [ReturnType<typeof e>, ReturnType<typeof e>, ReturnType<typeof e>];
  assert.deepEqual([500, 500].map((s) => lb.answered(target, a, s)), [false, false]);
  assert.equal(lb.answered(target, a, 404), false, 'a 4xx clears the run');
  assert.deepEqual([500, 501, 500].map((s) => lb.answered(target, a, s)), [false, false, true], 'three 5xx in a row');
  assert.ok(lb.isEjected(a));
  assert.deepEqual([503, 502].map((s) => lb.answered(target, b, s)), [false, true], 'two gateway errors in a row');
  assert.equal(lb.answered(target, c, 503), false);
  assert.equal(lb.answered(target, c, 500), false, 'a 500 breaks the gateway run');
  assert.equal(lb.answered(target, c, 500), false, 'the 5xx run is three, but two of four are out already (maxEjectionPercent 50)');
  assert.equal(lb.isEjected(c), false);
  // 1000 ms rounded up to the 400 ms sweep: out until 1200 ms.
  now += 1100;
  assert.ok(lb.isEjected(a));
  now += 100;
  assert.equal(lb.isEjected(a), false);
  assert.equal(lb.pick(target, undefined) !== undefined, true);
});

test('TrafficPolicy: fault and the HTTP fields of outlierDetection, with Istio\'s defaults', () => {
  const doc = (spec: Record<string, unknown>) => ({ apiVersion: 'networking.nodemesh.io/v1alpha1', kind: 'TrafficPolicy', metadata: { name: 'p', namespace: 'shop' }, spec: { targetRefs: [{ group: '', kind: 'Service', name: 'web' }], ...spec } });
  const p = parseTrafficPolicy(doc({ fault: { delay: { fixedDelay: '5s' }, abort: { percentage: { value: 12.5 }, httpStatus: 503 } }, outlierDetection: { consecutiveGatewayErrors: 2, interval: '10s' } })).policy;
  assert.deepEqual(p.fault, { delay: { percent: 100, ms: 5000 }, abort: { percent: 12.5, status: 503 } });
  assert.deepEqual([p.outlier.consecutive5xxErrors, p.outlier.consecutiveGatewayErrors, p.outlier.intervalMs], [5, 2, 10_000], 'an outlierDetection ejects on 5 5xx unless it says otherwise');
  assert.equal(parseTrafficPolicy(doc({})).policy.outlier.consecutive5xxErrors, 0, 'no outlierDetection: answers eject nothing');
  assert.throws(() => parseTrafficPolicy(doc({ fault: {} })), /injects nothing/);
  assert.throws(() => parseTrafficPolicy(doc({ fault: { abort: { httpStatus: 99 } } })), /httpStatus/);
  assert.throws(() => parseTrafficPolicy(doc({ fault: { delay: { fixedDelay: '2h' } } })), /fixedDelay/);
});

test('consistent hashing: a key keeps its endpoint; when another endpoint goes, only that one\'s keys move', () => {
  const lb = new LoadBalancer();
  const e = (n: number) => ({ workload: workload(`w${n}`, 'pool', n), port: 8080 });
  const policy = { ...DEFAULT_SERVICE_POLICY, hashOn: { header: 'x-user' } };
  const target = (eps: ReturnType<typeof e>[]) => ({ key: 'shop/pool:80', endpoints: eps, policy }) as unknown as Parameters<LoadBalancer['pick']>[0];
  const four = target([e(1), e(2), e(3), e(4)]);
  const keys = Array.from({ length: 400 }, (_, i) => `user-${i}`);
  const before = keys.map((k) => lb.pick(four, undefined, k)?.workload.name);
  assert.deepEqual(keys.map((k) => lb.pick(four, undefined, k)?.workload.name), before, 'the same key, the same endpoint');
  const share = new Map<string, number>();
  for (const w of before) share.set(w ?? '', (share.get(w ?? '') ?? 0) + 1);
  for (const [w, n] of share) assert.ok(n > 60 && n < 140, `${w} took ${n} of 400 keys`);
  const three = target([e(1), e(2), e(4)]);
  const after = keys.map((k) => lb.pick(three, undefined, k)?.workload.name);
  keys.forEach((k, i) => {
    if (before[i] !== 'w3') assert.equal(after[i], before[i], `${k} moved though its endpoint stayed`);
    else assert.notEqual(after[i], 'w3');
  });
  assert.ok(lb.pick(four, undefined, undefined) !== undefined, 'no key: the policy\'s balancing');
});

test('TrafficPolicy consistentHash: exactly one key source, not with a type', () => {
  const doc = (lb: Record<string, unknown>) => ({ apiVersion: 'networking.nodemesh.io/v1alpha1', kind: 'TrafficPolicy', metadata: { name: 'p', namespace: 'shop' }, spec: { targetRefs: [{ group: '', kind: 'Service', name: 'web' }], loadBalancer: lb } });
  assert.deepEqual(parseTrafficPolicy(doc({ consistentHash: { httpHeaderName: 'X-User' } })).policy.hashOn, { header: 'x-user' });
  assert.deepEqual(parseTrafficPolicy(doc({ consistentHash: { httpCookie: { name: 'session', ttl: '1h' } } })).policy.hashOn, { cookie: 'session', ttlMs: 3_600_000 });
  assert.deepEqual(parseTrafficPolicy(doc({ consistentHash: { useSourceIp: true } })).policy.hashOn, { sourceIp: true });
  assert.throws(() => parseTrafficPolicy(doc({ consistentHash: {} })), /exactly one/);
  assert.throws(() => parseTrafficPolicy(doc({ consistentHash: { httpHeaderName: 'a', useSourceIp: true } })), /exactly one/);
  assert.throws(() => parseTrafficPolicy(doc({ type: 'Random', consistentHash: { useSourceIp: true } })), /do not go together/);
});

test('TrafficPolicy on a route: its fault applies to the requests the route takes; it targets only routes and sets only fault', async () => {
  const doc = (spec: Record<string, unknown>, name = 'p') => ({ apiVersion: 'networking.nodemesh.io/v1alpha1', kind: 'TrafficPolicy', metadata: { name, namespace: 'shop' }, spec });
  const routeRef = { group: 'gateway.networking.k8s.io', kind: 'HTTPRoute', name: 'a' };
  const fault = { abort: { percentage: { value: 50 }, httpStatus: 503 } };
  const p = parseTrafficPolicy(doc({ targetRefs: [routeRef], fault }));
  assert.deepEqual([p.services, p.routes], [[], ['HTTPRoute/a']]);
  assert.throws(() => parseTrafficPolicy(doc({ targetRefs: [routeRef], fault, loadBalancer: { type: 'Random' } })), /spec\.loadBalancer applies to a Service's endpoints/);
  assert.throws(() => parseTrafficPolicy(doc({ targetRefs: [routeRef, { group: '', kind: 'Service', name: 'web' }], fault })), /Services or routes, not both/);
  assert.throws(() => parseTrafficPolicy(doc({ targetRefs: [{ ...routeRef, group: '' }], fault })), /spec\.targetRefs\[0\]\.group/);
  assert.throws(() => parseTrafficPolicy(doc({ targetRefs: [routeRef] })), /sets fault/);
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  try {
    await writeFile(join(dir, 'svc.yaml'), svc('web', '10.96.9.1') + svc('api', '10.96.9.2'));
    const store = new ConfigStore(new ConfigDirReader(dir), { onLoad: () => undefined });
    await store.load();
    const c = store.current();
    const a = parseRoute(routeDoc('a', [to('api', { matches: [{ path: { value: '/api' } }] })]));
    const b = parseRoute(routeDoc('b', [to('web')]));
    const loser = parseTrafficPolicy(doc({ targetRefs: [routeRef], fault: { delay: { fixedDelay: '1s' } } }, 'q'));
    const missing = parseTrafficPolicy(doc({ targetRefs: [{ ...routeRef, name: 'gone' }], fault }, 'r'));
    const snap = new MeshSnapshot(1, c.services, [workload('web-1', 'web', 1), workload('api-1', 'api', 2)], [p, loser, missing], [a, b]);
    const entries = snap.service({ family: 4, address: '10.96.9.1', port: 80 })?.http?.entries ?? [];
    assert.deepEqual(entries.map((e) => [e.route, e.fault?.abort?.percent]), [['HTTPRoute shop/a', 50], ['HTTPRoute shop/b', undefined]], 'route a\'s requests get the fault, route b\'s do not');
    assert.deepEqual(snap.warnings.map((w) => `${w.object}: ${w.message}`), ['TrafficPolicy shop/q: ignored for HTTPRoute shop/a: TrafficPolicy shop/p already applies to it', 'TrafficPolicy shop/r: targets HTTPRoute shop/gone, which does not exist']);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('protocol sniffing: an HTTP/1.x request line, the HTTP/2 preface, or opaque; undecided while a prefix could still be either', () => {
  const c = (text: string, final = false): string => classify(Buffer.from(text, 'latin1'), final);
  assert.equal(c('GET /x HTTP/1.1\r\nhost: a\r\n'), 'http1');
  assert.equal(c('POST /api?q=1 HTTP/1.0\n'), 'http1');
  assert.equal(c('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), 'http2');
  assert.equal(c('PRI * HTTP/2'), 'more', 'a prefix of the preface waits for more');
  assert.equal(c('GET /x HT'), 'more');
  assert.equal(c('GET /x HT', true), 'opaque', 'at the deadline (or the end) what is not HTTP yet is not');
  assert.equal(c('', true), 'opaque', 'nothing came: a server-first protocol');
  assert.equal(c('\x16\x03\x01\x02\x00'), 'opaque', 'a TLS ClientHello');
  assert.equal(c('GET /x SPDY/3\r\n'), 'opaque');
  assert.equal(c('*1\r\n$4\r\nPING\r\n'), 'opaque', 'RESP (Redis)');
});

test('routes on an HTTP/2 parent take everything an HTTP/1.1 one does: retries, per-try timeouts, mirrors', () => {
  const services = new Map([['shop/cart', { ports: [{ port: 80, name: 'grpc', appProtocol: '' }] }], ['shop/v1', { ports: [{ port: 80, name: 'grpc', appProtocol: '' }] }]]);
  const route = (rule: Record<string, unknown>, kind = 'HTTPRoute') =>
    parseRoute({ apiVersion: 'gateway.networking.k8s.io/v1', kind, metadata: { namespace: 'shop', name: 'r' }, spec: { parentRefs: [{ kind: 'Service', name: 'cart', port: 80 }], rules: [{ backendRefs: [{ name: 'v1', port: 80 }], ...rule }] } });
  assert.equal(checkRouteRefs(route({ matches: [{ path: { value: '/a' } }] }), services), undefined, 'matches and splits apply');
  assert.equal(checkRouteRefs(route({ retry: { attempts: 2, codes: [503] } }), services), undefined, 'retries apply to streams');
  assert.equal(checkRouteRefs(route({ timeouts: { backendRequest: '1s' } }), services), undefined, 'per-try timeouts apply to streams');
  assert.equal(checkRouteRefs(route({ filters: [{ type: 'RequestMirror', requestMirror: { backendRef: { name: 'v1', port: 80 } } }] }, 'GRPCRoute'), services), undefined, 'mirrors apply to streams');
  // A mirror to a Service that does not exist is still refused, the field named.
  assert.equal(checkRouteRefs(route({ filters: [{ type: 'RequestMirror', requestMirror: { backendRef: { name: 'nowhere', port: 80 } } }] }, 'GRPCRoute'), services)?.field, 'spec.rules[0].filters[0].requestMirror.backendRef.name');
});

test('a policy\'s maxRequestsPerConnection on an HTTP/2 port applies (sessions recycled): no warning', () => {
  const cart = parseService({ apiVersion: 'v1', kind: 'Service', metadata: { name: 'cart', namespace: 'shop' }, spec: { clusterIP: '10.96.9.9', selector: { app: 'cart' }, ports: [{ name: 'grpc', port: 80, targetPort: 8080 }] } });
  const policy = parseTrafficPolicy({ apiVersion: 'networking.nodemesh.io/v1alpha1', kind: 'TrafficPolicy', metadata: { name: 'p', namespace: 'shop' }, spec: { targetRefs: [{ group: '', kind: 'Service', name: 'cart' }], connectionPool: { http: { maxRequestsPerConnection: 5 } } } });
  const snap = new MeshSnapshot(1, [cart], [], [policy], []);
  assert.deepEqual(snap.warnings, []);
  assert.equal(snap.targets().find((t) => t.key === 'shop/cart:80')?.policy.maxRequestsPerConnection, 5);
});

test('x-request-id made by the proxy: version 4 UUIDs, flat strings, none repeated across refills of the random pool', () => {
  const seen = new Set<string>();
  // 256 ids per refill: this crosses several.
  for (let i = 0; i < 2000; i++) {
    const id = newRequestId();
    assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    seen.add(id);
  }
  assert.equal(seen.size, 2000);
  // Each hex digit position takes every value over many ids (not a constant, not a counter's few).
  const digits = new Set([...seen].map((id) => id[0]));
  assert.equal(digits.size, 16);
});

test('engine routes: rules the engine reads and acts on get backends, others are left to JS (a regex stops the reading), targets with their pools; none for an access-logged namespace; ejections left out for as long as they last', async () => {
  const names = ['web', 'v1', 'v2', 'slow', 'hashed'];
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  try {
    await writeFile(join(dir, 'svc.yaml'), names.map((n, i) => svc(n, `10.96.8.${i + 1}`)).join(''));
    const store = new ConfigStore(new ConfigDirReader(dir), { onLoad: () => undefined });
    await store.load();
    const c = store.current();
    const route = parseRoute(
      routeDoc('r', [
        to('slow', { matches: [{ path: { type: 'Exact', value: '/slow' } }], timeouts: { request: '1s' } }),
        to('hashed', { matches: [{ path: { value: '/hashed' } }] }),
        to('v2', { matches: [{ path: { value: '/api' }, method: 'POST', headers: [{ name: 'X-Version', value: 'v2' }] }] }),
        { matches: [{ path: { value: '/' } }], backendRefs: [{ name: 'v1', port: 80, weight: 90 }, { name: 'v2', port: 80, weight: 10 }] },
      ]),
    );
    const hashing = parseTrafficPolicy({ apiVersion: 'networking.nodemesh.io/v1alpha1', kind: 'TrafficPolicy', metadata: { name: 'h', namespace: 'shop' }, spec: { targetRefs: [{ group: '', kind: 'Service', name: 'hashed' }], loadBalancer: { consistentHash: { httpHeaderName: 'x-user' } } } });
    const workloads = [workload('web-1', 'web', 1), workload('v1-a', 'v1', 2), workload('v1-b', 'v1', 3), workload('v2-a', 'v2', 4), workload('slow-1', 'slow', 5), workload('hashed-1', 'hashed', 6)];
    const recycled = parseTrafficPolicy({ apiVersion: 'networking.nodemesh.io/v1alpha1', kind: 'TrafficPolicy', metadata: { name: 'r', namespace: 'shop' }, spec: { targetRefs: [{ group: '', kind: 'Service', name: 'v2' }], connectionPool: { http: { maxRequestsPerConnection: 5 } } } });
    const snap = new MeshSnapshot(1, c.services, workloads, [hashing, recycled], [route]);
    const web = snap.service({ family: 4, address: '10.96.8.1', port: 80 });
    assert.ok(web?.http);
    let now = 1_000_000;
    const lb = new LoadBalancer(() => now);
    let logged = false;
    const plans = new EngineRoutePlans(lb, (ns) => logged && ns === 'shop', 'http2', () => now);
    const source = { namespace: 'shop', name: 'client', uid: 'u-client', ip4: '10.200.0.9', ip6: '' };
    const here = new Set<string>();
    const askedFor = new Set<string>();
    const conn = {
      parent: web,
      current: () => web,
      source,
      servesHere: (e: { workload: { uid: string } }, protocol: string) => {
        askedFor.add(protocol);
        return here.has(e.workload.uid);
      },
    } as unknown as Parameters<EngineRoutePlans['for']>[0];
    const plan = plans.for(conn);
    assert.ok(plan);
    assert.equal(plans.for(conn), plan, 'one plan per source pod and port until reset()');
    assert.equal(plan.ttlMs, -1);
    assert.deepEqual(
      plan.rules.map((r) => [r.match?.exact, r.match?.path, r.match?.method, r.match?.headers, r.backends]),
      [
        [true, '/slow', undefined, [], undefined],
        [false, '/hashed', undefined, [], undefined],
        [false, '/api', 'POST', [['x-version', 'v2']], [[0, 1]]],
        [false, '/', undefined, [], [[1, 90], [0, 10]]],
      ],
      'a timeout and consistent hashing are JS\'s; a method and an exact header are read; a split keeps its weights',
    );
    assert.deepEqual(plan.targets.map((t) => [t.key, t.pools, t.random]), [
      ['shop/v2:80', ['u-client|shop/v2:80|u-v2-a|8080'], false],
      ['shop/v1:80', ['u-client|shop/v1:80|u-v1-a|8080', 'u-client|shop/v1:80|u-v1-b|8080'], false],
    ]);
    assert.deepEqual(plan.endpoints.map((eps) => eps.map((e) => e.workload.name)), [['v2-a'], ['v1-a', 'v1-b']]);
    assert.deepEqual([...askedFor], ['http2'], "whether this node's HTTP/2 side serves an endpoint in the same pass");
    // The HTTP/1.1 engine's plans ask of that side, and carry each backend's maxRequestsPerConnection.
    askedFor.clear();
    const plans1 = new EngineRoutePlans(lb, () => false, 'http1', () => now);
    assert.deepEqual(plans1.for(conn)?.targets.map((t) => [t.key, t.maxRequests]), [['shop/v2:80', 5], ['shop/v1:80', 0]]);
    assert.deepEqual([...askedFor], ['http1']);

    // An endpoint ejected: left out, the plan lasting as long as the ejection; made again after reset().
    const v1 = plan.services[1];
    assert.ok(v1);
    const ejectable = { ...v1, policy: { ...v1.policy, outlier: { ...v1.policy.outlier, consecutive5xxErrors: 1 } } };
    assert.ok(lb.answered(ejectable, v1.endpoints[0] ?? assert.fail(), 500));
    plans.reset();
    const ejected = plans.for(conn);
    assert.ok(ejected && ejected.id !== plan.id);
    assert.deepEqual(ejected.targets[1]?.pools, ['u-client|shop/v1:80|u-v1-b|8080']);
    assert.ok(ejected.ttlMs > 0 && ejected.ttlMs <= 30_000, `ttl ${ejected.ttlMs}`);
    now += ejected.ttlMs;
    const back = plans.for(conn);
    assert.ok(back && back.id !== ejected.id, 'made again once the ejection ended');
    assert.equal(back.targets[1]?.pools.length, 2);

    // A backend with an endpoint this node serves in the same pass is JS's; a regex stops the reading.
    here.add('u-v2-a');
    plans.reset();
    assert.equal(plans.for(conn), undefined, 'v2 is in both rules the engine could act on: no plan');
    here.clear();
    const regex = parseRoute(routeDoc('r', [to('v2', { matches: [{ path: { type: 'RegularExpression', value: '/v[0-9]' } }] }), to('v1')]));
    const regexWeb = new MeshSnapshot(2, c.services, workloads, [], [regex]).service({ family: 4, address: '10.96.8.1', port: 80 });
    const regexConn = { ...conn, current: () => regexWeb } as unknown as Parameters<EngineRoutePlans['for']>[0];
    assert.equal(plans.for(regexConn), undefined, 'nothing before the regex the engine could act on: no plan');

    // An access-logged namespace: every request is JS's (its log line).
    logged = true;
    plans.reset();
    assert.equal(plans.for(conn), undefined);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
