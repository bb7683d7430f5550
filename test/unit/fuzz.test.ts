/**
 * Property-based tests (fast-check) of the parsers and validators at the edges: pod records and
 * hand-overs, config objects, durations, Discovery messages. For any input: no crash (only the
 * edge's own error type), no hang, and every rejection names what it rejects.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import fc from 'fast-check';

import { checkPodFields, PodFieldInvalid, type PodEdge } from '../../src/agent/pods/validate.js';
import { UUID } from '../../src/shared/names.js';
import { parseObject } from '../../src/config/objects.js';
import { parseDuration } from '../../src/config/schemas.js';
import { ObjectInvalid } from '../../src/config/service.js';
import { DEFAULT_SERVICE_POLICY } from '../../src/config/traffic-policy.js';
import { DEFAULT_MESH } from '../../src/config/mesh.js';
import { EMPTY_CONFIG } from '../../src/config/store.js';
import { SnapshotInvalid, decodeSnapshot, discoveryService, encodeControlPlaneMessage, snapshotMessage, type ControlPlaneMessage } from '../../src/protocol/discovery.js';

const RUNS = { numRuns: 300 };

const EDGE: PodEdge = { podsCgroup: '/sys/fs/cgroup/nodemesh/pods', netnsDir: '/run/netns', cidr4: { network: '10.200.0.0', prefix: 24 }, cidr6: { network: 'fd00:6e6d::', prefix: 64 } };

/** Strings that look like what the fields hold, with hostile ones mixed in. */
const fieldString = fc.oneof(
  fc.string(),
  fc.uuid(),
  fc.constantFrom('../../../../etc', '/proc/1/ns/net', '/run/netns/x', '/run/netns/../x', '/sys/fs/cgroup/nodemesh/pods/a_b', '/sys/fs/cgroup', '10.200.0.2', 'fd00:6e6d::2', 'fe80::1', 'web', ''),
);

test('pod fields: any object is accepted with the invariants held, or refused naming a field', () => {
  const pod = fc.record(
    {
      uid: fieldString,
      name: fieldString,
      namespace: fieldString,
      serviceAccount: fieldString,
      labels: fc.oneof(fc.dictionary(fc.string(), fc.string()), fc.anything()),
      ip4: fieldString,
      ip6: fieldString,
      netnsPath: fieldString,
      cgroupPath: fieldString,
    },
    { requiredKeys: [] },
  );
  fc.assert(
    fc.property(fc.oneof(pod, fc.anything()), (value) => {
      try {
        const p = checkPodFields(value, EDGE);
        assert.match(p.uid, UUID);
        assert.ok(!p.netnsPath.includes('..') && p.netnsPath.startsWith('/run/netns/'));
        assert.ok(p.cgroupPath.startsWith('/sys/fs/cgroup/nodemesh/pods/') && !p.cgroupPath.includes('..'));
      } catch (e) {
        assert.ok(e instanceof PodFieldInvalid, `only PodFieldInvalid: ${String(e)}`);
        assert.ok(e.field.length > 0);
      }
    }),
    RUNS,
  );
});

test('durations: any text is a whole number of milliseconds or refused naming the field', () => {
  fc.assert(
    fc.property(fc.oneof(fc.string(), fc.stringMatching(/^([0-9]{1,6}(\.[0-9]{1,3})?(ms|s|m|h)){1,3}$/)), (text) => {
      try {
        const ms = parseDuration(text, 'spec.x');
        assert.ok(Number.isInteger(ms) && ms >= 0);
      } catch (e) {
        assert.ok(e instanceof ObjectInvalid && e.field === 'spec.x', String(e));
      }
    }),
    RUNS,
  );
});

test('config objects: any document of a known kind is an object or an issue naming the object, never a crash', () => {
  const kinds = fc.constantFrom(
    ['v1', 'Service'],
    ['v1', 'Namespace'],
    ['v1', 'ConfigMap'],
    ['networking.nodemesh.io/v1alpha1', 'TrafficPolicy'],
    ['gateway.networking.k8s.io/v1', 'HTTPRoute'],
    ['gateway.networking.k8s.io/v1', 'GRPCRoute'],
    ['security.nodemesh.io/v1', 'AuthorizationPolicy'],
    ['security.nodemesh.io/v1', 'PeerAuthentication'],
  );
  const doc = fc.tuple(kinds, fc.record({ name: fc.oneof(fc.constantFrom('web', 'nodemesh'), fc.string()), namespace: fc.oneof(fc.constant('shop'), fc.string()) }, { requiredKeys: [] }), fc.anything(), fc.anything());
  fc.assert(
    fc.property(doc, ([[apiVersion, kind], metadata, spec, data]) => {
      const r = parseObject('fuzz.yaml', { apiVersion, kind, metadata, spec, data });
      if ('issue' in r) {
        assert.ok(r.issue.object.length > 0, 'the issue names the object');
        assert.equal(typeof r.issue.field, 'string');
        assert.ok(r.issue.message.length > 0);
      }
    }),
    RUNS,
  );
});

test('Discovery: a garbled Snapshot decodes to a clean refusal (SnapshotInvalid) or a snapshot, never a crash', () => {
  const workload = { uid: '0f8fad5b-d9cb-469f-a165-70867728950e', namespace: 'shop', name: 'cart-1', serviceAccount: 'cart', labels: { app: 'cart' }, ip4: '10.200.0.2', ip6: 'fd00:6e6d::2', node: 'n' };
  const config = {
    ...EMPTY_CONFIG,
    mesh: DEFAULT_MESH,
    services: [{ namespace: 'shop', name: 'cart', clusterIPs: ['10.96.0.1'], ports: [{ name: 'tcp', port: 80, targetPort: 8080, protocol: 'TCP' as const, appProtocol: '' }], selector: { app: 'cart' }, exportTo: ['*'] }],
    trafficPolicies: [{ namespace: 'shop', name: 'p', services: ['cart'], routes: [], policy: { ...DEFAULT_SERVICE_POLICY, source: 'shop/p', connectTimeoutMs: 2000 } }],
  };
  const valid = encodeControlPlaneMessage({ snapshot: snapshotMessage(5, config, [workload]) }).bytes;
  const deserialize = discoveryService()['Stream']?.responseDeserialize as (b: Buffer) => ControlPlaneMessage;
  const mutation = fc.array(fc.record({ at: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 8 });
  fc.assert(
    fc.property(mutation, fc.option(fc.nat(), { nil: undefined }), (flips, cut) => {
      const bytes = Buffer.from(valid);
      for (const f of flips) bytes[f.at % bytes.length] = f.byte;
      const garbled = cut === undefined ? bytes : bytes.subarray(0, cut % bytes.length);
      let message: ControlPlaneMessage;
      try {
        message = deserialize(garbled);
      } catch {
        return; // the gRPC layer ends the stream with an error status: covered by control-plane tests
      }
      if (!message.snapshot) return;
      try {
        decodeSnapshot(message.snapshot);
      } catch (e) {
        assert.ok(e instanceof SnapshotInvalid, `only SnapshotInvalid: ${String(e)}`);
        for (const err of e.errors) assert.ok(err.object.length > 0 && err.message.length > 0);
      }
    }),
    { numRuns: 1000 },
  );
});
