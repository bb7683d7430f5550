/**
 * Taking nodemesh's datapath off a node (`nodemesh cleanup`, the DaemonSet's uninstall): every
 * link it pinned (pods' capture and sk_lookup, the fail-closed gate), every map pin, the folders,
 * and the in-pod delivery routing and sysctls of pods that still live.
 *
 * It works from the pins alone and loads no BPF object: NodeDatapath.open loads the three objects
 * and pins the maps they miss, which would make state while removing it, and a node may hold pins
 * of another build. A pinned object is told apart by its fdinfo (pinnedObjectInfo). A link is
 * detached explicitly before its pin goes: unpinning alone detaches only when the pin is the last
 * reference, and an agent still running (`cleanup --force`) holds one.
 *
 * Only nodemesh's layout under the pin root is touched (gate/, pods/<uid>/, maps/, see
 * node-datapath.ts); anything else there is left and named, so a wrong --bpf-root cannot take
 * another tool's pins.
 */
import { existsSync } from 'node:fs';
import { readdir, rm, rmdir, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';

import { NodemeshError, isNodemeshError, isSystemError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { BpfLink, pinnedObjectInfo } from './native.js';
import { PIN_BASE } from './node-datapath.js';
import { disableInboundDelivery, inboundDeliveryRouted } from './pod-routing.js';

const log = logger('cleanup');

/** One thing taken off the node: KIND (link, pin, pin dir, routing) and WHAT (a path under the pin root, a pod). */
export interface TeardownItem {
  readonly kind: string;
  readonly what: string;
}

export interface TeardownFailure extends TeardownItem {
  readonly error: NodemeshError;
}

/** Something of nodemesh that stays, and why (not an error of the cleanup: it cannot be reached). */
export interface TeardownLeft extends TeardownItem {
  readonly reason: string;
}

export interface TeardownReport {
  readonly removed: TeardownItem[];
  readonly failed: TeardownFailure[];
  readonly left: TeardownLeft[];
}

/** A pod the local runtime has a record of: where its netns is and what to call it. */
export interface KnownPod {
  readonly uid: string;
  /** namespace/name, for the report. */
  readonly name: string;
  readonly netnsPath: string;
}

/** The folders of nodemesh's layout under the pin root. */
const LAYOUT = ['gate', 'pods', 'maps'] as const;

export function emptyReport(): TeardownReport {
  return { removed: [], failed: [], left: [] };
}

/**
 * Removes everything pinned under pinRoot and the delivery routing of the pods whose netns it
 * changed. Goes on past a failure (an uninstall should take off all it can) and records it.
 * Idempotent: what is gone is not reported again.
 *
 * Which pods' netns it can find:
 * - a pod with pins: from the runtime's record (knownPods) or, without one, from its sk_lookup
 *   link, whose fdinfo names the netns inode; that inode is looked up under /run/netns (where
 *   iproute2 and CNI runtimes bind-mount pod netns) and in /proc/<pid>/ns/net of every process.
 *   That is how it works on a Kubernetes node, which has no records: it needs the host's /proc
 *   (hostPID) and /run/netns. A netns held only by an open fd or a bind mount elsewhere cannot be
 *   entered: it is reported as left. A netns that is gone took its routing with it.
 * - a pod without pins: only from a record, and only when nodemesh's delivery rule is still in
 *   its netns (an unenrollment whose routing removal failed, or a cleanup cut short before it
 *   unpinned). Without a record such a pod cannot be found: nothing names it any more.
 * Pods are undone before their links are unpinned, so a cleanup cut short leaves the pins that
 * lead the next run to them.
 */
export async function teardownNode(pinRoot: string, knownPods: ReadonlyArray<KnownPod>, report: TeardownReport = emptyReport()): Promise<TeardownReport> {
  const host = await stat('/proc/self/ns/net');
  const netns = new NetnsFinder(host.ino, host.dev);

  await removeTree(pinRoot, 'gate', report);

  const byUid = new Map(knownPods.map((p) => [p.uid, p]));
  const pinnedUids = await list(join(pinRoot, 'pods'));
  for (const uid of pinnedUids) {
    const rel = `pods/${uid}`;
    const found = await podNetns(uid, join(pinRoot, rel), byUid.get(uid), netns);
    if (found.path !== undefined) {
      const path = found.path;
      await step(report, 'routing', found.label, () => disableInboundDelivery(path));
    } else if (found.left !== undefined) {
      report.left.push({ kind: 'routing', what: found.label, reason: found.left });
    }
    await removeTree(pinRoot, rel, report);
  }

  const pinned = new Set(pinnedUids);
  for (const pod of knownPods) {
    if (pinned.has(pod.uid) || (await netns.podNetnsIno(pod.netnsPath)) === undefined) continue;
    if (!(await inboundDeliveryRouted(pod.netnsPath))) continue;
    await step(report, 'routing', pod.name, () => disableInboundDelivery(pod.netnsPath));
  }

  for (const dir of LAYOUT) await removeTree(pinRoot, dir, report);

  // A layout folder still there holds a pin whose removal failed (reported): the root stays too.
  if (existsSync(pinRoot) && !LAYOUT.some((d) => existsSync(join(pinRoot, d)))) {
    const foreign = await list(pinRoot);
    if (foreign.length > 0) {
      // Not nodemesh's layout: a wrong --bpf-root, or pins someone put there. Not ours to remove.
      report.left.push({ kind: 'pin dir', what: pinRoot, reason: `holds what nodemesh does not make there: ${foreign.join(', ')}` });
    } else {
      await step(report, 'pin dir', pinRoot, () => rmdir(pinRoot));
    }
  }
  // /sys/fs/bpf/nodemesh holds one folder per node; it goes with the last of them.
  if (dirname(pinRoot) === PIN_BASE && existsSync(dirname(pinRoot)) && (await list(dirname(pinRoot))).length === 0) {
    await step(report, 'pin dir', dirname(pinRoot), () => rmdir(dirname(pinRoot)));
  }
  return report;
}

/** Removes <root>/<rel> depth first: links detached and unpinned, other pins unpinned, folders. */
async function removeTree(root: string, rel: string, report: TeardownReport): Promise<void> {
  const path = join(root, rel);
  let st;
  try {
    st = await stat(path);
  } catch {
    return;
  }
  if (!st.isDirectory()) {
    await removePin(path, rel, report);
    return;
  }
  for (const entry of await list(path)) await removeTree(root, `${rel}/${entry}`, report);
  // Not reported: the pins in it are. A folder that is not empty any more failed a removal above.
  await rmdir(path).catch((e: unknown) => {
    if (!isSystemError(e) || e.code !== 'ENOENT') log.debug({ path, err: e }, 'pin folder not removed');
  });
}

async function removePin(path: string, rel: string, report: TeardownReport): Promise<void> {
  let kind: string;
  try {
    kind = pinnedObjectInfo(path).kind === 'link' ? 'link' : 'pin';
  } catch (e) {
    // Not a BPF object we can open (removed meanwhile, or refused): the pin itself can still go.
    if (!existsSync(path)) return;
    log.warn({ path, err: e }, 'pinned object could not be opened; unpinning it');
    kind = 'pin';
  }
  await step(report, kind, rel, async () => {
    let detachFailed: unknown;
    if (kind === 'link') {
      const link = BpfLink.openPinned(path);
      try {
        link.detach();
      } catch (e) {
        // Unpinned all the same: with no other holder, that releases the link; the failure is
        // reported, since a holder (a running agent) keeps its program attached.
        detachFailed = e;
      } finally {
        link.close();
      }
    }
    await rm(path, { force: true });
    if (detachFailed !== undefined) throw detachFailed;
  });
}

/** Runs one removal: reported as removed unless it says there was nothing (false), or as failed. */
async function step(report: TeardownReport, kind: string, what: string, fn: () => Promise<unknown>): Promise<void> {
  try {
    if ((await fn()) !== false) report.removed.push({ kind, what });
  } catch (e) {
    const error = isNodemeshError(e)
      ? e
      : new NodemeshError('NM_ERR_DATAPATH', `removing ${kind} ${what} failed: ${(e as Error).message}`, {
          context: { object: what, ...(isSystemError(e) ? { ...(e.path ? { path: e.path } : {}), ...(e.code ? { errnoCode: e.code } : {}) } : {}) },
          cause: e,
        });
    report.failed.push({ kind, what, error });
    // The caller reports it; the log keeps the stack.
    log.debug({ kind, what, err: error }, 'cleanup step failed');
  }
}

async function list(dir: string): Promise<string[]> {
  return (await readdir(dir).catch(() => [])).sort();
}

/**
 * Where a pinned pod's netns is. The record's path if it is the netns the pod's sk_lookup link is
 * attached to (or the link says nothing), else the live netns with the link's inode.
 */
async function podNetns(uid: string, podDir: string, record: KnownPod | undefined, netns: NetnsFinder): Promise<{ label: string; path?: string; left?: string }> {
  let ino: number | undefined;
  for (const entry of await list(podDir)) {
    try {
      const info = pinnedObjectInfo(join(podDir, entry));
      if (info.fields['link_type'] === 'netns' && info.fields['netns_ino'] !== undefined) ino = Number(info.fields['netns_ino']);
    } catch {
      // Looked at again (and reported) when it is removed.
    }
  }
  if (ino === 0) return { label: record?.name ?? uid }; // the netns is gone, and its routing with it
  const recorded = record ? await netns.podNetnsIno(record.netnsPath) : undefined;
  if (record && recorded !== undefined && (ino === undefined || recorded === ino)) return { label: record.name, path: record.netnsPath };
  if (ino === undefined) return { label: record?.name ?? uid };
  if (netns.isHost(ino)) return { label: record?.name ?? uid, left: "its link is on the host's network namespace, which cleanup never changes" };
  const path = await netns.find(ino);
  if (path !== undefined) return { label: record?.name ?? `${uid} (${path})`, path };
  return { label: record?.name ?? uid, left: `its network namespace (inode ${ino}) lives but is neither under /run/netns nor the netns of a process this cleanup can see` };
}

/** Live network namespaces by inode: bind mounts under /run/netns, then every process's. */
class NetnsFinder {
  private index: Map<number, string> | undefined;

  constructor(
    private readonly hostIno: number,
    /** Every netns is an inode of the one nsfs: a path on another device is no netns. */
    private readonly nsfsDev: number,
  ) {}

  /** The inode of path if it is a live netns other than the host's (the one this cleanup runs in, never touched). */
  async podNetnsIno(path: string): Promise<number | undefined> {
    const st = await stat(path).catch(() => undefined);
    return st !== undefined && st.dev === this.nsfsDev && st.ino !== this.hostIno ? st.ino : undefined;
  }

  isHost(ino: number): boolean {
    return ino === this.hostIno;
  }

  async find(ino: number): Promise<string | undefined> {
    if (this.isHost(ino)) return undefined;
    this.index ??= await this.build();
    return this.index.get(ino);
  }

  private async build(): Promise<Map<number, string>> {
    const index = new Map<number, string>();
    const add = async (path: string): Promise<void> => {
      const st = await stat(path).catch(() => undefined);
      if (st && st.dev === this.nsfsDev && !index.has(st.ino)) index.set(st.ino, path);
    };
    for (const name of await list('/run/netns')) await add(join('/run/netns', name));
    for (const pid of (await list('/proc')).filter((e) => /^\d+$/.test(e))) await add(`/proc/${pid}/ns/net`);
    return index;
  }
}
