/**
 * The immutable routing view the proxy serves from: Services by virtual address and port, with
 * their endpoints computed from pods' labels. Built in one place (the agent in standalone mode
 * now, the control plane later) and swapped whole, never mutated.
 */
import type { SocketAddress } from '../shared/address.js';
import { ALL_REQUESTS, needsHttp, type RouteMatch, type RouteRetry, type RouteTimeouts, type ServiceRoute } from './route.js';
import type { RouteFilter } from './route-filters.js';
import { portProtocol, speaksRequests, type Service, type ServicePort } from './service.js';
import { DEFAULT_SERVICE_POLICY, policyNeedsHttp, type Fault, type ServicePolicy, type TrafficPolicy } from './traffic-policy.js';
import { NO_SECURITY, type SecurityConfig } from './security.js';
import { byNamespaceName } from '../shared/order.js';

export interface Workload {
  readonly uid: string;
  readonly name: string;
  readonly namespace: string;
  readonly serviceAccount: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly ip4: string;
  readonly ip6: string;
  /** 'hbone': a pod in the mesh whose node accepts HBONE tunnels on its 15008 (undefined: plain TCP). */
  readonly tunnel?: 'hbone';
}

export interface Endpoint {
  readonly workload: Workload;
  readonly port: number;
}

export interface ServiceTarget {
  readonly service: Service;
  readonly port: ServicePort;
  /** Ready endpoints, in a stable order (by pod namespace/name). */
  readonly endpoints: ReadonlyArray<Endpoint>;
  /** namespace/name:port, the key for per-service state such as load-balancer cursors. */
  readonly key: string;
  /** From the TrafficPolicy that targets the Service, or the defaults. */
  readonly policy: ServicePolicy;
  /**
   * From a route (HTTPRoute/GRPCRoute) whose parent this is: connections go to these backend
   * Service ports by weight instead of to this Service's own endpoints.
   */
  readonly split?: ReadonlyArray<{ readonly target: ServiceTarget; readonly weight: number }>;
  /** The route that made the split ("HTTPRoute ns/name"). */
  readonly route?: string;
  /**
   * An HTTP port with routes: the proxy terminates HTTP and routes each request by these entries,
   * in precedence order (the first whose match holds); a request that matches none is answered 404.
   */
  readonly http?: HttpRouting;
}

export interface WeightedBackend {
  readonly target: ServiceTarget;
  readonly weight: number;
  /** The backendRef's own header modifiers. */
  readonly filters?: ReadonlyArray<RouteFilter>;
}

/** One match of one rule of one route, with where its requests go. */
export interface HttpRouteEntry {
  readonly match: RouteMatch;
  /** Empty when no backend of the rule exists: such requests are answered 500 (Gateway API). */
  readonly backends: ReadonlyArray<WeightedBackend>;
  /** "HTTPRoute ns/name" and the rule's index in it: metrics, logs and the rule's own split state. */
  readonly route: string;
  readonly rule: number;
  readonly timeouts?: RouteTimeouts;
  readonly retry?: RouteRetry;
  /** The rule's filters, in order (a mirror's backend is in `mirrors`). */
  readonly filters?: ReadonlyArray<RouteFilter>;
  /** Where a share of the requests is copied to (RequestMirror), answers dropped. */
  readonly mirrors?: ReadonlyArray<{ readonly target: ServiceTarget; readonly percent: number }>;
  /** From a TrafficPolicy that targets the route: it wins over the Services' faults. */
  readonly fault?: Fault;
}

export interface HttpRouting {
  /** The routes merged, by Gateway API's precedence. */
  readonly entries: ReadonlyArray<HttpRouteEntry>;
  /** The routes that apply, "HTTPRoute ns/name", in name order. */
  readonly routes: ReadonlyArray<string>;
}

/** Every request of a port to the port's own endpoints, as one entry named `route` (no route applies, but the HTTP path does). */
export function toItself(target: ServiceTarget, route: string): HttpRouting {
  const entry: HttpRouteEntry = { match: ALL_REQUESTS, backends: [{ target, weight: 1 }], route, rule: 0 };
  return Object.freeze({ entries: Object.freeze([entry]), routes: Object.freeze([]) });
}

/** Something in the config that is valid on its own but does not fit the rest (shown, not fatal). */
export interface SnapshotWarning {
  readonly object: string;
  readonly message: string;
}

/** Istio's workload name: the app label when there is one, else the pod name. */
export function workloadName(w: Pick<Workload, 'labels' | 'name'>): string {
  return w.labels['app.kubernetes.io/name'] ?? w.labels['app'] ?? w.name;
}

export function selects(selector: Readonly<Record<string, string>>, labels: Readonly<Record<string, string>>): boolean {
  const keys = Object.keys(selector);
  return keys.length > 0 && keys.every((k) => labels[k] === selector[k]);
}

type Labelled = { readonly namespace: string; readonly labels: Readonly<Record<string, string>> };

/**
 * Finds the members of many selectors at once: workloads indexed by namespace and label, so each
 * selector looks only at the workloads that carry its first label (a mesh of 1,000 Services and
 * 10,000 pods is 10 million label checks without it). Members keep the order they were given in.
 */
export class SelectorIndex<W extends Labelled> {
  private readonly byLabel = new Map<string, W[]>();

  constructor(workloads: Iterable<W>) {
    for (const w of workloads) {
      for (const [k, v] of Object.entries(w.labels)) {
        const key = `${w.namespace}\u0000${k}\u0000${v}`;
        const list = this.byLabel.get(key);
        if (list) list.push(w);
        else this.byLabel.set(key, [w]);
      }
    }
  }

  members(namespace: string, selector: Readonly<Record<string, string>>): W[] {
    const first = Object.entries(selector)[0];
    if (!first) return [];
    const candidates = this.byLabel.get(`${namespace}\u0000${first[0]}\u0000${first[1]}`) ?? [];
    return candidates.filter((w) => selects(selector, w.labels));
  }
}

const vipKey = (address: string, port: number): string => `${address}|${port}`;

export class MeshSnapshot {
  private readonly byVip = new Map<string, ServiceTarget>();
  private readonly byIp = new Map<string, Workload>();
  /** uid|targetPort -> the Service port that selects that workload there (inbound labels). */
  private readonly byEndpoint = new Map<string, ServiceTarget>();
  readonly warnings: ReadonlyArray<SnapshotWarning>;

  constructor(
    readonly version: number,
    readonly services: ReadonlyArray<Service>,
    readonly workloads: ReadonlyArray<Workload>,
    readonly trafficPolicies: ReadonlyArray<TrafficPolicy> = [],
    readonly routes: ReadonlyArray<ServiceRoute> = [],
    /** PeerAuthentications, AuthorizationPolicies and the mesh's default mode: the proxy enforces them. */
    readonly security: SecurityConfig = NO_SECURITY,
  ) {
    const warnings: SnapshotWarning[] = [];
    const policies = resolvePolicies(services, trafficPolicies, warnings);
    for (const w of workloads) {
      this.byIp.set(w.ip4, w);
      this.byIp.set(w.ip6, w);
    }
    const index = new SelectorIndex([...workloads].sort(byNamespaceName));
    const byKey = new Map<string, ServiceTarget>();
    for (const service of services) {
      const members = index.members(service.namespace, service.selector);
      for (const port of service.ports) {
        const key = `${service.namespace}/${service.name}:${port.port}`;
        byKey.set(key, {
          service,
          port,
          endpoints: members.map((workload) => ({ workload, port: port.targetPort })),
          key,
          policy: policies.get(`${service.namespace}/${service.name}`) ?? DEFAULT_SERVICE_POLICY,
        });
      }
    }
    // Routes turn their parents' targets into splits over the backends' own targets (one level:
    // a backend's own route does not apply again, as in Gateway API's mesh routing).
    const plain = new Map(byKey);
    for (const [key, routing] of resolveRoutes(routes, plain, warnings, routeFaults(routes, trafficPolicies, warnings))) {
      const parent = plain.get(key);
      if (parent) byKey.set(key, { ...parent, ...routing });
    }
    // An HTTP port whose Service's policy acts on requests (faults, ejection on answers, request
    // limits) goes through the HTTP path even without a route: every request to its own endpoints.
    for (const [key, t] of byKey) {
      if (t.http || t.split || !policyNeedsHttp(t.policy) || (speaksRequests(t.port) === undefined && portProtocol(t.port) !== 'unknown')) continue;
      byKey.set(key, { ...t, http: toItself(t, `TrafficPolicy ${t.policy.source ?? ''}`) });
    }
    for (const target of byKey.values()) {
      for (const ip of target.service.clusterIPs) this.byVip.set(vipKey(ip, target.port.port), target);
    }
    // Which Service an inbound connection to a workload port is reported under when the caller
    // did not say (a direct connection to the pod's address): a routed Service never, since its
    // connections always go to one of its backends; among the others the first by namespace/name.
    // (A routed parent that selects the pod too would otherwise be named for connections that
    // never went through its route.)
    const ordered = [...byKey.values()].sort((a, b) => byNamespaceName(a.service, b.service) || a.port.port - b.port.port);
    for (const routedFirst of [false, true]) {
      for (const target of ordered) {
        if ((target.split !== undefined || target.http !== undefined) !== routedFirst) continue;
        for (const e of target.endpoints) {
          const k = `${e.workload.uid}|${e.port}`;
          if (!this.byEndpoint.has(k)) this.byEndpoint.set(k, target);
        }
      }
    }
    this.warnings = warnings;
    Object.freeze(this);
  }

  static empty(): MeshSnapshot {
    return new MeshSnapshot(0, [], []);
  }

  service(dst: SocketAddress): ServiceTarget | undefined {
    return this.byVip.get(vipKey(dst.address, dst.port));
  }

  workload(ip: string): Workload | undefined {
    return this.byIp.get(ip.replace(/^::ffff:/, ''));
  }

  /**
   * The Service an inbound connection to this workload and port is reported under: the first
   * (by namespace/name) that selects it, preferring one without a route (see the constructor).
   */
  serviceOf(workloadUid: string, port: number): ServiceTarget | undefined {
    return this.byEndpoint.get(`${workloadUid}|${port}`);
  }

  targets(): ServiceTarget[] {
    return [...new Set(this.byVip.values())];
  }
}

/**
 * Which policy each Service gets. Several policies on one Service: the first by name wins (as
 * Gateway API policies resolve conflicts, with name as the tie-break) and the others are named in
 * a warning; a policy whose Service does not exist (yet) is a warning too.
 */
function resolvePolicies(services: ReadonlyArray<Service>, policies: ReadonlyArray<TrafficPolicy>, warnings: SnapshotWarning[]): Map<string, ServicePolicy> {
  const known = new Set(services.map((s) => `${s.namespace}/${s.name}`));
  const chosen = new Map<string, TrafficPolicy>();
  const sorted = [...policies].sort(byNamespaceName);
  for (const p of sorted) {
    for (const name of p.services) {
      const key = `${p.namespace}/${name}`;
      const object = `TrafficPolicy ${p.namespace}/${p.name}`;
      const winner = chosen.get(key);
      if (!known.has(key)) warnings.push({ object, message: `targets Service ${key}, which does not exist` });
      else if (winner) warnings.push({ object, message: `ignored for Service ${key}: TrafficPolicy ${winner.namespace}/${winner.name} already applies to it` });
      else chosen.set(key, p);
    }
  }
  return new Map([...chosen].map(([k, p]) => [k, p.policy]));
}

/**
 * What each routed Service port gets. An HTTP port: every route on it, merged in Gateway API's
 * precedence (matchOrder). Any other port: a split of connections, from the first route by
 * namespace/name (Gateway API resolves conflicts by age, then name; nodemesh does not track age),
 * the others are warnings; a route that matches requests cannot apply there and is a warning too
 * (the config store refuses it before it gets here). A backend that is not there is a warning; its
 * share is left out and the others keep theirs.
 */
/**
 * The fault of each route a TrafficPolicy targets ("HTTPRoute ns/name" -> fault): the first policy
 * by name wins, the others are warnings, as for Services.
 */
function routeFaults(routes: ReadonlyArray<ServiceRoute>, policies: ReadonlyArray<TrafficPolicy>, warnings: SnapshotWarning[]): Map<string, Fault> {
  const known = new Set(routes.map((r) => `${r.kind} ${r.namespace}/${r.name}`));
  const chosen = new Map<string, TrafficPolicy>();
  for (const p of [...policies].sort(byNamespaceName)) {
    for (const ref of p.routes) {
      const key = `${ref.replace('/', ` ${p.namespace}/`)}`;
      const object = `TrafficPolicy ${p.namespace}/${p.name}`;
      const winner = chosen.get(key);
      if (!known.has(key)) warnings.push({ object, message: `targets ${key}, which does not exist` });
      else if (winner) warnings.push({ object, message: `ignored for ${key}: TrafficPolicy ${winner.namespace}/${winner.name} already applies to it` });
      else chosen.set(key, p);
    }
  }
  const out = new Map<string, Fault>();
  for (const [key, p] of chosen) if (p.policy.fault) out.set(key, p.policy.fault);
  return out;
}

function resolveRoutes(routes: ReadonlyArray<ServiceRoute>, targets: ReadonlyMap<string, ServiceTarget>, warnings: SnapshotWarning[], faults: ReadonlyMap<string, Fault>): Map<string, Pick<ServiceTarget, 'split' | 'route' | 'http'>> {
  const out = new Map<string, Pick<ServiceTarget, 'split' | 'route' | 'http'>>();
  if (routes.length === 0) return out;
  const byService = new Map<string, ServiceTarget[]>();
  for (const t of targets.values()) {
    const k = `${t.service.namespace}/${t.service.name}`;
    byService.set(k, [...(byService.get(k) ?? []), t]);
  }
  const http = new Map<string, { entries: Array<HttpRouteEntry & { readonly order: number }>; routes: string[] }>();
  let order = 0;
  for (const r of [...routes].sort(byNamespaceName)) {
    const object = `${r.kind} ${r.namespace}/${r.name}`;
    const rules = r.rules.map((rule) => {
      const split: WeightedBackend[] = [];
      for (const b of rule.backends) {
        const t = targets.get(`${b.namespace}/${b.name}:${b.port ?? 0}`);
        if (!t) warnings.push({ object, message: `backend Service ${b.namespace}/${b.name} port ${b.port ?? '?'} does not exist; its share is left out` });
        else if (b.weight > 0) split.push({ target: t, weight: b.weight, ...(b.filters ? { filters: b.filters } : {}) });
      }
      return Object.freeze(split);
    });
    const mirrors = r.rules.map((rule) =>
      (rule.filters ?? []).flatMap((f) => {
        if (f.type !== 'RequestMirror') return [];
        const t = targets.get(`${f.backend.namespace}/${f.backend.name}:${f.backend.port}`);
        if (!t) warnings.push({ object, message: `mirror Service ${f.backend.namespace}/${f.backend.name} port ${f.backend.port} does not exist; nothing is mirrored to it` });
        return t ? [{ target: t, percent: f.percent }] : [];
      }),
    );
    for (const p of r.parents) {
      const parents = (byService.get(`${p.namespace}/${p.name}`) ?? []).filter((t) => p.port === undefined || t.port.port === p.port);
      if (parents.length === 0) warnings.push({ object, message: `parent Service ${p.namespace}/${p.name}${p.port === undefined ? '' : ` port ${p.port}`} does not exist` });
      for (const parent of parents) {
        // A port that says no protocol is sniffed per connection: routed by request when it is HTTP.
        if (speaksRequests(parent.port) !== undefined || (portProtocol(parent.port) === 'unknown' && needsHttp(r))) {
          const merged = http.get(parent.key) ?? { entries: [], routes: [] };
          http.set(parent.key, merged);
          merged.routes.push(object);
          r.rules.forEach((rule, ri) => {
            const mirrored = mirrors[ri] ?? [];
            const fault = faults.get(object);
            const extras = { ...(rule.timeouts ? { timeouts: rule.timeouts } : {}), ...(rule.retry ? { retry: rule.retry } : {}), ...(rule.filters ? { filters: rule.filters } : {}), ...(mirrored.length > 0 ? { mirrors: mirrored } : {}), ...(fault ? { fault } : {}) };
            for (const match of rule.matches) merged.entries.push({ match, backends: rules[ri] ?? [], route: object, rule: ri, ...extras, order: order++ });
          });
          continue;
        }
        const winner = out.get(parent.key);
        if (needsHttp(r)) warnings.push({ object, message: `ignored for ${parent.key}: the route works per request and the port does not speak HTTP (set its appProtocol or name)` });
        else if (winner) warnings.push({ object, message: `ignored for ${parent.key}: ${winner.route ?? ''} already routes it` });
        else out.set(parent.key, { split: rules[0] ?? [], route: object });
      }
    }
  }
  for (const [key, merged] of http) {
    const entries = merged.entries.sort(matchOrder).map(({ order: _, ...e }) => Object.freeze(e));
    const names = [...new Set(merged.routes)];
    out.set(key, { route: names.join(', '), http: Object.freeze({ entries: Object.freeze(entries), routes: Object.freeze(names) }) });
  }
  return out;
}

/**
 * Gateway API's precedence between matches of the routes on one parent: an Exact path, then a
 * regular expression (its place is left to implementations), then the longest PathPrefix; then a
 * method match; then the most header matches; then the most query parameter matches; then the
 * route's namespace/name (the age that comes first in Gateway API is not tracked), the rule's order
 * in it and the match's order in the rule (`order` holds those last three).
 */
function matchOrder(a: HttpRouteEntry & { readonly order: number }, b: HttpRouteEntry & { readonly order: number }): number {
  const rank = { Exact: 0, RegularExpression: 1, PathPrefix: 2 } as const;
  const pa = a.match.path;
  const pb = b.match.path;
  return (
    rank[pa.type] - rank[pb.type] ||
    (pa.type === 'PathPrefix' ? pb.value.length - pa.value.length : 0) ||
    Number(b.match.method !== undefined) - Number(a.match.method !== undefined) ||
    b.match.headers.length - a.match.headers.length ||
    b.match.queryParams.length - a.match.queryParams.length ||
    a.order - b.order
  );
}
