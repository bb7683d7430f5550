/**
 * Gateway API HTTPRoute and GRPCRoute (gateway.networking.k8s.io/v1) attached to Services, the
 * GAMMA mesh pattern (design.md section 5). The node proxy works at L4 today, so a route applies
 * when what it asks can be done per connection: one rule whose only content is weighted
 * backendRefs (canary and A/B splits between Services). Anything that needs the request itself
 * (matches beyond "every path", filters, timeouts, retries, session persistence, several rules)
 * is refused with the field named, rather than half applied.
 */
import { ObjectInvalid, parseMetadata } from './service.js';

export const GATEWAY_API = 'gateway.networking.k8s.io/v1';
export const ROUTE_KINDS = ['HTTPRoute', 'GRPCRoute'] as const;
export type RouteKind = (typeof ROUTE_KINDS)[number];

export interface RouteRef {
  readonly namespace: string;
  readonly name: string;
  /** The Service port; undefined for a parentRef without one: every port of the Service. */
  readonly port: number | undefined;
}

export interface RouteBackend extends RouteRef {
  /** Relative share of connections (Gateway API: 0 to 1,000,000, default 1). */
  readonly weight: number;
}

export interface ServiceRoute {
  readonly kind: RouteKind;
  readonly namespace: string;
  readonly name: string;
  /** The Services whose traffic the route takes (parentRefs). */
  readonly parents: ReadonlyArray<RouteRef>;
  /** Where that traffic goes, by weight. */
  readonly backends: ReadonlyArray<RouteBackend>;
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);
const MAX_WEIGHT = 1_000_000;

function only(obj: Json, allowed: ReadonlyArray<string>, at: string): void {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) throw new ObjectInvalid(`${at}${key}`, `unknown field "${at}${key}"`);
  }
}

function list(v: unknown, field: string, max: number): unknown[] {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw new ObjectInvalid(field, `${field} must be a list`);
  if (v.length > max) throw new ObjectInvalid(field, `${field} has ${v.length} entries (at most ${max})`);
  return v;
}

function object(v: unknown, field: string): Json {
  if (!isObject(v)) throw new ObjectInvalid(field, `${field} must be an object`);
  return v;
}

function name(v: unknown, field: string): string {
  if (typeof v !== 'string' || !/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(v) || v.length > 63) throw new ObjectInvalid(field, `${field} must be the name of a Service (a DNS-1123 label)`);
  return v;
}

function port(v: unknown, field: string): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 65535) throw new ObjectInvalid(field, `${field} must be a port number 1-65535`);
  return v;
}

/** group "" (or absent) and kind Service (or absent where Gateway API defaults to it). */
function serviceRef(ref: Json, at: string, kindDefault: string): void {
  const group = ref['group'] ?? '';
  const kind = ref['kind'] ?? kindDefault;
  if (group !== '' && group !== 'core') throw new ObjectInvalid(`${at}.group`, `${at}.group "${String(group)}": only core Services are supported (group "")`);
  if (kind !== 'Service') throw new ObjectInvalid(`${at}.kind`, `${at}.kind "${String(kind)}": only Services are supported (the GAMMA mesh pattern; Gateways are not)`);
}

/** A namespace other than the route's needs a ReferenceGrant, which nodemesh does not read. */
function sameNamespace(v: unknown, routeNamespace: string, field: string, what: string): string {
  if (v === undefined || v === routeNamespace) return routeNamespace;
  if (typeof v !== 'string') throw new ObjectInvalid(field, `${field} must be a string`);
  throw new ObjectInvalid(field, `${field} "${v}": ${what} in another namespace need a ReferenceGrant, which nodemesh does not support yet`);
}

/** The default match (every request) adds nothing; anything else needs L7. */
function trivialMatches(matches: unknown[]): boolean {
  return matches.every((m) => {
    if (!isObject(m)) return false;
    const keys = Object.keys(m);
    if (keys.length === 0) return true;
    if (keys.length !== 1 || keys[0] !== 'path' || !isObject(m['path'])) return false;
    const p = m['path'];
    return (p['type'] ?? 'PathPrefix') === 'PathPrefix' && (p['value'] ?? '/') === '/';
  });
}

const HTTP_RULE_FIELDS = ['name', 'matches', 'filters', 'backendRefs', 'timeouts', 'retry', 'sessionPersistence'];
const GRPC_RULE_FIELDS = ['name', 'matches', 'filters', 'backendRefs', 'sessionPersistence'];
const L7_ONLY = ['filters', 'timeouts', 'retry', 'sessionPersistence'];

export function parseRoute(doc: Json): ServiceRoute {
  const kind = doc['kind'] as RouteKind;
  only(doc, ['apiVersion', 'kind', 'metadata', 'spec', 'status'], '');
  const { name: routeName, namespace } = parseMetadata(doc['metadata']);
  const spec = object(doc['spec'], 'spec');
  only(spec, ['parentRefs', 'hostnames', 'rules'], 'spec.');
  const l7 = (field: string, why: string): ObjectInvalid => new ObjectInvalid(field, `${field}: ${why} needs L7 routing, which this version of nodemesh does not do yet (it splits connections by weight): the route is refused rather than applied in part`);

  const parentRefs = list(spec['parentRefs'], 'spec.parentRefs', 32);
  if (parentRefs.length === 0) throw new ObjectInvalid('spec.parentRefs', 'spec.parentRefs must name at least one Service');
  const parents = parentRefs.map((r, i): RouteRef => {
    const at = `spec.parentRefs[${i}]`;
    const ref = object(r, at);
    only(ref, ['group', 'kind', 'namespace', 'name', 'sectionName', 'port'], `${at}.`);
    // parentRef's kind defaults to Gateway: a mesh route must say Service.
    serviceRef(ref, at, 'Gateway');
    if (ref['sectionName'] !== undefined) throw new ObjectInvalid(`${at}.sectionName`, `${at}.sectionName is not supported for Service parents (use port)`);
    return { namespace: sameNamespace(ref['namespace'], namespace, `${at}.namespace`, 'parents'), name: name(ref['name'], `${at}.name`), port: port(ref['port'], `${at}.port`) };
  });
  const hostnames = list(spec['hostnames'], 'spec.hostnames', 16);
  hostnames.forEach((h, i) => {
    if (typeof h !== 'string') throw new ObjectInvalid(`spec.hostnames[${i}]`, `spec.hostnames[${i}] must be a string`);
  });

  const rules = list(spec['rules'], 'spec.rules', 16);
  if (rules.length === 0) throw new ObjectInvalid('spec.rules', 'spec.rules must have a rule');
  if (rules.length > 1) throw l7('spec.rules', 'more than one rule');
  const rule = object(rules[0], 'spec.rules[0]');
  only(rule, kind === 'GRPCRoute' ? GRPC_RULE_FIELDS : HTTP_RULE_FIELDS, 'spec.rules[0].');
  for (const f of L7_ONLY) if (rule[f] !== undefined) throw l7(`spec.rules[0].${f}`, f);
  const matches = list(rule['matches'], 'spec.rules[0].matches', 64);
  if (kind === 'GRPCRoute' ? matches.length > 0 : !trivialMatches(matches)) throw l7('spec.rules[0].matches', 'matching on the request');
  const backendRefs = list(rule['backendRefs'], 'spec.rules[0].backendRefs', 16);
  if (backendRefs.length === 0) throw new ObjectInvalid('spec.rules[0].backendRefs', 'spec.rules[0].backendRefs must name at least one Service');
  const backends = backendRefs.map((r, i): RouteBackend => {
    const at = `spec.rules[0].backendRefs[${i}]`;
    const ref = object(r, at);
    only(ref, ['group', 'kind', 'namespace', 'name', 'port', 'weight', 'filters'], `${at}.`);
    serviceRef(ref, at, 'Service');
    if (ref['filters'] !== undefined) throw l7(`${at}.filters`, 'filters');
    const p = port(ref['port'], `${at}.port`);
    if (p === undefined) throw new ObjectInvalid(`${at}.port`, `${at}.port is required for a Service backend`);
    const weight = ref['weight'] ?? 1;
    if (typeof weight !== 'number' || !Number.isInteger(weight) || weight < 0 || weight > MAX_WEIGHT) throw new ObjectInvalid(`${at}.weight`, `${at}.weight must be a whole number 0-${MAX_WEIGHT}`);
    return { namespace: sameNamespace(ref['namespace'], namespace, `${at}.namespace`, 'backends'), name: name(ref['name'], `${at}.name`), port: p, weight };
  });
  return { kind, namespace, name: routeName, parents, backends };
}

/**
 * What a route needs from the rest of the config: its parents and backends must be Services that
 * exist, with the ports it names. The first problem, with its field, or undefined.
 */
export function checkRouteRefs(route: ServiceRoute, services: ReadonlyMap<string, { readonly ports: ReadonlyArray<{ readonly port: number }> }>): { field: string; message: string } | undefined {
  const check = (ref: RouteRef, at: string): { field: string; message: string } | undefined => {
    const svc = services.get(`${ref.namespace}/${ref.name}`);
    if (!svc) return { field: `${at}.name`, message: `${at}.name: Service ${ref.namespace}/${ref.name} does not exist` };
    if (ref.port !== undefined && !svc.ports.some((p) => p.port === ref.port)) return { field: `${at}.port`, message: `${at}.port: Service ${ref.namespace}/${ref.name} has no port ${ref.port}` };
    return undefined;
  };
  for (const [i, p] of route.parents.entries()) {
    const bad = check(p, `spec.parentRefs[${i}]`);
    if (bad) return bad;
  }
  for (const [i, b] of route.backends.entries()) {
    const bad = check(b, `spec.rules[0].backendRefs[${i}]`);
    if (bad) return bad;
  }
  return undefined;
}
