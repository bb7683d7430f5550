/**
 * Kubernetes Services, validated once at the edge into immutable values (design.md section 5).
 * Unknown fields are errors, so a typo never silently changes routing.
 */
import { isIP } from 'node:net';

import { DNS1123_LABEL, ObjectInvalid, object, only, type Json } from './fields.js';

export interface ServicePort {
  readonly name: string;
  readonly port: number;
  readonly targetPort: number;
  readonly protocol: 'TCP';
  /** spec.ports[].appProtocol as written ('' when absent). */
  readonly appProtocol: string;
}

/**
 * What a Service port speaks, Istio's way: its appProtocol, else its name ("http", "http-web",
 * "grpc-api"); 'unknown' when neither says (sniffed later), 'opaque' for anything the proxy
 * does not terminate (tcp, tls, https, databases).
 */
export type PortProtocol = 'http' | 'http2' | 'grpc' | 'opaque' | 'unknown';

const PROTOCOLS: Record<string, PortProtocol> = { http: 'http', http2: 'http2', h2c: 'http2', 'kubernetes.io/h2c': 'http2', grpc: 'grpc', 'grpc-web': 'http' };

export function portProtocol(p: Pick<ServicePort, 'name' | 'appProtocol'>): PortProtocol {
  const named = (v: string): PortProtocol | undefined => (v === '' ? undefined : (PROTOCOLS[v.toLowerCase()] ?? 'opaque'));
  if (p.appProtocol !== '') return named(p.appProtocol) ?? 'unknown';
  const prefix = p.name.split('-')[0] ?? '';
  return PROTOCOLS[prefix.toLowerCase()] ?? (['tcp', 'tls', 'https', 'mongo', 'mysql', 'redis'].includes(prefix.toLowerCase()) ? 'opaque' : 'unknown');
}

/** Whether the proxy can read requests on the port: HTTP/1.1, or HTTP/2 (h2c with prior knowledge, gRPC). */
export function speaksRequests(p: Pick<ServicePort, 'name' | 'appProtocol'>): 'http1' | 'http2' | undefined {
  const proto = portProtocol(p);
  return proto === 'http' ? 'http1' : proto === 'http2' || proto === 'grpc' ? 'http2' : undefined;
}

export interface Service {
  readonly name: string;
  readonly namespace: string;
  readonly clusterIPs: ReadonlyArray<string>;
  readonly ports: ReadonlyArray<ServicePort>;
  /** Pods whose labels contain all of these are endpoints. */
  readonly selector: Readonly<Record<string, string>>;
  /**
   * Namespaces whose pods may see this Service (Istio's `networking.istio.io/exportTo`
   * annotation: "*" every namespace, "." its own, or names). The control plane sends a Service
   * only to nodes running pods of those namespaces.
   */
  readonly exportTo: ReadonlyArray<string>;
}

export const EXPORT_TO_ANNOTATION = 'networking.istio.io/exportTo';

/** Whether pods of this namespace may call the Service (its exportTo; a Service's own namespace only if listed). */
export function exportedTo(service: Pick<Service, 'exportTo'>, namespace: string): boolean {
  return service.exportTo.includes('*') || service.exportTo.includes(namespace);
}

/** Where a config problem is: file, object, field. */
export interface ConfigIssue {
  readonly file: string;
  readonly object: string;
  readonly field: string;
  readonly message: string;
}

export { ObjectInvalid };


function string(v: unknown, field: string): string {
  if (typeof v !== 'string') throw new ObjectInvalid(field, `${field} must be a string`);
  return v;
}

function port(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 65535) throw new ObjectInvalid(field, `${field} must be a port number 1-65535`);
  return v;
}

function stringMap(v: unknown, field: string): Record<string, string> {
  if (v === undefined || v === null) return {};
  const o = object(v, field);
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(o)) out[k] = string(val, `${field}.${k}`);
  return out;
}

/** Every field of Kubernetes' ObjectMeta: the API server fills several of them in. */
const OBJECT_META_FIELDS = [
  'name', 'namespace', 'labels', 'annotations', 'uid', 'resourceVersion', 'generation', 'creationTimestamp', 'managedFields',
  'generateName', 'deletionTimestamp', 'deletionGracePeriodSeconds', 'finalizers', 'ownerReferences', 'selfLink',
];

/** metadata of any object: name and namespace, the rest is allowed and ignored. */
export function parseMetadata(v: unknown): { name: string; namespace: string; annotations: Record<string, string> } {
  const m = object(v, 'metadata');
  only(m, OBJECT_META_FIELDS, 'metadata.');
  const name = string(m['name'], 'metadata.name');
  if (!DNS1123_LABEL.test(name) || name.length > 63) throw new ObjectInvalid('metadata.name', `metadata.name "${name}" must be a DNS-1123 label`);
  const namespace = m['namespace'] === undefined ? 'default' : string(m['namespace'], 'metadata.namespace');
  if (!DNS1123_LABEL.test(namespace)) throw new ObjectInvalid('metadata.namespace', `metadata.namespace "${namespace}" must be a DNS-1123 label`);
  stringMap(m['labels'], 'metadata.labels');
  return { name, namespace, annotations: stringMap(m['annotations'], 'metadata.annotations') };
}

/** Every field of a v1 ServiceSpec (so a typo is an error and an API server's object is not). */
const SERVICE_SPEC_FIELDS = [
  'type', 'clusterIP', 'clusterIPs', 'selector', 'ports', 'ipFamilies', 'ipFamilyPolicy', 'sessionAffinity', 'sessionAffinityConfig',
  'internalTrafficPolicy', 'externalTrafficPolicy', 'publishNotReadyAddresses', 'externalIPs', 'externalName', 'loadBalancerIP',
  'loadBalancerSourceRanges', 'loadBalancerClass', 'allocateLoadBalancerNodePorts', 'healthCheckNodePort', 'trafficDistribution',
];

export function parseService(doc: Json): Service {
  only(doc, ['apiVersion', 'kind', 'metadata', 'spec', 'status'], '');
  const { name, namespace, annotations } = parseMetadata(doc['metadata']);
  const exportTo = parseExportTo(annotations[EXPORT_TO_ANNOTATION], namespace);
  const spec = object(doc['spec'], 'spec');
  only(spec, SERVICE_SPEC_FIELDS, 'spec.');
  // NodePort and LoadBalancer Services have a cluster IP too: inside the mesh they are served by it.
  if (spec['type'] !== undefined && spec['type'] !== 'ClusterIP' && spec['type'] !== 'NodePort' && spec['type'] !== 'LoadBalancer') {
    throw new ObjectInvalid('spec.type', `spec.type "${String(spec['type'])}" is not supported (ClusterIP, NodePort, LoadBalancer)`);
  }
  const ips = new Set<string>();
  if (spec['clusterIP'] !== undefined) ips.add(string(spec['clusterIP'], 'spec.clusterIP'));
  if (spec['clusterIPs'] !== undefined) {
    if (!Array.isArray(spec['clusterIPs'])) throw new ObjectInvalid('spec.clusterIPs', 'spec.clusterIPs must be a list');
    spec['clusterIPs'].forEach((ip, i) => ips.add(string(ip, `spec.clusterIPs[${i}]`)));
  }
  for (const ip of ips) {
    if (isIP(ip) === 0) throw new ObjectInvalid('spec.clusterIP', `"${ip}" is not an IP address (headless Services are not supported yet)`);
  }
  if (ips.size === 0) throw new ObjectInvalid('spec.clusterIP', 'spec.clusterIP is required');
  if (!Array.isArray(spec['ports']) || spec['ports'].length === 0) throw new ObjectInvalid('spec.ports', 'spec.ports must list at least one port');
  const ports = spec['ports'].map((p: unknown, i: number): ServicePort => {
    const at = `spec.ports[${i}]`;
    const o = object(p, at);
    only(o, ['name', 'port', 'targetPort', 'protocol', 'appProtocol', 'nodePort'], `${at}.`);
    const protocol = o['protocol'] === undefined ? 'TCP' : string(o['protocol'], `${at}.protocol`);
    if (protocol !== 'TCP') throw new ObjectInvalid(`${at}.protocol`, `${at}.protocol ${protocol} is not supported (TCP only)`);
    const servicePort = port(o['port'], `${at}.port`);
    if (typeof o['targetPort'] === 'string') throw new ObjectInvalid(`${at}.targetPort`, `${at}.targetPort: named ports are not supported yet`);
    return {
      name: o['name'] === undefined ? '' : string(o['name'], `${at}.name`),
      port: servicePort,
      targetPort: o['targetPort'] === undefined ? servicePort : port(o['targetPort'], `${at}.targetPort`),
      protocol: 'TCP',
      appProtocol: o['appProtocol'] === undefined ? '' : string(o['appProtocol'], `${at}.appProtocol`),
    };
  });
  const seen = new Set<number>();
  for (const [i, p] of ports.entries()) {
    if (seen.has(p.port)) throw new ObjectInvalid(`spec.ports[${i}].port`, `port ${p.port} is listed twice`);
    seen.add(p.port);
  }
  return { name, namespace, clusterIPs: [...ips], ports, selector: stringMap(spec['selector'], 'spec.selector'), exportTo };
}

/** "*" (default), ".", "~" (nobody) or namespace names, comma-separated; "." becomes the Service's namespace. */
function parseExportTo(value: string | undefined, namespace: string): string[] {
  if (value === undefined) return ['*'];
  const field = `metadata.annotations["${EXPORT_TO_ANNOTATION}"]`;
  const items = value.split(',').map((x) => x.trim());
  if (items.includes('~')) {
    if (items.length > 1) throw new ObjectInvalid(field, `${field}: "~" (export to nobody) cannot be combined with other namespaces`);
    return [];
  }
  return [
    ...new Set(
      items.map((x) => {
        if (x === '*' || x === '.') return x === '.' ? namespace : '*';
        if (!DNS1123_LABEL.test(x)) throw new ObjectInvalid(field, `${field}: "${x}" is not "*", ".", "~" or a namespace name`);
        return x;
      }),
    ),
  ];
}
