/**
 * L7 on the server side (issue 14): where a pod's HTTP port has request-level config on its own
 * node (an AuthorizationPolicy rule with request attributes, a localRateLimit), the destination's
 * node proxy reads each request before the application does: authorized with Istio's semantics,
 * rate-limited with Linkerd's (a total bucket and one per client identity, 429 with retry-after),
 * reported as reporter="destination". Real node:http servers in pods, real clients in others; on
 * one node (the same-node path), from a pod outside the mesh (plaintext inbound) and across two
 * nodes (HBONE, mutual TLS).
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
const SVC = { api: '10.96.0.91', limited: '10.96.0.92', total: '10.96.0.93', raw: '10.96.0.94', both: '10.96.0.95' };

/**
 * `api`: GET under /public for anyone, everything for the "admin" service account or a request
 * with x-role: ops*, never /public/secret*. `limited`: 10 requests a second per client identity;
 * `total`: 10 a second in all.
 */
function meshConfig(): Record<string, string> {
  return {
    'svc.yaml': [
      serviceYaml('api', [SVC.api], { app: 'api' }, 80, 8080, 'http'),
      serviceYaml('limited', [SVC.limited], { app: 'limited' }, 80, 8080, 'http'),
      serviceYaml('total', [SVC.total], { app: 'total' }, 80, 8080, 'http-total'),
      // A port that says no protocol: what it speaks is sniffed.
      serviceYaml('raw', [SVC.raw], { app: 'raw' }, 80, 8080, 'web'),
      serviceYaml('both', [SVC.both], { app: 'both' }, 80, 8080, 'http'),
    ].join('---\n'),
    // A route on `both` (read on the caller's side) in front of a pod the api-read policy guards
    // (read on its side): on one node, both sides in one pass.
    'route.yaml': [
      'apiVersion: gateway.networking.k8s.io/v1',
      'kind: HTTPRoute',
      'metadata: {name: both, namespace: default}',
      'spec:',
      '  parentRefs: [{group: "", kind: Service, name: both, port: 80}]',
      '  rules:',
      '  - matches: [{path: {type: PathPrefix, value: /routed}}]',
      '    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-role, value: ops-routed}]}}]',
      '    backendRefs: [{name: both, port: 80}]',
      '  - backendRefs: [{name: both, port: 80}]',
      '',
    ].join('\n'),
    'policy.yaml': [
      'apiVersion: security.nodemesh.io/v1',
      'kind: AuthorizationPolicy',
      'metadata: {name: api-read, namespace: default}',
      'spec:',
      '  selector: {matchLabels: {role: guarded}}',
      '  rules:',
      '  - to: [{operation: {methods: [GET], paths: ["/public/*"]}}]',
      '  - from: [{source: {principals: ["cluster.local/ns/default/sa/admin"]}}]',
      '  - when: [{key: "request.headers[x-role]", values: ["ops*"]}]',
      '---',
      'apiVersion: security.nodemesh.io/v1',
      'kind: AuthorizationPolicy',
      'metadata: {name: api-secret, namespace: default}',
      'spec:',
      '  selector: {matchLabels: {app: api}}',
      '  action: DENY',
      '  rules: [{to: [{operation: {paths: ["/public/secret*"]}}]}]',
      '',
    ].join('\n'),
    'limits.yaml': [
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: limited, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: limited}]\n  localRateLimit: {identity: {requestsPerSecond: 10}}\n',
      'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: total, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: total}]\n  localRateLimit: {total: {requestsPerSecond: 10}}\n',
    ].join('---\n'),
  };
}

async function http(sb: Sandbox, client: PodRecord, plan: Omit<HttpPlan, 'host' | 'port'>, agents: ReadonlyArray<AgentProcess>, host = SVC.api, port = 80): Promise<HttpRun> {
  const out = await sb.execIn(client, [process.execPath, CLIENT, JSON.stringify({ host, port, ...plan })], 30_000).catch((e: Error) => {
    throw new Error(`${e.message}\nthe nodes' logs:\n${agents.map((a) => a.log().split('\n').slice(-30).join('\n')).join('\n----\n')}`);
  });
  return JSON.parse(out.trim().split('\n').pop() ?? '{}') as HttpRun;
}

const statuses = (run: HttpRun): number[] => run.answers.map((a) => a.status);
const seenBy = (run: HttpRun, i: number): { url: string; remote: string } => JSON.parse(run.answers[i]?.text ?? '{}') as { url: string; remote: string };

/** Authorization per request, as both layouts must show it; `callers` are on the client's node. */
async function checkAuthorization(sb: Sandbox, callers: { client: PodRecord; admin: PodRecord }, destination: AgentProcess, agents: ReadonlyArray<AgentProcess>, where: string): Promise<void> {
  const run = await http(
    sb,
    callers.client,
    {
      requests: [
        { path: '/public/a' },
        { method: 'POST', path: '/public/a', body: 10 },
        { path: '/private' },
        { path: '/private', headers: { 'x-role': 'ops-eu' } },
        { path: '/public/secret.txt' },
        // Normalized before it is judged (and sent on normalized): these are /private.
        { path: '/public/../private' },
        { path: '/public/%2e%2e/private' },
        { path: '/public/%61' },
        // What the policy allows by method and path alone: across nodes the destination's engine
        // passes it on unread (its gate), counted as the others.
        { path: '/public/b' },
      ],
    },
    agents,
  );
  assert.deepEqual(statuses(run), [200, 403, 403, 200, 403, 403, 403, 200, 200], `${where}: each request judged on its own`);
  assert.equal(run.connections, 1, `${where}: a refused request does not end the keep-alive connection`);
  assert.equal(run.answers[1]?.text, 'RBAC: access denied\n');
  assert.equal(seenBy(run, 7).url, '/public/a', `${where}: the application gets the path that was judged`);
  const admin = await http(sb, callers.admin, { requests: [{ method: 'DELETE', path: '/private/x' }] }, agents);
  assert.deepEqual(statuses(admin), [200], `${where}: the admin principal may do anything`);
  assert.equal(seenBy(admin, 0).remote, callers.admin.ip4, `${where}: delivered from the caller's address`);
  const metrics = await destination.metrics();
  const requests = (labels: Record<string, string>): number => metricValue(metrics, 'istio_requests_total', { reporter: 'destination', destination_workload: 'api', request_protocol: 'http', ...labels });
  assert.equal(requests({ response_code: '403' }), 5, `${where}: the refusals counted by the destination`);
  assert.equal(requests({ response_code: '200' }), 5, `${where}: the answers counted by the destination`);
  assert.equal(metricValue(metrics, 'nodemesh_http_unread_requests_total'), 1, `${where}: GET /public/b passed on unread by the destination's engine`);
  assert.equal(requests({ response_code: '200', source_principal: 'spiffe://cluster.local/ns/default/sa/admin' }), 1, `${where}: with the caller's identity`);
  assert.equal(metricValue(metrics, 'nodemesh_policy_denials_total', { policy: 'default/api-secret', reason: 'denied_by_policy' }), 1);
  assert.equal(metricValue(metrics, 'nodemesh_policy_denials_total', { policy: 'default/api-read', reason: 'not_allowed' }), 4);
  assert.equal(metricValue(metrics, 'istio_request_bytes_sum', { reporter: 'destination', destination_workload: 'api', response_code: '403' }), 10, `${where}: the refused POST's body counted`);
  // Read on the addon's HTTP/1.1 engine, never handed to node:http.
  assert.ok(metricValue(metrics, 'nodemesh_http1_connections_total', { side: 'server', engine: 'addon' }) >= 1, `${where}: the server side on the addon's engine`);
  assert.equal(metricValue(metrics, 'nodemesh_http1_connections_total', { side: 'server', engine: 'node' }), 0, `${where}: none on node:http`);
  assert.ok(destination.log().split('\n').some((l) => l.includes('request denied by policy') && l.includes('"requestPath":"/private"')), `${where}: a denial is logged with the request`);
}

/**
 * Local rate limits: one client paced at 50 requests a second for two seconds gets its identity's
 * burst (10) and 10 a second; another identity meanwhile has a bucket of its own. With a total
 * limit two clients share one bucket.
 */
async function checkRateLimits(sb: Sandbox, callers: { client: PodRecord; admin: PodRecord }, destination: AgentProcess, agents: ReadonlyArray<AgentProcess>, where: string): Promise<void> {
  const paced = { requests: [{ path: '/x' }], repeat: 100, intervalMs: 20 };
  const t0 = performance.now();
  const run = await http(sb, callers.client, paced, agents, SVC.limited);
  const seconds = (performance.now() - t0) / 1000;
  const ok = run.answers.filter((a) => a.status === 200).length;
  // The last request starts 1.98 s after the first: at least the burst and 19.8 tokens by then
  // (less what the first request's connect may have taken of that span, so 27); at most what the
  // bucket could hold over the whole run.
  assert.ok(ok >= 27 && ok <= 10 + Math.ceil(10 * seconds) + 1, `${where}: ${ok} of 100 answered in ${seconds.toFixed(2)} s at 10/s with a burst of 10`);
  const limited = run.answers.filter((a) => a.status === 429);
  assert.equal(ok + limited.length, 100, `${where}: every other request answered 429`);
  assert.ok(limited.every((a) => a.headers['retry-after'] === '1'), `${where}: 429 says when to retry`);
  assert.deepEqual(statuses(await http(sb, callers.admin, { requests: [{ path: '/x' }], repeat: 5 }, agents, SVC.limited)), [200, 200, 200, 200, 200], `${where}: another identity has its own bucket`);
  // The total bucket: both clients at once, 50 a second each for two seconds.
  const t1 = performance.now();
  const both = await Promise.all([callers.client, callers.admin].map((c) => http(sb, c, paced, agents, SVC.total)));
  const bothSeconds = (performance.now() - t1) / 1000;
  const total = both.flatMap((r) => r.answers).filter((a) => a.status === 200).length;
  assert.ok(total >= 27 && total <= 10 + Math.ceil(10 * bothSeconds) + 2, `${where}: ${total} of 200 answered in ${bothSeconds.toFixed(2)} s at 10/s in all`);
  assert.ok(both.every((r) => r.answers.some((a) => a.status === 200)), `${where}: both clients got some`);
  const metrics = await destination.metrics();
  assert.equal(metricValue(metrics, 'istio_requests_total', { reporter: 'destination', destination_workload: 'limited', response_code: '429', response_flags: 'RL' }), limited.length, `${where}: 429s counted with flag RL`);
}

test('L7 server side on one node and from plaintext: authorization per request (methods, paths, headers, principals; normalized paths), local rate limits per identity and in total; destination request metrics', async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC)) await sb.blackhole(ip);
  const agent = await startAgent(sb, meshConfig());
  const api = await sb.serverPod('api', [process.execPath, APP, 'api', '8080'], 8080, ['app=api', 'role=guarded']);
  await sb.serverPod('raw', [process.execPath, APP, 'raw', '8080'], 8080, ['app=raw', 'role=guarded']);
  await sb.serverPod('limited', [process.execPath, APP, 'limited', '8080'], 8080, ['app=limited']);
  await sb.serverPod('total', [process.execPath, APP, 'total', '8080'], 8080, ['app=total']);
  await sb.serverPod('both', [process.execPath, APP, 'both', '8080'], 8080, ['app=both', 'role=guarded']);
  const client = await sb.idlePod('client', [], { serviceAccount: 'client' });
  const admin = await sb.idlePod('admin', [], { serviceAccount: 'admin' });
  const plain = await sb.idlePod('plain', ['nodemesh.io/capture=disabled']);
  await agent.waitForPods((p) => p.filter((x) => x.verified).length === 7, 'seven meshed pods verified');
  await checkAuthorization(sb, { client, admin }, agent, [agent], 'one node');
  // Same-node delivery: the client's connection went straight to the destination's side, which
  // served the client's own socket (no relay): each side reports it as TCP with the bytes that
  // crossed it, the requests' heads and bodies and the answers.
  const tcpOf = (text: string, reporter: string, name: string): number => metricValue(text, name, { reporter, destination_workload: 'api' });
  const allClosed = (text: string): boolean => ['source', 'destination'].every((r) => tcpOf(text, r, 'istio_tcp_connections_closed_total') === tcpOf(text, r, 'istio_tcp_connections_opened_total'));
  await waitFor(async () => allClosed(await agent.metrics()), 5000, 'the clients\' connections reported closed');
  const sameNode = await agent.metrics();
  assert.ok(metricValue(sameNode, 'nodemesh_proxied_connections_total', { path: 'same_node' }) >= 2);
  for (const reporter of ['source', 'destination']) {
    const tcp = (name: string): number => tcpOf(sameNode, reporter, name);
    assert.ok(tcp('istio_tcp_connections_opened_total') >= 2, `${reporter}: connections opened`);
    assert.ok(tcp('istio_tcp_received_bytes_total') > tcp('istio_tcp_connections_opened_total') * 40, `${reporter}: the requests' bytes counted (${tcp('istio_tcp_received_bytes_total')})`);
    assert.ok(tcp('istio_tcp_sent_bytes_total') > tcp('istio_tcp_connections_opened_total') * 40, `${reporter}: the answers' bytes counted (${tcp('istio_tcp_sent_bytes_total')})`);
  }
  // A pod outside the mesh, straight to the pod's address (plaintext inbound): no identity, so
  // only what the policy allows anyone; its requests are counted without a principal.
  const plainRun = await http(sb, plain, { requests: [{ path: '/public/a' }, { method: 'DELETE', path: '/public/a' }] }, [agent], api.ip4, 8080);
  assert.deepEqual(statuses(plainRun), [200, 403]);
  assert.equal(seenBy(plainRun, 0).remote, plain.ip4, 'delivered from the plaintext client\'s address');
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total', { reporter: 'destination', destination_workload: 'api', source_principal: 'unknown', connection_security_policy: 'none' }), 2);
  await checkRateLimits(sb, { client, admin }, agent, [agent], 'one node');
  // Both sides on one node: the caller's route and the pod's policy in one pass, no second read.
  const serverConnections = (text: string): number => metricValue(text, 'nodemesh_http1_connections_total', { side: 'server' });
  const serverBefore = serverConnections(await agent.metrics());
  const both = await http(sb, client, { requests: [{ path: '/public/a' }, { path: '/private' }, { path: '/routed/private' }] }, [agent], SVC.both);
  assert.deepEqual(statuses(both), [200, 403, 200], 'the policy judges the request as the route changed it (x-role set for /routed)');
  assert.equal(both.connections, 1);
  const afterBoth = await agent.metrics();
  for (const reporter of ['source', 'destination']) {
    const counted = (code: string): number => metricValue(afterBoth, 'istio_requests_total', { reporter, destination_workload: 'both', response_code: code });
    assert.deepEqual([counted('200'), counted('403')], [2, 1], `reporter ${reporter}: each request counted once by each side`);
  }
  assert.equal(serverConnections(afterBoth), serverBefore, 'no connection was read a second time on the server side');
  // A port that says no protocol, with policies that read requests: the first bytes decide. HTTP
  // is judged per request; anything else by the policies' TCP reading (the ALLOW rules that name
  // request attributes match nothing there, so only the admin principal gets in).
  const sniffed = await http(sb, client, { requests: [{ path: '/public/a' }, { method: 'POST', path: '/public/a', body: 10 }] }, [agent], SVC.raw);
  assert.deepEqual(statuses(sniffed), [200, 403], 'HTTP/1.1 found and judged per request');
  const notHttp = { bytes: 64, marker: '\x16\x03\x01 not http' };
  assert.equal((await sb.dialFrom(client, SVC.raw, 80, notHttp)).received, 0, 'no request to read: refused by the TCP reading');
  assert.ok((await sb.dialFrom(admin, SVC.raw, 80, notHttp)).received > 0, 'the admin principal is let through at L4 (the application answers its bytes)');
  const m = await agent.metrics();
  assert.deepEqual([metricValue(m, 'nodemesh_protocol_sniffed_total', { protocol: 'http1' }), metricValue(m, 'nodemesh_protocol_sniffed_total', { protocol: 'opaque' })], [1, 2]);
  // A Service without request-level config stays on the L4 path: no request is read on it.
  const before = metricValue(await agent.metrics(), 'istio_requests_total');
  const version = (await agent.config()).version;
  await agent.writeConfig('policy.yaml', '');
  await waitFor(async () => (await agent.config()).version > version, 3000, 'the policies removed');
  assert.deepEqual(statuses(await http(sb, client, { requests: [{ method: 'POST', path: '/private', body: 10 }] }, [agent])), [200]);
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total'), before, 'no policy with request attributes: the port is relayed as bytes');
});

for (const hbone of ['native', 'node'] as const) test(`L7 server side across two nodes (${hbone} HBONE engine): the destination's node authorizes and rate-limits each tunnelled request`, async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC)) await sb.blackhole(ip);
  const nodeB = `${sb.config.node}-b`;
  const cp = await startControlPlane(sb, meshConfig());
  const agentA = await startAgent(sb, { controlPlane: cp.address }, { args: ['--hbone', hbone] });
  const agentB = await startAgent(sb, { controlPlane: cp.address }, { node: nodeB, args: ['--hbone', hbone] });
  await sb.serverPod('api', [process.execPath, APP, 'api', '8080'], 8080, ['app=api', 'role=guarded'], { node: nodeB });
  await sb.serverPod('limited', [process.execPath, APP, 'limited', '8080'], 8080, ['app=limited'], { node: nodeB });
  await sb.serverPod('total', [process.execPath, APP, 'total', '8080'], 8080, ['app=total'], { node: nodeB });
  const client = await sb.idlePod('client', [], { serviceAccount: 'client' });
  const admin = await sb.idlePod('admin', [], { serviceAccount: 'admin' });
  await agentA.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), "node A's pods verified");
  await agentB.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), "node B's pods verified");
  for (const name of ['api', 'limited', 'total']) {
    await waitFor(async () => ((await agentA.config()).services.find((s) => s.service === `default/${name}:80`)?.endpoints.length ?? 0) === 1, 10_000, `${name} known on node A`);
  }
  await checkAuthorization(sb, { client, admin }, agentB, [agentA, agentB], 'two nodes');
  assert.ok(metricValue(await agentA.metrics(), 'nodemesh_proxied_connections_total', { path: 'hbone' }) >= 2, 'the requests crossed in HBONE');
  assert.equal(metricValue(await agentA.metrics(), 'istio_requests_total'), 0, 'the client\'s node read no request (no client-side config)');
  const mtls = metricValue(await agentB.metrics(), 'istio_requests_total', { reporter: 'destination', connection_security_policy: 'mutual_tls', source_principal: 'spiffe://cluster.local/ns/default/sa/client' });
  assert.equal(mtls, 9, 'reported as mutual TLS with the client\'s identity (the request passed on unread too)');
  await checkRateLimits(sb, { client, admin }, agentB, [agentA, agentB], 'two nodes');
  await checkTunnelledBytes(sb, admin, agentB, [agentA, agentB], 'two nodes');
  // The addon's engines serve each tunnelled connection on a channel (none with node:http2's),
  // and once the clients are gone none is left open or unclaimed on either node.
  await checkChannels(agentB, hbone === 'native' ? 8 : 0, [agentA, agentB], 10_000);
});

/**
 * What the destination's engine does with a tunnelled connection besides requests it forwards
 * (with the addon's HBONE engine, the stream is joined to it in memory): large bodies both ways
 * under flow control, an upgrade joined byte for byte, and HTTP/1.0 handed to node:http (given a
 * socket then, bridged to the stream), its body passed whole.
 */
async function checkTunnelledBytes(sb: Sandbox, admin: PodRecord, destination: AgentProcess, agents: ReadonlyArray<AgentProcess>, where: string): Promise<void> {
  const bodies = await http(sb, admin, { requests: [{ method: 'POST', path: '/echo', body: 3 << 20, chunked: true }, { path: '/big/5000000' }, { method: 'POST', path: '/echo', body: 1 << 20 }] }, agents);
  assert.deepEqual(statuses(bodies), [200, 200, 200], `${where}: ${JSON.stringify(bodies.answers.map((a) => a.error))}`);
  for (const i of [0, 2]) {
    assert.equal(bodies.answers[i]?.sha256, bodies.answers[i]?.sent, `${where}: echo ${i}: the body came back intact`);
    assert.equal(bodies.answers[i]?.trailers['x-body-sha256'], bodies.answers[i]?.sent, `${where}: echo ${i}: its trailer came through`);
  }
  assert.equal(bodies.answers[1]?.bytes, 5_000_000, `${where}: 5 MB down`);
  assert.equal(bodies.connections, 1);
  const upgraded = await http(sb, admin, { requests: [], upgrades: [{ path: '/ws', send: 'hello across two nodes' }] }, agents);
  assert.deepEqual(upgraded.upgrades, [{ status: 'HTTP/1.1 101 Switching Protocols', echoed: 'hello across two nodes' }], `${where}: upgraded on the destination's engine`);
  const body = 'b'.repeat(70_000);
  const old = await http(sb, admin, { requests: [], raw: ['GET /public/a HTTP/1.0\r\nHost: api\r\n\r\n', `POST /echo HTTP/1.0\r\nHost: api\r\nContent-Length: ${body.length}\r\n\r\n${body}`] }, agents);
  assert.deepEqual(old.raw, ['HTTP/1.1 200 OK', 'HTTP/1.1 200 OK'], `${where}: HTTP/1.0 served by node:http on the destination`);
  // A client that leaves in the middle of a 50 MB answer: the tunnel stream is reset, and the
  // destination's engine lets its side go (checkChannels: nothing left open).
  const left = await http(sb, admin, { requests: [], raw: ['GET /big/50000000 HTTP/1.1\r\nHost: api\r\n\r\n'] }, agents);
  assert.deepEqual(left.raw, ['HTTP/1.1 200 OK']);
  const metrics = await destination.metrics();
  assert.equal(metricValue(metrics, 'nodemesh_http1_connections_total', { side: 'server', engine: 'node', why: 'http1.0' }), 2, `${where}: both HTTP/1.0 requests handed to node:http`);
  assert.equal(metricValue(metrics, 'istio_requests_total', { reporter: 'destination', destination_workload: 'api', request_protocol: 'http', response_code: '101' }), 1, `${where}: the upgrade counted`);
}
