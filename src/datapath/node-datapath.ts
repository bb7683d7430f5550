/**
 * The node's datapath: the one owner of loaded BPF objects, pinned maps and per-pod links.
 * Layout under the pin root (default /sys/fs/bpf/nodemesh/v1):
 *   maps/<map name>                 every map of bpf/include/maps.h, shared by all objects
 *   pods/<pod uid>/<program name>   the links that hold one pod's programs
 * Pinned links keep capturing while the agent restarts; a new agent re-owns them (swapping in its
 * own programs atomically) or removes them if their pod is gone.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';

import { NodemeshError, isSystemError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { BPF_OBJECT_DIR } from '../shared/paths.js';
import type { Family, SocketAddress } from '../shared/address.js';
import { NM_ROLE_INBOUND, encodeListenerKey, type OrigKey } from './abi.js';
import { CAPTURE_PROGRAMS, OutboundCapture } from './capture.js';
import { BpfLink, BpfObject, detachAll, pinnedObjectInfo, type BpfMap } from './native.js';
import { disableInboundDelivery, enableInboundDelivery, type PodAddress } from './pod-routing.js';
import { UUID } from '../shared/names.js';

/** bpf/include/maps.h */
const NM_SETTING_STRICT_INBOUND = 1;
const NM_COUNT_NON_TCP_STREAM = 0;

const log = logger('datapath');

/** Every node's pin root is a folder of this one, named after the node. */
export const PIN_BASE = '/sys/fs/bpf/nodemesh';

/** Where a node's agent pins its maps and links unless --bpf-root says otherwise. */
export function defaultPinRoot(node: string): string {
  return join(PIN_BASE, node);
}
export const INBOUND_OBJECT = join(BPF_OBJECT_DIR, 'inbound.bpf.o');
export const GATE_OBJECT = join(BPF_OBJECT_DIR, 'gate.bpf.o');
const GATE_PROGRAMS = ['nm_gate4', 'nm_gate6', 'nm_gate_egress'] as const;
const INBOUND_PROGRAM = 'nm_sk_lookup';
const POD_PROGRAMS = [...CAPTURE_PROGRAMS, INBOUND_PROGRAM] as const;

/** What the datapath needs to know of a pod. */
export interface DatapathPod {
  readonly uid: string;
  readonly namespace: string;
  readonly name: string;
  readonly cgroupPath: string;
  readonly netnsPath: string;
}

export class NodeDatapath {
  private readonly links = new Map<string, BpfLink[]>();

  private constructor(
    readonly pinRoot: string,
    private readonly capture: OutboundCapture,
    private readonly inbound: BpfObject,
    private readonly listeners: BpfMap,
    private readonly bypass: BpfMap,
    private readonly gate: BpfObject,
    private readonly allowed: BpfMap,
  ) {}

  private gateLinks: BpfLink[] = [];
  /** The cgroup (its id) the gate's links are attached to. */
  private gateCgroupId: bigint | undefined;
  /** Every non-loopback address of each enrolled pod, found when its delivery routing was set up. */
  private readonly addresses = new Map<string, ReadonlyArray<PodAddress>>();
  /** What this agent wrote to nm_settings (undefined: nothing yet; an earlier agent's value may be there). */
  private strictInbound: boolean | undefined;

  /** Every non-loopback address of the pod (see enableInboundDelivery); empty if unknown. */
  podAddresses(uid: string): ReadonlyArray<PodAddress> {
    return this.addresses.get(uid) ?? [];
  }

  /**
   * Fail-closed enrollment for inbound: sk_lookup drops a connection to an enrolled pod that it
   * cannot hand to a live listener, instead of letting it reach the application. In a pinned map,
   * so it holds while no agent runs.
   */
  setStrictInbound(strict: boolean): void {
    if (this.strictInbound === strict) return;
    this.strictInbound = strict;
    const key = Buffer.alloc(4);
    const value = Buffer.alloc(4);
    value.writeUInt32LE(strict ? NM_SETTING_STRICT_INBOUND : 0);
    this.inbound.map('nm_settings').update(key, value);
  }

  /** fd of nm_inbound_bypass, for the proxy's inbound delivery connects. */
  get inboundBypassFd(): number {
    return this.bypass.fd;
  }

  static async open(pinRoot: string): Promise<NodeDatapath> {
    const mapDir = join(pinRoot, 'maps');
    for (const dir of [mapDir, join(pinRoot, 'pods')]) {
      try {
        await mkdir(dir, { recursive: true });
      } catch (e) {
        // A --bpf-root under a file, or on a bpffs that refuses folders: the option is wrong.
        throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--bpf-root ${pinRoot}: cannot make the folder ${dir}: ${(e as Error).message}`, {
          context: { field: 'bpf-root', path: dir, ...(isSystemError(e) && e.code !== undefined ? { errnoCode: e.code } : {}) },
          cause: e,
          hint: `give a folder under /sys/fs/bpf, e.g. --bpf-root ${PIN_BASE}/node-a`,
        });
      }
    }
    const capture = await OutboundCapture.load({ mapPinDir: mapDir });
    let inbound: BpfObject | undefined;
    let gate: BpfObject;
    try {
      inbound = await BpfObject.load(INBOUND_OBJECT, { mapPinDir: mapDir });
      gate = await BpfObject.load(GATE_OBJECT, { mapPinDir: mapDir });
    } catch (e) {
      capture.close();
      inbound?.close();
      throw e;
    }
    return new NodeDatapath(pinRoot, capture, inbound, inbound.map('nm_pod_listeners'), inbound.map('nm_inbound_bypass'), gate, gate.map('nm_allowed_cgroups'));
  }

  /** A pod's pin folder; removed recursively later, so only a uid (a UUID) may name it. */
  private podDir(uid: string): string {
    if (!UUID.test(uid)) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `pod uid "${uid}" is not a UUID: it cannot name a pin folder`, { context: { detail: uid } });
    return join(this.pinRoot, 'pods', uid);
  }

  private object(program: string): BpfObject {
    return program === INBOUND_PROGRAM ? this.inbound : this.capture.object;
  }

  /** UIDs of pods that have pinned links, from this agent or an earlier one. */
  /** The pods with pinned state (folders named by uid; anything else there is not ours and is left). */
  async pinnedPods(): Promise<string[]> {
    return (await readdir(join(this.pinRoot, 'pods')).catch(() => [])).filter((name) => UUID.test(name)).sort();
  }

  isAttached(uid: string): boolean {
    return this.links.has(uid);
  }

  /**
   * Attaches the capture programs to the pod's cgroup and sk_lookup to its netns, pinning each
   * link. All or nothing: on failure nothing of this pod stays attached or pinned.
   */
  async attachPod(pod: DatapathPod): Promise<void> {
    const dir = this.podDir(pod.uid);
    await mkdir(dir, { recursive: true });
    const made: BpfLink[] = [];
    try {
      for (const program of POD_PROGRAMS) {
        const link =
          program === INBOUND_PROGRAM ? await this.inbound.attachNetns(program, pod.netnsPath) : await this.capture.object.attachCgroup(program, pod.cgroupPath);
        made.push(link);
        link.pin(join(dir, program));
      }
      this.addresses.set(pod.uid, await enableInboundDelivery(pod.netnsPath));
    } catch (e) {
      detachAll(made);
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
    this.links.set(pod.uid, made);
  }

  /**
   * Takes over the pinned links of a pod enrolled by an earlier agent, swapping in this build's
   * programs with link updates: the pod is never without capture.
   */
  async readopt(pod: DatapathPod): Promise<void> {
    const uid = pod.uid;
    const dir = this.podDir(uid);
    const links: BpfLink[] = [];
    try {
      for (const program of POD_PROGRAMS) {
        const link = BpfLink.openPinned(join(dir, program));
        links.push(link);
        link.updateProgram(this.object(program), program);
      }
      this.addresses.set(pod.uid, await enableInboundDelivery(pod.netnsPath));
    } catch (e) {
      for (const link of links) link.close();
      throw e;
    }
    this.links.set(uid, links);
  }

  /**
   * Puts this agent's programs back on the links of every pod it holds: a handover that did not
   * complete, after which the new agent had swapped in its build's (readopt).
   */
  reclaimPrograms(): void {
    for (const [uid, links] of this.links) {
      links.forEach((link, i) => {
        const program = POD_PROGRAMS[i];
        if (program === undefined) return;
        try {
          link.updateProgram(this.object(program), program);
        } catch (e) {
          log.warn({ uid, program, err: (e as Error).message }, "this agent's program could not be put back on the pod's link");
        }
      });
    }
  }

  /**
   * Detaches and unpins everything of a pod, whether this agent or an earlier one made it. With
   * the pod's netns (a live pod leaving the mesh), its delivery routing is removed too.
   */
  async detachPod(uid: string, netnsPath?: string): Promise<void> {
    if (netnsPath) await disableInboundDelivery(netnsPath).catch((e: unknown) => log.warn({ uid, err: e }, 'removing inbound delivery routing failed'));
    const dir = this.podDir(uid);
    const held = this.links.get(uid);
    this.links.delete(uid);
    this.addresses.delete(uid);
    if (held) {
      detachAll(held);
    } else {
      for (const program of POD_PROGRAMS) {
        try {
          detachAll([BpfLink.openPinned(join(dir, program))]);
        } catch (e) {
          log.warn({ uid, program, err: e }, 'pinned link of a removed pod could not be opened');
        }
      }
    }
    await rm(dir, { recursive: true, force: true });
  }

  /**
   * Fail-closed enrollment: the gate programs on the parent cgroup of all pods refuse connections
   * that capture did not rewrite, from any pod whose cgroup is not allowed. Pinned, so the gate
   * holds while the agent restarts; a pinned gate from an earlier agent is re-owned.
   *
   * Called on every reconcile pass. A cgroup can be removed while programs are attached to it
   * (rmdir does not refuse), and one made again under the same name has none: so the gate is
   * checked against the cgroup that is there now (its id is its inode), and attached again if it
   * sits on a cgroup that is gone. Returns whether it had to be attached again.
   */
  async enableGate(podsCgroup: string): Promise<boolean> {
    await mkdir(podsCgroup, { recursive: true });
    const cgroupId = (await stat(podsCgroup, { bigint: true })).ino;
    if (this.gateLinks.length > 0 && this.gateCgroupId === cgroupId) return false;
    const dir = join(this.pinRoot, 'gate');
    const stale = this.gateLinks.length > 0 || GATE_PROGRAMS.some((p) => existsSync(join(dir, p)) && gateCgroupOf(join(dir, p)) !== cgroupId);
    if (stale) await this.disableGate();
    await mkdir(dir, { recursive: true });
    const links: BpfLink[] = [];
    try {
      for (const program of GATE_PROGRAMS) {
        const pin = join(dir, program);
        let link: BpfLink;
        if (existsSync(pin)) {
          link = BpfLink.openPinned(pin);
          links.push(link);
          link.updateProgram(this.gate, program);
        } else {
          link = await this.gate.attachCgroup(program, podsCgroup);
          links.push(link);
          link.pin(pin);
        }
      }
    } catch (e) {
      detachAll(links);
      await rm(dir, { recursive: true, force: true });
      throw e;
    }
    this.gateLinks = links;
    this.gateCgroupId = cgroupId;
    return stale;
  }

  /** Removes the gate, whether this agent or an earlier one set it. */
  async disableGate(): Promise<void> {
    const dir = join(this.pinRoot, 'gate');
    const links = this.gateLinks.length > 0 ? this.gateLinks : GATE_PROGRAMS.filter((p) => existsSync(join(dir, p))).map((p) => BpfLink.openPinned(join(dir, p)));
    detachAll(links);
    this.gateLinks = [];
    this.gateCgroupId = undefined;
    await rm(dir, { recursive: true, force: true });
  }

  /** Whether a gate is in place, set by this agent or pinned by an earlier one. */
  get gateEnabled(): boolean {
    return this.gateLinks.length > 0 || existsSync(join(this.pinRoot, 'gate'));
  }

  /** Lets a pod's cgroup connect past the gate (verified, or opted out). */
  allowCgroup(cgroupId: bigint): void {
    this.allowed.update(cgroupKey(cgroupId), Buffer.from([1]));
  }

  allowedCgroupIds(): bigint[] {
    return this.allowed.keys().map((k) => k.readBigUInt64LE(0));
  }

  disallowCgroup(cgroupId: bigint): void {
    this.allowed.delete(cgroupKey(cgroupId));
  }

  /** Registers a pod's in-pod inbound listener (fd) as the sk_lookup target for its address. */
  registerInboundListener(family: Family, address: string, fd: number): void {
    const value = Buffer.alloc(8);
    value.writeBigUInt64LE(BigInt(fd));
    this.listeners.update(encodeListenerKey({ family, role: NM_ROLE_INBOUND, address }), value);
  }

  unregisterInboundListener(family: Family, address: string): void {
    this.listeners.delete(encodeListenerKey({ family, role: NM_ROLE_INBOUND, address }));
  }

  originalDestination(key: OrigKey): SocketAddress | null {
    return this.capture.originalDestination(key);
  }

  /** What the programs counted (bpf/include/maps.h nm_counters): connects refused by reason. */
  captureRefusals(): Record<string, number> {
    const key = Buffer.alloc(4);
    key.writeUInt32LE(NM_COUNT_NON_TCP_STREAM);
    const value = this.capture.object.map('nm_counters').lookup(key);
    return { non_tcp_stream: value ? Number(value.readBigUInt64LE(0)) : 0 };
  }

  mapEntries(): Record<string, number> {
    const pending = this.capture.pending();
    return {
      nm_cookie_dst: pending.connecting,
      nm_orig_dst: pending.established,
      nm_pod_listeners: this.listeners.count(),
      nm_allowed_cgroups: this.allowed.count(),
    };
  }

  /** Releases this process's handles; pinned links and maps stay (a restart keeps capturing). */
  close(): void {
    for (const links of this.links.values()) for (const link of links) link.close();
    this.links.clear();
    for (const link of this.gateLinks) link.close();
    this.gateLinks = [];
    this.capture.close();
    this.inbound.close();
    this.gate.close();
  }

  /** Removes every pin under the root (uninstall, and tests). Pods lose capture. */
  async purge(): Promise<void> {
    for (const uid of await this.pinnedPods()) await this.detachPod(uid);
    await this.disableGate();
    this.close();
    await rm(this.pinRoot, { recursive: true, force: true });
  }
}

/** Key of nm_allowed_cgroups: the cgroup id as a host-order u64. */
function cgroupKey(cgroupId: bigint): Buffer {
  const key = Buffer.alloc(8);
  key.writeBigUInt64LE(cgroupId);
  return key;
}

export function assertPinRoot(path: string): void {
  if (!path.startsWith('/sys/fs/bpf/')) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--bpf-root ${path} is not under /sys/fs/bpf`, { context: { field: 'bpf-root' }, hint: `give a folder under /sys/fs/bpf, e.g. --bpf-root ${PIN_BASE}/node-a` });
  }
}

/** The id of the cgroup a pinned cgroup link is attached to (0 once that cgroup is gone). */
function gateCgroupOf(pin: string): bigint {
  const id = pinnedObjectInfo(pin).fields['cgroup_id'];
  return id === undefined ? 0n : BigInt(id);
}
