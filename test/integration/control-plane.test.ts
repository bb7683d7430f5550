/**
 * The control plane and an agent as processes, on the real kernel: config edits reach the
 * proxy's routing over the Discovery stream, traffic keeps flowing while the control plane is
 * gone and the agent resyncs after it restarts; and an agent facing a control plane that sends a
 * bad snapshot Nacks it and keeps serving the last good one.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { Server, ServerCredentials, type ServerDuplexStream } from '@grpc/grpc-js';

import type { Workload } from '../../src/config/snapshot.js';
import { EMPTY_CONFIG } from '../../src/config/store.js';
import { discoveryService, snapshotMessage, type AgentMessage, type ControlPlaneMessage } from '../../src/protocol/discovery.js';
import type { Service } from '../../src/config/service.js';
import { metricValue, serviceYaml, startAgent, startControlPlane } from '../support/agent.js';
import { createSandbox, waitFor } from '../support/sandbox.js';

const SVC = '10.96.0.40';

test('control plane: edits reach the agent, traffic survives its loss, the agent resyncs', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const b = await sb.echoPod('echo-b', 8080, ['app=echo-b']);
  const c = await sb.echoPod('echo-c', 8080, ['app=echo-c']);
  const client = await sb.idlePod('client-a', ['app=client']);
  // Agents authenticate with a token bound to their node (the agent's node is test-<sandbox id>).
  const tokens = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-tokens-`));
  sb.defer(() => rm(tokens, { recursive: true, force: true }));
  await writeFile(join(tokens, 'agents'), `test-${sb.id} token-for-this-node-0123\n`);
  await writeFile(join(tokens, 'agent-token'), 'token-for-this-node-0123\n');
  const cp = await startControlPlane(sb, { 'svc.yaml': serviceYaml('backend', [SVC], { app: 'echo-b' }) }, { agentTokens: join(tokens, 'agents') });
  const agent = await startAgent(sb, { controlPlane: cp.address, tokenFile: join(tokens, 'agent-token') });
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'three pods enrolled and verified');
  const endpoints = async (): Promise<string[]> => (await agent.config()).services.find((s) => s.service === 'default/backend:80')?.endpoints.map((e) => e.pod) ?? [];
  // The pods reach the control plane from the agent's report, and come back as endpoints.
  await waitFor(async () => (await endpoints()).join() === 'default/echo-b', 10_000, 'endpoint B from the control plane');
  assert.ok((await sb.dialFrom(client, SVC, 80)).intact);
  await waitFor(async () => (await b.connections()).length === 1, 5000, 'B got the connection');

  // An edit of the config folder: the endpoint changes in the agent's routing within a second.
  const edited = Date.now();
  await cp.writeConfig('svc.yaml', serviceYaml('backend', [SVC], { app: 'echo-c' }));
  await waitFor(async () => (await endpoints()).join() === 'default/echo-c', 5000, 'endpoint C after the edit');
  const tookMs = Date.now() - edited;
  assert.ok(tookMs < 1000, `edit to routing took ${tookMs} ms`);
  assert.ok((await sb.dialFrom(client, SVC, 80)).intact);
  await waitFor(async () => (await c.connections()).length === 1, 5000, 'C got the connection');
  await waitFor(async () => (await cp.nodes()).nodes.some((n) => n.inSync && n.ackedVersion === n.sentVersion), 5000, 'node in sync');
  const cpMetrics = await cp.metrics();
  assert.equal(metricValue(cpMetrics, 'nodemesh_cp_connected_agents'), 1);
  assert.ok(metricValue(cpMetrics, 'nodemesh_cp_acks_total', { result: 'ack' }) >= 2);
  assert.ok(metricValue(cpMetrics, 'nodemesh_cp_pushes_total', { type: 'delta' }) >= 1, 'the edit went out as a delta');

  // Control plane gone: the agent keeps serving the last snapshot.
  await cp.kill('SIGKILL');
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_control_plane_connected') === 0, 5000, 'agent sees the stream lost');
  assert.ok((await sb.dialFrom(client, SVC, 80)).intact, 'traffic flows without the control plane');
  await waitFor(async () => (await c.connections()).length === 2, 5000, 'C got the connection while the control plane was down');

  // Edited while it was down; after the restart the agent reconnects and gets the new config.
  await cp.writeConfig('svc.yaml', serviceYaml('backend', [SVC], { app: 'echo-b' }));
  await cp.restart();
  await waitFor(async () => (await endpoints()).join() === 'default/echo-b', 20_000, 'endpoint B after the control plane restarted');
  assert.ok((await sb.dialFrom(client, SVC, 80)).intact);
  await waitFor(async () => (await b.connections()).length === 2, 5000, 'B got the connection after the resync');
});

/** A control plane written for this test: it sends whatever snapshots the test gives it. */
async function scriptedControlPlane(): Promise<{ address: string; send(m: ControlPlaneMessage): void; answers: AgentMessage[]; hellos: number; stop(): Promise<void> }> {
  const server = new Server();
  let call: ServerDuplexStream<AgentMessage, ControlPlaneMessage> | undefined;
  const state = {
    address: '',
    answers: [] as AgentMessage[],
    hellos: 0,
    send(m: ControlPlaneMessage) {
      call?.write(m);
    },
    stop: () => new Promise<void>((resolve) => server.tryShutdown(() => resolve())),
  };
  server.addService(discoveryService(), {
    Stream: (c: ServerDuplexStream<AgentMessage, ControlPlaneMessage>) => {
      call = c;
      c.on('data', (m: AgentMessage) => {
        if (m.hello) state.hellos++;
        if (m.ack || m.nack) state.answers.push(m);
      });
    },
  });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync('127.0.0.1:0', ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  state.address = `127.0.0.1:${port}`;
  return state;
}

test('control plane protocol: a bad snapshot is Nacked with the field named, the last good one keeps serving', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const b = await sb.echoPod('echo-b', 8080, ['app=echo-b']);
  const client = await sb.idlePod('client-a', ['app=client']);
  const fake = await scriptedControlPlane();
  t.after(() => fake.stop());
  const service = (port: number): Service => ({ namespace: 'default', name: 'backend', clusterIPs: [SVC], ports: [{ name: 'tcp', port, targetPort: 8080, protocol: 'TCP', appProtocol: '' }], selector: { app: 'echo-b' }, exportTo: ['*'] });
  const podB: Workload = { uid: b.record.uid, namespace: 'default', name: 'echo-b', serviceAccount: 'default', labels: { app: 'echo-b' }, ip4: b.record.ip4, ip6: b.record.ip6 };
  const podClient: Workload = { uid: client.uid, namespace: 'default', name: 'client-a', serviceAccount: 'default', labels: { app: 'client' }, ip4: client.ip4, ip6: client.ip6 };
  // As a control plane does, the snapshot names the node's own pods: the agent serves a pod only
  // with a snapshot that was computed for it.
  const workloads = [podB, podClient].map((w) => ({ ...w, labels: { ...w.labels }, node: 'n' }));
  const good = snapshotMessage(1000, { ...EMPTY_CONFIG, services: [service(80)] }, workloads);
  // The agent is ready only once it has a config: send the good one as soon as it says Hello.
  const agentReady = startAgent(sb, { controlPlane: fake.address });
  await waitFor(async () => fake.hellos > 0, 10_000, 'Hello from the agent');
  fake.send({ snapshot: good });
  const agent = await agentReady;
  await waitFor(async () => fake.answers.length === 1, 5000, 'answer to the good snapshot');
  assert.deepEqual(fake.answers[0]?.ack, { version: 1000 });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'pods verified');
  assert.ok((await sb.dialFrom(client, SVC, 80)).intact);

  // Port 0 is no TCP port: the whole snapshot is refused, with the object and field named.
  const bad = snapshotMessage(2000, { ...EMPTY_CONFIG, services: [service(0)] }, []);
  fake.send({ snapshot: bad });
  await waitFor(async () => fake.answers.length === 2, 5000, 'answer to the bad snapshot');
  const nack = fake.answers[1]?.nack;
  assert.equal(nack?.version, 2000);
  assert.deepEqual(
    nack?.errors.map((e) => [e.object, e.field]),
    [['Service default/backend', 'spec.ports[0].port']],
  );
  // A garbled one (resources that do not match the digest) is refused too.
  fake.send({ snapshot: { ...good, version: 3000, resources: good.resources.slice(1) } });
  await waitFor(async () => fake.answers.length === 3, 5000, 'answer to the garbled snapshot');
  assert.equal(fake.answers[2]?.nack?.errors[0]?.field, 'digest');

  const config = await agent.config();
  assert.equal(config.version, 1000, 'the last good snapshot keeps serving');
  assert.ok((await sb.dialFrom(client, SVC, 80)).intact, 'and traffic flows on it');
  await waitFor(async () => (await b.connections()).length === 2, 5000, 'B got both connections');

  // A delta on another base than the agent holds is refused; one on its base applies.
  const moved = snapshotMessage(4000, { ...EMPTY_CONFIG, services: [service(81)] }, workloads);
  const upsert = moved.resources.find((r) => r.service);
  assert.ok(upsert);
  fake.send({ delta: { version: 4000, baseVersion: 999, digest: moved.digest, upserts: [upsert], removals: [] } });
  await waitFor(async () => fake.answers.length === 4, 5000, 'answer to the delta on a wrong base');
  assert.deepEqual(fake.answers[3]?.nack?.errors.map((e) => [e.object, e.field]), [['Delta', 'baseVersion']]);
  fake.send({ delta: { version: 4000, baseVersion: 1000, digest: moved.digest, upserts: [upsert], removals: [] } });
  await waitFor(async () => fake.answers.length === 5, 5000, 'answer to the delta');
  assert.deepEqual(fake.answers[4]?.ack, { version: 4000 });
  assert.deepEqual((await agent.config()).services.map((x) => x.service), ['default/backend:81']);

  const m = await agent.metrics();
  assert.equal(metricValue(m, 'nodemesh_config_snapshots_total', { result: 'applied' }), 2);
  assert.equal(metricValue(m, 'nodemesh_config_snapshots_total', { result: 'rejected' }), 3);
});
