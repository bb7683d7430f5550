/**
 * Two agents of one node: the new one (`--take-over`) takes the node from the running one with no
 * gap, as a DaemonSet rolling with maxSurge: 1 does (src/agent/handover.ts). Traffic runs in both
 * directions the whole time: no connection may be refused or lose a byte. And a new agent that
 * dies before it commits leaves the old one serving.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import type { LoadResult } from '../../src/cli/debug-tools.js';
import { agentRunDir } from '../../src/runtime/enrollment.js';
import { CLI_ENTRY, PACKAGE_ROOT } from '../../src/shared/paths.js';
import { metricValue, serviceYaml, startAgent, startControlPlane, type AgentProcess } from '../support/agent.js';
import { collect, createSandbox, waitFor, type Sandbox } from '../support/sandbox.js';

const SVC_V4 = '10.96.0.40';

/** Connections at `rate` a second from a pod to each target for `ms`; the summary when done. */
function loadFrom(sb: Sandbox, pod: Parameters<Sandbox['dialFrom']>[0], targets: ReadonlyArray<string>, ms: number): Promise<LoadResult> {
  const child = sb.runtime.exec(pod, [process.execPath, CLI_ENTRY, 'debug', 'load', ...targets, '--rate', '100', '--duration', String(ms)], { stdio: ['ignore', 'pipe', 'pipe'] });
  return collect(child).then((r) => {
    assert.equal(r.code, 0, `load: ${r.stdout}${r.stderr}`);
    return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as LoadResult;
  });
}

/** Every connection of the load intact; else the failure says what each agent logged above info. */
function assertNoFailure(result: LoadResult, what: string, agents: ReadonlyArray<AgentProcess>): void {
  const warnings = (): string => agents.map((a) => a.log().split('\n').filter((l) => /"level":[4-6]0/.test(l)).join('\n')).join('\n---\n');
  for (const [target, counts] of Object.entries(result.targets)) {
    assert.ok(counts.ok > 50, `${what}: ${target} got ${counts.ok} connections: ${JSON.stringify(result)}`);
    assert.equal(counts.failed, 0, `${what}: ${target}: ${JSON.stringify(counts.errors)}; agents' warnings:\n${warnings()}`);
  }
}

/**
 * The DaemonSet's readiness probe, as the kubelet execs it in an agent's container: its exit
 * code and what it printed.
 */
async function probeReady(sb: Sandbox, podUid: string): Promise<{ code: number; out: string }> {
  const child = spawn(join(PACKAGE_ROOT, 'build', 'cni', 'nodemesh-cni'), ['agent-ready', '--run-dir', agentRunDir(sb.config.stateDir, sb.config.node)], { env: { ...sb.env, NODEMESH_POD_UID: podUid }, stdio: ['ignore', 'pipe', 'pipe'] });
  const r = await collect(child);
  return { code: r.code ?? -1, out: r.stdout + r.stderr };
}

/** Waits for a line of the agent's log. */
async function logged(agent: AgentProcess, pattern: RegExp, what: string, timeoutMs = 20_000): Promise<void> {
  await waitFor(() => pattern.test(agent.log()), timeoutMs, what).catch((e: Error) => {
    throw new Error(`${e.message}; log: ${agent.log()}`);
  });
}

test('handover: a new agent takes the node over while traffic runs both ways; the old one drains and exits', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4);
  const b = await sb.echoPod('echo-b', 8080, ['tier=backend']);
  const client = await sb.idlePod('client-a', ['app=client']);
  const outsider = await sb.idlePod('outsider-d', ['app=outsider', 'nodemesh.io/capture=disabled']);
  const config = { 'services.yaml': serviceYaml('backend', [SVC_V4], { tier: 'backend' }) };
  const [oldUid, nextUid] = [randomUUID(), randomUUID()];
  const old = await startAgent(sb, config, { env: { NODEMESH_POD_UID: oldUid } });
  await old.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'two pods enrolled and verified');
  assert.equal((await probeReady(sb, oldUid)).code, 0, 'the old agent is ready (exec probe)');

  // Outbound through the Service and inbound to the backend pod from a pod outside the mesh,
  // a new connection every 10 ms each, from before the new agent starts until after the old exits.
  const outbound = loadFrom(sb, client, [`${SVC_V4}:80`], 9000);
  const inbound = loadFrom(sb, outsider, [`${b.record.ip4}:8080`], 9000);
  // A connection the old agent accepted, still sending after the handover (4 s held open).
  const held = sb.dialFrom(client, SVC_V4, 80, { bytes: 256 * 1024, holdMs: 4000 });
  await new Promise((resolve) => setTimeout(resolve, 1000));

  const next = await startAgent(sb, config, { args: ['--take-over'], ports: old.ports, waitReady: false, env: { NODEMESH_POD_UID: nextUid } });
  await logged(next, /"msg":"node taken over"/, 'the new agent commits');
  await logged(old, /"msg":"node handed over/, 'the old agent hands over');
  assert.match(next.log(), /"sockets":8,.*"msg":"handover begun: listening sockets received"/, 'four listeners of each of the two pods');
  // The host ports are the new agent's now: its pods, its readiness.
  await waitFor(async () => (await next.ready().catch(() => 0)) === 200, 10_000, 'new agent ready');
  // Each pod's exec probe asks its own agent: the new one is ready, the old one is not any more.
  assert.deepEqual(await probeReady(sb, nextUid).then((r) => r.code), 0);
  const oldProbe = await probeReady(sb, oldUid);
  assert.equal(oldProbe.code, 1);
  assert.match(oldProbe.out, /"handedOver": true/);
  const pods = await next.pods();
  assert.deepEqual(pods.map((p) => [p.name, p.verified]), [['client-a', true], ['echo-b', true]]);
  assert.match(next.log(), /"readopted":true/);

  // SIGTERM to the old agent (the DaemonSet deleting the old pod): it drains the held connection
  // and exits, leaving the node to the new agent (no uninstall: pins stay).
  const exited = new Promise<number | null>((resolve) => old.child.once('exit', (code) => resolve(code)));
  old.child.kill('SIGTERM');
  assert.equal(await exited, 0, `the old agent exits cleanly: ${old.log()}`);
  assert.match(old.log(), /"msg":"drained"/);
  const heldResult = await held;
  assert.ok(heldResult.intact, `the connection held across the handover keeps every byte: ${JSON.stringify(heldResult)}`);

  assertNoFailure(await outbound, 'outbound through the handover', [old, next]);
  assertNoFailure(await inbound, 'inbound through the handover', [old, next]);
  for (const p of pods) assert.ok(existsSync(join(next.pinRoot, 'pods', p.uid)), `${p.name}'s pins stay`);
  assert.ok(existsSync(join(agentRunDir(sb.config.stateDir, sb.config.node), 'enroll.sock')), 'enroll.sock is the new agent\'s');
  assert.ok(!existsSync(join(agentRunDir(sb.config.stateDir, sb.config.node), 'enroll.sock.new')));

  // The new agent serves alone: new connections, a new pod (handed over by the runtime on
  // enroll.sock), and its metrics count what it proxied.
  assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact);
  const late = await sb.idlePod('late-e', ['app=late']);
  await next.waitForPods((p) => p.some((x) => x.name === late.name && x.verified), 'a pod created after the handover');
  assert.ok((await sb.dialFrom(late, SVC_V4, 80)).intact);
  assert.ok(metricValue(await next.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', source_workload: 'client' }) > 0);
});

test('handover: a new agent killed before it commits leaves the old one serving; a pod created meanwhile waits and is enrolled', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4);
  await sb.echoPod('echo-b', 8080, ['tier=backend']);
  const client = await sb.idlePod('client-a', ['app=client']);
  const [oldUid, nextUid] = [randomUUID(), randomUUID()];
  const old = await startAgent(sb, { 'services.yaml': serviceYaml('backend', [SVC_V4], { tier: 'backend' }) }, { env: { NODEMESH_POD_UID: oldUid } });
  await old.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'two pods enrolled and verified');
  const outbound = loadFrom(sb, client, [`${SVC_V4}:80`], 5000);

  // A new agent whose control plane does not answer never has its config, so it cannot commit.
  const next = await startAgent(sb, { controlPlane: '127.0.0.1:9' }, { args: ['--take-over'], ports: old.ports, waitReady: false, env: { NODEMESH_POD_UID: nextUid } });
  await logged(next, /"msg":"handover begun/, 'the new agent begins');
  await logged(old, /"msg":"handing the node over: frozen/, 'the old agent freezes');
  // Not ready while it has not taken the node (the host's 15021 still answers for the old agent).
  // (its socket appears once it has started its servers)
  let nextProbe = { code: -1, out: '' };
  await waitFor(async () => /"takingOver": true/.test((nextProbe = await probeReady(sb, nextUid)).out), 5000, 'the new agent answers its probe').catch((e: Error) => {
    throw new Error(`${e.message}: ${nextProbe.out}`);
  });
  assert.equal(nextProbe.code, 1, nextProbe.out);
  assert.equal(await next.ready(), 200, "the host's port is the old agent's");
  // A pod the runtime hands over now waits for the handover's outcome.
  const late = sb.idlePod('late-e', ['app=late']);
  await new Promise((resolve) => setTimeout(resolve, 500));
  await next.kill('SIGKILL');
  await logged(old, /"reason":"the new agent \(process \d+\) exited","msg":"handover off: serving the node again"/, 'the old agent thaws', 5000);
  const latePod = await late;
  await old.waitForPods((p) => p.some((x) => x.name === latePod.name && x.verified), 'the pod created during the handover');
  assertNoFailure(await outbound, 'outbound while the new agent came and died', [old, next]);
  assert.ok((await sb.dialFrom(latePod, SVC_V4, 80)).intact);
  assert.equal(await old.ready(), 200);
  assert.equal((await probeReady(sb, oldUid)).code, 0);
  const gone = await probeReady(sb, nextUid);
  assert.equal(gone.code, 1);
  assert.match(gone.out, /does not answer/);
  // A second take-over is possible again once the first is off.
  assert.match(old.log(), /"msg":"pod enrolled".*late-e|late-e.*"msg":"pod enrolled"/);
});

// Both HBONE engines: each sends GOAWAY from the agent that stops accepting, and each client
// sends a CONNECT cut before its answer once more on a new tunnel.
for (const hbone of ['native', 'node'] as const) test(`handover with a control plane (${hbone} HBONE engine): each node of two is taken over in turn while pods talk across them through HBONE`, async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4);
  const nodeB = `${sb.config.node}-b`;
  const cp = await startControlPlane(sb, { 'svc.yaml': serviceYaml('server', [SVC_V4], { app: 'server' }) });
  const source = { controlPlane: cp.tlsAddress, caRoot: cp.caRoot };
  const engine = ['--hbone', hbone];
  const agents = { a: await startAgent(sb, source, { args: engine }), b: await startAgent(sb, source, { node: nodeB, args: engine }) };
  await sb.echoPod('server-b', 8080, ['app=server'], { node: nodeB, serviceAccount: 'server' });
  const client = await sb.idlePod('client-a', [], { serviceAccount: 'client' });
  await waitFor(async () => ((await agents.a.config()).services.find((s) => s.service === 'default/server:80')?.endpoints.length ?? 0) === 1, 10_000, "B's server as an endpoint on A");
  assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact);

  // The server's node first (its HBONE listener on 15008 is handed over), then the client's
  // (its tunnels are the old agent's until they end).
  const load = loadFrom(sb, client, [`${SVC_V4}:80`], 14_000);
  const taken: AgentProcess[] = [];
  for (const [key, node] of [['b', nodeB], ['a', sb.config.node]] as const) {
    const old = agents[key];
    const next = await startAgent(sb, source, { node, args: ['--take-over', ...engine], ports: old.ports, waitReady: false });
    taken.push(old, next);
    await logged(next, /"msg":"node taken over"/, `node ${node} taken over`);
    await waitFor(async () => (await next.ready().catch(() => 0)) === 200, 10_000, `node ${node}'s new agent ready`);
    const exited = new Promise<number | null>((resolve) => old.child.once('exit', (code) => resolve(code)));
    old.child.kill('SIGTERM');
    assert.equal(await exited, 0, old.log());
    agents[key] = next;
  }
  assertNoFailure(await load, 'across two nodes through HBONE while both were taken over', taken);
  // The control plane sees each node's new agent, in sync, and the mesh carries on.
  await waitFor(async () => (await cp.nodes()).nodes.filter((n) => n.connected && n.inSync).length === 2, 10_000, 'both new agents connected and in sync');
  const after = await sb.dialFrom(client, SVC_V4, 80, { bytes: 128 * 1024 });
  assert.ok(after.intact, JSON.stringify(after));
  assert.ok(metricValue(await agents.b.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'destination', destination_workload: 'server', connection_security_policy: 'mutual_tls', source_principal: 'spiffe://cluster.local/ns/default/sa/client' }) > 0, 'the new server-side agent took tunnels');
});
