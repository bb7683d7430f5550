/**
 * The client side of L7 on ports that speak HTTP/2 (appProtocol http2, h2c, grpc, or such a name
 * prefix): the client's connection is h2c with prior knowledge (what gRPC clients speak), each
 * stream is routed as an HTTP/1.1 request is (HttpOutbound.decide: HTTPRoute and GRPCRoute
 * matches, weights, filters, faults, circuit breaking, request timeout), and goes upstream as a
 * stream of an HTTP/2 session to the chosen endpoint, multiplexed: one session per source pod,
 * backend Service and endpoint, opened by the node proxy like any upstream connection. Bodies and
 * trailers are streamed both ways, so unary, server, client and bidirectional gRPC streaming all
 * pass; `grpc-status` is reported in Istio's `grpc_response_status`.
 *
 * A rule's retry (GEP-1731: its codes on the answer's :status, resets and refused streams before
 * any answer, failed connects; the backend's retry budget; backoff with full jitter) and per-try
 * timeout (timeouts.backendRequest) apply to a stream whose body the client has ended and that
 * fits in 64 KiB (kept as it goes, sent again first): unary calls and requests, not a stream
 * still being sent. A RequestMirror copies a stream once it ended (its body kept up to 64 KiB).
 * A backend's maxRequestsPerConnection closes a session (gracefully) after that many streams.
 */
import { connect as h2connect, constants, createServer, type ClientHttp2Session, type ClientHttp2Stream, type Http2Server, type IncomingHttpHeaders, type OutgoingHttpHeaders, type ServerHttp2Session, type ServerHttp2Stream } from 'node:http2';
import { Socket } from 'node:net';
import type { Duplex } from 'node:stream';

import type { Endpoint, ServiceTarget } from '../../config/snapshot.js';
import { logger } from '../../shared/log.js';
import { NO_BYTES, UPSTREAM_IDLE_MS, UpstreamDenied, drain, newRequestId, pairs, socketTotals, withHead, type AccessFacts, type ConnectionBytes, type RequestHead } from './common.js';
import { drawMirrors, upstreamPool, withChanges, type Decision, type HttpClientConnection, type HttpOutbound } from './outbound.js';
import type { HeaderChanges } from '../../config/route-filters.js';
import type { HttpInbound, HttpServerConnection } from './inbound.js';
import type { NodeMetrics } from '../metrics/metrics.js';
import { CONNECTION_SPECIFIC, GRPC_MAX_MESSAGE, NativeH2Inbound, NativeH2Outbound, authorityOf, type CopyHead } from './native-h2.js';
import type { ChannelServed } from './native-engine.js';

const log = logger('http');

const END_STREAM = constants.NGHTTP2_FLAG_END_STREAM;

/** A stream's headers as routing reads a request: its method and path, Host from :authority, the other headers as pairs. */
function headOf(headers: IncomingHttpHeaders): RequestHead {
  const authority = String(headers[':authority'] ?? headers['host'] ?? '');
  const raw: string[] = ['host', authority];
  const plain: IncomingHttpHeaders = { host: authority };
  for (const [name, value] of Object.entries(headers)) {
    if (name.startsWith(':') || name === 'host' || value === undefined) continue;
    plain[name] = value;
    for (const v of Array.isArray(value) ? value : [value]) raw.push(name, String(v));
  }
  return { method: String(headers[':method'] ?? 'GET'), url: String(headers[':path'] ?? '/'), httpVersion: '2.0', headers: plain, rawHeaders: raw };
}

/** Raw pairs as HTTP/2 header fields: lower-case names, one-connection headers left out (te only as "trailers", which gRPC needs). */
function fields(raw: ReadonlyArray<string>, into: OutgoingHttpHeaders = {}): OutgoingHttpHeaders {
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = (raw[i] ?? '').toLowerCase();
    const value = raw[i + 1] ?? '';
    if (name.startsWith(':') || CONNECTION_SPECIFIC.has(name) || (name === 'te' && value !== 'trailers')) continue;
    const had = into[name];
    into[name] = had === undefined ? value : [...(Array.isArray(had) ? had : [String(had)]), value];
  }
  return into;
}

/** Header fields as raw pairs (pseudo-headers left out). */
function pairsOf(headers: IncomingHttpHeaders): string[] {
  const raw: string[] = [];
  for (const [name, value] of Object.entries(headers)) {
    if (name.startsWith(':') || value === undefined) continue;
    for (const v of Array.isArray(value) ? value : [value]) raw.push(name, String(v));
  }
  return raw;
}

const isGrpc = (headers: IncomingHttpHeaders): boolean => String(headers['content-type'] ?? '').startsWith('application/grpc');

/**
 * Upstream HTTP/2 sessions by a key the caller gives: the open one, or a new one over the
 * connection `dial` makes (while it opens, every stream waits for the same one). A session that
 * closes, goes away or stays idle for 4 s leaves the pool.
 */
class H2Pool {
  private readonly sessions = new Map<string, Promise<ClientHttp2Session>>();
  /** Streams started on each session (connectionPool.http.maxRequestsPerConnection). */
  private readonly streams = new WeakMap<ClientHttp2Session, number>();

  /**
   * `stream` was started on `session` (of `key`): with `max` (> 0) streams it leaves the pool (no
   * new stream on it) and closes once the last one ended, as an HTTP/1.1 connection closes after
   * its maxRequestsPerConnection-th answer.
   */
  started(key: string, session: ClientHttp2Session, max: number, stream: ClientHttp2Stream): void {
    if (max <= 0) return;
    const n = (this.streams.get(session) ?? 0) + 1;
    this.streams.set(session, n);
    if (n < max) return;
    void this.sessions.get(key)?.then(
      (s) => {
        if (s === session) this.sessions.delete(key);
      },
      () => undefined,
    );
    // Not at once: a session closed before its newest stream went out would refuse it.
    stream.once('close', () => session.close());
  }

  get(key: string, dial: () => Promise<Socket>, what: string): Promise<ClientHttp2Session> {
    const known = this.sessions.get(key);
    if (!known) return this.open(key, dial, what);
    return known.then(
      (s) => (s.closed || s.destroyed ? this.open(key, dial, what) : s),
      () => this.open(key, dial, what),
    );
  }

  private open(key: string, dial: () => Promise<Socket>, what: string): Promise<ClientHttp2Session> {
    const opening = dial().then((socket) => {
      const session = h2connect('http://upstream', { createConnection: () => socket, settings: { enablePush: false }, maxSessionMemory: 32 });
      session.on('error', (e: Error) => log.debug({ upstream: what, err: e.message }, 'upstream HTTP/2 session failed'));
      const forget = (): void => {
        if (this.sessions.get(key) === opening) this.sessions.delete(key);
      };
      session.once('close', forget);
      session.once('goaway', forget);
      // Idle sessions close (as pooled HTTP/1.1 connections do), before their server would.
      session.setTimeout(UPSTREAM_IDLE_MS, () => session.close());
      return session;
    });
    this.sessions.set(key, opening);
    opening.catch(() => {
      if (this.sessions.get(key) === opening) this.sessions.delete(key);
    });
    return opening;
  }

  close(): void {
    for (const opening of this.sessions.values()) void opening.then((s) => s.destroy(), () => undefined);
    this.sessions.clear();
  }
}

/**
 * An HTTP/2 server that is handed connections and knows, for each of its sessions, the facts the
 * node proxy gave with the connection (linked in the 'session' event, which emit('connection')
 * raises synchronously).
 */
class HandedH2Server<C extends object> {
  readonly server: Http2Server;
  private readonly facts = new WeakMap<ServerHttp2Session, C>();
  private handing: C | undefined;

  constructor(idleTimeoutMs: number, onStream: (stream: ServerHttp2Stream, headers: IncomingHttpHeaders, conn: C) => void, onSessionError: (e: NodeJS.ErrnoException) => void) {
    this.server = createServer({ settings: { maxConcurrentStreams: 256, maxHeaderListSize: 16 * 1024, enablePush: false }, maxSessionMemory: 32 });
    this.server.on('session', (session: ServerHttp2Session) => {
      if (this.handing) this.facts.set(session, this.handing);
      session.on('error', () => undefined);
      // Idle client connections end as the L4 path's do.
      session.setTimeout(idleTimeoutMs, () => session.close());
    });
    this.server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
      stream.on('error', () => undefined);
      const conn = this.facts.get(stream.session as ServerHttp2Session);
      if (conn) onStream(stream, headers, conn);
      else stream.close(constants.NGHTTP2_REFUSED_STREAM);
    });
    // A client that breaks the protocol (a bad frame, a SETTINGS flood): its session ends with
    // GOAWAY (nghttp2 and Node's limits decide), counted; nothing of it went upstream.
    this.server.on('sessionError', onSessionError);
  }

  /** Serves a client connection that speaks h2c (accepted paused) until it closes. */
  serve(client: Socket | Duplex, conn: C): Promise<void> {
    if (client instanceof Socket) client.setNoDelay(true);
    return new Promise((resolve) => {
      client.once('close', () => resolve());
      this.handing = conn;
      try {
        this.server.emit('connection', client);
      } finally {
        this.handing = undefined;
      }
      client.resume();
    });
  }
}

/**
 * Passes an upstream HTTP/2 answer to the client's stream: its headers (with `changes`), its body
 * with backpressure, its trailers; a trailers-only answer (a gRPC error) stays one. `ended` gets
 * the grpc-status once the answer is whole.
 */
function passAnswer(
  up: ClientHttp2Stream,
  stream: ServerHttp2Stream,
  headers: IncomingHttpHeaders,
  endStream: boolean,
  changes: ReadonlyArray<HeaderChanges>,
  events: { data(bytes: number): void; ended(grpcStatus: string): void },
): void {
  const out = fields(withChanges(pairsOf(headers), changes), { ':status': Number(headers[':status'] ?? 502) });
  if (endStream) {
    stream.respond(out, { endStream: true });
    events.ended(String(headers['grpc-status'] ?? ''));
    return;
  }
  let trailers: IncomingHttpHeaders | undefined;
  stream.respond(out, { waitForTrailers: true });
  stream.once('wantTrailers', () => stream.sendTrailers(trailers ? fields(pairsOf(trailers)) : {}));
  up.on('trailers', (t: IncomingHttpHeaders) => (trailers = t));
  up.on('data', (chunk: Buffer) => {
    events.data(chunk.length);
    if (!stream.write(chunk)) up.pause();
  });
  stream.on('drain', () => up.resume());
  up.once('end', () => {
    stream.end();
    events.ended(String(trailers?.['grpc-status'] ?? headers['grpc-status'] ?? ''));
  });
}

/** A request body kept for a retry (as the HTTP/1.1 paths keep it): at most this much. */
const REPLAY_LIMIT = 64 * 1024;

/**
 * The client's body, streamed to the attempt in flight with backpressure, and kept (up to
 * REPLAY_LIMIT) so that a retry sends it again. For gRPC each message's length prefix is read
 * first: a message over GRPC_MAX_MESSAGE stops the body (`tooLarge`) before the chunk that
 * announces it goes, so the backend never sees it.
 */
class H2Body {
  /** Every chunk so far while replayable. */
  private readonly kept: Buffer[] = [];
  private keptBytes = 0;
  private up: ClientHttp2Stream | undefined;
  private stopped = false;
  /** Nothing past the limit was dropped: an attempt can be given all of it. */
  replayable = true;
  /** The client ended its body. */
  ended = false;

  constructor(
    private readonly stream: ServerHttp2Stream,
    grpc: boolean,
    /** Keep it for a retry (else nothing is kept and no attempt can have it again). */
    keep: boolean,
    events: { data(bytes: number): void; tooLarge(length: number): void },
  ) {
    this.replayable = keep;
    let payloadLeft = 0;
    let prefix = Buffer.alloc(0);
    const fits = (chunk: Buffer): boolean => {
      for (let o = 0; o < chunk.length; ) {
        if (payloadLeft > 0) {
          const take = Math.min(payloadLeft, chunk.length - o);
          payloadLeft -= take;
          o += take;
          continue;
        }
        const take = Math.min(5 - prefix.length, chunk.length - o);
        prefix = Buffer.concat([prefix, chunk.subarray(o, o + take)]);
        o += take;
        if (prefix.length < 5) continue;
        const length = prefix.readUInt32BE(1);
        prefix = Buffer.alloc(0);
        if (length > GRPC_MAX_MESSAGE) {
          events.tooLarge(length);
          return false;
        }
        payloadLeft = length;
      }
      return true;
    };
    // No body (END_STREAM on the request's headers): nothing to send or keep.
    if (stream.endAfterHeaders) {
      this.ended = true;
      stream.resume();
      return;
    }
    // Paused until an attempt has its stream (a data listener earlier would drop what came before).
    stream.pause();
    stream.on('data', (chunk: Buffer) => {
      if (this.stopped) return;
      events.data(chunk.length);
      if (grpc && !fits(chunk)) {
        this.stopped = true;
        return;
      }
      if (this.replayable) {
        this.keptBytes += chunk.length;
        if (this.keptBytes <= REPLAY_LIMIT) this.kept.push(chunk);
        else {
          this.replayable = false;
          this.kept.length = 0;
        }
      }
      const up = this.up;
      if (up && !up.write(chunk)) {
        stream.pause();
        up.once('drain', () => stream.resume());
      }
    });
    stream.once('end', () => {
      this.ended = true;
      if (!this.stopped) this.up?.end();
    });
  }

  /** The request has no body: its upstream stream ends with its headers. */
  get none(): boolean {
    return this.stream.endAfterHeaders;
  }

  /** The attempt `up` gets the body: what was kept first (a retry), then the rest as it comes. False when it cannot be given all of it. */
  sendTo(up: ClientHttp2Stream, again: boolean): boolean {
    if (again && !this.replayable) return false;
    this.up = up;
    if (again) for (const chunk of this.kept) up.write(chunk);
    if (this.ended && !this.stopped) up.end();
    else this.stream.resume();
    return true;
  }

  /** The whole body as it came, when it ended and was kept (none: empty); undefined otherwise. */
  whole(): ReadonlyArray<Buffer> | undefined {
    return this.ended && this.replayable && !this.stopped ? this.kept : undefined;
  }

  /** The attempt in flight is given up: nothing more goes to it (the client waits, paused). */
  detach(): void {
    this.up = undefined;
    this.stream.pause();
  }
}

/** A gRPC message over the limit: answered RESOURCE_EXHAUSTED (a trailers-only answer), or the stream reset once an answer began. */
function refuseMessage(stream: ServerHttp2Stream, length: number): void {
  if (stream.headersSent || stream.destroyed || stream.closed) {
    stream.close(constants.NGHTTP2_CANCEL);
    return;
  }
  stream.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '8', 'grpc-message': `a message of ${length} bytes is over the limit of ${GRPC_MAX_MESSAGE}` }, { endStream: true });
}

/** A plain-text answer of the proxy on a stream (or a reset when its headers went already). */
function answerStream(stream: ServerHttp2Stream, status: number, detail: string, extra: OutgoingHttpHeaders = {}): number {
  if (stream.headersSent || stream.destroyed || stream.closed) {
    stream.close(constants.NGHTTP2_INTERNAL_ERROR);
    return 0;
  }
  const body = `${detail}\n`;
  stream.respond({ ':status': status, 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body), ...extra });
  stream.end(body);
  return Buffer.byteLength(body);
}

export class H2Outbound {
  private readonly front: HandedH2Server<HttpClientConnection>;
  /** Upstream sessions by source pod, backend Service and endpoint. */
  private readonly pool = new H2Pool();

  /** The addon's engine, for connections whose routes need nothing only node:http2 has. */
  private readonly native: NativeH2Outbound;

  constructor(
    readonly outbound: HttpOutbound,
    idleTimeoutMs: number,
    nativeHttp: boolean,
    /** This node's server side: a stream to a pod of this node that reads HTTP/2 is admitted here (one pass). */
    destinationSide: HttpInbound | undefined,
  ) {
    this.front = new HandedH2Server(idleTimeoutMs, (stream, headers, conn) => this.onStream(stream, headers, conn), (e) => this.outbound.metrics.httpRefused.inc({ reason: e.code ?? 'h2_error' }));
    this.native = new NativeH2Outbound(outbound, destinationSide, nativeHttp, idleTimeoutMs, (conn, target, endpoint, head, chunks, count) => this.copy(conn, target, endpoint, head, chunks, count));
  }

  /** Every stream goes to decide() again until its connection gets a new plan (HttpOutbound.routesChanged). */
  routesChanged(): void {
    this.native.host.undirect();
  }

  /** Streams to the backend Service `key` the engine routed itself that are in flight (the retry budget counts them). */
  routedInFlight(key: string): number {
    return this.native.host.inFlight(key);
  }

  /**
   * Serves a client connection that speaks h2c (accepted paused) until it closes: on the addon's
   * engine when the port's routes allow it, else on node:http2; `initial` holds bytes already read.
   */
  async serve(client: Socket, conn: HttpClientConnection, initial?: Buffer): Promise<ConnectionBytes> {
    const served = this.native.host.serve(client, conn, initial);
    if (typeof served !== 'string') return served;
    this.outbound.metrics.http2Engine.inc({ side: 'client', engine: 'node', why: served });
    await this.front.serve(initial ? withHead(client, initial, 'http2') : client, conn);
    return socketTotals(client, NO_BYTES);
  }

  /**
   * A mirror's copy (`head`; `chunks`, its body) on the mirror Service's pooled session to
   * `endpoint`; its answer read and dropped, `count` told whether it came.
   */
  copy(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint, head: CopyHead, chunks: ReadonlyArray<Buffer>, count: (result: string) => void): void {
    const out = fields(head.headers, { ':method': head.method, ':path': head.path, ':scheme': 'http', ':authority': head.authority });
    this.session(conn, target, endpoint).then(
      (session) => {
        const copy = session.request(out, { endStream: chunks.length === 0 });
        copy.on('error', () => undefined);
        let answered = false;
        copy.on('response', () => {
          answered = true;
          count('sent');
        });
        copy.on('data', () => undefined);
        copy.once('close', () => {
          if (!answered) count('failed');
        });
        if (chunks.length > 0) {
          for (const chunk of chunks) copy.write(chunk);
          copy.end();
        }
      },
      () => count('failed'),
    );
  }

  /** Upstream sessions opened for a source pod (it left) end once idle. */
  forgetPod(uid: string): void {
    this.native.host.dropPools(`${uid}|`);
  }

  close(): void {
    this.pool.close();
    this.native.host.close();
  }

  /** A stream was started on `session` to `endpoint` of `target`: counted against the backend's maxRequestsPerConnection. */
  started(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint, session: ClientHttp2Session, stream: ClientHttp2Stream): void {
    this.pool.started(upstreamPool(conn, target, endpoint), session, target.policy.maxRequestsPerConnection, stream);
  }

  private onStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, conn: HttpClientConnection): void {
    const started = performance.now();
    const head = headOf(headers);
    const requestId = String(headers['x-request-id'] ?? newRequestId());
    const d = this.outbound.decide(head, conn, requestId);
    const grpc = isGrpc(headers);
    const access: AccessFacts = { req: head, requestId, route: d.route, bytesIn: 0, bytesOut: 0, attempts: 0 };
    if (d.kind === 'forward') {
      new H2Exchange(this, stream, head, grpc, conn, d, started, requestId).start();
      return;
    }
    const [status, extra] = d.kind === 'answer' ? [d.answer.status, {}] : [d.status, { location: d.location }];
    const bytesOut = answerStream(stream, status, d.kind === 'answer' ? d.answer.detail : '', extra);
    drain(stream, (bytesIn) => this.outbound.count(conn, d.parent, undefined, status, d.kind === 'answer' ? d.answer.flag : '-', started, { ...access, bytesIn, bytesOut }, grpc ? '' : undefined));
  }

  /** The session to `endpoint` of `target` for the connection's source pod (a connect failure counts against the endpoint). */
  session(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint): Promise<ClientHttp2Session> {
    return this.pool.get(upstreamPool(conn, target, endpoint), () => this.outbound.connected(target, endpoint, () => conn.dial(target, endpoint)), target.key);
  }
}

/**
 * One stream from its headers to its end: faults, the backend's circuit breaker, an endpoint
 * (another one once if the connect fails), the upstream stream, and the answer back with its
 * trailers. A stream reset on either side resets the other.
 */
class H2Exchange {
  private finished = false;
  private bytesIn = 0;
  private bytesOut = 0;
  private attempt = 0;
  private inflight: ClientHttp2Stream | undefined;
  private requestTimer: NodeJS.Timeout | undefined;
  private delayTimer: NodeJS.Timeout | undefined;
  private leaveQueue: (() => void) | undefined;
  private flag = '-';
  private avoid: Endpoint | undefined;
  private readonly outbound: HttpOutbound;
  private readonly target: ServiceTarget;
  private body: H2Body | undefined;
  /** The endpoint of the attempt in flight (or the last one). */
  private endpoint: Endpoint | undefined;
  private retries = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private tryTimer: NodeJS.Timeout | undefined;
  /** The rule's mirrors drawn for this stream (their percentages): a copy to each when it ends. */
  private mirrors: ReadonlyArray<{ readonly target: ServiceTarget; readonly percent: number }> = [];

  constructor(
    private readonly h2: H2Outbound,
    private readonly stream: ServerHttp2Stream,
    private readonly head: RequestHead,
    private readonly grpc: boolean,
    private readonly conn: HttpClientConnection,
    private readonly d: Extract<Decision, { kind: 'forward' }>,
    private readonly started: number,
    private readonly requestId: string,
  ) {
    this.outbound = h2.outbound;
    this.target = d.target;
  }

  start(): void {
    this.outbound.track('active', this.target, 1);
    const requestMs = this.d.entry.timeouts?.requestMs;
    if (requestMs !== undefined) this.requestTimer = setTimeout(() => this.timedOut(requestMs), requestMs);
    // The client left (or reset the stream) first: Envoy's DC.
    this.stream.once('close', () => {
      if (this.finished) return;
      this.inflight?.close(constants.NGHTTP2_CANCEL);
      this.done(0, 'DC', undefined);
    });
    const fault = this.d.entry.fault ?? this.d.parent.policy.fault ?? this.target.policy.fault;
    const delayed = fault?.delay !== undefined && Math.random() * 100 < fault.delay.percent;
    const aborted = fault?.abort !== undefined && Math.random() * 100 < fault.abort.percent;
    if (delayed) this.flag = 'DI';
    this.mirrors = drawMirrors(this.d.entry);
    this.body = new H2Body(this.stream, this.grpc, this.d.entry.retry !== undefined || this.mirrors.length > 0, {
      data: (bytes) => (this.bytesIn += bytes),
      tooLarge: (length) => {
        this.inflight?.close(constants.NGHTTP2_CANCEL);
        refuseMessage(this.stream, length);
        this.done(200, 'DPE', this.endpoint, '8');
      },
    });
    const go = (): void => {
      if (aborted) this.answer(fault?.abort?.status ?? 503, 'FI', 'fault injected (TrafficPolicy fault.abort)', undefined);
      else this.send();
    };
    if (delayed) this.delayTimer = setTimeout(go, fault?.delay?.ms ?? 0);
    else go();
  }

  private send(): void {
    if (this.finished) return;
    const slot = this.outbound.admit(this.target, (leave) => void this.sendNow(leave));
    if ('status' in slot) {
      this.answer(slot.status, slot.flag, slot.detail, undefined);
      return;
    }
    this.leaveQueue = slot.leave;
    if (slot.now) void this.sendNow(slot.leave);
  }

  private async sendNow(leave: () => void): Promise<void> {
    this.leaveQueue = undefined;
    if (this.finished) {
      leave();
      return;
    }
    this.attempt++;
    const lb = this.outbound.lb;
    const endpoint = lb.pick(this.target, this.avoid, this.d.upstream.hashKey);
    if (!endpoint) {
      leave();
      this.answer(503, 'UH', `Service ${this.target.key} has no endpoints`, undefined);
      return;
    }
    this.endpoint = endpoint;
    const release = this.outbound.hold(this.target, endpoint, leave);
    let session: ClientHttp2Session;
    try {
      session = await this.h2.session(this.conn, this.target, endpoint);
    } catch (e) {
      release();
      if (e instanceof UpstreamDenied) this.answer(403, 'UAEX', e.message, endpoint);
      else if (this.mayRetry()) this.retry();
      // Nothing was sent yet: another endpoint once.
      else if (this.attempt < 2 && this.target.endpoints.length > 1 && !this.finished) {
        this.avoid = endpoint;
        this.send();
      } else this.answer(503, 'UF', (e as Error).message, endpoint);
      return;
    }
    if (this.finished) {
      release();
      return;
    }
    const out = fields(this.d.upstream.headers, { ':method': this.head.method ?? 'GET', ':path': this.d.upstream.path, ':scheme': 'http', ':authority': authorityOf(this.d.upstream.headers, this.target) });
    const body = this.body;
    if (!body) return;
    let up: ClientHttp2Stream;
    try {
      up = session.request(out, { endStream: body.none });
    } catch (e) {
      release();
      this.answer(503, 'UC', (e as Error).message, endpoint);
      return;
    }
    this.inflight = up;
    this.h2.started(this.conn, this.target, endpoint, session, up);
    up.on('error', () => undefined);
    let answered = false;
    // timeouts.backendRequest: this attempt, to its answer's headers.
    const tryMs = this.d.entry.timeouts?.backendRequestMs;
    if (tryMs !== undefined) {
      this.tryTimer = setTimeout(() => {
        if (answered || this.finished || this.inflight !== up) return;
        this.giveUp(up, release);
        if (this.mayRetry()) this.retry();
        else this.answer(504, 'UT', `no answer within ${tryMs} ms (timeouts.backendRequest)`, endpoint);
      }, tryMs);
    }
    up.on('response', (headers: IncomingHttpHeaders, flags: number) => {
      answered = true;
      clearTimeout(this.tryTimer);
      if (this.inflight !== up) return;
      // A route's retry on this code: the answer is dropped with its stream and the request goes again.
      const status = Number(headers[':status'] ?? 502);
      if (this.d.entry.retry?.codes.includes(status) && this.mayRetry()) {
        this.outbound.answered(this.target, endpoint, status);
        this.giveUp(up, release);
        this.retry();
        return;
      }
      this.answered(up, headers, (flags & END_STREAM) !== 0, endpoint, release);
    });
    up.once('close', () => {
      release();
      if (this.finished || this.inflight !== up) return;
      if (!answered) {
        clearTimeout(this.tryTimer);
        // Reset (or refused) before any answer: a route's retry sends it again.
        if (this.mayRetry()) {
          this.giveUp(up, release);
          this.retry();
          return;
        }
        this.answer(503, up.rstCode === constants.NGHTTP2_REFUSED_STREAM ? 'UF' : 'UC', `the upstream stream ended before an answer (code ${up.rstCode ?? 0})`, endpoint);
        return;
      }
      // Reset while its answer was being passed on: so is the client's.
      if (up.rstCode !== undefined && up.rstCode !== constants.NGHTTP2_NO_ERROR) {
        this.stream.close(up.rstCode);
        this.done(this.stream.sentHeaders?.[':status'] === undefined ? 502 : Number(this.stream.sentHeaders[':status']), 'UPE', endpoint);
      }
    });
    // The body flows only now: what a retry kept first.
    if (!body.none && !body.sendTo(up, this.attempt > 1)) {
      this.giveUp(up, release);
      this.answer(503, 'UF', 'the request body could not be sent again (over 64 KiB)', endpoint);
    }
  }

  /** The attempt in flight is dropped (a retry, a per-try timeout): its stream cancelled, its slot given back. */
  private giveUp(up: ClientHttp2Stream, release: () => void): void {
    if (this.inflight === up) this.inflight = undefined;
    this.body?.detach();
    up.close(constants.NGHTTP2_CANCEL);
    release();
  }

  /** Whether another attempt may go: the rule's retry has attempts left, the whole body is in hand and kept, within the budget. */
  private mayRetry(): boolean {
    const retry = this.d.entry.retry;
    const body = this.body;
    if (!retry || this.finished || this.retries >= retry.attempts || !body?.ended || !body.replayable || this.stream.headersSent) return false;
    return this.outbound.retryBudgetAllows(this.target);
  }

  /** The next attempt after the backoff (HttpOutbound.retryAfterBackoff). */
  private retry(): void {
    this.retries++;
    this.retryTimer = this.outbound.retryAfterBackoff(this.target, this.retries, this.d.entry.retry?.backoffMs ?? 0, () => {
      this.retryTimer = undefined;
      this.send();
    });
  }

  private answered(up: ClientHttp2Stream, headers: IncomingHttpHeaders, endStream: boolean, endpoint: Endpoint, release: () => void): void {
    const status = Number(headers[':status'] ?? 502);
    if (this.finished || this.stream.destroyed || this.stream.closed) {
      up.close(constants.NGHTTP2_CANCEL);
      release();
      return;
    }
    this.outbound.answered(this.target, endpoint, status);
    passAnswer(up, this.stream, headers, endStream, this.d.upstream.answerChanges, {
      data: (bytes) => (this.bytesOut += bytes),
      ended: (grpcStatus) => this.done(status, this.flag, endpoint, grpcStatus),
    });
  }

  /** timeouts.request ran out: 504 if nothing was answered yet, else the stream is cut. */
  private timedOut(ms: number): void {
    if (this.finished) return;
    this.inflight?.close(constants.NGHTTP2_CANCEL);
    if (this.stream.headersSent) {
      this.stream.close(constants.NGHTTP2_CANCEL);
      this.done(Number(this.stream.sentHeaders[':status'] ?? 0), 'UT', undefined);
      return;
    }
    this.answer(504, 'UT', `no answer within ${ms} ms (timeouts.request)`, undefined);
  }

  /** Answered by the proxy itself. */
  private answer(status: number, flag: string, detail: string, endpoint: Endpoint | undefined): void {
    if (this.finished) return;
    this.bytesOut += answerStream(this.stream, status, detail);
    this.done(status, flag, endpoint);
  }

  private done(status: number, flag: string, endpoint: Endpoint | undefined, grpcStatus = ''): void {
    if (this.finished) return;
    this.finished = true;
    clearTimeout(this.requestTimer);
    clearTimeout(this.delayTimer);
    clearTimeout(this.tryTimer);
    this.retryTimer = this.outbound.cancelRetry(this.target, this.retryTimer);
    this.leaveQueue?.();
    this.leaveQueue = undefined;
    this.outbound.track('active', this.target, -1);
    const facts: AccessFacts = { req: this.head, requestId: this.requestId, route: `${this.d.entry.route} rule ${this.d.entry.rule}`, bytesIn: this.bytesIn, bytesOut: this.bytesOut, attempts: this.attempt };
    this.outbound.count(this.conn, this.target, endpoint, status, flag, this.started, facts, this.grpc ? grpcStatus : undefined);
    if (this.mirrors.length > 0 && flag !== 'DC') this.mirror();
  }

  /**
   * RequestMirror: a copy of the stream that ended (its body as kept, up to 64 KiB) to an endpoint
   * of each mirror Service drawn for it, on that Service's pooled session, with "-shadow" after
   * its :authority as Envoy marks it; the answer is read and dropped, its result only counted.
   */
  private mirror(): void {
    const body = this.body?.whole();
    this.outbound.mirrorTo(this.mirrors, body !== undefined, (target, endpoint, count) => {
      const head: CopyHead = { method: this.head.method ?? 'GET', authority: `${authorityOf(this.d.upstream.headers, this.target)}-shadow`, path: this.d.upstream.path, headers: this.d.upstream.headers };
      this.h2.copy(this.conn, target, endpoint, head, body ?? [], count);
    });
  }
}

/**
 * The server side of an HTTP/2 port (the destination's node, see inbound.ts): each stream admitted
 * by HttpInbound (authorization with its method, :authority, path and headers; rate limits), then
 * sent to the application on an HTTP/2 session pooled per pod, port and caller, its answer and
 * trailers passed back; reported as reporter="destination" with its gRPC status.
 */
export class H2Inbound {
  private readonly front: HandedH2Server<HttpServerConnection>;
  private readonly pool = new H2Pool();

  private readonly native: NativeH2Inbound;

  constructor(
    private readonly inbound: HttpInbound,
    private readonly metrics: NodeMetrics,
    idleTimeoutMs: number,
    nativeHttp: boolean,
  ) {
    this.front = new HandedH2Server(idleTimeoutMs, (stream, headers, conn) => this.onStream(stream, headers, conn), (e) => metrics.httpRefused.inc({ reason: e.code ?? 'h2_error' }));
    this.native = new NativeH2Inbound(inbound, metrics, nativeHttp, idleTimeoutMs);
  }

  /** Serves a connection into a pod's h2c port until it closes: on the addon's engine, else on node:http2. */
  async serve(client: Socket, conn: HttpServerConnection, initial?: Buffer): Promise<ConnectionBytes> {
    const served = this.native.host.serve(client, conn, initial);
    if (typeof served !== 'string') return served;
    this.metrics.http2Engine.inc({ side: 'server', engine: 'node', why: served });
    await this.front.serve(initial ? withHead(client, initial, 'http2') : client, conn);
    return socketTotals(client, NO_BYTES);
  }

  /** A connection on the addon's engine with no socket: a channel the caller joins to an HBONE stream (H2Host.serveChannel). */
  serveChannel(conn: HttpServerConnection): ChannelServed | undefined {
    return this.native.host.serveChannel(conn);
  }

  /** The upstream sessions to a pod's application (it left) end once idle. */
  forgetPod(uid: string): void {
    this.native.host.dropPools(`${uid}|`);
  }

  /** The config changed: every stream is admitted by HttpInbound again until it hands the engine a gate again (H2Forwarding.gate). */
  configChanged(): void {
    this.native.host.undirect();
  }

  close(): void {
    this.pool.close();
    this.native.host.close();
  }

  private onStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders, conn: HttpServerConnection): void {
    const started = performance.now();
    const head = headOf(headers);
    const requestId = String(headers['x-request-id'] ?? newRequestId());
    const grpc = isGrpc(headers) ? '' : undefined;
    const access: AccessFacts = { req: head, requestId, route: '', bytesIn: 0, bytesOut: 0, attempts: 1 };
    const admitted = this.inbound.admit(head, conn);
    if ('status' in admitted) {
      this.inbound.refused(conn, admitted);
      const extra: OutgoingHttpHeaders = {};
      for (const [name, value] of pairs(admitted.headers ?? [])) extra[name] = value;
      const bytesOut = answerStream(stream, admitted.status, admitted.detail, extra);
      drain(stream, (bytesIn) => this.inbound.count(conn, admitted.status, admitted.flag, started, { ...access, bytesIn, bytesOut }, grpc));
      return;
    }
    let bytesIn = 0;
    let bytesOut = 0;
    let finished = false;
    let up: ClientHttp2Stream | undefined;
    const done = (status: number, flag: string, grpcStatus = grpc): void => {
      if (finished) return;
      finished = true;
      this.inbound.count(conn, status, flag, started, { ...access, bytesIn, bytesOut }, grpc === undefined ? undefined : grpcStatus);
    };
    stream.once('close', () => {
      up?.close(constants.NGHTTP2_CANCEL);
      done(0, 'DC');
    });
    this.pool.get(conn.poolKey, () => conn.dial(), `${conn.pod.namespace}/${conn.pod.name}`).then(
      (session) => {
        if (finished) return;
        const stream2 = session.request(fields(this.inbound.headersUp(head, requestId), { ':method': head.method ?? 'GET', ':path': admitted.target, ':scheme': 'http', ':authority': String(head.headers.host ?? '') }));
        up = stream2;
        stream2.on('error', () => undefined);
        let answered = false;
        stream2.on('response', (h: IncomingHttpHeaders, flags: number) => {
          answered = true;
          const status = Number(h[':status'] ?? 502);
          passAnswer(stream2, stream, h, (flags & END_STREAM) !== 0, [], { data: (n) => (bytesOut += n), ended: (g) => done(status, '-', g) });
        });
        stream2.once('close', () => {
          if (finished) return;
          if (!answered) {
            bytesOut += answerStream(stream, 503, `the application's stream ended before an answer (code ${stream2.rstCode ?? 0})`);
            done(503, 'UC');
          } else if (stream2.rstCode !== undefined && stream2.rstCode !== constants.NGHTTP2_NO_ERROR) {
            stream.close(stream2.rstCode);
            done(Number(stream.sentHeaders?.[':status'] ?? 502), 'UPE');
          }
        });
        const body = new H2Body(stream, grpc !== undefined, false, {
          data: (bytes) => (bytesIn += bytes),
          tooLarge: (length) => {
            stream2.close(constants.NGHTTP2_CANCEL);
            refuseMessage(stream, length);
            done(200, 'DPE', '8');
          },
        });
        body.sendTo(stream2, false);
      },
      (e: unknown) => {
        if (finished) return;
        bytesOut += answerStream(stream, 503, (e as Error).message);
        done(503, 'UF');
      },
    );
  }
}
