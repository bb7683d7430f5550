/**
 * `nodemesh cleanup` on the real kernel: an agent enrolls pods (with the fail-closed gate), stops,
 * and cleanup takes every link, pin, in-pod rule, route and sysctl and the run folder away, so the
 * pods reach each other directly again; a second run removes nothing. While an agent runs it
 * refuses, unless --force; and without the runtime's records (a Kubernetes node has none) it
 * finds the pods' netns from their links.
 */
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { agentRunDir } from '../../src/runtime/enrollment.js';
import { run } from '../../src/shared/exec.js';
import type { PodRecord } from '../../src/runtime/store.js';
import { serviceYaml, startAgent } from '../support/agent.js';
import { cli, createSandbox, waitFor } from '../support/sandbox.js';

const SVC_V4 = '10.96.3.70';
const SVC_V4_FORCE = '10.96.3.71';
const SYSCTLS = ['net/ipv4/tcp_fwmark_accept', 'net/ipv4/fwmark_reflect', 'net/ipv6/fwmark_reflect'];
const FAIL_CLOSED = 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {failClosedEnrollment: "true"}\n';

interface LinkInfo {
  id: number;
  prog_id: number;
  type: string;
  cgroup_id?: number;
  netns_ino?: number;
}

async function sysctls(pod: PodRecord): Promise<string[]> {
  const r = await run('nsenter', [`--net=${pod.netnsPath}`, 'cat', ...SYSCTLS.map((s) => `/proc/sys/${s}`)]);
  return r.stdout.trim().split('\n');
}

/** The pod's policy rules and what its table 15006 holds, v4 and v6. */
async function delivery(pod: PodRecord): Promise<{ rules: string; table: string }> {
  const sh = async (script: string): Promise<string> => (await run('nsenter', [`--net=${pod.netnsPath}`, 'sh', '-c', script])).stdout;
  return { rules: await sh('ip -4 rule show; ip -6 rule show'), table: await sh('ip -4 route show table 15006; ip -6 route show table 15006') };
}

/** Every pin under the root, relative to it (links under gate/ and pods/, maps under maps/). */
function pins(root: string, rel = ''): string[] {
  const dir = join(root, rel);
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? pins(root, join(rel, e.name)) : [join(rel, e.name)]));
}

async function pinnedLink(path: string): Promise<LinkInfo> {
  return JSON.parse((await run('bpftool', ['link', 'show', 'pinned', path, '-j'])).stdout) as LinkInfo;
}

/**
 * Links of `ids` (or running `progIds`) that still hold a program on a hook. A link an agent
 * still holds after a forced cleanup is listed but detached (its cgroup_id / netns_ino is 0).
 */
async function stillAttached(ids: Set<number>, progIds: Set<number>): Promise<LinkInfo[]> {
  const all = JSON.parse((await run('bpftool', ['link', 'list', '-j'])).stdout) as LinkInfo[];
  return all.filter((l) => (ids.has(l.id) || progIds.has(l.prog_id)) && (l.cgroup_id ?? l.netns_ino ?? 1) !== 0);
}

function tableRows(stdout: string): string[][] {
  const [header, ...rows] = stdout.trim().split('\n');
  assert.match(header ?? '', /^KIND\s+WHAT$/);
  return rows.map((r) => r.split(/ {2,}/));
}

async function assertDeliveryGone(pod: PodRecord, defaults: string[]): Promise<void> {
  const d = await delivery(pod);
  assert.doesNotMatch(d.rules, /0x53a|lookup 15006/, `${pod.name}: no delivery rule`);
  assert.equal(d.table.trim(), '', `${pod.name}: table 15006 is empty`);
  assert.deepEqual(await sysctls(pod), defaults, `${pod.name}: sysctls back to their defaults`);
}

test('cleanup: after the agent stopped, nothing of nodemesh is left and pods reach each other directly', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4);
  const server = await sb.echoPod('server-b', 8080, ['tier=backend']);
  const client = await sb.idlePod('client-a');
  const gone = await sb.idlePod('gone-c');
  const pods = [client, server.record];
  const defaults = await Promise.all(pods.map(sysctls));
  const agent = await startAgent(sb, { 'service.yaml': serviceYaml('backend', [SVC_V4], { tier: 'backend' }), 'mesh.yaml': FAIL_CLOSED });
  await agent.waitForPods((p) => p.length === 3 && p.every((x) => x.verified), 'pods verified');
  assert.ok((await sb.dialFrom(client, SVC_V4, 80)).intact, 'captured and served');

  const pinned = pins(agent.pinRoot);
  const linkPins = pinned.filter((p) => p.startsWith('pods/') || p.startsWith('gate/'));
  assert.ok(linkPins.includes('gate/nm_gate4') && linkPins.includes(`pods/${client.uid}/nm_sk_lookup`), `links pinned: ${linkPins.join(' ')}`);
  const links = await Promise.all(linkPins.map((p) => pinnedLink(join(agent.pinRoot, p))));
  const linkIds = new Set(links.map((l) => l.id));
  const progIds = new Set(links.map((l) => l.prog_id));
  for (const pod of pods) {
    assert.match((await delivery(pod)).rules, /fwmark 0x53a lookup 15006/, `${pod.name} has the delivery rule`);
    assert.deepEqual(await sysctls(pod), ['1', '1', '1']);
  }

  // The pins outlive the agent: capture holds (nothing listens on 15001 now). SIGKILL leaves its
  // enrollment socket behind: a socket nobody answers on is no running agent.
  await agent.kill('SIGKILL');
  assert.ok(existsSync(join(agentRunDir(sb.config.stateDir, sb.config.node), 'enroll.sock')));
  assert.deepEqual(pins(agent.pinRoot), pinned);
  assert.equal((await sb.dialFrom(client, server.record.ip4, 8080)).error, 'ECONNREFUSED', 'still captured after the agent stopped');
  // A pod that goes while no agent runs: its pins stay, its links hold nothing any more, its
  // routing went with its netns.
  await sb.runtime.remove(gone, 500);
  assert.ok(pinned.includes(`pods/${gone.uid}/nm_sk_lookup`));

  const r = await cli(['cleanup', '--bpf-root', agent.pinRoot], sb.env);
  assert.equal(r.code, 0, r.stderr);
  const rows = tableRows(r.stdout);
  const runDir = agentRunDir(sb.config.stateDir, sb.config.node);
  const expected = [
    ...linkPins.map((p) => ['link', p]),
    ...pinned.filter((p) => p.startsWith('maps/')).map((p) => ['pin', p]),
    ['routing', 'default/client-a'],
    ['routing', 'default/server-b'],
    ['pin dir', agent.pinRoot],
    ['run dir', runDir],
  ];
  const key = (row: string[]): string => row.join(' | ');
  assert.deepEqual(rows.map(key).sort(), expected.map(key).sort(), r.stdout);

  // Nothing of nodemesh in bpffs, on any hook, in the pods' netns, in the state folder.
  assert.equal(existsSync(agent.pinRoot), false, 'the pin root is gone');
  assert.deepEqual(await stillAttached(linkIds, progIds), [], 'no link of the agent is left');
  const listed = JSON.parse((await run('bpftool', ['link', 'list', '-j'])).stdout) as LinkInfo[];
  assert.deepEqual(listed.filter((l) => linkIds.has(l.id)), [], 'the links are freed, not only detached');
  for (const [i, pod] of pods.entries()) await assertDeliveryGone(pod, defaults[i] ?? []);
  assert.equal(existsSync(runDir), false, 'the run folder is gone');
  assert.deepEqual((await sb.runtime.list()).map((p) => p.name), ['client-a', 'server-b'], 'the pods and their records stay');

  // Pod to pod, directly: the application sees the client's own socket.
  const before = (await server.connections()).length;
  const direct = await sb.dialFrom(client, server.record.ip4, 8080);
  assert.ok(direct.intact, JSON.stringify(direct));
  await waitFor(async () => (await server.connections()).length === before + 1, 5000, 'the direct connection logged');
  const seen = (await server.connections()).at(-1);
  assert.equal(seen?.address.replace(/^::ffff:/, ''), client.ip4);
  assert.equal(seen?.port, direct.localPort, "the client's own port: no proxy in between");
  // A Service address is no longer captured: local pods have no route to it.
  assert.equal((await sb.dialFrom(client, SVC_V4, 80)).error, 'ENETUNREACH');

  // Idempotent.
  const again = await cli(['cleanup', '--bpf-root', agent.pinRoot], sb.env);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(again.stdout, 'nothing to remove\n');
  const json = await cli(['cleanup', '--bpf-root', agent.pinRoot, '-o', 'json'], sb.env);
  assert.equal(json.code, 0, json.stderr);
  assert.deepEqual(JSON.parse(json.stdout), { removed: [], left: [], failed: [] });
});

test('cleanup: refuses while an agent runs; --force takes its capture, finding pods from their links without records', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC_V4_FORCE);
  const server = await sb.echoPod('server-b', 8080, ['tier=backend']);
  const client = await sb.idlePod('client-a');
  const pods = [client, server.record];
  const defaults = await Promise.all(pods.map(sysctls));
  const agent = await startAgent(sb, { 'service.yaml': serviceYaml('backend', [SVC_V4_FORCE], { tier: 'backend' }) });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'pods verified');
  const linkPins = pins(agent.pinRoot).filter((p) => p.startsWith('pods/'));
  const links = await Promise.all(linkPins.map((p) => pinnedLink(join(agent.pinRoot, p))));

  const refused = await cli(['cleanup', '--bpf-root', agent.pinRoot], sb.env);
  assert.equal(refused.code, 1, refused.stdout + refused.stderr);
  assert.match(refused.stderr, /error NM_ERR_AGENT_RUNNING: an agent serves this node/);
  assert.match(refused.stderr, /fix: .*--force/);
  assert.deepEqual(pins(agent.pinRoot).filter((p) => p.startsWith('pods/')), linkPins, 'nothing removed');
  assert.ok((await sb.dialFrom(client, SVC_V4_FORCE, 80)).intact, 'still served');

  // No records, as on a Kubernetes node: the pods' netns come from their sk_lookup links.
  const noRecords = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-norecords-`));
  sb.defer(() => rm(noRecords, { recursive: true, force: true }));
  const runDir = agentRunDir(sb.config.stateDir, sb.config.node);
  const forced = await cli(['cleanup', '--force', '--bpf-root', agent.pinRoot, '--run-dir', runDir, '-o', 'json'], { ...sb.env, NODEMESH_STATE_DIR: noRecords });
  assert.equal(forced.code, 0, forced.stderr);
  const report = JSON.parse(forced.stdout) as { removed: Array<{ kind: string; what: string }>; left: unknown[]; failed: unknown[] };
  assert.deepEqual(report.failed, []);
  assert.deepEqual(report.left, []);
  const routing = report.removed.filter((r) => r.kind === 'routing').map((r) => r.what).sort();
  assert.deepEqual(routing, pods.map((p) => `${p.uid} (/run/netns/${p.netns})`).sort(), 'both pods found from their links');
  assert.ok(report.removed.some((r) => r.kind === 'run dir' && r.what === runDir));
  assert.equal(existsSync(agent.pinRoot), false);

  // The agent keeps running, without capture.
  assert.equal(agent.child.exitCode, null, 'the agent still runs');
  assert.deepEqual(await stillAttached(new Set(links.map((l) => l.id)), new Set(links.map((l) => l.prog_id))), [], 'its links are detached');
  for (const [i, pod] of pods.entries()) await assertDeliveryGone(pod, defaults[i] ?? []);
  const direct = await sb.dialFrom(client, server.record.ip4, 8080);
  assert.ok(direct.intact, JSON.stringify(direct));
  await waitFor(async () => (await server.connections()).some((c) => c.port === direct.localPort && c.address.replace(/^::ffff:/, '') === client.ip4), 5000, 'the direct connection logged');
  assert.equal((await sb.dialFrom(client, SVC_V4_FORCE, 80)).error, 'ENETUNREACH');
});
