/** The shapes of names that become paths, map keys or identities: checked at every edge. */

/** A Kubernetes uid (RFC 4122 text, lower case): the only thing allowed to name a pod's pin folder. */
export const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** An RFC 1123 label: namespaces, service accounts, node names. */
export const DNS_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

/** An RFC 1123 subdomain (its length, at most 253, is the caller's to check): pod names, service accounts, label key prefixes. */
export const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

/** "NAMESPACE/NAME" of a namespaced Kubernetes object (a DNS-1123 label, then a subdomain), or undefined when it is not one. */
export function parseNamespacedName(value: string): { namespace: string; name: string } | undefined {
  const [namespace = '', name = '', ...rest] = value.split('/');
  if (rest.length > 0 || !DNS_LABEL.test(namespace) || name.length > 253 || !DNS_SUBDOMAIN.test(name)) return undefined;
  return { namespace, name };
}

/** A Kubernetes node name: a DNS-1123 subdomain. It names a cgroup, a bpffs folder and a run folder. */
export function isNodeName(value: string): boolean {
  return value.length <= 253 && DNS_SUBDOMAIN.test(value);
}
