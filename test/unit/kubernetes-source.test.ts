/**
 * The control plane's Kubernetes source against the in-test API server (test/support/
 * fake-kube-api.ts; no real one can run here): adds, updates and deletes reach the agents, a
 * rejected object keeps its last good version, a watch that drops mid-event resumes without a
 * list, and a watch from a compacted version (410) lists again and catches up.
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';

import { ControlPlane } from '../../src/control-plane/server.js';
import { KubeApi } from '../../src/kube/api.js';
import { ReviewRateLimited, TokenReviewAuthenticator } from '../../src/control-plane/sources/token-review.js';
import { metricValue } from '../support/agent.js';
import { kubeconfigFor, startFakeKubeApi, type FakeKubeApi, type Obj } from '../support/fake-kube-api.js';
import { waitFor } from '../support/sandbox.js';
import { scratch } from '../support/scratch.js';
import { TestAgent } from '../support/test-agent.js';

const SERVICES = '/api/v1/services';
const PODS = '/api/v1/pods';
const NAMESPACES = '/api/v1/namespaces';

const service = (name: string, port: number, extra: Record<string, unknown> = {}): Obj => ({
  apiVersion: 'v1',
  kind: 'Service',
  metadata: { name, namespace: 'shop', uid: `svc-${name}`, creationTimestamp: '2026-12-01T00:00:00Z', managedFields: [] },
  // What an API server returns: defaults filled in, status present.
  spec: { type: 'ClusterIP', clusterIP: `10.96.2.${port % 250}`, clusterIPs: [`10.96.2.${port % 250}`], ipFamilies: ['IPv4'], ipFamilyPolicy: 'SingleStack', internalTrafficPolicy: 'Cluster', sessionAffinity: 'None', selector: { app: name }, ports: [{ name: 'http', port, protocol: 'TCP', targetPort: 8080 }], ...extra },
  status: { loadBalancer: {} },
});

const pod = (name: string, app: string, node: string, ip: string, ready = true): Obj => ({
  apiVersion: 'v1',
  kind: 'Pod',
  metadata: { name, namespace: 'shop', uid: `pod-${name}`, labels: { app }, ownerReferences: [{ kind: 'ReplicaSet', name: `${app}-rs` }] },
  spec: { nodeName: node, serviceAccountName: app, containers: [{ name: 'app', image: 'x' }] },
  status: { phase: 'Running', podIP: ip, podIPs: [{ ip }], conditions: [{ type: 'Ready', status: ready ? 'True' : 'False' }] },
});

/** An API server, a kubeconfig for it, and clean-up that stops agents, then the control plane, then the server. */
async function testbed(t: TestContext): Promise<{ api: FakeKubeApi; dir: string; kubeconfig: string; stops: Array<() => unknown> }> {
  const api = await startFakeKubeApi();
  const { dir, stops } = await scratch(t, 'nodemesh-kube');
  // Pushed first, so it runs last: agents, then the control plane, then the API server it watches.
  stops.push(() => api.close());
  const kubeconfig = join(dir, 'kubeconfig');
  await writeFile(kubeconfig, kubeconfigFor(api));
  return { api, dir, kubeconfig, stops };
}

test('Kubernetes source: list+watch adds, updates, deletes; last good on a bad object; dropped watches resume; 410 lists again', async (t) => {
  const { api, kubeconfig, stops } = await testbed(t);

  api.put(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'shop', labels: { 'nodemesh.io/enabled': 'true' } }, spec: { finalizers: ['kubernetes'] }, status: { phase: 'Active' } });
  api.put(SERVICES, service('web', 80));
  api.put(PODS, pod('web-1', 'web', 'node-a', '10.200.0.5'));
  api.put(PODS, pod('web-2', 'web', 'node-a', '10.200.0.6', false)); // not ready: no endpoint
  api.put(PODS, pod('client', 'client', 'node-b', '10.200.0.7'));
  // No PeerAuthentication CRD on this cluster: that resource is empty, the rest is served.
  api.notServed('/apis/security.nodemesh.io/v1/peerauthentications');
  // An AuthorizationPolicy with a field nodemesh does not enforce yet (L7): refused and named, never silently ignored.
  api.put('/apis/security.nodemesh.io/v1/authorizationpolicies', { apiVersion: 'security.nodemesh.io/v1', kind: 'AuthorizationPolicy', metadata: { name: 'deny-all', namespace: 'shop' }, spec: { action: 'DENY', rules: [{ to: [{ operation: { methods: ['POST'] } }] }] } });

  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig, watchTimeoutSeconds: 60 }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  stops.push(() => cp.stop());
  // Both ports from the kernel (a port picked beforehand could be handed to gRPC's port 0).
  const http = cp.httpPort();
  const b = new TestAgent(`127.0.0.1:${cp.grpcPort()}`, 'node-b', []);
  stops.push(() => b.stop());
  const serviceOf = (name: string): { ports: Array<{ port: number }> } | undefined => b.held.get(`Service/shop/${name}`)?.service;
  const metrics = async (): Promise<string> => (await fetch(`http://127.0.0.1:${http}/metrics`)).text();

  await waitFor(() => serviceOf('web') !== undefined, 5000, 'web from the API');
  assert.equal((await fetch(`http://127.0.0.1:${http}/healthz/ready`)).status, 200);
  assert.deepEqual(b.keys('Workload'), ['Workload/shop/client', 'Workload/shop/web-1'], 'the ready endpoint and the node\'s own pod');
  assert.equal(b.held.get('Workload/shop/client')?.workload?.serviceAccount, 'client');
  assert.deepEqual(b.held.get('Namespace//shop')?.namespace?.labels, { 'nodemesh.io/enabled': 'true' });

  // A Service without a selector: its endpoints are those of its EndpointSlices (ready ones),
  // and its target port is the slices' port of the same name.
  const SLICES = '/apis/discovery.k8s.io/v1/endpointslices';
  api.put(SERVICES, { ...service('external-db', 5432), spec: { clusterIP: '10.96.2.99', ports: [{ name: 'pg', port: 5432, protocol: 'TCP', targetPort: 5432 }] } });
  const slice = (ready51: boolean): Obj => ({
    apiVersion: 'discovery.k8s.io/v1',
    kind: 'EndpointSlice',
    metadata: { name: 'external-db-x1', namespace: 'shop', labels: { 'kubernetes.io/service-name': 'external-db' } },
    addressType: 'IPv4',
    ports: [{ name: 'pg', port: 15432, protocol: 'TCP' }],
    endpoints: [
      { addresses: ['10.200.0.50'], conditions: { ready: true } },
      { addresses: ['10.200.0.51'], conditions: { ready: ready51 } },
    ],
  });
  api.put(SLICES, slice(false));
  const sliceWorkloads = (): string[] => b.keys('Workload').filter((k) => k.includes('external-db'));
  await waitFor(() => sliceWorkloads().length === 1, 5000, 'the ready slice endpoint');
  assert.equal(serviceOf('external-db') && (b.held.get('Service/shop/external-db')?.service?.ports[0]?.targetPort), 15432);
  assert.deepEqual(b.held.get('Service/shop/external-db')?.service?.selector, { 'endpointslice.nodemesh.io/service': 'external-db' });
  assert.equal(b.held.get(sliceWorkloads()[0] ?? '')?.workload?.ip4, '10.200.0.50');
  api.put(SLICES, slice(true));
  await waitFor(() => sliceWorkloads().length === 2, 5000, 'the second endpoint, ready now');
  api.remove(SLICES, 'shop', 'external-db-x1');
  await waitFor(() => sliceWorkloads().length === 0, 5000, 'slice deleted: no endpoints');

  // Add, update, delete.
  api.put(SERVICES, service('cart', 81));
  api.put(PODS, pod('cart-1', 'cart', 'node-a', '10.200.0.8'));
  await waitFor(() => serviceOf('cart') !== undefined && b.keys('Workload').includes('Workload/shop/cart-1'), 5000, 'cart added');
  api.put(SERVICES, service('web', 8080));
  await waitFor(() => serviceOf('web')?.ports[0]?.port === 8080, 5000, 'web updated');
  api.remove(SERVICES, 'shop', 'cart');
  await waitFor(() => serviceOf('cart') === undefined && !b.keys('Workload').includes('Workload/shop/cart-1'), 5000, 'cart deleted, its endpoint no longer sent');
  api.put(PODS, pod('web-2', 'web', 'node-a', '10.200.0.6', true));
  await waitFor(() => b.keys('Workload').includes('Workload/shop/web-2'), 5000, 'web-2 ready: an endpoint now');

  // A bad update (a typo the API server would have pruned, or an object we cannot serve): the
  // last good version keeps serving, the error names object and field.
  api.put(SERVICES, service('web', 9090, { selectr: { app: 'web' } }));
  await waitFor(async () => metricValue(await metrics(), 'nodemesh_cp_config_rejected_objects', { kind: 'Service' }) === 1, 5000, 'web rejected');
  assert.equal(metricValue(await metrics(), 'nodemesh_cp_config_rejected_objects', { kind: 'AuthorizationPolicy' }), 1);
  assert.equal(serviceOf('web')?.ports[0]?.port, 8080, 'the last good web keeps serving');
  const debug = (await (await fetch(`http://127.0.0.1:${http}/debug/snapshot?node=node-b`)).json()) as { configErrors: Array<{ object: string; field: string; file: string; keptLastGood: boolean }> };
  assert.deepEqual(debug.configErrors.map((e) => [e.file, e.object, e.field, e.keptLastGood]), [
    ['kubernetes:services', 'Service shop/web', 'spec.selectr', true],
    ['kubernetes:authorizationpolicies', 'AuthorizationPolicy shop/deny-all', 'spec.rules[0].to[0].operation.methods', false],
  ]);
  api.put(SERVICES, service('web', 8080));

  // Bookmarks move the version on; a watch cut in the middle of an event resumes from the last
  // version seen (no list) and the event arrives whole.
  api.bookmark();
  await waitFor(async () => metricValue(await metrics(), 'nodemesh_cp_kube_watch_events_total', { resource: 'services', type: 'BOOKMARK' }) >= 1, 5000, 'bookmark received');
  const lists = (): number => api.requests.filter((r) => r === `list ${SERVICES}`).length;
  const listsBefore = lists();
  api.cutNextEvent();
  api.put(SERVICES, service('late', 82));
  await waitFor(() => serviceOf('late') !== undefined, 5000, 'the cut event arrives after the re-watch');
  assert.equal(lists(), listsBefore, 'a dropped watch resumes without a list');
  assert.ok(metricValue(await metrics(), 'nodemesh_cp_kube_errors_total', { resource: 'services', reason: 'connection' }) >= 1, 'the cut is counted');
  // A line that is not JSON: counted, the watch made again from the last good version, nothing lost.
  const garbled = async (): Promise<boolean> => {
    if (metricValue(await metrics(), 'nodemesh_cp_kube_errors_total', { resource: 'services', reason: 'garbled' }) >= 1) return true;
    // Sent again until one lands (a watch being made again at that moment would miss it).
    api.sendRaw(SERVICES, '{"type":"ADDED","object":{garbage\n');
    return false;
  };
  await waitFor(garbled, 5000, 'garbled line counted');
  api.put(SERVICES, service('later', 84));
  await waitFor(() => serviceOf('later') !== undefined, 5000, 'events after the garbled line arrive');
  assert.equal(lists(), listsBefore, 'still no list');

  // While no watch can be made, changes happen and history is compacted: the re-watch from the
  // old version gets 410, the source lists again and catches up.
  api.refuseWatches(true);
  api.dropWatches();
  await waitFor(() => api.openWatches() === 0, 5000, 'watches dropped');
  api.remove(SERVICES, 'shop', 'late');
  api.put(SERVICES, service('cart', 83));
  api.compact();
  await waitFor(async () => metricValue(await metrics(), 'nodemesh_cp_kube_errors_total', { resource: 'services', reason: 'server_error' }) >= 1, 5000, 'a refused watch (503) counted');
  api.refuseWatches(false);
  await waitFor(() => serviceOf('late') === undefined && serviceOf('cart')?.ports[0]?.port === 83, 10_000, 'caught up after the 410');
  assert.ok(lists() > listsBefore, 'listed again');
  const m = await metrics();
  assert.ok(metricValue(m, 'nodemesh_cp_kube_lists_total', { resource: 'services', reason: 'expired' }) >= 1);
  assert.deepEqual(cp.snapshotFor('node-b').resources.filter((r) => r.service).map((r) => r.service?.name).sort(), ['cart', 'external-db', 'later', 'web']);
});

test('Kubernetes source: nothing is pushed before the first list, and a bad kubeconfig is a clear error', async (t) => {
  const { dir, stops } = await scratch(t, 'nodemesh-kube');
  await assert.rejects(
    ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig: join(dir, 'missing') }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }),
    (e: Error & { code?: string }) => e.code === 'NM_ERR_KUBE_CONFIG' && e.message.includes('missing'),
  );
  // An API server that refuses us (wrong token): the control plane runs, is not ready, sends nothing.
  const api = await startFakeKubeApi();
  stops.push(() => api.close());
  api.put(SERVICES, service('web', 80));
  await writeFile(join(dir, 'kubeconfig'), kubeconfigFor(api).replace(api.token, 'wrong-token'));
  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig: join(dir, 'kubeconfig') }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  stops.push(() => cp.stop());
  // Both ports from the kernel (a port picked beforehand could be handed to gRPC's port 0).
  const http = cp.httpPort();
  const agent = new TestAgent(`127.0.0.1:${cp.grpcPort()}`, 'node-a', []);
  stops.push(() => agent.stop());
  await waitFor(async () => metricValue(await (await fetch(`http://127.0.0.1:${http}/metrics`)).text(), 'nodemesh_cp_kube_errors_total', { reason: 'unauthorized' }) >= 5, 5000, 'every resource refused');
  assert.equal((await fetch(`http://127.0.0.1:${http}/healthz/ready`)).status, 503);
  assert.equal(agent.version, 0, 'the agent was sent nothing (not an empty config)');
});

test('Kubernetes source: agents authenticate with pod-bound ServiceAccount tokens (TokenReview) and speak only for their node', async (t) => {
  const { api, dir, kubeconfig, stops } = await testbed(t);
  api.put(SERVICES, service('web', 80));
  const agentSa = 'system:serviceaccount:nodemesh-system:nodemesh-agent';
  api.reviewToken('token-of-agent-on-node-a', agentSa, 'node-a');
  api.reviewToken('token-of-some-app-on-node-a', 'system:serviceaccount:shop:web', 'node-a');
  api.reviewToken('token-without-pod-binding', agentSa, undefined);
  // A valid token of the agents' ServiceAccount, but the review does not name nodemesh's audience.
  api.reviewToken('token-for-another-audience', agentSa, 'node-a', ['https://kubernetes.default.svc']);
  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig }, agentServiceAccount: 'nodemesh-system/nodemesh-agent', listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  stops.push(() => cp.stop());
  // Both ports from the kernel (a port picked beforehand could be handed to gRPC's port 0).
  const http = cp.httpPort();
  const address = `127.0.0.1:${cp.grpcPort()}`;
  const agents = {
    good: new TestAgent(address, 'node-a', [], 'token-of-agent-on-node-a'),
    otherNode: new TestAgent(address, 'node-b', [], 'token-of-agent-on-node-a'),
    otherAccount: new TestAgent(address, 'node-a', [], 'token-of-some-app-on-node-a'),
    unbound: new TestAgent(address, 'node-a', [], 'token-without-pod-binding'),
    unknown: new TestAgent(address, 'node-a', [], 'not-a-token'),
    otherAudience: new TestAgent(address, 'node-a', [], 'token-for-another-audience'),
  };
  stops.push(() => Object.values(agents).forEach((a) => a.stop()));
  await waitFor(() => agents.good.version > 0, 5000, 'the agent of node-a is served');
  const refused = [agents.otherNode, agents.otherAccount, agents.unbound, agents.unknown, agents.otherAudience];
  await waitFor(() => refused.every((a) => a.error !== undefined), 5000, 'the others are refused');
  assert.equal(agents.otherNode.error?.code, 7, 'PERMISSION_DENIED: node-a\'s agent claiming node-b');
  assert.deepEqual([agents.otherAccount, agents.unbound, agents.unknown, agents.otherAudience].map((a) => a.error?.code), [16, 16, 16, 16], 'UNAUTHENTICATED');
  assert.ok(refused.every((a) => a.version === 0));
  assert.ok(agents.good.keys('Service').includes('Service/shop/web'));
  // Reconnects are answered from the review cache, not with a TokenReview each.
  const reviews = api.requests.filter((r) => r === 'create tokenreviews').length;
  const again = new TestAgent(address, 'node-a', [], 'token-of-agent-on-node-a');
  stops.push(() => again.stop());
  await waitFor(() => again.version > 0, 5000, 'reconnect served');
  assert.equal(api.requests.filter((r) => r === 'create tokenreviews').length, reviews);
  await assert.rejects(
    ControlPlane.start({ source: { kind: 'dir', dir }, agentServiceAccount: 'nodemesh-system/nodemesh-agent', listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }),
    (e: Error & { code?: string }) => e.code === 'NM_ERR_INVALID_ARGUMENT',
  );
});

test('TokenReview: tokens not in the cache are reviewed at a bounded rate; beyond it the caller is told to come back, the API server is not asked', async (t) => {
  const { api, kubeconfig } = await testbed(t);
  const agentSa = 'system:serviceaccount:nodemesh-system:nodemesh-agent';
  for (const n of ['a', 'b', 'c']) api.reviewToken(`token-of-node-${n}`, agentSa, `node-${n}`);
  const reviews = new TokenReviewAuthenticator(KubeApi.load({ kubeconfig }), 'nodemesh-system/nodemesh-agent', { burst: 2, perSecond: 0.01 });
  assert.equal(await reviews.nodeOf('token-of-node-a'), 'node-a');
  assert.equal(await reviews.nodeOf('token-of-node-b'), 'node-b');
  const asked = api.requests.filter((r) => r === 'create tokenreviews').length;
  await assert.rejects(reviews.nodeOf('token-of-node-c'), ReviewRateLimited);
  assert.equal(api.requests.filter((r) => r === 'create tokenreviews').length, asked, 'the API server was not asked');
  // A token reviewed before is still answered from the cache.
  assert.equal(await reviews.nodeOf('token-of-node-a'), 'node-a');
});
