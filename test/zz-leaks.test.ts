/**
 * Runs last (node's runner takes files in the order given, one at a time): fails the suite if any
 * test left behind something it made. Looks for the sandbox names of test/support/sandbox.ts and
 * for any nodemesh BPF program still loaded.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { findCgroup2Mount } from '../src/runtime/cgroup.js';
import { TEST_BPFFS_PREFIX, TEST_CGROUP_PREFIX, TEST_PREFIX, TEST_STATE_PREFIX } from './support/sandbox.js';

const run = promisify(execFile);

async function names(dir: string, prefix: string): Promise<string[]> {
  return (await readdir(dir).catch(() => [])).filter((n) => n.startsWith(prefix));
}

test('no test left anything behind', async () => {
  const netns = (await run('ip', ['netns', 'list'])).stdout.split('\n').map((l) => l.split(' ')[0] ?? '');
  assert.deepEqual(netns.filter((n) => n.startsWith(`${TEST_PREFIX}_`)), [], 'network namespaces');

  const links = (await run('ip', ['-o', 'link', 'show'])).stdout.split('\n').map((l) => (l.split(': ')[1] ?? '').split('@')[0] ?? '');
  assert.deepEqual(links.filter((n) => n.startsWith(TEST_PREFIX)), [], 'veth and bridge links');

  assert.deepEqual(await names(await findCgroup2Mount(), TEST_CGROUP_PREFIX), [], 'cgroups');
  assert.deepEqual(await names('/sys/fs/bpf', TEST_BPFFS_PREFIX.split('/').pop() ?? ''), [], 'bpffs folders');
  assert.deepEqual(await names('/tmp', TEST_STATE_PREFIX.split('/').pop() ?? ''), [], 'state folders');

  const progs = JSON.parse((await run('bpftool', ['-j', 'prog', 'show'])).stdout) as Array<{ name?: string }>;
  assert.deepEqual(progs.map((p) => p.name ?? '').filter((n) => n.startsWith('nm_')), [], 'nodemesh BPF programs still loaded (attached links or open objects)');

  const holes = (await run('ip', ['route', 'show', 'type', 'blackhole'])).stdout + (await run('ip', ['-6', 'route', 'show', 'type', 'blackhole'])).stdout;
  assert.doesNotMatch(holes, /10\.96\.0\.1[01]|fd00:96::a/, 'blackhole routes of the tests');
});
