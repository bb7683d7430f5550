/**
 * nodemesh.v1.Discovery (proto/nodemesh/v1/discovery.proto, design.md section 6): the messages as
 * TypeScript sees them (@grpc/proto-loader with camelCase fields, uint64 as number, oneofs named)
 * and the one codec between them and the config model. The proto file is the contract; this
 * module loads it, nothing copies it.
 */
import { createHash } from 'node:crypto';
import { isIP } from 'node:net';
import { join } from 'node:path';

import type { ServiceDefinition } from '@grpc/grpc-js';
import { loadSync } from '@grpc/proto-loader';

import { DEFAULT_MESH, TRUST_DOMAIN, isDefaultMtlsMode, parseAccessLog, type MeshSettings, type Namespace } from '../config/mesh.js';
import { ObjectInvalid, type Service, type ServicePort } from '../config/service.js';
import type { Workload } from '../config/snapshot.js';
import { ALL_REQUESTS, GATEWAY_API, ROUTE_KINDS, needsHttp, parseRoute, type ServiceRoute, type ValueMatch } from '../config/route.js';
import type { RouteFilter } from '../config/route-filters.js';
import { DEFAULT_SERVICE_POLICY, DURATION_BOUNDS, durationOutOfBounds, rateLimitOf, type LoadBalancing, type TrafficPolicy } from '../config/traffic-policy.js';
import type { MeshConfig } from '../config/store.js';
import { checkAuthorizationPolicy, checkPeerAuthentication, ruleNeedsRequest, tcpReading, type AuthorizationPolicy, type AuthorizationRule, type ConditionKey, type MtlsMode, type PeerAuthentication } from '../config/security.js';
import { compareStrings } from '../shared/order.js';
import { PACKAGE_ROOT } from '../shared/paths.js';

export const PROTO_FILE = join(PACKAGE_ROOT, 'proto', 'nodemesh', 'v1', 'discovery.proto');
/** What an agent of this build understands (Hello.capabilities). */
export const CAPABILITIES = ['Service', 'Workload', 'TrafficPolicy', 'Route', 'MeshSettings', 'Namespace', 'PeerAuthentication', 'AuthorizationPolicy', 'TrustBundle'] as const;
/**
 * The name the control plane's serving certificate carries for agents that dial it by address
 * (TLS sends no IP address as SNI): its Service's in-cluster name.
 */
export const CONTROL_PLANE_TLS_NAME = 'nodemesh-control-plane.nodemesh-system.svc';
/** Largest message either side accepts: a node's view of a big mesh fits, a runaway one does not. */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

export interface WireServicePort {
  name: string;
  port: number;
  targetPort: number;
  protocol: string;
  appProtocol: string;
}
export interface WireService {
  namespace: string;
  name: string;
  clusterIps: string[];
  ports: WireServicePort[];
  selector: Record<string, string>;
  exportTo: string[];
}
export interface WireWorkload {
  uid: string;
  namespace: string;
  name: string;
  serviceAccount: string;
  labels: Record<string, string>;
  ip4: string;
  ip6: string;
  node: string;
  /** "HBONE" or "" (proto3 default). */
  tunnel?: string;
}
export interface WireTrafficPolicy {
  namespace: string;
  name: string;
  services: string[];
  loadBalancing: string;
  maxConnections: number;
  connectTimeoutMs?: number | null;
  idleTimeoutMs?: number | null;
  consecutiveConnectErrors: number;
  baseEjectionMs: number;
  maxEjectionPercent: number;
  retryBudgetPercent?: number | null;
  minRetryConcurrency?: number | null;
  consecutiveServerErrors: number;
  consecutiveGatewayErrors: number;
  intervalMs?: number | null;
  fault?: { delayPercent?: number | null; delayMs: number; abortPercent?: number | null; abortStatus: number } | null;
  maxPendingRequests?: number | null;
  maxRequestsPerConnection: number;
  hashHeader: string;
  hashCookie: string;
  hashCookieTtlMs?: number | null;
  hashSourceIp: boolean;
  rateLimitTotal?: number | null;
  rateLimitIdentity?: number | null;
  /** Absent from a control plane that predates route targets. */
  routes?: string[];
}
export interface WireRouteRef {
  namespace: string;
  name: string;
  port?: number | null;
  weight: number;
  filters: WireRouteFilter[];
}
export interface WireHeaderChanges {
  set: Array<{ name: string; value: string }>;
  add: Array<{ name: string; value: string }>;
  remove: string[];
}
export interface WireRouteFilter {
  type: string;
  headers?: WireHeaderChanges | null;
  hostname: string;
  pathType: string;
  path: string;
  scheme: string;
  port?: number | null;
  statusCode: number;
  mirror?: WireRouteRef | null;
  percent: number;
}
export interface WireValueMatch {
  type: string;
  name: string;
  value: string;
}
export interface WireRouteMatch {
  pathType: string;
  path: string;
  method: string;
  headers: WireValueMatch[];
  queryParams: WireValueMatch[];
  grpcType?: string;
  grpcService?: string;
  grpcMethod?: string;
}
export interface WireRouteRule {
  name: string;
  matches: WireRouteMatch[];
  backends: WireRouteRef[];
  requestTimeoutMs?: number | null;
  backendRequestTimeoutMs?: number | null;
  retry?: { attempts: number; codes: number[]; backoffMs: number } | null;
  filters: WireRouteFilter[];
}
export interface WireRoute {
  kind: string;
  namespace: string;
  name: string;
  parents: WireRouteRef[];
  /** Only for a route that does not match requests (agents before `rules` read it). */
  backends: WireRouteRef[];
  rules: WireRouteRule[];
}
export interface WireMeshSettings {
  enrollment: string;
  failClosedEnrollment: boolean;
  trustDomain: string;
  /** '' (proto3 default) is PERMISSIVE. */
  mtlsMode?: string;
  /** Absent from a control plane that predates it: off. */
  accessLog?: string[];
}
export interface WirePeerAuthentication {
  namespace: string;
  name: string;
  selector: Record<string, string>;
  mode: string;
  portModes: Record<string, string>;
}
export interface WireAuthorizationRule {
  from: Array<{ principals: string[]; notPrincipals: string[]; namespaces: string[]; notNamespaces: string[]; ipBlocks: string[]; notIpBlocks: string[]; serviceAccounts: string[]; notServiceAccounts: string[] }>;
  /** The request fields are absent from a control plane that predates them. */
  to: Array<{ ports: number[]; notPorts: number[]; hosts?: string[]; notHosts?: string[]; methods?: string[]; notMethods?: string[]; paths?: string[]; notPaths?: string[] }>;
  when: Array<{ key: string; values: string[]; notValues: string[] }>;
}
export interface WireAuthorizationPolicy {
  namespace: string;
  name: string;
  selector: Record<string, string>;
  action: string;
  rules: WireAuthorizationRule[];
  /** Absent from a control plane that predates request attributes. */
  requestRules?: WireAuthorizationRule[];
}
export interface WireNamespace {
  name: string;
  labels: Record<string, string>;
}
export interface WireResource {
  service?: WireService;
  workload?: WireWorkload;
  trafficPolicy?: WireTrafficPolicy;
  route?: WireRoute;
  mesh?: WireMeshSettings;
  namespace?: WireNamespace;
  peerAuthentication?: WirePeerAuthentication;
  authorizationPolicy?: WireAuthorizationPolicy;
  trustBundle?: { roots: string[] };
  resource?: 'service' | 'workload' | 'trafficPolicy' | 'route' | 'mesh' | 'namespace' | 'peerAuthentication' | 'authorizationPolicy' | 'trustBundle';
}
export interface WireConfigError {
  object: string;
  field: string;
  message: string;
}
export interface WireSnapshot {
  version: number;
  digest: string;
  resources: WireResource[];
}
export interface WireHello {
  node: string;
  agentVersion: string;
  capabilities: string[];
  version: number;
  digest: string;
}
export interface AgentMessage {
  hello?: WireHello;
  ack?: { version: number };
  nack?: { version: number; errors: WireConfigError[] };
  pods?: { pods: WireWorkload[] };
  message?: 'hello' | 'ack' | 'nack' | 'pods';
}
export interface WireResourceKey {
  kind: string;
  namespace: string;
  name: string;
}
export interface WireDelta {
  version: number;
  baseVersion: number;
  digest: string;
  upserts: WireResource[];
  removals: WireResourceKey[];
}
export interface ControlPlaneMessage {
  snapshot?: WireSnapshot;
  delta?: WireDelta;
  message?: 'snapshot' | 'delta';
}

/** Certificates.Sign: a CSR from the agent of `node`, and what the CA answers. */
export interface SignRequest {
  csr: string;
  node: string;
}
export interface SignResponse {
  certChain: string[];
  roots: string[];
}

let loaded: ReturnType<typeof loadSync> | undefined;

function service(name: 'Discovery' | 'Certificates'): ServiceDefinition {
  loaded ??= loadSync(PROTO_FILE, { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true });
  return loaded[`nodemesh.v1.${name}`] as ServiceDefinition;
}

/** The Discovery service definition, loaded from the proto file once. */
export function discoveryService(): ServiceDefinition {
  return service('Discovery');
}

/** The Certificates service definition (the CA's Sign), from the same proto file. */
export function certificatesService(): ServiceDefinition {
  return service('Certificates');
}

/**
 * A ControlPlaneMessage already encoded: the control plane sends the same Snapshot or Delta to
 * every node that needs the same, and encodes it once instead of once per stream.
 */
export class EncodedMessage {
  constructor(readonly bytes: Buffer) {}
}

export function encodeControlPlaneMessage(m: ControlPlaneMessage): EncodedMessage {
  return new EncodedMessage(discoveryService()['Stream']?.responseSerialize(m) ?? Buffer.alloc(0));
}

/** The service definition for the server side: EncodedMessages pass through the serializer as they are. */
export function discoveryServerService(): ServiceDefinition {
  const base = discoveryService();
  const stream = base['Stream'];
  if (!stream) throw new Error('internal: nodemesh.v1.Discovery has no Stream method');
  const serialize = stream.responseSerialize;
  return { ...base, Stream: { ...stream, responseSerialize: (m: ControlPlaneMessage | EncodedMessage) => (m instanceof EncodedMessage ? m.bytes : serialize(m)) } };
}

// ---- config model -> wire (control plane) ----

export function workloadToWire(w: Workload, node: string): WireWorkload {
  return { uid: w.uid, namespace: w.namespace, name: w.name, serviceAccount: w.serviceAccount, labels: { ...w.labels }, ip4: w.ip4, ip6: w.ip6, node, tunnel: w.tunnel === 'hbone' ? 'HBONE' : '' };
}

export function serviceToWire(s: Service): WireService {
  return { namespace: s.namespace, name: s.name, clusterIps: [...s.clusterIPs], ports: s.ports.map((p) => ({ ...p })), selector: { ...s.selector }, exportTo: [...s.exportTo] };
}

export function trafficPolicyToWire(t: TrafficPolicy): WireTrafficPolicy {
  const p = t.policy;
  return {
    namespace: t.namespace,
    name: t.name,
    services: [...t.services],
    routes: [...t.routes],
    loadBalancing: p.loadBalancing,
    maxConnections: p.maxConnections,
    ...(p.connectTimeoutMs === undefined ? {} : { connectTimeoutMs: p.connectTimeoutMs }),
    ...(p.idleTimeoutMs === undefined ? {} : { idleTimeoutMs: p.idleTimeoutMs }),
    consecutiveConnectErrors: p.outlier.consecutiveConnectErrors,
    baseEjectionMs: p.outlier.baseEjectionMs,
    maxEjectionPercent: p.outlier.maxEjectionPercent,
    retryBudgetPercent: p.retryBudget.percent,
    minRetryConcurrency: p.retryBudget.minRetryConcurrency,
    maxPendingRequests: p.maxPendingRequests,
    maxRequestsPerConnection: p.maxRequestsPerConnection,
    hashHeader: p.hashOn && 'header' in p.hashOn ? p.hashOn.header : '',
    hashCookie: p.hashOn && 'cookie' in p.hashOn ? p.hashOn.cookie : '',
    ...(p.hashOn && 'cookie' in p.hashOn && p.hashOn.ttlMs !== undefined ? { hashCookieTtlMs: p.hashOn.ttlMs } : {}),
    hashSourceIp: p.hashOn !== undefined && 'sourceIp' in p.hashOn,
    ...(p.rateLimit?.total === undefined ? {} : { rateLimitTotal: p.rateLimit.total }),
    ...(p.rateLimit?.identity === undefined ? {} : { rateLimitIdentity: p.rateLimit.identity }),
    consecutiveServerErrors: p.outlier.consecutive5xxErrors,
    consecutiveGatewayErrors: p.outlier.consecutiveGatewayErrors,
    intervalMs: p.outlier.intervalMs,
    ...(p.fault
      ? {
          fault: {
            ...(p.fault.delay ? { delayPercent: p.fault.delay.percent } : {}),
            delayMs: p.fault.delay?.ms ?? 0,
            ...(p.fault.abort ? { abortPercent: p.fault.abort.percent } : {}),
            abortStatus: p.fault.abort?.status ?? 0,
          },
        }
      : {}),
  };
}

/** A filter as the wire has it: every scalar set (proto3 decodes an unset one as its default, and the digest must match). */
function filterToWire(f: RouteFilter): WireRouteFilter {
  const base: WireRouteFilter = { type: f.type, hostname: '', pathType: '', path: '', scheme: '', statusCode: 0, percent: 0 };
  const pairs = (xs: ReadonlyArray<readonly [string, string]>): Array<{ name: string; value: string }> => xs.map(([name, value]) => ({ name, value }));
  switch (f.type) {
    case 'RequestHeaderModifier':
    case 'ResponseHeaderModifier':
      return { ...base, headers: { set: pairs(f.headers.set), add: pairs(f.headers.add), remove: [...f.headers.remove] } };
    case 'URLRewrite':
      return { ...base, hostname: f.hostname ?? '', pathType: f.path?.type ?? '', path: f.path?.value ?? '' };
    case 'RequestRedirect':
      return { ...base, hostname: f.hostname ?? '', pathType: f.path?.type ?? '', path: f.path?.value ?? '', scheme: f.scheme ?? '', ...(f.port === undefined ? {} : { port: f.port }), statusCode: f.statusCode };
    case 'RequestMirror':
      return { ...base, mirror: { namespace: f.backend.namespace, name: f.backend.name, port: f.backend.port, weight: 0, filters: [] }, percent: f.percent };
  }
}

/** A wire filter as Gateway API writes it: parseRoute checks it as it would the YAML. */
function filterFromWire(w: WireRouteFilter): Record<string, unknown> {
  const path = w.pathType === '' ? {} : { path: { type: w.pathType, [w.pathType === 'ReplaceFullPath' ? 'replaceFullPath' : 'replacePrefixMatch']: w.path } };
  const h = w.headers;
  const pairs = (xs: Array<{ name: string; value: string }>): Array<Record<string, string>> => xs.map((x) => ({ name: x.name, value: x.value }));
  switch (w.type) {
    case 'RequestHeaderModifier':
    case 'ResponseHeaderModifier':
      return { type: w.type, [w.type === 'RequestHeaderModifier' ? 'requestHeaderModifier' : 'responseHeaderModifier']: h ? { set: pairs(h.set), add: pairs(h.add), remove: [...h.remove] } : {} };
    case 'URLRewrite':
      return { type: w.type, urlRewrite: { ...(w.hostname === '' ? {} : { hostname: w.hostname }), ...path } };
    case 'RequestRedirect':
      return { type: w.type, requestRedirect: { statusCode: w.statusCode, ...(w.scheme === '' ? {} : { scheme: w.scheme }), ...(w.hostname === '' ? {} : { hostname: w.hostname }), ...(w.port === undefined || w.port === null ? {} : { port: w.port }), ...path } };
    case 'RequestMirror': {
      const m = w.mirror;
      // A share that is no whole percent goes as the fraction it is.
      const share = Number.isInteger(w.percent) ? { percent: w.percent } : { fraction: { numerator: Math.round(w.percent * 10_000), denominator: 1_000_000 } };
      return { type: w.type, requestMirror: { backendRef: m ? { kind: 'Service', namespace: m.namespace, name: m.name, ...(m.port === undefined || m.port === null ? {} : { port: m.port }) } : {}, ...share } };
    }
    default:
      return { type: w.type };
  }
}

export function routeToWire(r: ServiceRoute): WireRoute {
  const ref = (x: { namespace: string; name: string; port: number | undefined; filters?: ReadonlyArray<RouteFilter> }, weight: number): WireRouteRef => ({ namespace: x.namespace, name: x.name, ...(x.port === undefined ? {} : { port: x.port }), weight, filters: (x.filters ?? []).map(filterToWire) });
  const values = (ms: ReadonlyArray<ValueMatch>): WireValueMatch[] => ms.map((m) => ({ type: m.type, name: m.name, value: m.value }));
  const rules = r.rules.map(
    (rule): WireRouteRule => ({
      name: rule.name ?? '',
      // The default match is sent as none, which reads back as it.
      matches: rule.matches
        .filter((m) => m !== ALL_REQUESTS)
        .map((m) => ({
          pathType: m.path.type,
          path: m.path.value,
          method: m.method ?? '',
          headers: values(m.headers),
          queryParams: values(m.queryParams),
          ...(m.grpc ? { grpcType: m.grpc.type, grpcService: m.grpc.service ?? '', grpcMethod: m.grpc.method ?? '' } : {}),
        })),
      backends: rule.backends.map((b) => ref(b, b.weight)),
      ...(rule.timeouts?.requestMs === undefined ? {} : { requestTimeoutMs: rule.timeouts.requestMs }),
      ...(rule.timeouts?.backendRequestMs === undefined ? {} : { backendRequestTimeoutMs: rule.timeouts.backendRequestMs }),
      ...(rule.retry ? { retry: { attempts: rule.retry.attempts, codes: [...rule.retry.codes], backoffMs: rule.retry.backoffMs } } : {}),
      filters: (rule.filters ?? []).map(filterToWire),
    }),
  );
  const legacy = needsHttp(r) ? [] : (rules[0]?.backends ?? []);
  return { kind: r.kind, namespace: r.namespace, name: r.name, parents: r.parents.map((p) => ref(p, 0)), backends: legacy, rules };
}

/**
 * A route from the wire, checked as its YAML would be: it is rebuilt as a Gateway API object and
 * parsed by the same code, so the wire edge refuses what the config edge does (a bad regex, a path
 * that is not one, weights that sum to 0), the field named. A route without rules comes from a
 * control plane that predates them: its backends are the one rule.
 */
function routeFromWire(w: WireRoute): ServiceRoute {
  const ref = (x: WireRouteRef, backend: boolean): Record<string, unknown> => ({
    kind: 'Service',
    namespace: x.namespace,
    name: x.name,
    ...(x.port === undefined || x.port === null ? {} : { port: x.port }),
    ...(backend ? { weight: x.weight } : {}),
    ...(backend && x.filters.length > 0 ? { filters: x.filters.map(filterFromWire) } : {}),
  });
  const values = (ms: WireValueMatch[]): Array<Record<string, unknown>> => ms.map((m) => ({ type: m.type, name: m.name, value: m.value }));
  const rules: WireRouteRule[] = w.rules.length > 0 ? w.rules : [{ name: '', matches: [], backends: w.backends, filters: [] }];
  const grpcMatch = (m: WireRouteMatch): Record<string, unknown> => ({
    ...(m.grpcType ? { method: { type: m.grpcType, ...(m.grpcService ? { service: m.grpcService } : {}), ...(m.grpcMethod ? { method: m.grpcMethod } : {}) } } : {}),
    headers: values(m.headers),
  });
  const doc = {
    apiVersion: GATEWAY_API,
    kind: w.kind,
    metadata: { namespace: w.namespace, name: w.name },
    spec: {
      parentRefs: w.parents.map((p) => ref(p, false)),
      rules: rules.map((rule) => ({
        ...(rule.name === '' ? {} : { name: rule.name }),
        ...(rule.matches.length === 0 ? {} : { matches: rule.matches.map((m) => (w.kind === 'GRPCRoute' ? grpcMatch(m) : { path: { type: m.pathType, value: m.path }, ...(m.method === '' ? {} : { method: m.method }), headers: values(m.headers), queryParams: values(m.queryParams) })) }),
        backendRefs: rule.backends.map((b) => ref(b, true)),
        ...(rule.requestTimeoutMs || rule.backendRequestTimeoutMs
          ? { timeouts: { ...(rule.requestTimeoutMs ? { request: `${rule.requestTimeoutMs}ms` } : {}), ...(rule.backendRequestTimeoutMs ? { backendRequest: `${rule.backendRequestTimeoutMs}ms` } : {}) } }
          : {}),
        ...(rule.retry ? { retry: { attempts: rule.retry.attempts, codes: rule.retry.codes, backoff: `${rule.retry.backoffMs}ms` } } : {}),
        ...(rule.filters.length > 0 ? { filters: rule.filters.map(filterFromWire) } : {}),
      })),
    },
  };
  return parseRoute(doc);
}

export function peerAuthenticationToWire(p: PeerAuthentication): WirePeerAuthentication {
  return { namespace: p.namespace, name: p.name, selector: { ...p.selector }, mode: p.mode, portModes: { ...p.portModes } };
}

/**
 * A rule copied field for field: the wire's and the model's have one shape (the model's arrays
 * read-only, its condition keys checked by checkAuthorizationPolicy), so one copy serves both ways.
 */
function copyRule(r: WireAuthorizationRule | AuthorizationRule): Omit<WireAuthorizationRule, 'to'> & { to: Array<Required<WireAuthorizationRule['to'][number]>> } {
  return {
    from: r.from.map((f) => ({ principals: [...f.principals], notPrincipals: [...f.notPrincipals], namespaces: [...f.namespaces], notNamespaces: [...f.notNamespaces], ipBlocks: [...f.ipBlocks], notIpBlocks: [...f.notIpBlocks], serviceAccounts: [...f.serviceAccounts], notServiceAccounts: [...f.notServiceAccounts] })),
    to: r.to.map((t) => ({
      ports: [...t.ports],
      notPorts: [...t.notPorts],
      hosts: [...(t.hosts ?? [])],
      notHosts: [...(t.notHosts ?? [])],
      methods: [...(t.methods ?? [])],
      notMethods: [...(t.notMethods ?? [])],
      paths: [...(t.paths ?? [])],
      notPaths: [...(t.notPaths ?? [])],
    })),
    when: r.when.map((c) => ({ key: c.key, values: [...c.values], notValues: [...c.notValues] })),
  };
}

/**
 * A policy on the wire: `rules` is what an agent that reads no request attributes can enforce
 * (tcpReading), `requestRules` the rules as written when they differ. An agent of an older
 * build ignores the unknown field and enforces the TCP reading: never more than the policy allows.
 */
export function authorizationPolicyToWire(p: AuthorizationPolicy): WireAuthorizationPolicy {
  const needsRequests = p.rules.some(ruleNeedsRequest);
  return {
    namespace: p.namespace,
    name: p.name,
    selector: { ...p.selector },
    action: p.action,
    rules: (needsRequests ? tcpReading(p) : p.rules).map(copyRule),
    requestRules: needsRequests ? p.rules.map(copyRule) : [],
  };
}

/** A wire rule as the config model holds it (checkAuthorizationPolicy judges its keys and values after). */
function ruleFromWire(r: WireAuthorizationRule): AuthorizationRule {
  const c = copyRule(r);
  return Object.freeze({
    from: Object.freeze(c.from.map((f) => Object.freeze(f))),
    to: Object.freeze(c.to.map((t) => Object.freeze(t))),
    when: Object.freeze(c.when.map((x) => Object.freeze({ ...x, key: x.key as ConditionKey }))),
  });
}

/**
 * The resources of a config, in a canonical order (kind, namespace, name): the part every node
 * gets alike. Workloads are added per node.
 */
export function configResources(config: MeshConfig): WireResource[] {
  return [
    { mesh: { enrollment: config.mesh.enrollment, failClosedEnrollment: config.mesh.failClosedEnrollment, trustDomain: config.mesh.trustDomain, mtlsMode: config.mesh.mtlsMode, accessLog: [...config.mesh.accessLog] } },
    ...[...config.namespaces.values()].sort((a, b) => compareStrings(a.name, b.name)).map((n) => ({ namespace: { name: n.name, labels: { ...n.labels } } })),
    ...sortByKey(config.services).map((s) => ({ service: serviceToWire(s) })),
    ...sortByKey(config.trafficPolicies).map((t) => ({ trafficPolicy: trafficPolicyToWire(t) })),
    ...sortByKey(config.routes).map((r) => ({ route: routeToWire(r) })),
    ...sortByKey(config.peerAuthentications).map((p) => ({ peerAuthentication: peerAuthenticationToWire(p) })),
    ...sortByKey(config.authorizationPolicies).map((p) => ({ authorizationPolicy: authorizationPolicyToWire(p) })),
  ];
}

/** A full snapshot of a config and workloads (tests and small meshes; the control plane reuses parts). */
export function snapshotMessage(version: number, config: MeshConfig, workloads: ReadonlyArray<WireWorkload>): WireSnapshot {
  const resources = [...configResources(config), ...sortByKey(workloads).map((w) => ({ workload: w }))];
  return { version, digest: digestOf(resources), resources };
}

export function sortByKey<T extends { namespace: string; name: string }>(items: ReadonlyArray<T>): T[] {
  return [...items].sort((a, b) => compareStrings(a.namespace, b.namespace) || compareStrings(a.name, b.name));
}

/** "Kind/namespace/name", the identity of a resource in snapshots and deltas. */
export function resourceKey(r: WireResource): string {
  if (r.service) return `Service/${r.service.namespace}/${r.service.name}`;
  if (r.workload) return `Workload/${r.workload.namespace}/${r.workload.name}`;
  if (r.trafficPolicy) return `TrafficPolicy/${r.trafficPolicy.namespace}/${r.trafficPolicy.name}`;
  if (r.route) return `${r.route.kind}/${r.route.namespace}/${r.route.name}`;
  if (r.namespace) return `Namespace//${r.namespace.name}`;
  if (r.peerAuthentication) return `PeerAuthentication/${r.peerAuthentication.namespace}/${r.peerAuthentication.name}`;
  if (r.authorizationPolicy) return `AuthorizationPolicy/${r.authorizationPolicy.namespace}/${r.authorizationPolicy.name}`;
  if (r.mesh) return 'MeshSettings//nodemesh';
  if (r.trustBundle) return 'TrustBundle//mesh';
  return 'Unknown//';
}

export function keyOf(k: WireResourceKey): string {
  return `${k.kind}/${k.namespace}/${k.name}`;
}

export function keyParts(key: string): WireResourceKey {
  const [kind = '', namespace = '', ...rest] = key.split('/');
  return { kind, namespace, name: rest.join('/') };
}

const DIGEST_MOD = 1n << 256n;
/** Resources are never mutated once built: their hash is computed once per object. */
const hashes = new WeakMap<WireResource, bigint>();

/** SHA-256 of the resource's key and canonical JSON, as a number (see Snapshot.digest). */
export function resourceHash(r: WireResource): bigint {
  let h = hashes.get(r);
  if (h === undefined) {
    h = BigInt(`0x${createHash('sha256').update(`${resourceKey(r)}\n${JSON.stringify(r, canonical)}`).digest('hex')}`);
    hashes.set(r, h);
  }
  return h;
}

/** The digest of a set of resources: the sum of their hashes modulo 2^256 (order-independent). */
export function digestOf(resources: Iterable<WireResource>): string {
  let sum = 0n;
  for (const r of resources) sum += resourceHash(r);
  return digestHex(sum);
}

export function digestHex(sum: bigint): string {
  return (((sum % DIGEST_MOD) + DIGEST_MOD) % DIGEST_MOD).toString(16).padStart(64, '0');
}

/**
 * JSON with object keys sorted, so equal resources hash equally whoever built them; leaves out
 * what protobuf decoding adds (the oneof name in "resource", "_field" presence markers, nulls,
 * proto3 defaults of optional fields, and empty strings, which a sender may leave unset).
 */
function canonical(_key: string, value: unknown): unknown {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return value;
  const obj = value as Record<string, unknown>;
  return Object.fromEntries(
    Object.keys(obj)
      // '' is a string field's proto3 default: on the wire, unset and empty are the same.
      .filter((k) => k !== 'resource' && !k.startsWith('_') && obj[k] !== undefined && obj[k] !== null && obj[k] !== '')
      .sort(compareStrings)
      .map((k) => [k, obj[k]]),
  );
}

// ---- wire -> config model (agent; validated at this edge) ----

export class SnapshotInvalid extends Error {
  constructor(readonly errors: ReadonlyArray<WireConfigError>) {
    super(`snapshot rejected: ${errors.map((e) => `${e.object}${e.field ? ` ${e.field}` : ''}: ${e.message}`).join('; ')}`);
  }
}

const LOAD_BALANCING: ReadonlyArray<LoadBalancing> = ['round-robin', 'least-connections', 'random'];

export interface DecodedSnapshot {
  readonly config: MeshConfig;
  readonly workloads: ReadonlyArray<Workload>;
  /** The mesh's roots (PEM, the signing one first), when the control plane has a CA. */
  readonly trustBundle?: ReadonlyArray<string>;
}

/** One PEM certificate, no more (its contents are the identity layer's to check). */
const PEM_CERTIFICATE = /^-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----\r?\n?$/;
/** More roots than a rotation needs is a garbled bundle. */
const MAX_TRUSTED_ROOTS = 16;

/**
 * Validates and converts a snapshot for the agent. Any bad resource rejects the snapshot whole
 * (the agent Nacks it with these errors and keeps serving its last good one).
 */
export function decodeSnapshot(s: WireSnapshot): DecodedSnapshot {
  return decodeResources(s.version, s.digest, s.resources);
}

/**
 * A Delta applied to the resources the agent holds (by key): the resources after it, or an error
 * naming why it does not apply (another base version). The result is then decoded like a Snapshot.
 */
export function applyDelta(held: ReadonlyMap<string, WireResource>, heldVersion: number, d: WireDelta): Map<string, WireResource> {
  if (d.baseVersion !== heldVersion) {
    throw new SnapshotInvalid([{ object: 'Delta', field: 'baseVersion', message: `delta from version ${d.baseVersion}, but this agent holds ${heldVersion}` }]);
  }
  const next = new Map(held);
  for (const k of d.removals) next.delete(keyOf(k));
  for (const r of d.upserts) next.set(resourceKey(r), r);
  return next;
}

export function decodeResources(version: number, digest: string, resources: ReadonlyArray<WireResource>): DecodedSnapshot {
  const s = { version, digest, resources };
  const errors: WireConfigError[] = [];
  const bad = (object: string, field: string, message: string): void => void errors.push({ object, field, message });
  const seen = new Set<string>();
  const unique = (object: string): boolean => {
    if (seen.has(object)) {
      bad(object, 'metadata.name', 'appears twice in the snapshot');
      return false;
    }
    seen.add(object);
    return true;
  };
  const services: Service[] = [];
  const policies: TrafficPolicy[] = [];
  const routes: ServiceRoute[] = [];
  const workloads: Workload[] = [];
  const namespaces = new Map<string, Namespace>();
  const peerAuthentications: PeerAuthentication[] = [];
  const authorizationPolicies: AuthorizationPolicy[] = [];
  let mesh: MeshSettings = DEFAULT_MESH;
  let trustBundle: string[] | undefined;
  if (!Number.isSafeInteger(s.version) || s.version <= 0) bad('Snapshot', 'version', `version ${String(s.version)} is not a positive integer`);
  if (digestOf(s.resources) !== s.digest) bad('Snapshot', 'digest', 'the digest does not match the resources (garbled or incomplete message)');
  for (const r of s.resources) {
    if (r.service) {
      const w = r.service;
      const id = `Service ${w.namespace}/${w.name}`;
      if (!unique(id)) continue;
      if (!w.name || !w.namespace) bad(id, 'metadata.name', 'name and namespace are required');
      w.clusterIps.forEach((ip, i) => isIP(ip) === 0 && bad(id, `spec.clusterIPs[${i}]`, `"${ip}" is not an IP address`));
      if (w.ports.length === 0) bad(id, 'spec.ports', 'a Service needs at least one port');
      const ports: ServicePort[] = w.ports.map((p, i) => {
        for (const [field, v] of [['port', p.port], ['targetPort', p.targetPort]] as const) {
          if (!Number.isInteger(v) || v < 1 || v > 65535) bad(id, `spec.ports[${i}].${field}`, `${v} is not a TCP port`);
        }
        if (p.protocol !== 'TCP') bad(id, `spec.ports[${i}].protocol`, `protocol "${p.protocol}" is not supported (TCP)`);
        return { name: p.name, port: p.port, targetPort: p.targetPort, protocol: 'TCP', appProtocol: p.appProtocol };
      });
      services.push(Object.freeze({ namespace: w.namespace, name: w.name, clusterIPs: Object.freeze([...w.clusterIps]), ports: Object.freeze(ports), selector: Object.freeze({ ...w.selector }), exportTo: Object.freeze([...w.exportTo]) }));
    } else if (r.workload) {
      const w = r.workload;
      const id = `Workload ${w.namespace}/${w.name}`;
      if (!unique(id)) continue;
      if (!w.uid) bad(id, 'uid', 'a workload needs a uid');
      if (w.ip4 && isIP(w.ip4) !== 4) bad(id, 'ip4', `"${w.ip4}" is not an IPv4 address`);
      if (w.ip6 && isIP(w.ip6) !== 6) bad(id, 'ip6', `"${w.ip6}" is not an IPv6 address`);
      if (w.tunnel && w.tunnel !== 'HBONE') bad(id, 'tunnel', `"${w.tunnel.slice(0, 50)}" is not a tunnel protocol (HBONE, or empty)`);
      workloads.push(Object.freeze({ uid: w.uid, namespace: w.namespace, name: w.name, serviceAccount: w.serviceAccount, labels: Object.freeze({ ...w.labels }), ip4: w.ip4, ip6: w.ip6, ...(w.tunnel === 'HBONE' ? { tunnel: 'hbone' as const } : {}) }));
    } else if (r.trafficPolicy) {
      const w = r.trafficPolicy;
      const id = `TrafficPolicy ${w.namespace}/${w.name}`;
      if (!unique(id)) continue;
      const lb = LOAD_BALANCING.find((l) => l === w.loadBalancing);
      if (!lb) bad(id, 'spec.loadBalancer.type', `"${w.loadBalancing}" is not one of ${LOAD_BALANCING.join(', ')}`);
      if (w.maxEjectionPercent > 100) bad(id, 'spec.outlierDetection.maxEjectionPercent', `${w.maxEjectionPercent} is over 100`);
      if ((w.retryBudgetPercent ?? 0) > 100) bad(id, 'spec.retryBudget.percent', `${String(w.retryBudgetPercent)} is over 100`);
      const f = w.fault ?? undefined;
      const percentOk = (p: number | null | undefined): boolean => p === null || p === undefined || (Number.isFinite(p) && p >= 0 && p <= 100);
      if (f && (!percentOk(f.delayPercent) || !percentOk(f.abortPercent))) bad(id, 'spec.fault', 'a percentage is outside 0-100');
      if (f && f.abortPercent !== null && f.abortPercent !== undefined && (f.abortStatus < 200 || f.abortStatus > 599)) bad(id, 'spec.fault.abort.httpStatus', `${f.abortStatus} is not an HTTP status 200-599`);
      const delayBad = f && f.delayPercent !== null && f.delayPercent !== undefined ? durationOutOfBounds(f.delayMs, DURATION_BOUNDS.delayMs) : undefined;
      if (delayBad) bad(id, DURATION_BOUNDS.delayMs.field, delayBad);
      const hashes = [w.hashHeader !== '', w.hashCookie !== '', w.hashSourceIp].filter(Boolean).length;
      if (hashes > 1) bad(id, 'spec.loadBalancer.consistentHash', 'more than one of httpHeaderName, httpCookie, useSourceIp');
      const hashOn = w.hashHeader !== '' ? { header: w.hashHeader } : w.hashCookie !== '' ? { cookie: w.hashCookie, ...(w.hashCookieTtlMs === null || w.hashCookieTtlMs === undefined ? {} : { ttlMs: w.hashCookieTtlMs }) } : w.hashSourceIp ? { sourceIp: true as const } : undefined;
      const rates = [w.rateLimitTotal, w.rateLimitIdentity].map((r) => (r === null || r === undefined ? undefined : r));
      if (rates.some((r) => r !== undefined && (r < 1 || r > 1_000_000))) bad(id, 'spec.localRateLimit', 'a rate is outside 1-1000000 requests per second');
      const rateLimit = rates.some((r) => r !== undefined) ? rateLimitOf(rates[0], rates[1]) : undefined;
      for (const [i, ref] of (w.routes ?? []).entries()) if (!/^(HTTPRoute|GRPCRoute)\/[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(ref)) bad(id, `spec.targetRefs[${i}]`, `"${ref.slice(0, 80)}" is not "HTTPRoute/name" or "GRPCRoute/name"`);
      const intervalBad = w.intervalMs === null || w.intervalMs === undefined ? undefined : durationOutOfBounds(w.intervalMs, DURATION_BOUNDS.intervalMs);
      if (intervalBad) bad(id, DURATION_BOUNDS.intervalMs.field, intervalBad);
      const fault = f
        ? Object.freeze({
            ...(f.delayPercent !== null && f.delayPercent !== undefined ? { delay: { percent: f.delayPercent, ms: f.delayMs } } : {}),
            ...(f.abortPercent !== null && f.abortPercent !== undefined ? { abort: { percent: f.abortPercent, status: f.abortStatus } } : {}),
          })
        : undefined;
      for (const [key, value] of [['connectTimeoutMs', w.connectTimeoutMs], ['idleTimeoutMs', w.idleTimeoutMs], ['baseEjectionMs', w.baseEjectionMs]] as const) {
        const why = value === undefined || value === null ? undefined : durationOutOfBounds(value, DURATION_BOUNDS[key]);
        if (why) bad(id, DURATION_BOUNDS[key].field, why);
      }
      policies.push(
        Object.freeze({
          namespace: w.namespace,
          name: w.name,
          services: Object.freeze([...w.services]),
          routes: Object.freeze([...(w.routes ?? [])]),
          policy: Object.freeze({
            source: `${w.namespace}/${w.name}`,
            loadBalancing: lb ?? 'round-robin',
            ...(hashOn ? { hashOn: Object.freeze(hashOn) } : {}),
            maxConnections: w.maxConnections,
            maxPendingRequests: w.maxPendingRequests ?? DEFAULT_SERVICE_POLICY.maxPendingRequests,
            maxRequestsPerConnection: w.maxRequestsPerConnection,
            connectTimeoutMs: w.connectTimeoutMs ?? undefined,
            idleTimeoutMs: w.idleTimeoutMs ?? undefined,
            outlier: Object.freeze({
              consecutiveConnectErrors: w.consecutiveConnectErrors,
              consecutive5xxErrors: w.consecutiveServerErrors,
              consecutiveGatewayErrors: w.consecutiveGatewayErrors,
              baseEjectionMs: w.baseEjectionMs,
              maxEjectionPercent: w.maxEjectionPercent,
              intervalMs: w.intervalMs ?? DEFAULT_SERVICE_POLICY.outlier.intervalMs,
            }),
            ...(fault ? { fault } : {}),
            ...(rateLimit ? { rateLimit } : {}),
            retryBudget: Object.freeze({ percent: w.retryBudgetPercent ?? DEFAULT_SERVICE_POLICY.retryBudget.percent, minRetryConcurrency: w.minRetryConcurrency ?? DEFAULT_SERVICE_POLICY.retryBudget.minRetryConcurrency }),
          }),
        }),
      );
    } else if (r.route) {
      const w = r.route;
      const id = `${w.kind} ${w.namespace}/${w.name}`;
      if (!unique(id)) continue;
      const kind = ROUTE_KINDS.find((k) => k === w.kind);
      if (!kind) {
        bad(id, 'kind', `"${w.kind}" is not HTTPRoute or GRPCRoute`);
        continue;
      }
      try {
        routes.push(Object.freeze(routeFromWire(w)));
      } catch (e) {
        if (!(e instanceof ObjectInvalid)) throw e;
        bad(id, e.field, e.message);
      }
    } else if (r.mesh) {
      const w = r.mesh;
      if (!unique('MeshSettings nodemesh')) continue;
      const trustDomain = w.trustDomain === '' ? DEFAULT_MESH.trustDomain : w.trustDomain;
      const mtlsMode = w.mtlsMode === undefined || w.mtlsMode === '' ? DEFAULT_MESH.mtlsMode : w.mtlsMode;
      if (w.enrollment !== 'all' && w.enrollment !== 'opt-in') bad('ConfigMap nodemesh', 'data.enrollment', `"${w.enrollment}" must be "all" or "opt-in"`);
      else if (!TRUST_DOMAIN.test(trustDomain)) bad('ConfigMap nodemesh', 'data.trustDomain', `"${trustDomain.slice(0, 300)}" is not a SPIFFE trust domain`);
      else if (!isDefaultMtlsMode(mtlsMode)) bad('ConfigMap nodemesh', 'data.mtlsMode', `"${mtlsMode.slice(0, 50)}" is not PERMISSIVE, STRICT or DISABLE`);
      else {
        let accessLog: string[] = [];
        try {
          const given = w.accessLog ?? [];
          accessLog = given.includes('*') ? ['*'] : parseAccessLog(given.length === 0 ? undefined : given.join(','));
        } catch (e) {
          if (!(e instanceof ObjectInvalid)) throw e;
          bad('ConfigMap nodemesh', e.field, e.message);
        }
        mesh = Object.freeze({ enrollment: w.enrollment, failClosedEnrollment: w.failClosedEnrollment, trustDomain, mtlsMode, accessLog: Object.freeze(accessLog) });
      }
    } else if (r.peerAuthentication) {
      const w = r.peerAuthentication;
      const id = `PeerAuthentication ${w.namespace}/${w.name}`;
      if (!unique(id)) continue;
      const p: PeerAuthentication = Object.freeze({ namespace: w.namespace, name: w.name, selector: Object.freeze({ ...w.selector }), mode: w.mode as MtlsMode, portModes: Object.freeze({ ...(w.portModes as Record<string, MtlsMode>) }) });
      const issue = checkPeerAuthentication(p);
      if (issue) bad(id, issue.field, issue.message);
      else peerAuthentications.push(p);
    } else if (r.authorizationPolicy) {
      const w = r.authorizationPolicy;
      const id = `AuthorizationPolicy ${w.namespace}/${w.name}`;
      if (!unique(id)) continue;
      const p = Object.freeze({ namespace: w.namespace, name: w.name, selector: Object.freeze({ ...w.selector }), action: w.action as AuthorizationPolicy['action'], rules: Object.freeze((w.requestRules && w.requestRules.length > 0 ? w.requestRules : w.rules).map(ruleFromWire)) });
      const issue = checkAuthorizationPolicy(p);
      if (issue) bad(id, issue.field, issue.message);
      else authorizationPolicies.push(p);
    } else if (r.trustBundle) {
      if (!unique('TrustBundle mesh')) continue;
      const roots = r.trustBundle.roots;
      if (roots.length === 0 || roots.length > MAX_TRUSTED_ROOTS) bad('TrustBundle mesh', 'roots', `${roots.length} roots (1 to ${MAX_TRUSTED_ROOTS})`);
      roots.forEach((pem, i) => !PEM_CERTIFICATE.test(pem) && bad('TrustBundle mesh', `roots[${i}]`, 'not one PEM certificate'));
      trustBundle = [...roots];
    } else if (r.namespace) {
      const w = r.namespace;
      if (!unique(`Namespace ${w.name}`)) continue;
      namespaces.set(w.name, Object.freeze({ name: w.name, labels: Object.freeze({ ...w.labels }) }));
    } else {
      bad('Snapshot', 'resources', 'a resource of a kind this agent does not know (is the control plane newer than the agent?)');
    }
  }
  if (errors.length > 0) throw new SnapshotInvalid(errors);
  return { config: Object.freeze({ services, trafficPolicies: policies, routes, namespaces, peerAuthentications, authorizationPolicies, mesh }), workloads, ...(trustBundle ? { trustBundle: Object.freeze(trustBundle) } : {}) };
}
