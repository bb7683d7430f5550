/**
 * HTTP/2 (h2c, gRPC) connections served on the addon's engine (native/src/h2.cc), for either
 * side of L7: nghttp2 serves the client's session and the upstream sessions in C++ on this
 * thread's loop, and a handler decides each stream once (the client side routes it, the server
 * side authorizes it). Bodies, trailers and flow control never reach JS.
 *
 * Retries and per-try timeouts are the engine's too: it keeps a request's body (up to 64 KiB)
 * when a rule may send it again or a mirror copies it, asks JS on a retried code or a stream that
 * ended before any answer, and drops the attempt when JS sends it again. node:http2 (h2.ts) serves
 * only a connection the engine cannot take: no addon, no fd.
 *
 * As on the HTTP/1.1 engine, the engine works on a duplicate of the client socket's fd; node:net
 * keeps the original, paused, for the pod's bookkeeping.
 */
import type { Socket } from 'node:net';

import { channelNew, closeFd, dropUpstream, h2Engine, type EngineGate, type EngineRoutes, type EngineUpstream, type H2Engine } from '../../datapath/native.js';
import type { Endpoint, ServiceTarget } from '../../config/snapshot.js';
import type { HeaderChanges } from '../../config/route-filters.js';
import { logger } from '../../shared/log.js';
import type { NodeMetrics } from '../metrics/metrics.js';
import { MAX_HEADER_BYTES, NO_BYTES, UPSTREAM_IDLE_MS, UpstreamDenied, requestIdOf, socketTotals, withBytes, type AccessFacts, type ConnectionBytes, type RequestHead } from './common.js';
import type { HttpInbound, HttpServerConnection } from './inbound.js';
import { routedTo } from './engine-routes.js';
import { NO_FIELDS, engineCopy, headerObject, type ChannelServed } from './native-engine.js';
import { NO_ANSWER_EDITS, answerEditPairs, type AnswerEdits } from './native-outbound.js';
import { drawMirrors, upstreamPool, type Decision, type HttpClientConnection, type HttpOutbound } from './outbound.js';

const log = logger('http');

/** gRPC's default limit on a message a server receives (4 MiB): a longer one is refused before any of it leaves the proxy. */
export const GRPC_MAX_MESSAGE = 4 * 1024 * 1024;

/** Header fields of one connection only: never forwarded on HTTP/2 (RFC 9113 section 8.2.2). */
export const CONNECTION_SPECIFIC = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'host', 'http2-settings']);

/**
 * Raw pairs as HTTP/2 fields, names and values joined by NUL after `into` (the engine's form:
 * one string crosses into C++): lower-case names, one-connection fields left out (te only as
 * "trailers", which gRPC needs).
 */
export function h2Fields(raw: ReadonlyArray<string>, into = ''): string {
  return joinFields(into.length === 0 ? [] : [into], raw);
}

/**
 * `parts` (fields already joined), then the pairs of `raw` that may go, joined with NULs at once:
 * one flat string (adding the pieces one by one made a tree of a string per piece, copied flat
 * again when the engine read it).
 */
function joinFields(parts: string[], raw: ReadonlyArray<string>): string {
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = (raw[i] ?? '').toLowerCase();
    const value = raw[i + 1] ?? '';
    if (name.startsWith(':') || CONNECTION_SPECIFIC.has(name) || (name === 'te' && value !== 'trailers')) continue;
    parts.push(name, value);
  }
  return parts.join('\0');
}

/** A stream's header fields as they go upstream (joined as h2Fields joins them): pseudo-header fields first, then `raw`. */
export function streamFields(method: string, authority: string, path: string, raw: ReadonlyArray<string>): string {
  return joinFields([':method', method, ':scheme', 'http', ':authority', authority, ':path', path], raw);
}

/** The answer's header changes in the engine's form (none, for most requests: nothing made). */
function answerEditsH2(changes: ReadonlyArray<HeaderChanges>): AnswerEdits {
  if (changes.length === 0) return NO_ANSWER_EDITS;
  const { remove, add } = answerEditPairs(changes);
  return { remove, add: h2Fields(add) };
}

/** One client stream on the engine, with what its handler keeps of it. */
export interface H2Stream<C, R> {
  readonly id: number;
  readonly conn: C;
  state: R | undefined;
}

/** What a side does with each stream on the engine. */
export interface H2Handler<C, R> {
  /** A stream's headers: answer it through the host (forward or respond), now or later. */
  request(s: H2Stream<C, R>, req: RequestHead, grpc: boolean): void;
  /** The attempt in flight got a retried code, or ended before an answer (status 0): see H2Events.retry; undefined when no rule of the handler's applies. */
  retry?(s: H2Stream<C, R>, status: number): boolean | undefined;
  /** The stream ended (see H2Events.done). */
  done(s: H2Stream<C, R>, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string, detail: string): void;
  /**
   * Streams the engine routed (H2Host.route) wait for a session of the pool of `routes`' target
   * `target`, endpoint `endpoint`: how to dial it from `conn`'s source; undefined when it cannot be.
   */
  dialRouted?(conn: C, routes: EngineRoutes, target: number, endpoint: number): { readonly dial: () => Promise<EngineUpstream>; readonly maxRequests: number } | undefined;
  /** A stream the engine forwarded on its own (H2Forwarding.gate) or routed (H2Host.route) ended (see H2Events.delivered). */
  delivered?(conn: C, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string | undefined, ms: number, routes: EngineRoutes | undefined, target: number | undefined, endpoint: number | undefined): void;
}

/** How a stream goes upstream (H2Host.forward). */
export interface H2Forwarding {
  /** The pool: its session takes the stream, or a new one from `dial` joins it. */
  readonly pool: string;
  /** Header fields, pseudo-header fields first (streamFields). */
  readonly fields: string;
  /** Lower-case names removed from the answer, then these fields (as h2Fields joins them) added. */
  readonly answerRemove: ReadonlyArray<string>;
  readonly answerAdd: string;
  /** A route's retry: the codes it retries on (the handler's retry() is asked on those and on resets). */
  readonly retryOn: ReadonlyArray<number> | undefined;
  /** Keep the body (up to 64 KiB) for keptBody(): a mirror's copy. */
  readonly keep: boolean;
  /** The stream's own fields go after `fields` as the client sent them (the engine adds them; `fields` are the pseudo-header fields and additions). */
  readonly own?: boolean;
  /** With `own`: the connection's later streams this gate passes go the same way without asking the handler, reported in its delivered() (H2Engine.forward). */
  readonly gate?: EngineGate;
  /** A new connection: its fd (the caller's), or a channel to an HBONE stream. */
  dial(): Promise<EngineUpstream>;
  /** A new session closes after this many streams (0: no limit). */
  readonly maxRequests: number;
  failed(e: Error): void;
}

/** The plain-text answer of the proxy: its header fields and body. */
function textAnswer(detail: string, extra: ReadonlyArray<string> = []): { fields: string; body: string } {
  return { fields: h2Fields(extra, 'content-type\0text/plain'), body: `${detail}\n` };
}

export class H2Host<C, R> {
  private engine: H2Engine | undefined;
  private failed: boolean;
  private readonly conns = new Map<number, { readonly conn: C; readonly end: (bytes?: ConnectionBytes) => void }>();
  /** Streams in flight, with how the last attempt went upstream (a refused one goes again, once). */
  private readonly streams = new Map<number, { readonly s: H2Stream<C, R>; how: H2Forwarding | undefined }>();
  /** Upstream connections being dialled, by pool: streams to the same pool wait for the same one. */
  private readonly dialing = new Map<string, Promise<void>>();
  private nextId = 0;

  constructor(
    private readonly metrics: NodeMetrics,
    private readonly side: 'client' | 'server',
    enabled: boolean,
    private readonly idleTimeoutMs: number,
    private readonly handler: H2Handler<C, R>,
  ) {
    this.failed = !enabled;
  }

  /**
   * Serves the client connection on the engine until it closes; `initial` holds bytes already
   * read from it. Why not when the engine cannot take it (no_addon: no engine; no_fd: no socket,
   * or no fd left for the engine's copy): node:http2 serves it then. Resolves with the
   * connection's bytes each way.
   */
  serve(client: Socket, conn: C, initial: Buffer | undefined): Promise<ConnectionBytes> | 'no_addon' | 'no_fd' {
    const engine = this.start();
    if (!engine) return 'no_addon';
    const copy = engineCopy(client, initial);
    if (copy === 'no_fd') return 'no_fd';
    const { fd: own } = copy;
    const id = ++this.nextId;
    return new Promise<ConnectionBytes>((resolve) => {
      let ended = false;
      const end = (bytes: ConnectionBytes = NO_BYTES): void => {
        if (ended) return;
        ended = true;
        this.conns.delete(id);
        client.destroy();
        resolve(socketTotals(client, bytes));
      };
      this.conns.set(id, { conn, end });
      client.once('close', () => {
        if (!ended) engine.close(id);
      });
      try {
        engine.serve(id, own, copy.initial);
        this.metrics.http2Engine.inc({ side: this.side, engine: 'addon', why: '' });
      } catch (e) {
        closeFd(own);
        log.warn({ err: (e as Error).message }, 'the HTTP/2 engine could not take a connection');
        end();
      }
    });
  }

  /**
   * A new channel whose side 0 the engine serves as a client connection until it closes (the
   * caller gives the other side to an HBONE stream: joined in memory, no socket). Undefined when
   * there is no engine (the caller gives the stream a socket instead).
   */
  serveChannel(conn: C): ChannelServed | undefined {
    const engine = this.start();
    if (!engine) return undefined;
    const channel = channelNew();
    const id = ++this.nextId;
    const done = new Promise<ConnectionBytes>((resolve) => {
      let ended = false;
      const end = (bytes: ConnectionBytes = NO_BYTES): void => {
        if (ended) return;
        ended = true;
        this.conns.delete(id);
        resolve(bytes);
      };
      this.conns.set(id, { conn, end });
    });
    engine.serve(id, channel);
    this.metrics.http2Engine.inc({ side: this.side, engine: 'addon', why: '' });
    return { channel, done, close: () => engine.close(id) };
  }

  /**
   * The stream goes upstream (`how`) on a session of its pool, a new one from `dial` when the
   * pool has none (one dial for every stream that waits for it); `failed` when that fails.
   */
  forward(s: H2Stream<C, R>, how: H2Forwarding): void {
    const engine = this.engine;
    const entry = this.streams.get(s.id);
    if (!engine || !entry) return;
    // A refused stream (not processed upstream) goes again once, with no retry rule too.
    entry.how = how;
    const { pool, fields, answerRemove, answerAdd, retryOn, keep, own, gate } = how;
    if (engine.forward(s.id, pool, fields, answerRemove, answerAdd, retryOn, keep, own, gate)) return;
    const opening = this.open(engine, pool, how);
    const state = s.state;
    opening.then(
      () => {
        if (this.streams.get(s.id) !== entry || s.state !== state || this.engine !== engine) return;
        if (!engine.forward(s.id, pool, fields, answerRemove, answerAdd, retryOn, keep, own, gate)) how.failed(new Error('the upstream session ended before the stream could start'));
      },
      (e: Error) => {
        if (this.streams.get(s.id) === entry && s.state === state) how.failed(e);
      },
    );
  }

  /** A new session of `pool` from `how.dial`, attached once there: one dial for every stream that waits for it. */
  private open(engine: H2Engine, pool: string, how: { dial(): Promise<EngineUpstream>; readonly maxRequests: number }): Promise<void> {
    let opening = this.dialing.get(pool);
    if (opening) return opening;
    const { maxRequests } = how;
    opening = how.dial().then((fd) => {
      if (this.engine === engine) engine.attach(pool, fd, maxRequests);
      else dropUpstream(fd);
    });
    const forget = (): void => {
      if (this.dialing.get(pool) === opening) this.dialing.delete(pool);
    };
    opening.then(forget, forget);
    this.dialing.set(pool, opening);
    return opening;
  }

  /** Gives up the attempt in flight before its answer (a per-try timeout): as the engine's abandon(). */
  abandon(s: H2Stream<C, R>): -1 | 0 | 1 {
    return this.engine?.abandon(s.id) ?? 0;
  }

  /** The stream's body as kept (a mirror's copy): as the engine's keptBody(); only until its done() returns. */
  keptBody(s: H2Stream<C, R>): Buffer | undefined {
    return this.engine?.keptBody(s.id);
  }

  /** The proxy's own plain-text answer (`extra`: more header pairs). */
  respond(s: H2Stream<C, R>, status: number, detail: string, extra?: ReadonlyArray<string>): void {
    const { fields, body } = textAnswer(detail, extra);
    this.engine?.respond(s.id, status, fields, body);
  }

  /** A redirect: its status and location, no body. */
  redirect(s: H2Stream<C, R>, status: number, location: string): void {
    this.engine?.respond(s.id, status, `location\0${location}`, '');
  }

  /** The stream's time ran out: answered (0), or cut (the status of the answer cut), or -1 when it is not in flight. */
  expire(s: H2Stream<C, R>, status: number, detail: string): number {
    const { fields, body } = textAnswer(detail);
    return this.engine?.expire(s.id, status, fields, body) ?? -1;
  }

  /** Every stream from now on goes to the handler again (the config it decided on changed). */
  undirect(): void {
    this.engine?.undirect();
  }

  /** The later streams of `s`'s connection are routed by the engine by `routes` (reported in the handler's delivered()); without, each goes to the handler. */
  route(s: H2Stream<C, R>, routes: EngineRoutes | undefined): void {
    this.engine?.route(s.id, routes);
  }

  /** Streams to the backend Service `key` the engine routed itself that are in flight. */
  inFlight(key: string): number {
    return this.engine?.inFlight(key) ?? 0;
  }

  /** Upstream sessions of the pools whose key starts with `prefix` end once idle. */
  dropPools(prefix: string): void {
    this.engine?.dropPools(prefix);
  }

  close(): void {
    this.engine?.destroy();
    this.engine = undefined;
    for (const { end } of [...this.conns.values()]) end();
    this.streams.clear();
  }

  private start(): H2Engine | undefined {
    if (this.engine || this.failed) return this.engine;
    try {
      this.engine = h2Engine(
        {
          request: (connId, id, joined) => {
            const c = this.conns.get(connId);
            if (!c) return;
            const s: H2Stream<C, R> = { id, conn: c.conn, state: undefined };
            this.streams.set(id, { s, how: undefined });
            // "host", :authority, the fields, :method, :path: the raw pairs once the last two are taken.
            const raw = joined.split('\0');
            const path = raw.pop() ?? '/';
            const method = raw.pop() ?? 'GET';
            const head: RequestHead = { method, url: path, httpVersion: '2.0', headers: headerObject(raw), rawHeaders: raw };
            this.handler.request(s, head, String(head.headers['content-type'] ?? '').startsWith('application/grpc'));
          },
          retry: (id, status) => {
            const entry = this.streams.get(id);
            if (!entry || entry.s.state === undefined) return false;
            const decided = this.handler.retry?.(entry.s, status);
            if (decided !== undefined) return decided;
            const how = entry.how;
            entry.how = undefined;
            if (!how || status !== 0) return false;
            // Not now: the engine drops the attempt once this returns, then waits for forward().
            setImmediate(() => this.forward(entry.s, how));
            return true;
          },
          done: (id, status, flag, bytesIn, bytesOut, grpcStatus, detail) => {
            const entry = this.streams.get(id);
            if (!entry) return;
            this.streams.delete(id);
            this.handler.done(entry.s, status, flag, bytesIn, bytesOut, grpcStatus, detail);
          },
          delivered: (connId, status, flag, bytesIn, bytesOut, grpcStatus, ms, routes, target, endpoint) => {
            const c = this.conns.get(connId);
            if (c) this.handler.delivered?.(c.conn, status, flag, bytesIn, bytesOut, grpcStatus, ms, routes, target, endpoint);
          },
          dial: (connId, routes, target, endpoint) => {
            const engine = this.engine;
            const pool = routes.targets[target]?.pools[endpoint];
            if (!engine || pool === undefined) return;
            const c = this.conns.get(connId);
            const how = c ? this.handler.dialRouted?.(c.conn, routes, target, endpoint) : undefined;
            if (!how) return engine.dialFailed(pool);
            // Attached, the waiting streams go; failed, they are the handler's (which dials again, and answers a failure).
            this.open(engine, pool, how).catch(() => {
              if (this.engine === engine) engine.dialFailed(pool);
            });
          },
          closed: (connId, read, written) => this.conns.get(connId)?.end({ read, written }),
          refused: (_connId, reason) => this.metrics.httpRefused.inc({ reason }),
        },
        { idleMs: this.idleTimeoutMs, poolIdleMs: UPSTREAM_IDLE_MS, maxHeaderListBytes: MAX_HEADER_BYTES, grpcMaxMessage: GRPC_MAX_MESSAGE },
      );
    } catch (e) {
      this.failed = true;
      log.warn({ err: (e as Error).message }, 'no HTTP/2 engine in the addon: node:http2 serves every HTTP/2 connection');
    }
    return this.engine;
  }
}

/** A client stream from its decision to its end. */
interface Routed {
  readonly started: number;
  readonly facts: AccessFacts;
  readonly grpc: boolean;
  /** Where it goes: forwarded, or answered by the proxy at once (no route, a redirect). */
  readonly d: Decision;
  endpoint?: Endpoint;
  release?: () => void;
  timer?: NodeJS.Timeout;
  delay?: NodeJS.Timeout;
  /** '-', or DI when a fault delayed it. */
  flag: string;
  /** The proxy answered it itself (or cut it): the flag and why, which the engine's done() does not know. */
  answered?: { readonly flag: string; readonly detail: string };
  active: boolean;
  attempts: number;
  retries: number;
  /** timeouts.backendRequest of the attempt in flight; the backoff before the next one. */
  tryTimer?: NodeJS.Timeout;
  retryTimer?: NodeJS.Timeout;
  /** The rule's mirrors this stream was drawn for: a copy to each once it ended. */
  mirrors: ReadonlyArray<{ readonly target: ServiceTarget; readonly percent: number }> | undefined;
  /** Served in one pass with the destination's side: its connection, the stream as it saw it, and its own flag when it refused it. */
  local?: { readonly conn: HttpServerConnection; readonly facts: AccessFacts; readonly flag: string | undefined };
}

/** A mirror's copy of a stream: its method, :authority ("-shadow" added), path and header pairs. */
export interface CopyHead {
  readonly method: string;
  readonly authority: string;
  readonly path: string;
  readonly headers: ReadonlyArray<string>;
}

/** Sends a mirror's copy of a stream (its head and kept body) to `endpoint` of `target`; `count` gets the result. */
export type MirrorCopy = (conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint, head: CopyHead, chunks: ReadonlyArray<Buffer>, count: (result: string) => void) => void;

/**
 * One attempt of a client stream as it goes upstream: one object per attempt, its dial and
 * failure methods on the prototype (no closures made per stream, which every stream's
 * allocations, kept alive past a scavenge, made costly).
 */
class Attempt implements H2Forwarding {
  readonly answerRemove: ReadonlyArray<string>;
  readonly answerAdd: string;
  readonly keep: boolean;
  readonly maxRequests: number;

  constructor(
    private readonly handler: NativeH2Outbound,
    private readonly s: H2Stream<HttpClientConnection, Routed>,
    private readonly r: Routed,
    private readonly target: ServiceTarget,
    private readonly endpoint: Endpoint,
    readonly pool: string,
    readonly fields: string,
    edits: AnswerEdits,
    readonly retryOn: ReadonlyArray<number> | undefined,
  ) {
    this.answerRemove = edits.remove;
    this.answerAdd = edits.add;
    this.keep = r.mirrors !== undefined;
    this.maxRequests = target.policy.maxRequestsPerConnection;
  }

  dial(): Promise<EngineUpstream> {
    return this.handler.dialFor(this.s.conn, this.target, this.endpoint);
  }

  failed(e: Error): void {
    this.handler.attemptFailed(this.s, this.r, e);
  }
}

/** The client side of HTTP/2 ports on the engine: each stream decided by HttpOutbound.decide, as on node:http2. */
export class NativeH2Outbound implements H2Handler<HttpClientConnection, Routed> {
  readonly host: H2Host<HttpClientConnection, Routed>;

  constructor(
    private readonly outbound: HttpOutbound,
    /** This node's server side: a stream to a pod of this node that reads HTTP/2 is admitted here (one pass). */
    private readonly inbound: HttpInbound | undefined,
    enabled: boolean,
    idleTimeoutMs: number,
    /** How a mirror's copy goes (node:http2's pooled sessions: copies are a share of the traffic). */
    private readonly copy: MirrorCopy,
  ) {
    this.host = new H2Host(outbound.metrics, 'client', enabled, idleTimeoutMs, this);
  }

  request(s: H2Stream<HttpClientConnection, Routed>, req: RequestHead, grpc: boolean): void {
    const started = performance.now();
    const requestId = requestIdOf(req);
    const d = this.outbound.decide(req, s.conn, requestId);
    const mirrors = d.kind === 'forward' ? drawMirrors(d.entry) : [];
    const r: Routed = {
      started,
      grpc,
      d,
      facts: { req, requestId, route: d.route, bytesIn: 0, bytesOut: 0, attempts: 0 },
      flag: '-',
      active: false,
      attempts: 0,
      retries: 0,
      endpoint: undefined,
      release: undefined,
      timer: undefined,
      delay: undefined,
      answered: undefined,
      tryTimer: undefined,
      retryTimer: undefined,
      mirrors: mirrors.length > 0 ? mirrors : undefined,
      local: undefined,
    };
    s.state = r;
    if (d.kind === 'answer') return this.proxyAnswers(s, r, d.answer.status, d.answer.flag, d.answer.detail);
    if (d.kind === 'redirect') {
      r.answered = { flag: '-', detail: '' };
      return this.host.redirect(s, d.status, d.location);
    }
    const { target, entry } = d;
    r.active = true;
    this.outbound.track('active', target, 1);
    const requestMs = entry.timeouts?.requestMs;
    if (requestMs !== undefined) r.timer = setTimeout(() => this.timedOut(s, r, requestMs), requestMs);
    const fault = entry.fault ?? d.parent.policy.fault ?? target.policy.fault;
    const delayed = fault?.delay !== undefined && Math.random() * 100 < fault.delay.percent;
    const abort = fault?.abort !== undefined && Math.random() * 100 < fault.abort.percent ? fault.abort : undefined;
    if (!delayed) return this.go(s, r, target, abort);
    r.flag = 'DI';
    r.delay = setTimeout(() => this.go(s, r, target, abort), fault?.delay?.ms ?? 0);
  }

  /** The stream goes (after a fault's delay, if any): a fault's abort, or its first attempt. */
  private go(s: H2Stream<HttpClientConnection, Routed>, r: Routed, target: ServiceTarget, abort: { readonly status: number } | undefined): void {
    if (s.state !== r) return;
    if (abort) return this.proxyAnswers(s, r, abort.status, 'FI', 'fault injected (TrafficPolicy fault.abort)');
    this.attempt(s, r, target);
  }

  /** One attempt, once the backend's circuit breaker lets it go. */
  private attempt(s: H2Stream<HttpClientConnection, Routed>, r: Routed, target: ServiceTarget): void {
    const slot = this.outbound.admit(target, (leave) => this.send(s, r, leave));
    if ('status' in slot) return this.proxyAnswers(s, r, slot.status, slot.flag, slot.detail);
    r.release = slot.leave;
    if (slot.now) this.send(s, r, slot.leave);
  }

  /** Whether another attempt may go: the rule's retry has attempts left, within the backend's retry budget. */
  private mayRetry(r: Routed): boolean {
    if (r.d.kind !== 'forward') return false;
    const { retry } = r.d.entry;
    if (!retry || r.answered || r.retries >= retry.attempts) return false;
    return this.outbound.retryBudgetAllows(r.d.target);
  }

  /** The next attempt after the backoff (HttpOutbound.retryAfterBackoff). */
  private retryLater(s: H2Stream<HttpClientConnection, Routed>, r: Routed): void {
    if (r.d.kind !== 'forward') return;
    const { target, entry } = r.d;
    clearTimeout(r.tryTimer);
    r.release?.();
    r.release = undefined;
    r.retries++;
    r.retryTimer = this.outbound.retryAfterBackoff(target, r.retries, entry.retry?.backoffMs ?? 0, () => {
      r.retryTimer = undefined;
      if (s.state === r && !r.answered) this.attempt(s, r, target);
    });
  }

  retry(s: H2Stream<HttpClientConnection, Routed>, status: number): boolean | undefined {
    const r = s.state;
    if (!r || r.d.kind !== 'forward' || !r.d.entry.retry) return undefined;
    // Outlier detection counts the answer that is dropped.
    if (status > 0 && r.endpoint) this.outbound.answered(r.d.target, r.endpoint, status);
    if (!this.mayRetry(r)) return false;
    this.retryLater(s, r);
    return true;
  }

  /** timeouts.backendRequest ran out before the attempt's answer: another attempt, or 504 (UT). */
  private perTryTimeout(s: H2Stream<HttpClientConnection, Routed>, r: Routed, ms: number): void {
    if (s.state !== r || r.answered) return;
    const detail = `no answer within ${ms} ms (timeouts.backendRequest)`;
    const given = this.host.abandon(s);
    if (given === 0) return;
    if (given > 0 && this.mayRetry(r)) return this.retryLater(s, r);
    // Given up (504), or its body cannot go again (not whole yet, or over what is kept): cut as timeouts.request is.
    r.answered = { flag: 'UT', detail };
    this.settle(r);
    if (given > 0) this.host.respond(s, 504, detail);
    else this.host.expire(s, 504, detail);
  }

  private send(s: H2Stream<HttpClientConnection, Routed>, r: Routed, leave: () => void): void {
    const d = r.d;
    if (s.state !== r || d.kind !== 'forward' || r.answered) return leave();
    r.attempts++;
    const { target, upstream } = d;
    const lb = this.outbound.lb;
    const endpoint = lb.pick(target, undefined, upstream.hashKey);
    if (!endpoint) {
      leave();
      r.release = undefined;
      return this.proxyAnswers(s, r, 503, 'UH', `Service ${target.key} has no endpoints`);
    }
    r.endpoint = endpoint;
    const conn = s.conn;
    // A pod of this node whose side reads HTTP/2: that side admits the stream here, in one pass.
    let local: HttpServerConnection | undefined;
    try {
      local = this.inbound ? conn.localServer?.(target, endpoint, 'http2') : undefined;
    } catch (e) {
      leave();
      r.release = undefined;
      return this.proxyAnswers(s, r, 403, 'UAEX', (e as Error).message);
    }
    r.release = this.outbound.hold(target, endpoint, leave);
    const edits = answerEditsH2(upstream.answerChanges);
    const { retry, timeouts } = d.entry;
    const backendMs = timeouts?.backendRequestMs;
    if (backendMs !== undefined) r.tryTimer = setTimeout(() => this.perTryTimeout(s, r, backendMs), backendMs);
    if (local && this.inbound) return this.sendLocal(s, r, local, this.inbound, edits);
    const fields = streamFields(r.facts.req.method ?? 'GET', authorityOf(upstream.headers, target), upstream.path, upstream.headers);
    this.host.forward(s, new Attempt(this, s, r, target, endpoint, upstreamPool(conn, target, endpoint), fields, edits, retry?.codes));
    // The connection's later streams that its routes let the engine send on are routed there.
    this.host.route(s, this.outbound.plans.http2.for(conn));
  }

  /** A new upstream connection from `conn`'s source (an attempt's, or routed streams' waiting for their pool), its outcome told to outlier detection. */
  dialFor(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint): Promise<EngineUpstream> {
    return this.outbound.connected(target, endpoint, () => conn.dialEngine(target, endpoint));
  }

  /** The attempt could not go upstream (Attempt.failed): another attempt, or the proxy's answer. */
  attemptFailed(s: H2Stream<HttpClientConnection, Routed>, r: Routed, e: Error): void {
    if (e instanceof UpstreamDenied) return this.proxyAnswers(s, r, 403, 'UAEX', e.message);
    if (this.mayRetry(r)) return this.retryLater(s, r);
    this.proxyAnswers(s, r, 503, 'UF', e.message);
  }

  /**
   * Both sides in one pass (a pod of this node whose side reads HTTP/2): the stream as the client
   * side sends it is admitted by the destination's side (normalized path, authorization, rate
   * limits) and goes straight to the application over that side's pool; each side counts it under
   * its own reporter. A refusal reaches the client as the destination's answer.
   */
  private sendLocal(s: H2Stream<HttpClientConnection, Routed>, r: Routed, local: HttpServerConnection, inbound: HttpInbound, edits: AnswerEdits): void {
    if (r.d.kind !== 'forward') return;
    const { upstream, entry } = r.d;
    const method = r.facts.req.method ?? 'GET';
    const req: RequestHead = { method, url: upstream.path, httpVersion: '2.0', headers: headerObject(upstream.headers), rawHeaders: upstream.headers };
    const facts: AccessFacts = { req, requestId: r.facts.requestId, route: '', bytesIn: 0, bytesOut: 0, attempts: 1 };
    const admitted = inbound.admit(req, local);
    if ('status' in admitted) {
      inbound.refused(local, admitted);
      r.local = { conn: local, facts, flag: admitted.flag };
      r.answered = { flag: '-', detail: admitted.detail };
      this.settle(r);
      return this.host.respond(s, admitted.status, admitted.detail, admitted.headers);
    }
    r.local = { conn: local, facts, flag: undefined };
    const failed = (e: Error): void => (this.mayRetry(r) ? this.retryLater(s, r) : this.proxyAnswers(s, r, 503, 'UF', e.message));
    this.host.forward(s, {
      pool: local.poolKey,
      fields: streamFields(method, authorityOf(upstream.headers, r.d.target), admitted.target, upstream.headers),
      answerRemove: edits.remove,
      answerAdd: edits.add,
      retryOn: entry.retry?.codes,
      keep: r.mirrors !== undefined,
      dial: () => local.dialFd(),
      maxRequests: 0,
      failed,
    });
  }

  /**
   * RequestMirror: a copy of the stream that ended (its body as the engine kept it, up to 64 KiB)
   * to an endpoint of each mirror Service drawn for it, "-shadow" after its :authority as Envoy
   * marks it; the answer is dropped, its result only counted.
   */
  private mirror(s: H2Stream<HttpClientConnection, Routed>, r: Routed, mirrors: NonNullable<Routed['mirrors']>): void {
    if (r.d.kind !== 'forward') return;
    const { upstream, target } = r.d;
    const body = this.host.keptBody(s);
    const head: CopyHead = { method: r.facts.req.method ?? 'GET', authority: `${authorityOf(upstream.headers, target)}-shadow`, path: upstream.path, headers: upstream.headers };
    const chunks = body && body.length > 0 ? [body] : [];
    this.outbound.mirrorTo(mirrors, body !== undefined, (t, endpoint, count) => this.copy(s.conn, t, endpoint, head, chunks, count));
  }

  /** timeouts.request ran out: 504 (UT) if nothing was answered yet, else the stream is cut. */
  private timedOut(s: H2Stream<HttpClientConnection, Routed>, r: Routed, ms: number): void {
    if (s.state !== r || r.answered) return;
    const detail = `no answer within ${ms} ms (timeouts.request)`;
    r.answered = { flag: 'UT', detail };
    this.settle(r);
    this.host.expire(s, 504, detail);
  }

  private proxyAnswers(s: H2Stream<HttpClientConnection, Routed>, r: Routed, status: number, flag: string, detail: string): void {
    if (r.answered) return;
    r.answered = { flag, detail };
    this.settle(r);
    this.host.respond(s, status, detail);
  }

  /** The stream's slot, counts and timers go (once). */
  private settle(r: Routed): void {
    clearTimeout(r.timer);
    clearTimeout(r.delay);
    clearTimeout(r.tryTimer);
    if (r.d.kind === 'forward') r.retryTimer = this.outbound.cancelRetry(r.d.target, r.retryTimer);
    r.release?.();
    r.release = undefined;
    if (r.active && r.d.kind === 'forward') this.outbound.track('active', r.d.target, -1);
    r.active = false;
  }

  dialRouted(conn: HttpClientConnection, routes: EngineRoutes, at: number, endpointAt: number): { readonly dial: () => Promise<EngineUpstream>; readonly maxRequests: number } | undefined {
    const to = routedTo(routes, at, endpointAt);
    if (!to) return undefined;
    const { target, endpoint } = to;
    return { dial: () => this.dialFor(conn, target, endpoint), maxRequests: target.policy.maxRequestsPerConnection };
  }

  delivered(conn: HttpClientConnection, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string | undefined, ms: number, routes: EngineRoutes | undefined, target: number | undefined, endpoint: number | undefined): void {
    this.outbound.delivered(conn, routes, target, endpoint, status, flag, ms, bytesIn, bytesOut, grpcStatus);
  }

  done(s: H2Stream<HttpClientConnection, Routed>, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string): void {
    const r = s.state;
    if (!r) return;
    s.state = undefined;
    this.settle(r);
    const target = r.d.kind === 'forward' ? r.d.target : r.d.parent;
    const { endpoint } = r;
    const facts = withBytes(r.facts, bytesIn, bytesOut, r.attempts);
    const grpc = r.grpc ? grpcStatus : undefined;
    if (r.mirrors && flag !== 'DC') this.mirror(s, r, r.mirrors);
    if (r.local) {
      const f = flag === 'DC' ? 'DC' : (r.local.flag ?? (r.answered ? r.answered.flag : flag));
      this.inbound?.count(r.local.conn, f === 'DC' ? 0 : status, f, r.started, withBytes(r.local.facts, bytesIn, bytesOut, 1), grpc);
    }
    if (r.answered) {
      // A flag the engine saw (the client left first) says more than the proxy's answer.
      const f = flag === 'DC' ? 'DC' : r.answered.flag;
      if (f !== '-' && f !== 'DC') this.outbound.noteAnswer(s.conn, target, endpoint, r.started, { status, flag: f, detail: r.answered.detail }, facts);
      else this.outbound.count(s.conn, target, endpoint, status, f, r.started, facts, grpc);
      return;
    }
    // Outlier detection on answers the backend gave (not on the engine's own).
    if (endpoint && flag === '-' && r.d.kind === 'forward') this.outbound.answered(target, endpoint, status);
    this.outbound.count(s.conn, target, endpoint, flag === 'DC' ? 0 : status, flag === '-' ? r.flag : flag, r.started, facts, grpc);
  }
}

interface Delivering {
  readonly started: number;
  readonly facts: AccessFacts;
  readonly grpc: boolean;
  answered?: string;
}

/** The server side of HTTP/2 ports on the engine: each stream admitted by HttpInbound.admit, then delivered on a session pooled per pod, port and caller. */
export class NativeH2Inbound implements H2Handler<HttpServerConnection, Delivering> {
  readonly host: H2Host<HttpServerConnection, Delivering>;

  constructor(
    private readonly inbound: HttpInbound,
    metrics: NodeMetrics,
    enabled: boolean,
    idleTimeoutMs: number,
  ) {
    this.host = new H2Host(metrics, 'server', enabled, idleTimeoutMs, this);
  }

  request(s: H2Stream<HttpServerConnection, Delivering>, req: RequestHead, grpc: boolean): void {
    const started = performance.now();
    const requestId = requestIdOf(req);
    const { conn } = s;
    const r: Delivering = { started, grpc, facts: { req, requestId, route: '', bytesIn: 0, bytesOut: 0, attempts: 1 }, answered: undefined };
    s.state = r;
    const admitted = this.inbound.admit(req, conn);
    if ('status' in admitted) {
      this.inbound.refused(conn, admitted);
      r.answered = admitted.flag;
      return this.host.respond(s, admitted.status, admitted.detail, admitted.headers);
    }
    this.host.forward(s, {
      pool: conn.poolKey,
      // The stream's own fields go as they came (HTTP/2 has no hop-by-hop fields: the engine
      // refused the stream otherwise; te: trailers, which gRPC needs, stays), the engine adding
      // them, its x-request-id among them (the engine gave one to a stream that had none).
      fields: streamFields(req.method ?? 'GET', String(req.headers.host ?? ''), admitted.target, NO_FIELDS),
      own: true,
      // What the config now lets through unread on this connection (no rate limit, no access
      // log; what the policies allow by method, host and path): the engine passes those later
      // streams on itself, and asks for the others.
      gate: this.inbound.unreadGate(conn),
      answerRemove: [],
      answerAdd: '',
      retryOn: undefined,
      keep: false,
      dial: () => conn.dialFd(),
      maxRequests: 0,
      failed: (e) => {
        if (s.state !== r || r.answered) return;
        r.answered = 'UF';
        this.host.respond(s, 503, e.message);
      },
    });
  }

  done(s: H2Stream<HttpServerConnection, Delivering>, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string): void {
    const r = s.state;
    if (!r) return;
    s.state = undefined;
    const f = flag === 'DC' || r.answered === undefined ? flag : r.answered;
    this.inbound.count(s.conn, f === 'DC' ? 0 : status, f, r.started, withBytes(r.facts, bytesIn, bytesOut, 1), r.grpc ? grpcStatus : undefined);
  }

  delivered(conn: HttpServerConnection, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string | undefined, ms: number): void {
    this.inbound.counted(conn, flag === 'DC' ? 0 : status, flag, ms, bytesIn, bytesOut, grpcStatus);
  }
}

/** The :authority upstream: the (possibly rewritten) Host of the request, else the Service's name. */
export function authorityOf(raw: ReadonlyArray<string>, target: ServiceTarget): string {
  for (let i = 0; i + 1 < raw.length; i += 2) if ((raw[i] ?? '').toLowerCase() === 'host') return raw[i + 1] ?? '';
  return target.service.name;
}
