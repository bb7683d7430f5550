/**
 * The checks every pod the agent is told about passes at its edge (a runtime's record, a hand-over
 * on the enrollment socket), before any of its fields becomes a path, a map key or a netns to
 * enter: a uid is joined into pin paths that are later removed recursively, a netns path is
 * entered to set sysctls and routes, an address keys the inbound listener map.
 */
import { isIPv4, isIPv6 } from 'node:net';
import { isAbsolute, normalize, relative } from 'node:path';

import type { Workload } from '../../config/snapshot.js';
import { cidrContains, type Cidr } from '../../runtime/config.js';
import { DNS_LABEL, DNS_SUBDOMAIN, UUID } from '../../shared/names.js';


/** What the node allows: where pods' cgroups live, and (local runtime) its netns folder and pod subnets. */
export interface PodEdge {
  readonly podsCgroup: string;
  /** A pod's netns must be a file directly in this folder (the local runtime's /run/netns). */
  readonly netnsDir?: string;
  readonly cidr4?: Cidr;
  readonly cidr6?: Cidr;
}

/** A field of a pod that is not acceptable, named. */
export class PodFieldInvalid extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
  }
}

/** A pod that passed: the workload, and where its netns and cgroup are. */
export interface CheckedPod extends Workload {
  readonly netnsPath: string;
  readonly cgroupPath: string;
}

/** Under `base`, and not `base` itself. */
function strictlyUnder(base: string, path: string): boolean {
  const rel = relative(base, path);
  return rel !== '' && !rel.startsWith('..') && !isAbsolute(rel);
}

/** Checks the fields of a pod (what it is, not whether its netns exists now); throws PodFieldInvalid. */
export function checkPodFields(value: unknown, edge: PodEdge): CheckedPod {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new PodFieldInvalid('pod', 'must be an object');
  const p = value as Record<string, unknown>;
  const str = (field: string): string => {
    const v = p[field];
    if (typeof v !== 'string') throw new PodFieldInvalid(field, 'must be a string');
    return v;
  };
  const uid = str('uid');
  if (!UUID.test(uid)) throw new PodFieldInvalid('uid', `"${uid}" is not a UUID`);
  const name = str('name');
  const namespace = str('namespace');
  const serviceAccount = str('serviceAccount');
  for (const [field, v] of [['namespace', namespace], ['serviceAccount', serviceAccount]] as const) {
    if (!DNS_LABEL.test(v)) throw new PodFieldInvalid(field, `"${v}" is not a DNS-1123 label`);
  }
  // Pod names are DNS-1123 subdomains (a StatefulSet's pods, names with dots).
  if (name.length > 253 || !DNS_SUBDOMAIN.test(name)) throw new PodFieldInvalid('name', `"${name}" is not a DNS-1123 subdomain`);
  const ip4 = str('ip4');
  if (!isIPv4(ip4)) throw new PodFieldInvalid('ip4', `"${ip4}" is not an IPv4 address`);
  if (edge.cidr4 && !cidrContains(edge.cidr4, 4, ip4)) throw new PodFieldInvalid('ip4', `${ip4} is not in the pod subnet ${edge.cidr4.network}/${edge.cidr4.prefix}`);
  // A single-stack IPv4 pod (most clusters) has no IPv6 address: "".
  const ip6 = str('ip6');
  if (ip6 !== '' && !isIPv6(ip6)) throw new PodFieldInvalid('ip6', `"${ip6}" is not an IPv6 address`);
  if (ip6 !== '' && edge.cidr6 && !cidrContains(edge.cidr6, 6, ip6)) throw new PodFieldInvalid('ip6', `${ip6} is not in the pod subnet ${edge.cidr6.network}/${edge.cidr6.prefix}`);
  const labels = p['labels'];
  if (typeof labels !== 'object' || labels === null || Array.isArray(labels)) throw new PodFieldInvalid('labels', 'must be an object of strings');
  for (const [k, v] of Object.entries(labels)) if (typeof v !== 'string' || k.length === 0 || k.length > 317) throw new PodFieldInvalid(`labels["${k}"]`, 'must be a string');
  const netnsPath = str('netnsPath');
  const cgroupPath = str('cgroupPath');
  for (const [field, path] of [['netnsPath', netnsPath], ['cgroupPath', cgroupPath]] as const) {
    if (!isAbsolute(path) || normalize(path) !== path) throw new PodFieldInvalid(field, `"${path}" is not an absolute, normalised path`);
  }
  if (!strictlyUnder(edge.podsCgroup, cgroupPath)) throw new PodFieldInvalid('cgroupPath', `"${cgroupPath}" is not under this node's pod cgroups (${edge.podsCgroup})`);
  if (edge.netnsDir !== undefined && relative(edge.netnsDir, netnsPath).includes('/')) throw new PodFieldInvalid('netnsPath', `"${netnsPath}" is not a network namespace of the runtime (${edge.netnsDir}/NAME)`);
  if (edge.netnsDir !== undefined && !strictlyUnder(edge.netnsDir, netnsPath)) throw new PodFieldInvalid('netnsPath', `"${netnsPath}" is not a network namespace of the runtime (${edge.netnsDir}/NAME)`);
  return Object.freeze({ uid, name, namespace, serviceAccount, labels: Object.freeze({ ...(labels as Record<string, string>) }), ip4, ip6, netnsPath, cgroupPath });
}
