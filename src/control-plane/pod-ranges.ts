/**
 * The pod addresses each node may claim (design.md section 11: a node is believed only about
 * itself). From `--pod-cidrs`: CIDR blocks any node's pods may use (the cluster's pod network, as
 * pods of the local runtime share one bridge) and `NODE=CIDR` blocks of one node only (a
 * Kubernetes node's spec.podCIDRs). A pod report with an address outside its node's ranges is
 * dropped. With no ranges at all, any address is believed (and the control plane says so at start).
 */
import { AddressRanges, parseAddressBlock } from '../shared/address.js';
import { NodemeshError } from '../shared/errors.js';
import { isNodeName } from '../shared/names.js';

export class PodRanges {
  private readonly byNode = new Map<string, AddressRanges>();

  private constructor(
    private readonly mesh: ReadonlyArray<string>,
    private readonly nodes: ReadonlyMap<string, ReadonlyArray<string>>,
  ) {}

  /** "10.200.0.0/16,fd00::/64,node-b=10.201.0.0/24": throws NM_ERR_INVALID_ARGUMENT naming the bad entry. */
  static parse(text: string, field = 'pod-cidrs'): PodRanges {
    const mesh: string[] = [];
    const nodes = new Map<string, string[]>();
    for (const entry of text.split(',').map((e) => e.trim()).filter((e) => e !== '')) {
      const eq = entry.indexOf('=');
      const node = eq < 0 ? undefined : entry.slice(0, eq);
      const cidr = eq < 0 ? entry : entry.slice(eq + 1);
      const bad = (why: string): NodemeshError =>
        new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--${field}: "${entry}" ${why}`, { context: { field }, hint: 'give CIDR blocks any node may use and NODE=CIDR blocks of one node, comma-separated: 10.200.0.0/16,node-b=10.201.0.0/24' });
      if (node !== undefined && !isNodeName(node)) throw bad(`names no node ("${node}" is not a node name)`);
      if (!parseAddressBlock(cidr)) throw bad('is not an IP address or CIDR block');
      if (node === undefined) mesh.push(cidr);
      else nodes.set(node, [...(nodes.get(node) ?? []), cidr]);
    }
    return new PodRanges(mesh, nodes);
  }

  static none(): PodRanges {
    return new PodRanges([], new Map());
  }

  /** Whether any range is configured (without, every address is believed). */
  get restricted(): boolean {
    return this.mesh.length > 0 || this.nodes.size > 0;
  }

  /** The ranges a node's pods may use; undefined: unrestricted. */
  of(node: string): AddressRanges | undefined {
    if (!this.restricted) return undefined;
    let ranges = this.byNode.get(node);
    if (!ranges) {
      ranges = new AddressRanges([...this.mesh, ...(this.nodes.get(node) ?? [])]);
      this.byNode.set(node, ranges);
    }
    return ranges;
  }
}
