/** The Discovery codec: config model -> wire -> config model, digests, and what the agent refuses. */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DEFAULT_MESH } from '../../src/config/mesh.js';
import type { MeshConfig } from '../../src/config/store.js';
import { SnapshotInvalid, decodeSnapshot, digestOf, snapshotMessage, type WireWorkload } from '../../src/shared/protocol/discovery.js';

const config: MeshConfig = {
  services: [{ namespace: 'shop', name: 'cart', clusterIPs: ['10.96.0.9', 'fd00::9'], ports: [{ name: 'http', port: 80, targetPort: 8080, protocol: 'TCP' }], selector: { app: 'cart' } }],
  trafficPolicies: [
    {
      namespace: 'shop',
      name: 'cart-lb',
      services: ['cart'],
      policy: { source: 'shop/cart-lb', loadBalancing: 'least-connections', maxConnections: 10, connectTimeoutMs: 250, idleTimeoutMs: undefined, outlier: { consecutiveConnectErrors: 2, baseEjectionMs: 1000, maxEjectionPercent: 100 } },
    },
  ],
  namespaces: new Map([['shop', { name: 'shop', labels: { 'nodemesh.io/enabled': 'true' } }]]),
  mesh: { enrollment: 'opt-in', failClosedEnrollment: true },
};
const pod: WireWorkload = { uid: 'u1', namespace: 'shop', name: 'cart-1', serviceAccount: 'cart', labels: { app: 'cart' }, ip4: '10.200.0.5', ip6: 'fd00:6e6d::5', node: 'n1' };

test('a snapshot decodes to the config it was made from', () => {
  const s = snapshotMessage(42, config, [pod]);
  const d = decodeSnapshot(s);
  assert.deepEqual(d.config.services, config.services);
  assert.deepEqual(d.config.trafficPolicies, config.trafficPolicies);
  assert.deepEqual([...d.config.namespaces.values()], [...config.namespaces.values()]);
  assert.deepEqual(d.config.mesh, config.mesh);
  const { node: _node, ...workload } = pod;
  assert.deepEqual(d.workloads, [workload]);
});

test('the digest depends on content, not on key order or version', () => {
  const a = snapshotMessage(1, config, [pod]);
  const reordered: WireWorkload = { node: 'n1', ip6: pod.ip6, ip4: pod.ip4, labels: { app: 'cart' }, serviceAccount: 'cart', name: 'cart-1', namespace: 'shop', uid: 'u1' };
  assert.equal(snapshotMessage(2, config, [reordered]).digest, a.digest);
  assert.notEqual(snapshotMessage(1, { ...config, mesh: DEFAULT_MESH }, [pod]).digest, a.digest);
  assert.equal(digestOf(a.resources), a.digest);
});

test('a snapshot with a bad resource is refused whole, each problem named', () => {
  const bad = snapshotMessage(5, { ...config, services: [{ ...config.services[0]!, clusterIPs: ['10.96.0.999'], ports: [{ name: 'x', port: 70000, targetPort: 1, protocol: 'TCP' }] }] }, [{ ...pod, ip4: 'nope' }]);
  assert.throws(
    () => decodeSnapshot(bad),
    (e: unknown) => {
      assert.ok(e instanceof SnapshotInvalid);
      assert.deepEqual(
        e.errors.map((x) => `${x.object} ${x.field}`),
        ['Service shop/cart spec.clusterIPs[0]', 'Service shop/cart spec.ports[0].port', 'Workload shop/cart-1 ip4'],
      );
      return true;
    },
  );
  const dup = snapshotMessage(6, config, [pod, pod]);
  assert.throws(() => decodeSnapshot(dup), /Workload shop\/cart-1 metadata.name: appears twice/);
  assert.throws(() => decodeSnapshot({ ...snapshotMessage(7, config, []), version: 0 }), /version 0 is not a positive integer/);
});
