/**
 * TrafficPolicy (networking.nodemesh.io/v1alpha1): load balancing, connection limits, timeouts
 * and passive health for the Services it targets. Validated against its CRD schema, then turned
 * into an immutable value with defaults filled in.
 */
import { parseDuration, schemas } from './schemas.js';
import { ObjectInvalid, parseMetadata } from './service.js';

export const TRAFFIC_POLICY_API = 'networking.nodemesh.io/v1alpha1';

/** How the proxy picks an endpoint per connection (proxy/pool/load-balancer.ts does it). */
export type LoadBalancing = 'round-robin' | 'least-connections' | 'random';

/** Session affinity: what a request's (or connection's) endpoint is hashed from. */
export type HashOn = { readonly header: string } | { readonly cookie: string; readonly ttlMs?: number } | { readonly sourceIp: true };

/** Istio's VirtualService fault: percentages 0-100. */
export interface Fault {
  readonly delay?: { readonly percent: number; readonly ms: number };
  readonly abort?: { readonly percent: number; readonly status: number };
}

/** What a Service's connections get; every field set (defaults or the policy's values). */
export interface ServicePolicy {
  /** namespace/name of the TrafficPolicy, or undefined for the defaults. */
  readonly source: string | undefined;
  readonly loadBalancing: LoadBalancing;
  /** Consistent hashing instead of loadBalancing (Istio's consistentHash). */
  readonly hashOn?: HashOn;
  /** Open connections per Service from this node; beyond it new ones are refused (L4) or wait (HTTP requests). */
  readonly maxConnections: number;
  /** HTTP requests that may wait for one of maxConnections; more are answered 503 (UO). */
  readonly maxPendingRequests: number;
  /** Requests an upstream HTTP connection carries before it is closed (0: no limit). */
  readonly maxRequestsPerConnection: number;
  /** Undefined: the agent's --connect-timeout / --idle-timeout. */
  readonly connectTimeoutMs: number | undefined;
  readonly idleTimeoutMs: number | undefined;
  readonly outlier: {
    readonly consecutiveConnectErrors: number;
    /** HTTP answers 500-599 in a row that eject (0: never). */
    readonly consecutive5xxErrors: number;
    /** HTTP answers 502, 503, 504 in a row that eject (0: never). */
    readonly consecutiveGatewayErrors: number;
    readonly baseEjectionMs: number;
    readonly maxEjectionPercent: number;
    /** Ejections end at the first sweep after they ran out (Envoy's interval). */
    readonly intervalMs: number;
  };
  /** Faults injected into requests to the Service through an HTTP route (on the caller's node). */
  readonly fault?: Fault;
  /**
   * Requests per second each destination pod accepts (localRateLimit, Linkerd's semantics): a
   * total bucket, and one per client identity. Enforced on the destination's node, on HTTP ports.
   */
  readonly rateLimit?: { readonly total?: number; readonly identity?: number };
  /** Retries in flight from this node: at most `percent` of the active requests, but always `minRetryConcurrency`. */
  readonly retryBudget: { readonly percent: number; readonly minRetryConcurrency: number };
}

export const DEFAULT_SERVICE_POLICY: ServicePolicy = Object.freeze({
  source: undefined,
  loadBalancing: 'round-robin',
  maxConnections: 1_000_000,
  maxPendingRequests: 1_000_000,
  maxRequestsPerConnection: 0,
  connectTimeoutMs: undefined,
  idleTimeoutMs: undefined,
  // Without a policy: connect errors eject (5 in a row, 30 s, at most half the endpoints), answers
  // do not (Istio ejects on 5xx only where a DestinationRule asks); ejections end exactly when
  // they run out (an interval of 1 ms).
  outlier: Object.freeze({ consecutiveConnectErrors: 5, consecutive5xxErrors: 0, consecutiveGatewayErrors: 0, baseEjectionMs: 30_000, maxEjectionPercent: 50, intervalMs: 1 }),
  retryBudget: Object.freeze({ percent: 20, minRetryConcurrency: 3 }),
});

/**
 * Whether the policy acts on requests (faults, ejection on answers, request limits): on an HTTP
 * port such a Service goes through the HTTP path even without a route.
 */
export function policyNeedsHttp(p: ServicePolicy): boolean {
  const d = DEFAULT_SERVICE_POLICY;
  const byRequest = p.hashOn !== undefined && !('sourceIp' in p.hashOn);
  return byRequest || p.fault !== undefined || p.outlier.consecutive5xxErrors > 0 || p.outlier.consecutiveGatewayErrors > 0 || p.maxPendingRequests !== d.maxPendingRequests || p.maxRequestsPerConnection !== d.maxRequestsPerConnection;
}

export interface TrafficPolicy {
  readonly name: string;
  readonly namespace: string;
  /** Names of Services in the policy's namespace. */
  readonly services: ReadonlyArray<string>;
  /**
   * Routes in the policy's namespace, "HTTPRoute/name" or "GRPCRoute/name": the policy's `fault`
   * applies to the requests they route (Istio's VirtualService fault). Such a policy targets only
   * routes and sets only `fault` (what is per route); the rest is per Service.
   */
  readonly routes: ReadonlyArray<string>;
  readonly policy: ServicePolicy;
}

const ROUTE_TARGET_KINDS = ['HTTPRoute', 'GRPCRoute'];

interface Spec {
  targetRefs: Array<{ group?: string; kind: 'Service' | 'HTTPRoute' | 'GRPCRoute'; name: string }>;
  loadBalancer?: { type?: 'RoundRobin' | 'LeastRequest' | 'Random'; consistentHash?: { httpHeaderName?: string; httpCookie?: { name: string; ttl?: string }; useSourceIp?: boolean } };
  connectionPool?: { tcp?: { maxConnections?: number; connectTimeout?: string; idleTimeout?: string }; http?: { http1MaxPendingRequests?: number; maxRequestsPerConnection?: number } };
  outlierDetection?: { consecutiveConnectErrors?: number; consecutive5xxErrors?: number; consecutiveGatewayErrors?: number; baseEjectionTime?: string; maxEjectionPercent?: number; interval?: string };
  fault?: { delay?: { percentage?: { value?: number }; fixedDelay: string }; abort?: { percentage?: { value?: number }; httpStatus: number } };
  retryBudget?: { percent?: number; minRetryConcurrency?: number };
  localRateLimit?: { total?: { requestsPerSecond: number }; identity?: { requestsPerSecond: number } };
}

const LB: Record<string, LoadBalancing> = { RoundRobin: 'round-robin', LeastRequest: 'least-connections', Random: 'random' };

/**
 * What each duration may be, at the config edge and the wire edge alike: a connect timeout of 0
 * fails every connect, and the addon and timers take at most 2^31-1 ms (more wraps negative).
 */
export const DURATION_BOUNDS = {
  connectTimeoutMs: { min: 1, max: 300_000, field: 'spec.connectionPool.tcp.connectTimeout' },
  idleTimeoutMs: { min: 1000, max: 2_147_483_647, field: 'spec.connectionPool.tcp.idleTimeout' },
  baseEjectionMs: { min: 1, max: 86_400_000, field: 'spec.outlierDetection.baseEjectionTime' },
  intervalMs: { min: 1, max: 86_400_000, field: 'spec.outlierDetection.interval' },
  delayMs: { min: 1, max: 3_600_000, field: 'spec.fault.delay.fixedDelay' },
  cookieTtlMs: { min: 1000, max: 31_536_000_000, field: 'spec.loadBalancer.consistentHash.httpCookie.ttl' },
} as const;

/** Why `ms` is out of its bounds, or undefined when it is within them. */
export function durationOutOfBounds(ms: number, bound: { readonly min: number; readonly max: number }): string | undefined {
  if (Number.isInteger(ms) && ms >= bound.min && ms <= bound.max) return undefined;
  return `${ms} ms is outside ${bound.min} ms to ${bound.max} ms`;
}

function boundedDuration(text: string, bound: (typeof DURATION_BOUNDS)[keyof typeof DURATION_BOUNDS]): number {
  const ms = parseDuration(text, bound.field);
  const why = durationOutOfBounds(ms, bound);
  if (why) throw new ObjectInvalid(bound.field, `${bound.field} "${text}": ${why}`);
  return ms;
}

function parseHashOn(lb: NonNullable<Spec['loadBalancer']>): HashOn {
  const ch = lb.consistentHash ?? {};
  if (lb.type !== undefined) throw new ObjectInvalid('spec.loadBalancer.consistentHash', 'spec.loadBalancer: type and consistentHash do not go together (consistentHash chooses the endpoint)');
  const given = [ch.httpHeaderName !== undefined, ch.httpCookie !== undefined, ch.useSourceIp === true].filter(Boolean).length;
  if (given !== 1) throw new ObjectInvalid('spec.loadBalancer.consistentHash', 'spec.loadBalancer.consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp: true');
  if (ch.httpHeaderName !== undefined) return { header: ch.httpHeaderName.toLowerCase() };
  if (ch.httpCookie) return { cookie: ch.httpCookie.name, ...(ch.httpCookie.ttl === undefined ? {} : { ttlMs: boundedDuration(ch.httpCookie.ttl, DURATION_BOUNDS.cookieTtlMs) }) };
  return { sourceIp: true };
}

function parseFault(f: NonNullable<Spec['fault']>): Fault {
  // Istio: a percentage left out is 100.
  const delay = f.delay ? { percent: f.delay.percentage?.value ?? 100, ms: boundedDuration(f.delay.fixedDelay, DURATION_BOUNDS.delayMs) } : undefined;
  const abort = f.abort ? { percent: f.abort.percentage?.value ?? 100, status: f.abort.httpStatus } : undefined;
  if (!delay && !abort) throw new ObjectInvalid('spec.fault', 'spec.fault injects nothing (give delay or abort)');
  return Object.freeze({ ...(delay ? { delay } : {}), ...(abort ? { abort } : {}) });
}

/** A rate limit from its two rates (either may be absent, not both: the schema and the wire edge see to it). */
export function rateLimitOf(total: number | undefined, identity: number | undefined): NonNullable<ServicePolicy['rateLimit']> {
  return Object.freeze({ ...(total === undefined ? {} : { total }), ...(identity === undefined ? {} : { identity }) });
}

export function parseTrafficPolicy(doc: Record<string, unknown>): TrafficPolicy {
  schemas().validate(String(doc['apiVersion']), String(doc['kind']), doc);
  const { name, namespace } = parseMetadata(doc['metadata']);
  const spec = doc['spec'] as Spec;
  for (const [i, ref] of spec.targetRefs.entries()) {
    const route = ROUTE_TARGET_KINDS.includes(ref.kind);
    const group = ref.group ?? '';
    if (route ? group !== 'gateway.networking.k8s.io' : group !== '') throw new ObjectInvalid(`spec.targetRefs[${i}].group`, `spec.targetRefs[${i}].group "${group}" is not the group of a ${ref.kind} (${route ? 'gateway.networking.k8s.io' : '""'})`);
  }
  const routeRefs = spec.targetRefs.filter((r) => ROUTE_TARGET_KINDS.includes(r.kind));
  if (routeRefs.length > 0) {
    // What is per route (Istio's VirtualService) against what is per Service (its DestinationRule).
    const service = spec.targetRefs.findIndex((r) => r.kind === 'Service');
    if (service >= 0) throw new ObjectInvalid(`spec.targetRefs[${service}]`, 'a TrafficPolicy targets Services or routes, not both: its fields mean different things for each');
    const perService = Object.keys(spec).find((k) => k !== 'targetRefs' && k !== 'fault');
    if (perService) throw new ObjectInvalid(`spec.${perService}`, `spec.${perService} applies to a Service's endpoints; a TrafficPolicy that targets routes sets only fault`);
    if (!spec.fault) throw new ObjectInvalid('spec.fault', 'a TrafficPolicy that targets routes sets fault (nothing else applies per route)');
  }
  const tcp = spec.connectionPool?.tcp;
  const od = spec.outlierDetection;
  const d = DEFAULT_SERVICE_POLICY;
  const policy: ServicePolicy = Object.freeze({
    source: `${namespace}/${name}`,
    loadBalancing: LB[spec.loadBalancer?.type ?? 'RoundRobin'] ?? d.loadBalancing,
    ...(spec.loadBalancer?.consistentHash ? { hashOn: parseHashOn(spec.loadBalancer) } : {}),
    maxConnections: tcp?.maxConnections ?? d.maxConnections,
    maxPendingRequests: spec.connectionPool?.http?.http1MaxPendingRequests ?? d.maxPendingRequests,
    maxRequestsPerConnection: spec.connectionPool?.http?.maxRequestsPerConnection ?? d.maxRequestsPerConnection,
    connectTimeoutMs: tcp?.connectTimeout === undefined ? undefined : boundedDuration(tcp.connectTimeout, DURATION_BOUNDS.connectTimeoutMs),
    idleTimeoutMs: tcp?.idleTimeout === undefined ? undefined : boundedDuration(tcp.idleTimeout, DURATION_BOUNDS.idleTimeoutMs),
    outlier: Object.freeze({
      consecutiveConnectErrors: od?.consecutiveConnectErrors ?? d.outlier.consecutiveConnectErrors,
      baseEjectionMs: od?.baseEjectionTime === undefined ? d.outlier.baseEjectionMs : boundedDuration(od.baseEjectionTime, DURATION_BOUNDS.baseEjectionMs),
      maxEjectionPercent: od?.maxEjectionPercent ?? d.outlier.maxEjectionPercent,
      // Istio: 5 when an outlierDetection is given without it, none without one.
      consecutive5xxErrors: od ? (od.consecutive5xxErrors ?? 5) : d.outlier.consecutive5xxErrors,
      consecutiveGatewayErrors: od?.consecutiveGatewayErrors ?? d.outlier.consecutiveGatewayErrors,
      intervalMs: od?.interval === undefined ? d.outlier.intervalMs : boundedDuration(od.interval, DURATION_BOUNDS.intervalMs),
    }),
    ...(spec.fault ? { fault: parseFault(spec.fault) } : {}),
    ...(spec.localRateLimit ? { rateLimit: rateLimitOf(spec.localRateLimit.total?.requestsPerSecond, spec.localRateLimit.identity?.requestsPerSecond) } : {}),
    retryBudget: Object.freeze({ percent: spec.retryBudget?.percent ?? d.retryBudget.percent, minRetryConcurrency: spec.retryBudget?.minRetryConcurrency ?? d.retryBudget.minRetryConcurrency }),
  });
  return {
    name,
    namespace,
    services: [...new Set(spec.targetRefs.filter((r) => r.kind === 'Service').map((r) => r.name))],
    routes: [...new Set(routeRefs.map((r) => `${r.kind}/${r.name}`))],
    policy,
  };
}
