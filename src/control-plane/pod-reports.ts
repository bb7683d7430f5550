/**
 * What the control plane believes of a node's pod report (design.md section 11: a node is believed
 * only about itself). A pod is kept only if its fields have the shapes the mesh uses, its uid is
 * not another pod's, its addresses are not another node's pod's, and its name does not shadow a
 * pod another node reported. What is dropped is named, counted and logged; the rest of the report
 * applies, so one bad entry does not take a node's good pods out of the mesh.
 */
import { isIP } from 'node:net';

import type { WireWorkload } from '../protocol/discovery.js';
import type { AddressRanges } from '../shared/address.js';
import { DNS_LABEL, DNS_SUBDOMAIN } from '../shared/names.js';

export type PodReportReason = 'invalid' | 'duplicate_uid' | 'address_taken' | 'address_out_of_range' | 'name_taken';

export interface CheckedReport {
  readonly pods: ReadonlyArray<WireWorkload>;
  readonly dropped: ReadonlyArray<{ readonly pod: string; readonly reason: PodReportReason; readonly message: string }>;
}

function invalid(p: WireWorkload): string | undefined {
  if (typeof p.uid !== 'string' || p.uid.length === 0 || p.uid.length > 128) return 'uid must be 1-128 characters';
  if (typeof p.namespace !== 'string' || !DNS_LABEL.test(p.namespace) || p.namespace.length > 63) return `namespace "${String(p.namespace).slice(0, 80)}" is not a DNS-1123 label`;
  if (typeof p.name !== 'string' || !DNS_SUBDOMAIN.test(p.name) || p.name.length > 253) return `name "${String(p.name).slice(0, 80)}" is not a DNS-1123 subdomain`;
  if (typeof p.serviceAccount !== 'string' || !DNS_SUBDOMAIN.test(p.serviceAccount) || p.serviceAccount.length > 253) return `service account "${String(p.serviceAccount).slice(0, 80)}" is not a DNS-1123 subdomain`;
  if (p.ip4 && isIP(p.ip4) !== 4) return `ip4 "${String(p.ip4).slice(0, 80)}" is not an IPv4 address`;
  if (p.ip6 && isIP(p.ip6) !== 6) return `ip6 "${String(p.ip6).slice(0, 80)}" is not an IPv6 address`;
  if (!p.ip4 && !p.ip6) return 'a pod needs an address';
  if (p.tunnel && p.tunnel !== 'HBONE') return `tunnel "${String(p.tunnel).slice(0, 20)}" is not HBONE or empty`;
  return undefined;
}

/**
 * Checks `node`'s report against what the other nodes reported (`others`: node -> its pods, as
 * believed) and the address ranges the node may claim (undefined: any). Within the report, the
 * first of two pods with one uid, address or name is kept.
 */
export function checkPodReport(node: string, report: ReadonlyArray<WireWorkload>, others: ReadonlyMap<string, ReadonlyArray<WireWorkload>>, ranges?: AddressRanges): CheckedReport {
  const uids = new Map<string, string>();
  const addresses = new Map<string, string>();
  const names = new Map<string, string>();
  for (const [other, pods] of others) {
    if (other === node) continue;
    for (const p of pods) {
      uids.set(p.uid, other);
      for (const a of [p.ip4, p.ip6]) if (a) addresses.set(a, other);
      names.set(`${p.namespace}/${p.name}`, other);
    }
  }
  const kept: WireWorkload[] = [];
  const dropped: Array<{ pod: string; reason: PodReportReason; message: string }> = [];
  for (const p of report) {
    const id = `${String(p.namespace).slice(0, 63)}/${String(p.name).slice(0, 253)}`;
    const bad = invalid(p);
    if (bad) {
      dropped.push({ pod: id, reason: 'invalid', message: bad });
      continue;
    }
    const outside = ranges && [p.ip4, p.ip6].find((a) => a && !ranges.has(a));
    if (outside) {
      dropped.push({ pod: id, reason: 'address_out_of_range', message: `address ${outside} is outside the pod ranges node ${node} may claim (${ranges.cidrs.join(', ')})` });
      continue;
    }
    const uidOwner = uids.get(p.uid);
    if (uidOwner !== undefined) {
      dropped.push({ pod: id, reason: 'duplicate_uid', message: `uid ${p.uid} is a pod of ${uidOwner === node ? 'this report already' : `node ${uidOwner}`}` });
      continue;
    }
    const taken = [p.ip4, p.ip6].find((a) => a && addresses.has(a));
    if (taken) {
      const owner = addresses.get(taken);
      dropped.push({ pod: id, reason: 'address_taken', message: `address ${taken} is a pod of ${owner === node ? 'this report already' : `node ${owner}`}` });
      continue;
    }
    const nameOwner = names.get(`${p.namespace}/${p.name}`);
    if (nameOwner !== undefined) {
      dropped.push({ pod: id, reason: 'name_taken', message: `pod ${id} is ${nameOwner === node ? 'in this report already' : `node ${nameOwner}'s`}` });
      continue;
    }
    uids.set(p.uid, node);
    for (const a of [p.ip4, p.ip6]) if (a) addresses.set(a, node);
    names.set(`${p.namespace}/${p.name}`, node);
    kept.push({ ...p, node });
  }
  return { pods: kept, dropped };
}
