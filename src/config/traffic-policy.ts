/**
 * TrafficPolicy (networking.nodemesh.io/v1alpha1): load balancing, connection limits, timeouts
 * and passive health for the Services it targets. Validated against its CRD schema, then turned
 * into an immutable value with defaults filled in.
 */
import type { LoadBalancing } from '../proxy/pool/load-balancer.js';
import { parseDuration, schemas } from './schemas.js';
import { parseMetadata } from './service.js';

export const TRAFFIC_POLICY_API = 'networking.nodemesh.io/v1alpha1';

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
}

export const DEFAULT_SERVICE_POLICY: ServicePolicy = Object.freeze({
  source: undefined,
  loadBalancing: 'round-robin',
  maxConnections: 1_000_000,
  connectTimeoutMs: undefined,
  idleTimeoutMs: undefined,
  outlier: Object.freeze({ consecutiveConnectErrors: 5, baseEjectionMs: 30_000, maxEjectionPercent: 50 }),
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
}

const LB: Record<string, LoadBalancing> = { RoundRobin: 'round-robin', LeastRequest: 'least-connections', Random: 'random' };

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
    connectTimeoutMs: tcp?.connectTimeout === undefined ? undefined : parseDuration(tcp.connectTimeout, 'spec.connectionPool.tcp.connectTimeout'),
    idleTimeoutMs: tcp?.idleTimeout === undefined ? undefined : parseDuration(tcp.idleTimeout, 'spec.connectionPool.tcp.idleTimeout'),
    outlier: Object.freeze({
      consecutiveConnectErrors: od?.consecutiveConnectErrors ?? d.outlier.consecutiveConnectErrors,
      baseEjectionMs: od?.baseEjectionTime === undefined ? d.outlier.baseEjectionMs : parseDuration(od.baseEjectionTime, 'spec.outlierDetection.baseEjectionTime'),
      maxEjectionPercent: od?.maxEjectionPercent ?? d.outlier.maxEjectionPercent,
    }),
  });
  return { name, namespace, services: [...new Set(spec.targetRefs.map((r) => r.name))], policy };
}
