/**
 * Coexistence with a CNI that load-balances Services at the socket level (Cilium's socket LB
 * attaches cgroup/connect4 to the root cgroup and rewrites a ClusterIP to a backend before the
 * connection is made). A program that does the same (test/fixtures/sock-lb.bpf.c) is attached to
 * the parent of the node's pod cgroups, which the test made, with BPF_F_ALLOW_MULTI as Cilium
 * does. A pod's own programs run before its ancestors': nodemesh must still see the ClusterIP (the
 * connection is the proxy's, counted against the Service), while a pod that is not in the mesh is
 * balanced by the socket LB alone.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';

import { findCgroup2Mount } from '../../src/runtime/cgroup.js';
import { nodeCgroup } from '../../src/runtime/config.js';
import { run } from '../../src/shared/exec.js';
import { PACKAGE_ROOT } from '../../src/shared/paths.js';
import { metricValue, serviceYaml, startAgent } from '../support/agent.js';
import { createSandbox, waitFor } from '../support/sandbox.js';

const SVC = '10.96.0.90';

/** A u32 as the kernel stores an IPv4 address (network order), read as this machine's integer. */
const be32 = (ip: string): number => Buffer.from(ip.split('.').map(Number)).readUInt32LE(0);
const be16 = (port: number): number => Buffer.from([port >> 8, port & 0xff]).readUInt16LE(0);

test('socket-level load balancing in a parent cgroup (Cilium-style): an enrolled pod\'s connection to a ClusterIP is still nodemesh\'s; a pod outside the mesh is balanced by the socket LB', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const server = await sb.echoPod('server', 8080, ['app=backend']);
  const client = await sb.idlePod('client', ['app=client']);
  const outsider = await sb.idlePod('outsider', ['app=outsider', 'nodemesh.io/capture=disabled']);
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('backend', [SVC], { app: 'backend' }) });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'client and server enrolled');

  // The socket LB: SVC:80 -> the server pod's 8080, attached to the node's pod cgroup (the
  // parent of every pod's), which this test's sandbox made.
  const multiarch = (await run('gcc', ['-print-multiarch'])).stdout.trim();
  const obj = join(sb.config.stateDir, 'sock-lb.bpf.o');
  await run('clang', ['-O2', '-g', '-target', 'bpf', '-I', `/usr/include/${multiarch}`, `-DVIP=${be32(SVC)}U`, `-DVPORT=${be16(80)}U`, `-DBACKEND=${be32(server.record.ip4)}U`, `-DBPORT=${be16(8080)}U`, '-c', join(PACKAGE_ROOT, 'test', 'fixtures', 'sock-lb.bpf.c'), '-o', obj]);
  const pin = join(sb.bpffsDir, 'sock-lb');
  await run('bpftool', ['prog', 'load', obj, pin, 'type', 'cgroup/connect4']);
  sb.defer(() => run('rm', ['-f', pin]));
  const parent = nodeCgroup(await findCgroup2Mount(), sb.config, sb.config.node);
  await run('bpftool', ['cgroup', 'attach', parent, 'connect4', 'pinned', pin, 'multi']);
  sb.defer(() => run('bpftool', ['cgroup', 'detach', parent, 'connect4', 'pinned', pin]).catch(() => undefined));

  // Outside the mesh: the socket LB alone takes SVC:80 to the server (there is no route to SVC).
  const before = (await server.connections()).length;
  const direct = await sb.dialFrom(outsider, SVC, 80, { bytes: 4096 });
  assert.ok(direct.intact, `the socket LB balances a pod outside the mesh: ${JSON.stringify(direct)}`);
  await waitFor(async () => (await server.connections()).length === before + 1, 5000, 'the server saw the outsider');
  const opened = async (): Promise<number> => metricValue(await agent.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', destination_service_name: 'backend' });
  assert.equal(await opened(), 0, 'the proxy saw nothing of it');

  // In the mesh: nodemesh's program on the pod's own cgroup ran first and saw the ClusterIP; the
  // proxy served it as the Service's.
  const meshed = await sb.dialFrom(client, SVC, 80, { bytes: 4096 });
  assert.ok(meshed.intact, JSON.stringify(meshed));
  await waitFor(async () => (await opened()) === 1, 5000, 'the connection counted against the Service by the proxy');
  const last = (await server.connections()).pop();
  assert.equal(last?.address.replace(/^::ffff:/, ''), client.ip4, "delivered by the proxy with the client's address");
});
