/**
 * Outbound capture: owns the loaded capture programs and their maps. Enrolling a pod's cgroup
 * attaches connect4, connect6 and sockops as links; the proxy asks for the original destination
 * of an accepted connection with originalDestination().
 */
import { join } from 'node:path';

import { NodemeshError } from '../shared/errors.js';
import { BPF_OBJECT_DIR } from '../shared/paths.js';
import type { SocketAddress } from '../shared/address.js';
import { LAYOUTS, decodeAddr, encodeOrigKey, type OrigKey } from './abi.js';
import { BpfObject, detachAll, type BpfLink, type BpfMap, type LoadOptions } from './native.js';

export const CAPTURE_OBJECT = join(BPF_OBJECT_DIR, 'capture.bpf.o');
export const CAPTURE_PROGRAMS = ['nm_connect4', 'nm_connect6', 'nm_sockops'] as const;

/** The links that hold the capture programs on one cgroup. */
export class CgroupCapture {
  private attached = true;

  constructor(
    readonly cgroupPath: string,
    readonly links: ReadonlyArray<BpfLink>,
  ) {}

  /** Takes every program off the cgroup (pinned or not) and releases the links. Idempotent. */
  detach(): void {
    if (!this.attached) return;
    this.attached = false;
    detachAll(this.links);
  }
}

export class OutboundCapture {
  private constructor(
    readonly object: BpfObject,
    private readonly origDst: BpfMap,
    private readonly cookieDst: BpfMap,
  ) {}

  static async load(options: LoadOptions = {}): Promise<OutboundCapture> {
    const object = await BpfObject.load(CAPTURE_OBJECT, options);
    const origDst = object.map('nm_orig_dst');
    const cookieDst = object.map('nm_cookie_dst');
    if (origDst.keySize !== LAYOUTS.nm_orig_key.size || origDst.valueSize !== LAYOUTS.nm_addr.size) {
      object.close();
      throw new NodemeshError('NM_ERR_ABI_MISMATCH', `nm_orig_dst has key/value ${origDst.keySize}/${origDst.valueSize} bytes, this build expects ${LAYOUTS.nm_orig_key.size}/${LAYOUTS.nm_addr.size}`, {
        context: { object: 'nm_orig_dst', path: CAPTURE_OBJECT },
        hint: 'the pinned maps come from another map ABI version; remove them or bump NM_MAP_ABI_VERSION',
      });
    }
    return new OutboundCapture(object, origDst, cookieDst);
  }

  /** Attaches the capture programs to a cgroup. All or nothing: on failure none stays attached. */
  async attach(cgroupPath: string): Promise<CgroupCapture> {
    const links: BpfLink[] = [];
    try {
      for (const program of CAPTURE_PROGRAMS) links.push(await this.object.attachCgroup(program, cgroupPath));
    } catch (e) {
      for (const link of links) link.close();
      throw e;
    }
    return new CgroupCapture(cgroupPath, links);
  }

  /**
   * The address the application dialed, for a connection accepted on an outbound listener.
   * The entry is consumed: each captured connection is looked up once.
   */
  originalDestination(key: OrigKey): SocketAddress | null {
    const k = encodeOrigKey(key);
    const value = this.origDst.lookup(k);
    if (!value) return null;
    this.origDst.delete(k);
    return decodeAddr(value);
  }

  /** Entries in flight, for metrics: captured connects not yet established, established not yet read. */
  pending(): { connecting: number; established: number } {
    return { connecting: this.cookieDst.count(), established: this.origDst.count() };
  }

  close(): void {
    this.object.close();
  }
}
