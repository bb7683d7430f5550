/**
 * In-pod routing for inbound delivery with the client's source address. The proxy connects to
 * the application from a transparent socket bound to the client's address and marked
 * NM_DELIVERY_MARK. With tcp_fwmark_accept the application's side of the connection inherits the
 * mark, and a policy route sends marked packets for any address to the local table, so replies
 * come back to the proxy instead of leaving the pod. No iptables: sysctls and two ip rules in
 * the pod's own network namespace, which disappear with it.
 */
import { NM_DELIVERY_MARK, NM_DELIVERY_TABLE } from './abi.js';
import { CommandFailed, run } from '../../runtime/exec.js';

const mark = `0x${NM_DELIVERY_MARK.toString(16)}`;
const table = String(NM_DELIVERY_TABLE);

function inNetns(netnsPath: string, argv: string[]): Promise<unknown> {
  return run('nsenter', [`--net=${netnsPath}`, ...argv]);
}

async function ignoreMissing(p: Promise<unknown>): Promise<void> {
  try {
    await p;
  } catch (e) {
    if (!(e instanceof CommandFailed)) throw e;
  }
}

export async function enableInboundDelivery(netnsPath: string): Promise<void> {
  // One child process of the agent per pod (it was seven, one per step): the steps run in one
  // shell inside the pod's netns.
  // fwmark_reflect: a reset the kernel sends for a port nothing listens on carries the SYN's mark
  // too, so it reaches the proxy's transparent socket (an immediate ECONNREFUSED) instead of
  // leaving the pod for the real client address and the proxy waiting out its connect timeout.
  // del before add keeps it idempotent: re-enrolling a pod must not stack duplicate rules.
  const rule = `fwmark ${mark} lookup ${table} pref ${table}`;
  const script = [
    'set -e',
    'echo 1 > /proc/sys/net/ipv4/tcp_fwmark_accept',
    'echo 1 > /proc/sys/net/ipv4/fwmark_reflect',
    'echo 1 > /proc/sys/net/ipv6/fwmark_reflect',
    `ip -4 rule del ${rule} 2>/dev/null || true`,
    `ip -6 rule del ${rule} 2>/dev/null || true`,
    `ip -4 rule add ${rule}`,
    `ip -6 rule add ${rule}`,
    `ip -4 route replace local 0.0.0.0/0 dev lo table ${table}`,
    `ip -6 route replace local ::/0 dev lo table ${table}`,
  ].join('\n');
  await inNetns(netnsPath, ['sh', '-c', script]);
}

export async function disableInboundDelivery(netnsPath: string): Promise<void> {
  const rule = `fwmark ${mark} lookup ${table} pref ${table}`;
  // Each step on its own: whatever is already gone, the rest is still removed.
  const script = [
    `ip -4 rule del ${rule} 2>/dev/null`,
    `ip -6 rule del ${rule} 2>/dev/null`,
    `ip -4 route del local 0.0.0.0/0 dev lo table ${table} 2>/dev/null`,
    `ip -6 route del local ::/0 dev lo table ${table} 2>/dev/null`,
    'true',
  ].join('\n');
  await ignoreMissing(inNetns(netnsPath, ['sh', '-c', script]));
}
