/**
 * The node agent as a process, on the real kernel: enrollment of every pod, outbound L4 to a
 * Service with two endpoints, inbound through 15006, metrics, pods coming and going, a SIGKILL
 * and restart, refusals, and bad input that is skipped without stopping the rest.
 */
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import type { DialResult } from '../../src/cli/debug-tools.js';
import { findCgroup2Mount } from '../../src/runtime/cgroup.js';
import { hostAddress, nodeCgroup } from '../../src/runtime/config.js';
import { run } from '../../src/shared/exec.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import { metricValue, serviceYaml, startAgent, type AgentConfigDump } from '../support/agent.js';
import { collect, createSandbox, waitFor } from '../support/sandbox.js';

const SVC_V4 = '10.96.0.30';
const SVC_V6 = 'fd00:96::1e';
const HIDDEN_V4 = '10.96.0.31';
const EMPTY_V4 = '10.96.0.31';

test('agent: two endpoints, inbound, metrics, pods coming and going, SIGKILL and restart', async (t) => {
  const sb = await createSandbox(t);
  for (const a of [SVC_V4, SVC_V6, EMPTY_V4]) await sb.blackhole(a);
  const b = await sb.echoPod('echo-b', 8080, ['tier=backend', 'app=echo-b']);
  const c = await sb.echoPod('echo-c', 8080, ['tier=backend', 'app=echo-c']);
  const client = await sb.idlePod('client-a', ['app=client']);
  const outsider = await sb.idlePod('outsider-d', ['app=outsider', 'nodemesh.io/capture=disabled']);

  const agent = await startAgent(sb, {
    'services.yaml': serviceYaml('backend', [SVC_V4, SVC_V6], { tier: 'backend' }) + '---\n' + serviceYaml('empty', [EMPTY_V4], { tier: 'nothing' }),
  });
  const pods = await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'three pods enrolled and verified');
  assert.deepEqual(pods.map((p) => p.name), ['client-a', 'echo-b', 'echo-c'], 'the opted-out pod is not enrolled');
  assert.equal(await agent.ready(), 200);

  // Outbound: 6 connections to the Service over IPv4 and IPv6, round robin over B and C.
  const N = 6;
  for (let i = 0; i < N; i++) {
    const r = await sb.dialFrom(client, i % 2 === 0 ? SVC_V4 : SVC_V6, 80, { bytes: 64 * 1024 });
    assert.ok(r.intact, `dial ${i}: ${JSON.stringify(r)}`);
  }
  await waitFor(async () => (await b.connections()).length + (await c.connections()).length === N, 5000, 'server logs');
  const atB = await b.connections();
  const atC = await c.connections();
  assert.equal(atB.length, N / 2, 'B got half');
  assert.equal(atC.length, N / 2, 'C got half');
  for (const conn of [...atB, ...atC]) {
    assert.ok([client.ip4, client.ip6].includes(conn.address.replace(/^::ffff:/, '')), 'the server sees the client pod address');
    assert.equal(conn.bytes, 64 * 1024);
  }

  const metrics = await agent.metrics();
  const out = { reporter: 'source', source_workload: 'client', destination_service: 'backend.default.svc.cluster.local', destination_service_name: 'backend' };
  assert.equal(metricValue(metrics, 'istio_tcp_connections_opened_total', out), N);
  assert.equal(metricValue(metrics, 'istio_tcp_connections_closed_total', out), N);
  assert.equal(metricValue(metrics, 'istio_tcp_received_bytes_total', out), N * 64 * 1024);
  assert.equal(metricValue(metrics, 'istio_tcp_sent_bytes_total', out), N * 64 * 1024);
  assert.equal(metricValue(metrics, 'istio_tcp_connections_opened_total', { ...out, destination_workload: 'echo-b' }), N / 2);
  assert.equal(metricValue(metrics, 'istio_tcp_connections_opened_total', { ...out, source_principal: 'spiffe://cluster.local/ns/default/sa/default' }), N);
  // The same connections arrived at B and C through their inbound listeners.
  assert.equal(metricValue(metrics, 'istio_tcp_connections_opened_total', { reporter: 'destination', source_workload: 'client', destination_service_name: 'backend' }), N);
  // B and C are on this node: the outbound proxy delivered straight into them, one hop.
  assert.equal(metricValue(metrics, 'nodemesh_proxied_connections_total', { path: 'same_node' }), N);
  assert.equal(metricValue(metrics, 'nodemesh_proxied_connections_total', { path: 'inbound' }), 0);
  assert.equal(metricValue(metrics, 'nodemesh_pods_enrolled'), 3);
  assert.equal(metricValue(metrics, 'nodemesh_pod_redirection_verified', { pod: 'client-a' }), 1);

  // Inbound from a pod that is not enrolled reaches B's application through 15006.
  const direct = await sb.dialFrom(outsider, b.record.ip4, 8080);
  assert.ok(direct.intact);
  const inbound = { reporter: 'destination', source_workload: 'outsider', destination_workload: 'echo-b' };
  assert.equal(metricValue(await agent.metrics(), 'istio_tcp_connections_opened_total', inbound), 1);
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_proxied_connections_total', { path: 'inbound' }), 1);

  // A Service without endpoints: a clean refusal, counted with its reason.
  const empty = await sb.dialFrom(client, EMPTY_V4, 80);
  assert.equal(empty.ok, false);
  assert.match(empty.error ?? '', /ECONNRESET|EPIPE/);
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_connections_refused_total', { direction: 'outbound', reason: 'no_endpoints' }), 1);

  // A pod created while the agent runs is captured.
  const late = await sb.idlePod('late-e', ['app=late']);
  await agent.waitForPods((p) => p.some((x) => x.name === 'late-e' && x.verified), 'late pod verified');
  assert.ok((await sb.dialFrom(late, SVC_V4, 80)).intact);

  // A deleted pod leaves no state: no pinned links, no listener entries.
  const cRecord = (await sb.runtime.list()).find((p) => p.name === 'echo-c');
  assert.ok(cRecord);
  await sb.runtime.remove(cRecord, 500);
  await agent.waitForPods((p) => !p.some((x) => x.name === 'echo-c'), 'echo-c unenrolled');
  assert.equal(existsSync(join(agent.pinRoot, 'pods', cRecord.uid)), false, 'pinned links of echo-c removed');
  // Three addresses steered a pod: its IPv4, its IPv6, and eth0's link-local address.
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_bpf_map_entries', { map: 'nm_pod_listeners' }) === 3 * 3, 10_000, 'listener entries of 3 pods');

  // SIGKILL: pinned programs keep capturing (connections are refused at 15001 instead of
  // finding no route), and a new agent re-owns the pods without detaching them.
  await agent.kill('SIGKILL');
  const during = await sb.dialFrom(client, SVC_V4, 80);
  assert.equal(during.error, 'ECONNREFUSED', 'still captured while no agent runs');
  await agent.restart();
  const after = await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'pods re-owned after restart');
  assert.deepEqual(after.map((p) => p.name), ['client-a', 'echo-b', 'late-e']);
  assert.match(agent.log(), /"readopted":true/);
  for (const host of [SVC_V4, SVC_V6]) assert.ok((await sb.dialFrom(client, host, 80)).intact, `after restart, ${host}`);
});

test('agent: bad config and bad pod records are skipped, named and counted; the rest works', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4);
  await sb.blackhole(HIDDEN_V4);
  await sb.echoPod('good-b', 8080, ['tier=backend']);
  const client = await sb.idlePod('client-a');
  // A pod whose record points to a network namespace that does not exist.
  const ghost = await sb.idlePod('ghost');
  const record = {
    ...ghost,
    uid: '6b1f3b8e-0d4c-4c57-9d7e-3a8f2b0c9e11',
    name: 'ghost-2',
    ip4: hostAddress(sb.config.podCidr4, 4, 200),
    ip6: hostAddress(sb.config.podCidr6, 6, 200),
    netnsPath: '/run/netns/nmt_does_not_exist',
  };
  await writeFile(join(sb.config.stateDir, 'pods', 'default_ghost-2.json'), JSON.stringify(record));
  sb.defer(() => sb.runtime.store.remove(record));
  // A pod whose "cgroup" is a folder outside the node's pod cgroups: refused at the edge, before
  // anything is attached (a record could name any cgroup of the machine).
  const notCgroup = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-notcg-`));
  sb.defer(() => rm(notCgroup, { recursive: true, force: true }));
  const refused = { ...ghost, uid: '7c2a4c9f-1e5d-4d68-8e8f-4b9a3c1d0f22', name: 'refused', cgroupPath: notCgroup };
  await writeFile(join(sb.config.stateDir, 'pods', 'default_refused.json'), JSON.stringify(refused));
  sb.defer(() => sb.runtime.store.remove(refused));
  // And a record that is not JSON at all.
  const corrupt = join(sb.config.stateDir, 'pods', 'default_corrupt.json');
  await writeFile(corrupt, '{not json');
  sb.defer(() => rm(corrupt, { force: true }));

  const agent = await startAgent(sb, {
    'a-good.yaml': serviceYaml('backend', [SVC_V4], { tier: 'backend' }),
    'b-broken.yaml': 'apiVersion: v1\nkind: Service\nmetadata: {name: broken\n',
    'c-noports.yaml': 'apiVersion: v1\nkind: Service\nmetadata: {name: noports}\nspec: {clusterIP: 10.96.0.99, selector: {a: b}}\n',
    'd-unknown.yaml': 'apiVersion: v1\nkind: Service\nmetadata: {name: typo}\nspec: {clusterIP: 10.96.0.98, selectr: {a: b}, ports: [{port: 80}]}\n',
    // Valid, but exported to another namespace only: for pods of "default" its address is no Service.
    'e-hidden.yaml': serviceYaml('hidden', [HIDDEN_V4], { tier: 'backend' }).replace('namespace: default}', 'namespace: default, annotations: {networking.istio.io/exportTo: other}}'),
  });
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'good pods enrolled');
  assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact, 'the good Service works');
  const hidden = await sb.dialFrom(client, HIDDEN_V4, 80);
  assert.equal(hidden.intact, false, 'a Service not exported to the caller is not served to it');
  const refusedBefore = metricValue(await agent.metrics(), 'nodemesh_connections_refused_total', { direction: 'outbound', reason: 'upstream_connect_failed' });
  assert.equal(refusedBefore, 1, 'it went the passthrough way, to an address this pod has no route to');

  const log = agent.log();
  assert.match(log, /"file":"[^"]*b-broken\.yaml".*config rejected: not valid YAML/);
  assert.match(log, /"file":"[^"]*c-noports\.yaml","object":"Service default\/noports","field":"spec\.ports".*spec\.ports must list at least one port/);
  assert.match(log, /"object":"Service default\/typo","field":"spec\.selectr".*unknown field/);
  assert.match(log, /"pod":"ghost-2".*"reason":"netns_missing".*network namespace \/run\/netns\/nmt_does_not_exist does not exist/);
  assert.match(log, /"pod":"refused".*"reason":"invalid_record".*cgroupPath: [^ ]*notcg[^ ]* is not under this node's pod cgroups/);
  assert.equal(existsSync(join(agent.pinRoot, 'pods', refused.uid)), false, 'nothing of the refused pod is pinned');
  assert.match(log, /"pod":"corrupt".*"reason":"invalid_record".*pod record [^ ]*default_corrupt\.json cannot be read/);
  const metrics = await agent.metrics();
  assert.equal(metricValue(metrics, 'nodemesh_enroll_errors_total', { reason: 'invalid_record' }), 2);
  assert.equal(metricValue(metrics, 'nodemesh_config_rejected_objects'), 3);
  assert.equal(metricValue(metrics, 'nodemesh_config_rejected_objects', { kind: 'yaml' }), 1);
  assert.equal(metricValue(metrics, 'nodemesh_enroll_errors_total', { reason: 'netns_missing' }), 1);
  assert.equal(metricValue(metrics, 'nodemesh_config_objects', { kind: 'Service' }), 2);

  // An edit that breaks the good Service keeps its last good version serving.
  await agent.writeConfig('a-good.yaml', serviceYaml('backend', [SVC_V4], { tier: 'backend' }).replace('port: 80', 'port: 0'));
  await waitFor(() => /"object":"Service default\/backend".*"keptLastGood":true/.test(agent.log()), 5000, 'reload with the broken edit');
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_config_rejected_objects'), 4);
  assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact, 'the last good Service keeps serving');

  // The namespace opts out: its live pods leave the mesh and keep nothing of it.
  await agent.writeConfig('e-namespace.yaml', 'apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {nodemesh.io/capture: disabled}}\n');
  await agent.waitForPods((p) => p.length === 0, 'every pod unenrolled');
  assert.deepEqual(readdirSync(join(agent.pinRoot, 'pods')), [], 'no pinned links left');
  assert.equal((await sb.dialFrom(client, SVC_V4, 80)).error, 'ENETUNREACH', 'no longer captured');
  const rules = await run('nsenter', [`--net=${client.netnsPath}`, 'ip', 'rule', 'show']);
  assert.doesNotMatch(rules.stdout, /0x53a/, 'the delivery route is gone from the pod');
  // And back in.
  await rm(join(agent.configDir, 'e-namespace.yaml'));
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'pods enrolled again');
  assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact, 'captured again');
});

test('agent: fail-closed enrollment refuses connections from pods not yet verified', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4);
  const server = await sb.echoPod('server-b', 8080, ['tier=backend']);
  const client = await sb.idlePod('client-a');
  const outsider = await sb.idlePod('outsider-d', ['nodemesh.io/capture=disabled']);
  const meshConfig = (failClosed: boolean): string =>
    `apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {failClosedEnrollment: "${failClosed}"}\n`;
  const agent = await startAgent(sb, { 'service.yaml': serviceYaml('backend', [SVC_V4], { tier: 'backend' }), 'mesh.yaml': meshConfig(true) });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'pods verified');
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_bpf_map_entries', { map: 'nm_allowed_cgroups' }) === 3, 10_000, 'three cgroups allowed');

  // Verified and opted-out pods work as before.
  assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact, 'verified pod to a Service');
  assert.ok((await sb.dialFrom(client, server.record.ip4, 8080)).intact, 'verified pod, passthrough');
  assert.ok((await sb.dialFrom(outsider, server.record.ip4, 8080)).intact, 'opted-out pod');

  // A workload in the pods cgroup that the agent has not verified (here: one it does not know
  // at all) cannot open a connection past the mesh.
  const podsCgroup = nodeCgroup(await findCgroup2Mount(), sb.config, sb.config.node);
  const intruder = join(podsCgroup, 'not-yet-enrolled');
  await mkdir(intruder);
  sb.defer(() => rmdir(intruder));
  const dialFromIntruder = async (mark = false): Promise<DialResult> => {
    const argv = ['sh', '-c', `echo $$ > "$0/cgroup.procs" && exec ip netns exec "$1" "$2" "$3" debug dial "$4" 8080 --bytes 64${mark ? ' --mark' : ''}`, intruder, client.netns, process.execPath, CLI_ENTRY, server.record.ip4];
    const r = await collect(spawn(argv[0] ?? 'sh', argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] }));
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as DialResult;
  };
  assert.equal((await dialFromIntruder()).error, 'EPERM');
  // Its socket marked with the proxy's own mark: refused all the same (no mark is trusted).
  assert.equal((await dialFromIntruder(true)).error, 'EPERM');
  // Containers live in child cgroups of their pod's: two containers of the verified client pod
  // are captured as the pod is (the pod's programs apply to its whole subtree), and a container
  // cgroup under the unknown one is refused like it. (What the gate lets a verified container
  // send besides TCP is in hardening.test.ts.)
  const containers = ['app', 'sidecar'].map((c) => join(client.cgroupPath, c));
  const intruderContainer = join(intruder, 'app');
  for (const c of [...containers, intruderContainer]) {
    await mkdir(c);
    sb.defer(() => rmdir(c));
  }
  for (const c of containers) {
    assert.ok((await sb.dialFrom({ ...client, cgroupPath: c }, SVC_V4, 80, { bytes: 64 })).intact, `container ${c} to a Service (captured)`);
    assert.ok((await sb.dialFrom({ ...client, cgroupPath: c }, server.record.ip4, 8080, { bytes: 64 })).intact, `container ${c} to a pod (captured, passed through)`);
  }
  assert.equal((await sb.dialFrom({ ...client, cgroupPath: intruderContainer }, server.record.ip4, 8080, { bytes: 64 })).error, 'EPERM');
  const served = metricValue(await agent.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', destination_service_name: 'backend' });
  assert.ok(served >= 3, `the containers' Service connections went through the proxy (${served})`);

  // Fail-closed off: the gate goes, the same dial goes through.
  await agent.writeConfig('mesh.yaml', meshConfig(false));
  await waitFor(async () => (await dialFromIntruder()).intact, 5000, 'dial allowed once the gate is off');
  assert.equal(existsSync(join(agent.pinRoot, 'gate')), false, 'gate unpinned');
});

test('agent: a TrafficPolicy picks least connections, caps connections, retries and ejects an endpoint that refuses', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4);
  const b = await sb.echoPod('echo-b', 8080, ['tier=backend']);
  const c = await sb.echoPod('echo-c', 8080, ['tier=backend']);
  // Selected by the Service, but nothing listens on 8080: every connect to it is refused.
  await sb.idlePod('dead-d', ['tier=backend']);
  const client = await sb.idlePod('client-a');
  const policy = [
    'apiVersion: networking.nodemesh.io/v1alpha1',
    'kind: TrafficPolicy',
    'metadata: {name: backend}',
    'spec:',
    '  targetRefs: [{kind: Service, name: backend}]',
    '  loadBalancer: {type: LeastRequest}',
    '  connectionPool: {tcp: {maxConnections: 2}}',
    '  outlierDetection: {consecutiveConnectErrors: 1, baseEjectionTime: 1m, maxEjectionPercent: 50}',
    '',
  ].join('\n');
  const agent = await startAgent(sb, { 'service.yaml': serviceYaml('backend', [SVC_V4], { tier: 'backend' }), 'policy.yaml': policy });
  await agent.waitForPods((p) => p.length === 4 && p.every((x) => x.verified), 'pods verified');
  const backend = async (): Promise<AgentConfigDump['services'][number] | undefined> => (await agent.config()).services.find((s) => s.service === 'default/backend:80');
  assert.equal((await backend())?.policy.loadBalancing, 'least-connections');

  // Least request draws two of the three endpoints at random (power of two choices): dial until the
  // one that refuses has been drawn (a third of the picks while all are idle; 40 dials miss it once
  // in 10^7 runs). Its connect is retried on another endpoint, so the client never sees it, and it
  // is ejected after its first error.
  const ejections = async (): Promise<number> => metricValue(await agent.metrics(), 'nodemesh_outlier_ejections_total', { service: 'default/backend:80' });
  let dials = 0;
  while (dials < 40 && (await ejections()) === 0) {
    const r = await sb.dialFrom(client, SVC_V4, 80);
    assert.ok(r.intact, `dial ${dials}: ${JSON.stringify(r)}\n${agent.log().split("\n").filter((l) => /"subsystem":"proxy"/.test(l)).join("\n")}`);
    dials++;
  }
  let metrics = await agent.metrics();
  assert.equal(metricValue(metrics, 'nodemesh_outlier_ejections_total', { service: 'default/backend:80' }), 1);
  assert.equal(metricValue(metrics, 'nodemesh_upstream_connect_retries_total', { service: 'default/backend:80' }), 1);
  assert.deepEqual((await backend())?.endpoints.filter((e) => e.ejected).map((e) => e.pod), ['default/dead-d']);
  await waitFor(async () => (await b.connections()).length + (await c.connections()).length === dials, 5000, 'every dial logged by a live endpoint');
  const before = { b: (await b.connections()).length, c: (await c.connections()).length };

  // One connection held open on one endpoint: least connections sends the next ones to the other.
  const held = sb.dialFrom(client, SVC_V4, 80, { holdMs: 4000 });
  await waitFor(async () => (await backend())?.endpoints.some((e) => e.activeConnections === 1) ?? false, 5000, 'the held connection is open');
  const busy = (await backend())?.endpoints.find((e) => e.activeConnections === 1)?.pod;
  for (let i = 0; i < 4; i++) assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact, `dial while held ${i}`);
  await waitFor(async () => (await b.connections()).length + (await c.connections()).length === dials + 4, 5000, 'four more logged');
  const added = { b: (await b.connections()).length - before.b, c: (await c.connections()).length - before.c };
  assert.deepEqual(added, busy === 'default/echo-b' ? { b: 0, c: 4 } : { b: 4, c: 0 }, `all four avoid the busy endpoint ${busy}`);

  // maxConnections 2: with two open, a third is refused and counted.
  const held2 = sb.dialFrom(client, SVC_V4, 80, { holdMs: 2000 });
  await waitFor(async () => ((await backend())?.endpoints.reduce((n, e) => n + e.activeConnections, 0) ?? 0) === 2, 5000, 'two connections open');
  const over = await sb.dialFrom(client, SVC_V4, 80);
  assert.equal(over.ok, false);
  metrics = await agent.metrics();
  assert.equal(metricValue(metrics, 'nodemesh_connections_refused_total', { direction: 'outbound', reason: 'overflow' }), 1);
  assert.ok((await held).intact, 'the held connection was relayed whole');
  assert.ok((await held2).intact);
});

test('agent: an HTTPRoute on a Service splits its connections between two backend Services by weight', async (t) => {
  const sb = await createSandbox(t);
  const [parent, v1Ip, v2Ip] = ['10.96.0.50', '10.96.0.51', '10.96.0.52'];
  for (const ip of [parent, v1Ip, v2Ip]) await sb.blackhole(ip);
  const v1 = await sb.echoPod('reviews-v1', 8080, ['app=reviews', 'version=v1']);
  const v2 = await sb.echoPod('reviews-v2', 8080, ['app=reviews', 'version=v2']);
  const client = await sb.idlePod('client-a', ['app=client']);
  const route = [
    'apiVersion: gateway.networking.k8s.io/v1',
    'kind: HTTPRoute',
    'metadata: {name: reviews-canary}',
    'spec:',
    '  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]',
    '  rules:',
    '  - backendRefs: [{name: reviews-v1, port: 80, weight: 1}, {name: reviews-v2, port: 80, weight: 3}]',
    '',
  ].join('\n');
  const agent = await startAgent(sb, {
    'services.yaml': [serviceYaml('reviews', [parent], { app: 'reviews' }), serviceYaml('reviews-v1', [v1Ip], { version: 'v1' }), serviceYaml('reviews-v2', [v2Ip], { version: 'v2' })].join('---\n'),
    'route.yaml': route,
  });
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'pods verified');
  const routed = (await agent.config()).services.find((s) => s.service === 'default/reviews:80') as { route?: string; split?: Array<{ backend: string; weight: number }> } | undefined;
  assert.equal(routed?.route, 'HTTPRoute default/reviews-canary');
  assert.deepEqual(routed?.split, [{ backend: 'default/reviews-v1:80', weight: 1 }, { backend: 'default/reviews-v2:80', weight: 3 }]);
  // Eight connections to the parent: exactly two to v1, six to v2 (smooth weighted round robin).
  for (let i = 0; i < 8; i++) assert.ok((await sb.dialFrom(client, parent, 80)).intact, `dial ${i}`);
  await waitFor(async () => (await v1.connections()).length + (await v2.connections()).length === 8, 5000, 'eight connections logged');
  assert.equal((await v1.connections()).length, 2);
  assert.equal((await v2.connections()).length, 6);
  // The metrics name the backend Service each connection went to.
  const m = await agent.metrics();
  const opened = (svc: string): number => metricValue(m, 'istio_tcp_connections_opened_total', { reporter: 'source', destination_service: `${svc}.default.svc.cluster.local` });
  assert.deepEqual([opened('reviews-v1'), opened('reviews-v2'), opened('reviews')], [2, 6, 0]);
  assert.equal(metricValue(m, 'istio_tcp_connections_opened_total', { reporter: 'destination', destination_version: 'v2' }), 6);
  // The backends stay callable on their own addresses.
  assert.ok((await sb.dialFrom(client, v1Ip, 80)).intact);
  await waitFor(async () => (await v1.connections()).length === 3, 5000, 'direct call to v1');
});
