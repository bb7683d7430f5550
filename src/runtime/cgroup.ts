/** cgroup v2: finding the hierarchy, and the pod cgroups nodemesh owns under it. */
import { readFile, mkdir, rmdir, writeFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { NodemeshError } from '../shared/errors.js';

/** The cgroup2 mount point from a /proc/self/mounts text (/sys/fs/cgroup, or .../unified on hybrid hosts). */
export function parseCgroup2Mount(mounts: string): string | null {
  for (const line of mounts.split('\n')) {
    const [, mountPoint, fsType] = line.split(' ');
    if (fsType === 'cgroup2' && mountPoint) return mountPoint.replace(/\\040/g, ' ');
  }
  return null;
}

export async function findCgroup2Mount(): Promise<string> {
  const mount = parseCgroup2Mount(await readFile('/proc/self/mounts', 'utf8'));
  if (!mount) {
    throw new NodemeshError('NM_ERR_NO_CGROUP2', 'no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/self/mounts)', {
      context: { path: '/proc/self/mounts' },
      hint: 'boot with systemd.unified_cgroup_hierarchy=1, or mount one: mount -t cgroup2 none /sys/fs/cgroup/unified',
    });
  }
  return mount;
}

/** Creates a pod cgroup; its parents may exist, the cgroup itself must not (EEXIST). */
export async function createCgroup(path: string): Promise<void> {
  await mkdir(path.slice(0, path.lastIndexOf('/')), { recursive: true });
  await mkdir(path);
}

export async function cgroupPids(path: string): Promise<number[]> {
  try {
    const text = await readFile(join(path, 'cgroup.procs'), 'utf8');
    return text.split('\n').filter(Boolean).map(Number);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}

async function waitEmpty(path: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if ((await cgroupPids(path)).length === 0) return true;
    if (Date.now() >= deadline) return false;
    await sleep(25);
  }
}

/**
 * Waits until pid is in the cgroup, or has already exited (a short command may join and end
 * between two looks). False only if neither happens in time.
 */
export async function waitForCgroupMember(path: string, pid: number, child: { exitCode: number | null; signalCode: string | null }, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) return true;
    if ((await cgroupPids(path)).includes(pid)) return true;
    await sleep(5);
  }
  return false;
}

function signalAll(pids: ReadonlyArray<number>, signal: NodeJS.Signals): void {
  for (const pid of pids) {
    try {
      process.kill(pid, signal);
    } catch {
      // already gone
    }
  }
}

/**
 * Stops every process of a cgroup: SIGTERM, then after `graceMs` SIGKILL (cgroup.kill where the
 * kernel has it, so forks racing the kill are caught too). Only processes inside the cgroup are
 * signalled, and the cgroup is ours, so nothing else on the machine is touched.
 */
export async function stopCgroupProcesses(path: string, graceMs: number): Promise<void> {
  signalAll(await cgroupPids(path), 'SIGTERM');
  if (await waitEmpty(path, graceMs)) return;
  try {
    await writeFile(join(path, 'cgroup.kill'), '1');
  } catch {
    signalAll(await cgroupPids(path), 'SIGKILL');
  }
  if (!(await waitEmpty(path, 5_000))) {
    throw new NodemeshError('NM_ERR_POD_SETUP', `processes of cgroup ${path} did not exit after SIGKILL`, { context: { path } });
  }
}

/**
 * rmdir, retried for a moment on EBUSY: a cgroup counts as populated until its last exited
 * process has been reaped, which can lag the process leaving cgroup.procs.
 */
export async function rmdirWhenEmpty(dir: string, retry: boolean): Promise<void> {
  const deadline = Date.now() + (retry ? 2_000 : 0);
  for (;;) {
    try {
      await rmdir(dir);
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EBUSY' || Date.now() >= deadline) throw e;
      await sleep(20);
    }
  }
}

/** Removes a cgroup directory and, if they are then empty, its parents up to `stopAt` (exclusive). */
export async function removeCgroup(path: string, stopAt: string): Promise<void> {
  let dir = path;
  while (dir.startsWith(stopAt + '/') && dir !== stopAt) {
    try {
      const children = (await readdir(dir, { withFileTypes: true })).filter((d) => d.isDirectory());
      if (children.length > 0) return;
      await rmdirWhenEmpty(dir, dir === path);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // A parent another pod (or agent) still uses stays; the pod's own cgroup must go.
      if (dir !== path && (code === 'EBUSY' || code === 'ENOTEMPTY')) return;
      if (code !== 'ENOENT') throw e;
    }
    dir = dir.slice(0, dir.lastIndexOf('/'));
  }
}

/**
 * Removes a cgroup folder and every cgroup below it, deepest first (each must hold no process):
 * what a sandbox or a benchmark made, whose nodes' pod cgroups outlive their pods. Gone already
 * is fine.
 */
export async function removeCgroupTree(dir: string): Promise<void> {
  let children;
  try {
    children = await readdir(dir, { withFileTypes: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  for (const c of children) if (c.isDirectory()) await removeCgroupTree(join(dir, c.name));
  await rmdir(dir);
}
