/**
 * Access control where a destination is served (Istio's semantics): which mTLS mode a workload's
 * port takes (PeerAuthentication: workload, then namespace, then the root namespace, then the mesh
 * default) and whether a connection or a request may reach it (AuthorizationPolicy: a matching
 * DENY refuses; with ALLOW policies on the workload only what one of them matches is let through;
 * AUDIT only marks). One engine per snapshot, swapped in whole with it; the proxy asks it for
 * every connection it delivers (the same-node fast path, plaintext inbound on 15006 and HBONE on
 * 15008 alike) and, on ports it reads as HTTP, for every request.
 *
 * Rules that name request attributes (hosts, methods, paths, request headers) follow Istio's TCP
 * semantics where there is no request to read: in an ALLOW or AUDIT policy such a rule matches
 * nothing; in a DENY policy its request attributes are left out, so it denies more, never less.
 */
import { ROOT_NAMESPACE } from '../config/mesh.js';
import { conditionHeader, ruleNeedsRequest, tcpReading, type AuthorizationCondition, type AuthorizationOperation, type AuthorizationPolicy, type AuthorizationRule, type AuthorizationSource, type MtlsMode, type PeerAuthentication, type SecurityConfig } from '../config/security.js';
import { selects, type Workload } from '../config/snapshot.js';
import { byNamespaceName } from '../shared/order.js';
import { AddressRanges } from '../shared/address.js';
import { spiffeUri, type WorkloadIdentity } from '../identity/spiffe.js';

/** What the destination's side knows of a connection when it decides. */
export interface ConnectionFacts {
  readonly sourceIp: string;
  /** Who the source is, authenticated (a peer certificate, or the node itself on the same-node path); undefined: plaintext, nobody. */
  readonly peer: WorkloadIdentity | undefined;
  readonly destination: Pick<Workload, 'namespace' | 'labels'>;
  readonly destinationIp: string;
  readonly destinationPort: number;
}

/** What a request adds to its connection's facts (on ports the destination reads as HTTP). */
export interface RequestFacts {
  readonly method: string;
  /** The Host header (HTTP/1.1) or :authority, as sent. */
  readonly host: string;
  /** The normalized path, without its query (see http/common.ts normalizePath). */
  readonly path: string;
  /** A header's value by its lower-case name (several fields joined with ","). */
  header(name: string): string | undefined;
}

export type Verdict =
  | { readonly allowed: true; readonly audited: ReadonlyArray<string> }
  | {
      readonly allowed: false;
      readonly audited: ReadonlyArray<string>;
      readonly kind: 'PeerAuthentication' | 'AuthorizationPolicy';
      /** namespace/name of the deciding policy (several ALLOW policies none of which matched: all of them). */
      readonly policy: string;
      readonly reason: 'mtls_required' | 'denied_by_policy' | 'not_allowed';
    };

/** A workload's effective mode on one port, and which policy (or the mesh default) set it. */
export interface EffectiveMode {
  readonly mode: Exclude<MtlsMode, 'UNSET'>;
  readonly policy: string;
}

const MESH_DEFAULT = 'mesh-default';

/** An empty selector selects every workload (unlike a Service's). */
function appliesTo(selector: Readonly<Record<string, string>>, labels: Readonly<Record<string, string>>): boolean {
  return Object.keys(selector).length === 0 || selects(selector, labels);
}

/** Istio's string match: exact, "prefix*", "*suffix", "*" (any value, never none). */
function matches(pattern: string, value: string | undefined): boolean {
  if (value === undefined) return false;
  if (pattern === '*') return value !== '';
  if (pattern.endsWith('*')) return value.startsWith(pattern.slice(0, -1));
  if (pattern.startsWith('*')) return value.endsWith(pattern.slice(1));
  return pattern === value;
}

const nameOf = (p: { namespace: string; name: string }): string => `${p.namespace}/${p.name}`;

/** Istio's host match: case-insensitive, and a pattern without a port matches the host on any port. */
function hostMatches(pattern: string, host: string): boolean {
  const p = pattern.toLowerCase();
  const h = host.toLowerCase();
  if (matches(p, h)) return true;
  const withoutPort = h.startsWith('[') ? h.slice(0, h.indexOf(']') + 1) : h.replace(/:[0-9]*$/, '');
  return withoutPort !== h && matches(p, withoutPort);
}

/** Istio's principal of an identity: its SPIFFE ID without the scheme ("cluster.local/ns/a/sa/b"). */
const principalOf = (peer: WorkloadIdentity | undefined): string | undefined => (peer ? spiffeUri(peer).slice('spiffe://'.length) : undefined);

/** The verdict of most connections and requests: one object, never changed. */
const ALLOWED: Verdict = Object.freeze({ allowed: true, audited: Object.freeze([]) });

/**
 * What the destination's HTTP/2 engine checks of a request itself (PolicyEngine.requestGate): a
 * request that matches no `deny` operation and, when `allow` is set, one of its operations goes on
 * unread; any other is decided in JS by the full policy. Operations match as operationMatches
 * does with a request (hosts, methods, paths; Istio's string match).
 */
export interface RequestGate {
  /** Made anew for each reduction: the engine reads a gate again only when this changes. */
  readonly id: number;
  readonly deny: ReadonlyArray<GateOperation>;
  /** Undefined: no ALLOW policy applies (what no deny operation matches goes on). */
  readonly allow: ReadonlyArray<GateOperation> | undefined;
}

export type GateOperation = Pick<AuthorizationOperation, 'hosts' | 'notHosts' | 'methods' | 'notMethods' | 'paths' | 'notPaths'>;

let gates = 0;

/** No policy applies: every request goes on. */
export const OPEN_GATE: RequestGate = Object.freeze({ id: 0, deny: Object.freeze([]), allow: undefined });

const ANY_REQUEST: GateOperation = Object.freeze({ hosts: [], notHosts: [], methods: [], notMethods: [], paths: [], notPaths: [] });

const matchesAnyRequest = (o: GateOperation): boolean => o.hosts.length === 0 && o.methods.length === 0 && o.paths.length === 0 && o.notHosts.length === 0 && o.notMethods.length === 0 && o.notPaths.length === 0;

/**
 * What applies to one destination workload, worked out once per engine (a snapshot's config)
 * and workload object: the AuthorizationPolicies by action, and the mTLS mode by port. A
 * request's decision then only matches rules; before, every request filtered every policy of
 * the mesh by namespace and selector.
 */
interface Prepared {
  readonly applicable: ReadonlyArray<AuthorizationPolicy>;
  readonly audit: ReadonlyArray<AuthorizationPolicy>;
  readonly deny: ReadonlyArray<AuthorizationPolicy>;
  readonly allow: ReadonlyArray<AuthorizationPolicy>;
  readonly modes: Map<number, EffectiveMode>;
}

export class PolicyEngine {
  /** Address lists compiled once per snapshot. */
  private readonly blocks = new WeakMap<ReadonlyArray<string>, AddressRanges>();
  private readonly tcp = new WeakMap<AuthorizationPolicy, ReadonlyArray<AuthorizationRule>>();
  /** By workload object (a pod's labels change: a new object). */
  private readonly prepared = new WeakMap<Pick<Workload, 'namespace' | 'labels'>, Prepared>();
  private readonly peerAuthentications: ReadonlyArray<PeerAuthentication>;
  private readonly authorizationPolicies: ReadonlyArray<AuthorizationPolicy>;

  constructor(private readonly config: SecurityConfig) {
    this.peerAuthentications = [...config.peerAuthentications].sort(byNamespaceName);
    this.authorizationPolicies = [...config.authorizationPolicies].sort(byNamespaceName);
  }

  /** Whether any policy could refuse a connection (the proxy skips the work when none can). */
  get empty(): boolean {
    return this.authorizationPolicies.length === 0 && this.peerAuthentications.length === 0 && this.config.mtlsMode !== 'STRICT';
  }

  /**
   * The mode of a workload's port: a workload policy (its port-level mode first), else its
   * namespace's, else the root namespace's, else the mesh default; UNSET at a level defers to the
   * next. Several policies at one level: the first by name (Istio takes the oldest; nodemesh does
   * not track age).
   */
  mtlsMode(w: Pick<Workload, 'namespace' | 'labels'>, port: number): EffectiveMode {
    const { modes } = this.prepare(w);
    let mode = modes.get(port);
    if (!mode) modes.set(port, (mode = this.modeOf(w, port)));
    return mode;
  }

  private modeOf(w: Pick<Workload, 'namespace' | 'labels'>, port: number): EffectiveMode {
    const own = this.peerAuthentications.find((p) => p.namespace === w.namespace && Object.keys(p.selector).length > 0 && selects(p.selector, w.labels));
    const portMode = own?.portModes[String(port)];
    if (own && portMode && portMode !== 'UNSET') return { mode: portMode, policy: nameOf(own) };
    const namespaceWide = this.peerAuthentications.find((p) => p.namespace === w.namespace && Object.keys(p.selector).length === 0);
    const meshWide = this.peerAuthentications.find((p) => p.namespace === ROOT_NAMESPACE && Object.keys(p.selector).length === 0);
    for (const p of [own, namespaceWide, meshWide]) {
      if (p && p.mode !== 'UNSET') return { mode: p.mode, policy: nameOf(p) };
    }
    return { mode: this.config.mtlsMode, policy: MESH_DEFAULT };
  }

  /**
   * Whether any AuthorizationPolicy that applies to the workload names request attributes: the
   * proxy reads its HTTP ports as HTTP then, to decide per request.
   */
  hasRequestRules(w: Pick<Workload, 'namespace' | 'labels'>): boolean {
    return this.prepare(w).applicable.some((p) => p.rules.some(ruleNeedsRequest));
  }

  /**
   * What of this connection's requests the destination's engine may pass on without asking
   * (RequestGate): the policies that apply, with everything about the connection (its source, its
   * port, conditions on either) decided here once, reduced to the request's method, host and path.
   * Approximated only towards asking: a DENY rule with request header conditions stops every
   * request it might match, an ALLOW rule with them lets none through unread. Undefined when the
   * engine should ask for every request: an AUDIT policy applies (each match is counted), the
   * connection's verdict refuses (a STRICT mode without a peer), a DENY rule may match any request,
   * or no ALLOW rule can match without reading headers.
   */
  requestGate(f: ConnectionFacts): RequestGate | undefined {
    const mode = this.mtlsMode(f.destination, f.destinationPort);
    if (mode.mode === 'STRICT' && !f.peer) return undefined;
    const { applicable, audit, deny, allow } = this.prepare(f.destination);
    if (applicable.length === 0) return OPEN_GATE;
    if (audit.length > 0) return undefined;
    const denied = deny.flatMap((p) => this.gateOperations(p, f, true));
    if (denied.some(matchesAnyRequest)) return undefined;
    const allowed = allow.length === 0 ? undefined : allow.flatMap((p) => this.gateOperations(p, f, false));
    if (allowed?.length === 0) return undefined;
    return { id: ++gates, deny: denied, allow: allowed };
  }

  /**
   * The operations under which `p` matches a request on this connection: its rules whose sources
   * and connection conditions hold, each rule's operations on this port (a rule with none: any
   * request). A rule with request header conditions counts (`headersMatch`: as if they held) or not.
   */
  private gateOperations(p: AuthorizationPolicy, f: ConnectionFacts, headersMatch: boolean): GateOperation[] {
    const out: GateOperation[] = [];
    for (const r of p.rules) {
      if (r.from.length > 0 && !r.from.some((s) => this.sourceMatches(s, f))) continue;
      const readsHeaders = r.when.some((c) => conditionHeader(c.key) !== undefined);
      if (readsHeaders && !headersMatch) continue;
      if (!r.when.every((c) => conditionHeader(c.key) !== undefined || this.conditionMatches(c, f, undefined))) continue;
      if (r.to.length === 0) {
        out.push(ANY_REQUEST);
        continue;
      }
      for (const o of r.to) {
        if ((o.ports.length > 0 && !o.ports.includes(f.destinationPort)) || o.notPorts.includes(f.destinationPort)) continue;
        out.push({ hosts: o.hosts, notHosts: o.notHosts, methods: o.methods, notMethods: o.notMethods, paths: o.paths, notPaths: o.notPaths });
      }
    }
    return out;
  }

  /** The decision for one connection to a workload this node serves, on a port it relays as bytes (request attributes unknown). */
  authorize(f: ConnectionFacts): Verdict {
    return this.decide(f, undefined);
  }

  /**
   * The decision for a connection to a port the proxy reads as HTTP: only its mTLS mode; the
   * AuthorizationPolicies decide for each request (authorizeRequest).
   */
  admitConnection(f: ConnectionFacts): Verdict {
    const mode = this.mtlsMode(f.destination, f.destinationPort);
    if (mode.mode === 'STRICT' && !f.peer) return { allowed: false, audited: [], kind: 'PeerAuthentication', policy: mode.policy, reason: 'mtls_required' };
    return ALLOWED;
  }

  /** The decision for one request (its connection was admitted by admitConnection). */
  authorizeRequest(f: ConnectionFacts, request: RequestFacts): Verdict {
    return this.decide(f, request);
  }

  private prepare(w: Pick<Workload, 'namespace' | 'labels'>): Prepared {
    let prepared = this.prepared.get(w);
    if (!prepared) {
      const applicable = this.authorizationPolicies.filter((p) => (p.namespace === ROOT_NAMESPACE || p.namespace === w.namespace) && appliesTo(p.selector, w.labels));
      prepared = {
        applicable,
        audit: applicable.filter((p) => p.action === 'AUDIT'),
        deny: applicable.filter((p) => p.action === 'DENY'),
        allow: applicable.filter((p) => p.action === 'ALLOW'),
        modes: new Map(),
      };
      this.prepared.set(w, prepared);
    }
    return prepared;
  }

  private decide(f: ConnectionFacts, request: RequestFacts | undefined): Verdict {
    const mode = this.mtlsMode(f.destination, f.destinationPort);
    if (mode.mode === 'STRICT' && !f.peer) return { allowed: false, audited: [], kind: 'PeerAuthentication', policy: mode.policy, reason: 'mtls_required' };
    const { applicable, audit, deny, allow } = this.prepare(f.destination);
    if (applicable.length === 0) return ALLOWED;
    const audited = audit.length === 0 ? ALLOWED.audited : audit.filter((p) => this.policyMatches(p, f, request)).map(nameOf);
    const denied = deny.find((p) => this.policyMatches(p, f, request));
    if (denied) return { allowed: false, audited, kind: 'AuthorizationPolicy', policy: nameOf(denied), reason: 'denied_by_policy' };
    if (allow.length === 0 || allow.some((p) => this.policyMatches(p, f, request))) return audited.length === 0 ? ALLOWED : { allowed: true, audited };
    return { allowed: false, audited, kind: 'AuthorizationPolicy', policy: allow.map(nameOf).join(','), reason: 'not_allowed' };
  }

  private policyMatches(p: AuthorizationPolicy, f: ConnectionFacts, request: RequestFacts | undefined): boolean {
    return (request ? p.rules : this.tcpRules(p)).some((r) => this.ruleMatches(r, f, request));
  }

  /** A policy's rules where no request is read (tcpReading), worked out once per snapshot. */
  private tcpRules(p: AuthorizationPolicy): ReadonlyArray<AuthorizationRule> {
    let rules = this.tcp.get(p);
    if (!rules) {
      rules = tcpReading(p);
      this.tcp.set(p, rules);
    }
    return rules;
  }

  private ruleMatches(r: AuthorizationRule, f: ConnectionFacts, request: RequestFacts | undefined): boolean {
    if (r.from.length > 0 && !r.from.some((s) => this.sourceMatches(s, f))) return false;
    if (r.to.length > 0 && !r.to.some((o) => operationMatches(o, f.destinationPort, request))) return false;
    return r.when.every((c) => this.conditionMatches(c, f, request));
  }

  private sourceMatches(s: AuthorizationSource, f: ConnectionFacts): boolean {
    const principal = principalOf(f.peer);
    const namespace = f.peer?.namespace;
    const serviceAccount = f.peer ? `${f.peer.namespace}/${f.peer.serviceAccount}` : undefined;
    const any = (list: ReadonlyArray<string>, value: string | undefined): boolean => list.some((m) => matches(m, value));
    // A positive list needs a match; a negative one needs none (a plaintext source, with no
    // principal, matches every notPrincipals: Istio's way of refusing plaintext).
    const field = (list: ReadonlyArray<string>, notList: ReadonlyArray<string>, value: string | undefined): boolean => (list.length === 0 || any(list, value)) && !any(notList, value);
    return (
      field(s.principals, s.notPrincipals, principal) &&
      field(s.namespaces, s.notNamespaces, namespace) &&
      (s.serviceAccounts.length === 0 || s.serviceAccounts.includes(serviceAccount ?? '')) &&
      !s.notServiceAccounts.includes(serviceAccount ?? '') &&
      (s.ipBlocks.length === 0 || this.inBlocks(s.ipBlocks, f.sourceIp)) &&
      !this.inBlocks(s.notIpBlocks, f.sourceIp)
    );
  }

  private conditionMatches(c: AuthorizationCondition, f: ConnectionFacts, request: RequestFacts | undefined): boolean {
    const header = conditionHeader(c.key);
    if (header !== undefined) {
      // Never without a request: the TCP reading has no request conditions.
      if (!request) return false;
      const value = request.header(header);
      const any = (values: ReadonlyArray<string>): boolean => values.some((v) => matches(v, value));
      return (c.values.length === 0 || any(c.values)) && !any(c.notValues);
    }
    const test = (values: ReadonlyArray<string>): boolean => {
      switch (c.key) {
        case 'source.ip':
        case 'remote.ip':
          return this.inBlocks(values, f.sourceIp);
        case 'destination.ip':
          return this.inBlocks(values, f.destinationIp);
        case 'destination.port':
          return values.includes(String(f.destinationPort));
        case 'source.namespace':
          return values.some((v) => matches(v, f.peer?.namespace));
        case 'source.principal':
          return values.some((v) => matches(v, principalOf(f.peer)));
        default:
          return false;
      }
    };
    return (c.values.length === 0 || test(c.values)) && !(c.notValues.length > 0 && test(c.notValues));
  }

  private inBlocks(list: ReadonlyArray<string>, address: string): boolean {
    if (list.length === 0) return false;
    let ranges = this.blocks.get(list);
    if (!ranges) {
      // The config edge checked every entry: none throws here.
      ranges = new AddressRanges(list);
      this.blocks.set(list, ranges);
    }
    return ranges.has(address);
  }
}

/** Whether an operation matches: its ports, and its request attributes when there is a request (the TCP reading has none). */
function operationMatches(o: AuthorizationOperation, port: number, request: RequestFacts | undefined): boolean {
  if ((o.ports.length > 0 && !o.ports.includes(port)) || o.notPorts.includes(port)) return false;
  if (!request) return true;
  const field = (list: ReadonlyArray<string>, notList: ReadonlyArray<string>, test: (pattern: string) => boolean): boolean => (list.length === 0 || list.some(test)) && !notList.some(test);
  return (
    field(o.hosts, o.notHosts, (h) => hostMatches(h, request.host)) &&
    field(o.methods, o.notMethods, (m) => m === request.method) &&
    field(o.paths, o.notPaths, (p) => matches(p, request.path))
  );
}
