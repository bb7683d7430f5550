/**
 * The control plane's Kubernetes source against the in-test API server (test/support/
 * fake-kube-api.ts), for what a real API server cannot be made to do on demand; everything else
 * runs against the real one in test/integration/kube-apiserver.test.ts. Here: a bookmark (the
 * real one sends them about once a minute, at a watch's end), a watch cut in the middle of an
 * event, a line that is not JSON, a watch refused with 503, and a Service with a field the real
 * one would have pruned before anyone read it (built-in kinds drop unknown fields on write).
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';

import { ControlPlane } from '../../src/control-plane/server.js';
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

test('Kubernetes source, faults of the API server: a bookmark moves the version on; a watch cut mid-event resumes without a list; a garbled line is counted and the watch made again; a refused watch is retried; an object the source refuses keeps its last good version', async (t) => {
  const { api, kubeconfig, stops } = await testbed(t);
  api.put(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: 'shop' }, spec: { finalizers: ['kubernetes'] }, status: { phase: 'Active' } });
  api.put(SERVICES, service('web', 80));
  api.put(PODS, pod('web-1', 'web', 'node-a', '10.200.0.5'));

  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig, watchTimeoutSeconds: 60 }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  stops.push(() => cp.stop());
  // Both ports from the kernel (a port picked beforehand could be handed to gRPC's port 0).
  const http = cp.httpPort();
  const b = new TestAgent(`127.0.0.1:${cp.grpcPort()}`, 'node-b', []);
  stops.push(() => b.stop());
  const serviceOf = (name: string): { ports: Array<{ port: number }> } | undefined => b.held.get(`Service/shop/${name}`)?.service;
  const metrics = async (): Promise<string> => (await fetch(`http://127.0.0.1:${http}/metrics`)).text();
  await waitFor(() => serviceOf('web') !== undefined, 5000, 'web from the API');

  // A field the real API server would have pruned (a typo): the last good web keeps serving,
  // the error names object and field.
  api.put(SERVICES, service('web', 9090, { selectr: { app: 'web' } }));
  await waitFor(async () => metricValue(await metrics(), 'nodemesh_cp_config_rejected_objects', { kind: 'Service' }) === 1, 5000, 'web rejected');
  assert.equal(serviceOf('web')?.ports[0]?.port, 80, 'the last good web keeps serving');
  const debug = (await (await fetch(`http://127.0.0.1:${http}/debug/snapshot?node=node-b`)).json()) as { configErrors: Array<{ object: string; field: string; file: string; keptLastGood: boolean }> };
  assert.deepEqual(debug.configErrors.map((e) => [e.file, e.object, e.field, e.keptLastGood]), [['kubernetes:services', 'Service shop/web', 'spec.selectr', true]]);
  api.put(SERVICES, service('web', 8080));
  await waitFor(() => serviceOf('web')?.ports[0]?.port === 8080, 5000, 'web good again');

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

  // Watches refused (503) for a while: counted, retried with backoff, and what changed meanwhile arrives.
  api.refuseWatches(true);
  api.dropWatches();
  await waitFor(() => api.openWatches() === 0, 5000, 'watches dropped');
  api.remove(SERVICES, 'shop', 'late');
  await waitFor(async () => metricValue(await metrics(), 'nodemesh_cp_kube_errors_total', { resource: 'services', reason: 'server_error' }) >= 1, 5000, 'a refused watch (503) counted');
  api.refuseWatches(false);
  await waitFor(() => serviceOf('late') === undefined, 10_000, 'caught up once watches are served again');
  assert.deepEqual(cp.snapshotFor('node-b').resources.filter((r) => r.service).map((r) => r.service?.name).sort(), ['later', 'web']);
});
