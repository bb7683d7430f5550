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
  // fwmark_reflect: a reset the kernel sends for a port nothing listens on carries the SYN's mark
  // too, so it reaches the proxy's transparent socket (an immediate ECONNREFUSED) instead of
  // leaving the pod for the real client address and the proxy waiting out its connect timeout.
  await inNetns(netnsPath, [
    'sh',
    '-c',
    'echo 1 > /proc/sys/net/ipv4/tcp_fwmark_accept && echo 1 > /proc/sys/net/ipv4/fwmark_reflect && echo 1 > /proc/sys/net/ipv6/fwmark_reflect',
  ]);
  for (const [family, any] of [['-4', '0.0.0.0/0'], ['-6', '::/0']] as const) {
    // del + add keeps it idempotent: re-enrolling a pod must not stack duplicate rules.
    await ignoreMissing(inNetns(netnsPath, ['ip', family, 'rule', 'del', 'fwmark', mark, 'lookup', table, 'pref', table]));
    await inNetns(netnsPath, ['ip', family, 'rule', 'add', 'fwmark', mark, 'lookup', table, 'pref', table]);
    await inNetns(netnsPath, ['ip', family, 'route', 'replace', 'local', any, 'dev', 'lo', 'table', table]);
  }
}

export async function disableInboundDelivery(netnsPath: string): Promise<void> {
  for (const [family, any] of [['-4', '0.0.0.0/0'], ['-6', '::/0']] as const) {
    await ignoreMissing(inNetns(netnsPath, ['ip', family, 'rule', 'del', 'fwmark', mark, 'lookup', table, 'pref', table]));
    await ignoreMissing(inNetns(netnsPath, ['ip', family, 'route', 'del', 'local', any, 'dev', 'lo', 'table', table]));
  }
}
