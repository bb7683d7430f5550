/**
 * Settings of the local pod runtime, parsed once. Defaults suit a single machine; tests give each
 * run its own state folder, bridge, subnets and cgroup subtree so runs never share anything.
 */
import { isIP, isIPv4, isIPv6 } from 'node:net';
import { hostname } from 'node:os';
import { join } from 'node:path';

import { NodemeshError } from '../shared/errors.js';
import { AddressRanges, ipv6Bytes, ipv6Text } from '../shared/address.js';
import { isNodeName } from '../shared/names.js';

export interface Cidr {
  readonly network: string;
  readonly prefix: number;
}

export interface RuntimeConfig {
  /** Pod records, logs and the runtime lock. */
  readonly stateDir: string;
  /** Host bridge that every pod's veth joins. At most 15 characters. */
  readonly bridge: string;
  readonly podCidr4: Cidr;
  readonly podCidr6: Cidr;
  /** Name of nodemesh's subtree under the cgroup2 mount. */
  readonly cgroupSubtree: string;
  /** Prefix of netns and veth names, so leak checks can find ours. */
  readonly namePrefix: string;
  /** The node of pods that name none, and of an agent not given --node: this machine's. */
  readonly node: string;
}

export const DEFAULT_RUNTIME: RuntimeConfig = {
  stateDir: '/run/nodemesh',
  bridge: 'nm-br0',
  podCidr4: { network: '10.200.0.0', prefix: 24 },
  podCidr6: { network: 'fd00:6e6d::', prefix: 64 },
  cgroupSubtree: 'nodemesh',
  namePrefix: 'nm',
  node: defaultNodeName(),
};

export function parseCidr(text: string, family: 4 | 6, field: string): Cidr {
  const [network = '', prefixText = ''] = text.split('/');
  const prefix = Number(prefixText);
  const valid = family === 4 ? isIPv4(network) && prefix >= 8 && prefix <= 30 : isIPv6(network) && prefix >= 64 && prefix <= 120;
  if (!valid || !Number.isInteger(prefix)) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `${field}: "${text}" is not an IPv${family} subnet (expected ${family === 4 ? '10.200.0.0/24, prefix 8-30' : 'fd00:6e6d::/64, prefix 64-120'})`, {
      context: { field },
      hint: `set ${field} to a subnet like ${family === 4 ? '10.200.0.0/24' : 'fd00:6e6d::/64'}, or unset it for the default`,
    });
  }
  return { network, prefix };
}

/** Reads NODEMESH_* environment overrides on top of the defaults. */
export function runtimeConfigFromEnv(env: NodeJS.ProcessEnv = process.env, base: RuntimeConfig = DEFAULT_RUNTIME): RuntimeConfig {
  const bridge = env['NODEMESH_BRIDGE'] ?? base.bridge;
  if (!/^[a-zA-Z0-9_.-]{1,15}$/.test(bridge)) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `NODEMESH_BRIDGE: "${bridge}" is not a valid interface name (1-15 of a-z A-Z 0-9 _ . -)`, {
      context: { field: 'NODEMESH_BRIDGE' },
      hint: 'set NODEMESH_BRIDGE to a short interface name like nm0, or unset it for the default',
    });
  }
  const namePrefix = env['NODEMESH_NAME_PREFIX'] ?? base.namePrefix;
  if (!/^[a-z]{2,4}$/.test(namePrefix)) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `NODEMESH_NAME_PREFIX: "${namePrefix}" must be 2-4 lowercase letters (veth names are limited to 15 characters)`, {
      context: { field: 'NODEMESH_NAME_PREFIX' },
      hint: 'set NODEMESH_NAME_PREFIX to 2-4 lowercase letters like nm, or unset it for the default',
    });
  }
  return {
    stateDir: env['NODEMESH_STATE_DIR'] ?? base.stateDir,
    bridge,
    podCidr4: env['NODEMESH_POD_CIDR'] ? parseCidr(env['NODEMESH_POD_CIDR'], 4, 'NODEMESH_POD_CIDR') : base.podCidr4,
    podCidr6: env['NODEMESH_POD_CIDR6'] ? parseCidr(env['NODEMESH_POD_CIDR6'], 6, 'NODEMESH_POD_CIDR6') : base.podCidr6,
    cgroupSubtree: env['NODEMESH_CGROUP_SUBTREE'] ?? base.cgroupSubtree,
    namePrefix,
    node: env['NODEMESH_NODE'] === undefined ? base.node : parseNodeName(env['NODEMESH_NODE'], 'NODEMESH_NODE'),
  };
}

/** The pod subnets as `--pod-cidrs` takes them: every local node's pods share the bridge and these. */
export function podCidrList(config: Pick<RuntimeConfig, 'podCidr4' | 'podCidr6'>): string {
  return `${config.podCidr4.network}/${config.podCidr4.prefix},${config.podCidr6.network}/${config.podCidr6.prefix}`;
}

/** The n-th host address of a subnet (n = 1 is the bridge, pods start at 2). */
export function hostAddress(cidr: Cidr, family: 4 | 6, n: number): string {
  if (family === 4) {
    const base = cidr.network.split('.').reduce((acc, p) => (acc << 8) + Number(p), 0) >>> 0;
    const mask = cidr.prefix === 0 ? 0 : (0xffffffff << (32 - cidr.prefix)) >>> 0;
    const v = (((base & mask) >>> 0) + n) >>> 0;
    return [v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255].join('.');
  }
  const bytes = ipv6Bytes(cidr.network);
  let carry = n;
  for (let i = 15; i >= 0 && carry > 0; i--) {
    const sum = (bytes[i] ?? 0) + (carry & 0xff);
    bytes[i] = sum & 0xff;
    carry = (carry >>> 8) + (sum >> 8);
  }
  return ipv6Text(bytes);
}

/** How many pod addresses an IPv4 subnet holds (network, bridge and broadcast excluded). */
export function podCapacity(cidr: Cidr): number {
  return 2 ** (32 - cidr.prefix) - 3;
}

/** Whether an address (of the subnet's family) lies inside the subnet. */
export function cidrContains(cidr: Cidr, family: 4 | 6, address: string): boolean {
  return isIP(address) === family && new AddressRanges([`${cidr.network}/${cidr.prefix}`]).has(address);
}

/**
 * The NODEMESH_* environment that makes another nodemesh process (an agent, a CLI) use this
 * runtime config: the agent checks pods against the same subnets and cgroup subtree.
 */
export function runtimeEnv(config: RuntimeConfig): Record<string, string> {
  return {
    NODEMESH_STATE_DIR: config.stateDir,
    NODEMESH_BRIDGE: config.bridge,
    NODEMESH_POD_CIDR: `${config.podCidr4.network}/${config.podCidr4.prefix}`,
    NODEMESH_POD_CIDR6: `${config.podCidr6.network}/${config.podCidr6.prefix}`,
    NODEMESH_CGROUP_SUBTREE: config.cgroupSubtree,
    NODEMESH_NAME_PREFIX: config.namePrefix,
    NODEMESH_NODE: config.node,
  };
}

/**
 * A node name given on the command line (--node), checked: it names the node's cgroup, its
 * bpffs folder and its agent's run folder.
 */
export function parseNodeName(value: string, field = 'node'): string {
  if (!isNodeName(value)) {
    const name = field.startsWith('NODEMESH_') ? field : `--${field}`;
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `${name} "${value}" is not a node name (a DNS-1123 subdomain: lowercase letters, digits, "-" and ".", at most 253)`, {
      context: { field },
      hint: `give ${name} a Kubernetes node name, e.g. node-b`,
    });
  }
  return value;
}

/** This machine's node: its host name in lower case (what kubelet registers by default). */
export function defaultNodeName(): string {
  return hostname().toLowerCase();
}

/**
 * The cgroup that holds every local pod of one node: the agent of that node puts its fail-closed
 * gate on it and accepts only pods under it. Pods of different nodes never share it, so two
 * agents on one machine never gate or enroll each other's pods.
 */
export function nodeCgroup(cgroupMount: string, config: Pick<RuntimeConfig, 'cgroupSubtree'>, node: string): string {
  return join(cgroupMount, config.cgroupSubtree, 'nodes', node);
}
