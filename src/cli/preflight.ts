/**
 * Start-up checks: each missing requirement stops nodemesh with one message naming what is
 * missing and how to fix it (NodemeshError with a hint), before anything is created.
 */
import { release } from 'node:os';
import { mkdir, readFile, readdir } from 'node:fs/promises';

import { findCgroup2Mount } from '../runtime/cgroup.js';
import { run } from '../shared/exec.js';
import { NodemeshError, isNodemeshError } from '../shared/errors.js';

export const MIN_KERNEL: readonly [number, number] = [5, 15];
export const BPFFS = '/sys/fs/bpf';

export function parseKernelRelease(text: string): [number, number] | null {
  const m = /^(\d+)\.(\d+)/.exec(text);
  return m ? [Number(m[1]), Number(m[2])] : null;
}

export function checkKernel(text = release()): void {
  const v = parseKernelRelease(text);
  if (!v || v[0] < MIN_KERNEL[0] || (v[0] === MIN_KERNEL[0] && v[1] < MIN_KERNEL[1])) {
    throw new NodemeshError('NM_ERR_KERNEL_TOO_OLD', `kernel ${text} is older than ${MIN_KERNEL.join('.')}, the minimum nodemesh supports`, {
      hint: 'run on Linux 5.15 or newer (bpf_get_netns_cookie in sockops, cgroup and netns BPF links)',
    });
  }
}

export function checkRoot(uid = process.getuid?.() ?? -1): void {
  if (uid !== 0) {
    throw new NodemeshError('NM_ERR_NOT_ROOT', `nodemesh must run as root (running as uid ${uid})`, {
      hint: 'run it with sudo, or as root in the DaemonSet (privileged, hostNetwork, hostPID)',
    });
  }
}

/** Whether bpffs is mounted at /sys/fs/bpf (in this mount namespace). */
export async function isBpffsMounted(): Promise<boolean> {
  const mounts = await readFile('/proc/self/mounts', 'utf8');
  return mounts.split('\n').some((l) => {
    const [, point, type] = l.split(' ');
    return point === BPFFS && type === 'bpf';
  });
}

/** Mounts bpffs at /sys/fs/bpf when it is not mounted yet; true when this call mounted it. */
export async function ensureBpffs(): Promise<boolean> {
  if (await isBpffsMounted()) return false;
  try {
    await mkdir(BPFFS, { recursive: true });
    await run('mount', ['-t', 'bpf', 'bpf', BPFFS]);
    return true;
  } catch (e) {
    throw new NodemeshError('NM_ERR_BPFFS', `the BPF filesystem is not mounted at ${BPFFS} and mounting it failed: ${(e as Error).message}`, {
      context: { path: BPFFS },
      cause: e,
      hint: 'mount it on the host (mount -t bpf bpf /sys/fs/bpf) and, in Kubernetes, give the agent a hostPath volume for /sys/fs/bpf',
    });
  }
}

/** The kernel's own entries in every bpffs (its BPF preload iterators), which nobody pinned. */
const BPFFS_PRELOAD = new Set(['maps.debug', 'progs.debug']);

/**
 * Unmounts /sys/fs/bpf again (after ensureBpffs() mounted it) when nothing but the kernel's
 * preload entries is left in it; anything pinned since keeps it mounted.
 */
export async function releaseBpffs(): Promise<void> {
  if (!(await isBpffsMounted())) return;
  if ((await readdir(BPFFS)).some((name) => !BPFFS_PRELOAD.has(name))) return;
  await run('umount', [BPFFS]);
}

/** bpf() must exist and be allowed; probe() is the addon's one-entry map creation. */
export function checkBpf(probe: () => void): void {
  try {
    probe();
  } catch (e) {
    if (isNodemeshError(e, 'NM_ERR_NATIVE_MISSING')) throw e;
    const errno = isNodemeshError(e) ? e.context.errnoCode : undefined;
    throw new NodemeshError('NM_ERR_NO_BPF', `the bpf() system call failed (${errno ?? (e as Error).message})`, {
      cause: e,
      hint:
        errno === 'ENOSYS'
          ? 'the kernel is built without CONFIG_BPF_SYSCALL'
          : 'run as root with CAP_BPF and CAP_SYS_ADMIN; check kernel.unprivileged_bpf_disabled and seccomp/LSM policy',
    });
  }
}

/** Everything the datapath needs; the order gives the most fundamental problem first. */
export async function preflight(probe: () => void): Promise<void> {
  checkRoot();
  checkKernel();
  await findCgroup2Mount();
  await ensureBpffs();
  checkBpf(probe);
}
