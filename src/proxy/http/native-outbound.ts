/**
 * The client side of L7 on the addon's HTTP/1.1 engine (native-engine.ts): each request is routed
 * by the same decide() as on node:http, so routing, weights, filters, affinity, circuit breaking
 * and outlier detection are one code; a rule's timeouts.request (expire()), faults,
 * maxRequestsPerConnection, retries and per-attempt timeouts apply here too (the engine keeps a
 * request's body up to 64 KiB to send it again, as node:http's path does), and so do mirrors
 * (keptBody) and upgrades (a 101 joins the connections in the engine). HTTP/1.0 and CONNECT go
 * to node:http: a request that needs it hands its connection to node:http (HttpOutbound) from
 * that request on, so nothing is refused for being unsupported here.
 */
import type { Socket } from 'node:net';

import type { Endpoint, HttpRouteEntry, ServiceTarget } from '../../config/snapshot.js';
import type { HeaderChanges } from '../../config/route-filters.js';
import { UpstreamDenied, headerValue, rawHead, requestIdOf, withBytes, type AccessFacts, type RequestHead } from './common.js';
import type { EngineRoutes, EngineUpstream } from '../../datapath/native.js';
import { routedTo } from './engine-routes.js';
import type { HttpInbound, HttpServerConnection } from './inbound.js';
import { Http1Host, headerObject, proxyAnswer, requestHead, upgradeFields, type Forwarding, type Http1Handler, type Served } from './native-engine.js';
import { applyHeaderChanges, drawMirrors, upstreamPool, type Decision, type HttpClientConnection, type HttpOutbound } from './outbound.js';

/** The request a connection is on, from its decision to its end. */
interface InFlight {
  readonly started: number;
  readonly facts: AccessFacts;
  readonly target: ServiceTarget;
  endpoint?: Endpoint;
  /** Gives the circuit breaker's slot (or place in line) and the endpoint's count back; once. */
  release?: () => void;
  /** Served in one pass with the destination's side (a pod of this node that reads HTTP): its connection and the request as it saw it. */
  local?: { readonly conn: HttpServerConnection; readonly facts: AccessFacts };
  /** The rule's timeouts.request. */
  timer?: NodeJS.Timeout;
  /** A fault's delay before the request goes. */
  delay?: NodeJS.Timeout;
  /** The response flag of an answer passed on: '-', or DI when a fault delayed it. */
  flag: string;
  /** Where it goes (the decision), for each attempt. */
  readonly d: Extract<Decision, { kind: 'forward' }>;
  /** Attempts made, and retries among them. */
  attempts: number;
  retries: number;
  /** timeouts.backendRequest of the attempt in flight; the backoff before the next one. */
  tryTimer?: NodeJS.Timeout;
  retryTimer?: NodeJS.Timeout;
  /** The rule's mirrors this request was drawn for (their percentages): a copy to each once it is done. */
  mirrors: ReadonlyArray<{ readonly target: ServiceTarget; readonly percent: number }> | undefined;
}

/** An upgrade's attempt: no retry, no per-try timeout (it becomes a tunnel). */
const NO_RETRY: Pick<HttpRouteEntry, 'retry' | 'timeouts'> = Object.freeze({});

/** How long a mirror's copy may take before its connection goes (its answer is only counted). */
const MIRROR_TIMEOUT_MS = 30_000;

/** What every attempt of a request asks of the engine besides where it goes. */
type AnswerHandling = Pick<Forwarding, 'answerRemove' | 'answerAdd' | 'maxRequests' | 'retryOn' | 'keep'>;

/**
 * One attempt of a request as it goes upstream: one object of one shape per attempt, its dial and
 * failure on the prototype (no closures made per request: a request's allocations mostly outlive
 * a scavenge, so each one costs). `local`: the destination's side of this node serves it (one pass).
 */
class Attempt implements Forwarding {
  readonly answerRemove: ReadonlyArray<string> | undefined;
  readonly answerAdd: string | undefined;
  readonly maxRequests: number | undefined;
  readonly retryOn: ReadonlyArray<number> | undefined;
  readonly keep: boolean | undefined;

  constructor(
    private readonly handler: NativeOutbound,
    private readonly s: Served<HttpClientConnection, InFlight>,
    private readonly request: InFlight,
    private readonly endpoint: Endpoint,
    /** The endpoint's pod is of this node and its side reads HTTP: that side's connection (one pass). */
    private readonly local: HttpServerConnection | undefined,
    common: AnswerHandling,
    readonly pool: string,
    readonly head: string,
  ) {
    this.answerRemove = common.answerRemove;
    this.answerAdd = common.answerAdd;
    this.maxRequests = common.maxRequests;
    this.retryOn = common.retryOn;
    this.keep = common.keep;
  }

  dial(): Promise<EngineUpstream> {
    return this.local ? this.local.dialFd() : this.handler.dialFor(this.s, this.request.target, this.endpoint);
  }

  failed(e: Error): void {
    this.handler.attemptFailed(this.s, this.request, e, this.local === undefined);
  }
}

/**
 * The answer's header changes as the engines apply them: names removed from the upstream's
 * answer, then fields added (pairs, names as configured). Folded in order, as applyHeaderChanges() applies them one by
 * one: a later change's remove or set drops what an earlier one added.
 */
export function answerEditPairs(changes: ReadonlyArray<HeaderChanges>): { remove: string[]; add: string[] } {
  const remove = new Set<string>();
  let added: Array<readonly [string, string]> = [];
  for (const c of changes) {
    const drop = new Set([...c.remove, ...c.set.map(([n]) => n)].map((n) => n.toLowerCase()));
    for (const n of drop) remove.add(n);
    added = added.filter(([n]) => !drop.has(n.toLowerCase()));
    added.push(...c.set, ...c.add);
  }
  return { remove: [...remove], add: added.flatMap(([n, v]) => [n, v]) };
}

/** An answer's header changes in an engine's form: names removed, then fields added (each engine joins them its way). */
export interface AnswerEdits {
  readonly remove: ReadonlyArray<string>;
  readonly add: string;
}

/** No changes: what most requests get, made once. */
export const NO_ANSWER_EDITS: AnswerEdits = Object.freeze({ remove: Object.freeze([]), add: '' });

/** The same for the HTTP/1.1 engine: the fields added as "name: value\r\n" lines. */
export function answerEdits(changes: ReadonlyArray<HeaderChanges>): AnswerEdits {
  if (changes.length === 0) return NO_ANSWER_EDITS;
  const { remove, add } = answerEditPairs(changes);
  let lines = '';
  for (let i = 0; i + 1 < add.length; i += 2) lines += `${add[i]}: ${add[i + 1]}\r\n`;
  return { remove, add: lines };
}

export class NativeOutbound implements Http1Handler<HttpClientConnection, InFlight> {
  readonly host: Http1Host<HttpClientConnection, InFlight>;

  constructor(
    private readonly outbound: HttpOutbound,
    /** This node's server side: a request to a pod of this node that reads HTTP is admitted here (one pass). */
    private readonly inbound: HttpInbound | undefined,
    enabled: boolean,
    idleTimeoutMs: number,
    /** node:http's way, for a connection handed back (its unread bytes put back first). */
    fallback: (client: Socket, conn: HttpClientConnection, unread: Buffer) => Promise<void>,
  ) {
    this.host = new Http1Host(outbound.metrics, 'client', enabled, idleTimeoutMs, this, fallback);
  }

  /** The request in flight on `s` is over, whatever ended it: its slot, counts and timer go. */
  private settle(s: Served<HttpClientConnection, InFlight>, r: InFlight): void {
    if (s.request === r) s.request = undefined;
    clearTimeout(r.timer);
    clearTimeout(r.delay);
    clearTimeout(r.tryTimer);
    r.retryTimer = this.outbound.cancelRetry(r.target, r.retryTimer);
    r.release?.();
    r.release = undefined;
    this.outbound.track('active', r.target, -1);
  }

  /** timeouts.request ran out: 504 (UT) if nothing was answered yet, else the answer is cut. */
  private timedOut(s: Served<HttpClientConnection, InFlight>, r: InFlight, ms: number): void {
    if (s.request !== r) return;
    this.expired(s, r, `no answer within ${ms} ms (timeouts.request)`);
  }

  /** The request's time ran out (`detail` says which): 504 (UT) if nothing was answered yet, else the answer is cut. */
  private expired(s: Served<HttpClientConnection, InFlight>, r: InFlight, detail: string): void {
    this.settle(s, r);
    const count = (status: number, bytesIn: number): void => {
      this.outbound.noteAnswer(s.conn, r.target, r.endpoint, r.started, { status, flag: 'UT', detail }, { ...r.facts, bytesIn, attempts: r.attempts });
      if (r.local) this.inbound?.count(r.local.conn, status, 'UT', r.started, { ...r.local.facts, bytesIn });
    };
    const cut = this.host.expire(s, proxyAnswer(504, detail), 504, (bytesIn) => count(504, bytesIn));
    if (cut > 0) count(cut, r.facts.bytesIn);
  }

  left(s: Served<HttpClientConnection, InFlight>): void {
    // The client left before its answer was whole (Envoy's DC).
    const r = s.request;
    if (!r) return;
    this.settle(s, r);
    this.outbound.count(s.conn, r.target, r.endpoint, 0, 'DC', r.started, r.facts);
    if (r.local) this.inbound?.count(r.local.conn, 0, 'DC', r.started, r.local.facts);
  }

  head(s: Served<HttpClientConnection, InFlight>, req: RequestHead): void {
    const started = performance.now();
    const requestId = requestIdOf(req);
    const { conn } = s;
    const d = this.outbound.decide(req, conn, requestId);
    const facts: AccessFacts = { req, requestId, route: d.route, bytesIn: 0, bytesOut: 0, attempts: 0 };
    if (d.kind === 'answer') {
      const { answer } = d;
      return this.host.respond(s, proxyAnswer(answer.status, answer.detail), answer.status, (bytesIn) => this.outbound.noteAnswer(conn, d.parent, undefined, started, answer, { ...facts, bytesIn }));
    }
    if (d.kind === 'redirect') {
      return this.host.respond(s, rawHead(d.status, ['location', d.location, 'content-length', '0']), d.status, (bytesIn) => this.outbound.count(conn, d.parent, undefined, d.status, '-', started, { ...facts, bytesIn }));
    }
    const { target } = d;
    // Every field from the start: one shape for every request (no map transitions per request).
    // RequestMirror: drawn now (each mirror's percentage), copied once the request is done.
    // An upgrade (WebSocket) is no request to copy or to time: it becomes a tunnel.
    const upgrade = req.headers['upgrade'] !== undefined;
    const mirrors = upgrade ? [] : drawMirrors(d.entry);
    const request: InFlight = { started, target, facts, flag: '-', d, attempts: 0, retries: 0, endpoint: undefined, release: undefined, local: undefined, timer: undefined, delay: undefined, tryTimer: undefined, retryTimer: undefined, mirrors: mirrors.length > 0 ? mirrors : undefined };
    s.request = request;
    this.outbound.track('active', target, 1);
    const requestMs = upgrade ? undefined : d.entry.timeouts?.requestMs;
    if (requestMs !== undefined) request.timer = setTimeout(() => this.timedOut(s, request, requestMs), requestMs);
    // Faults (TrafficPolicy fault, Istio's semantics): the delay first, then the abort.
    const fault = d.entry.fault ?? d.parent.policy.fault ?? target.policy.fault;
    const delayed = fault?.delay !== undefined && Math.random() * 100 < fault.delay.percent;
    const abort = fault?.abort !== undefined && Math.random() * 100 < fault.abort.percent ? fault.abort : undefined;
    if (!delayed) return this.go(s, request, abort);
    request.flag = 'DI';
    request.delay = setTimeout(() => this.go(s, request, abort), fault?.delay?.ms ?? 0);
  }

  /** The request goes (after a fault's delay, if any): a fault's abort, or its first attempt. */
  private go(s: Served<HttpClientConnection, InFlight>, request: InFlight, abort: { readonly status: number } | undefined): void {
    if (s.request !== request) return;
    if (abort) return this.proxyAnswers(s, request, abort.status, 'FI', 'fault injected (TrafficPolicy fault.abort)');
    this.attempt(s, request);
  }

  /** One attempt, once the backend's circuit breaker lets it go (maxConnections in flight, maxPendingRequests waiting). */
  private attempt(s: Served<HttpClientConnection, InFlight>, request: InFlight): void {
    const slot = this.outbound.admit(request.target, (leave) => this.send(s, request, leave));
    if ('status' in slot) return this.proxyAnswers(s, request, slot.status, slot.flag, slot.detail);
    request.release = slot.leave;
    if (slot.now) this.send(s, request, slot.leave);
  }

  /** Whether another attempt may go: retries left, within the backend's retry budget. */
  private mayRetry(r: InFlight): boolean {
    const retry = r.d.entry.retry;
    if (!retry || r.retries >= retry.attempts) return false;
    return this.outbound.retryBudgetAllows(r.target);
  }

  /** The next attempt after the backoff (HttpOutbound.retryAfterBackoff). */
  private retryLater(s: Served<HttpClientConnection, InFlight>, r: InFlight): void {
    clearTimeout(r.tryTimer);
    r.release?.();
    r.release = undefined;
    r.retries++;
    r.retryTimer = this.outbound.retryAfterBackoff(r.target, r.retries, r.d.entry.retry?.backoffMs ?? 0, () => {
      r.retryTimer = undefined;
      if (s.request === r) this.attempt(s, r);
    });
  }

  retry(s: Served<HttpClientConnection, InFlight>, status: number): boolean | undefined {
    const r = s.request;
    if (!r?.d.entry.retry) return undefined;
    // Outlier detection counts the answer that is dropped.
    if (status > 0 && r.endpoint) this.outbound.answered(r.target, r.endpoint, status);
    if (!this.mayRetry(r)) return false;
    this.retryLater(s, r);
    return true;
  }

  /** timeouts.backendRequest ran out before the attempt's answer: another attempt, or 504 (UT). */
  private perTryTimeout(s: Served<HttpClientConnection, InFlight>, r: InFlight, ms: number): void {
    if (s.request !== r) return;
    const detail = `no answer within ${ms} ms (timeouts.backendRequest)`;
    const given = this.host.abandon(s);
    if (given === 0) return;
    // Its body cannot go again (not whole yet, or over what is kept): the attempt ends with 504.
    if (given < 0) return this.expired(s, r, detail);
    if (this.mayRetry(r)) return this.retryLater(s, r);
    this.proxyAnswers(s, r, 504, 'UT', detail);
  }

  /** The request to an endpoint of its backend, once the circuit breaker lets it go. */
  private send(s: Served<HttpClientConnection, InFlight>, request: InFlight, leave: () => void): void {
    if (s.request !== request) return leave();
    const { d } = request;
    request.attempts++;
    const { target, upstream } = d;
    const lb = this.outbound.lb;
    const endpoint = lb.pick(target, undefined, upstream.hashKey);
    if (!endpoint) {
      leave();
      request.release = undefined;
      return this.proxyAnswers(s, request, 503, 'UH', `Service ${target.key} has no endpoints`);
    }
    request.endpoint = endpoint;
    let local: HttpServerConnection | undefined;
    try {
      local = this.inbound ? s.conn.localServer?.(target, endpoint, 'http1') : undefined;
    } catch (e) {
      leave();
      request.release = undefined;
      return this.proxyAnswers(s, request, 403, 'UAEX', (e as Error).message);
    }
    request.release = this.outbound.hold(target, endpoint, leave);
    const edits = answerEdits(upstream.answerChanges);
    const upgrade = upgradeFields(request.facts.req);
    const { retry, timeouts } = upgrade.length > 0 ? NO_RETRY : d.entry;
    const backendMs = timeouts?.backendRequestMs;
    if (backendMs !== undefined) request.tryTimer = setTimeout(() => this.perTryTimeout(s, request, backendMs), backendMs);
    const common: AnswerHandling = { answerRemove: edits.remove, answerAdd: edits.add, maxRequests: target.policy.maxRequestsPerConnection, retryOn: retry?.codes, keep: request.mirrors !== undefined };
    if (local && this.inbound) return this.sendLocal(s, request, endpoint, local, this.inbound, common, upgrade);
    // The connection's later requests that its routes would only pass on go from the engine.
    this.host.route(s, this.outbound.plans.http1.for(s.conn));
    this.host.forward(s, new Attempt(this, s, request, endpoint, undefined, common, upstreamPool(s.conn, target, endpoint), requestHead(request.facts.req.method ?? 'GET', upstream.path, upstream.headers, upgrade)));
  }

  /** A new upstream connection to `endpoint` of `target` from the client's source (an attempt's, or a routed request's), its outcome told to outlier detection. */
  dialFor(s: Served<HttpClientConnection, InFlight>, target: ServiceTarget, endpoint: Endpoint): Promise<EngineUpstream> {
    return this.outbound.connected(target, endpoint, () => s.conn.dialEngine(target, endpoint));
  }

  /** The attempt could not go upstream (Attempt.failed): another attempt, or the proxy's answer (403 when policy refused the connection to another node). */
  attemptFailed(s: Served<HttpClientConnection, InFlight>, request: InFlight, e: Error, remote: boolean): void {
    if (remote && e instanceof UpstreamDenied) return this.proxyAnswers(s, request, 403, 'UAEX', e.message);
    if (this.mayRetry(request)) return this.retryLater(s, request);
    this.proxyAnswers(s, request, 503, 'UF', e.message);
  }

  /**
   * Both sides in one pass (a pod of this node whose side reads HTTP): the request as the client
   * side sends it is admitted by the destination's side (normalized path, authorization, rate
   * limits) and goes straight to the application; each side counts it under its own reporter.
   * `upgrade`: the request's upgrade fields, as send() found them.
   */
  private sendLocal(s: Served<HttpClientConnection, InFlight>, request: InFlight, endpoint: Endpoint, local: HttpServerConnection, inbound: HttpInbound, common: AnswerHandling, upgrade: ReadonlyArray<string>): void {
    const { upstream, target } = request.d;
    const req: RequestHead = { method: request.facts.req.method, url: upstream.path, httpVersion: '1.1', headers: headerObject(upstream.headers), rawHeaders: upstream.headers };
    const atDestination: AccessFacts = { req, requestId: request.facts.requestId, route: '', bytesIn: 0, bytesOut: 0, attempts: 1 };
    request.local = { conn: local, facts: atDestination };
    const admitted = inbound.admit(req, local);
    if ('status' in admitted) {
      inbound.refused(local, admitted);
      this.settle(s, request);
      const bytesOut = Buffer.byteLength(`${admitted.detail}\n`);
      // The source's side sees the destination's answer, as it would from another node.
      return this.host.respond(s, proxyAnswer(admitted.status, admitted.detail, admitted.headers), admitted.status, (bytesIn) => {
        inbound.count(local, admitted.status, admitted.flag, request.started, { ...atDestination, bytesIn, bytesOut });
        this.outbound.count(s.conn, target, request.endpoint, admitted.status, '-', request.started, { ...request.facts, bytesIn, bytesOut, attempts: 1 });
      });
    }
    this.host.forward(s, new Attempt(this, s, request, endpoint, local, common, local.poolKey, requestHead(req.method ?? 'GET', admitted.target, upstream.headers, upgrade)));
  }

  /** The proxy answers the request in flight itself (no endpoint, a failed connect, a refusal, the circuit breaker). */
  private proxyAnswers(s: Served<HttpClientConnection, InFlight>, request: InFlight, status: number, flag: string, detail: string): void {
    this.settle(s, request);
    this.host.respond(s, proxyAnswer(status, detail), status, (bytesIn) => {
      this.outbound.noteAnswer(s.conn, request.target, request.endpoint, request.started, { status, flag, detail }, { ...request.facts, bytesIn });
      if (request.local) this.inbound?.count(request.local.conn, status, flag, request.started, { ...request.local.facts, bytesIn });
    });
  }

  /**
   * RequestMirror: a copy of the request that ended (its body as the engine kept it, up to 64 KiB)
   * to an endpoint of each mirror Service drawn for it, with "-shadow" after its host as Envoy
   * marks it, on a connection of its own that closes after the answer; the answer is read and
   * dropped, its result only counted. Only now: keptBody() is the request's until the next one.
   */
  private mirror(s: Served<HttpClientConnection, InFlight>, r: InFlight, mirrors: NonNullable<InFlight['mirrors']>): void {
    const body = this.host.keptBody(s);
    this.outbound.mirrorTo(mirrors, body !== undefined, (target, endpoint, count) => {
      const host = headerValue(r.facts.req.headers, 'host') ?? target.service.name;
      const headers = applyHeaderChanges(r.d.upstream.headers, { set: [['host', `${host}-shadow`], ['connection', 'close']], add: [], remove: [] });
      const head = requestHead(r.facts.req.method ?? 'GET', r.d.upstream.path, headers);
      s.conn.dial(target, endpoint).then(
        (socket) => {
          let counted = false;
          const once = (result: string): void => {
            if (counted) return;
            counted = true;
            count(result);
          };
          socket.setTimeout(MIRROR_TIMEOUT_MS, () => socket.destroy());
          socket.on('data', (d: Buffer) => once(d.subarray(0, 7).toString('latin1') === 'HTTP/1.' ? 'sent' : 'failed'));
          socket.on('error', () => once('failed'));
          socket.on('end', () => socket.destroy());
          socket.on('close', () => once('failed'));
          socket.write(head);
          if (body && body.length > 0) socket.write(body);
        },
        () => count('failed'),
      );
    });
  }

  /** A connection for a request the engine routed by a plan (Http1Events.dial), from the client's source; its outcome told to outlier detection. */
  dialRouted(s: Served<HttpClientConnection, InFlight>, routes: EngineRoutes, at: number, endpointAt: number): Promise<EngineUpstream> | undefined {
    const to = routedTo(routes, at, endpointAt);
    return to ? this.dialFor(s, to.target, to.endpoint) : undefined;
  }

  /** A request the engine routed by a plan ended: counted as decide()'s are, its answer told to outlier detection. */
  delivered(s: Served<HttpClientConnection, InFlight>, status: number, flag: string, bytesIn: number, bytesOut: number, ms: number, routes: EngineRoutes | undefined, target: number | undefined, endpoint: number | undefined): void {
    this.outbound.delivered(s.conn, routes, target, endpoint, status, flag, ms, bytesIn, bytesOut, undefined);
  }

  done(s: Served<HttpClientConnection, InFlight>, status: number, flag: string, bytesIn: number, bytesOut: number, detail: string): void {
    const request = s.request;
    if (!request) return;
    this.settle(s, request);
    if (request.mirrors) this.mirror(s, request, request.mirrors);
    const { endpoint, target } = request;
    // Outlier detection on answers the backend gave (not on the engine's own).
    if (endpoint && flag === '-') this.outbound.answered(target, endpoint, status);
    const facts = withBytes(request.facts, bytesIn, bytesOut, request.attempts);
    if (request.local) this.inbound?.count(request.local.conn, status, flag, request.started, withBytes(request.local.facts, bytesIn, bytesOut, request.local.facts.attempts));
    if (flag === '-') this.outbound.count(s.conn, target, endpoint, status, request.flag, request.started, facts);
    else this.outbound.noteAnswer(s.conn, target, endpoint, request.started, { status, flag, detail }, facts);
  }
}
