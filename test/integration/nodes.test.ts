/**
 * Several nodes on one machine (design.md section 11): two agents behind one control plane, each
 * with its own pod cgroup, gate, pins, ports and enrollment socket. Pods of both share the bridge.
 * A connection from a pod on node A to an endpoint on node B leaves A's proxy for B's pod
 * address and enters B's proxy, which delivers it with the client's address; an endpoint on A
 * itself takes the same-node path.
 */
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { rmdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';

import { pinnedObjectInfo } from '../../src/datapath/native.js';
import { findCgroup2Mount } from '../../src/runtime/cgroup.js';
import { nodeCgroup } from '../../src/runtime/config.js';
import { agentRunDir, handOverPod } from '../../src/runtime/enrollment.js';
import { isNodemeshError } from '../../src/shared/errors.js';
import { metricValue, serviceYaml, startAgent, startControlPlane } from '../support/agent.js';
import { cli, createSandbox, waitFor } from '../support/sandbox.js';

const SVC_REMOTE = '10.96.0.61';
const SVC_LOCAL = '10.96.0.62';

test('two nodes: each agent serves only its own pods; A to B crosses both proxies, A to A takes the same-node path', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_REMOTE);
  await sb.blackhole(SVC_LOCAL);
  const nodeA = sb.config.node;
  const nodeB = `${nodeA}-b`;
  const cp = await startControlPlane(sb, {
    'remote.yaml': serviceYaml('remote', [SVC_REMOTE], { tier: 'b' }),
    'local.yaml': serviceYaml('local', [SVC_LOCAL], { tier: 'a' }),
    'mesh.yaml': 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {failClosedEnrollment: "true"}\n',
  });
  const agentA = await startAgent(sb, { controlPlane: cp.address });
  const agentB = await startAgent(sb, { controlPlane: cp.address }, { node: nodeB });
  const serverB = await sb.echoPod('server-b', 8080, ['tier=b'], { node: nodeB, serviceAccount: 'server' });
  const serverA = await sb.echoPod('server-a', 8080, ['tier=a'], { serviceAccount: 'server' });
  const client = await sb.idlePod('client-a', [], { serviceAccount: 'client' });

  // Each agent enrolled exactly its node's pods.
  const names = (pods: ReadonlyArray<{ name: string }>): string => pods.map((p) => p.name).sort().join(',');
  await agentA.waitForPods((p) => names(p) === 'client-a,server-a' && p.every((x) => x.verified), "node A's pods, verified");
  await agentB.waitForPods((p) => names(p) === 'server-b' && p.every((x) => x.verified), "node B's pod, verified");
  assert.deepEqual(readdirSync(join(agentA.pinRoot, 'pods')).sort(), [client.uid, serverA.record.uid].sort(), "A pinned only A's pods");
  assert.deepEqual(readdirSync(join(agentB.pinRoot, 'pods')), [serverB.record.uid], "B pinned only B's pod");
  // Each gate sits on its own node's cgroup, and each pod's cgroup is under its node's.
  const mount = await findCgroup2Mount();
  // No pinned gate is not on the cgroup (while the agent re-attaches it, its pin is replaced).
  const gateOn = async (agent: typeof agentA, node: string): Promise<boolean> => {
    const cgroup = nodeCgroup(mount, sb.config, node);
    const pin = join(agent.pinRoot, 'gate', 'nm_gate4');
    if (!existsSync(pin)) return false;
    let gate: string | undefined;
    try {
      gate = pinnedObjectInfo(pin).fields['cgroup_id'];
    } catch (e) {
      if (isNodemeshError(e) && e.context?.['errnoCode'] === 'ENOENT') return false;
      throw e;
    }
    return existsSync(cgroup) && gate === String((await stat(cgroup, { bigint: true })).ino);
  };
  assert.ok(await gateOn(agentA, nodeA), "A's gate is on A's pod cgroup");
  assert.ok(await gateOn(agentB, nodeB), "B's gate is on B's pod cgroup");
  assert.ok(serverB.record.cgroupPath.startsWith(nodeCgroup(mount, sb.config, nodeB) + '/'));
  assert.ok(client.cgroupPath.startsWith(nodeCgroup(mount, sb.config, nodeA) + '/'));

  // `pod list` shows the node of each pod.
  const listed = await cli(['pod', 'list', '-o', 'json'], sb.env);
  assert.equal(listed.code, 0, listed.stderr);
  assert.deepEqual(
    (JSON.parse(listed.stdout) as Array<{ name: string; node: string }>).map((p) => `${p.name}@${p.node}`).sort(),
    [`client-a@${nodeA}`, `server-a@${nodeA}`, `server-b@${nodeB}`],
  );
  assert.match((await cli(['pod', 'list'], sb.env)).stdout, new RegExp(`server-b\\s+${nodeB}\\s+running`));

  // Both nodes' pods reach both agents as endpoints through the control plane.
  const endpoints = async (agent: typeof agentA, service: string): Promise<string> =>
    ((await agent.config()).services.find((s) => s.service === service)?.endpoints.map((e) => e.pod) ?? []).join();
  await waitFor(async () => (await endpoints(agentA, 'default/remote:80')) === 'default/server-b', 10_000, "node B's endpoint known on node A");

  // A to B: out of A's proxy through an HBONE tunnel (mutual TLS, both pods' identities) to B's
  // pod address, into B's proxy, delivered with the client's own address.
  const remote = await sb.dialFrom(client, SVC_REMOTE, 80, { bytes: 65536 });
  assert.ok(remote.intact, JSON.stringify(remote));
  await waitFor(async () => (await serverB.connections()).length === 1, 5000, 'server B got the connection');
  assert.equal((await serverB.connections())[0]?.address, client.ip4, "B's application sees the client's address");
  let lastB = '';
  // B knows the source by its certificate: its principal and namespace (its workload name only
  // if B's scoped view of the mesh has the client, which it does not: it is no endpoint of B's).
  const fromClient = { reporter: 'destination', destination_workload: 'server-b', connection_security_policy: 'mutual_tls', source_principal: 'spiffe://cluster.local/ns/default/sa/client', source_workload_namespace: 'default' };
  await waitFor(async () => metricValue((lastB = await agentB.metrics()), 'istio_tcp_connections_closed_total', fromClient) === 1, 5000, "B's proxy reports the connection from A's pod").catch((e: Error) => {
    throw new Error(`${e.message}: ${lastB.split('\n').filter((l) => /^(istio_tcp_connections_closed|nodemesh_proxied|nodemesh_connections_refused)/.test(l)).join('\n')}`);
  });
  const metricsA = await agentA.metrics();
  assert.equal(metricValue(metricsA, 'istio_tcp_connections_opened_total', { reporter: 'source', source_workload: 'client-a', destination_workload: 'server-b', connection_security_policy: 'mutual_tls' }), 1, "A's proxy reports it as the source");
  assert.equal(metricValue(metricsA, 'istio_tcp_connections_opened_total', { reporter: 'destination' }), 0, 'A is not the destination of it');
  assert.equal(metricValue(metricsA, 'nodemesh_proxied_connections_total', { path: 'hbone' }), 1, 'A sent it through a tunnel');
  assert.equal(metricValue(metricsA, 'nodemesh_hbone_tunnels_opened_total'), 1);
  assert.equal(metricValue(await agentB.metrics(), 'nodemesh_proxied_connections_total', { path: 'inbound' }), 1, 'B took it in');
  assert.ok(metricValue(await agentB.metrics(), 'istio_tcp_received_bytes_total', { reporter: 'destination', destination_workload: 'server-b' }) >= 65536, "B counted the client's bytes");

  // A to A: the same-node path, B never sees it.
  assert.ok((await sb.dialFrom(client, SVC_LOCAL, 80)).intact);
  await waitFor(async () => (await serverA.connections()).length === 1, 5000, 'server A got the connection');
  assert.equal(metricValue(await agentA.metrics(), 'nodemesh_proxied_connections_total', { path: 'same_node' }), 1);
  assert.equal(metricValue(await agentB.metrics(), 'istio_tcp_connections_opened_total', { destination_workload: 'server-b' }), 1, 'B saw only the connection from A');
  // A second connection from the same pod to the same destination reuses the tunnel.
  assert.ok((await sb.dialFrom(client, SVC_REMOTE, 80)).intact);
  await waitFor(async () => (await serverB.connections()).length === 2, 5000, 'server B got the second connection');
  assert.equal(metricValue(await agentA.metrics(), 'nodemesh_hbone_tunnels_opened_total'), 1, 'the tunnel was reused');

  // A pod of node A handed to node B's agent is refused: it is not under B's pod cgroup.
  const wrongNode = await handOverPod(agentRunDir(sb.config.stateDir, nodeB), { uid: client.uid, name: client.name, namespace: client.namespace, serviceAccount: client.serviceAccount, labels: client.labels, ip4: client.ip4, ip6: client.ip6, netnsPath: client.netnsPath, cgroupPath: client.cgroupPath }, 5000).then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.ok(isNodemeshError(wrongNode) && wrongNode.code === 'NM_ERR_ENROLL_FAILED', String(wrongNode));
  assert.match(wrongNode.message, /not under this node's pod cgroups/);
  assert.equal(names(await agentB.pods()), 'server-b', 'B still serves only its pod');

  // The last pod of node B goes: the node's cgroup stays, with the gate on it. And if someone
  // removes that cgroup anyway (rmdir does not care about BPF programs), B's agent attaches its
  // gate to the one made again instead of leaving the node's next pods ungated.
  await sb.runtime.remove(serverB.record, 500);
  assert.ok(await gateOn(agentB, nodeB), "B's gate holds after its last pod went");
  await rmdir(nodeCgroup(mount, sb.config, nodeB));
  await waitFor(() => gateOn(agentB, nodeB), 5000, "B's gate on B's new pod cgroup");
  assert.match(agentB.log(), /pod cgroup was removed and made again/);

  // Node B's agent stops: node A's pods and agent are untouched (nothing of A was B's).
  await agentB.kill('SIGTERM');
  assert.ok(existsSync(join(agentA.pinRoot, 'pods', client.uid)));
  assert.ok((await sb.dialFrom(client, SVC_LOCAL, 80)).intact, 'node A still serves its pods');
});
