import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { keepLastGood } from '../../src/config/last-good.js';
import { parseDuration } from '../../src/config/schemas.js';
import { MeshSnapshot, type ServiceTarget, type Workload } from '../../src/config/snapshot.js';
import { ObjectInvalid, exportedTo, parseService } from '../../src/config/service.js';
import { parseObject } from '../../src/config/objects.js';
import { ALL_REQUESTS, needsHttp, parseRoute } from '../../src/config/route.js';
import { ConfigDirReader, ConfigStore } from '../../src/config/store.js';
import { readConfigDir } from '../../src/config/source-dir.js';
import { DEFAULT_SERVICE_POLICY, parseTrafficPolicy } from '../../src/config/traffic-policy.js';
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
  assert.deepEqual(ok.ports, [{ name: '', port: 80, targetPort: 8080, protocol: 'TCP', appProtocol: '' }]);
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
    [{ ...svc({ clusterIP: '10.96.0.1', ports: [{ port: 80 }] }), metadata: { name: 'web', annotations: { 'networking.istio.io/exportTo': 'Ops' } } }, 'metadata.annotations["networking.istio.io/exportTo"]'],
    [{ ...svc({ clusterIP: '10.96.0.1', ports: [{ port: 80 }] }), metadata: { name: 'web', annotations: { 'networking.istio.io/exportTo': '~,ops' } } }, 'metadata.annotations["networking.istio.io/exportTo"]'],
  ];
  for (const [doc, field] of bad) {
    assert.throws(() => parseService(doc), (e) => e instanceof ObjectInvalid && e.field === field, field);
  }  const exported = (value: string | undefined): ReadonlyArray<string> =>
    parseService({ ...svc({ clusterIP: '10.96.0.1', ports: [{ port: 80 }] }), metadata: { name: 'web', namespace: 'shop', annotations: value === undefined ? {} : { 'networking.istio.io/exportTo': value } } }).exportTo;
  assert.deepEqual(exported(undefined), ['*']);
  assert.deepEqual(exported('.'), ['shop']);
  assert.deepEqual(exported('., ops, shop'), ['shop', 'ops']);
  assert.deepEqual(exported('~'), []);
  assert.equal(exportedTo({ exportTo: ['shop'] }, 'ops'), false);
  assert.equal(exportedTo({ exportTo: ['*'] }, 'ops'), true);
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

const TP = (spec: Record<string, unknown>, name = 'web-policy'): Record<string, unknown> => ({
  apiVersion: 'networking.nodemesh.io/v1alpha1',
  kind: 'TrafficPolicy',
  metadata: { name, namespace: 'shop' },
  spec: { targetRefs: [{ kind: 'Service', name: 'web' }], ...spec },
});

function webTarget(policies: Record<string, unknown>[] = []): ServiceTarget {
  const s = parseService(svc({ clusterIP: '10.96.0.1', selector: { app: 'web' }, ports: [{ port: 80 }] }));
  const snap = new MeshSnapshot(1, [s], [pod('a', { app: 'web' }, 1), pod('b', { app: 'web' }, 2), pod('c', { app: 'web' }, 3)], policies.map(parseTrafficPolicy));
  const target = snap.service({ family: 4, address: '10.96.0.1', port: 80 });
  assert.ok(target);
  return target;
}

test('load balancing: round robin by default, least requests from a TrafficPolicy (power of two choices)', () => {
  const target = webTarget();
  assert.equal(target.policy, DEFAULT_SERVICE_POLICY);
  const rr = new LoadBalancer();
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => rr.pick(target)?.workload.name), ['a', 'b', 'c', 'a', 'b', 'c']);

  const lcTarget = webTarget([TP({ loadBalancer: { type: 'LeastRequest' } })]);
  assert.equal(lcTarget.policy.loadBalancing, 'least-connections');
  const lc = new LoadBalancer();
  const first = lc.pick(lcTarget);
  assert.ok(first);
  lc.acquire(lcTarget, first);
  lc.acquire(lcTarget, first);
  const second = lc.pick(lcTarget);
  assert.ok(second && second.workload.name !== first.workload.name);
  lc.acquire(lcTarget, second);
  // Power of two choices over three endpoints loaded 2, 1, 0: the busiest never, the idle one in
  // two draws of three (each pair equally likely: {busiest, middle} gives the middle one).
  const picks = Array.from({ length: 3000 }, () => lc.pick(lcTarget)?.workload.name);
  assert.equal(picks.filter((n) => n === first.workload.name).length, 0, 'the busiest endpoint is never picked');
  const idle = picks.filter((n) => n !== first.workload.name && n !== second.workload.name).length;
  assert.ok(idle > 1800 && idle < 2200, `the idle endpoint took ${idle} of 3000 (two thirds: 2000)`);
  lc.release(lcTarget, first);
  lc.release(lcTarget, first);
  assert.equal(lc.activeConnections(first), 0);
  const s = parseService(svc({ clusterIP: '10.96.0.1', selector: { app: 'web' }, ports: [{ port: 80 }] }));
  const empty = new MeshSnapshot(2, [s], []).service({ family: 4, address: '10.96.0.1', port: 80 });
  assert.ok(empty);
  assert.equal(rr.pick(empty), undefined);

  const random = webTarget([TP({ loadBalancer: { type: 'Random' } })]);
  const seen = new Set(Array.from({ length: 200 }, () => new LoadBalancer().pick(random)?.workload.name));
  assert.deepEqual([...seen].sort(), ['a', 'b', 'c']);
});

test('connection limit and passive health: ejection after consecutive connect errors, bounded, timed, panic when all are out', () => {
  let now = 1_000;
  const target = webTarget([TP({ connectionPool: { tcp: { maxConnections: 2 } }, outlierDetection: { consecutiveConnectErrors: 2, baseEjectionTime: '10s', maxEjectionPercent: 34 } })]);
  const lb = new LoadBalancer(() => now);
  const [a, b, c] = target.endpoints;
  assert.ok(a && b && c);
  lb.acquire(target, a);
  assert.equal(lb.hasCapacity(target), true);
  lb.acquire(target, b);
  assert.equal(lb.hasCapacity(target), false, 'maxConnections reached');
  lb.release(target, b);
  assert.equal(lb.hasCapacity(target), true);

  assert.equal(lb.connectFailed(target, a), false, 'one error is not enough');
  lb.connectSucceeded(a);
  assert.equal(lb.connectFailed(target, a), false, 'a success resets the count');
  assert.equal(lb.connectFailed(target, a), true, 'two in a row eject');
  assert.equal(lb.isEjected(a), true);
  for (let i = 0; i < 6; i++) assert.notEqual(lb.pick(target)?.workload.name, 'a');
  lb.connectFailed(target, b);
  assert.equal(lb.connectFailed(target, b), false, '34% of 3 endpoints: only one may be out');
  assert.equal(lb.isEjected(b), false);
  assert.equal(lb.pick(target, c)?.workload.name, 'b', 'avoid skips the endpoint that just failed');
  now += 10_001;
  assert.equal(lb.isEjected(a), false, 'the ejection ends after baseEjectionTime');
  lb.connectFailed(target, a);
  assert.equal(lb.connectFailed(target, a), true);
  now += 10_001;
  assert.equal(lb.isEjected(a), true, 'the second ejection lasts twice as long');
  now += 10_000;
  assert.equal(lb.isEjected(a), false);

  const solo = webTarget([TP({ outlierDetection: { consecutiveConnectErrors: 1, maxEjectionPercent: 100 } })]);
  const lb2 = new LoadBalancer(() => now);
  for (const e of solo.endpoints) lb2.connectFailed(solo, e);
  assert.ok(solo.endpoints.every((e) => lb2.isEjected(e)));
  assert.ok(lb2.pick(solo), 'all ejected: panic, all are used');
});

test('TrafficPolicy is validated against its CRD schema, naming the field', () => {
  const p = parseTrafficPolicy(TP({ loadBalancer: { type: 'LeastRequest' }, connectionPool: { tcp: { connectTimeout: '1.5s', idleTimeout: '1m30s' } } }));
  assert.deepEqual(p.services, ['web']);
  assert.equal(p.policy.connectTimeoutMs, 1500);
  assert.equal(p.policy.idleTimeoutMs, 90_000);
  assert.equal(p.policy.source, 'shop/web-policy');
  const bad: Array<[Record<string, unknown>, string]> = [
    [TP({ loadBalancer: { type: 'Fastest' } }), 'spec.loadBalancer.type'],
    [TP({ loadBalancer: { typ: 'Random' } }), 'spec.loadBalancer.typ'],
    [TP({ connectionPool: { tcp: { maxConnections: '10' } } }), 'spec.connectionPool.tcp.maxConnections'],
    [TP({ connectionPool: { tcp: { connectTimeout: '10 seconds' } } }), 'spec.connectionPool.tcp.connectTimeout'],
    [TP({ targetRefs: [] }), 'spec.targetRefs'],
    [TP({ targetRefs: [{ kind: 'Deployment', name: 'web' }] }), 'spec.targetRefs[0].kind'],
    [{ ...TP({}), spec: undefined }, 'spec'],
    [{ ...TP({}), extra: true }, 'extra'],
    [{ ...TP({}), metadata: { name: 'Bad_Name' } }, 'metadata.name'],
  ];
  for (const [doc, field] of bad) {
    assert.throws(() => parseTrafficPolicy(doc), (e) => e instanceof ObjectInvalid && e.field === field, field);
  }
  assert.equal(parseDuration('250ms', 'f'), 250);
  assert.throws(() => parseDuration('5', 'f'), ObjectInvalid);
});

test('AuthorizationPolicy and PeerAuthentication: Istio\'s schemas; what nodemesh cannot enforce is refused with its field named', () => {
  const AP = (spec: Record<string, unknown>): Record<string, unknown> => ({ apiVersion: 'security.nodemesh.io/v1', kind: 'AuthorizationPolicy', metadata: { name: 'allow-web', namespace: 'shop' }, spec });
  const PA = (spec: Record<string, unknown>): Record<string, unknown> => ({ apiVersion: 'security.nodemesh.io/v1', kind: 'PeerAuthentication', metadata: { name: 'strict', namespace: 'shop' }, spec });
  const issue = (doc: Record<string, unknown>): { field: string; message: string } => {
    const r = parseObject('f.yaml', doc);
    assert.ok('issue' in r, `refused: ${JSON.stringify(doc)}`);
    return r.issue;
  };
  const accepted = (doc: Record<string, unknown>): unknown => {
    const r = parseObject('f.yaml', doc);
    assert.ok('object' in r && r.object, `accepted: ${JSON.stringify('issue' in r ? r.issue : r)}`);
    return r.object;
  };
  // Istio's own L4 example policy, with only apiVersion changed, is accepted as it reads.
  const ap = accepted(
    AP({
      selector: { matchLabels: { app: 'web' } },
      action: 'ALLOW',
      rules: [{ from: [{ source: { principals: ['cluster.local/ns/shop/sa/frontend'], notNamespaces: ['dev'] } }], to: [{ operation: { ports: ['8080'] } }], when: [{ key: 'source.ip', values: ['10.0.0.0/8'] }] }],
    }),
  );
  assert.deepEqual(ap, {
    id: 'AuthorizationPolicy shop/allow-web',
    authorizationPolicy: {
      namespace: 'shop',
      name: 'allow-web',
      selector: { app: 'web' },
      action: 'ALLOW',
      rules: [
        {
          from: [{ principals: ['cluster.local/ns/shop/sa/frontend'], notPrincipals: [], namespaces: [], notNamespaces: ['dev'], ipBlocks: [], notIpBlocks: [], serviceAccounts: [], notServiceAccounts: [] }],
          to: [{ ports: [8080], notPorts: [], hosts: [], notHosts: [], methods: [], notMethods: [], paths: [], notPaths: [] }],
          when: [{ key: 'source.ip', values: ['10.0.0.0/8'], notValues: [] }],
        },
      ],
    },
  });
  assert.deepEqual(accepted(PA({ selector: { matchLabels: { app: 'web' } }, mtls: { mode: 'STRICT' }, portLevelMtls: { '8080': { mode: 'PERMISSIVE' } } })), {
    id: 'PeerAuthentication shop/strict',
    peerAuthentication: { namespace: 'shop', name: 'strict', selector: { app: 'web' }, mode: 'STRICT', portModes: { '8080': 'PERMISSIVE' } },
  });
  // Istio's allow-nothing and deny-all shapes.
  accepted(AP({}));
  // Request attributes (evaluated per request on HTTP ports); remoteIpBlocks is the source's address.
  const l7 = accepted(AP({ rules: [{ from: [{ source: { remoteIpBlocks: ['10.0.0.0/8'] } }], to: [{ operation: { methods: ['GET'], paths: ['/api/*', '*.css'], hosts: ['web.shop*'] } }], when: [{ key: 'request.headers[X-User]', values: ['a*'] }] }] }));
  assert.deepEqual((l7 as { authorizationPolicy: { rules: Array<{ from: Array<{ ipBlocks: string[] }> }> } }).authorizationPolicy.rules[0]?.from[0]?.ipBlocks, ['10.0.0.0/8']);
  accepted(AP({ action: 'DENY', rules: [{}] }));
  const bad: Array<[Record<string, unknown>, string, RegExp?]> = [
    [AP({ action: 'PERMIT' }), 'spec.action'],
    [AP({ action: 'CUSTOM', provider: { name: 'opa' } }), 'spec.action', /CUSTOM/],
    [AP({ rules: [{ from: [{ source: { principal: ['x'] } }] }] }), 'spec.rules[0].from[0].source.principal'],
    [AP({ rules: [{ when: [{ values: ['x'] }] }] }), 'spec.rules[0].when[0].key'],
    [AP({ targetRefs: [{ name: 'web' }] }), 'spec.targetRefs[0].kind'],
    [AP({ targetRefs: [{ kind: 'Service', name: 'web' }] }), 'spec.targetRefs', /selector/],
    // What nodemesh cannot evaluate is refused, never ignored: a JWT's claims.
    [AP({ rules: [{ from: [{ source: { requestPrincipals: ['*'] } }] }] }), 'spec.rules[0].from[0].source.requestPrincipals', /JWT/],
    [AP({ rules: [{ when: [{ key: 'request.auth.claims[iss]', values: ['a'] }] }] }), 'spec.rules[0].when[0].key', /JWT/],
    // Request attributes that cannot match anything are mistakes, named.
    [AP({ rules: [{ to: [{ operation: { paths: ['admin'] } }] }] }), 'spec.rules[0].to[0].operation.paths[0]', /not a path/],
    [AP({ rules: [{ to: [{ operation: { methods: ['G*T'] } }] }] }), 'spec.rules[0].to[0].operation.methods[0]'],
    [AP({ rules: [{ to: [{ operation: { hosts: [''] } }] }] }), 'spec.rules[0].to[0].operation.hosts[0]'],
    [AP({ rules: [{ when: [{ key: 'request.headers[x user]', values: ['a'] }] }] }), 'spec.rules[0].when[0].key', /header name/],
    [AP({ rules: [{ when: [{ key: 'connection.sni', values: ['a'] }] }] }), 'spec.rules[0].when[0].key', /not an attribute/],
    // Values that cannot match anything are mistakes, named.
    [AP({ rules: [{ from: [{ source: { ipBlocks: ['10.0.0.0/33'] } }] }] }), 'spec.rules[0].from[0].source.ipBlocks[0]'],
    [AP({ rules: [{ from: [{ source: { principals: ['a*b'] } }] }] }), 'spec.rules[0].from[0].source.principals[0]'],
    [AP({ rules: [{ from: [{ source: { serviceAccounts: ['web'] } }] }] }), 'spec.rules[0].from[0].source.serviceAccounts[0]'],
    [AP({ rules: [{ to: [{ operation: { notPorts: ['http'] } }] }] }), 'spec.rules[0].to[0].operation.notPorts[0]'],
    [AP({ rules: [{ when: [{ key: 'destination.port', values: ['99999'] }] }] }), 'spec.rules[0].when[0].values[0]'],
    [AP({ rules: [{ when: [{ key: 'source.namespace' }] }] }), 'spec.rules[0].when[0].values'],
    [PA({ mtls: { mode: 'strict' } }), 'spec.mtls.mode'],
    [PA({ portLevelMtls: { '8080': { mode: 'ON' } } }), 'spec.portLevelMtls[8080].mode'],
    [PA({ mtls: { mode: 'STRICT' }, portLevelMtls: { '8080': { mode: 'PERMISSIVE' } } }), 'spec.portLevelMtls', /selector/],
  ];
  for (const [doc, field, message] of bad) {
    const i = issue(doc);
    assert.equal(i.field, field, field);
    if (message) assert.match(i.message, message);
  }
});

test('snapshot: the first TrafficPolicy by name wins a Service; conflicts and missing targets are warnings', () => {
  const s = parseService(svc({ clusterIP: '10.96.0.1', selector: { app: 'web' }, ports: [{ port: 80 }] }));
  const policies = [
    TP({ loadBalancer: { type: 'Random' } }, 'b-policy'),
    TP({ loadBalancer: { type: 'LeastRequest' } }, 'a-policy'),
    TP({ targetRefs: [{ kind: 'Service', name: 'gone' }] }, 'c-policy'),
  ].map(parseTrafficPolicy);
  const snap = new MeshSnapshot(1, [s], [], policies);
  assert.equal(snap.service({ family: 4, address: '10.96.0.1', port: 80 })?.policy.source, 'shop/a-policy');
  assert.deepEqual(snap.warnings.map((w) => w.object), ['TrafficPolicy shop/b-policy', 'TrafficPolicy shop/c-policy']);
});

test('last good: a rejected object, or one in a file that stops parsing, keeps its previous version', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const service = (name: string, ip: string): string => `apiVersion: v1\nkind: Service\nmetadata: {name: ${name}}\nspec: {clusterIP: ${ip}, ports: [{port: 80}]}\n`;
  await writeFile(join(dir, 'a.yaml'), service('a', '10.96.0.1') + '---\n' + service('b', '10.96.0.2'));
  await writeFile(join(dir, 'c.yaml'), service('c', '10.96.0.3'));
  const first = await readConfigDir(dir);
  assert.deepEqual(first.issues, []);
  // b gets a bad field, c's file stops being YAML, a is deleted.
  await writeFile(join(dir, 'a.yaml'), 'apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}], bogus: 1}\n');
  await writeFile(join(dir, 'c.yaml'), 'kind: [unclosed\n');
  const second = await readConfigDir(dir);
  const { objects, kept } = keepLastGood('Service', second.services, first.services, first.files, second.issues);
  assert.deepEqual([...kept].sort(), ['Service default/b', 'Service default/c']);
  assert.deepEqual(objects.map((o) => `${o.name}=${o.clusterIPs[0]}`).sort(), ['b=10.96.0.2', 'c=10.96.0.3']);
});

test('enrollment: opt-out on pod or namespace, opt-in mode, the nodemesh ConfigMap', async (t) => {
  const { shouldEnroll, parseMeshConfig, DEFAULT_MESH } = await import('../../src/config/mesh.js');
  const optIn = { enrollment: 'opt-in' as const, failClosedEnrollment: false, trustDomain: 'cluster.local', mtlsMode: 'PERMISSIVE' as const, accessLog: [] };
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
  assert.deepEqual(parseMeshConfig({ data: { failClosedEnrollment: 'true' } }), { enrollment: 'all', failClosedEnrollment: true, trustDomain: 'cluster.local', mtlsMode: 'PERMISSIVE', accessLog: [] });
  assert.deepEqual(parseMeshConfig({ data: { trustDomain: 'example.org', mtlsMode: 'STRICT' } }), { enrollment: 'all', failClosedEnrollment: false, trustDomain: 'example.org', mtlsMode: 'STRICT', accessLog: [] });
  assert.deepEqual([parseMeshConfig({ data: { accessLog: 'on' } }).accessLog, parseMeshConfig({ data: { accessLog: 'shop, payments,shop' } }).accessLog, parseMeshConfig({ data: { accessLog: 'off' } }).accessLog], [['*'], ['payments', 'shop'], []]);
  assert.throws(() => parseMeshConfig({ data: { accessLog: 'shop,Bad_NS' } }), (e) => e instanceof ObjectInvalid && e.field === 'data.accessLog' && /Bad_NS/.test(e.message));
  assert.throws(() => parseMeshConfig({ data: { mtlsMode: 'strict' } }), (e) => e instanceof ObjectInvalid && e.field === 'data.mtlsMode');
  for (const bad of ['Example.org', 'a/b', '', 'x'.repeat(256)]) {
    assert.throws(() => parseMeshConfig({ data: { trustDomain: bad } }), (e) => e instanceof ObjectInvalid && e.field === 'data.trustDomain', bad);
  }
  assert.throws(() => parseMeshConfig({ data: { failClosedEnrollment: true } }), (e) => e instanceof ObjectInvalid && e.field === 'data.failClosedEnrollment');

  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await writeFile(join(dir, 'mesh.yaml'), 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {enrollment: opt-in}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {nodemesh.io/enabled: "true"}}\n');
  const read = await readConfigDir(dir);
  assert.deepEqual(read.mesh, optIn);
  assert.deepEqual(read.namespaces, [{ name: 'shop', labels: { 'nodemesh.io/enabled': 'true' } }]);
  assert.deepEqual(read.issues, []);
});

const route = (spec: Record<string, unknown>, kind = 'HTTPRoute'): Record<string, unknown> => ({ apiVersion: 'gateway.networking.k8s.io/v1', kind, metadata: { name: 'reviews-canary', namespace: 'shop' }, spec });
const split = (weights: number[]): Record<string, unknown> =>
  route({ parentRefs: [{ group: '', kind: 'Service', name: 'reviews', port: 80 }], rules: [{ backendRefs: weights.map((weight, i) => ({ name: `reviews-v${i + 1}`, port: 80, weight })) }] });

test('HTTPRoute/GRPCRoute on Services: rules, matches and weighted backends parse; what the proxy does not apply yet is refused with its field', () => {
  const grpc = (rule: Record<string, unknown>): Record<string, unknown> => ({ apiVersion: 'gateway.networking.k8s.io/v1', kind: 'GRPCRoute', metadata: { namespace: 'shop', name: 'cart' }, spec: { parentRefs: [{ kind: 'Service', name: 'cart' }], rules: [{ backendRefs: [{ name: 'cart', port: 80 }], ...rule }] } });
  const r = parseRoute(split([90, 10]));
  assert.deepEqual(r.parents, [{ namespace: 'shop', name: 'reviews', port: 80 }]);
  assert.deepEqual(r.backends.map((b) => [b.name, b.port, b.weight]), [['reviews-v1', 80, 90], ['reviews-v2', 80, 10]]);
  // What an API server fills in (the default match, group and kind) changes nothing.
  const defaulted = route({ parentRefs: [{ group: '', kind: 'Service', name: 'reviews' }], rules: [{ matches: [{ path: { type: 'PathPrefix', value: '/' } }], backendRefs: [{ group: '', kind: 'Service', name: 'reviews-v1', port: 80, weight: 1 }] }] });
  assert.equal(parseRoute(defaulted).parents[0]?.port, undefined);
  assert.equal(parseRoute({ ...split([1]), kind: 'GRPCRoute' }).kind, 'GRPCRoute');
  const rule = (extra: Record<string, unknown>): Record<string, unknown> => route({ parentRefs: [{ kind: 'Service', name: 'reviews' }], rules: [{ backendRefs: [{ name: 'reviews-v1', port: 80 }], ...extra }] });
  const bad: Array<[Record<string, unknown>, string, RegExp]> = [
    [rule({ filters: [{ type: 'RequestHeaderModifier' }] }), 'spec.rules[0].filters[0].requestHeaderModifier', /required/],
    [rule({ filters: [{ type: 'ExtensionRef', extensionRef: { group: 'x', kind: 'Y', name: 'z' } }] }), 'spec.rules[0].filters[0].type', /not supported/],
    [rule({ filters: [{ type: 'RequestHeaderModifier', requestHeaderModifier: { set: [{ name: 'Host', value: 'x' }] } }] }), 'spec.rules[0].filters[0].requestHeaderModifier.set[0].name', /cannot be modified/],
    [rule({ filters: [{ type: 'RequestHeaderModifier', requestHeaderModifier: { add: [{ name: 'x-a', value: 'a\r\nx-b: b' }] } }] }), 'spec.rules[0].filters[0].requestHeaderModifier.add[0].value', /no line breaks/],
    [rule({ matches: [{ path: { type: 'Exact', value: '/a' } }], filters: [{ type: 'URLRewrite', urlRewrite: { path: { type: 'ReplacePrefixMatch', replacePrefixMatch: '/b' } } }] }), 'spec.rules[0].filters[0]', /needs every match of the rule to be a PathPrefix/],
    [rule({ filters: [{ type: 'RequestRedirect', requestRedirect: { statusCode: 302 } }] }), 'spec.rules[0].backendRefs', /sends no request to a backend/],
    [rule({ filters: [{ type: 'RequestRedirect', requestRedirect: { statusCode: 304 } }] }), 'spec.rules[0].filters[0].requestRedirect.statusCode', /one of 301, 302/],
    [route({ parentRefs: [{ kind: 'Service', name: 'reviews' }], rules: [{ backendRefs: [{ name: 'a', port: 80, filters: [{ type: 'URLRewrite', urlRewrite: { hostname: 'b' } }] }] }] }), 'spec.rules[0].backendRefs[0].filters[0].type', /not applied per backend/],
    [rule({ filters: [{ type: 'RequestMirror', requestMirror: { backendRef: { name: 'shadow' } } }] }), 'spec.rules[0].filters[0].requestMirror.backendRef.port', /required/],
    [rule({ timeouts: { request: '2s', backendRequest: '3s' } }), 'spec.rules[0].timeouts.backendRequest', /must not be longer than/],
    [rule({ timeouts: { request: 'soon' } }), 'spec.rules[0].timeouts.request', /not a duration/],
    [rule({ timeouts: { request: '2h' } }), 'spec.rules[0].timeouts.request', /over 1h/],
    [rule({ retry: { codes: [200] } }), 'spec.rules[0].retry.codes[0]', /400-599/],
    [rule({ retry: { attempts: 11 } }), 'spec.rules[0].retry.attempts', /0-10/],
    [rule({ retry: { attempts: 1, perTryTimeout: '1s' } }), 'spec.rules[0].retry.perTryTimeout', /unknown field/],
    [rule({ sessionPersistence: { sessionName: 'a' } }), 'spec.rules[0].sessionPersistence', /not applied by this version/],
    [rule({ matches: [{ path: { type: 'RegularExpression', value: '/a/(' } }] }), 'spec.rules[0].matches[0].path.value', /not a valid regular expression/],
    [rule({ matches: [{ path: { type: 'RegularExpression', value: '/(a)\\1' } }] }), 'spec.rules[0].matches[0].path.value', /backreferences/],
    [rule({ matches: [{ path: { type: 'Exact', value: 'api' } }] }), 'spec.rules[0].matches[0].path.value', /must start with "\/"/],
    [rule({ matches: [{ path: { type: 'Prefix', value: '/' } }] }), 'spec.rules[0].matches[0].path.type', /Exact, PathPrefix, RegularExpression/],
    [rule({ matches: [{ method: 'FETCH' }] }), 'spec.rules[0].matches[0].method', /must be one of/],
    [rule({ matches: [{ headers: [{ name: 'x user', value: 'a' }] }] }), 'spec.rules[0].matches[0].headers[0].name', /not a valid header name/],
    [rule({ matches: [{ headers: [{ name: 'X-A', value: 'a' }, { name: 'x-a', value: 'b' }] }] }), 'spec.rules[0].matches[0].headers[1].name', /twice/],
    [rule({ matches: [{ queryParams: [{ type: 'RegularExpression', name: 'q', value: '(?=x)' }] }] }), 'spec.rules[0].matches[0].queryParams[0].value', /lookaround/],
    [route({ parentRefs: [{ kind: 'Service', name: 'reviews' }], rules: [{ backendRefs: [{ name: 'a', port: 80 }] }, { backendRefs: [{ name: 'b', port: 80, weight: 0 }, { name: 'c', port: 80, weight: 0 }] }] }), 'spec.rules[1].backendRefs', /sum to 0/],
    [route({ parentRefs: [{ name: 'gw' }], rules: [{ backendRefs: [{ name: 'a', port: 80 }] }] }), 'spec.parentRefs[0].kind', /GAMMA/],
    [route({ parentRefs: [{ kind: 'Service', name: 'reviews', namespace: 'other' }], rules: [{ backendRefs: [{ name: 'a', port: 80 }] }] }), 'spec.parentRefs[0].namespace', /ReferenceGrant/],
    [route({ parentRefs: [{ kind: 'Service', name: 'reviews' }], rules: [{ backendRefs: [{ name: 'a' }] }] }), 'spec.rules[0].backendRefs[0].port', /required/],
    [route({ parentRefs: [{ kind: 'Service', name: 'reviews' }], rules: [{ backendRefs: [{ name: 'a', port: 80, weight: -1 }] }] }), 'spec.rules[0].backendRefs[0].weight', /0-1000000/],
    [route({ parentRefs: [{ kind: 'Service', name: 'reviews' }], rules: [{ backendRefs: [{ name: 'a', port: 80, wieght: 1 }] }] }), 'spec.rules[0].backendRefs[0].wieght', /unknown field/],
    [grpc({ matches: [{ method: {} }] }), 'spec.rules[0].matches[0].method', /service, a method or both/],
    [grpc({ matches: [{ method: { service: 'a/b' } }] }), 'spec.rules[0].matches[0].method.service', /not a gRPC service name/],
    [grpc({ matches: [{ method: { type: 'RegularExpression', method: '(?!x)' } }] }), 'spec.rules[0].matches[0].method.method', /lookaround/],
    [grpc({ matches: [{ path: { value: '/x' } }] }), 'spec.rules[0].matches[0].path', /unknown field/],
    [grpc({ filters: [{ type: 'URLRewrite', urlRewrite: { hostname: 'x' } }] }), 'spec.rules[0].filters[0].type', /not a GRPCRoute filter/],
  ];
  for (const [doc, field, message] of bad) {
    assert.throws(() => parseRoute(doc), (e) => e instanceof ObjectInvalid && e.field === field && message.test(e.message), field);
  }
  // GRPCRoute method matches become the path of a gRPC request.
  const g = parseRoute(
    grpc({
      matches: [
        { method: { service: 'shop.Cart', method: 'Add' } },
        { method: { service: 'shop.Cart' }, headers: [{ name: 'X-Version', value: 'v2' }] },
        { method: { method: 'Watch' } },
        { method: { type: 'RegularExpression', service: 'shop\\..*', method: 'Get.*' } },
      ],
      filters: [{ type: 'RequestHeaderModifier', requestHeaderModifier: { set: [{ name: 'x-mesh', value: '1' }] } }],
    }),
  );
  const paths = g.rules[0]?.matches.map((m) => [m.path.type, m.path.value]);
  assert.deepEqual(paths, [['Exact', '/shop.Cart/Add'], ['PathPrefix', '/shop.Cart'], ['RegularExpression', '/[^/]+/Watch'], ['RegularExpression', '/(?:shop\\..*)/(?:Get.*)']]);
  assert.ok(g.rules[0]?.matches[3]?.path.regex?.test('/shop.Cart/GetItems'));
  assert.equal(g.rules[0]?.matches[3]?.path.regex?.test('/shopxCart/GetItems'), false);
  assert.deepEqual(g.rules[0]?.matches[1]?.headers.map((h) => h.name), ['x-version']);
  // Several rules with matches: each parsed, names lower-cased for headers, prefixes without their trailing "/".
  const l7 = parseRoute(
    route({
      parentRefs: [{ kind: 'Service', name: 'reviews', port: 80 }],
      rules: [
        { matches: [{ path: { value: '/api/' }, method: 'POST', headers: [{ name: 'X-Version', value: 'v2' }], queryParams: [{ type: 'RegularExpression', name: 'beta', value: 'y(es)?' }] }], backendRefs: [{ name: 'reviews-v2', port: 80 }] },
        { backendRefs: [{ name: 'reviews-v1', port: 80, weight: 9 }, { name: 'reviews-v2', port: 80, weight: 1 }] },
      ],
    }),
  );
  const first = l7.rules[0]?.matches[0];
  assert.deepEqual([first?.path.type, first?.path.value, first?.method, first?.headers[0]?.name, first?.queryParams[0]?.regex?.test('yes'), first?.queryParams[0]?.regex?.test('yess')], ['PathPrefix', '/api', 'POST', 'x-version', true, false]);
  assert.equal(l7.rules[1]?.matches[0], ALL_REQUESTS, 'a rule without matches takes every request');
  assert.deepEqual(l7.backends.map((b) => `${b.name}*${b.weight}`), ['reviews-v2*1', 'reviews-v1*9', 'reviews-v2*1']);
  assert.ok(needsHttp(l7));
  const timed = parseRoute(rule({ timeouts: { request: '2s', backendRequest: '0s' }, retry: { codes: [503, 503, 502] } })).rules[0];
  assert.deepEqual([timed?.timeouts, timed?.retry], [{ requestMs: 2000 }, { attempts: 1, codes: [503, 502], backoffMs: 25 }], '"0s" is no limit; the defaults fill in');
  assert.ok(needsHttp(parseRoute(rule({ retry: {} }))), 'a retry works per request');
  assert.ok(!needsHttp(parseRoute(split([90, 10]))));
});

test('routes: parents and backends must exist (the field is named, the last good version serves); the split is smooth and exact', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const svcYaml = (name: string, ip: string): string => `apiVersion: v1\nkind: Service\nmetadata: {name: ${name}, namespace: shop}\nspec: {clusterIP: ${ip}, selector: {app: ${name}}, ports: [{port: 80, targetPort: 8080}]}\n---\n`;
  const routeYaml = (backends: string): string =>
    `apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: canary, namespace: shop}\nspec:\n  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]\n  rules: [{backendRefs: [${backends}]}]\n`;
  await writeFile(join(dir, 'svc.yaml'), svcYaml('reviews', '10.96.0.20') + svcYaml('reviews-v1', '10.96.0.21') + svcYaml('reviews-v2', '10.96.0.22'));
  await writeFile(join(dir, 'route.yaml'), routeYaml('{name: reviews-v1, port: 80, weight: 1}, {name: reviews-v2, port: 80, weight: 3}'));
  const store = new ConfigStore(new ConfigDirReader(dir), { onLoad: () => undefined });
  await store.load();
  assert.deepEqual(store.lastRejected(), []);
  const snap = (): MeshSnapshot => {
    const c = store.current();
    const pods = [pod('v1', { app: 'reviews-v1' }, 1), pod('v2', { app: 'reviews-v2' }, 2)];
    return new MeshSnapshot(1, c.services, pods, c.trafficPolicies, c.routes);
  };
  const parent = snap().service({ family: 4, address: '10.96.0.20', port: 80 });
  assert.ok(parent?.split);
  assert.equal(parent.route, 'HTTPRoute shop/canary');
  const lb = new LoadBalancer();
  const picks = Array.from({ length: 8 }, () => lb.pickBackend(parent)?.service.name);
  assert.deepEqual(picks, ['reviews-v2', 'reviews-v1', 'reviews-v2', 'reviews-v2', 'reviews-v2', 'reviews-v1', 'reviews-v2', 'reviews-v2'], '1:3 in every four, spread out');
  // A backend that does not exist: rejected, naming the field; the last good route keeps serving.
  await writeFile(join(dir, 'route.yaml'), routeYaml('{name: reviews-v1, port: 80, weight: 1}, {name: reviews-v3, port: 80, weight: 3}'));
  await store.load();
  assert.deepEqual(store.lastRejected().map((r) => [r.object, r.field, r.keptLastGood]), [['HTTPRoute shop/canary', 'spec.rules[0].backendRefs[1].name', true]]);
  assert.match(store.lastRejected()[0]?.message ?? '', /Service shop\/reviews-v3 does not exist/);
  assert.deepEqual(snap().service({ family: 4, address: '10.96.0.20', port: 80 })?.split?.map((b) => b.target.service.name), ['reviews-v1', 'reviews-v2']);
  // A port the backend does not have.
  await writeFile(join(dir, 'route.yaml'), routeYaml('{name: reviews-v1, port: 81}'));
  await store.load();
  assert.equal(store.lastRejected()[0]?.field, 'spec.rules[0].backendRefs[0].port');
});

test('inbound labels: a direct connection to a pod selected by a routed parent and its backend is reported under the backend, never the parent', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  // As in examples/mesh: the parent selects every version, each backend one of them.
  const svcYaml = (name: string, ip: string, selector: string): string =>
    `apiVersion: v1\nkind: Service\nmetadata: {name: ${name}, namespace: shop}\nspec: {clusterIP: ${ip}, selector: {${selector}}, ports: [{port: 80, targetPort: 8080}]}\n---\n`;
  await writeFile(join(dir, 'svc.yaml'), svcYaml('reviews', '10.96.0.20', 'app: reviews') + svcYaml('reviews-v1', '10.96.0.21', 'app: reviews, version: v1') + svcYaml('reviews-v2', '10.96.0.22', 'app: reviews, version: v2'));
  const store = new ConfigStore(new ConfigDirReader(dir), { onLoad: () => undefined });
  await store.load();
  const pods = [pod('r1', { app: 'reviews', version: 'v1' }, 1), pod('r2', { app: 'reviews', version: 'v2' }, 2)];
  const build = (): MeshSnapshot => {
    const c = store.current();
    return new MeshSnapshot(1, c.services, pods, c.trafficPolicies, c.routes);
  };
  // Without a route the first Service by name is named (reviews), as before.
  assert.equal(build().serviceOf('uid-r2', 8080)?.service.name, 'reviews');
  await writeFile(
    join(dir, 'route.yaml'),
    'apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: canary, namespace: shop}\nspec:\n  parentRefs: [{group: "", kind: Service, name: reviews, port: 80}]\n  rules: [{backendRefs: [{name: reviews-v1, port: 80, weight: 75}, {name: reviews-v2, port: 80, weight: 25}]}]\n',
  );
  await store.load();
  assert.deepEqual(store.lastRejected(), []);
  const snap = build();
  assert.ok(snap.service({ family: 4, address: '10.96.0.20', port: 80 })?.split, 'the parent is routed');
  assert.equal(snap.serviceOf('uid-r1', 8080)?.service.name, 'reviews-v1');
  assert.equal(snap.serviceOf('uid-r2', 8080)?.service.name, 'reviews-v2');
});
