/**
 * Bad environments, made for real: a non-root user, a mount namespace without cgroup v2, root
 * without the capabilities to mount bpffs or to load BPF, and build tools that are missing.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';

import { CLI_ENTRY, PACKAGE_ROOT } from '../../src/shared/paths.js';
import { ensureBpffs, isBpffsMounted, releaseBpffs } from '../../src/cli/preflight.js';
import { cli, collect, createSandbox } from '../support/sandbox.js';

async function sh(script: string, env: NodeJS.ProcessEnv = process.env): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return collect(spawn('/bin/sh', ['-c', script], { env, cwd: PACKAGE_ROOT, stdio: ['ignore', 'pipe', 'pipe'] }));
}

test('not root: one clear error and a non-zero exit', async (t) => {
  const sb = await createSandbox(t);
  // uid 65534 (nobody) with one capability, CAP_DAC_READ_SEARCH: it reads the package wherever
  // the clone lives (a private 0700 folder too), and is still not root, which is what is tested.
  const nobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=+dac_read_search', '--ambient-caps=+dac_read_search'];
  const r = await cli(['pod', 'list'], sb.env, nobody);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^error NM_ERR_NOT_ROOT: nodemesh must run as root \(running as uid 65534\)\n(.*\n)*\s+fix: run it with sudo/);
});

test('no cgroup v2 mounted: NM_ERR_NO_CGROUP2, nothing created', async (t) => {
  const sb = await createSandbox(t);
  const mounts = (await readFile('/proc/self/mounts', 'utf8')).split('\n').filter((l) => l.split(' ')[2] === 'cgroup2').map((l) => l.split(' ')[1]);
  const umounts = mounts.map((m) => `umount -l ${m}`).join(' && ');
  const r = await sh(`exec unshare -m sh -c '${umounts} && exec "$0" "$@"' ${process.execPath} ${CLI_ENTRY} pod run --name x -- true`, sb.env);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /error NM_ERR_NO_CGROUP2: no cgroup v2 hierarchy is mounted/);
  assert.match(r.stderr, /fix: boot with systemd.unified_cgroup_hierarchy=1/);
  assert.deepEqual(await sb.runtime.list(), []);
});

test('bpffs missing and not mountable: NM_ERR_BPFFS', async () => {
  const drop = 'setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin';
  const r = await sh(`exec unshare -m sh -c 'umount -l /sys/fs/bpf 2>/dev/null; exec ${drop} "$0" "$@"' ${process.execPath} ${CLI_ENTRY} check`);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /error NM_ERR_BPFFS: the BPF filesystem is not mounted at \/sys\/fs\/bpf and mounting it failed/);
});

test('bpf() not permitted: NM_ERR_NO_BPF names the errno', async (t) => {
  if (await ensureBpffs()) t.after(releaseBpffs);
  const r = await sh(`exec setpriv --inh-caps=-bpf,-sys_admin,-net_admin,-perfmon --bounding-set=-bpf,-sys_admin,-net_admin,-perfmon ${process.execPath} ${CLI_ENTRY} check`);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /error NM_ERR_NO_BPF: the bpf\(\) system call failed \(EPERM\)/);
  assert.match(r.stderr, /fix: run as root with CAP_BPF/);
});

test('the machine checks pass here', async (t) => {
  // The check mounts bpffs when it is missing: unmounted again afterwards if it did.
  if (!(await isBpffsMounted())) t.after(releaseBpffs);
  const r = await cli(['check'], process.env);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^ok: root, kernel >= 5\.15, cgroup v2, bpffs, bpf\(\)/);
});

test('missing build tools stop the build with the package to install', async () => {
  const noClang = await sh('bash scripts/build.sh bpf', { ...process.env, CLANG: '/nonexistent/clang' });
  assert.equal(noClang.code, 1);
  assert.match(noClang.stderr, /error: clang is not installed \(\/nonexistent\/clang\).*apt-get install -y clang llvm/);

  const noLibbpf = await sh('bash scripts/build.sh native', { ...process.env, PKG_CONFIG_LIBDIR: '/nonexistent', PKG_CONFIG_PATH: '' });
  assert.equal(noLibbpf.code, 1);
  assert.match(noLibbpf.stderr, /error: libbpf is not found by pkg-config \(apt-get install -y libbpf-dev pkg-config\)/);
});
