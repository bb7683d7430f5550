import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { MeshSnapshot, type Workload } from '../../src/config/snapshot.js';
import { ObjectInvalid, parseService } from '../../src/config/service.js';
import { readConfigDir } from '../../src/config/source-dir.js';
import { LoadBalancer } from '../../src/proxy/pool/load-balancer.js';

const svc = (spec: Record<string, unknown>, extra: Record<string, unknown> = {}) => ({ apiVersion: 'v1', kind: 'Service', metadata: { name: 'web', namespace: 'shop' }, spec, ...extra });

const pod = (name: string, labels: Record<string, string>, n: number): Workload => ({
  uid: `uid-${name}`,
  name,
  namespace: 'shop',
  serviceAccount: 'default',
  labels,
  ip4: `10.0.0.${n}`,
  ip6: `fd00::${n}`,
});

test('Service validation names the field', () => {
  const ok = parseService(svc({ clusterIPs: ['10.96.0.1', 'fd00::1'], selector: { app: 'web' }, ports: [{ port: 80, targetPort: 8080 }] }));
  assert.deepEqual(ok.ports, [{ name: '', port: 80, targetPort: 8080, protocol: 'TCP' }]);
  assert.deepEqual(ok.clusterIPs, ['10.96.0.1', 'fd00::1']);
  const bad: Array<[Record<string, unknown>, string]> = [
    [svc({ clusterIP: '10.96.0.1', ports: [] }), 'spec.ports'],
    [svc({ clusterIP: 'None', ports: [{ port: 80 }] }), 'spec.clusterIP'],
    [svc({ clusterIP: '10.96.0.1', ports: [{ port: 70000 }] }), 'spec.ports[0].port'],
    [svc({ clusterIP: '10.96.0.1', ports: [{ port: 80, targetPort: 'http' }] }), 'spec.ports[0].targetPort'],
    [svc({ clusterIP: '10.96.0.1', ports: [{ port: 53, protocol: 'UDP' }] }), 'spec.ports[0].protocol'],
    [svc({ clusterIP: '10.96.0.1', ports: [{ port: 80 }, { port: 80 }] }), 'spec.ports[1].port'],
    [svc({ clusterIP: '10.96.0.1', ports: [{ port: 80 }], selectr: {} }), 'spec.selectr'],
    [svc({ clusterIP: '10.96.0.1', ports: [{ port: 80 }] }, { extra: 1 }), 'extra'],
    [{ ...svc({ clusterIP: '10.96.0.1', ports: [{ port: 80 }] }), metadata: { name: 'Web' } }, 'metadata.name'],
  ];
  for (const [doc, field] of bad) {
    assert.throws(() => parseService(doc), (e) => e instanceof ObjectInvalid && e.field === field, field);
  }
});

test('the config folder: multi-document, bad objects reported with file and object, the rest kept', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'a.yaml'), 'apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n');
  await writeFile(join(dir, 'b.yml'), 'apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\n- not a mapping\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated}\ndata: {a: b}\n');
  await writeFile(join(dir, 'c.txt'), 'ignored');
  const { services, issues } = await readConfigDir(dir);
  assert.deepEqual(services.map((s) => s.name), ['a']);
  assert.deepEqual(
    issues.map((i) => [i.file.split('/').pop(), i.object, i.field]),
    [
      ['a.yaml', 'Service default/a', 'metadata.name'],
      ['b.yml', 'Deployment default/x', 'kind'],
      ['b.yml', 'document 2', ''],
    ],
  );
});

test('snapshot: endpoints from labels in the same namespace, by virtual address and port', () => {
  const s = parseService(svc({ clusterIPs: ['10.96.0.1', 'fd00::1'], selector: { app: 'web' }, ports: [{ port: 80, targetPort: 8080 }] }));
  const other = { ...pod('web-x', { app: 'web' }, 9), namespace: 'other' };
  const snap = new MeshSnapshot(1, [s], [pod('web-2', { app: 'web' }, 2), pod('web-1', { app: 'web', v: '1' }, 1), pod('db', { app: 'db' }, 3), other]);
  const t4 = snap.service({ family: 4, address: '10.96.0.1', port: 80 });
  assert.deepEqual(t4?.endpoints.map((e) => [e.workload.name, e.port]), [['web-1', 8080], ['web-2', 8080]]);
  assert.equal(snap.service({ family: 6, address: 'fd00::1', port: 80 }), t4);
  assert.equal(snap.service({ family: 4, address: '10.96.0.1', port: 81 }), undefined);
  assert.equal(snap.workload('::ffff:10.0.0.3')?.name, 'db');
  assert.equal(snap.serviceOf('uid-web-2', 8080), t4);
  assert.equal(snap.serviceOf('uid-db', 8080), undefined);
  assert.ok(Object.isFrozen(snap));
});

test('load balancing: round robin, and least connections with round-robin ties', () => {
  const s = parseService(svc({ clusterIP: '10.96.0.1', selector: { app: 'web' }, ports: [{ port: 80 }] }));
  const snap = new MeshSnapshot(1, [s], [pod('a', { app: 'web' }, 1), pod('b', { app: 'web' }, 2), pod('c', { app: 'web' }, 3)]);
  const target = snap.service({ family: 4, address: '10.96.0.1', port: 80 });
  assert.ok(target);
  const rr = new LoadBalancer('round-robin');
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => rr.pick(target)?.workload.name), ['a', 'b', 'c', 'a', 'b', 'c']);

  const lc = new LoadBalancer('least-connections');
  const first = lc.pick(target);
  assert.ok(first);
  lc.acquire(first);
  lc.acquire(first);
  const second = lc.pick(target);
  assert.ok(second && second.workload.name !== first.workload.name);
  lc.acquire(second);
  const third = lc.pick(target);
  assert.ok(third && ![first.workload.name, second.workload.name].includes(third.workload.name), 'the idle endpoint wins');
  lc.release(first);
  lc.release(first);
  assert.equal(lc.activeConnections(first), 0);
  const empty = new MeshSnapshot(2, [s], []).service({ family: 4, address: '10.96.0.1', port: 80 });
  assert.ok(empty);
  assert.equal(rr.pick(empty), undefined);
});

test('enrollment: opt-out on pod or namespace, opt-in mode, the nodemesh ConfigMap', async (t) => {
  const { shouldEnroll, parseMeshConfig, DEFAULT_MESH } = await import('../../src/config/mesh.js');
  const optIn = { enrollment: 'opt-in' as const, failClosedEnrollment: false };
  const plain = { name: 'shop', labels: {} };
  const enabled = { name: 'shop', labels: { 'nodemesh.io/enabled': 'true' } };
  const disabled = { name: 'shop', labels: { 'nodemesh.io/capture': 'disabled' } };
  assert.equal(shouldEnroll({}, undefined, DEFAULT_MESH), true);
  assert.equal(shouldEnroll({ 'nodemesh.io/capture': 'disabled' }, plain, DEFAULT_MESH), false);
  assert.equal(shouldEnroll({}, disabled, DEFAULT_MESH), false);
  assert.equal(shouldEnroll({}, plain, optIn), false);
  assert.equal(shouldEnroll({}, enabled, optIn), true);
  assert.equal(shouldEnroll({ 'nodemesh.io/capture': 'enabled' }, plain, optIn), true);
  assert.equal(shouldEnroll({ 'nodemesh.io/capture': 'disabled' }, enabled, optIn), false);
  assert.deepEqual(parseMeshConfig({ data: { enrollment: 'opt-in' } }), optIn);
  assert.throws(() => parseMeshConfig({ data: { enrollment: 'some' } }), (e) => e instanceof ObjectInvalid && e.field === 'data.enrollment');
  assert.throws(() => parseMeshConfig({ data: { enrolment: 'all' } }), (e) => e instanceof ObjectInvalid && e.field === 'data.enrolment');
  assert.deepEqual(parseMeshConfig({ data: { failClosedEnrollment: 'true' } }), { enrollment: 'all', failClosedEnrollment: true });
  assert.throws(() => parseMeshConfig({ data: { failClosedEnrollment: true } }), (e) => e instanceof ObjectInvalid && e.field === 'data.failClosedEnrollment');

  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'mesh.yaml'), 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {enrollment: opt-in}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.io/enabled: "true"}}\n');
  const read = await readConfigDir(dir);
  assert.deepEqual(read.mesh, optIn);
  assert.deepEqual(read.namespaces, [{ name: 'shop', labels: { 'nodemesh.io/enabled': 'true' } }]);
  assert.deepEqual(read.issues, []);
});
