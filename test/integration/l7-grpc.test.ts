/**
 * L7 on HTTP/2 ports (issue 14): a Service port that speaks gRPC (h2c) with a GRPCRoute is
 * terminated by the source pod's node proxy and routed per stream. Real @grpc/grpc-js servers in
 * pods and a real client in another, on ONE channel: a 90/10 split per call, a method and
 * metadata match that always wins with its header filter, unary, server, client and bidirectional
 * streaming intact, a trailers-only error passed on, grpc_response_status in the metrics; on v2's
 * node each call judged by an AuthorizationPolicy with a request header condition (the server side
 * of an HTTP/2 port); on one node and across two nodes (HBONE, mutual TLS).
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';

import { checkChannels, metricValue, serviceYaml, startAgent, startControlPlane, type AgentProcess, type ControlPlaneProcess } from '../support/agent.js';
import type { GrpcPlan, GrpcRun } from '../support/grpc-client.js';
import type { H2Answer } from '../support/h2-client.js';
import { h2Frame } from '../support/loopback.js';
import { createSandbox, waitFor, type Sandbox } from '../support/sandbox.js';
import { scratch } from '../support/scratch.js';
import type { PodRecord } from '../../src/runtime/store.js';

const APP = fileURLToPath(new URL('../support/grpc-app.js', import.meta.url));
const CLIENT = fileURLToPath(new URL('../support/grpc-client.js', import.meta.url));
const SVC = { cart: '10.96.0.101', v1: '10.96.0.102', v2: '10.96.0.103' };

function meshConfig(): Record<string, string> {
  return {
    'svc.yaml': [
      serviceYaml('cart', [SVC.cart], { app: 'cart' }, 80, 8080, 'grpc'),
      serviceYaml('cart-v1', [SVC.v1], { app: 'cart', version: 'v1' }, 80, 8080, 'grpc'),
      serviceYaml('cart-v2', [SVC.v2], { app: 'cart', version: 'v2' }, 80, 8080, 'grpc'),
    ].join('---\n'),
    'route.yaml': [
      'apiVersion: gateway.networking.k8s.io/v1',
      'kind: GRPCRoute',
      'metadata: {name: cart, namespace: default}',
      'spec:',
      '  parentRefs: [{group: "", kind: Service, name: cart, port: 80}]',
      '  rules:',
      '  - matches: [{method: {service: mesh.test.Echo}, headers: [{name: x-version, value: v2}]}]',
      '    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-version, value: pinned}]}}]',
      '    backendRefs: [{name: cart-v2, port: 80}]',
      '  - matches: [{method: {service: mesh.test.Echo, method: Fail}}]',
      '    backendRefs: [{name: cart-v1, port: 80}]',
      '  - backendRefs: [{name: cart-v1, port: 80, weight: 90}, {name: cart-v2, port: 80, weight: 10}]',
      '',
    ].join('\n'),
    // On v2's node: calls that carry x-deny: yes are refused, each on its own.
    'policy.yaml': 'apiVersion: security.nodemesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-deny, namespace: default}\nspec:\n  selector: {matchLabels: {version: v2}}\n  action: DENY\n  rules: [{when: [{key: "request.headers[x-deny]", values: ["yes"]}]}]\n',
  };
}

async function grpc(sb: Sandbox, client: PodRecord, plan: Omit<GrpcPlan, 'host' | 'port'>, agents: ReadonlyArray<AgentProcess>): Promise<GrpcRun> {
  const out = await sb.execIn(client, [process.execPath, CLIENT, JSON.stringify({ host: SVC.cart, port: 80, ...plan })], 60_000).catch((e: Error) => {
    throw new Error(`${e.message}\nthe nodes' logs:\n${agents.map((a) => a.log().split('\n').slice(-30).join('\n')).join('\n----\n')}`);
  });
  return JSON.parse(out.trim().split('\n').pop() ?? '{}') as GrpcRun;
}

async function checkGrpc(sb: Sandbox, client: PodRecord, source: AgentProcess, destination: AgentProcess, agents: ReadonlyArray<AgentProcess>, where: string): Promise<void> {
  // 1000 calls on one channel: 90/10 per call, within five standard deviations of the binomial.
  const split = await grpc(sb, client, { unary: { count: 1000 } }, agents);
  const by = (pod: string): number => split.unary.filter((u) => u.pod === pod).length;
  assert.equal(by('cart-v1') + by('cart-v2'), 1000, `${where}: every call answered: ${JSON.stringify(split.unary.filter((u) => u.code !== undefined).slice(0, 3))}`);
  assert.ok(by('cart-v2') >= 53 && by('cart-v2') <= 147, `${where}: v2 took ${by('cart-v2')} of 1000 (want 100 +- 47)`);
  // The client sends no x-request-id: the source's proxy made one per call, which reached the app (through v2's node too).
  const ids = split.unary.map((u) => u.requestId ?? '');
  assert.ok(ids.every((id) => /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(id)), `${where}: every call reached its app with an x-request-id: ${ids.slice(0, 3).join(', ')}`);
  assert.equal(new Set(ids).size, 1000, `${where}: one id per call`);
  // The metadata match wins every time, and its filter changed the header on the way.
  const pinned = await grpc(sb, client, { unary: { count: 100, metadata: { 'x-version': 'v2' } } }, agents);
  assert.deepEqual([...new Set(pinned.unary.map((u) => `${u.pod ?? u.code ?? ''} ${u.version ?? ''}`))], ['cart-v2 pinned'], `${where}: x-version: v2 always to v2, rewritten`);
  // Streaming each way, a large message, and a trailers-only error.
  const streams = await grpc(sb, client, { serverStream: 50, clientStream: { messages: 200, bytes: 1024 }, bidi: 100, unary: { count: 1, bytes: 1 << 20 }, fail: true }, agents);
  assert.equal(streams.unary[0]?.code, undefined, `${where}: a 1 MiB message went through`);
  assert.equal(streams.serverStream?.messages, 50, `${where}: server streaming: every message`);
  assert.equal(streams.serverStream?.pods.length, 1, `${where}: one stream, one backend`);
  assert.deepEqual(streams.clientStream, { messages: 200, bytes: 200 * 1024 }, `${where}: client streaming: every message and byte`);
  assert.deepEqual(streams.bidi, { echoed: 100, intact: true, end: true }, `${where}: bidirectional: a hundred round trips in order`);
  assert.equal(streams.fail?.code, 5, `${where}: NOT_FOUND passed on`);
  assert.match(streams.fail?.details ?? '', /no such thing at cart-v1/);
  // The server side on v2's node: each call judged by the AuthorizationPolicy (PERMISSION_DENIED
  // for a refused one), the others served on the same channel.
  const denied = await grpc(sb, client, { unary: { count: 20, metadata: { 'x-version': 'v2', 'x-deny': 'yes' } } }, agents);
  assert.deepEqual([...new Set(denied.unary.map((u) => u.code))], [7], `${where}: refused by the destination's policy`);
  const metrics = await source.metrics();
  const requests = (labels: Record<string, string>): number => metricValue(metrics, 'istio_requests_total', { reporter: 'source', request_protocol: 'grpc', ...labels });
  assert.equal(requests({ grpc_response_status: '5', response_code: '200' }), 1, `${where}: the error counted with its gRPC status`);
  assert.ok(requests({ grpc_response_status: '0', destination_service_name: 'cart-v2' }) >= by('cart-v2') + 100, `${where}: v2's calls counted`);
  const d = await destination.metrics();
  const dest = (labels: Record<string, string>): number => metricValue(d, 'istio_requests_total', { reporter: 'destination', request_protocol: 'grpc', destination_version: 'v2', ...labels });
  assert.equal(dest({ response_code: '403' }), 20, `${where}: the refusals counted by v2's node`);
  assert.ok(dest({ response_code: '200', grpc_response_status: '0' }) >= by('cart-v2') + 100, `${where}: v2's calls counted by its node with their gRPC status`);
}

test('L7 gRPC on one node: per-call split over one channel, method and metadata match, header filter, unary and streaming calls, errors; malformed HTTP/2 refused', async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC)) await sb.blackhole(ip);
  const agent = await startAgent(sb, meshConfig());
  await sb.serverPod('cart-v1', [process.execPath, APP, 'cart-v1', '8080'], 8080, ['app=cart', 'version=v1']);
  await sb.serverPod('cart-v2', [process.execPath, APP, 'cart-v2', '8080'], 8080, ['app=cart', 'version=v2']);
  const client = await sb.idlePod('client');
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'three pods verified');
  await checkGrpc(sb, client, agent, agent, [agent], 'one node');
  // cart-v2's side reads requests (its policy) and is served in the same pass, so JS routes every
  // call of a rule with v2 in it; the Fail method's one call goes to cart-v1, which nothing on its
  // side reads: the engine routed it itself.
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_http_engine_routed_requests_total'), 1, 'only the call to cart-v1 alone routed by the engine');
  // Both sides on one node in one pass: the destination's side admitted each stream in the
  // client's engine, so no connection into cart-v2 was read a second time.
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_http2_connections_total', { side: 'server' }), 0, 'no second read on the server side');
  // Clients that break HTTP/2: their connection ends with a GOAWAY, nothing goes upstream, and
  // the proxy serves on.
  const frame = h2Frame;
  const settings = frame(4, 0, 0);
  const before = metricValue(await agent.metrics(), 'istio_requests_total');
  const bad = await grpc(sb, client, {
    raw: [
      { hex: Buffer.concat([settings, frame(0, 0, 0, Buffer.from('x'))]).toString('hex') }, // DATA on stream 0
      { hex: '', repeat: { hex: settings.toString('hex'), times: 20_000 } }, // a SETTINGS flood
      { hex: settings.toString('hex'), repeat: { hex: frame(6, 0, 0, Buffer.alloc(8)).toString('hex'), times: 20_000 } }, // a PING flood
      { hex: Buffer.concat([settings, frame(1, 4, 1, Buffer.from([0xff, 0xff, 0xff, 0xff]))]).toString('hex') }, // headers that do not decode
    ],
  }, [agent]);
  // PROTOCOL_ERROR (1), INTERNAL_ERROR for a flood (2, nghttp2's flood guard), COMPRESSION_ERROR (9).
  assert.deepEqual(bad.raw, ['goaway:1', 'goaway:2', 'goaway:2', 'goaway:9']);
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total'), before, 'none of them was routed');
  assert.ok(metricValue(await agent.metrics(), 'nodemesh_http_refused_total') >= 2, 'the floods counted');
  // A message over gRPC's 4 MiB limit is refused by the proxy before any of it goes upstream.
  const big = await grpc(sb, client, { unary: { count: 1, bytes: 5 << 20 } }, [agent]);
  assert.equal(big.unary[0]?.code, 8, 'RESOURCE_EXHAUSTED');
  assert.match(big.unary[0]?.details ?? '', /over the limit of 4194304/, 'answered by the proxy, not the server');
  assert.equal(metricValue(await agent.metrics(), 'istio_requests_total', { reporter: 'source', response_flags: 'DPE', grpc_response_status: '8' }), 1);
  assert.equal((await grpc(sb, client, { unary: { count: 1 } }, [agent])).unary[0]?.code, undefined, 'the proxy serves on');
});

/**
 * Without its policy nothing at v2's node decides per call: its engine passes the calls on unread.
 * The policy written back while the calls' connection into the pod stays busy judges the next
 * calls on that same connection.
 */
async function checkUnread(t: TestContext, sb: Sandbox, client: PodRecord, cp: ControlPlaneProcess, destination: AgentProcess, agents: ReadonlyArray<AgentProcess>): Promise<void> {
  const { dir } = await scratch(t, 'nodemesh-test-unread');
  const go = join(dir, 'go');
  const denied = { 'x-version': 'v2', 'x-deny': 'yes' };
  const configured = async (change: () => Promise<void>, what: string): Promise<void> => {
    const before = (await destination.config()).version;
    await change();
    await waitFor(async () => (await destination.config()).version > before, 10_000, what);
  };
  const unread = async (): Promise<number> => metricValue(await destination.metrics(), 'nodemesh_http_unread_requests_total');
  await configured(() => cp.writeConfig('policy.yaml', ''), "v2's node without the policy");
  const before = await unread();
  const running = grpc(sb, client, { unary: { count: 50, metadata: denied }, then: { waitFor: go, ping: { 'x-version': 'v2' }, unary: { count: 20, metadata: denied } } }, agents);
  await waitFor(async () => (await unread()) >= before + 49, 20_000, 'the calls passed on unread by the engine (all but the first on the connection)');
  const connections = async (): Promise<number> => metricValue(await destination.metrics(), 'nodemesh_http2_connections_total', { side: 'server' });
  const served = await connections();
  await configured(() => cp.writeConfig('policy.yaml', meshConfig()['policy.yaml'] ?? ''), "v2's node with the policy again");
  await writeFile(go, '');
  const run = await running;
  assert.deepEqual([...new Set(run.unary.map((u) => u.pod ?? u.code))], ['cart-v2'], 'no policy: every call served');
  assert.deepEqual([...new Set(run.then?.map((u) => u.code))], [7], 'the policy back: each next call judged and refused');
  assert.equal(await connections(), served, 'on the same connection into the pod');
}

test('L7 gRPC across two nodes: every call crosses in HBONE (mutual TLS), the split and the plain rules routed by the source\'s engine itself, streams intact', async (t) => {
  const sb = await createSandbox(t);
  for (const ip of Object.values(SVC)) await sb.blackhole(ip);
  const nodeB = `${sb.config.node}-b`;
  const cp = await startControlPlane(sb, meshConfig());
  const agentA = await startAgent(sb, { controlPlane: cp.address });
  const agentB = await startAgent(sb, { controlPlane: cp.address }, { node: nodeB });
  await sb.serverPod('cart-v1', [process.execPath, APP, 'cart-v1', '8080'], 8080, ['app=cart', 'version=v1'], { node: nodeB });
  await sb.serverPod('cart-v2', [process.execPath, APP, 'cart-v2', '8080'], 8080, ['app=cart', 'version=v2'], { node: nodeB });
  const client = await sb.idlePod('client');
  await agentA.waitForPods((p) => p.length === 1 && p.every((x) => x.verified), "node A's pod verified");
  await agentB.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), "node B's pods verified");
  for (const s of ['default/cart-v1:80', 'default/cart-v2:80']) await waitFor(async () => ((await agentA.config()).services.find((x) => x.service === s)?.endpoints.length ?? 0) === 1, 10_000, `node B's endpoint of ${s} known on node A`);
  const routed = async (): Promise<number> => metricValue(await agentA.metrics(), 'nodemesh_http_engine_routed_requests_total');
  await checkGrpc(sb, client, agentA, agentB, [agentA, agentB], 'two nodes');
  // The split and the Fail method's rule only pass calls on: after each channel's first call (and
  // the calls of the rule with a filter, which JS reads), node A's engine routed them itself.
  assert.ok((await routed()) >= 1000 - 10, `node A's engine routed the split's calls: ${await routed()}`);
  await checkUnread(t, sb, client, cp, agentB, [agentA, agentB]);
  assert.ok(metricValue(await agentB.metrics(), 'nodemesh_http2_connections_total', { side: 'server', engine: 'addon' }) >= 1, "node B's side read the tunnelled streams on its engine");
  assert.ok(metricValue(await agentA.metrics(), 'nodemesh_proxied_connections_total', { path: 'hbone' }) >= 1, 'v2 was reached through HBONE');
  // Node A's HTTP/2 sessions in tunnels are channels to the HBONE streams, and so are node B's
  // tunnelled connections into the pod's port; once idle (4 s) they end, and nothing is left.
  await checkChannels(agentA, 1, [agentA, agentB], 15_000);
  await checkChannels(agentB, 1, [agentA, agentB], 15_000);
});

const H2_APP = fileURLToPath(new URL('../support/h2-app.js', import.meta.url));
const H2_CLIENT = fileURLToPath(new URL('../support/h2-client.js', import.meta.url));
const H2_SVC = { web: '10.96.0.104', v1: '10.96.0.105', mirror: '10.96.0.106', narrow: '10.96.0.107' };

async function h2Features(t: TestContext, relay: 'kernel' | 'js'): Promise<void> {
  const sb = await createSandbox(t);
  for (const ip of Object.values(H2_SVC)) await sb.blackhole(ip);
  const agent = await startAgent(
    sb,
    {
      'svc.yaml': [serviceYaml('h2web', [H2_SVC.web], { app: 'h2' }, 80, 8080, 'http2'), serviceYaml('h2web-v1', [H2_SVC.v1], { app: 'h2' }, 80, 8080, 'http2'), serviceYaml('h2web-mirror', [H2_SVC.mirror], { app: 'h2-mirror' }, 80, 8080, 'http2'), serviceYaml('h2web-narrow', [H2_SVC.narrow], { app: 'h2' }, 80, 8080, 'http2')].join('---\n'),
      'policy.yaml': 'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: narrow, namespace: default}\nspec:\n  targetRefs: [{group: "", kind: Service, name: h2web-narrow}]\n  connectionPool: {http: {maxRequestsPerConnection: 2}}\n',
      'route.yaml': [
        'apiVersion: gateway.networking.k8s.io/v1',
        'kind: HTTPRoute',
        'metadata: {name: h2web, namespace: default}',
        'spec:',
        '  parentRefs: [{group: "", kind: Service, name: h2web, port: 80}]',
        '  rules:',
        '  - matches: [{path: {value: /retry}}]',
        '    backendRefs: [{name: h2web-v1, port: 80}]',
        '    retry: {attempts: 2, codes: [503], backoff: 10ms}',
        '  - matches: [{path: {value: /per-try}}]',
        '    backendRefs: [{name: h2web-v1, port: 80}]',
        '    timeouts: {request: 5s, backendRequest: 200ms}',
        '    retry: {attempts: 1, backoff: 1ms}',
        '  - matches: [{path: {type: PathPrefix, value: /narrow}}]',
        '    backendRefs: [{name: h2web-narrow, port: 80}]',
        '  - matches: [{path: {type: PathPrefix, value: /mirrored}}]',
        '    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: h2web-mirror, port: 80}}}]',
        '    backendRefs: [{name: h2web-v1, port: 80}]',
        '  - backendRefs: [{name: h2web-v1, port: 80}]',
        '',
      ].join('\n'),
    },
    { args: ['--relay', relay] },
  );
  await sb.serverPod('h2-1', [process.execPath, H2_APP, 'h2-1', '8080'], 8080, ['app=h2']);
  await sb.serverPod('h2-m', [process.execPath, H2_APP, 'h2-m', '8080'], 8080, ['app=h2-mirror']);
  const client = await sb.idlePod('client');
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'three pods verified');
  const out = await sb.execIn(
    client,
    [
      process.execPath,
      H2_CLIENT,
      JSON.stringify({
        host: H2_SVC.web,
        port: 80,
        requests: [
          { path: '/no-retry/fail-first/a' },
          { path: '/retry/fail-first/b' },
          { path: '/retry/fail-first/c', body: 20_000 },
          { path: '/per-try/slow-first/d/3000', body: 10_000 },
          { path: '/retry/fail-first/e', body: 100_000 },
          { path: '/mirrored/f' },
          { path: '/mirrored/g', body: 5000 },
        ],
      }),
    ],
    30_000,
  );
  const { answers } = JSON.parse(out.trim().split('\n').pop() ?? '{}') as { answers: H2Answer[] };
  assert.deepEqual(answers.map((a) => a.status), [503, 200, 200, 200, 503, 200, 200], JSON.stringify(answers));
  assert.deepEqual(answers.slice(5).map((a) => a.servedBy), ['h2-1', 'h2-1'], 'the mirror does not answer');
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_http_mirrored_total', { service: 'default/h2web-mirror:80', result: 'sent' }) === 2, 5000, 'both copies answered by the mirror');
  // maxRequestsPerConnection 2: six streams in a row take three upstream sessions.
  const dials = async (): Promise<number> => metricValue(await agent.metrics(), 'nodemesh_proxied_connections_total', { path: 'same_node' });
  const dialled = await dials();
  const narrow = await sb.execIn(client, [process.execPath, H2_CLIENT, JSON.stringify({ host: H2_SVC.web, port: 80, requests: Array.from({ length: 6 }, () => ({ path: '/narrow/x' })) })], 30_000);
  assert.deepEqual((JSON.parse(narrow.trim().split('\n').pop() ?? '{}') as { answers: H2Answer[] }).answers.map((a) => a.status), [200, 200, 200, 200, 200, 200]);
  assert.equal((await dials()) - dialled, 3, 'a new upstream session every two streams');
  for (const a of answers.slice(2, 4)) assert.equal(a.received, a.sent, 'the attempt that answered had the whole body');
  assert.ok((answers[3]?.ms ?? Infinity) < 2500, `the per-try timeout cut the slow attempt: answered after ${Math.round(answers[3]?.ms ?? 0)} ms`);
  const m = await agent.metrics();
  assert.equal(metricValue(m, 'nodemesh_http_retries_total', { service: 'default/h2web-v1:80', result: 'retried' }), 3, 'b, c and d retried once each');
  assert.equal(metricValue(m, 'istio_requests_total', { reporter: 'source', request_protocol: 'http', response_code: '503' }), 2);
  // All of it on the addon's HTTP/2 engine (none on node:http2), or all on node:http2 with the JS relay.
  const [on, off] = relay === 'kernel' ? ['addon', 'node'] : ['node', 'addon'];
  assert.equal(metricValue(m, 'nodemesh_http2_connections_total', { side: 'client', engine: on }), 2, "the two clients' connections");
  assert.equal(metricValue(m, 'nodemesh_http2_connections_total', { engine: off }), 0);
}

test('L7 HTTP/2 on the addon engine: retries, per-try timeouts, mirrors and maxRequestsPerConnection: a stream answered 503 or too slow goes again, its body (up to 64 KiB) sent whole; without a rule, or over 64 KiB, the answer stands; a mirrored stream is copied; sessions recycled', (t) => h2Features(t, 'kernel'));

test('L7 HTTP/2 on node:http2 (--relay js): the same retries, per-try timeouts, mirrors and maxRequestsPerConnection', (t) => h2Features(t, 'js'));
