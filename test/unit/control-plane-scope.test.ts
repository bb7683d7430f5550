/**
 * What each node is sent (design.md section 6: what it needs, not the whole mesh): the control
 * plane in this process on loopback, with plain gRPC clients as agents reporting their pods.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { ControlPlane } from '../../src/control-plane/server.js';
import { resourceKey, type WireWorkload } from '../../src/protocol/discovery.js';
import { waitFor } from '../support/sandbox.js';
import { TestAgent } from '../support/test-agent.js';

const service = (ns: string, name: string, ip: string, exportTo?: string): string =>
  `apiVersion: v1
kind: Service
metadata:
  name: ${name}
  namespace: ${ns}
${exportTo === undefined ? '' : `  annotations: {networking.istio.io/exportTo: "${exportTo}"}\n`}spec:
  clusterIP: ${ip}
  selector: {app: ${name}}
  ports: [{name: tcp, port: 80, targetPort: 8080}]
---
`;

const pod = (node: string, ns: string, name: string, app: string, n: number): WireWorkload => ({
  uid: `uid-${name}`,
  namespace: ns,
  name,
  serviceAccount: 'default',
  labels: { app },
  ip4: `10.200.0.${n}`,
  ip6: '',
  node,
});

test('each node is sent the Services its pods may call or serve, their policies and endpoints, not the rest', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-cp-scope-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const write = (text: string): Promise<void> => writeFile(join(dir, 'mesh.yaml'), text);
  const base =
    service('shop', 'web', '10.96.1.1') + // everywhere (no annotation)
    service('shop', 'cart', '10.96.1.2', '.') + // shop only
    service('ops', 'db', '10.96.1.3', 'shop') + // shop only, not even ops
    service('ops', 'metrics', '10.96.1.4', '~') + // nobody calls it; its endpoint's node still learns it
    `apiVersion: networking.nodemesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: cart-lb, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: cart}]
  loadBalancer: {type: LeastRequest}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops}
`;
  await write(base);
  const cp = await ControlPlane.start({ source: { kind: 'dir', dir }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 }, warmupMs: 0 });
  t.after(() => cp.stop());
  const address = `127.0.0.1:${cp.grpcPort()}`;
  const a = new TestAgent(address, 'node-a', [pod('node-a', 'shop', 'client', 'client', 1)]);
  const b = new TestAgent(address, 'node-b', [pod('node-b', 'ops', 'metrics-1', 'metrics', 2)]);
  const c = new TestAgent(address, 'node-c', [pod('node-c', 'shop', 'cart-1', 'cart', 3), pod('node-c', 'ops', 'db-1', 'db', 4)]);
  t.after(() => [a, b, c].forEach((x) => x.stop()));
  const settled = (): boolean => cp.nodes().length === 3 && cp.nodes().every((n) => n.pods > 0 && n.inSync);
  await waitFor(settled, 5000, 'three nodes in sync');

  assert.deepEqual(a.keys('Service'), ['Service/ops/db', 'Service/shop/cart', 'Service/shop/web']);
  assert.deepEqual(a.keys('TrafficPolicy'), ['TrafficPolicy/shop/cart-lb']);
  assert.deepEqual(a.keys('Workload'), ['Workload/ops/db-1', 'Workload/shop/cart-1', 'Workload/shop/client']);
  // ops pods may call web only; metrics is there because node-b serves it.
  assert.deepEqual(b.keys('Service'), ['Service/ops/metrics', 'Service/shop/web']);
  assert.deepEqual(b.keys('TrafficPolicy'), []);
  assert.deepEqual(b.keys('Workload'), ['Workload/ops/metrics-1']);
  // A shop pod lives there (cart and db are exported to shop) and it serves cart and db.
  assert.deepEqual(c.keys('Service'), ['Service/ops/db', 'Service/shop/cart', 'Service/shop/web']);
  for (const x of [a, b, c]) {
    assert.deepEqual(x.keys('Namespace'), ['Namespace//ops'], 'every node gets every Namespace');
    assert.deepEqual(x.keys('MeshSettings'), ['MeshSettings//nodemesh']);
  }

  // Exporting cart everywhere reaches node-b as a Delta with cart, its policy and its endpoint.
  const version = cp.currentVersion();
  await write(base.replace('exportTo: "."', 'exportTo: "*"'));
  await waitFor(() => cp.currentVersion() > version && settled() && b.keys('Service').includes('Service/shop/cart'), 5000, 'cart exported to ops');
  assert.deepEqual(b.keys('TrafficPolicy'), ['TrafficPolicy/shop/cart-lb']);
  assert.deepEqual(b.keys('Workload'), ['Workload/ops/metrics-1', 'Workload/shop/cart-1']);
  assert.deepEqual(cp.snapshotFor('node-b').resources.map(resourceKey).sort(), [...b.held.keys()].sort(), 'the agent holds what /debug/snapshot says');
});

test('a node that may call a routed Service is also sent the route and its backends, wherever they are exported', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-cp-scope-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(
    join(dir, 'mesh.yaml'),
    service('shop', 'reviews', '10.96.1.10') +
      service('shop', 'reviews-v2', '10.96.1.12', '~') + // exported nowhere: reached only through the route
      service('shop', 'other', '10.96.1.13', '.') +
      `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules: [{backendRefs: [{name: reviews, port: 80, weight: 9}, {name: reviews-v2, port: 80, weight: 1}]}]
`,
  );
  const cp = await ControlPlane.start({ source: { kind: 'dir', dir }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 }, warmupMs: 0 });
  t.after(() => cp.stop());
  const address = `127.0.0.1:${cp.grpcPort()}`;
  const a = new TestAgent(address, 'node-a', [pod('node-a', 'ops', 'client', 'client', 1)]);
  const c = new TestAgent(address, 'node-c', [pod('node-c', 'shop', 'reviews-v2-1', 'reviews-v2', 3)]);
  t.after(() => [a, c].forEach((x) => x.stop()));
  await waitFor(() => cp.nodes().length === 2 && cp.nodes().every((n) => n.pods > 0 && n.inSync), 5000, 'two nodes in sync');
  assert.deepEqual(a.keys('HTTPRoute'), ['HTTPRoute/shop/canary']);
  assert.deepEqual(a.keys('Service'), ['Service/shop/reviews', 'Service/shop/reviews-v2'], 'the backend comes with the route; "other" does not');
  assert.deepEqual(a.keys('Workload'), ['Workload/ops/client', 'Workload/shop/reviews-v2-1']);
  assert.deepEqual(a.held.get('HTTPRoute/shop/canary')?.route?.backends.map((b) => [b.name, b.weight]), [['reviews', 9], ['reviews-v2', 1]]);
});
