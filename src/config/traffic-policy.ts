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

/** What a Service's connections get; every field set (defaults or the policy's values). */
export interface ServicePolicy {
  /** namespace/name of the TrafficPolicy, or undefined for the defaults. */
  readonly source: string | undefined;
  readonly loadBalancing: LoadBalancing;
  /** Open connections per Service from this node; beyond it new ones are refused. */
  readonly maxConnections: number;
  /** Undefined: the agent's --connect-timeout / --idle-timeout. */
  readonly connectTimeoutMs: number | undefined;
  readonly idleTimeoutMs: number | undefined;
  readonly outlier: {
    readonly consecutiveConnectErrors: number;
    readonly baseEjectionMs: number;
    readonly maxEjectionPercent: number;
  };
  /** Retries in flight from this node: at most `percent` of the active requests, but always `minRetryConcurrency`. */
  readonly retryBudget: { readonly percent: number; readonly minRetryConcurrency: number };
}

export const DEFAULT_SERVICE_POLICY: ServicePolicy = Object.freeze({
  source: undefined,
  loadBalancing: 'round-robin',
  maxConnections: 1_000_000,
  connectTimeoutMs: undefined,
  idleTimeoutMs: undefined,
  outlier: Object.freeze({ consecutiveConnectErrors: 5, baseEjectionMs: 30_000, maxEjectionPercent: 50 }),
  retryBudget: Object.freeze({ percent: 20, minRetryConcurrency: 3 }),
});

export interface TrafficPolicy {
  readonly name: string;
  readonly namespace: string;
  /** Names of Services in the policy's namespace. */
  readonly services: ReadonlyArray<string>;
  readonly policy: ServicePolicy;
}

interface Spec {
  targetRefs: Array<{ group?: string; kind: 'Service'; name: string }>;
  loadBalancer?: { type?: 'RoundRobin' | 'LeastRequest' | 'Random' };
  connectionPool?: { tcp?: { maxConnections?: number; connectTimeout?: string; idleTimeout?: string } };
  outlierDetection?: { consecutiveConnectErrors?: number; baseEjectionTime?: string; maxEjectionPercent?: number };
  retryBudget?: { percent?: number; minRetryConcurrency?: number };
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

export function parseTrafficPolicy(doc: Record<string, unknown>): TrafficPolicy {
  schemas().validate(String(doc['apiVersion']), String(doc['kind']), doc);
  const { name, namespace } = parseMetadata(doc['metadata']);
  const spec = doc['spec'] as Spec;
  const tcp = spec.connectionPool?.tcp;
  const od = spec.outlierDetection;
  const d = DEFAULT_SERVICE_POLICY;
  const policy: ServicePolicy = Object.freeze({
    source: `${namespace}/${name}`,
    loadBalancing: LB[spec.loadBalancer?.type ?? 'RoundRobin'] ?? d.loadBalancing,
    maxConnections: tcp?.maxConnections ?? d.maxConnections,
    connectTimeoutMs: tcp?.connectTimeout === undefined ? undefined : boundedDuration(tcp.connectTimeout, DURATION_BOUNDS.connectTimeoutMs),
    idleTimeoutMs: tcp?.idleTimeout === undefined ? undefined : boundedDuration(tcp.idleTimeout, DURATION_BOUNDS.idleTimeoutMs),
    outlier: Object.freeze({
      consecutiveConnectErrors: od?.consecutiveConnectErrors ?? d.outlier.consecutiveConnectErrors,
      baseEjectionMs: od?.baseEjectionTime === undefined ? d.outlier.baseEjectionMs : boundedDuration(od.baseEjectionTime, DURATION_BOUNDS.baseEjectionMs),
      maxEjectionPercent: od?.maxEjectionPercent ?? d.outlier.maxEjectionPercent,
    }),
    retryBudget: Object.freeze({ percent: spec.retryBudget?.percent ?? d.retryBudget.percent, minRetryConcurrency: spec.retryBudget?.minRetryConcurrency ?? d.retryBudget.minRetryConcurrency }),
  });
  return { name, namespace, services: [...new Set(spec.targetRefs.map((r) => r.name))], policy };
}
