/**
 * Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, Istio's
 * form of a SPIFFE ID. One per (namespace, service account); every pod running as that service
 * account shares it.
 */
import { TRUST_DOMAIN } from '../config/mesh.js';
import { DNS_LABEL, DNS_SUBDOMAIN } from '../shared/names.js';

export interface WorkloadIdentity {
  readonly trustDomain: string;
  readonly namespace: string;
  readonly serviceAccount: string;
}

/** A SPIFFE ID that is not a workload identity of this mesh's form, with what is wrong. */
export class IdentityInvalid extends Error {
  constructor(
    readonly uri: string,
    readonly why: string,
  ) {
    super(`"${uri.slice(0, 200)}" is not a workload identity: ${why}`);
    this.name = 'IdentityInvalid';
  }
}

export function isTrustDomain(value: string): boolean {
  return TRUST_DOMAIN.test(value);
}

export function spiffeUri(id: WorkloadIdentity): string {
  return `spiffe://${id.trustDomain}/ns/${id.namespace}/sa/${id.serviceAccount}`;
}

/** The identity a SPIFFE ID names; throws IdentityInvalid for anything but spiffe://TD/ns/NS/sa/SA. */
export function parseSpiffeUri(uri: string): WorkloadIdentity {
  if (uri.length > 2048) throw new IdentityInvalid(uri, 'longer than 2048 characters');
  const m = /^spiffe:\/\/([^/]+)\/ns\/([^/]+)\/sa\/([^/]+)$/.exec(uri);
  if (!m) throw new IdentityInvalid(uri, 'expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>');
  const [, trustDomain = '', namespace = '', serviceAccount = ''] = m;
  if (!isTrustDomain(trustDomain)) throw new IdentityInvalid(uri, `trust domain "${trustDomain}" is not lowercase letters, digits, ".", "-" and "_"`);
  if (namespace.length > 63 || !DNS_LABEL.test(namespace)) throw new IdentityInvalid(uri, `namespace "${namespace}" is not a DNS-1123 label`);
  if (serviceAccount.length > 253 || !DNS_SUBDOMAIN.test(serviceAccount)) throw new IdentityInvalid(uri, `service account "${serviceAccount}" is not a DNS-1123 subdomain`);
  return { trustDomain, namespace, serviceAccount };
}

/** namespace/service-account: how the mesh keys identities within its trust domain. */
export const identityKey = (namespace: string, serviceAccount: string): string => `${namespace}/${serviceAccount}`;
