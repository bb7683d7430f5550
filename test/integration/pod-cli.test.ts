/** `nodemesh pod run | list | rm` as a user runs them: real processes, namespaces and cgroups. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import { ip } from '../../src/shared/exec.js';
import { isAlive } from '../../src/shared/process.js';
import { findCgroup2Mount } from '../../src/runtime/cgroup.js';
import { nodeCgroup } from '../../src/runtime/config.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import { cli, collect, createSandbox, waitFor, type Sandbox } from '../support/sandbox.js';

async function netnsNames(): Promise<string[]> {
  const { stdout } = await ip('netns', 'list');
  return stdout.split('\n').map((l) => l.split(' ')[0] ?? '').filter(Boolean);
}

async function linkExists(name: string): Promise<boolean> {
  return ip('link', 'show', 'dev', name).then(
    () => true,
    () => false,
  );
}

/**
 * Nothing of the pods is left. The node's pod cgroup stays, empty: it is the node's (an agent's
 * fail-closed gate may sit on it), and `nodemesh cleanup` removes it.
 */
async function assertNothingMade(sb: Sandbox): Promise<void> {
  assert.deepEqual(await sb.runtime.list(), []);
  assert.deepEqual((await netnsNames()).filter((n) => n.startsWith('nmt_')), []);
  assert.equal(await linkExists(sb.config.bridge), false, 'bridge removed');
  const nodeDir = nodeCgroup(await findCgroup2Mount(), sb.config, sb.config.node);
  assert.deepEqual(readdirSync(nodeDir, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name), [], 'no pod cgroup left');
  assert.equal(readFileSync(join(nodeDir, 'cgroup.procs'), 'utf8'), '', 'no process in the node cgroup');
}

test('pod run in the foreground passes the exit code on and removes the pod', async (t) => {
  const sb = await createSandbox(t);
  const r = await cli(['pod', 'run', '--name', 'fg', '--', 'sh', '-c', 'ip -o addr show eth0 | grep -q "inet " && exit 7'], sb.env);
  assert.equal(r.code, 7, r.stderr);
  await assertNothingMade(sb);
  // cleanup takes the node off: its (empty) pod cgroup and the runtime's cgroup folders go.
  const cleaned = await cli(['cleanup', '-o', 'json'], sb.env);
  assert.equal(cleaned.code, 0, cleaned.stderr);
  const nodeDir = nodeCgroup(await findCgroup2Mount(), sb.config, sb.config.node);
  assert.deepEqual((JSON.parse(cleaned.stdout) as { removed: unknown[] }).removed, [{ kind: 'cgroup', what: nodeDir }]);
  assert.equal(existsSync(join(nodeDir, '..', '..')), false, 'cgroup subtree removed');
});

test('pod run --detach, list (table and json), rm', async (t) => {
  const sb = await createSandbox(t);
  const run = await cli(['pod', 'run', '--name', 'web', '-n', 'shop', '--service-account', 'web-sa', '-l', 'app=web', '-l', 'version=v1', '--detach', '--', 'sleep', 'infinity'], sb.env);
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stdout, new RegExp(`^NAMESPACE\\s+NAME\\s+NODE\\s+IP\\s+IPV6\\s+PID\\nshop\\s+web\\s+${sb.config.node}\\s+10\\.201\\.`));

  const table = await cli(['pod', 'list'], sb.env);
  assert.equal(table.code, 0, table.stderr);
  assert.match(table.stdout, /^NAMESPACE\s+NAME\s+NODE\s+STATE\s+IP/);
  assert.match(table.stdout, /shop\s+web\s+test-[0-9a-f]+\s+running\s+10\.201\.\d+\.2\s+fd00:6e74:[0-9a-f]+::2\s+\d+\s+web-sa\s+app=web,version=v1/);

  const json = await cli(['pod', 'list', '-o', 'json'], sb.env);
  const pods = JSON.parse(json.stdout) as Array<{ name: string; namespace: string; state: string; netns: string; cgroupPath: string; hostVeth: string; pid: number; labels: Record<string, string> }>;
  assert.equal(pods.length, 1);
  const pod = pods[0];
  assert.ok(pod);
  assert.deepEqual([pod.namespace, pod.name, pod.state, pod.labels], ['shop', 'web', 'running', { app: 'web', version: 'v1' }]);
  assert.ok((await netnsNames()).includes(pod.netns));
  assert.ok(await linkExists(pod.hostVeth));
  assert.ok(existsSync(pod.cgroupPath));

  const rm = await cli(['pod', 'rm', 'web', '-n', 'shop', '--grace', '500'], sb.env);
  assert.equal(rm.code, 0, rm.stderr);
  assert.equal(isAlive(pod.pid), false, 'the pod process is gone');
  await assertNothingMade(sb);
});

test('bad input: existing name, bad label, unknown command, unknown pod, bad output format', async (t) => {
  const sb = await createSandbox(t);
  assert.equal((await cli(['pod', 'run', '--name', 'dup', '--detach', '--', 'sleep', 'infinity'], sb.env)).code, 0);
  const [before] = await sb.runtime.list();

  const dup = await cli(['pod', 'run', '--name', 'dup', '--detach', '--', 'sleep', 'infinity'], sb.env);
  assert.equal(dup.code, 1);
  assert.match(dup.stderr, /error NM_ERR_POD_EXISTS: pod default\/dup already exists/);
  assert.match(dup.stderr, /fix: remove it first/);
  const after = await sb.runtime.list();
  assert.equal(after.length, 1);
  assert.equal(after[0]?.uid, before?.uid, 'the existing pod is untouched');
  assert.equal((await netnsNames()).filter((n) => n.startsWith('nmt_')).length, 1);
  assert.equal((await cli(['pod', 'rm', 'dup', '--grace', '200'], sb.env)).code, 0);

  const label = await cli(['pod', 'run', '--name', 'x', '-l', 'bad label=1', '--', 'true'], sb.env);
  assert.equal(label.code, 1);
  assert.match(label.stderr, /error NM_ERR_POD_INVALID: label bad label: key name "bad label"/);

  const cmd = await cli(['pod', 'run', '--name', 'x', '--', '/nonexistent/server'], sb.env);
  assert.equal(cmd.code, 1);
  assert.match(cmd.stderr, /error NM_ERR_POD_COMMAND: command "\/nonexistent\/server" not found/);

  const rm = await cli(['pod', 'rm', 'ghost'], sb.env);
  assert.equal(rm.code, 1);
  assert.match(rm.stderr, /error NM_ERR_POD_NOT_FOUND: pod default\/ghost not found/);

  const out = await cli(['pod', 'list', '-o', 'yaml'], sb.env);
  assert.equal(out.code, 2);
  assert.match(out.stderr, /NM_ERR_INVALID_ARGUMENT: -o yaml/);

  await assertNothingMade(sb);
});

test('pod run forwards SIGTERM to the command and cleans up', async (t) => {
  const sb = await createSandbox(t);
  const child = spawn(process.execPath, [CLI_ENTRY, 'pod', 'run', '--name', 'sig', '--', 'sh', '-c', 'trap "exit 3" TERM; while :; do sleep 0.05; done'], { env: sb.env, stdio: ['ignore', 'pipe', 'pipe'] });
  const done = collect(child);
  sb.defer(() => child.exitCode === null && child.kill('SIGKILL'));
  await waitFor(async () => (await sb.runtime.list()).some((p) => p.state === 'running'), 10_000, 'pod sig running');
  await new Promise((r) => setTimeout(r, 200));
  child.kill('SIGTERM');
  const result = await done;
  assert.equal(result.code, 3, `the command's own exit code comes back: ${result.stderr}`);
  await assertNothingMade(sb);
});

test('a failed create removes what it made and nothing else', async (t) => {
  const sb = await createSandbox(t);
  // Someone else's netns already has the name the pod would get.
  const foreign = `${sb.config.namePrefix}_default_clash`;
  await ip('netns', 'add', foreign);
  sb.defer(() => ip('netns', 'del', foreign));

  const r = await cli(['pod', 'run', '--name', 'clash', '--', 'true'], sb.env);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /error NM_ERR_POD_SETUP: creating pod default\/clash failed: `ip netns add nmt_default_clash` failed/);
  assert.ok((await netnsNames()).includes(foreign), 'the netns that was not ours is still there');
  assert.deepEqual(await sb.runtime.list(), []);
  assert.equal(await linkExists(sb.config.bridge), false, 'the bridge this call made is removed');
});
