/**
 * The control plane facing bad input (issue: Bad input): bad objects are rejected with file,
 * object and field named in /debug/snapshot and the metrics while the rest applies; garbled and
 * oversized gRPC messages end only their own stream; an agent that never answers costs one
 * message, not a queue.
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';

import { credentials, makeClientConstructor, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js';

import { ControlPlane } from '../../src/control-plane/server.js';
import { discoveryService, type ControlPlaneMessage } from '../../src/protocol/discovery.js';
import { metricValue } from '../support/agent.js';
import { waitFor } from '../support/sandbox.js';
import { scratch } from '../support/scratch.js';
import { TestAgent } from '../support/test-agent.js';

const service = (name: string, port: unknown): string => `apiVersion: v1\nkind: Service\nmetadata: {name: ${name}, namespace: shop}\nspec:\n  clusterIP: 10.96.3.${name.length}\n  selector: {app: ${name}}\n  ports: [{name: tcp, port: ${JSON.stringify(port)}, targetPort: 8080}]\n`;

/** A Discovery client that sends raw bytes, whatever they are. */
function rawStream(address: string): { call: ClientDuplexStream<Buffer, ControlPlaneMessage>; status: Promise<ServiceError | undefined>; received: ControlPlaneMessage[] } {
  const base = discoveryService();
  const stream = base['Stream'];
  assert.ok(stream);
  const Client = makeClientConstructor({ Stream: { ...stream, requestSerialize: (b: Buffer) => b } }, 'RawDiscovery');
  const client = new Client(address, credentials.createInsecure(), { 'grpc.max_send_message_length': 64 * 1024 * 1024 });
  const call = (client as unknown as { Stream(): ClientDuplexStream<Buffer, ControlPlaneMessage> }).Stream();
  const received: ControlPlaneMessage[] = [];
  call.on('data', (m: ControlPlaneMessage) => received.push(m));
  const status = new Promise<ServiceError | undefined>((resolve) => {
    call.on('error', (e: ServiceError) => resolve(e));
    call.on('end', () => resolve(undefined));
  });
  return { call, status, received };
}

test('control plane: bad objects named and counted, the rest served; garbled, oversized and silent streams cost only themselves', async (t) => {
  const { dir, stops } = await scratch(t, 'nodemesh-cp-bad');
  await writeFile(join(dir, 'good.yaml'), service('web', 80));
  await writeFile(join(dir, 'unknown-field.yaml'), service('typo', 80).replace('selector:', 'selectr:'));
  await writeFile(join(dir, 'wrong-type.yaml'), service('strport', '80'));
  await writeFile(join(dir, 'zz-duplicate.yaml'), service('web', 81));
  await writeFile(join(dir, 'policy.yaml'), 'apiVersion: networking.nodemesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: lb, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: missing}]\n');
  await writeFile(join(dir, 'not-yaml.yaml'), 'apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n');
  await writeFile(join(dir, 'route.yaml'), 'apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-nowhere, namespace: shop}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules: [{backendRefs: [{name: missing, port: 80}]}]\n');
  const cp = await ControlPlane.start({ source: { kind: 'dir', dir }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 }, warmupMs: 0 });
  stops.push(() => cp.stop());
  // Both ports from the kernel (a port picked beforehand could be handed to gRPC's port 0).
  const http = cp.httpPort();
  const address = `127.0.0.1:${cp.grpcPort()}`;
  const good = new TestAgent(address, 'node-good', []);
  stops.push(() => good.stop());
  await waitFor(() => good.version > 0, 5000, 'the good agent gets a snapshot');
  assert.deepEqual(good.keys('Service'), ['Service/shop/web']);
  assert.equal(good.held.get('Service/shop/web')?.service?.ports[0]?.port, 80, 'the first definition of a duplicate wins');

  const debug = (await (await fetch(`http://127.0.0.1:${http}/debug/snapshot?node=node-good`)).json()) as {
    configErrors: Array<{ file: string; object: string; field: string }>;
    configWarnings: Array<{ object: string; message: string }>;
  };
  assert.deepEqual(
    debug.configErrors.map((e) => [e.file.split('/').pop(), e.object, e.field]).sort(),
    [
      ['not-yaml.yaml', 'document 1', ''],
      ['route.yaml', 'HTTPRoute shop/to-nowhere', 'spec.rules[0].backendRefs[0].name'],
      ['unknown-field.yaml', 'Service shop/typo', 'spec.selectr'],
      ['wrong-type.yaml', 'Service shop/strport', 'spec.ports[0].port'],
      ['zz-duplicate.yaml', 'Service shop/web', 'metadata.name'],
    ],
  );
  assert.deepEqual(debug.configWarnings, [{ object: 'TrafficPolicy shop/lb', message: 'targets Service shop/missing, which does not exist' }]);
  const metrics = await (await fetch(`http://127.0.0.1:${http}/metrics`)).text();
  assert.equal(metricValue(metrics, 'nodemesh_cp_config_rejected_objects', { kind: 'Service' }), 3);
  assert.equal(metricValue(metrics, 'nodemesh_cp_config_rejected_objects', { kind: 'yaml' }), 1);
  assert.equal(metricValue(metrics, 'nodemesh_cp_config_rejected_objects', { kind: 'HTTPRoute' }), 1);
  assert.equal(metricValue(metrics, 'nodemesh_cp_config_warnings'), 1);

  // Bytes that are no AgentMessage: that stream ends with an error, the control plane goes on.
  const garbled = rawStream(address);
  garbled.call.write(Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]));
  const garbledStatus = await garbled.status;
  assert.ok(garbledStatus && garbledStatus.code !== 0, 'the garbled stream is ended with an error status');
  // Larger than the control plane accepts (4 MiB): refused, and nothing of it is kept.
  const big = rawStream(address);
  big.call.write(Buffer.alloc(5 * 1024 * 1024, 0x41));
  const bigStatus = await big.status;
  assert.equal(bigStatus?.code, 8, 'RESOURCE_EXHAUSTED');

  // An agent that never answers: one Snapshot, then nothing however often the config changes.
  const silent = rawStream(address);
  silent.call.write(discoveryService()['Stream']?.requestSerialize({ hello: { node: 'node-silent', agentVersion: 'test', capabilities: [], version: 0, digest: '' } }) as Buffer);
  await waitFor(() => silent.received.length === 1, 5000, 'the silent agent gets its snapshot');
  for (let port = 82; port < 87; port++) {
    const before = good.version;
    await writeFile(join(dir, 'good.yaml'), service('web', port));
    await waitFor(() => good.version > before, 5000, `edit to port ${port} reaches the good agent`);
  }
  assert.equal(silent.received.length, 1, 'no queue for an agent that does not answer');
  const silentStatus = cp.nodes().find((n) => n.node === 'node-silent');
  assert.equal(silentStatus?.inSync, false);
  assert.equal(silentStatus?.ackedVersion, 0);
  // When it answers at last, it gets one message with everything since.
  const version = silent.received[0]?.snapshot?.version ?? 0;
  silent.call.write(discoveryService()['Stream']?.requestSerialize({ ack: { version } }) as Buffer);
  await waitFor(() => silent.received.length === 2, 5000, 'the folded change after the Ack');
  assert.equal(silent.received[1]?.delta?.upserts.find((r) => r.service)?.service?.ports[0]?.port, 86);
  silent.call.cancel();
  assert.deepEqual(good.keys('Service'), ['Service/shop/web'], 'the good agent was served throughout');
});

test('control plane: with --agent-tokens an agent must present a token and may speak only for its node', async (t) => {
  const { dir, stops } = await scratch(t, 'nodemesh-cp-tokens');
  await writeFile(join(dir, 'svc.yaml'), service('web', 80));
  const tokens = join(dir, 'agents.tokens');
  await writeFile(tokens, '# node token\nnode-a tok-aaaaaaaaaaaaaaaa\nnode-b tok-bbbbbbbbbbbbbbbb\n');
  // The token file sits next to the config here; the config folder reader only reads *.yaml.
  const cp = await ControlPlane.start({ source: { kind: 'dir', dir }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 }, warmupMs: 0, agentTokens: tokens });
  stops.push(() => cp.stop());
  // Both ports from the kernel (a port picked beforehand could be handed to gRPC's port 0).
  const http = cp.httpPort();
  const address = `127.0.0.1:${cp.grpcPort()}`;
  const good = new TestAgent(address, 'node-a', [], 'tok-aaaaaaaaaaaaaaaa');
  const impostor = new TestAgent(address, 'node-b', [], 'tok-aaaaaaaaaaaaaaaa');
  const anonymous = new TestAgent(address, 'node-c', []);
  const wrong = new TestAgent(address, 'node-b', [], 'tok-not-a-real-token');
  stops.push(() => [good, impostor, anonymous, wrong].forEach((a) => a.stop()));
  await waitFor(() => good.version > 0, 5000, 'node-a is served');
  await waitFor(() => impostor.error !== undefined && anonymous.error !== undefined && wrong.error !== undefined, 5000, 'the others are refused');
  assert.equal(impostor.error?.code, 7, 'PERMISSION_DENIED');
  assert.match(impostor.error?.details ?? '', /authenticated as node node-a claims node node-b/);
  assert.equal(anonymous.error?.code, 16, 'UNAUTHENTICATED');
  assert.equal(wrong.error?.code, 16);
  assert.deepEqual([impostor.version, anonymous.version, wrong.version], [0, 0, 0], 'nothing was sent to them');
  assert.deepEqual(cp.nodes().map((n) => [n.node, n.connected]), [['node-a', true]]);
  const metrics = await (await fetch(`http://127.0.0.1:${http}/metrics`)).text();
  assert.equal(metricValue(metrics, 'nodemesh_cp_stream_errors_total', { reason: 'node_mismatch' }), 1);
  assert.equal(metricValue(metrics, 'nodemesh_cp_stream_errors_total', { reason: 'unauthenticated' }), 2);
  // A broken token file stops a control plane from starting open.
  await writeFile(tokens, 'node-a short\n');
  await assert.rejects(
    ControlPlane.start({ source: { kind: 'dir', dir }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 }, agentTokens: tokens }),
    (e: Error & { code?: string }) => e.code === 'NM_ERR_AGENT_TOKENS' && /line 1/.test(e.message),
  );
});
