/**
 * `nodemesh agent --source kubernetes` without a kubelet (none runs here): the Pods are real
 * objects of a real API server (scripts/kube-local.sh), bound to the agent's node and with the
 * status a kubelet would write; the node side is what a kubelet and its runtime would leave: a
 * cgroup tree laid out like kubepods (the systemd driver's slices, or the cgroupfs driver's
 * folders) in a test-owned subtree of cgroup v2, each pod's cgroup named after its Pod's UID,
 * with two container cgroups holding real processes in the pod's network namespace (made by the
 * local runtime: a netns, a veth on a bridge, addresses). The agent runs as the DaemonSet's
 * ServiceAccount with daemonset/'s RBAC, and must find, enroll, verify, capture and unenroll
 * those pods as it would on a node.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';

import { findCgroup2Mount } from '../../src/runtime/cgroup.js';
import type { PodRecord } from '../../src/runtime/store.js';
import { run } from '../../src/shared/exec.js';
import { CLI_ENTRY, PACKAGE_ROOT } from '../../src/shared/paths.js';
import { metricValue, serviceYaml, startAgent } from '../support/agent.js';
import { cluster, kubectl, serviceAccountKubeconfig } from '../support/kube.js';
import { createSandbox, waitFor } from '../support/sandbox.js';

const SVC = '10.96.0.70';

type Driver = 'systemd' | 'cgroupfs';

/** Where the kubelet puts a pod's cgroup and its containers' (containerd's names under systemd, bare ids under cgroupfs). */
function layout(driver: Driver, uid: string, qos: 'burstable' | 'besteffort'): { pod: string; container: (id: string) => string } {
  if (driver === 'cgroupfs') {
    const pod = join('kubepods', qos, `pod${uid}`);
    return { pod, container: (id) => join(pod, id) };
  }
  const escaped = uid.replace(/-/g, '_');
  const pod = join('kubepods.slice', `kubepods-${qos}.slice`, `kubepods-${qos}-pod${escaped}.slice`);
  return { pod, container: (id) => join(pod, `cri-containerd-${id}.scope`) };
}

/** A Pod bound to the node, with the status a kubelet would report once it runs; its UID. */
async function kubePod(name: string, node: string, labels: Record<string, string>, record: PodRecord | undefined, extra: { hostNetwork?: boolean; burstable?: boolean } = {}): Promise<string> {
  const container = (n: string): Record<string, unknown> => ({ name: n, image: 'example.invalid/app:1', ...(extra.burstable ? { resources: { requests: { cpu: '10m' } } } : {}) });
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name, namespace: 'default', labels }, spec: { nodeName: node, automountServiceAccountToken: false, ...(extra.hostNetwork ? { hostNetwork: true } : {}), containers: [container('app'), container('sidecar')] } }));
  const ips = record ? [record.ip4, record.ip6] : ['192.0.2.10'];
  await kubectl(['patch', 'pod', name, '-n', 'default', '--subresource=status', '--type=merge', '-p', JSON.stringify({ status: { phase: 'Running', podIP: ips[0], podIPs: ips.map((ip) => ({ ip })), conditions: [{ type: 'Ready', status: 'True' }] } })]);
  return (await kubectl(['get', 'pod', name, '-n', 'default', '-o', 'jsonpath={.metadata.uid}'])).trim();
}

async function kubeletPods(t: TestContext, driver: Driver): Promise<void> {
  await cluster(t);
  await kubectl(['apply', '-f', join(PACKAGE_ROOT, 'daemonset')]);
  const kubeconfig = await serviceAccountKubeconfig('nodemesh-system', 'nodemesh-agent');
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const node = sb.config.node;
  // The pods' network namespaces (and addresses on the bridge), as a CNI plugin would make them.
  const serverNet = await sb.idlePod('server-net');
  const clientNet = await sb.idlePod('client-net');

  const root = join(await findCgroup2Mount(), sb.config.cgroupSubtree, 'host');
  const made: string[] = [];
  const cgroup = async (rel: string): Promise<string> => {
    const path = join(root, rel);
    const parts = rel.split('/');
    for (let i = 1; i <= parts.length; i++) {
      const p = join(root, ...parts.slice(0, i));
      if (made.includes(p)) continue;
      await mkdir(p, { recursive: true });
      made.push(p);
      sb.defer(() => rmdir(p).catch(() => undefined));
    }
    return path;
  };
  // The kubepods root exists before any pod, as on a node.
  await cgroup(driver === 'systemd' ? 'kubepods.slice' : 'kubepods');

  const serverUid = await kubePod('server', node, { app: 'server' }, serverNet, { burstable: true });
  const clientUid = await kubePod('client', node, { app: 'client' }, clientNet);
  // Not the mesh's: the node's network.
  await kubePod('node-exporter', node, { app: 'node-exporter' }, undefined, { hostNetwork: true });
  const server = layout(driver, serverUid, 'burstable');
  const client = layout(driver, clientUid, 'besteffort');
  sb.startIn({ cgroupPath: await cgroup(server.container('a1')), netns: serverNet.netns }, [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', '8080']);
  sb.startIn({ cgroupPath: await cgroup(server.container('b2')), netns: serverNet.netns }, ['sleep', '600']);
  const clientApp = await cgroup(client.container('c3'));
  const clientSidecar = await cgroup(client.container('d4'));
  sb.startIn({ cgroupPath: clientApp, netns: clientNet.netns }, ['sleep', '600']);
  sb.startIn({ cgroupPath: clientSidecar, netns: clientNet.netns }, ['sleep', '600']);

  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('backend', [SVC], { app: 'server' }) }, { args: ['--source', 'kubernetes', '--kubeconfig', kubeconfig, '--cgroup-root', root, '--daemonset', 'nodemesh-system/nodemesh-agent'] });
  const pods = await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'the two Pods enrolled and verified');
  assert.deepEqual(pods.map((p) => [p.name, p.uid, p.ip4]), [['client', clientUid, clientNet.ip4], ['server', serverUid, serverNet.ip4]]);
  assert.ok(metricValue(await agent.metrics(), 'nodemesh_agent_kube_pods_skipped_total', { reason: 'host_network' }) >= 1, 'the hostNetwork Pod is skipped');

  // Both containers of the client are captured: the Service address is served by the proxy.
  for (const c of [clientApp, clientSidecar]) {
    const r = await sb.dialFrom({ ...clientNet, cgroupPath: c }, SVC, 80);
    assert.ok(r.intact, `from ${c}: ${JSON.stringify(r)}`);
  }
  assert.equal(metricValue(await agent.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', source_workload: 'client', destination_service_name: 'backend' }), 2);

  // A Pod that reports Running but has no cgroup on the node: named, counted, the rest served.
  await kubePod('lost', node, { app: 'lost' }, undefined);
  await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_enroll_errors_total', { reason: 'cgroup_missing' }) >= 1, 15_000, 'the Pod without a cgroup counted');
  assert.match(agent.log(), /no cgroup for pod default\/lost/);
  assert.equal(await agent.ready(), 200, 'the other pods are served');

  // The Pod goes (a kubelet's last word on a Pod is its deletion with no grace period; a
  // terminating Pod still runs, and stays captured until then): unenrolled, its processes no
  // longer the mesh's.
  await kubectl(['delete', 'pod', 'client', '-n', 'default', '--grace-period=0', '--force']);
  await agent.waitForPods((p) => p.length === 1 && p[0]?.name === 'server', 'the deleted Pod unenrolled');
  const after = await sb.dialFrom({ ...clientNet, cgroupPath: clientApp }, SVC, 80);
  assert.ok(!after.intact, `no capture after the Pod is deleted: ${JSON.stringify(after)}`);

  if (driver === 'cgroupfs') {
    // The API server goes away, and comes back refusing the agent (its RBAC binding deleted
    // meanwhile): degraded, named and counted, not dead; the node's pods are served on. The
    // binding restored, the agent is whole again.
    await kubectl(['delete', 'clusterrolebinding', 'nodemesh-agent']);
    await run('bash', [join(PACKAGE_ROOT, 'scripts', 'kube-local.sh'), 'restart-apiserver']);
    await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_agent_degraded') === 1, 30_000, 'degraded');
    assert.ok(metricValue(await agent.metrics(), 'nodemesh_agent_kube_errors_total', { reason: 'unauthorized' }) >= 1);
    assert.match(agent.log(), /the last objects keep serving/);
    const served = await sb.dialFrom({ ...serverNet, cgroupPath: await cgroup(server.container('b2')) }, SVC, 80);
    assert.ok(served.intact, `the pods are served on: ${JSON.stringify(served)}`);
    await kubectl(['apply', '-f', join(PACKAGE_ROOT, 'daemonset', '03-rbac.yaml')]);
    await waitFor(async () => metricValue(await agent.metrics(), 'nodemesh_agent_degraded') === 0, 45_000, 'whole again once the binding is back');
  }

  // The agent stops. While its DaemonSet is there (a restart, an upgrade) the node stays
  // captured for the next agent; once the DaemonSet is deleted (uninstall), its stop takes
  // nodemesh off the node: pins, links and the in-pod delivery routing of the pods still running.
  const rules = async (): Promise<string> => (await run('ip', ['netns', 'exec', serverNet.netns, 'ip', 'rule'])).stdout;
  assert.match(await rules(), /fwmark 0x53a/);
  if (driver === 'cgroupfs') {
    await agent.kill('SIGTERM');
    assert.ok(existsSync(join(agent.pinRoot, 'pods', serverUid)), 'a restart keeps the pod pinned');
    assert.match(await rules(), /fwmark 0x53a/);
    return;
  }
  await kubectl(['delete', 'daemonset', 'nodemesh-agent', '-n', 'nodemesh-system', '--wait=true']);
  await agent.kill('SIGTERM');
  assert.ok(!existsSync(agent.pinRoot), `uninstall removes the pins: ${agent.log().split('\n').filter((l) => l.includes('taking nodemesh off')).join(' ')}`);
  assert.doesNotMatch(await rules(), /fwmark 0x53a/, 'and the in-pod routing of the pods still running');
}

test('agent --source kubernetes, systemd cgroup driver: Pods bound to the node (made before the agent started) are found by UID under kubepods.slice, enrolled, verified and captured from every container; hostNetwork skipped; a Pod without a cgroup named; a deleted Pod unenrolled; with its DaemonSet deleted, its stop takes nodemesh off the node', async (t) => {
  await kubeletPods(t, 'systemd');
});

test('agent --source kubernetes, cgroupfs cgroup driver: the same under kubepods/; a stop while its DaemonSet is there keeps the node captured', async (t) => {
  await kubeletPods(t, 'cgroupfs');
});
