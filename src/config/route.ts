/**
 * Gateway API HTTPRoute and GRPCRoute (gateway.networking.k8s.io/v1) attached to Services, the
 * GAMMA mesh pattern (design.md section 5). On a Service port that speaks HTTP (its appProtocol or
 * name says so) the node proxy routes each request: the rules' matches (path, method, headers,
 * query parameters) in Gateway API's precedence, then a backend by weight. On any other port a
 * route can only split connections, so there it may hold no more than weighted backends (the
 * config store checks that against the Service). What the proxy does not apply yet (filters,
 * timeouts, retries, session persistence, gRPC matches) is refused with the field named, never
 * half applied.
 */
import { parseFilters, type RouteFilter } from './route-filters.js';
import { parseDuration } from './schemas.js';
import { DNS1123_LABEL, HEADER_NAME, ObjectInvalid, list, object, only, type Json } from './fields.js';
import { parseMetadata, portProtocol, speaksRequests, type ServicePort } from './service.js';

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
  /** Relative share of requests (of connections on a TCP port); Gateway API: 0 to 1,000,000, default 1. */
  readonly weight: number;
  /** Header modifiers applied when this backend takes the request (empty: none). */
  readonly filters?: ReadonlyArray<RouteFilter>;
}

export interface PathMatch {
  readonly type: 'Exact' | 'PathPrefix' | 'RegularExpression';
  /** For PathPrefix without its trailing "/" (except the root "/"). */
  readonly value: string;
  readonly regex?: RegExp;
}

/** A header (name in lower case) or query parameter (name as written) match. */
export interface ValueMatch {
  readonly type: 'Exact' | 'RegularExpression';
  readonly name: string;
  readonly value: string;
  readonly regex?: RegExp;
}

/** A GRPCRoute method match as written (its `path` is what the proxy matches: /service/method). */
export interface GrpcMethodMatch {
  readonly type: 'Exact' | 'RegularExpression';
  readonly service?: string;
  readonly method?: string;
}

/** One of a rule's matches: every condition in it must hold. */
export interface RouteMatch {
  readonly path: PathMatch;
  /** GRPCRoute only: the method match `path` was made from (the wire carries it as written). */
  readonly grpc?: GrpcMethodMatch;
  readonly method?: string;
  readonly headers: ReadonlyArray<ValueMatch>;
  readonly queryParams: ReadonlyArray<ValueMatch>;
}

/** Gateway API HTTPRouteTimeouts; a field left out (or "0s") sets no limit. */
export interface RouteTimeouts {
  /** From the request's head to the end of its answer, retries included: 504 after it. */
  readonly requestMs?: number;
  /** Each attempt, to the answer's head: a retry follows when the rule's retry allows. */
  readonly backendRequestMs?: number;
}

/** Gateway API HTTPRouteRetry (GEP-1731). */
export interface RouteRetry {
  /** Retries after the first attempt (at most). */
  readonly attempts: number;
  /** Answers retried; connect failures, resets and per-try timeouts are retried too. */
  readonly codes: ReadonlyArray<number>;
  /** Base of the exponential backoff with full jitter (the n-th retry waits up to base * 2^(n-1), at most 10 times base). */
  readonly backoffMs: number;
}

export interface RouteRule {
  readonly name?: string;
  /** At least one; a request matching any of them takes the rule. */
  readonly matches: ReadonlyArray<RouteMatch>;
  readonly backends: ReadonlyArray<RouteBackend>;
  readonly timeouts?: RouteTimeouts;
  readonly retry?: RouteRetry;
  /** In the order written (Gateway API applies them in order). */
  readonly filters?: ReadonlyArray<RouteFilter>;
}

/** Retries when a route's retry does not say (GEP-1731 leaves the defaults to implementations; Envoy's). */
export const RETRY_DEFAULTS = Object.freeze({ attempts: 1, backoffMs: 25 });
const MAX_ATTEMPTS = 10;
const MAX_TIMEOUT_MS = 3_600_000;

export interface ServiceRoute {
  readonly kind: RouteKind;
  readonly namespace: string;
  readonly name: string;
  /** The Services whose traffic the route takes (parentRefs). */
  readonly parents: ReadonlyArray<RouteRef>;
  readonly rules: ReadonlyArray<RouteRule>;
  /** Every rule's backends, in order (what the route may send traffic to). */
  readonly backends: ReadonlyArray<RouteBackend>;
}

/** Gateway API's default match: every request (PathPrefix "/"). */
export const DEFAULT_PATH: PathMatch = Object.freeze({ type: 'PathPrefix', value: '/' });
export const ALL_REQUESTS: RouteMatch = Object.freeze({ path: DEFAULT_PATH, headers: Object.freeze([]), queryParams: Object.freeze([]) });

const MAX_WEIGHT = 1_000_000;

function name(v: unknown, field: string): string {
  if (typeof v !== 'string' || !DNS1123_LABEL.test(v) || v.length > 63) throw new ObjectInvalid(field, `${field} must be the name of a Service (a DNS-1123 label)`);
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

const HTTP_RULE_FIELDS = ['name', 'matches', 'filters', 'backendRefs', 'timeouts', 'retry', 'sessionPersistence'];
const GRPC_RULE_FIELDS = ['name', 'matches', 'filters', 'backendRefs', 'sessionPersistence'];
/** Rule fields the proxy does not apply yet: refused, never half applied. */
const NOT_YET = ['sessionPersistence'];
const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE', 'PATCH'];
const MAX_REGEX = 1024;

/**
 * A regular expression of a match, compiled whole-string. Gateway API leaves the dialect to the
 * implementation; nodemesh takes RE2's subset, which JavaScript runs the same way, and refuses what
 * RE2 does not have (backreferences, lookaround), so a route means the same in every mesh that
 * reads it.
 */
export function compileRegex(source: string, field: string): RegExp {
  if (source.length === 0 || source.length > MAX_REGEX) throw new ObjectInvalid(field, `${field} must be a regular expression of 1-${MAX_REGEX} characters`);
  if (/\(\?<?[=!]|\\[1-9]|\\k</.test(source)) throw new ObjectInvalid(field, `${field} "${source}": lookaround and backreferences are not part of RE2's syntax, which routes use`);
  try {
    return new RegExp(`^(?:${source})$`, 'u');
  } catch (e) {
    throw new ObjectInvalid(field, `${field} "${source}" is not a valid regular expression: ${(e as Error).message}`);
  }
}

function string(v: unknown, field: string, max = 4096): string {
  if (typeof v !== 'string' || v.length === 0 || v.length > max) throw new ObjectInvalid(field, `${field} must be a string of 1-${max} characters`);
  return v;
}

function matchType<T extends string>(v: unknown, allowed: ReadonlyArray<T>, fallback: T, field: string): T {
  if (v === undefined) return fallback;
  const found = allowed.find((a) => a === v);
  if (!found) throw new ObjectInvalid(field, `${field} "${String(v)}" must be one of ${allowed.join(', ')}`);
  return found;
}

function parsePath(v: unknown, at: string): PathMatch {
  if (v === undefined) return DEFAULT_PATH;
  const p = object(v, at);
  only(p, ['type', 'value'], `${at}.`);
  const type = matchType(p['type'], ['Exact', 'PathPrefix', 'RegularExpression'] as const, 'PathPrefix', `${at}.type`);
  const value = p['value'] === undefined ? '/' : string(p['value'], `${at}.value`);
  if (type === 'RegularExpression') return { type, value, regex: compileRegex(value, `${at}.value`) };
  if (!value.startsWith('/')) throw new ObjectInvalid(`${at}.value`, `${at}.value "${value}" must start with "/"`);
  if (/\/\/|\/\.\.?(\/|$)|[?#%]/.test(value)) throw new ObjectInvalid(`${at}.value`, `${at}.value "${value}" must be a plain path (no "//", "/./", "/../", "?", "#" or "%")`);
  // A prefix matches element by element, and its trailing "/" is ignored ("/abc/" is "/abc").
  return { type, value: type === 'PathPrefix' && value.length > 1 ? value.replace(/\/+$/, '') : value };
}

function parseValueMatches(v: unknown, at: string, lowerCaseNames: boolean): ValueMatch[] {
  const seen = new Set<string>();
  return list(v, at, 16).map((m, i) => {
    const f = `${at}[${i}]`;
    const o = object(m, f);
    only(o, ['type', 'name', 'value'], `${f}.`);
    const type = matchType(o['type'], ['Exact', 'RegularExpression'] as const, 'Exact', `${f}.type`);
    const given = string(o['name'], `${f}.name`, 256);
    if (lowerCaseNames && !HEADER_NAME.test(given)) throw new ObjectInvalid(`${f}.name`, `${f}.name "${given}" is not a valid header name`);
    const name = lowerCaseNames ? given.toLowerCase() : given;
    // Gateway API: a second match on the same name is ignored; nodemesh refuses it rather than guess.
    if (seen.has(name)) throw new ObjectInvalid(`${f}.name`, `${f}.name "${given}" appears twice in one match`);
    seen.add(name);
    const value = string(o['value'], `${f}.value`);
    return type === 'RegularExpression' ? { type, name, value, regex: compileRegex(value, `${f}.value`) } : { type, name, value };
  });
}

/** A Gateway API duration ("10s", "500ms", "1m30s"); 0 means none. */
function timeout(v: unknown, field: string): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'string') throw new ObjectInvalid(field, `${field} must be a duration such as 10s or 500ms`);
  const ms = parseDuration(v, field);
  if (ms > MAX_TIMEOUT_MS) throw new ObjectInvalid(field, `${field} "${v}" is over 1h`);
  return ms === 0 ? undefined : ms;
}

function parseTimeouts(v: unknown, at: string): RouteTimeouts | undefined {
  if (v === undefined) return undefined;
  const t = object(v, at);
  only(t, ['request', 'backendRequest'], `${at}.`);
  const requestMs = timeout(t['request'], `${at}.request`);
  const backendRequestMs = timeout(t['backendRequest'], `${at}.backendRequest`);
  // Gateway API: an attempt cannot be given longer than the whole request.
  if (requestMs !== undefined && backendRequestMs !== undefined && backendRequestMs > requestMs) throw new ObjectInvalid(`${at}.backendRequest`, `${at}.backendRequest (${backendRequestMs} ms) must not be longer than ${at}.request (${requestMs} ms)`);
  if (requestMs === undefined && backendRequestMs === undefined) return undefined;
  return { ...(requestMs === undefined ? {} : { requestMs }), ...(backendRequestMs === undefined ? {} : { backendRequestMs }) };
}

function parseRetry(v: unknown, at: string): RouteRetry | undefined {
  if (v === undefined) return undefined;
  const r = object(v, at);
  only(r, ['codes', 'attempts', 'backoff'], `${at}.`);
  const attempts = r['attempts'] ?? RETRY_DEFAULTS.attempts;
  if (typeof attempts !== 'number' || !Number.isInteger(attempts) || attempts < 0 || attempts > MAX_ATTEMPTS) throw new ObjectInvalid(`${at}.attempts`, `${at}.attempts must be a whole number 0-${MAX_ATTEMPTS}`);
  const codes = list(r['codes'], `${at}.codes`, 32).map((c, i) => {
    if (typeof c !== 'number' || !Number.isInteger(c) || c < 400 || c > 599) throw new ObjectInvalid(`${at}.codes[${i}]`, `${at}.codes[${i}] must be an HTTP status 400-599`);
    return c;
  });
  const backoffMs = r['backoff'] === undefined ? RETRY_DEFAULTS.backoffMs : (timeout(r['backoff'], `${at}.backoff`) ?? 0);
  return { attempts, codes: [...new Set(codes)], backoffMs };
}

/** Gateway API's GRPCMethodMatch patterns for Exact matches. */
const GRPC_SERVICE = /^(?:\.?[A-Za-z_][A-Za-z_0-9]*)(?:\.[A-Za-z_][A-Za-z_0-9]*)*$/;
const GRPC_METHOD = /^[A-Za-z_][A-Za-z_0-9]*$/;

/**
 * A GRPCRoute match: `method` (service and/or method, Exact or RegularExpression) becomes the
 * path a gRPC request has ("/package.Service/Method"), so one matcher serves both kinds: both
 * Exact is an Exact path, a service alone a PathPrefix, anything else a RegularExpression.
 */
function parseGrpcMatch(v: unknown, at: string): RouteMatch {
  const m = object(v, at);
  only(m, ['method', 'headers'], `${at}.`);
  const headers = parseValueMatches(m['headers'], `${at}.headers`, true);
  if (m['method'] === undefined) return { path: DEFAULT_PATH, headers, queryParams: [] };
  const mm = object(m['method'], `${at}.method`);
  only(mm, ['type', 'service', 'method'], `${at}.method.`);
  const type = matchType(mm['type'], ['Exact', 'RegularExpression'] as const, 'Exact', `${at}.method.type`);
  const service = mm['service'] === undefined ? undefined : string(mm['service'], `${at}.method.service`, 1024);
  const method = mm['method'] === undefined ? undefined : string(mm['method'], `${at}.method.method`, 1024);
  if (service === undefined && method === undefined) throw new ObjectInvalid(`${at}.method`, `${at}.method needs a service, a method or both`);
  const grpc: GrpcMethodMatch = { type, ...(service === undefined ? {} : { service }), ...(method === undefined ? {} : { method }) };
  if (type === 'Exact') {
    if (service !== undefined && !GRPC_SERVICE.test(service)) throw new ObjectInvalid(`${at}.method.service`, `${at}.method.service "${service}" is not a gRPC service name (package.Service)`);
    if (method !== undefined && !GRPC_METHOD.test(method)) throw new ObjectInvalid(`${at}.method.method`, `${at}.method.method "${method}" is not a gRPC method name`);
    if (service !== undefined && method !== undefined) return { path: { type: 'Exact', value: `/${service}/${method}` }, grpc, headers, queryParams: [] };
    if (service !== undefined) return { path: { type: 'PathPrefix', value: `/${service}` }, grpc, headers, queryParams: [] };
  }
  const part = (p: string | undefined, field: string): string => {
    if (p === undefined) return '[^/]+';
    if (type === 'Exact') return p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    compileRegex(p, field);
    return `(?:${p})`;
  };
  const source = `/${part(service, `${at}.method.service`)}/${part(method, `${at}.method.method`)}`;
  return { path: { type: 'RegularExpression', value: source, regex: compileRegex(source, `${at}.method`) }, grpc, headers, queryParams: [] };
}

function parseHttpMatch(v: unknown, at: string): RouteMatch {
  const m = object(v, at);
  only(m, ['path', 'headers', 'queryParams', 'method'], `${at}.`);
  const method = m['method'] === undefined ? undefined : matchType(m['method'], METHODS, 'GET', `${at}.method`);
  return { path: parsePath(m['path'], `${at}.path`), ...(method === undefined ? {} : { method }), headers: parseValueMatches(m['headers'], `${at}.headers`, true), queryParams: parseValueMatches(m['queryParams'], `${at}.queryParams`, false) };
}

/** Whether a route asks for anything beyond weighted backends for every request (it needs an HTTP port). */
export function needsHttp(route: Pick<ServiceRoute, 'rules'>): boolean {
  if (route.rules.some((r) => r.timeouts !== undefined || r.retry !== undefined || r.filters !== undefined || r.backends.some((b) => b.filters !== undefined))) return true;
  const everyRequest = (m: RouteMatch): boolean => m.path.type === 'PathPrefix' && m.path.value === '/' && m.method === undefined && m.headers.length === 0 && m.queryParams.length === 0;
  return route.rules.length > 1 || route.rules.some((r) => !r.matches.every(everyRequest));
}

export function parseRoute(doc: Json): ServiceRoute {
  const kind = doc['kind'] as RouteKind;
  only(doc, ['apiVersion', 'kind', 'metadata', 'spec', 'status'], '');
  const { name: routeName, namespace } = parseMetadata(doc['metadata']);
  const spec = object(doc['spec'], 'spec');
  only(spec, ['parentRefs', 'hostnames', 'rules'], 'spec.');
  const notYet = (field: string, what: string): ObjectInvalid => new ObjectInvalid(field, `${field}: ${what} is not applied by this version of nodemesh yet (it routes requests by match and weight): the route is refused rather than applied in part`);

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
  // Hostnames do not apply to mesh routes (GAMMA: the parent Service is what is matched).
  list(spec['hostnames'], 'spec.hostnames', 16).forEach((h, i) => {
    if (typeof h !== 'string') throw new ObjectInvalid(`spec.hostnames[${i}]`, `spec.hostnames[${i}] must be a string`);
  });

  const ruleDocs = list(spec['rules'], 'spec.rules', 16);
  if (ruleDocs.length === 0) throw new ObjectInvalid('spec.rules', 'spec.rules must have a rule');
  const rules = ruleDocs.map((r, ri): RouteRule => {
    const at = `spec.rules[${ri}]`;
    const rule = object(r, at);
    only(rule, kind === 'GRPCRoute' ? GRPC_RULE_FIELDS : HTTP_RULE_FIELDS, `${at}.`);
    for (const f of NOT_YET) if (rule[f] !== undefined) throw notYet(`${at}.${f}`, f);
    const matchDocs = list(rule['matches'], `${at}.matches`, 64);
    const parseMatch = kind === 'GRPCRoute' ? parseGrpcMatch : parseHttpMatch;
    const matches = matchDocs.length === 0 ? [ALL_REQUESTS] : matchDocs.map((m, mi) => parseMatch(m, `${at}.matches[${mi}]`));
    const refs = { namespace: (v: unknown, field: string) => sameNamespace(v, namespace, field, 'backends'), name };
    const filters = parseFilters(rule['filters'], `${at}.filters`, 'rule', refs);
    // GRPCRoute's filters: header modifiers and mirrors (Gateway API has no rewrite or redirect for gRPC).
    const notGrpc = kind === 'GRPCRoute' ? filters.findIndex((f) => f.type === 'URLRewrite' || f.type === 'RequestRedirect') : -1;
    if (notGrpc >= 0) throw new ObjectInvalid(`${at}.filters[${notGrpc}].type`, `${at}.filters[${notGrpc}].type ${filters[notGrpc]?.type ?? ''} is not a GRPCRoute filter`);
    const redirects = filters.some((f) => f.type === 'RequestRedirect');
    // ReplacePrefixMatch replaces what a PathPrefix match matched: no other kind of match has a prefix.
    const byPrefix = filters.findIndex((f) => (f.type === 'URLRewrite' || f.type === 'RequestRedirect') && f.path?.type === 'ReplacePrefixMatch');
    if (byPrefix >= 0 && !matches.every((m) => m.path.type === 'PathPrefix')) throw new ObjectInvalid(`${at}.filters[${byPrefix}]`, `${at}.filters[${byPrefix}]: ReplacePrefixMatch needs every match of the rule to be a PathPrefix`);
    const backendRefs = list(rule['backendRefs'], `${at}.backendRefs`, 16);
    // A redirect answers the request itself: it needs no backend (and sends to none).
    if (redirects && backendRefs.length > 0) throw new ObjectInvalid(`${at}.backendRefs`, `${at}.backendRefs: a rule with a RequestRedirect sends no request to a backend`);
    if (backendRefs.length === 0 && !redirects) throw new ObjectInvalid(`${at}.backendRefs`, `${at}.backendRefs must name at least one Service`);
    const backends = backendRefs.map((b, i): RouteBackend => {
      const bat = `${at}.backendRefs[${i}]`;
      const ref = object(b, bat);
      only(ref, ['group', 'kind', 'namespace', 'name', 'port', 'weight', 'filters'], `${bat}.`);
      serviceRef(ref, bat, 'Service');
      const backendFilters = parseFilters(ref['filters'], `${bat}.filters`, 'backend', refs);
      const p = port(ref['port'], `${bat}.port`);
      if (p === undefined) throw new ObjectInvalid(`${bat}.port`, `${bat}.port is required for a Service backend`);
      const weight = ref['weight'] ?? 1;
      if (typeof weight !== 'number' || !Number.isInteger(weight) || weight < 0 || weight > MAX_WEIGHT) throw new ObjectInvalid(`${bat}.weight`, `${bat}.weight must be a whole number 0-${MAX_WEIGHT}`);
      return { namespace: sameNamespace(ref['namespace'], namespace, `${bat}.namespace`, 'backends'), name: name(ref['name'], `${bat}.name`), port: p, weight, ...(backendFilters.length > 0 ? { filters: backendFilters } : {}) };
    });
    // Gateway API answers every request of such a rule 500; nodemesh refuses the route instead,
    // since no traffic can be meant to go that way.
    if (!redirects && backends.every((b) => b.weight === 0)) throw new ObjectInvalid(`${at}.backendRefs`, `${at}.backendRefs: the weights sum to 0, so no request could go anywhere`);
    const ruleName = rule['name'] === undefined ? undefined : name(rule['name'], `${at}.name`);
    const timeouts = parseTimeouts(rule['timeouts'], `${at}.timeouts`);
    const retry = parseRetry(rule['retry'], `${at}.retry`);
    return { ...(ruleName === undefined ? {} : { name: ruleName }), matches, backends, ...(timeouts ? { timeouts } : {}), ...(retry ? { retry } : {}), ...(filters.length > 0 ? { filters } : {}) };
  });
  // Where the route may send traffic: the rules' backends, and the Services requests are mirrored to.
  const mirrors = rules.flatMap((r) => (r.filters ?? []).flatMap((f) => (f.type === 'RequestMirror' ? [{ ...f.backend, weight: 0 }] : [])));
  const backends = [...rules.flatMap((r) => r.backends), ...mirrors];
  return { kind, namespace, name: routeName, parents, rules, backends };
}

/**
 * What a route needs from the rest of the config: its parents and backends must be Services that
 * exist, with the ports it names; a route that matches requests needs parent ports that speak
 * HTTP/1.1 (HTTP/2 and gRPC ports are not terminated yet). The first problem, with its field, or
 * undefined.
 */
export function checkRouteRefs(route: ServiceRoute, services: ReadonlyMap<string, { readonly ports: ReadonlyArray<Pick<ServicePort, 'port' | 'name' | 'appProtocol'>> }>): { field: string; message: string } | undefined {
  const check = (ref: RouteRef, at: string): { field: string; message: string } | undefined => {
    const svc = services.get(`${ref.namespace}/${ref.name}`);
    if (!svc) return { field: `${at}.name`, message: `${at}.name: Service ${ref.namespace}/${ref.name} does not exist` };
    if (ref.port !== undefined && !svc.ports.some((p) => p.port === ref.port)) return { field: `${at}.port`, message: `${at}.port: Service ${ref.namespace}/${ref.name} has no port ${ref.port}` };
    return undefined;
  };
  const l7 = needsHttp(route);
  for (const [i, p] of route.parents.entries()) {
    const bad = check(p, `spec.parentRefs[${i}]`);
    if (bad) return bad;
    // A port that says no protocol is sniffed; one that says something else than HTTP cannot be routed by request.
    const notHttp = l7 ? services.get(`${p.namespace}/${p.name}`)?.ports.find((sp) => (p.port === undefined || sp.port === p.port) && speaksRequests(sp) === undefined && portProtocol(sp) !== 'unknown') : undefined;
    if (notHttp) {
      const field = `spec.parentRefs[${i}]${p.port === undefined ? '' : '.port'}`;
      const speaks = portProtocol(notHttp);
      const why = `speaks ${speaks}, whose requests nodemesh cannot read`;
      return { field, message: `${field}: the route works per request (matches, timeouts, retries), so its parent port must speak HTTP (1.1, h2c or gRPC); Service ${p.namespace}/${p.name} port ${notHttp.port} ${why}` };
    }
  }
  for (const [ri, rule] of route.rules.entries()) {
    for (const [i, b] of rule.backends.entries()) {
      const bad = check(b, `spec.rules[${ri}].backendRefs[${i}]`);
      if (bad) return bad;
    }
    for (const [i, f] of (rule.filters ?? []).entries()) {
      const bad = f.type === 'RequestMirror' ? check(f.backend, `spec.rules[${ri}].filters[${i}].requestMirror.backendRef`) : undefined;
      if (bad) return bad;
    }
  }
  return undefined;
}

