/**
 * A pod is in the mesh from its first connection, and a routed Service is never served without
 * its route: the runtime hands a new pod to the agent and starts its command only once the agent
 * has captured, verified and configured it; connections of a pod whose config is not there yet
 * (an agent that just restarted without its control plane) wait for it instead of passing
 * through; a direct connection to a backend pod is never reported under the routed parent.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { test } from 'node:test';

import type { LoadResult } from '../../src/cli/debug-tools.js';
import { agentRunDir, ENROLL_SOCKET } from '../../src/runtime/enrollment.js';
import { validatePodSpec } from '../../src/runtime/pod-spec.js';
import { hostAddress } from '../../src/runtime/config.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import { metricValue, serviceYaml, startAgent, startControlPlane } from '../support/agent.js';
import { cli, collect, createSandbox, waitFor } from '../support/sandbox.js';

const PARENT = '10.96.0.60';
const V1 = '10.96.0.61';
const V2 = '10.96.0.62';
const PARENT_LABEL = 'reviews.default.svc.cluster.local';

/** reviews (every version) with a 75/25 canary to reviews-v1 and reviews-v2, as in examples/mesh. */
const CANARY: Record<string, string> = {
  'svc.yaml': [serviceYaml('reviews', [PARENT], { app: 'reviews' }), serviceYaml('reviews-v1', [V1], { app: 'reviews', version: 'v1' }), serviceYaml('reviews-v2', [V2], { app: 'reviews', version: 'v2' })].join('---\n'),
  'route.yaml': [
    'apiVersion: gateway.networking.k8s.io/v1',
    'kind: HTTPRoute',
    'metadata: {name: reviews-canary, namespace: default}',
    'spec:',
    '  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]',
    '  rules: [{backendRefs: [{name: reviews-v1, port: 80, weight: 75}, {name: reviews-v2, port: 80, weight: 25}]}]',
    '',
  ].join('\n'),
};

/** Series of istio_tcp_connections_opened_total whose labels name the routed parent Service. */
function parentSeries(metrics: string): string[] {
  return metrics.split('\n').filter((l) => l.startsWith('istio_tcp_connections_opened_total{') && l.includes(`destination_service="${PARENT_LABEL}"`));
}

test('first connections: 20 pods in a row dial a routed Service as their very first action, all through the mesh and its route', async (t) => {
  const sb = await createSandbox(t);
  for (const a of [PARENT, V1, V2]) await sb.blackhole(a);
  await sb.echoPod('reviews-1', 8080, ['app=reviews', 'version=v1']);
  await sb.echoPod('reviews-2', 8080, ['app=reviews', 'version=v2']);
  const cp = await startControlPlane(sb, CANARY);
  const agent = await startAgent(sb, { controlPlane: cp.address });
  for (let i = 0; i < 20; i++) {
    // No sleep, no retry: the command's first act is the connection.
    const r = await cli(['pod', 'run', '--name', `first-${i}`, '-l', 'app=first', '--', process.execPath, CLI_ENTRY, 'debug', 'dial', PARENT, '80', '--bytes', '2048'], sb.env);
    assert.equal(r.code, 0, `pod first-${i}: ${r.stdout}\n${r.stderr}\nagent log:\n${agent.log().slice(-4000)}`);
    const result = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { ok?: boolean; intact?: boolean };
    assert.equal(result.intact, true, `pod first-${i}: ${r.stdout}`);
    assert.match(r.stderr, /waiting for the node agent to capture pod default\/first-/, 'pod run says what it waits for');
  }
  const m = await agent.metrics();
  const source = { reporter: 'source', source_workload: 'first' };
  const v1 = metricValue(m, 'istio_tcp_connections_opened_total', { ...source, destination_service: 'reviews-v1.default.svc.cluster.local' });
  const v2 = metricValue(m, 'istio_tcp_connections_opened_total', { ...source, destination_service: 'reviews-v2.default.svc.cluster.local' });
  assert.equal(v1 + v2, 20, 'the agent relayed all 20 first connections');
  assert.equal(v1, 15, '75/25 (smooth weighted round robin is exact over 20)');
  assert.deepEqual(parentSeries(m), [], 'no connection was served without the route');
  assert.equal(metricValue(m, 'nodemesh_pod_handovers_total', { result: 'enrolled' }), 20);
  assert.deepEqual(await sb.runtime.list().then((pods) => pods.filter((p) => p.name.startsWith('first-'))), [], 'every pod removed');
});

test('canary route: from the moment the agent is ready, while pods come and go and the agent restarts without its control plane, no connection bypasses the route', async (t) => {
  const sb = await createSandbox(t);
  for (const a of [PARENT, V1, V2]) await sb.blackhole(a);
  const r1 = await sb.echoPod('reviews-1', 8080, ['app=reviews', 'version=v1']);
  await sb.echoPod('reviews-2', 8080, ['app=reviews', 'version=v2']);
  const client = await sb.idlePod('client', ['app=client']);
  const cp = await startControlPlane(sb, CANARY);
  // Held connections wait up to the connect timeout: long enough here for the control plane to
  // come back and the agent's reconnect backoff (full jitter, doubling) to find it.
  const agent = await startAgent(sb, { controlPlane: cp.address }, { args: ['--connect-timeout', '30000'] });

  // Load at a high rate from the moment the agent is ready, while backend pods come and go
  // (endpoint deltas) and unmeshed clients (the host) call a backend pod directly: the demo's
  // own readiness check did that, and such a connection was reported under the parent.
  const load = collect(sb.runtime.exec(client, [process.execPath, CLI_ENTRY, 'debug', 'load', `${PARENT}:80`, '--rate', '200', '--duration', '4000'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  for (let i = 0; i < 3; i++) {
    const extra = await sb.echoPod(`reviews-extra-${i}`, 8080, ['app=reviews', `version=v${1 + (i % 2)}`]);
    const direct = await cli(['debug', 'dial', r1.record.ip4, '8080', '--bytes', '100'], sb.env);
    assert.equal(direct.code, 0, `direct connection from the host to a backend pod: ${direct.stdout}${direct.stderr}`);
    await sb.runtime.remove(extra.record, 500);
  }
  const first = await load;
  const firstResult = JSON.parse(first.stdout.trim().split('\n').pop() ?? '{}') as LoadResult;
  const firstCounts = firstResult.targets[`${PARENT}:80`];
  assert.ok(firstCounts && firstCounts.ok > 100 && firstCounts.failed === 0, `load while pods came and went: ${first.stdout}${first.stderr}`);
  let m = await agent.metrics();
  assert.deepEqual(parentSeries(m), [], 'no connection reported under the routed parent');
  assert.ok(metricValue(m, 'istio_tcp_connections_opened_total', { reporter: 'destination', source_workload: 'unknown', destination_service: 'reviews-v1.default.svc.cluster.local' }) >= 3, 'the direct connections are reported under the backend that selects the pod');

  // The agent restarts while its control plane is down: the pods stay captured (pinned links),
  // the new agent opens their listeners, but it has no config. A connection now must wait for
  // the config, not pass through to the Service address (out of the mesh).
  await cp.kill('SIGKILL');
  await agent.kill('SIGKILL');
  await agent.restart({ waitReady: false });
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified && !x.configured), 'pods re-adopted, verified, no config yet');
  assert.equal(await agent.ready(), 503, 'not ready without the config');
  const held = collect(sb.runtime.exec(client, [process.execPath, CLI_ENTRY, 'debug', 'dial', PARENT, '80', '--bytes', '1000', '--timeout', '40000'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_connections_held_for_config_total') === 1, 10_000, 'the connection is held for the config');
  await cp.restart();
  const dial = await held;
  assert.equal(dial.code, 0, `the held connection went through once the config came: ${dial.stdout}${dial.stderr}`);
  assert.equal((JSON.parse(dial.stdout.trim()) as { intact: boolean }).intact, true);
  await waitFor(async () => (await agent.ready()) === 200, 10_000, 'ready once the snapshot covers every pod');
  m = await agent.metrics();
  assert.deepEqual(parentSeries(m), [], 'the held connection took the route');
  assert.equal(metricValue(m, 'istio_tcp_connections_opened_total', { reporter: 'source', source_workload: 'client' }), 1);
});

test('hand-over: refused requests name the field, a pod the mesh leaves out starts at once, no config in time is a clear error and no pod, one agent per node', async (t) => {
  const sb = await createSandbox(t);
  const cp = await startControlPlane(sb, {
    'ns.yaml': 'apiVersion: v1\nkind: Namespace\nmetadata: {name: skipped, labels: {nodemesh.io/capture: disabled}}\n',
  });
  const agent = await startAgent(sb, { controlPlane: cp.address });
  const socketPath = join(agentRunDir(sb.config.stateDir, sb.config.node), ENROLL_SOCKET);

  const post = (body: string): Promise<{ status: number; body: string }> =>
    new Promise((resolve, reject) => {
      const req = request({ socketPath, method: 'POST', path: '/v1/pods', headers: { 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      });
      req.on('error', reject);
      req.end(body);
    });
  // Addresses in the sandbox's pod subnets (the agent checks them), netns and cgroup to be refused.
  const pod = {
    uid: '2b5f7a52-7c42-4d0e-9d55-0d5c7b8e9f10',
    name: 'x',
    namespace: 'default',
    serviceAccount: 'default',
    labels: {},
    ip4: hostAddress(sb.config.podCidr4, 4, 200),
    ip6: hostAddress(sb.config.podCidr6, 6, 200),
    netnsPath: '/run/netns/nmt_x',
    cgroupPath: '/sys/fs/cgroup',
  };
  const refused: Array<[unknown, RegExp]> = [
    ['not json', /not JSON/],
    [{ pod, timeoutMs: 0 }, /timeoutMs/],
    [{ pod: { ...pod, uid: '../../../../etc' }, timeoutMs: 1000 }, /pod\.uid: "..\/..\/..\/..\/etc" is not a UUID/],
    [{ pod: { ...pod, name: 'Bad_Name' }, timeoutMs: 1000 }, /pod\.name/],
    [{ pod: { ...pod, cgroupPath: '/sys/fs/cgroup/../etc' }, timeoutMs: 1000 }, /pod\.cgroupPath: .* not an absolute, normalised path/],
    [{ pod: { ...pod, cgroupPath: '/sys/fs/cgroup/system.slice' }, timeoutMs: 1000 }, /pod\.cgroupPath: .* not under this node's pod cgroups/],
  ];
  for (const [body, message] of refused) {
    const r = await post(typeof body === 'string' ? body : JSON.stringify(body));
    assert.equal(r.status, 400, r.body);
    assert.match((JSON.parse(r.body) as { error: { message: string } }).error.message, message);
  }
  // Only the runtime's network namespaces (a pod cgroup that exists, to get that far).
  const idle = await sb.idlePod('idle');
  const hostNs = await post(JSON.stringify({ pod: { ...pod, cgroupPath: idle.cgroupPath, netnsPath: '/proc/1/ns/net' }, timeoutMs: 1000 }));
  assert.equal(hostNs.status, 400);
  assert.match(hostNs.body, /pod\.netnsPath: \\"\/proc\/1\/ns\/net\\" is not a network namespace of the runtime/);
  // Another pod's address.
  const taken = await post(JSON.stringify({ pod: { ...pod, cgroupPath: idle.cgroupPath, netnsPath: idle.netnsPath, ip4: idle.ip4 }, timeoutMs: 1000 }));
  assert.equal(taken.status, 500);
  assert.match(taken.body, /is pod default\/idle's/);

  // A namespace that opts out: the pod starts at once, not enrolled.
  const spec = validatePodSpec({ name: 'free', namespace: 'skipped', command: ['sleep', 'infinity'] });
  const started = await sb.runtime.start(await sb.runtime.create(spec, { detached: true }));
  assert.deepEqual(started.enrollment, { agent: true, enrolled: false, reason: 'capture is not enabled for the pod or its namespace (enrollment: all)' });
  assert.equal((await agent.pods()).some((p) => p.name === 'free'), false);

  // Without its control plane the agent cannot get a new pod's config: pod run fails in time,
  // with the state named, and removes the pod.
  await cp.kill('SIGKILL');
  const r = await cli(['pod', 'run', '--name', 'late', '--enroll-timeout', '2s', '--', 'true'], sb.env);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /^error NM_ERR_ENROLL_TIMEOUT: the node agent did not have pod default\/late in the mesh within 2 s: enrolled and verified, but the control plane has not sent its config/m);
  assert.equal((await sb.runtime.list()).some((p) => p.name === 'late'), false, 'the pod was removed');
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_pod_handovers_total', { result: 'timeout' }), 1);

  // A second agent for the same node stops before it touches anything.
  const second = await cli(['agent', '--config-dir', agent.configDir, '--bpf-root', join(sb.bpffsDir, 'second'), '--metrics', '127.0.0.1:0', '--ready', '127.0.0.1:0', '--admin', '127.0.0.1:0'], sb.env);
  assert.equal(second.code, 1);
  assert.match(second.stderr, /error NM_ERR_AGENT_RUNNING: another agent already serves this node/);

  // A stopped agent leaves no run folder behind (the runtime's state folder can go when empty).
  await agent.kill('SIGTERM');
  assert.equal(existsSync(agentRunDir(sb.config.stateDir, sb.config.node)), false, 'run folder removed');
});
