/**
 * In-pod routing for inbound delivery with the client's source address. The proxy connects to
 * the application from a transparent socket bound to the client's address and marked
 * NM_DELIVERY_MARK. With tcp_fwmark_accept the application's side of the connection inherits the
 * mark, and a policy route sends marked packets for any address to the local table, so replies
 * come back to the proxy instead of leaving the pod. No iptables: sysctls and two ip rules in
 * the pod's own network namespace, which disappear with it. disableInboundDelivery is the whole
 * inverse (a live pod leaving the mesh, `nodemesh cleanup`): rules, routes and the sysctls back
 * to the kernel's defaults for a new netns (0).
 */
import { NM_DELIVERY_MARK, NM_DELIVERY_TABLE } from './abi.js';
import { CommandFailed, run, type ExecResult } from '../shared/exec.js';

const mark = `0x${NM_DELIVERY_MARK.toString(16)}`;
const table = String(NM_DELIVERY_TABLE);

function inNetns(netnsPath: string, argv: string[]): Promise<ExecResult> {
  return run('nsenter', [`--net=${netnsPath}`, ...argv]);
}

/** An address of a pod's interfaces (its own, link-local ones included). */
export interface PodAddress {
  readonly family: 4 | 6;
  readonly address: string;
  /** The interface's index in the pod's netns (the scope of a link-local address). */
  readonly ifindex: number;
}

/**
 * Sets up inbound delivery in the pod's netns and returns every non-loopback address the pod has
 * there (the pod IPs, and link-local ones such as eth0's fe80::): sk_lookup must steer all of
 * them, or a connection to the one it does not know reaches the application around the proxy.
 */
export async function enableInboundDelivery(netnsPath: string): Promise<PodAddress[]> {
  // One child process of the agent per pod (it was seven, one per step): the steps run in one
  // shell inside the pod's netns.
  // fwmark_reflect: a reset the kernel sends for a port nothing listens on carries the SYN's mark
  // too, so it reaches the proxy's transparent socket (an immediate ECONNREFUSED) instead of
  // leaving the pod for the real client address and the proxy waiting out its connect timeout.
  // Added only when absent: re-enrolling a pod must not stack duplicate rules, and the rule must
  // never be missing while the pod is served (a del-then-add left a window in which replies of
  // connections being delivered left the pod: an agent taking the node over re-enrolls under load).
  const rule = `fwmark ${mark} lookup ${table} pref ${table}`;
  const script = [
    'set -e',
    // The runtime brings lo up (containerd runs the loopback plugin before the pod's network),
    // but a pod handed over by another runtime may not have it yet: the local table needs it.
    'ip link set lo up',
    'echo 1 > /proc/sys/net/ipv4/tcp_fwmark_accept',
    'echo 1 > /proc/sys/net/ipv4/fwmark_reflect',
    'echo 1 > /proc/sys/net/ipv6/fwmark_reflect',
    `[ -n "$(ip -4 rule show ${rule})" ] || ip -4 rule add ${rule}`,
    `[ -n "$(ip -6 rule show ${rule})" ] || ip -6 rule add ${rule}`,
    `ip -4 route replace local 0.0.0.0/0 dev lo table ${table}`,
    `ip -6 route replace local ::/0 dev lo table ${table}`,
    'ip -j addr show',
  ].join('\n');
  const result = await inNetns(netnsPath, ['sh', '-c', script]);
  return parseAddresses(result.stdout);
}

/** `ip -j addr show` -> the non-loopback addresses. */
export function parseAddresses(json: string): PodAddress[] {
  let links: unknown;
  try {
    links = JSON.parse(json);
  } catch {
    return [];
  }
  const out: PodAddress[] = [];
  for (const link of Array.isArray(links) ? (links as Array<{ ifindex?: number; ifname?: string; addr_info?: Array<{ family?: string; local?: string }> }>) : []) {
    if (link.ifname === 'lo') continue;
    const ifindex = link.ifindex ?? 0;
    for (const a of link.addr_info ?? []) {
      if (typeof a.local !== 'string') continue;
      if (a.family === 'inet' && !a.local.startsWith('127.')) out.push({ family: 4, address: a.local, ifindex });
      else if (a.family === 'inet6' && a.local !== '::1') out.push({ family: 6, address: a.local, ifindex });
    }
  }
  return out;
}

/** The sysctls enableInboundDelivery sets to 1; 0 is their default in a new network namespace. */
const DELIVERY_SYSCTLS = ['net/ipv4/tcp_fwmark_accept', 'net/ipv4/fwmark_reflect', 'net/ipv6/fwmark_reflect'] as const;

/**
 * Removes what enableInboundDelivery set in the pod's netns. Resolves true if anything was there
 * to remove (a rule, a route, a sysctl not at 0), so a caller can report what it changed and a
 * second call is a no-op that says so.
 */
export async function disableInboundDelivery(netnsPath: string): Promise<boolean> {
  const rule = `fwmark ${mark} lookup ${table} pref ${table}`;
  // Each step on its own: whatever is already gone, the rest is still removed. The rule goes
  // last: while any of this is left, the rule is too (inboundDeliveryRouted finds it). A rule
  // is deleted until none is left, in case an older build stacked duplicates.
  const script = [
    'changed=0',
    ...DELIVERY_SYSCTLS.map((s) => `f=/proc/sys/${s}; if [ -w "$f" ] && [ "$(cat "$f")" != 0 ]; then echo 0 > "$f" && changed=1; fi`),
    `ip -4 route del local 0.0.0.0/0 dev lo table ${table} 2>/dev/null && changed=1`,
    `ip -6 route del local ::/0 dev lo table ${table} 2>/dev/null && changed=1`,
    `while ip -4 rule del ${rule} 2>/dev/null; do changed=1; done`,
    `while ip -6 rule del ${rule} 2>/dev/null; do changed=1; done`,
    'echo "changed=$changed"',
  ].join('\n');
  try {
    const result = await inNetns(netnsPath, ['sh', '-c', script]);
    return result.stdout.includes('changed=1');
  } catch (e) {
    // nsenter itself failed: the netns is gone, and what was set in it with it.
    if (e instanceof CommandFailed) return false;
    throw e;
  }
}

/** Whether the pod's netns has nodemesh's delivery rule (enableInboundDelivery ran there). */
export async function inboundDeliveryRouted(netnsPath: string): Promise<boolean> {
  try {
    const result = await inNetns(netnsPath, ['sh', '-c', 'ip -4 rule show; ip -6 rule show']);
    return new RegExp(`fwmark ${mark} lookup ${table}\\b`).test(result.stdout);
  } catch (e) {
    if (e instanceof CommandFailed) return false;
    throw e;
  }
}
