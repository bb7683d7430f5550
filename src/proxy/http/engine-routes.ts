/**
 * The client side's routes as an HTTP engine follows them itself (EngineRoutes, route() of
 * H2Engine and Http1Engine in datapath/native.ts): for a source pod and the Service port it
 * called, the port's route entries reduced to what the engine reads of a request (path Exact and
 * PathPrefix, method, exact header values) and to the rules whose requests it may send on by
 * itself, which are those that HttpOutbound.decide and NativeH2Outbound or NativeOutbound would
 * only pass on as they came: no filter, retry, timeout, fault or mirror; backends whose
 * TrafficPolicy asks for no consistent hashing, least request or circuit breaking; no endpoint on
 * this node that this node's side serves in the same pass; no access log for the pod's namespace.
 * Every other request stays JS's. A request whose endpoint's pool has no session (HTTP/2) or idle
 * connection (HTTP/1.1) waits for one JS dials.
 *
 * One plan per source pod and port of a snapshot, made on a connection's first request and kept
 * until reset(): a new snapshot, a pod of this node coming or going, an ejection (the endpoints
 * picked from change). A plan with an ejected endpoint lasts until that ejection ends.
 */
import type { Endpoint, HttpRouteEntry, ServiceTarget } from '../../config/snapshot.js';
import { DEFAULT_SERVICE_POLICY } from '../../config/traffic-policy.js';
import type { EngineRouteRule, EngineRoutes, EngineRouteTarget } from '../../datapath/native.js';
import type { LoadBalancer } from '../pool/load-balancer.js';
import { routingOf, upstreamPool, type HttpClientConnection } from './outbound.js';

/** EngineRoutes with what the engine's reports refer to: the backend Services and their endpoints by index. */
export class RoutePlan implements EngineRoutes {
  constructor(
    readonly id: number,
    readonly ttlMs: number,
    readonly rules: ReadonlyArray<EngineRouteRule>,
    readonly targets: ReadonlyArray<EngineRouteTarget>,
    /** By target index: the Service, and the endpoint of each pool. */
    readonly services: ReadonlyArray<ServiceTarget>,
    readonly endpoints: ReadonlyArray<ReadonlyArray<Endpoint>>,
    /** When it no longer holds, on the load balancer's clock (ttlMs from its making). */
    readonly expires: number,
  ) {}
}

/**
 * Where an engine's report or dial says a routed request went: the Service and endpoint of
 * `routes`' target `target`, its endpoint `endpoint`; undefined for routes that are no plan of
 * this node's, or indices out of them.
 */
export function routedTo(routes: EngineRoutes | undefined, target: number | undefined, endpoint: number | undefined): { readonly target: ServiceTarget; readonly endpoint: Endpoint } | undefined {
  if (!(routes instanceof RoutePlan) || target === undefined || endpoint === undefined) return undefined;
  const service = routes.services[target];
  const picked = routes.endpoints[target]?.[endpoint];
  return service && picked ? { target: service, endpoint: picked } : undefined;
}

/** Whether the engine may send a rule's requests on by itself: JS would change nothing of them and keep no state of them but counts. */
function plainRule(entry: HttpRouteEntry, parent: ServiceTarget): boolean {
  if (entry.backends.length === 0 || (entry.filters?.length ?? 0) > 0 || entry.retry || entry.fault || (entry.mirrors?.length ?? 0) > 0) return false;
  if (entry.timeouts?.requestMs !== undefined || entry.timeouts?.backendRequestMs !== undefined || parent.policy.fault) return false;
  return entry.backends.every((b) => (b.filters?.length ?? 0) === 0 && plainTarget(b.target));
}

/** A backend whose requests need no per-request state of JS's: round robin or random, no hashing, no fault, no circuit-breaker limit. */
function plainTarget(t: ServiceTarget): boolean {
  const p = t.policy;
  const d = DEFAULT_SERVICE_POLICY;
  return (p.loadBalancing === 'round-robin' || p.loadBalancing === 'random') && !p.hashOn && !p.fault && p.maxConnections === d.maxConnections && p.maxPendingRequests === d.maxPendingRequests;
}

/** A rule's match as the engine reads it; undefined when it cannot (a regular expression, a query parameter). */
function readableMatch(entry: HttpRouteEntry): EngineRouteRule['match'] {
  const m = entry.match;
  if (m.path.type === 'RegularExpression' || m.queryParams.length > 0 || m.headers.some((h) => h.type !== 'Exact')) return undefined;
  return { exact: m.path.type === 'Exact', path: m.path.value, ...(m.method === undefined ? {} : { method: m.method }), headers: m.headers.map((h) => [h.name, h.value] as const) };
}

export class EngineRoutePlans {
  private plans = new WeakMap<ServiceTarget, Map<string, RoutePlan | null>>();
  private nextId = 0;

  constructor(
    private readonly lb: LoadBalancer,
    private readonly accessLog: (namespace: string) => boolean,
    /** The engine the plans are for (the pools are its; which of this node's sides would serve an endpoint in the same pass). */
    private readonly protocol: 'http1' | 'http2',
    /** The load balancer's clock (its ejections' ends). */
    private readonly now: () => number = Date.now,
  ) {}

  /** Every plan is made again (the snapshot, this node's pods, or an endpoint's health changed). */
  reset(): void {
    this.plans = new WeakMap();
  }

  /** The plan for the connection's source pod and the port it called now; undefined when the engine would route none of its requests. */
  for(conn: HttpClientConnection): RoutePlan | undefined {
    const parent = conn.current();
    if (!parent) return undefined;
    let bySource = this.plans.get(parent);
    if (!bySource) this.plans.set(parent, (bySource = new Map()));
    const had = bySource.get(conn.source.uid);
    if (had !== undefined && (had === null || had.expires > this.now())) return had ?? undefined;
    const made = this.make(conn, parent);
    bySource.set(conn.source.uid, made ?? null);
    return made;
  }

  private make(conn: HttpClientConnection, parent: ServiceTarget): RoutePlan | undefined {
    if (this.accessLog(conn.source.namespace)) return undefined;
    const rules: EngineRouteRule[] = [];
    const services: ServiceTarget[] = [];
    const endpoints: Array<ReadonlyArray<Endpoint>> = [];
    const targets: EngineRouteTarget[] = [];
    let forMs = Infinity;
    const indexOf = (t: ServiceTarget): number | undefined => {
      const at = services.indexOf(t);
      if (at >= 0) return at;
      const eligible = this.lb.eligible(t);
      // An endpoint this node's side serves in the same pass (localServer) is JS's to send to.
      if (eligible.endpoints.length === 0 || eligible.endpoints.some((e) => conn.servesHere?.(e, this.protocol) === true)) return undefined;
      forMs = Math.min(forMs, eligible.forMs);
      services.push(t);
      endpoints.push(eligible.endpoints);
      targets.push({ key: t.key, pools: eligible.endpoints.map((e) => upstreamPool(conn, t, e)), random: t.policy.loadBalancing === 'random', maxRequests: t.policy.maxRequestsPerConnection });
      return services.length - 1;
    };
    let any = false;
    for (const entry of routingOf(parent).entries) {
      const match = readableMatch(entry);
      if (!match) {
        // The engine cannot tell whether a request matches: JS decides from this rule on.
        rules.push({});
        break;
      }
      let backends: Array<readonly [number, number]> | undefined;
      if (plainRule(entry, parent)) {
        backends = [];
        for (const b of entry.backends) {
          const i = indexOf(b.target);
          if (i === undefined) {
            backends = undefined;
            break;
          }
          backends.push([i, b.weight]);
        }
      }
      if (backends) any = true;
      rules.push(backends ? { match, backends } : { match });
    }
    if (!any) return undefined;
    const ttlMs = forMs === Infinity ? -1 : Math.max(1, Math.ceil(forMs));
    return new RoutePlan(++this.nextId, ttlMs, rules, targets, services, endpoints, ttlMs < 0 ? Infinity : this.now() + ttlMs);
  }
}
