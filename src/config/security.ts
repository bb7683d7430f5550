/**
 * PeerAuthentication and AuthorizationPolicy (security.nodemesh.io/v1, Istio's security.istio.io/v1
 * schemas field for field): validated against their CRD schemas, then turned into immutable
 * values. What nodemesh cannot enforce (a JWT's claims, CUSTOM authorizers, gateway attachment)
 * is refused with the field named, never ignored: a policy that seems to protect something and
 * does not is worse than none. Request attributes (hosts, methods, paths, request headers) are
 * evaluated per request where the destination's port speaks HTTP, with Istio's TCP semantics
 * elsewhere. The proxy evaluates
 * them (proxy/policy.ts); this module only says what a valid policy is, for the config edge and
 * the wire edge alike (checkPeerAuthentication, checkAuthorizationPolicy).
 */
import { parseAddressBlock } from '../shared/address.js';
import type { DefaultMtlsMode } from './mesh.js';
import { HEADER_NAME } from './fields.js';
import { schemas } from './schemas.js';
import { ObjectInvalid, parseMetadata } from './service.js';

export const SECURITY_API = 'security.nodemesh.io/v1';

/** UNSET inherits (workload -> namespace -> mesh); DISABLE plaintext only; PERMISSIVE both; STRICT mTLS only. */
export type MtlsMode = 'UNSET' | 'DISABLE' | 'PERMISSIVE' | 'STRICT';
export const MTLS_MODES: ReadonlyArray<MtlsMode> = ['UNSET', 'DISABLE', 'PERMISSIVE', 'STRICT'];

export interface PeerAuthentication {
  readonly namespace: string;
  readonly name: string;
  /** matchLabels; empty: every workload of the namespace (of the mesh, in the root namespace). */
  readonly selector: Readonly<Record<string, string>>;
  readonly mode: MtlsMode;
  /** The workload's port number (as a string) -> its mode. Only with a selector. */
  readonly portModes: Readonly<Record<string, MtlsMode>>;
}

export type AuthorizationAction = 'ALLOW' | 'DENY' | 'AUDIT';

/** The connection attributes a `when` condition may name (Istio's, known before any HTTP is read). */
export const CONDITION_KEYS = ['source.ip', 'remote.ip', 'source.namespace', 'source.principal', 'destination.ip', 'destination.port'] as const;
/** A request header's value (Istio's `request.headers[name]`): evaluated per request, on HTTP ports only. */
export type HeaderConditionKey = `request.headers[${string}]`;
export type ConditionKey = (typeof CONDITION_KEYS)[number] | HeaderConditionKey;

/** The header a `request.headers[name]` key names (lower case), or undefined for any other key. */
export function conditionHeader(key: string): string | undefined {
  const m = /^request\.headers\[([^\]]+)\]$/.exec(key);
  return m ? (m[1] ?? '').toLowerCase() : undefined;
}

export interface AuthorizationSource {
  readonly principals: ReadonlyArray<string>;
  readonly notPrincipals: ReadonlyArray<string>;
  readonly namespaces: ReadonlyArray<string>;
  readonly notNamespaces: ReadonlyArray<string>;
  readonly ipBlocks: ReadonlyArray<string>;
  readonly notIpBlocks: ReadonlyArray<string>;
  /** "namespace/name" */
  readonly serviceAccounts: ReadonlyArray<string>;
  readonly notServiceAccounts: ReadonlyArray<string>;
}

export interface AuthorizationOperation {
  readonly ports: ReadonlyArray<number>;
  readonly notPorts: ReadonlyArray<number>;
  /** The request's Host (case-insensitive; a value without a port matches any port). HTTP only, as the four below. */
  readonly hosts: ReadonlyArray<string>;
  readonly notHosts: ReadonlyArray<string>;
  readonly methods: ReadonlyArray<string>;
  readonly notMethods: ReadonlyArray<string>;
  /** The request's normalized path, without its query. */
  readonly paths: ReadonlyArray<string>;
  readonly notPaths: ReadonlyArray<string>;
}

/** The operation fields only a request has (Istio calls them HTTP-only). */
export const REQUEST_OPERATION_FIELDS = ['hosts', 'notHosts', 'methods', 'notMethods', 'paths', 'notPaths'] as const;

/**
 * Whether a rule names anything only a request has. On a port the destination does not read as
 * HTTP such a rule follows Istio's TCP semantics (proxy/policy.ts): in an ALLOW policy it matches
 * nothing, in a DENY policy its request fields are left out, so it denies more, never less.
 */
export function ruleNeedsRequest(r: AuthorizationRule): boolean {
  return r.to.some((o) => REQUEST_OPERATION_FIELDS.some((f) => o[f].length > 0)) || r.when.some((c) => conditionHeader(c.key) !== undefined);
}

export interface AuthorizationCondition {
  readonly key: ConditionKey;
  readonly values: ReadonlyArray<string>;
  readonly notValues: ReadonlyArray<string>;
}

export interface AuthorizationRule {
  /** Any of them (none: any source). */
  readonly from: ReadonlyArray<AuthorizationSource>;
  /** Any of them (none: any destination port). */
  readonly to: ReadonlyArray<AuthorizationOperation>;
  /** All of them. */
  readonly when: ReadonlyArray<AuthorizationCondition>;
}

export interface AuthorizationPolicy {
  readonly namespace: string;
  readonly name: string;
  readonly selector: Readonly<Record<string, string>>;
  readonly action: AuthorizationAction;
  /** The policy matches a connection if any rule does; no rules: it matches none (an ALLOW policy then allows nothing). */
  readonly rules: ReadonlyArray<AuthorizationRule>;
}

/** The security part of a config snapshot: what the proxy's policy engine is built from. */
export interface SecurityConfig {
  readonly peerAuthentications: ReadonlyArray<PeerAuthentication>;
  readonly authorizationPolicies: ReadonlyArray<AuthorizationPolicy>;
  readonly mtlsMode: DefaultMtlsMode;
}

export const NO_SECURITY: SecurityConfig = Object.freeze({ peerAuthentications: [], authorizationPolicies: [], mtlsMode: 'PERMISSIVE' });

/** A field that is wrong, and why (the wire edge turns it into a Nack, the config edge into an issue). */
export interface SecurityIssue {
  readonly field: string;
  readonly message: string;
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);
const strings = (v: unknown): string[] => (Array.isArray(v) ? v.map(String) : []);

/**
 * The rules of a policy as they read where no request is read (Istio's TCP semantics): ALLOW and
 * AUDIT rules that name request attributes are left out (they match nothing); DENY rules lose
 * their request attributes (they match more). What proxy/policy.ts evaluates on an L4 port, and
 * what an agent that predates request attributes is sent.
 */
export function tcpReading(p: AuthorizationPolicy): AuthorizationRule[] {
  if (p.action !== 'DENY') return p.rules.filter((r) => !ruleNeedsRequest(r));
  const noRequest = { hosts: [], notHosts: [], methods: [], notMethods: [], paths: [], notPaths: [] };
  return p.rules.map((r) => Object.freeze({ from: r.from, to: r.to.map((o) => Object.freeze({ ...o, ...noRequest })), when: r.when.filter((c) => conditionHeader(c.key) === undefined) }));
}

const NO_JWT = 'needs a request\'s JWT (RequestAuthentication), which nodemesh does not validate; refused rather than ignored';
/** Source fields Istio evaluates from a JWT. */
const JWT_SOURCE_FIELDS = ['requestPrincipals', 'notRequestPrincipals'];

/** A port number 1-65535 from its decimal text (Istio writes ports as strings). */
function portOf(text: string): number | undefined {
  if (!/^[1-9][0-9]{0,4}$/.test(text)) return undefined;
  const n = Number(text);
  return n <= 65535 ? n : undefined;
}

/** Istio's string match: exact, "prefix*", "*suffix", or "*" (any non-empty value). */
function checkPattern(value: string, field: string): SecurityIssue | undefined {
  if (value === '') return { field, message: `${field} has an empty value` };
  if (value.slice(1, -1).includes('*')) return { field, message: `${field} "${value}": "*" may only start or end a value` };
  return undefined;
}

function checkServiceAccount(value: string, field: string): SecurityIssue | undefined {
  return /^[a-z0-9]([-a-z0-9]*[a-z0-9])?\/[a-z0-9]([-.a-z0-9]*[a-z0-9])?$/.test(value) ? undefined : { field, message: `${field} "${value}" is not "namespace/serviceaccount"` };
}

function checkCidr(value: string, field: string): SecurityIssue | undefined {
  return parseAddressBlock(value) ? undefined : { field, message: `${field} "${value}" is not an IP address or CIDR block` };
}

function checkPort(value: number, field: string): SecurityIssue | undefined {
  return Number.isInteger(value) && value >= 1 && value <= 65535 ? undefined : { field, message: `${field} ${value} is not a port (1-65535)` };
}

/** A path pattern: Istio's string match on a path, which starts with "/" unless it is a "*" pattern. */
function checkPathPattern(value: string, field: string): SecurityIssue | undefined {
  const bad = checkPattern(value, field);
  if (bad) return bad;
  return value.startsWith('/') || value.startsWith('*') ? undefined : { field, message: `${field} "${value}" is not a path (it starts with "/", or "*" for a suffix)` };
}

/** The first thing wrong with a condition's values for its key. */
function checkConditionValue(key: ConditionKey, value: string, field: string): SecurityIssue | undefined {
  if (key === 'source.ip' || key === 'remote.ip' || key === 'destination.ip') return checkCidr(value, field);
  if (key === 'destination.port') return portOf(value) === undefined ? { field, message: `${field} "${value}" is not a port (1-65535)` } : undefined;
  return checkPattern(value, field);
}

/** How each source field's values are checked. */
const SOURCE_CHECKS: ReadonlyArray<readonly [keyof AuthorizationSource, (value: string, field: string) => SecurityIssue | undefined]> = [
  ['principals', checkPattern],
  ['notPrincipals', checkPattern],
  ['namespaces', checkPattern],
  ['notNamespaces', checkPattern],
  ['ipBlocks', checkCidr],
  ['notIpBlocks', checkCidr],
  ['serviceAccounts', checkServiceAccount],
  ['notServiceAccounts', checkServiceAccount],
];

/** Semantic checks of a PeerAuthentication, whichever edge it came through. */
export function checkPeerAuthentication(p: PeerAuthentication): SecurityIssue | undefined {
  if (!MTLS_MODES.includes(p.mode)) return { field: 'spec.mtls.mode', message: `"${p.mode}" is not one of ${MTLS_MODES.join(', ')}` };
  const ports = Object.entries(p.portModes);
  if (ports.length > 0 && Object.keys(p.selector).length === 0) {
    return { field: 'spec.portLevelMtls', message: 'spec.portLevelMtls needs a workload selector (spec.selector.matchLabels), as in Istio: a port means something only for a given workload' };
  }
  for (const [port, mode] of ports) {
    if (portOf(port) === undefined) return { field: `spec.portLevelMtls.${port}`, message: `"${port}" is not a port (1-65535)` };
    if (!MTLS_MODES.includes(mode)) return { field: `spec.portLevelMtls.${port}.mode`, message: `"${mode}" is not one of ${MTLS_MODES.join(', ')}` };
  }
  return undefined;
}

/** Semantic checks of an AuthorizationPolicy (actions, addresses, ports, condition keys), whichever edge it came through. */
export function checkAuthorizationPolicy(p: AuthorizationPolicy): SecurityIssue | undefined {
  if (!(['ALLOW', 'DENY', 'AUDIT'] as ReadonlyArray<string>).includes(p.action)) return { field: 'spec.action', message: `"${p.action}" is not ALLOW, DENY or AUDIT` };
  for (const [i, rule] of p.rules.entries()) {
    for (const [j, s] of rule.from.entries()) {
      for (const [f, check] of SOURCE_CHECKS) {
        for (const [k, v] of s[f].entries()) {
          const bad = check(v, `spec.rules[${i}].from[${j}].source.${f}[${k}]`);
          if (bad) return bad;
        }
      }
    }
    for (const [j, o] of rule.to.entries()) {
      for (const f of ['ports', 'notPorts'] as const) {
        for (const [k, v] of o[f].entries()) {
          const bad = checkPort(v, `spec.rules[${i}].to[${j}].operation.${f}[${k}]`);
          if (bad) return bad;
        }
      }
      for (const f of REQUEST_OPERATION_FIELDS) {
        for (const [k, v] of o[f].entries()) {
          const field = `spec.rules[${i}].to[${j}].operation.${f}[${k}]`;
          const bad = f === 'paths' || f === 'notPaths' ? checkPathPattern(v, field) : checkPattern(v, field);
          if (bad) return bad;
        }
      }
    }
    for (const [j, c] of rule.when.entries()) {
      const at = `spec.rules[${i}].when[${j}]`;
      if (!(CONDITION_KEYS as ReadonlyArray<string>).includes(c.key) && conditionHeader(c.key) === undefined) {
        return { field: `${at}.key`, message: `"${c.key}" is not an attribute nodemesh evaluates (${CONDITION_KEYS.join(', ')}, request.headers[<name>])` };
      }
      const header = conditionHeader(c.key);
      if (header !== undefined && !HEADER_NAME.test(header)) return { field: `${at}.key`, message: `"${header}" in "${c.key}" is not a header name` };
      if (c.values.length === 0 && c.notValues.length === 0) return { field: `${at}.values`, message: `${at} needs values or notValues` };
      for (const f of ['values', 'notValues'] as const) {
        for (const [k, v] of c[f].entries()) {
          const bad = checkConditionValue(c.key, v, `${at}.${f}[${k}]`);
          if (bad) return bad;
        }
      }
    }
  }
  return undefined;
}

function fail(issue: SecurityIssue | undefined): void {
  if (issue) throw new ObjectInvalid(issue.field, issue.message);
}

function selectorOf(spec: Json): Record<string, string> {
  const selector = spec['selector'];
  return isObject(selector) && isObject(selector['matchLabels']) ? Object.freeze({ ...(selector['matchLabels'] as Record<string, string>) }) : Object.freeze({});
}

export function parsePeerAuthentication(doc: Json): PeerAuthentication {
  schemas().validate(SECURITY_API, 'PeerAuthentication', doc);
  const { name, namespace } = parseMetadata(doc['metadata']);
  const spec = isObject(doc['spec']) ? doc['spec'] : {};
  const mtls = isObject(spec['mtls']) ? spec['mtls'] : {};
  const portModes: Record<string, MtlsMode> = {};
  const ports = isObject(spec['portLevelMtls']) ? spec['portLevelMtls'] : {};
  for (const [port, v] of Object.entries(ports)) portModes[port] = ((isObject(v) ? v['mode'] : undefined) ?? 'UNSET') as MtlsMode;
  const policy: PeerAuthentication = Object.freeze({ namespace, name, selector: selectorOf(spec), mode: (mtls['mode'] ?? 'UNSET') as MtlsMode, portModes: Object.freeze(portModes) });
  fail(checkPeerAuthentication(policy));
  return policy;
}

export function parseAuthorizationPolicy(doc: Json): AuthorizationPolicy {
  schemas().validate(SECURITY_API, 'AuthorizationPolicy', doc);
  const { name, namespace } = parseMetadata(doc['metadata']);
  const spec = isObject(doc['spec']) ? doc['spec'] : {};
  const action = String(spec['action'] ?? 'ALLOW');
  if (action === 'CUSTOM' || spec['provider'] !== undefined) {
    throw new ObjectInvalid(action === 'CUSTOM' ? 'spec.action' : 'spec.provider', 'CUSTOM authorization (an external authorizer) is not supported by nodemesh: refused rather than ignored');
  }
  for (const f of ['targetRef', 'targetRefs']) {
    if (spec[f] !== undefined) throw new ObjectInvalid(`spec.${f}`, `spec.${f} attaches a policy to a gateway or waypoint, which nodemesh does not have: select workloads with spec.selector`);
  }
  const rules = (Array.isArray(spec['rules']) ? spec['rules'] : []).map((r: unknown, i: number): AuthorizationRule => {
    const rule = isObject(r) ? r : {};
    const from = (Array.isArray(rule['from']) ? rule['from'] : []).map((f: unknown, j: number): AuthorizationSource => {
      const s = isObject(f) && isObject(f['source']) ? f['source'] : {};
      for (const field of JWT_SOURCE_FIELDS) if (s[field] !== undefined) throw new ObjectInvalid(`spec.rules[${i}].from[${j}].source.${field}`, `source.${field} ${NO_JWT}`);
      // remoteIpBlocks is the client's address as X-Forwarded-For or PROXY protocol tell it, which
      // nodemesh trusts from no one (Istio's default, numTrustedProxies 0): the connection's source.
      return Object.freeze({
        principals: strings(s['principals']),
        notPrincipals: strings(s['notPrincipals']),
        namespaces: strings(s['namespaces']),
        notNamespaces: strings(s['notNamespaces']),
        ipBlocks: [...strings(s['ipBlocks']), ...strings(s['remoteIpBlocks'])],
        notIpBlocks: [...strings(s['notIpBlocks']), ...strings(s['notRemoteIpBlocks'])],
        serviceAccounts: strings(s['serviceAccounts']),
        notServiceAccounts: strings(s['notServiceAccounts']),
      });
    });
    const to = (Array.isArray(rule['to']) ? rule['to'] : []).map((t: unknown, j: number): AuthorizationOperation => {
      const o = isObject(t) && isObject(t['operation']) ? t['operation'] : {};
      const ports = (field: 'ports' | 'notPorts'): number[] =>
        strings(o[field]).map((text, k) => {
          const port = portOf(text);
          if (port === undefined) throw new ObjectInvalid(`spec.rules[${i}].to[${j}].operation.${field}[${k}]`, `"${text}" is not a port (1-65535)`);
          return port;
        });
      return Object.freeze({
        ports: ports('ports'),
        notPorts: ports('notPorts'),
        hosts: strings(o['hosts']),
        notHosts: strings(o['notHosts']),
        methods: strings(o['methods']),
        notMethods: strings(o['notMethods']),
        paths: strings(o['paths']),
        notPaths: strings(o['notPaths']),
      });
    });
    const when = (Array.isArray(rule['when']) ? rule['when'] : []).map((c: unknown, j: number): AuthorizationCondition => {
      const cond = isObject(c) ? c : {};
      const key = String(cond['key']);
      if (key.startsWith('request.auth.')) throw new ObjectInvalid(`spec.rules[${i}].when[${j}].key`, `"${key}" ${NO_JWT}`);
      // remote.ip is the connection's source here (no proxy's X-Forwarded-For is trusted): one key, which every agent knows.
      return Object.freeze({ key: (key === 'remote.ip' ? 'source.ip' : key) as ConditionKey, values: strings(cond['values']), notValues: strings(cond['notValues']) });
    });
    return Object.freeze({ from: Object.freeze(from), to: Object.freeze(to), when: Object.freeze(when) });
  });
  if (!(['ALLOW', 'DENY', 'AUDIT'] as ReadonlyArray<string>).includes(action)) throw new ObjectInvalid('spec.action', `"${action}" is not ALLOW, DENY or AUDIT`);
  const policy: AuthorizationPolicy = Object.freeze({ namespace, name, selector: selectorOf(spec), action: action as AuthorizationAction, rules: Object.freeze(rules) });
  fail(checkAuthorizationPolicy(policy));
  return policy;
}
