/**
 * L7 on the client side (issue 14): a Service port that speaks HTTP and has an HTTPRoute is
 * terminated by the source pod's node proxy and routed per request. Real node:http servers in
 * pods, a real keep-alive client in another: a 90/10 split over ONE connection, a header match
 * that always wins, 404 for what no rule matches, large, chunked and trailer-carrying bodies
 * intact; on one node (same-node delivery) and across two nodes (HBONE, mutual TLS).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { checkChannels, metricValue, serviceYaml, startAgent, startControlPlane, type AgentProcess } from '../support/agent.js';
import type { HttpPlan, HttpRun } from '../support/http-client.js';
import { createSandbox, waitFor, type Sandbox } from '../support/sandbox.js';
import type { PodRecord } from '../../src/runtime/store.js';

const APP = fileURLToPath(new URL('../support/http-app.js', import.meta.url));
const CLIENT = fileURLToPath(new URL('../support/http-client.js', import.meta.url));
const SVC = { web: '10.96.0.71', v1: '10.96.0.72', v2: '10.96.0.73', sticky: '10.96.0.81', cookie: '10.96.0.82', raw: '10.96.0.83', rawEcho: '10.96.0.84' };

/** `web` (port 80, named http): /api by header to v2, else split 90/10; /echo and /big to v1; nothing else. */
function meshConfig(): Record<string, string> {
  return {
    'svc.yaml': [
      serviceYaml('web', [SVC.web], { app: 'web' }, 80, 8080, 'http'),
      serviceYaml('reviews-v1', [SVC.v1], { app: 'reviews', version: 'v1' }, 80, 8080, 'http'),
      serviceYaml('reviews-v2', [SVC.v2], { app: 'reviews', version: 'v2' }, 80, 8080, 'http'),
      serviceYaml('sticky', [SVC.sticky], { app: 'reviews' }, 80, 8080, 'http'),
      serviceYaml('sticky-cookie', [SVC.cookie], { app: 'reviews' }, 80, 8080, 'http'),
      // A port that says no protocol: sniffed.
      serviceYaml('raw', [SVC.raw], { app: 'reviews', version: 'v1' }, 80, 8080, 'web'),
      // The same, to an echo server: what is not HTTP is relayed, its first bytes included.
      serviceYaml('raw-echo', [SVC.rawEcho], { app: 'echo' }, 80, 9000, 'web'),
    ].join('---\n'),
    'affinity.yaml': [
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: sticky, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: sticky}]\n  loadBalancer: {consistentHash: {httpHeaderName: x-user}}\n',
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: sticky-cookie, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: sticky-cookie}]\n  loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 60s}}}\n',
    ].join('---\n'),
    'route.yaml': [
      'apiVersion: gateway.networking.k8s.io/v1',
      'kind: HTTPRoute',
      'metadata: {name: web, namespace: default}',
      'spec:',
      '  parentRefs: [{group: "", kind: Service, name: web, port: 80}]',
      '  rules:',
      // Gateway API orders by path first: the header rule names the same prefix to win over the split.
      '  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-version, value: v2}]}]',
      '    backendRefs: [{name: reviews-v2, port: 80}]',
      '  - matches: [{path: {type: PathPrefix, value: /api}}]',
      '    backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]',
      '  - matches: [{path: {type: PathPrefix, value: /echo}}, {path: {type: PathPrefix, value: /big}}]',
      '    backendRefs: [{name: reviews-v1, port: 80}]',
      '  - matches: [{path: {value: /headers}}]',
      '    filters:',
      '    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-env, value: prod}], remove: [x-secret]}}',
      '    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-mesh, value: nodemesh}]}}',
      '    backendRefs: [{name: reviews-v1, port: 80}]',
      '  - matches: [{path: {value: /old}}]',
      '    filters: [{type: URLRewrite, urlRewrite: {hostname: reviews.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /api}}}]',
      '    backendRefs: [{name: reviews-v1, port: 80}]',
      '  - matches: [{path: {value: /moved}}]',
      '    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /api}, statusCode: 301}}]',
      '  - matches: [{path: {value: /mirrored}}]',
      '    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: reviews-v2, port: 80}}}]',
      '    backendRefs: [{name: reviews-v1, port: 80}]',
      '---',
      'apiVersion: gateway.networking.k8s.io/v1',
      'kind: HTTPRoute',
      'metadata: {name: raw, namespace: default}',
      'spec:',
      '  parentRefs: [{group: "", kind: Service, name: raw, port: 80}]',
      '  rules:',
      '  - matches: [{headers: [{name: x-version, value: v2}]}]',
      '    backendRefs: [{name: reviews-v2, port: 80}]',
      '  - backendRefs: [{name: reviews-v1, port: 80}]',
      '---',
      'apiVersion: gateway.networking.k8s.io/v1',
      'kind: HTTPRoute',
      'metadata: {name: raw-echo, namespace: default}',
      'spec:',
      '  parentRefs: [{group: "", kind: Service, name: raw-echo, port: 80}]',
      '  rules: [{matches: [{headers: [{name: x-version, value: v2}]}], backendRefs: [{name: reviews-v2, port: 80}]}, {backendRefs: [{name: raw-echo, port: 80}]}]',
      '',
    ].join('\n'),
  };
}

async function http(sb: Sandbox, client: PodRecord, plan: Omit<HttpPlan, 'host' | 'port'>, agent: AgentProcess, host = SVC.web): Promise<HttpRun> {
  const out = await sb.execIn(client, [process.execPath, CLIENT, JSON.stringify({ host, port: 80, ...plan })], 30_000).catch((e: Error) => {
    throw new Error(`${e.message}\nthe source node's log:\n${agent.log().split('\n').slice(-40).join('\n')}`);
  });
  return JSON.parse(out.trim().split('\n').pop() ?? '{}') as HttpRun;
}

const count = (run: HttpRun): Record<string, number> => {
  const by: Record<string, number> = {};
  for (const a of run.answers) by[`${a.status} ${a.servedBy}`] = (by[`${a.status} ${a.servedBy}`] ?? 0) + 1;
  return by;
};

/** What both layouts must show; `where` names the layout in messages. */
async function checkRouting(sb: Sandbox, client: PodRecord, source: AgentProcess, where: string): Promise<void> {
  // 1000 requests on one keep-alive connection: 90/10 by request, within five standard deviations
  // of the binomial (sd 9.5 for 1000 at 0.1), whatever the balancer's exact sequence.
  const split = await http(sb, client, { requests: [{ path: '/api/items' }], repeat: 1000 }, source);
  assert.equal(split.connections, 1, `${where}: one keep-alive connection carried every request`);
  const c = count(split);
  const v2 = c['200 reviews-v2'] ?? 0;
  assert.equal((c['200 reviews-v1'] ?? 0) + v2, 1000, `${where}: every request answered 200 by a backend: ${JSON.stringify(c)}`);
  assert.ok(v2 >= 53 && v2 <= 147, `${where}: v2 took ${v2} of 1000 (want 100 +- 47)`);
  // The header match wins over the path rule, every time.
  const pinned = await http(sb, client, { requests: [{ path: '/api/items', headers: { 'x-version': 'v2' } }], repeat: 100 }, source);
  assert.deepEqual(count(pinned), { '200 reviews-v2': 100 }, `${where}: x-version: v2 always goes to v2`);
  // No rule matches: 404 from the proxy, and the connection goes on.
  const mixed = await http(sb, client, { requests: [{ path: '/nowhere' }, { path: '/api/x' }] }, source);
  assert.equal(mixed.answers[0]?.status, 404, `${where}: no rule matched`);
  assert.equal(mixed.answers[1]?.status, 200, `${where}: the next request on the connection is served`);
  assert.equal(mixed.connections, 1);
  // Bodies: 1 MiB with a length, 3 MiB chunked, the answer's trailers; 5 MB down.

  const bodies = await http(sb, client, { requests: [{ path: '/echo', body: 1 << 20 }, { path: '/echo', body: 3 << 20, chunked: true }, { path: '/big/5000000' }] }, source);
  for (const [i, a] of bodies.answers.slice(0, 2).entries()) {
    assert.equal(a.status, 200, `${where}: echo ${i}: ${a.error ?? ''}`);
    assert.equal(a.sha256, a.sent, `${where}: echo ${i}: the body came back intact`);
    assert.equal(a.trailers['x-body-sha256'], a.sent, `${where}: echo ${i}: the trailer came through`);
    assert.equal(a.trailers['x-body-bytes'], String(i === 0 ? 1 << 20 : 3 << 20));
  }
  assert.equal(bodies.answers[2]?.bytes, 5_000_000, `${where}: 5 MB down`);
  // A port that says no protocol, with a route: bytes that are not HTTP go to the Service's own
  // endpoint (on the kernel relay or the HBONE engine), the first ones the sniffing read included.
  const opaque = await sb.dialFrom(client, SVC.rawEcho, 80, { bytes: 200_000, marker: '\x16\x03\x01 not http' });
  assert.ok(opaque.ok && opaque.intact && opaque.received === opaque.sent, `${where}: not HTTP: echoed whole, first bytes first: ${JSON.stringify(opaque)}`);
  // Requests are counted with Istio's names and labels, by the source's proxy.
  const metrics = await source.metrics();
  const requests = (labels: Record<string, string>): number => metricValue(metrics, 'istio_requests_total', { reporter: 'source', destination_service_name: 'reviews-v2', request_protocol: 'http', ...labels });
  assert.ok(requests({ response_code: '200', destination_version: 'v2' }) >= v2 + 100, `${where}: v2's requests counted`);
  assert.equal(metricValue(metrics, 'istio_requests_total', { reporter: 'source', response_code: '404', response_flags: 'NR' }), 1, `${where}: the unrouted request counted with flag NR`);
  // The split's and the header match's requests were routed by the source's engine itself (each connection's first is JS's).
  const routed = metricValue(metrics, 'nodemesh_http_engine_routed_requests_total');
  assert.ok(routed >= 1050, `${where}: the engine routed ${routed} of the 1100 split and pinned requests`);
  // All of it on the addon's HTTP/1.1 engine: no connection so far needed node:http.
  assert.ok(metricValue(metrics, 'nodemesh_http1_connections_total', { side: 'client', engine: 'addon' }) >= 4, `${where}: served by the addon's engine`);
  assert.equal(metricValue(metrics, 'nodemesh_http1_connections_total', { side: 'client', engine: 'node' }), 0, `${where}: none handed to node:http`);
}

test('L7 on one node: per-request split over one keep-alive connection, header match, 404, bodies and trailers, filters (headers, rewrite, redirect, mirror), upgrades, session affinity; malformed requests refused before routing', async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC)) await sb.blackhole(ip);
  const agent = await startAgent(sb, meshConfig());
  await sb.serverPod('reviews-v1', [process.execPath, APP, 'reviews-v1', '8080'], 8080, ['app=reviews', 'version=v1']);
  await sb.serverPod('reviews-v2', [process.execPath, APP, 'reviews-v2', '8080'], 8080, ['app=reviews', 'version=v2']);
  await sb.echoPod('echo', 9000, ['app=echo']);
  const client = await sb.idlePod('client');
  await agent.waitForPods((p) => p.length === 4 && p.every((x) => x.verified), 'four pods verified');
  await checkRouting(sb, client, agent, 'one node');
  // Filters: header changes both ways, a rewrite, a redirect, a mirror.
  const f = await http(sb, client, { requests: [{ path: '/headers/x', headers: { 'x-secret': 'hunter2', 'x-env': 'dev' } }, { path: '/old/items?q=1' }, { path: '/moved/items?q=1' }, { path: '/mirrored/a' }] }, agent);
  const seen = (i: number): { url: string; headers: Record<string, string> } => JSON.parse(f.answers[i]?.text ?? '{}') as { url: string; headers: Record<string, string> };
  assert.equal(seen(0).headers['x-env'], 'prod', 'set replaced the client\'s value');
  assert.equal(seen(0).headers['x-secret'], undefined, 'removed before it left the node');
  assert.equal(f.answers[0]?.headers['x-mesh'], 'nodemesh', 'added to the answer');
  assert.deepEqual([seen(1).url, seen(1).headers['host']], ['/api/items?q=1', 'reviews.internal'], 'prefix and host rewritten');
  assert.deepEqual([f.answers[2]?.status, f.answers[2]?.headers['location']], [301, `http://${SVC.web}/api/items?q=1`], 'redirected by the proxy');
  assert.equal(f.answers[3]?.servedBy, 'reviews-v1', 'the mirror does not answer');
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_http_mirrored_total', { service: 'default/reviews-v2:80', result: 'sent' }) === 1, 5000, 'the copy answered by v2');
  // With a body (either framing), the copy carries it; over 64 KiB it is not copied.
  const bodies = await http(sb, client, { requests: [{ path: '/mirrored/b', body: 5000 }, { path: '/mirrored/c', body: 7000, chunked: true }, { path: '/mirrored/d', body: 100_000 }] }, agent);
  assert.deepEqual(bodies.answers.map((a) => a.servedBy), ['reviews-v1', 'reviews-v1', 'reviews-v1']);
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_http_mirrored_total', { service: 'default/reviews-v2:80', result: 'sent' }) === 3, 5000, 'the copies with bodies answered by v2');
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_http_mirrored_total', { service: 'default/reviews-v2:80', result: 'body_too_large' }), 1);
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_http1_connections_total', { side: 'client', engine: 'node' }), 0, 'mirrored on the engine, not handed to node:http');
  // Upgrades (WebSocket's mechanism): routed, then joined byte for byte in the engine; refused ones passed on.
  const upgraded = await http(sb, client, { requests: [], upgrades: [{ path: '/api/ws', send: 'hello through the mesh' }, { path: '/api/ws', send: 'x', protocol: 'other' }, { path: '/nowhere', send: 'x' }] }, agent);
  assert.deepEqual(upgraded.upgrades, [
    { status: 'HTTP/1.1 101 Switching Protocols', echoed: 'hello through the mesh' },
    { status: 'HTTP/1.1 426 Upgrade Required', echoed: '' },
    { status: 'HTTP/1.1 404 Not Found', echoed: 'no route matched the request\n' },
  ]);
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_http1_connections_total', { engine: 'node' }), 0, 'upgraded on the engine, not handed to node:http');
  // Session affinity (consistentHash, no route needed): by header, and by a cookie the proxy sets.
  // Twenty users, three rounds on one connection: each user always on one endpoint, and the users
  // on both (all twenty on one would happen once in 2^19 runs).
  const names = Array.from({ length: 20 }, (_, i) => `user-${i}`);
  const rounds = await http(sb, client, { requests: names.map((u) => ({ path: '/x', headers: { 'x-user': u } })), repeat: 3 }, agent, SVC.sticky);
  const endpointOf = names.map((_, i) => new Set([0, 1, 2].map((round) => rounds.answers[round * names.length + i]?.servedBy)));
  for (const [i, seen] of endpointOf.entries()) assert.equal(seen.size, 1, `${names[i] ?? ''} went to ${[...seen].join(' and ')}`);
  assert.equal(new Set(endpointOf.map((seen) => [...seen][0])).size, 2, 'the users spread over both endpoints');
  const first = (await http(sb, client, { requests: [{ path: '/x' }] }, agent, SVC.cookie)).answers[0];
  const setCookie = String(first?.headers['set-cookie'] ?? '');
  assert.match(setCookie, /^session=[0-9a-f-]{36}; Path=\/; Max-Age=60; HttpOnly$/);
  const withCookie = await http(sb, client, { requests: [{ path: '/x', headers: { cookie: `theme=dark; ${setCookie.split(';')[0] ?? ''}` } }], repeat: 20 }, agent, SVC.cookie);
  assert.deepEqual(count(withCookie), { [`200 ${first?.servedBy ?? ''}`]: 20 }, 'the cookie keeps to the endpoint of the first answer');
  // A route changed while a keep-alive connection is open: its next requests follow the new one.
  const pausing = http(sb, client, { requests: [{ path: '/api/live' }], repeat: 20, pause: { after: 10, ms: 4000 } }, agent);
  await new Promise((resolve) => setTimeout(resolve, 500));
  const config = meshConfig();
  await agent.writeConfig('route.yaml', (config['route.yaml'] ?? '').replace('{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}', '{name: reviews-v2, port: 80}'));
  await waitFor(async () => (await agent.config()).services.find((s) => s.service === 'default/web:80')?.http?.some((e) => e.match.path === 'PathPrefix /api' && e.backends.length === 1) === true, 3000, 'the new route applied');
  const live = await pausing;
  assert.equal(live.connections, 1);
  assert.deepEqual(count({ ...live, answers: live.answers.slice(10) }), { '200 reviews-v2': 10 }, 'after the change, every request to v2 on the same connection');
  await agent.writeConfig('route.yaml', config['route.yaml'] ?? '');
  await waitFor(async () => (await agent.config()).services.find((s) => s.service === 'default/web:80')?.http?.some((e) => e.match.path === 'PathPrefix /api' && e.backends.length === 2) === true, 3000, 'the route restored');
  // Requests the parser refuses never go upstream, and the proxy goes on serving.
  const before = metricValue(await agent.metrics(), 'istio_requests_total');
  const bad = await http(sb, client, {
    requests: [],
    raw: [
      'POST /api/x HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
      'GET /api/x HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n',
      'GET /api/x HTTP/1.1\r\nHost: web\r\nX-A: a\r\n folded\r\n\r\n',
      `GET /api/x HTTP/1.1\r\nHost: web\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`,
      'GET /api/x HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab',
    ],
  }, agent);
  assert.deepEqual(bad.raw, ['HTTP/1.1 400 Bad Request', 'HTTP/1.1 400 Bad Request', 'HTTP/1.1 400 Bad Request', 'HTTP/1.1 431 Request Header Fields Too Large', 'HTTP/1.1 400 Bad Request']);
  const after = await agent.metrics();
  assert.equal(metricValue(after, 'istio_requests_total'), before, 'none of them was routed');
  assert.equal(metricValue(after, 'nodemesh_http_refused_total'), 5);
  assert.equal((await http(sb, client, { requests: [{ path: '/api/x' }] }, agent)).answers[0]?.status, 200, 'the proxy serves on');
  // A port that says no protocol: the first bytes decide. HTTP is routed per request (the header
  // match wins on one connection); anything else goes to the Service's own endpoints as bytes.
  const sniffed = await http(sb, client, { requests: [{ path: '/a', headers: { 'x-version': 'v2' } }, { path: '/b' }], repeat: 5 }, agent, SVC.raw);
  assert.deepEqual(count(sniffed), { '200 reviews-v2': 5, '200 reviews-v1': 5 }, 'sniffed as HTTP/1.1 and routed per request');
  assert.equal(sniffed.connections, 1);
  const notHttp = await sb.dialFrom(client, SVC.raw, 80, { bytes: 64, marker: '\x16\x03\x01 not http' });
  assert.ok(notHttp.received > 0, 'not HTTP: relayed to the Service\'s own endpoint (its answer came back)');
  const sniffs = await agent.metrics();
  // Opaque: this one and the echo's in checkRouting.
  assert.deepEqual([metricValue(sniffs, 'nodemesh_protocol_sniffed_total', { protocol: 'http1' }), metricValue(sniffs, 'nodemesh_protocol_sniffed_total', { protocol: 'opaque' })], [1, 2]);
  // Same-node delivery: the requests reached the backends straight from the client's side.
  assert.ok(metricValue(await agent.metrics(), 'nodemesh_proxied_connections_total', { path: 'same_node' }) >= 1);
});

// Both HBONE engines: the addon's relays the tunnel stream to a socket pair on its thread, node:http2's through JS streams.
for (const hbone of ['native', 'node'] as const) test(`L7 across two nodes (${hbone} HBONE engine): the v2 share crosses in HBONE (mutual TLS) from the client node`, async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC)) await sb.blackhole(ip);
  const nodeB = `${sb.config.node}-b`;
  const cp = await startControlPlane(sb, meshConfig());
  const agentA = await startAgent(sb, { controlPlane: cp.address }, { args: ['--hbone', hbone] });
  const agentB = await startAgent(sb, { controlPlane: cp.address }, { node: nodeB, args: ['--hbone', hbone] });
  await sb.serverPod('reviews-v1', [process.execPath, APP, 'reviews-v1', '8080'], 8080, ['app=reviews', 'version=v1']);
  await sb.serverPod('reviews-v2', [process.execPath, APP, 'reviews-v2', '8080'], 8080, ['app=reviews', 'version=v2'], { node: nodeB });
  await sb.echoPod('echo', 9000, ['app=echo'], { node: nodeB });
  const client = await sb.idlePod('client');
  await agentA.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), "node A's pods verified");
  await agentB.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), "node B's pods verified");
  const endpoints = async (service: string): Promise<number> => (await agentA.config()).services.find((s) => s.service === service)?.endpoints.length ?? 0;
  await waitFor(async () => (await endpoints('default/reviews-v2:80')) === 1, 10_000, "node B's endpoint known on node A");
  await waitFor(async () => (await endpoints('default/raw-echo:80')) === 1, 10_000, "node B's echo endpoint known on node A");
  await checkRouting(sb, client, agentA, 'two nodes');
  // v2's requests arrived on node B through tunnels, mutual TLS, with the client's identity.
  const b = await agentB.metrics();
  assert.ok(metricValue(b, 'istio_tcp_connections_opened_total', { reporter: 'destination', connection_security_policy: 'mutual_tls', destination_version: 'v2', source_principal: 'spiffe://cluster.local/ns/default/sa/default' }) >= 1, 'node B took tunnelled connections from the client');
  assert.ok(metricValue(await agentA.metrics(), 'nodemesh_proxied_connections_total', { path: 'hbone' }) >= 1);
  // A client that leaves in the middle of a 50 MB answer from node B: its upstream (a channel
  // with the addon's engines) is reset, and nothing is left of it (checkChannels below).
  const left = await http(sb, client, { requests: [], raw: ['GET /big/50000000 HTTP/1.1\r\nHost: raw\r\nx-version: v2\r\n\r\n'] }, agentA, SVC.raw);
  assert.deepEqual(left.raw, ['HTTP/1.1 200 OK']);
  // With the addon's HBONE engine, node A's upstream connections in tunnels are channels to the
  // HTTP/1.1 engine (no socket pair); once idle they close (4 s), none left open or unclaimed.
  await checkChannels(agentA, hbone === 'native' ? 1 : 0, [agentA, agentB], 15_000);
});

const SVC_API = { api: '10.96.0.74', flaky: '10.96.0.75', strict: '10.96.0.76', faulty: '10.96.0.77', slowed: '10.96.0.78', pool: '10.96.0.79', narrow: '10.96.0.80' };

/** `api` routes to `flaky` (one pod) with retries, timeouts, and to `flaky-strict` whose retry budget is 0. */
function retryConfig(): Record<string, string> {
  return {
    'svc.yaml': [
      serviceYaml('api', [SVC_API.api], { app: 'api' }, 80, 8080, 'http'),
      serviceYaml('flaky', [SVC_API.flaky], { app: 'flaky' }, 80, 8080, 'http'),
      serviceYaml('flaky-strict', [SVC_API.strict], { app: 'flaky' }, 80, 8080, 'http'),
      serviceYaml('faulty', [SVC_API.faulty], { app: 'flaky' }, 80, 8080, 'http'),
      serviceYaml('slowed', [SVC_API.slowed], { app: 'flaky' }, 80, 8080, 'http'),
      serviceYaml('pool', [SVC_API.pool], { app: 'pool' }, 80, 8080, 'http'),
      serviceYaml('narrow', [SVC_API.narrow], { app: 'flaky' }, 80, 8080, 'http'),
    ].join('---\n'),
    // Access log lines for the client's namespace only.
    'mesh.yaml': 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {accessLog: "default"}\n',
    'policy.yaml': [
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: no-retries, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: flaky-strict}]\n  retryBudget: {percent: 0, minRetryConcurrency: 0}\n',
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: faults, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: faulty}]\n  fault: {abort: {percentage: {value: 50}, httpStatus: 418}}\n',
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: delays, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: slowed}]\n  fault: {delay: {fixedDelay: 200ms}}\n',
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: ejecting, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: pool}]\n  outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 1s, maxEjectionPercent: 50}\n',
      // A route makes the port go through the HTTP path (the pool limits need no more).
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: route-faults, namespace: default}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: api-faulty}]\n  fault: {abort: {httpStatus: 429}}\n',
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: narrow, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: narrow}]\n  connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 2}}\n',
    ].join('---\n'),
    'route.yaml': [
      'apiVersion: gateway.networking.k8s.io/v1',
      'kind: HTTPRoute',
      'metadata: {name: api, namespace: default}',
      'spec:',
      '  parentRefs: [{kind: Service, name: api, port: 80}]',
      '  rules:',
      '  - matches: [{path: {value: /retry}}]',
      '    backendRefs: [{name: flaky, port: 80}]',
      '    retry: {attempts: 2, codes: [503], backoff: 10ms}',
      '  - matches: [{path: {value: /no-retry}}]',
      '    backendRefs: [{name: flaky, port: 80}]',
      '  - matches: [{path: {value: /timeout}}]',
      '    backendRefs: [{name: flaky, port: 80}]',
      '    timeouts: {request: 300ms}',
      '  - matches: [{path: {value: /per-try}}]',
      '    backendRefs: [{name: flaky, port: 80}]',
      '    timeouts: {request: 5s, backendRequest: 200ms}',
      '    retry: {attempts: 1, backoff: 1ms}',
      '  - matches: [{path: {value: /budget}}]',
      '    backendRefs: [{name: flaky-strict, port: 80}]',
      '    retry: {attempts: 2, codes: [503]}',
      '  - matches: [{path: {value: /narrow}}]',
      '    backendRefs: [{name: narrow, port: 80}]',
      '---',
      'apiVersion: gateway.networking.k8s.io/v1',
      'kind: HTTPRoute',
      'metadata: {name: api-faulty, namespace: default}',
      'spec:',
      '  parentRefs: [{kind: Service, name: api, port: 80}]',
      '  rules: [{matches: [{path: {value: /route-fault}}], backendRefs: [{name: flaky, port: 80}]}]',
      '',
    ].join('\n'),
  };
}

/**
 * Retries, timeouts, faults, outlier detection and circuit breaking, as both layouts must show
 * them; `agent` is the client's node, `dialPath` how its upstream connections go.
 */
async function checkResilience(sb: Sandbox, client: PodRecord, agent: AgentProcess, dialPath: 'same_node' | 'hbone'): Promise<void> {
  const go = async (path: string): Promise<HttpRun['answers'][number]> => {
    const run = await http(sb, client, { requests: [{ path }] }, agent, SVC_API.api);
    const a = run.answers[0];
    assert.ok(a, path);
    return a;
  };
  // The backend fails the first time: without a retry the client sees it, with one it does not.
  assert.equal((await go('/no-retry/fail-first/a')).status, 503, 'no retry rule: the 503 is passed on');
  assert.equal((await go('/retry/fail-first/b')).status, 200, 'the retry recovered');
  // One access log line per request, with a stable field set.
  const lines = (): Array<Record<string, unknown>> =>
    agent
      .log()
      .split('\n')
      .filter((l) => l.includes('"subsystem":"access"'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  await waitFor(() => lines().some((l) => l['path'] === '/retry/fail-first/b'), 5000, 'the access log line');
  const line = lines().find((l) => l['path'] === '/retry/fail-first/b') ?? {};
  assert.deepEqual(
    [line['method'], line['response_code'], line['response_flags'], line['attempts'], line['upstream_service'], line['upstream_host'], line['source_pod'], line['protocol'], line['msg']],
    ['GET', 200, '-', 2, 'default/flaky:80', 'default/flaky-1:8080', 'default/client', 'HTTP/1.1', 'request'],
  );
  assert.match(String(line['request_id']), /^[0-9a-f-]{36}$/);
  let m = await agent.metrics();
  assert.equal(metricValue(m, 'nodemesh_http_retries_total', { service: 'default/flaky:80', result: 'retried' }), 1);
  // The same, to a Service whose retry budget is 0: no retry, the 503 passed on, counted.
  assert.equal((await go('/budget/fail-first/c')).status, 503, 'the budget stopped the retry');
  m = await agent.metrics();
  assert.equal(metricValue(m, 'nodemesh_http_retries_total', { service: 'default/flaky-strict:80', result: 'budget_exhausted' }), 1);
  assert.equal(metricValue(m, 'nodemesh_http_retries_total', { service: 'default/flaky-strict:80', result: 'retried' }), 0);
  // timeouts.request: 504 once it runs out, not when the backend answers 2 s later.
  const late = await go('/timeout/slow/2000');
  assert.equal(late.status, 504);
  assert.ok(late.ms >= 290 && late.ms < 1500, `answered 504 after ${Math.round(late.ms)} ms (timeout 300 ms)`);
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total', { response_code: '504', response_flags: 'UT' }), 1);
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_http1_connections_total', { side: 'client', engine: 'node', why: 'timeout' }), 0, 'timeouts.request timed on the engine, not handed to node:http');
  // timeouts.backendRequest: the slow first attempt is cut at 200 ms and the retry answers at once.
  const retried = await go('/per-try/slow-first/d/3000');
  assert.equal(retried.status, 200, 'the per-try timeout led to a retry that succeeded');
  assert.ok(retried.ms < 2500, `answered after ${Math.round(retried.ms)} ms, not after the slow attempt's 3 s`);
  // The same with request bodies (either framing): kept by the engine and sent again whole.
  const posts = await http(
    sb,
    client,
    {
      requests: [
        { path: '/retry/fail-first/e', body: 20_000 },
        { path: '/retry/fail-first/f', body: 30_000, chunked: true },
        { path: '/per-try/slow-first/g/3000', body: 20_000 },
      ],
    },
    agent,
    SVC_API.api,
  );
  for (const a of posts.answers) {
    assert.equal(a.status, 200, JSON.stringify(a));
    assert.equal(a.headers['x-body-sha256'], a.sent, 'the body came whole on the attempt that answered');
  }
  assert.ok((posts.answers[2]?.ms ?? Infinity) < 2500, 'the per-try timeout cut the slow attempt that had a body');

  // Fault injection on a Service with no route (its HTTP port goes through the proxy for it):
  // half the requests aborted with 418, within five standard deviations (5 for 100 at 0.5).
  const faults = await http(sb, client, { requests: [{ path: '/x' }], repeat: 100 }, agent, SVC_API.faulty);
  const c = count(faults);
  assert.equal((c['418 '] ?? 0) + (c['200 flaky-1'] ?? 0), 100, JSON.stringify(c));
  assert.ok((c['418 '] ?? 0) >= 25 && (c['418 '] ?? 0) <= 75, `aborted ${c['418 '] ?? 0} of 100 (want 50 +- 25)`);
  assert.equal(faults.connections, 1, 'an abort keeps the connection');
  const slowed = await http(sb, client, { requests: [{ path: '/x' }], repeat: 3 }, agent, SVC_API.slowed);
  for (const a of slowed.answers) assert.ok(a.status === 200 && a.ms >= 190, `delayed by the fault: ${a.status} after ${Math.round(a.ms)} ms`);
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total', { destination_service_name: 'slowed', response_flags: 'DI', response_code: '200' }), 3);
  // A fault on a route (a TrafficPolicy targeting the HTTPRoute): its requests only.
  assert.deepEqual([(await go('/route-fault/x')).status, (await go('/no-retry/x')).status], [429, 200], 'the route\'s requests aborted, the other route\'s not');
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total', { response_code: '429', response_flags: 'FI' }), 1);

  // Outlier detection: of two endpoints, the one that answers 500 is out after 3 in a row and gets
  // nothing until its ejection (1 s) ends; then it gets requests again.
  const before = await http(sb, client, { requests: [{ path: '/x' }], repeat: 40 }, agent, SVC_API.pool);
  assert.deepEqual(count(before), { '500 broken-1': 3, '200 good-1': 37 }, 'three 500s, then only the good endpoint');
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_outlier_ejections_total', { service: 'default/pool:80' }), 1);
  await new Promise((resolve) => setTimeout(resolve, 1500));
  const after = await http(sb, client, { requests: [{ path: '/x' }], repeat: 10 }, agent, SVC_API.pool);
  assert.ok((count(after)['500 broken-1'] ?? 0) >= 1, `back after its ejection: ${JSON.stringify(count(after))}`);

  // maxRequestsPerConnection 2: six requests in a row take three upstream connections (none to it is pooled yet).
  const dials = (m: string): number => metricValue(m, 'nodemesh_proxied_connections_total', { path: dialPath });
  const dialled = dials(await agent.metrics());
  const six = await http(sb, client, { requests: [{ path: '/narrow/x' }], repeat: 6 }, agent, SVC_API.api);
  assert.deepEqual(count(six), { '200 flaky-1': 6 });
  assert.equal(dials(await agent.metrics()) - dialled, 3, 'a new upstream connection every two requests');
  // Circuit breaking: one request in flight and one waiting; of four at once, two are answered 503 (UO).
  const burst = await http(sb, client, { requests: [{ path: '/narrow/slow/400' }], parallel: 4 }, agent, SVC_API.api);
  assert.deepEqual(count(burst), { '200 flaky-1': 2, '503 ': 2 }, 'one served, one waited and was served, two overflowed');
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total', { destination_service_name: 'narrow', response_code: '503', response_flags: 'UO' }), 2);
  // All of it on the engine (it keeps a request's body, up to 64 KiB, to send it again itself):
  // retries and their budget, both timeouts, faults, outlier detection, maxRequestsPerConnection,
  // circuit breaking. None went to node:http.
  const last = await agent.metrics();
  assert.equal(metricValue(last, 'nodemesh_http1_connections_total', { side: 'client', engine: 'node' }), 0, last.split('\n').filter((l) => l.startsWith('nodemesh_http1_connections_total')).join(' / '));
}

test('L7 resilience on one node: retries (and their budget), timeouts, fault injection, outlier detection on 5xx, circuit breaking; one access log line per request', async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC_API)) await sb.blackhole(ip);
  const agent = await startAgent(sb, retryConfig());
  await sb.serverPod('flaky-1', [process.execPath, APP, 'flaky-1', '8080'], 8080, ['app=flaky']);
  await sb.serverPod('good-1', [process.execPath, APP, 'good-1', '8080'], 8080, ['app=pool']);
  await sb.serverPod('broken-1', [process.execPath, APP, 'broken-1', '8080', 'broken'], 8080, ['app=pool']);
  const client = await sb.idlePod('client');
  await agent.waitForPods((p) => p.length === 4 && p.every((x) => x.verified), 'four pods verified');
  await checkResilience(sb, client, agent, 'same_node');
});

test('L7 resilience across two nodes: the same, every backend on the other node behind HBONE (mutual TLS)', async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC_API)) await sb.blackhole(ip);
  const nodeB = `${sb.config.node}-b`;
  const cp = await startControlPlane(sb, retryConfig());
  const agentA = await startAgent(sb, { controlPlane: cp.address });
  const agentB = await startAgent(sb, { controlPlane: cp.address }, { node: nodeB });
  await sb.serverPod('flaky-1', [process.execPath, APP, 'flaky-1', '8080'], 8080, ['app=flaky'], { node: nodeB });
  await sb.serverPod('good-1', [process.execPath, APP, 'good-1', '8080'], 8080, ['app=pool'], { node: nodeB });
  await sb.serverPod('broken-1', [process.execPath, APP, 'broken-1', '8080', 'broken'], 8080, ['app=pool'], { node: nodeB });
  const client = await sb.idlePod('client');
  await agentA.waitForPods((p) => p.length === 1 && p.every((x) => x.verified), "node A's pod verified");
  await agentB.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), "node B's pods verified");
  const endpoints = async (service: string): Promise<number> => (await agentA.config()).services.find((s) => s.service === service)?.endpoints.length ?? 0;
  await waitFor(async () => (await endpoints('default/flaky:80')) === 1 && (await endpoints('default/pool:80')) === 2, 10_000, "node B's endpoints known on node A");
  await checkResilience(sb, client, agentA, 'hbone');
});
