/**
 * The client side of L7 (issue 14): a captured connection to a Service port that speaks HTTP/1.1
 * and has routes (or a policy that acts on requests) is terminated here, and each request on it
 * is routed on its own: the first route entry whose match holds (Gateway API precedence, see
 * config/snapshot.ts), a backend Service by the rule's weights, an endpoint of it by the
 * Service's load balancing. Requests go upstream over keep-alive connections pooled per source
 * pod, backend Service and endpoint, opened by the node proxy like any other (same-node delivery,
 * an HBONE stream, or plain TCP), so one keep-alive client spreads its requests as the weights say.
 *
 * HTTP/1.1 connections are served by the addon's engine (NativeOutbound) where the kernel relay
 * is on; node:http serves the rest (strict, no lenient flags), and every connection from its
 * first request that needs what the engine does not do (HTTP/1.0, CONNECT). Both are routed by
 * decide().
 */
import { randomUUID } from 'node:crypto';
import { request as httpRequest, type ClientRequest, type IncomingMessage, type OutgoingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import { Socket } from 'node:net';
import type { Readable } from 'node:stream';

import { toItself, type Endpoint, type HttpRouteEntry, type ServiceTarget } from '../../config/snapshot.js';
import type { PathMatch, RouteMatch } from '../../config/route.js';
import type { HeaderChanges, PathModifier, RouteFilter } from '../../config/route-filters.js';
import type { HashOn } from '../../config/traffic-policy.js';
import { speaksRequests } from '../../config/service.js';
import type { EngineRoutes, EngineUpstream } from '../../datapath/native.js';
import { logger } from '../../shared/log.js';
import type { LoadBalancer } from '../pool/load-balancer.js';
import type { NodeMetrics, TcpLabels } from '../metrics/metrics.js';
import { UpstreamAgent, UpstreamDenied, answerFields, countRequest, drain, recordRequest, forwardable, handedServer, headerValue, once, pipeAnswer, rawHead, requestIdOf, serveHttp1, splitTarget, upgradeThrough, withHead, type AccessFacts, type ConnectionBytes, type RequestHead, type UpstreamRequestOptions } from './common.js';
import { H2Outbound } from './h2.js';
import type { HttpInbound, HttpServerConnection } from './inbound.js';
import { EngineRoutePlans, routedTo } from './engine-routes.js';
import { NativeOutbound } from './native-outbound.js';

const log = logger('http');

export { UpstreamDenied };

/** What the node proxy tells the HTTP side about one client connection. */
export interface HttpClientConnection {
  /** The Service port the client dialled, with its routes, as the connection began. */
  readonly parent: ServiceTarget;
  /** The same Service port in the snapshot now (a keep-alive client's later requests follow config changes); undefined once it is gone. */
  current(): ServiceTarget | undefined;
  /** The source pod: logs, pools, and its address for consistent hashing on the source. */
  readonly source: { readonly namespace: string; readonly name: string; readonly uid: string; readonly ip4: string; readonly ip6: string };
  /**
   * A new connection to `endpoint` of `target` from the source pod (same node, HBONE or plain):
   * a socket node:http can use. Rejects with UpstreamDenied when policy refuses it.
   */
  dial(target: ServiceTarget, endpoint: Endpoint): Promise<Socket>;
  /** The same connection as an fd the caller owns (a tunnel stream is joined to a socket pair's other end). */
  dialFd(target: ServiceTarget, endpoint: Endpoint): Promise<number>;
  /** The same connection for the addon's HTTP engines: an fd as dialFd's, or a tunnel stream joined to the engine in memory (a channel). */
  dialEngine(target: ServiceTarget, endpoint: Endpoint): Promise<EngineUpstream>;
  /**
   * For an endpoint that is a pod of this node whose port its own side reads as HTTP/1.1: that
   * side's connection facts, so both sides of a request are served in one pass; undefined
   * otherwise. Throws UpstreamDenied when its policy refuses the connection.
   */
  localServer?(target: ServiceTarget, endpoint: Endpoint, protocol: 'http1' | 'http2'): HttpServerConnection | undefined;
  /** Whether localServer might serve `endpoint` (a pod of this node whose port its side reads as `protocol`), judged without admitting anything. */
  servesHere?(endpoint: Endpoint, protocol: 'http1' | 'http2'): boolean;
  /** The request metric labels (as for a TCP connection to that endpoint). */
  labels(target: ServiceTarget, endpoint: Endpoint | undefined): TcpLabels;
}

/** Why a request was answered by the proxy, Envoy's response flags (Istio's `response_flags`). */
export type ProxyAnswer = { readonly status: number; readonly flag: string; readonly detail: string };

/** What becomes of a request (HttpOutbound.decide). */
export type Decision =
  | { readonly kind: 'answer'; readonly parent: ServiceTarget; readonly route: string; readonly answer: ProxyAnswer }
  | { readonly kind: 'redirect'; readonly parent: ServiceTarget; readonly route: string; readonly status: number; readonly location: string }
  | {
      readonly kind: 'forward';
      readonly parent: ServiceTarget;
      readonly route: string;
      readonly entry: HttpRouteEntry;
      readonly target: ServiceTarget;
      readonly upstream: Upstream;
    };

/** What goes upstream (the filters applied), what changes in the answer, and the consistent-hash key if the backend's policy has one. */
interface Upstream {
  readonly path: string;
  readonly headers: string[];
  readonly answerChanges: ReadonlyArray<HeaderChanges>;
  readonly hashKey?: string;
}

/**
 * The consistent-hash key of a request (TrafficPolicy loadBalancer.consistentHash): its header,
 * its cookie, or the source pod's address. A cookie that is missing and has a ttl is made here and
 * set on the answer, so the client's next requests keep to the same endpoint (Istio's way).
 */
function hashKey(on: HashOn | undefined, req: RequestHead, conn: HttpClientConnection): { key?: string; setCookie?: string } {
  if (!on) return NO_AFFINITY;
  if ('sourceIp' in on) return { key: conn.source.ip4 || conn.source.ip6 };
  if ('header' in on) {
    const v = headerValue(req.headers, on.header);
    return v === undefined ? {} : { key: v };
  }
  for (const part of (headerValue(req.headers, 'cookie') ?? '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === on.cookie) return { key: part.slice(eq + 1).trim() };
  }
  if (on.ttlMs === undefined) return {};
  const value = randomUUID();
  return { key: value, setCookie: `${on.cookie}=${value}; Path=/; Max-Age=${Math.floor(on.ttlMs / 1000)}; HttpOnly` };
}

const NO_AFFINITY: { key?: string; setCookie?: string } = Object.freeze({});

/**
 * What decide() needs of a rule that does not depend on the request, made once per rule object
 * of a snapshot (a string or array made per request is hashed or collected per request): its
 * name in metrics, its redirect and rewrite, the split's key per parent, and per backend the
 * header changes of the rule's filters then the backend's (Gateway API applies both, the rule's
 * first).
 */
interface RulePlan {
  readonly route: string;
  readonly redirect: Extract<RouteFilter, { type: 'RequestRedirect' }> | undefined;
  readonly rewrite: Extract<RouteFilter, { type: 'URLRewrite' }> | undefined;
  readonly splitKeys: WeakMap<ServiceTarget, string>;
  readonly backends: WeakMap<object, { readonly request: ReadonlyArray<HeaderChanges>; readonly answer: ReadonlyArray<HeaderChanges> }>;
}

const rulePlans = new WeakMap<HttpRouteEntry, RulePlan>();

function rulePlan(entry: HttpRouteEntry): RulePlan {
  let plan = rulePlans.get(entry);
  if (plan) return plan;
  const filters = entry.filters ?? [];
  plan = {
    route: `${entry.route} rule ${entry.rule}`,
    redirect: filters.find((f): f is Extract<RouteFilter, { type: 'RequestRedirect' }> => f.type === 'RequestRedirect'),
    rewrite: filters.find((f): f is Extract<RouteFilter, { type: 'URLRewrite' }> => f.type === 'URLRewrite'),
    splitKeys: new WeakMap(),
    backends: new WeakMap(),
  };
  rulePlans.set(entry, plan);
  return plan;
}

/** The split's key (each rule of each parent splits on its own): `<parent key>#<route>#<rule>`. */
function splitKey(plan: RulePlan, parent: ServiceTarget, entry: HttpRouteEntry): string {
  let key = plan.splitKeys.get(parent);
  if (key === undefined) plan.splitKeys.set(parent, (key = `${parent.key}#${entry.route}#${entry.rule}`));
  return key;
}

function backendChanges(plan: RulePlan, entry: HttpRouteEntry, backend: HttpRouteEntry['backends'][number]): { readonly request: ReadonlyArray<HeaderChanges>; readonly answer: ReadonlyArray<HeaderChanges> } {
  let changes = plan.backends.get(backend);
  if (changes) return changes;
  const all = [...(entry.filters ?? []), ...(backend.filters ?? [])];
  changes = {
    request: all.flatMap((f) => (f.type === 'RequestHeaderModifier' ? [f.headers] : [])),
    answer: all.flatMap((f) => (f.type === 'ResponseHeaderModifier' ? [f.headers] : [])),
  };
  plan.backends.set(backend, changes);
  return changes;
}

/** A port's routing to itself when it has no routes (made once per snapshot object). */
const ownRouting = new WeakMap<ServiceTarget, NonNullable<ServiceTarget['http']>>();

/** The route entries a port's requests go by: its routes', or to its own endpoints when it has none. */
export function routingOf(parent: ServiceTarget): NonNullable<ServiceTarget['http']> {
  let routing = parent.http ?? ownRouting.get(parent);
  if (!routing) ownRouting.set(parent, (routing = toItself(parent, `Service ${parent.key}`)));
  return routing;
}

/** Raw header pairs with each of `changes` applied in order. */
export function withChanges(raw: ReadonlyArray<string>, changes: ReadonlyArray<HeaderChanges>): string[] {
  let out = raw.slice();
  for (const c of changes) out = applyHeaderChanges(out, c);
  return out;
}

/** A request as route matching sees it. */
interface RequestFacts {
  readonly method: string;
  readonly path: string;
  readonly query: string;
  readonly headers: IncomingMessage['headers'];
}

/** Whether a request meets every condition of a match (Gateway API HTTPRouteMatch). */
export function matchRequest(m: RouteMatch, r: RequestFacts): boolean {
  const p = m.path;
  if (p.type === 'Exact' ? r.path !== p.value : p.type === 'RegularExpression' ? !p.regex?.test(r.path) : !(p.value === '/' || r.path === p.value || r.path.startsWith(`${p.value}/`))) return false;
  if (m.method !== undefined && m.method !== r.method) return false;
  for (const h of m.headers) {
    const v = headerValue(r.headers, h.name);
    if (v === undefined || (h.regex ? !h.regex.test(v) : v !== h.value)) return false;
  }
  if (m.queryParams.length > 0) {
    const q = new URLSearchParams(r.query);
    for (const qp of m.queryParams) {
      const v = q.get(qp.name);
      if (v === null || (qp.regex ? !qp.regex.test(v) : v !== qp.value)) return false;
    }
  }
  return true;
}

/** The first entry (they are in precedence order) whose match the request meets. */
export function routeRequest(entries: ReadonlyArray<HttpRouteEntry>, r: RequestFacts): HttpRouteEntry | undefined {
  for (const e of entries) if (matchRequest(e.match, r)) return e;
  return undefined;
}

/** What the HTTP/2 engine's response flags on a request it routed itself mean (its own answer, or a cut). */
const ENGINE_FLAGS: Readonly<Record<string, string>> = {
  UC: 'the upstream stream ended before an answer',
  UF: 'the upstream refused the stream',
  UPE: "the upstream's answer was cut",
  DPE: 'a gRPC message over the limit',
};

export class HttpOutbound {
  private readonly server: Server;
  readonly agent = new UpstreamAgent();
  private readonly connections = new WeakMap<Socket, HttpClientConnection>();
  private logWindow = { start: 0, count: 0 };
  private readonly h2: H2Outbound;
  private readonly native: NativeOutbound;
  /** The routes each engine follows itself, per source pod and port. */
  readonly plans: { readonly http1: EngineRoutePlans; readonly http2: EngineRoutePlans };

  constructor(
    readonly lb: LoadBalancer,
    readonly metrics: NodeMetrics,
    private readonly options: {
      readonly idleTimeoutMs: number;
      readonly accessLog: (namespace: string) => boolean;
      /** HTTP/1.1 on the addon's engine (NativeOutbound) where a request allows it. */
      readonly nativeHttp?: boolean;
      /** The server side of this node, for requests to its own pods served in one pass (localServer). */
      readonly destinationSide?: HttpInbound;
    },
  ) {
    this.server = handedServer(
      metrics,
      options.idleTimeoutMs,
      (req, res) => this.onRequest(req, res),
      (req, client, head) => this.onUpgrade(req, client, head),
    );
    this.plans = { http1: new EngineRoutePlans(lb, options.accessLog, 'http1'), http2: new EngineRoutePlans(lb, options.accessLog, 'http2') };
    this.h2 = new H2Outbound(this, options.idleTimeoutMs, options.nativeHttp === true, options.destinationSide);
    this.native = new NativeOutbound(this, options.destinationSide, options.nativeHttp === true, options.idleTimeoutMs, (client, conn, unread) => this.serveNodeHttp(client, conn, unread));
  }

  /**
   * Serves the client connection (accepted paused, as the pods' listeners do) until it closes:
   * HTTP/1.1 on the addon's engine (node:http where it cannot), or h2c on a port that speaks
   * HTTP/2; a sniffed connection comes with the protocol found and the bytes read to find it.
   */
  serve(client: Socket, conn: HttpClientConnection, sniffed?: { readonly protocol: 'http1' | 'http2'; readonly head: Buffer }): Promise<ConnectionBytes> {
    if ((sniffed?.protocol ?? speaksRequests(conn.parent.port)) === 'http2') return this.h2.serve(client, conn, sniffed?.head);
    return this.native.host.serve(client, conn, sniffed?.head);
  }

  /** node:http serves the connection, its unread bytes put back first. */
  private serveNodeHttp(client: Socket, conn: HttpClientConnection, unread: Buffer): Promise<void> {
    return serveHttp1(this.server, this.connections, withHead(client, unread, 'http1'), conn);
  }

  /** Closes the idle upstream connections pooled for a source pod (it left). */
  forgetPod(uid: string): void {
    this.native.host.dropPools(`${uid}|`);
    this.h2.forgetPod(uid);
  }

  /**
   * What the engine routes by itself was made of what changed (the snapshot, this node's pods, an
   * endpoint's health): every request goes to decide() again until its connection gets a new plan.
   */
  routesChanged(): void {
    this.plans.http1.reset();
    this.plans.http2.reset();
    this.h2.routesChanged();
    this.native.host.undirect();
  }

  /**
   * A request an engine sent on by itself ended (H2Events.delivered, Http1Events.delivered): one
   * it routed by a plan of this node's (`routes`, its target's and endpoint's indices) is counted
   * as decide()'s are, its answer told to outlier detection; any other is the destination's side's.
   */
  delivered(conn: HttpClientConnection, routes: EngineRoutes | undefined, at: number | undefined, endpointAt: number | undefined, reported: number, flag: string, ms: number, bytesIn: number, bytesOut: number, grpcStatus: string | undefined): void {
    const to = routedTo(routes, at, endpointAt);
    if (!to) return;
    const { target, endpoint } = to;
    // A client that left is counted with no answer, as JS's own path counts it.
    const status = flag === 'DC' ? 0 : reported;
    this.metrics.httpRouted.inc();
    if (flag === '-') this.answered(target, endpoint, status);
    recordRequest(this.metrics, conn.labels(target, endpoint), status, flag, ms, bytesIn, bytesOut, grpcStatus);
    if (flag !== '-' && flag !== 'DC') this.logAnswer(conn, target, { status, flag, detail: ENGINE_FLAGS[flag] ?? 'ended by the engine' });
  }

  /** Closes every pooled upstream connection. */
  close(): void {
    this.agent.destroy();
    this.h2.close();
    this.native.host.close();
  }

  /**
   * Where a request goes, by the config of its time (a keep-alive client's later requests follow
   * config changes): answered by the proxy (no Service, no route, no backend: 404 or 500, Envoy's
   * NR), redirected, or forwarded to a backend with the rule's and the backend's filters applied.
   */
  decide(req: RequestHead, conn: HttpClientConnection, requestId: string): Decision {
    // A port whose routes went sends to its own endpoints; a Service that went is no route.
    const parent = conn.current();
    if (!parent) return { kind: 'answer', parent: conn.parent, route: '', answer: { status: 404, flag: 'NR', detail: `Service ${conn.parent.key} is no longer in the config` } };
    const { path, query } = splitTarget(req.url ?? '/');
    const entry = routeRequest(routingOf(parent).entries, { method: req.method ?? 'GET', path, query, headers: req.headers });
    if (!entry) return { kind: 'answer', parent, route: '', answer: { status: 404, flag: 'NR', detail: 'no route matched the request' } };
    const plan = rulePlan(entry);
    const { route, redirect, rewrite } = plan;
    if (redirect) return { kind: 'redirect', parent, route, status: redirect.statusCode, location: redirectLocation(redirect, entry.match.path, path, query, headerValue(req.headers, 'host') ?? '') };
    const backend = this.lb.pickWeighted(splitKey(plan, parent, entry), entry.backends);
    if (!backend) return { kind: 'answer', parent, route, answer: { status: 500, flag: 'NR', detail: `${route} has no backend that exists` } };
    const changes = backendChanges(plan, entry, backend);
    const forwarded = forwardable(req.rawHeaders, headerValue(req.headers, 'connection'));
    let headers = changes.request.length === 0 ? forwarded : withChanges(forwarded, changes.request);
    let target = req.url ?? '/';
    if (rewrite?.hostname) headers = applyHeaderChanges(headers, { set: [['host', rewrite.hostname]], add: [], remove: [] });
    if (rewrite?.path) target = rewritePath(path, query, rewrite.path, entry.match.path);
    // node:http frames what it sends itself; a chunked body must stay chunked whatever the method.
    if (req.headers['transfer-encoding'] !== undefined) headers.push('transfer-encoding', 'chunked');
    if (req.headers['x-request-id'] === undefined) headers.push('x-request-id', requestId);
    const affinity = hashKey(backend.target.policy.hashOn, req, conn);
    const answerChanges: ReadonlyArray<HeaderChanges> = affinity.setCookie ? [...changes.answer, { set: [], add: [['set-cookie', affinity.setCookie]], remove: [] }] : changes.answer;
    return { kind: 'forward', parent, route, entry, target: backend.target, upstream: { path: target, headers, answerChanges, hashKey: affinity.key } };
  }

  /** A request's start: its connection's facts, its id (the client's, or a new one), where it goes. */
  private begin(req: IncomingMessage): { conn: HttpClientConnection; started: number; requestId: string; d: Decision } | undefined {
    const conn = this.connections.get(req.socket);
    if (!conn) return undefined;
    const started = performance.now();
    const requestId = requestIdOf(req);
    return { conn, started, requestId, d: this.decide(req, conn, requestId) };
  }

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    const b = this.begin(req);
    if (!b) {
      res.destroy();
      return;
    }
    const { conn, started, requestId, d } = b;
    const access: AccessFacts = { req, requestId, route: d.route, bytesIn: 0, bytesOut: 0, attempts: 0 };
    if (d.kind === 'forward') {
      new Exchange(this, req, res, conn, d.parent, d.entry, d.target, d.upstream, started, requestId).start();
      return;
    }
    if (d.kind === 'answer') {
      this.answer(res, conn, d.parent, undefined, started, d.answer, access, req);
      return;
    }
    res.writeHead(d.status, { location: d.location, 'content-length': 0 });
    res.end();
    drain(req, (bytesIn) => this.count(conn, d.parent, undefined, d.status, '-', started, { ...access, bytesIn }));
  }

  /**
   * A protocol upgrade (WebSocket): routed as any request, then sent on a connection of its own
   * (never pooled); a 101 answer joins the two connections byte for byte until either ends, any
   * other answer is passed on and the connection closed.
   */
  private onUpgrade(req: IncomingMessage, client: Socket, head: Buffer): void {
    const b = this.begin(req);
    if (!b) {
      client.destroy();
      return;
    }
    const { conn, started, requestId, d } = b;
    const access: AccessFacts = { req, requestId, route: d.route, bytesIn: 0, bytesOut: 0, attempts: d.kind === 'forward' ? 1 : 0 };
    if (d.kind !== 'forward') {
      const [status, headers] = d.kind === 'answer' ? [d.answer.status, ['content-length', '0']] : [d.status, ['location', d.location, 'content-length', '0']];
      client.end(rawHead(status, [...headers, 'connection', 'close']));
      this.count(conn, d.parent, undefined, status, d.kind === 'answer' ? d.answer.flag : '-', started, access);
      return;
    }
    const endpoint = this.lb.pick(d.target, undefined, d.upstream.hashKey);
    if (!endpoint) {
      client.end(rawHead(503, ['content-length', '0', 'connection', 'close']));
      this.count(conn, d.target, undefined, 503, 'UH', started, access);
      return;
    }
    this.lb.acquire(d.target, endpoint);
    upgradeThrough(
      req,
      client,
      head,
      { path: d.upstream.path, headers: d.upstream.headers, open: () => conn.dial(d.target, endpoint) },
      (raw) => withChanges(raw, d.upstream.answerChanges),
      (status, flag, bytesIn, bytesOut) => {
        this.lb.release(d.target, endpoint);
        this.count(conn, d.target, endpoint, status, flag, started, { ...access, bytesIn, bytesOut });
      },
    );
  }

  /**
   * Retries in flight to `target` may be at most its retry budget: `percent` of its active
   * requests from this node, but always `minRetryConcurrency` (Envoy's retry budget).
   */
  /**
   * RequestMirror, on any path: for each of `mirrors` (drawn for the request), counted as not
   * copied when the body was not kept (`kept` false: over 64 KiB) or the mirror Service has no
   * endpoint; else `send` makes the copy to the endpoint picked and counts its result.
   */
  mirrorTo(mirrors: ReadonlyArray<{ readonly target: ServiceTarget }>, kept: boolean, send: (target: ServiceTarget, endpoint: Endpoint, count: (result: string) => void) => void): void {
    for (const m of mirrors) {
      const count = (result: string): void => this.metrics.httpMirrors.inc({ service: m.target.key, result });
      const endpoint = kept ? this.lb.pick(m.target) : undefined;
      if (!kept) count('body_too_large');
      else if (!endpoint) count('no_endpoint');
      else send(m.target, endpoint, count);
    }
  }

  /** Whether the backend's retry budget (Envoy's semantics) has room for one more retry; counted when it has not. */
  retryBudgetAllows(target: ServiceTarget): boolean {
    const { percent, minRetryConcurrency } = target.policy.retryBudget;
    const active = (this.active.get(target.key) ?? 0) + this.h2.routedInFlight(target.key) + this.native.host.inFlight(target.key);
    const retrying = this.retrying.get(target.key) ?? 0;
    if (retrying < Math.max(minRetryConcurrency, Math.floor((active * percent) / 100))) return true;
    this.metrics.httpRetries.inc({ service: target.key, result: 'budget_exhausted' });
    return false;
  }

  /**
   * The `n`-th retry of a request to `target`, counted and tracked as retrying until `then` runs
   * after the backoff: a random time up to base * 2^(n-1), at most 10 times base (full jitter).
   * The timer is the caller's, to cancel with cancelRetry(). `why` (what ended the attempt) is logged when known.
   */
  retryAfterBackoff(target: ServiceTarget, n: number, backoffMs: number, then: () => void, why?: string): NodeJS.Timeout {
    const delay = Math.random() * Math.min(backoffMs * 2 ** (n - 1), backoffMs * 10);
    this.metrics.httpRetries.inc({ service: target.key, result: 'retried' });
    this.track('retrying', target, 1);
    log.debug({ service: target.key, retry: n, ...(why === undefined ? {} : { why }), delayMs: Math.round(delay) }, 'request retried');
    return setTimeout(() => {
      this.track('retrying', target, -1);
      then();
    }, delay);
  }

  /** A retry waiting for its backoff (retryAfterBackoff) will not go: no longer tracked. */
  cancelRetry(target: ServiceTarget, timer: NodeJS.Timeout | undefined): undefined {
    if (timer === undefined) return undefined;
    clearTimeout(timer);
    this.track('retrying', target, -1);
    return undefined;
  }

  /** Counts a request (or a retry) to `target` in or out of flight. */
  track(what: 'active' | 'retrying', target: ServiceTarget, by: 1 | -1): void {
    const m = what === 'active' ? this.active : this.retrying;
    const n = (m.get(target.key) ?? 0) + by;
    if (n <= 0) m.delete(target.key);
    else m.set(target.key, n);
  }

  private readonly active = new Map<string, number>();
  private readonly retrying = new Map<string, number>();
  /** Attempts holding an upstream connection, and those waiting for one, per backend Service. */
  private readonly inFlight = new Map<string, number>();
  private readonly waiting = new Map<string, Array<() => void>>();

  /**
   * Circuit breaking: an attempt to `target` goes now while fewer than its maxConnections are in
   * flight from this node; otherwise it waits (`go` is called with its `leave` when one ends),
   * unless maxPendingRequests wait already: then the proxy's answer (503, UO). Returns how to give
   * the slot or the place in line back (call it exactly once, when the attempt ends or is given up).
   */
  admit(target: ServiceTarget, go: (leave: () => void) => void): { readonly now: boolean; readonly leave: () => void } | ProxyAnswer {
    const key = target.key;
    let left = false;
    const leaveSlot = (): void => {
      if (left) return;
      left = true;
      const next = this.waiting.get(key)?.shift();
      if (next) next();
      else {
        const n = (this.inFlight.get(key) ?? 1) - 1;
        if (n <= 0) this.inFlight.delete(key);
        else this.inFlight.set(key, n);
      }
    };
    if ((this.inFlight.get(key) ?? 0) < target.policy.maxConnections) {
      this.inFlight.set(key, (this.inFlight.get(key) ?? 0) + 1);
      return { now: true, leave: leaveSlot };
    }
    const queue = this.waiting.get(key) ?? [];
    if (queue.length >= target.policy.maxPendingRequests) {
      return { status: 503, flag: 'UO', detail: `Service ${key}: ${target.policy.maxConnections} requests in flight and ${target.policy.maxPendingRequests} waiting (connectionPool)` };
    }
    this.waiting.set(key, queue);
    let queued = true;
    const leave = (): void => {
      if (!queued) return leaveSlot();
      queued = false;
      left = true;
      const i = queue.indexOf(turn);
      if (i >= 0) queue.splice(i, 1);
      if (queue.length === 0) this.waiting.delete(key);
    };
    // Its turn: the slot passes from the attempt that ended to this one.
    const turn = (): void => {
      queued = false;
      go(leave);
    };
    queue.push(turn);
    return { now: false, leave };
  }

  /**
   * One attempt holds `endpoint` of `target` (its requests in flight, for least-request picks):
   * the release, once, gives it back and leaves the circuit breaker's slot (`leave`).
   */
  hold(target: ServiceTarget, endpoint: Endpoint, leave: () => void): () => void {
    this.lb.acquire(target, endpoint);
    return once(() => {
      this.lb.release(target, endpoint);
      leave();
    });
  }

  /** A new connection to `endpoint` of `target` (`dial`), its outcome told to outlier detection: a failed connect counts against the endpoint unless policy refused it. */
  async connected<T>(target: ServiceTarget, endpoint: Endpoint, dial: () => Promise<T>): Promise<T> {
    let made: T;
    try {
      made = await dial();
    } catch (e) {
      if (!(e instanceof UpstreamDenied) && this.lb.connectFailed(target, endpoint)) this.ejected(target, endpoint, 'consecutive connect errors');
      throw e;
    }
    this.lb.connectSucceeded(endpoint);
    return made;
  }

  /** Outlier detection took `endpoint` of `target` out: counted and logged. */
  /** Outlier detection on an answer of `endpoint`: a run of 5xx or gateway errors may eject it. */
  answered(target: ServiceTarget, endpoint: Endpoint, status: number): void {
    if (this.lb.answered(target, endpoint, status)) this.ejected(target, endpoint, `consecutive error answers (the last ${status})`);
  }

  ejected(target: ServiceTarget, endpoint: Endpoint, why: string): void {
    this.metrics.ejections.inc({ service: target.key });
    this.routesChanged();
    log.warn({ service: target.key, endpoint: `${endpoint.workload.namespace}/${endpoint.workload.name}`, port: endpoint.port, why }, 'endpoint ejected');
  }

  /** An answer of the proxy itself, counted and logged. */
  answer(res: ServerResponse, conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint | undefined, started: number, a: ProxyAnswer, facts: AccessFacts, unread?: Readable): void {
    // A body nobody read yet (answered before anything went upstream): dropped, counted once it is in.
    if (unread) drain(unread, (bytesIn) => this.count(conn, target, endpoint, a.status, a.flag, started, { ...facts, bytesIn }));
    else this.count(conn, target, endpoint, a.status, a.flag, started, facts);
    this.logAnswer(conn, target, a);
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const body = `${a.detail}\n`;
    res.writeHead(a.status, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  /** An answer of the proxy itself (or one it cut), counted and logged; the engine writes it. */
  noteAnswer(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint | undefined, started: number, a: ProxyAnswer, facts: AccessFacts): void {
    this.count(conn, target, endpoint, a.status, a.flag, started, facts);
    this.logAnswer(conn, target, a);
  }

  private logAnswer(conn: HttpClientConnection, target: ServiceTarget, a: ProxyAnswer): void {
    // A client can cause these at will (a scanner's 404s): at most 10 lines a second; the metrics count all.
    const now = Date.now();
    if (now - this.logWindow.start >= 1000) this.logWindow = { start: now, count: 0 };
    if (++this.logWindow.count <= 10) log.info({ pod: conn.source.name, namespace: conn.source.namespace, service: target.key, status: a.status, responseFlags: a.flag, detail: a.detail }, 'request answered by the proxy');
  }

  /** Where every request ends: Istio's request metrics, and its access log line where the mesh config asks. */
  count(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint | undefined, status: number, flag: string, started: number, facts: AccessFacts, grpcStatus?: string): void {
    const log = this.options.accessLog(conn.source.namespace)
      ? { upstreamService: target.key, upstreamHost: endpoint ? `${endpoint.workload.namespace}/${endpoint.workload.name}:${endpoint.port}` : '', sourcePod: `${conn.source.namespace}/${conn.source.name}` }
      : undefined;
    countRequest(this.metrics, conn.labels(target, endpoint), status, flag, started, facts, log, grpcStatus);
  }
}

/** Raw header pairs with Gateway API's header modifier applied: removed and set names go, then set, then add. */
/** The rule's mirrors a request is copied to: each drawn by its percentage (RequestMirror's percent or fraction). */
const NO_MIRRORS: NonNullable<HttpRouteEntry['mirrors']> = Object.freeze([]);

/** The upstream pool of a client connection's requests to `endpoint` of `target`: per source pod, backend Service (its connectionPool is its own, as Envoy pools per cluster) and endpoint. */
export function upstreamPool(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint): string {
  // Made once per source pod, Service and endpoint of a snapshot, not per request: the key is
  // asked for every request, and each new string lived as long as its request.
  let bySource = POOL_KEYS.get(endpoint);
  if (!bySource) POOL_KEYS.set(endpoint, (bySource = new Map()));
  const had = bySource.get(conn.source.uid);
  if (had?.target === target) return had.key;
  const key = `${conn.source.uid}|${target.key}|${endpoint.workload.uid}|${endpoint.port}`;
  bySource.set(conn.source.uid, { target, key });
  return key;
}
/** Pool keys by endpoint (a snapshot's object: they go with it), then by source pod's uid. */
const POOL_KEYS = new WeakMap<Endpoint, Map<string, { readonly target: ServiceTarget; readonly key: string }>>();

export function drawMirrors(entry: Pick<HttpRouteEntry, 'mirrors'>): NonNullable<HttpRouteEntry['mirrors']> {
  // Most rules have none: no new array per request for them.
  return entry.mirrors === undefined || entry.mirrors.length === 0 ? NO_MIRRORS : entry.mirrors.filter((m) => Math.random() * 100 < m.percent);
}

export function applyHeaderChanges(raw: ReadonlyArray<string>, c: HeaderChanges): string[] {
  const drop = new Set([...c.remove, ...c.set.map(([n]) => n)]);
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) if (!drop.has((raw[i] ?? '').toLowerCase())) out.push(raw[i] ?? '', raw[i + 1] ?? '');
  for (const [n, v] of c.set) out.push(n, v);
  for (const [n, v] of c.add) out.push(n, v);
  return out;
}

/**
 * The path a URLRewrite or RequestRedirect sends the request to, its query kept. ReplacePrefixMatch
 * replaces the PathPrefix the request matched, element by element (prefix "/foo" to "/xyz": "/foo/bar"
 * becomes "/xyz/bar", "/foo" becomes "/xyz"; to "/": "/bar").
 */
export function rewritePath(path: string, query: string, mod: PathModifier, matched: PathMatch): string {
  let out: string;
  if (mod.type === 'ReplaceFullPath') out = mod.value;
  else {
    const prefix = matched.value === '/' ? '' : matched.value;
    const rest = path.slice(prefix.length);
    const base = mod.value.length > 1 ? mod.value.replace(/\/+$/, '') : mod.value;
    out = base === '/' ? rest || '/' : base + rest;
  }
  return query === '' ? out : `${out}?${query}`;
}

/** A RequestRedirect's Location: what the filter says, the request's own scheme (http), host and path otherwise. */
export function redirectLocation(f: Extract<RouteFilter, { type: 'RequestRedirect' }>, matched: PathMatch, path: string, query: string, host: string): string {
  const scheme = f.scheme ?? 'http';
  const [requestHost = '', requestPort] = host.startsWith('[') ? [host.slice(0, host.indexOf(']') + 1), host.slice(host.indexOf(']') + 2) || undefined] : host.split(':');
  // Gateway API: a port left out is the scheme's well-known one when the scheme is set, else the request's; a well-known port is not written.
  const port = f.port ?? (f.scheme ? undefined : requestPort === undefined ? undefined : Number(requestPort));
  const wellKnown = (scheme === 'http' && port === 80) || (scheme === 'https' && port === 443);
  const target = f.path ? rewritePath(path, query, f.path, matched) : query === '' ? path : `${path}?${query}`;
  return `${scheme}://${f.hostname ?? requestHost}${port === undefined || wellKnown ? '' : `:${port}`}${target}`;
}

/** An attempt ended without an answer to pass on: why, and whether another attempt may help. */
type AttemptFailure = { readonly kind: 'connect' | 'reset' | 'per_try_timeout' | 'denied' | 'no_endpoint'; readonly error: string; readonly reused: boolean };

/** Requests each upstream connection carried (maxRequestsPerConnection). */
const requestsOn = new WeakMap<Socket, number>();

/** A request body kept for a retry: at most this much (Envoy's per-request buffer is 16 KiB to 64 KiB). */
const REPLAY_LIMIT = 64 * 1024;

/**
 * One request from its head to the end of its answer: attempts to endpoints of its backend,
 * the rule's timeouts (the whole request, and each attempt to its answer's head) and retries (on
 * the rule's codes, connect failures, resets and per-try timeouts; exponential backoff with full
 * jitter; within the backend's retry budget; only with the whole body in hand, up to 64 KiB).
 * A request without a body that fails on a reused idle connection before any answer (its server
 * closed it just then) is sent again once, retry rule or not, as node:http's documentation advises.
 */
class Exchange {
  private attempt = 0;
  private retries = 0;
  private readonly body: Buffer[] = [];
  private replayable = true;
  private bodyDone: boolean;
  private finished = false;
  /** The attempt that the client's body is streamed to, until the body ends. */
  private current: ClientRequest | undefined;
  /** The latest attempt (a timeout or the client's leaving ends it). */
  private inflight: ClientRequest | undefined;
  /** Gives up the place in line of an attempt waiting for the circuit breaker. */
  private leaveQueue: (() => void) | undefined;
  private requestTimer: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  /** A fault's delay before the first attempt. */
  private delayTimer: NodeJS.Timeout | undefined;
  private readonly bodyless: boolean;
  /** The response flag of an answer passed on: '-', or DI when a fault delayed it. */
  private flag = '-';
  /** Body bytes from the client, and of the answer passed back. */
  private bytesIn = 0;
  private bytesOut = 0;

  constructor(
    private readonly outbound: HttpOutbound,
    private readonly req: IncomingMessage,
    private readonly res: ServerResponse,
    private readonly conn: HttpClientConnection,
    /** The Service port the client called (its fault applies first). */
    private readonly parent: ServiceTarget,
    private readonly entry: HttpRouteEntry,
    private readonly target: ServiceTarget,
    /** What goes upstream (the filters applied), what changes in the answer, the hash key. */
    private readonly upstream: Upstream,
    private readonly started: number,
    private readonly requestId: string,
  ) {
    this.bodyless = req.headers['content-length'] === undefined && req.headers['transfer-encoding'] === undefined;
    this.bodyDone = this.bodyless;
  }

  start(): void {
    this.outbound.track('active', this.target, 1);
    const requestMs = this.entry.timeouts?.requestMs;
    if (requestMs !== undefined) this.requestTimer = setTimeout(() => this.timedOut(), requestMs);
    // The client left first (Envoy's DC): whatever is in flight goes.
    this.res.on('close', () => {
      if (this.finished) return;
      this.inflight?.destroy();
      this.finish(0, 'DC');
    });
    // Faults (TrafficPolicy fault, Istio's semantics): the delay first, then the abort.
    const fault = this.entry.fault ?? this.parent.policy.fault ?? this.target.policy.fault;
    const delayed = fault?.delay !== undefined && Math.random() * 100 < fault.delay.percent;
    const aborted = fault?.abort !== undefined && Math.random() * 100 < fault.abort.percent;
    if (delayed) this.flag = 'DI';
    if (this.bodyless) {
      this.req.resume();
      this.mirror();
    } else {
      this.req.on('data', (chunk: Buffer) => {
        this.bytesIn += chunk.length;
        // While it is replayable the body kept is all of it so far: bytesIn.
        if (this.replayable && this.bytesIn <= REPLAY_LIMIT) this.body.push(chunk);
        else if (this.replayable) {
          this.replayable = false;
          this.body.length = 0;
        }
        const up = this.current;
        if (up && !up.write(chunk)) {
          this.req.pause();
          up.once('drain', () => this.req.resume());
        }
      });
      this.req.on('end', () => {
        this.bodyDone = true;
        this.current?.end();
        this.current = undefined;
        this.mirror();
      });
    }
    const go = (): void => {
      if (aborted) this.finish(fault?.abort?.status ?? 503, 'FI', 'fault injected (TrafficPolicy fault.abort)');
      else this.send();
    };
    if (delayed) this.delayTimer = setTimeout(go, fault?.delay?.ms ?? 0);
    else go();
  }

  /** One attempt, once the backend's circuit breaker lets it go (maxConnections in flight, maxPendingRequests waiting). */
  private send(): void {
    if (this.finished) return;
    const slot = this.outbound.admit(this.target, (leave) => this.sendNow(leave));
    if ('status' in slot) {
      this.finish(slot.status, slot.flag, slot.detail);
      return;
    }
    this.leaveQueue = slot.leave;
    if (slot.now) this.sendNow(slot.leave);
  }

  /** One attempt to an endpoint of the backend; `leave` gives its slot back when it ends. */
  private sendNow(leave: () => void): void {
    this.leaveQueue = undefined;
    if (this.finished) {
      leave();
      return;
    }
    this.attempt++;
    const lb = this.outbound.lb;
    const endpoint = lb.pick(this.target, undefined, this.upstream.hashKey);
    if (!endpoint) {
      leave();
      this.failed({ kind: 'no_endpoint', error: `Service ${this.target.key} has no endpoints`, reused: false }, undefined);
      return;
    }
    const release = this.outbound.hold(this.target, endpoint, leave);
    const options = this.options(this.target, endpoint, this.upstream.headers);
    let answered = false;
    let perTry: NodeJS.Timeout | undefined;
    const up: ClientRequest = httpRequest(options, (answer) => {
      answered = true;
      clearTimeout(perTry);
      this.answered(up, answer, endpoint, release);
    });
    this.inflight = up;
    // connectionPool.http.maxRequestsPerConnection: the connection closes after its last answer.
    const perConnection = this.target.policy.maxRequestsPerConnection;
    if (perConnection > 0) {
      up.once('socket', (socket: Socket) => {
        const n = (requestsOn.get(socket) ?? 0) + 1;
        requestsOn.set(socket, n);
        if (n >= perConnection) up.once('response', (answer: IncomingMessage) => answer.once('end', () => socket.destroy()));
      });
    }
    const backendMs = this.entry.timeouts?.backendRequestMs;
    if (backendMs !== undefined) perTry = setTimeout(() => up.destroy(new PerTryTimeout(`no answer within ${backendMs} ms`)), backendMs);
    up.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(perTry);
      release();
      if (this.current === up) this.current = undefined;
      if (this.finished) return;
      // Cut while its answer was being passed on: so is the client's.
      if (answered) {
        this.done(this.res.statusCode, 'UPE', endpoint);
        this.res.destroy();
        return;
      }
      const kind = e instanceof PerTryTimeout ? 'per_try_timeout' : e instanceof UpstreamDenied ? 'denied' : up.reusedSocket || (e.code === 'ECONNRESET' && up.socket !== null) ? 'reset' : 'connect';
      this.failed({ kind, error: e.message, reused: up.reusedSocket }, endpoint);
    });
    // The body: what was kept, then the rest as it comes (or nothing more when it is all here).
    for (const chunk of this.body) up.write(chunk);
    if (this.bodyDone) up.end();
    else this.current = up;
  }

  /** How node:http sends to `endpoint` of `target`: its pool, and a new connection from the node proxy when the pool has none. */
  private options(target: ServiceTarget, endpoint: Endpoint, headers: string[]): UpstreamRequestOptions {
    return {
      agent: this.outbound.agent,
      method: this.req.method ?? 'GET',
      path: this.upstream.path,
      // Raw pairs in the client's order and case; its Host header goes as it came.
      headers: headers as unknown as OutgoingHttpHeaders,
      setHost: false,
      poolKey: upstreamPool(this.conn, target, endpoint),
      open: () => this.outbound.connected(target, endpoint, () => this.conn.dial(target, endpoint)),
    };
  }

  /**
   * RequestMirror: a copy of the request, once its body is in hand, to an endpoint of each mirror
   * Service (its share of requests), with "-shadow" after its host as Envoy marks it; the answer
   * is read and dropped, a failure only counted. A body over 64 KiB is not mirrored.
   */
  private mirror(): void {
    this.outbound.mirrorTo(drawMirrors(this.entry), this.replayable, (target, endpoint, count) => {
      const host = headerValue(this.req.headers, 'host') ?? target.service.name;
      const headers = applyHeaderChanges(this.upstream.headers, { set: [['host', `${host}-shadow`]], add: [], remove: [] });
      const copy = httpRequest(this.options(target, endpoint, headers), (answer) => {
        answer.resume();
        count('sent');
      });
      copy.on('error', () => count('failed'));
      for (const chunk of this.body) copy.write(chunk);
      copy.end();
    });
  }

  /** An answer's head came: retried if the rule says so for its code, else passed on. */
  private answered(up: ClientRequest, answer: IncomingMessage, endpoint: Endpoint, release: () => void): void {
    const status = answer.statusCode ?? 502;
    if (this.finished) {
      answer.destroy();
      release();
      return;
    }
    if (this.entry.retry?.codes.includes(status) && this.mayRetry()) {
      // This answer is dropped; its connection goes back to the pool once it is read.
      answer.resume();
      answer.once('end', release);
      answer.once('close', release);
      this.health(endpoint, status);
      this.retry(`answered ${status}`);
      return;
    }
    this.health(endpoint, status);
    const out = withChanges(answerFields(this.req, answer), this.upstream.answerChanges);
    try {
      this.res.writeHead(status, answer.statusMessage, out as unknown as OutgoingHttpHeaders);
    } catch (e) {
      answer.destroy();
      release();
      this.finish(502, 'UPE', `the answer could not be passed on: ${(e as Error).message}`, endpoint);
      return;
    }
    pipeAnswer(answer, this.res, {
      data: (bytes) => (this.bytesOut += bytes),
      ended: () => {
        release();
        this.done(status, this.flag, endpoint);
      },
      cut: () => {
        release();
        up.destroy();
        this.done(status, 'UPE', endpoint);
      },
    });
  }

  /** Outlier detection on answers: a run of 5xx or gateway errors may eject the endpoint. */
  private health(endpoint: Endpoint, status: number): void {
    this.outbound.answered(this.target, endpoint, status);
  }

  /** Whether another attempt may go: retries left, the whole body in hand, within the budget. */
  private mayRetry(): boolean {
    const retry = this.entry.retry;
    if (!retry || this.retries >= retry.attempts || !this.bodyDone || !this.replayable || this.finished) return false;
    return this.outbound.retryBudgetAllows(this.target);
  }

  /** The next attempt after the backoff (`why`: what ended this one). */
  private retry(why: string): void {
    this.retries++;
    this.retryTimer = this.outbound.retryAfterBackoff(
      this.target,
      this.retries,
      this.entry.retry?.backoffMs ?? 0,
      () => {
        this.retryTimer = undefined;
        this.send();
      },
      why,
    );
  }

  /** An attempt ended without an answer. */
  private failed(f: AttemptFailure, endpoint: Endpoint | undefined): void {
    if (this.finished) return;
    // The idle-connection race: once, for a request without a body, whatever the rule says.
    if (f.kind === 'reset' && f.reused && this.bodyless && this.attempt === 1) {
      this.send();
      return;
    }
    if (f.kind !== 'denied' && f.kind !== 'no_endpoint' && this.mayRetry()) {
      this.retry(f.kind);
      return;
    }
    const answer: Record<AttemptFailure['kind'], [number, string]> = { connect: [503, 'UF'], reset: [503, 'UC'], per_try_timeout: [504, 'UT'], denied: [403, 'UAEX'], no_endpoint: [503, 'UH'] };
    const [status, flag] = answer[f.kind];
    this.finish(status, flag, f.error, endpoint);
  }

  /** timeouts.request ran out: 504 if nothing was answered yet, else the answer is cut. */
  private timedOut(): void {
    if (this.finished) return;
    this.inflight?.destroy();
    if (this.res.headersSent) {
      this.done(this.res.statusCode, 'UT', undefined);
      this.res.destroy();
      return;
    }
    this.finish(504, 'UT', `no answer within ${this.entry.timeouts?.requestMs ?? 0} ms (timeouts.request)`, undefined);
  }

  /** Answered by the proxy itself. */
  private finish(status: number, flag: string, detail: string | undefined = undefined, endpoint: Endpoint | undefined = undefined): void {
    if (this.finished) return;
    this.settle();
    if (status === 0) this.outbound.count(this.conn, this.target, endpoint, 0, flag, this.started, this.facts());
    else this.outbound.answer(this.res, this.conn, this.target, endpoint, this.started, { status, flag, detail: detail ?? '' }, this.facts());
  }

  /** The backend's answer was passed on (whole, or cut). */
  private done(status: number, flag: string, endpoint: Endpoint | undefined): void {
    if (this.finished) return;
    this.settle();
    this.outbound.count(this.conn, this.target, endpoint, status, flag, this.started, this.facts());
  }

  private facts(): AccessFacts {
    return { req: this.req, requestId: this.requestId, route: `${this.entry.route} rule ${this.entry.rule}`, bytesIn: this.bytesIn, bytesOut: this.bytesOut, attempts: this.attempt };
  }

  private settle(): void {
    this.finished = true;
    clearTimeout(this.requestTimer);
    clearTimeout(this.delayTimer);
    this.leaveQueue?.();
    this.leaveQueue = undefined;
    this.retryTimer = this.outbound.cancelRetry(this.target, this.retryTimer);
    this.outbound.track('active', this.target, -1);
  }
}

/** A per-try timeout (timeouts.backendRequest) cut the attempt. */
class PerTryTimeout extends Error {}
