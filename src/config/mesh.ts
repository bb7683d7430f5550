/**
 * Namespaces (their labels decide enrollment) and the mesh-wide settings of the `nodemesh`
 * ConfigMap (design.md section 5), validated like every other object.
 */
import { DNS1123_LABEL, type Json } from './fields.js';
import { ObjectInvalid, parseMetadata } from './service.js';

export const ENABLED_LABEL = 'nodemesh.io/enabled';
export const CAPTURE_LABEL = 'nodemesh.io/capture';
export const MESH_CONFIG_NAME = 'nodemesh';
/**
 * Istio's root namespace: PeerAuthentications and AuthorizationPolicies here apply mesh-wide
 * (their selectors, if any, to workloads of every namespace). Where nodemesh itself is installed.
 */
export const ROOT_NAMESPACE = 'nodemesh-system';

/** The mesh-wide default of PeerAuthentication's mode, where no policy says otherwise. */
export type DefaultMtlsMode = 'PERMISSIVE' | 'STRICT' | 'DISABLE';
const DEFAULT_MTLS_MODES: ReadonlyArray<DefaultMtlsMode> = ['PERMISSIVE', 'STRICT', 'DISABLE'];

export function isDefaultMtlsMode(v: unknown): v is DefaultMtlsMode {
  return (DEFAULT_MTLS_MODES as ReadonlyArray<unknown>).includes(v);
}

export interface Namespace {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
}

export interface MeshSettings {
  /** all: every pod unless it or its namespace opts out; opt-in: only namespaces labelled nodemesh.io/enabled=true. */
  readonly enrollment: 'all' | 'opt-in';
  /** Refuse connections from pods the agent has not yet verified (they would escape the mesh). */
  readonly failClosedEnrollment: boolean;
  /** The SPIFFE trust domain of workload identities (spiffe://<trust-domain>/ns/<ns>/sa/<sa>). */
  readonly trustDomain: string;
  /** Inbound mTLS where no PeerAuthentication (workload, namespace, root namespace) sets a mode. */
  readonly mtlsMode: DefaultMtlsMode;
  /**
   * Which source namespaces' HTTP requests get an access log line each (data.accessLog: "off",
   * "on", or namespaces separated by commas): [] none, ['*'] all.
   */
  readonly accessLog: ReadonlyArray<string>;
}

export const DEFAULT_MESH: MeshSettings = { enrollment: 'all', failClosedEnrollment: false, trustDomain: 'cluster.local', mtlsMode: 'PERMISSIVE', accessLog: [] };

/** Whether requests from pods of `namespace` are logged one line each. */
export function logsAccess(mesh: Pick<MeshSettings, 'accessLog'>, namespace: string): boolean {
  return mesh.accessLog.includes('*') || mesh.accessLog.includes(namespace);
}

/** data.accessLog as the list MeshSettings holds; throws naming the field. */
export function parseAccessLog(v: unknown): string[] {
  if (v === undefined || v === 'off' || v === '') return [];
  if (v === 'on') return ['*'];
  if (typeof v !== 'string') throw new ObjectInvalid('data.accessLog', 'data.accessLog must be "on", "off" or namespaces separated by commas');
  const names = v.split(',').map((n) => n.trim());
  const bad = names.find((n) => !DNS1123_LABEL.test(n) || n.length > 63);
  if (bad !== undefined) throw new ObjectInvalid('data.accessLog', `data.accessLog: "${bad.slice(0, 70)}" is not a namespace name (give "on", "off" or namespaces separated by commas)`);
  return [...new Set(names)].sort();
}

/** SPIFFE trust domain names: lowercase letters, digits, ".", "-" and "_". */
export const TRUST_DOMAIN = /^[a-z0-9._-]{1,255}$/;

export function parseNamespace(doc: Json): Namespace {
  for (const key of Object.keys(doc)) {
    if (!['apiVersion', 'kind', 'metadata', 'spec', 'status'].includes(key)) throw new ObjectInvalid(key, `unknown field "${key}"`);
  }
  const meta = doc['metadata'] as Json | undefined;
  const { name } = parseMetadata({ ...meta, namespace: undefined });
  const labels = (meta?.['labels'] ?? {}) as Record<string, string>;
  return { name, labels };
}

/** The `nodemesh` ConfigMap's data. Other ConfigMaps are not the mesh's business. */
export function parseMeshConfig(doc: Json): MeshSettings {
  const data = (doc['data'] ?? {}) as Json;
  if (typeof data !== 'object' || data === null || Array.isArray(data)) throw new ObjectInvalid('data', 'data must be a mapping');
  for (const key of Object.keys(data)) {
    if (!['enrollment', 'failClosedEnrollment', 'trustDomain', 'mtlsMode', 'accessLog'].includes(key)) throw new ObjectInvalid(`data.${key}`, `unknown setting "data.${key}" (known: enrollment, failClosedEnrollment, trustDomain, mtlsMode, accessLog)`);
  }
  const enrollment = data['enrollment'] ?? DEFAULT_MESH.enrollment;
  if (enrollment !== 'all' && enrollment !== 'opt-in') throw new ObjectInvalid('data.enrollment', `data.enrollment "${String(enrollment)}" must be "all" or "opt-in"`);
  const failClosed = data['failClosedEnrollment'] ?? 'false';
  if (failClosed !== 'true' && failClosed !== 'false') {
    throw new ObjectInvalid('data.failClosedEnrollment', `data.failClosedEnrollment "${String(failClosed)}" must be "true" or "false" (a quoted string, as ConfigMap data is)`);
  }
  const trustDomain = data['trustDomain'] ?? DEFAULT_MESH.trustDomain;
  if (typeof trustDomain !== 'string' || !TRUST_DOMAIN.test(trustDomain)) {
    throw new ObjectInvalid('data.trustDomain', `data.trustDomain "${String(trustDomain)}" is not a SPIFFE trust domain (lowercase letters, digits, ".", "-" and "_")`);
  }
  const mtlsMode = data['mtlsMode'] ?? DEFAULT_MESH.mtlsMode;
  if (!isDefaultMtlsMode(mtlsMode)) throw new ObjectInvalid('data.mtlsMode', `data.mtlsMode "${String(mtlsMode)}" must be one of ${DEFAULT_MTLS_MODES.join(', ')}`);
  return { enrollment, failClosedEnrollment: failClosed === 'true', trustDomain, mtlsMode, accessLog: parseAccessLog(data['accessLog']) };
}

/** Whether the agent enrolls a pod, from its labels, its namespace's labels and the mode. */
export function shouldEnroll(podLabels: Readonly<Record<string, string>>, namespace: Namespace | undefined, mesh: MeshSettings): boolean {
  if (podLabels[CAPTURE_LABEL] === 'disabled' || namespace?.labels[CAPTURE_LABEL] === 'disabled') return false;
  if (mesh.enrollment === 'all') return true;
  return namespace?.labels[ENABLED_LABEL] === 'true' || podLabels[CAPTURE_LABEL] === 'enabled';
}
