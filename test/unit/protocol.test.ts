/** The Discovery codec: config model -> wire -> config model, digests, and what the agent refuses. */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DEFAULT_MESH } from '../../src/config/mesh.js';
import type { MeshConfig } from '../../src/config/store.js';
import { DEFAULT_SERVICE_POLICY, parseTrafficPolicy } from '../../src/config/traffic-policy.js';
import { ObjectInvalid } from '../../src/config/service.js';
import { parseRoute } from '../../src/config/route.js';
import {
  SnapshotInvalid,
  applyDelta,
  decodeResources,
  decodeSnapshot,
  digestOf,
  discoveryService,
  keyParts,
  resourceKey,
  snapshotMessage,
  type ControlPlaneMessage,
  type WireResource,
  type WireWorkload,
} from '../../src/protocol/discovery.js';

const config: MeshConfig = {
  services: [{ namespace: 'shop', name: 'cart', clusterIPs: ['10.96.0.9', 'fd00::9'], ports: [{ name: 'http', port: 80, targetPort: 8080, protocol: 'TCP', appProtocol: '' }], selector: { app: 'cart' }, exportTo: ['*'] }],
  trafficPolicies: [
    {
      namespace: 'shop',
      name: 'cart-lb',
      services: ['cart'],
      routes: [],
      policy: { source: 'shop/cart-lb', loadBalancing: 'least-connections', hashOn: { cookie: 'session', ttlMs: 60_000 }, maxConnections: 10, maxPendingRequests: 0, maxRequestsPerConnection: 7, connectTimeoutMs: 250, idleTimeoutMs: undefined, outlier: { consecutiveConnectErrors: 2, consecutive5xxErrors: 3, consecutiveGatewayErrors: 0, baseEjectionMs: 1000, maxEjectionPercent: 100, intervalMs: 500 }, retryBudget: { percent: 0, minRetryConcurrency: 5 }, fault: { delay: { percent: 12.5, ms: 100 }, abort: { percent: 0, status: 503 } }, rateLimit: { identity: 5 } },
    },
  ],
  routes: [
    parseRoute({
      apiVersion: 'gateway.networking.k8s.io/v1',
      kind: 'HTTPRoute',
      metadata: { namespace: 'shop', name: 'cart-canary' },
      spec: {
        parentRefs: [{ kind: 'Service', name: 'cart' }],
        rules: [
          {
            name: 'beta',
            matches: [{ path: { type: 'RegularExpression', value: '/v[0-9]+/.*' }, method: 'GET', headers: [{ name: 'x-beta', value: '1' }], queryParams: [{ name: 'q', value: 'a' }] }, { path: { type: 'Exact', value: '/x' } }],
            backendRefs: [{ name: 'cart', port: 80, weight: 2, filters: [{ type: 'ResponseHeaderModifier', responseHeaderModifier: { add: [{ name: 'x-v', value: 'beta' }] } }] }],
            timeouts: { request: '2s', backendRequest: '500ms' },
            retry: { attempts: 2, codes: [503], backoff: '10ms' },
            filters: [
              { type: 'RequestHeaderModifier', requestHeaderModifier: { set: [{ name: 'x-env', value: 'prod' }], remove: ['x-debug'] } },
              { type: 'URLRewrite', urlRewrite: { hostname: 'cart.internal', path: { type: 'ReplaceFullPath', replaceFullPath: '/v1' } } },
              { type: 'RequestMirror', requestMirror: { backendRef: { name: 'cart', port: 80 }, fraction: { numerator: 1, denominator: 8 } } },
            ],
          },
          { matches: [{ path: { value: '/old' } }], filters: [{ type: 'RequestRedirect', requestRedirect: { scheme: 'https', port: 8443, statusCode: 301, path: { type: 'ReplacePrefixMatch', replacePrefixMatch: '/new' } } }] },
          { backendRefs: [{ name: 'cart', port: 80, weight: 3 }] },
        ],
      },
    }),
    parseRoute({ apiVersion: 'gateway.networking.k8s.io/v1', kind: 'GRPCRoute', metadata: { namespace: 'shop', name: 'cart-split' }, spec: { parentRefs: [{ kind: 'Service', name: 'cart', port: 80 }], rules: [{ matches: [{ method: { service: 'shop.Cart', method: 'Add' }, headers: [{ name: 'x-v', value: '2' }] }, { method: { type: 'RegularExpression', method: 'Get.*' } }], backendRefs: [{ name: 'cart', port: 80 }] }, { backendRefs: [{ name: 'cart', port: 80 }] }] } }),
  ],
  namespaces: new Map([['shop', { name: 'shop', labels: { 'nodemesh.io/enabled': 'true' } }]]),
  peerAuthentications: [{ namespace: 'shop', name: 'strict', selector: { app: 'cart' }, mode: 'STRICT', portModes: { '9090': 'PERMISSIVE' } }],
  authorizationPolicies: [
    {
      namespace: 'shop',
      name: 'deny-dev',
      selector: {},
      action: 'DENY',
      rules: [
        {
          from: [{ principals: ['cluster.local/ns/dev/*'], notPrincipals: [], namespaces: [], notNamespaces: ['prod'], ipBlocks: ['10.0.0.0/8'], notIpBlocks: [], serviceAccounts: ['dev/ci'], notServiceAccounts: [] }],
          to: [{ ports: [80], notPorts: [81], hosts: ['cart.shop*'], notHosts: [], methods: ['POST'], notMethods: ['GET'], paths: ['/admin/*'], notPaths: ['*.css'] }],
          when: [
            { key: 'destination.ip', values: ['10.96.0.0/12'], notValues: [] },
            { key: 'request.headers[x-debug]', values: ['*'], notValues: [] },
          ],
        },
      ],
    },
  ],
  mesh: { enrollment: 'opt-in', failClosedEnrollment: true, trustDomain: 'example.org', mtlsMode: 'STRICT', accessLog: ['payments', 'shop'] },
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
  // A string field left unset and one set to '' (protobuf decodes the first as the second) are the same.
  assert.equal(snapshotMessage(3, config, [{ ...pod, tunnel: '' }]).digest, a.digest);
  assert.notEqual(snapshotMessage(3, config, [{ ...pod, tunnel: 'HBONE' }]).digest, a.digest);
});

test('a snapshot with a bad resource is refused whole, each problem named', () => {
  const bad = snapshotMessage(5, { ...config, services: [{ ...config.services[0]!, clusterIPs: ['10.96.0.999'], ports: [{ name: 'x', port: 70000, targetPort: 1, protocol: 'TCP', appProtocol: '' }] }] }, [{ ...pod, ip4: 'nope' }]);
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

test('through protobuf and back: the digest still matches, optional fields stay unset', () => {
  const method = discoveryService()['Stream'];
  assert.ok(method);
  const noTimeouts: MeshConfig = { ...config, trafficPolicies: [{ ...config.trafficPolicies[0]!, policy: { ...config.trafficPolicies[0]!.policy, connectTimeoutMs: undefined } }] };
  for (const c of [config, noTimeouts]) {
    const sent = snapshotMessage(9, c, [pod]);
    const received = method.responseDeserialize(method.responseSerialize({ snapshot: sent })) as ControlPlaneMessage;
    assert.ok(received.snapshot);
    const d = decodeSnapshot(received.snapshot);
    assert.deepEqual(d.config.trafficPolicies, c.trafficPolicies);
  }
});

test('a delta applies to the version it was made from, and only to it', () => {
  const v1 = snapshotMessage(1, config, [pod]);
  const held = new Map(v1.resources.map((r) => [resourceKey(r), r]));
  const moved: WireWorkload = { ...pod, name: 'cart-2', uid: 'u2', ip4: '10.200.0.6' };
  const v2 = snapshotMessage(2, config, [moved]);
  const delta = { version: 2, baseVersion: 1, digest: v2.digest, upserts: [{ workload: moved }], removals: [keyParts(resourceKey({ workload: pod }))] };
  const next = applyDelta(held, 1, delta);
  const d = decodeResources(2, delta.digest, [...next.values()]);
  assert.deepEqual(d.workloads.map((w) => w.name), ['cart-2']);
  assert.throws(() => applyDelta(held, 5, delta), /delta from version 1, but this agent holds 5/);
  // A delta that leaves out a change does not reach the digest it promises.
  assert.throws(() => decodeResources(2, delta.digest, [...applyDelta(held, 1, { ...delta, removals: [] }).values()]), /digest does not match/);
});

test('durations out of bounds are refused at the wire edge as at the config edge, the field named', () => {
  const policy = (connectTimeoutMs: number, idleTimeoutMs: number) => ({
    namespace: 'shop',
    name: 'p',
    services: ['cart'],
    routes: [],
    policy: { ...DEFAULT_SERVICE_POLICY, source: 'shop/p', connectTimeoutMs, idleTimeoutMs },
  });
  const zero = snapshotMessage(7, { ...config, trafficPolicies: [policy(0, 2 ** 31)] }, [pod]);
  assert.throws(
    () => decodeSnapshot(zero),
    (e: unknown) =>
      e instanceof SnapshotInvalid &&
      e.errors.map((x) => `${x.object} ${x.field}: ${x.message}`).join('\n') ===
        ['TrafficPolicy shop/p spec.connectionPool.tcp.connectTimeout: 0 ms is outside 1 ms to 300000 ms', 'TrafficPolicy shop/p spec.connectionPool.tcp.idleTimeout: 2147483648 ms is outside 1000 ms to 2147483647 ms'].join('\n'),
  );
  assert.doesNotThrow(() => decodeSnapshot(snapshotMessage(8, { ...config, trafficPolicies: [policy(5000, 3_600_000)] }, [pod])));
  const tp = (tcp: Record<string, unknown>): Record<string, unknown> => ({
    apiVersion: 'networking.nodemesh.io/v1alpha1',
    kind: 'TrafficPolicy',
    metadata: { name: 'p', namespace: 'shop' },
    spec: { targetRefs: [{ kind: 'Service', name: 'cart' }], connectionPool: { tcp } },
  });
  assert.throws(() => parseTrafficPolicy(tp({ connectTimeout: '0s' })), (e) => e instanceof ObjectInvalid && e.field === 'spec.connectionPool.tcp.connectTimeout' && /0 ms is outside/.test(e.message));
  assert.throws(() => parseTrafficPolicy(tp({ idleTimeout: '700h' })), (e) => e instanceof ObjectInvalid && e.field === 'spec.connectionPool.tcp.idleTimeout');
  assert.equal(parseTrafficPolicy(tp({ connectTimeout: '2s', idleTimeout: '1h' })).policy.connectTimeoutMs, 2000);
});

test('security policies and the trust bundle survive protobuf; a bad policy or bundle is refused at the wire edge, the field named', () => {
  const method = discoveryService()['Stream'];
  assert.ok(method);
  const sent = snapshotMessage(11, config, [pod]);
  const root = '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n';
  const withBundle = [...sent.resources, { trustBundle: { roots: [root] } }];
  const received = method.responseDeserialize(method.responseSerialize({ snapshot: { version: 11, digest: digestOf(withBundle), resources: withBundle } })) as ControlPlaneMessage;
  assert.ok(received.snapshot);
  const d = decodeSnapshot(received.snapshot);
  assert.deepEqual(d.config.peerAuthentications, config.peerAuthentications);
  assert.deepEqual(d.config.authorizationPolicies, config.authorizationPolicies);
  assert.equal(d.config.mesh.mtlsMode, 'STRICT');
  assert.deepEqual(d.trustBundle, [root]);
  const refused = (resources: WireResource[]): string => {
    try {
      decodeResources(12, digestOf(resources), resources);
    } catch (e) {
      if (e instanceof SnapshotInvalid) return e.errors.map((x) => `${x.object} ${x.field}`).join('; ');
      throw e;
    }
    return 'accepted';
  };
  const ap = config.authorizationPolicies[0]!;
  const rule = ap.rules[0]!;
  assert.equal(refused([{ trustBundle: { roots: ['junk'] } }]), 'TrustBundle mesh roots[0]');
  assert.equal(refused([{ trustBundle: { roots: [] } }]), 'TrustBundle mesh roots');
  assert.equal(refused([{ peerAuthentication: { namespace: 'shop', name: 'p', selector: {}, mode: 'ON', portModes: {} } }]), 'PeerAuthentication shop/p spec.mtls.mode');
  assert.equal(refused([{ authorizationPolicy: { namespace: 'shop', name: 'a', selector: {}, action: 'CUSTOM', rules: [] } }]), 'AuthorizationPolicy shop/a spec.action');
  const badRule = { from: rule.from.map((f) => ({ ...f, principals: [...f.principals], notPrincipals: [], namespaces: [], notNamespaces: [...f.notNamespaces], ipBlocks: ['10.0.0.0/99'], notIpBlocks: [], serviceAccounts: [], notServiceAccounts: [] })), to: [], when: [] };
  assert.equal(refused([{ authorizationPolicy: { namespace: 'shop', name: 'a', selector: {}, action: 'DENY', rules: [badRule] } }]), 'AuthorizationPolicy shop/a spec.rules[0].from[0].source.ipBlocks[0]');
  assert.equal(refused([{ authorizationPolicy: { namespace: 'shop', name: 'a', selector: {}, action: 'DENY', rules: [{ from: [], to: [], when: [{ key: 'request.method', values: ['GET'], notValues: [] }] }] } }]), 'AuthorizationPolicy shop/a spec.rules[0].when[0].key');
  assert.equal(refused([{ mesh: { enrollment: 'all', failClosedEnrollment: false, trustDomain: '', mtlsMode: 'OFF' } }]), 'ConfigMap nodemesh data.mtlsMode');
});

test('a policy with request attributes: agents get it whole; an agent that predates them gets only what it can enforce (Istio\'s TCP reading)', () => {
  const method = discoveryService()['Stream'];
  assert.ok(method);
  const received = method.responseDeserialize(method.responseSerialize({ snapshot: snapshotMessage(3, config, [pod]) })) as ControlPlaneMessage;
  const resources = received.snapshot?.resources ?? [];
  assert.deepEqual(decodeSnapshot({ version: 3, digest: digestOf(resources), resources }).config.authorizationPolicies, config.authorizationPolicies, 'whole, request attributes and all');
  // An older agent knows no requestRules (protobuf drops the field): it decodes `rules`.
  const old = resources.map((r) => (r.authorizationPolicy ? { authorizationPolicy: { ...r.authorizationPolicy, requestRules: [] } } : r));
  const [deny] = decodeSnapshot({ version: 3, digest: digestOf(old), resources: old }).config.authorizationPolicies;
  assert.deepEqual(deny?.rules[0]?.to, [{ ports: [80], notPorts: [81], hosts: [], notHosts: [], methods: [], notMethods: [], paths: [], notPaths: [] }], 'a DENY rule without its request attributes: it denies more');
  assert.deepEqual(deny?.rules[0]?.when.map((c) => c.key), ['destination.ip'], 'its request conditions left out');
  const allow = { ...config.authorizationPolicies[0]!, name: 'allow-get', action: 'ALLOW' as const };
  const withAllow = snapshotMessage(4, { ...config, authorizationPolicies: [allow] }, [pod]).resources.map((r) => (r.authorizationPolicy ? { authorizationPolicy: { ...r.authorizationPolicy, requestRules: [] } } : r));
  assert.deepEqual(decodeSnapshot({ version: 4, digest: digestOf(withAllow), resources: withAllow }).config.authorizationPolicies[0]?.rules, [], 'an ALLOW rule that needs a request: left out, so it admits nothing');
});
