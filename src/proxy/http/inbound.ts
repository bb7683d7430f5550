/**
 * The server side of L7 (issue 14): on the destination's node, a connection to a pod's port that
 * speaks HTTP and has request-level config there (an AuthorizationPolicy rule that names request
 * attributes, or a TrafficPolicy localRateLimit on the Service) is read request by request before
 * it reaches the application: each request is authorized with its method, host, path and headers
 * (Istio's semantics, proxy/policy.ts), counted against the Service's rate limits for that pod
 * (Linkerd's HTTPLocalRateLimitPolicy: a total bucket and one per client identity; 429 with
 * retry-after beyond), then sent to the application over keep-alive connections pooled per
 * destination pod, port and client address (delivered from the client's address, as the L4 path
 * does), and reported as `reporter="destination"`. The connections come from all three delivery
 * paths alike: plaintext inbound (15006), HBONE (15008) and the same-node fast path.
 */
import { request as httpRequest, type ClientRequest, type IncomingMessage, type OutgoingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import { Socket } from 'node:net';

import type { ServiceTarget, Workload } from '../../config/snapshot.js';
import { spiffeUri } from '../../identity/spiffe.js';
import { logger } from '../../shared/log.js';
import { RateLimiter } from '../../shared/rate-limit.js';
import type { NodeMetrics, TcpLabels } from '../metrics/metrics.js';
import type { ConnectionFacts, RequestFacts, RequestGate } from '../policy.js';
import { UpstreamAgent, answerFields, countRequest, drain, recordRequest, forwardable, handedServer, headerValue, normalizePath, pipeAnswer, rawHead, requestIdOf, serveHttp1, splitTarget, upgradeThrough, withHead, type AccessFacts, type ConnectionBytes, type RequestHead, type UpstreamRequestOptions } from './common.js';
import { H2Inbound } from './h2.js';
import type { ChannelServed } from './native-engine.js';
import { NativeInbound } from './native-inbound.js';

const log = logger('http');

/** What the node proxy tells the server side about one connection into a pod it serves. */
export interface HttpServerConnection {
  /** What the port speaks: HTTP/1.1, or h2c (HTTP/2, gRPC). */
  readonly protocol: 'http1' | 'http2';
  /** The destination pod. */
  readonly pod: Workload;
  /** Who calls and where to: what the policy engine decides on (each request adds its attributes). */
  readonly facts: ConnectionFacts;
  /** The connection's metric labels (reporter "destination"). */
  readonly labels: TcpLabels;
  /** The caller, for logs ("namespace/name", or its address when it is no known workload). */
  readonly source: string;
  /** The Service port the pod's port is reported under in the config now (its rate limits), if any. */
  target(): ServiceTarget | undefined;
  /** Whether the config now lets this request through (the node proxy counts and logs refusals). */
  authorize(request: RequestFacts): boolean;
  /** What of its requests the config now lets through unread (PolicyEngine.requestGate); undefined: none. */
  requestGate(): RequestGate | undefined;
  /** A new connection to the application, from the caller's address. */
  dial(): Promise<Socket>;
  /** The same, as an fd the caller owns. */
  dialFd(): Promise<number>;
  /** The upstream pool: one per destination pod, port and caller address. */
  readonly poolKey: string;
}

/** Why a request was answered here instead of by the application. */
export type Refusal = { readonly status: number; readonly flag: string; readonly detail: string; readonly headers?: ReadonlyArray<string> };

/** The seconds a 429's retry-after says: until the bucket that refused holds a token, at least 1. */
const retryAfter = (ms: number): string => String(Math.max(1, Math.ceil(ms / 1000)));

export class HttpInbound {
  private readonly server: Server;
  private readonly agent = new UpstreamAgent();
  private readonly connections = new WeakMap<Socket, HttpServerConnection>();
  /** Token buckets per Service (a new rate starts a new limiter); keyed inside by pod, and by pod and identity. */
  private readonly limiters = new Map<string, { readonly rate: number; readonly limiter: RateLimiter }>();
  private logWindow = { start: 0, count: 0 };
  private readonly h2: H2Inbound;

  private readonly native: NativeInbound;

  constructor(
    readonly metrics: NodeMetrics,
    private readonly options: {
      readonly idleTimeoutMs: number;
      readonly accessLog: (namespace: string) => boolean;
      /** HTTP/1.1 on the addon's engine (NativeInbound). */
      readonly nativeHttp?: boolean;
    },
  ) {
    this.h2 = new H2Inbound(this, metrics, options.idleTimeoutMs, options.nativeHttp === true);
    this.native = new NativeInbound(this, metrics, options.nativeHttp === true, options.idleTimeoutMs, (client, conn, unread) => this.serveNodeHttp(client, conn, unread));
    this.server = handedServer(
      metrics,
      options.idleTimeoutMs,
      (req, res) => this.onRequest(req, res),
      (req, client, head) => this.onUpgrade(req, client, head),
    );
  }

  /** Serves one connection into a pod until it closes; a sniffed one comes with the bytes read to sniff it. */
  serve(client: Socket, conn: HttpServerConnection, sniffedHead?: Buffer): Promise<ConnectionBytes> {
    if (conn.protocol === 'http2') return this.h2.serve(client, conn, sniffedHead);
    return this.native.host.serve(client, conn, sniffedHead);
  }

  /**
   * A connection on the addon's engine (HTTP/1.1 or HTTP/2, as `conn` says) with no socket: a
   * channel the caller joins to an HBONE stream (Http1Host and H2Host.serveChannel). Undefined
   * when the engine is not there.
   */
  serveChannel(conn: HttpServerConnection, socketFor: (fd: number) => Socket): ChannelServed | undefined {
    if (conn.protocol === 'http2') return this.h2.serveChannel(conn);
    return this.native.host.serveChannel(conn, socketFor);
  }

  /** node:http serves the connection, its unread bytes put back first. */
  private serveNodeHttp(client: Socket, conn: HttpServerConnection, unread: Buffer): Promise<void> {
    return serveHttp1(this.server, this.connections, withHead(client, unread, 'http1'), conn);
  }

  /**
   * Which requests on `conn` would go on as they came in the config now (unless a path needs
   * normalizing): those its policies' gate passes, when no local rate limit and no access log
   * line asks for each request. The engines (HTTP/1.1 and HTTP/2) then pass those on themselves
   * (Forwarding.gate, H2Forwarding.gate) until configChanged(); undefined: every request is admitted here.
   */
  unreadGate(conn: HttpServerConnection): RequestGate | undefined {
    if (conn.target()?.policy.rateLimit !== undefined || this.options.accessLog(conn.pod.namespace)) return undefined;
    return conn.requestGate();
  }

  /** The config changed: what unreadGate() said holds no more. */
  configChanged(): void {
    this.h2.configChanged();
    this.native.host.undirect();
  }

  /** Closes the idle pooled connections to a pod's application (it left). */
  forgetPod(uid: string): void {
    this.native.host.dropPools(`${uid}|`);
    this.h2.forgetPod(uid);
  }

  /** Closes every pooled connection to applications. */
  close(): void {
    this.agent.destroy();
    this.h2.close();
    this.native.host.close();
  }

  /**
   * Whether a request goes on, and where: its normalized target, or why it is answered here
   * (a path that is no path: 400; policy: 403, Istio's "RBAC: access denied"; a rate limit: 429).
   */
  admit(req: RequestHead, conn: HttpServerConnection): { readonly target: string } | Refusal {
    const { path: raw, query } = splitTarget(req.url ?? '/');
    const path = normalizePath(raw);
    if (path === undefined) return { status: 400, flag: '-', detail: `the request target "${(req.url ?? '').slice(0, 100)}" is no path` };
    const request: RequestFacts = { method: req.method ?? 'GET', host: headerValue(req.headers, 'host') ?? '', path, header: (name) => headerValue(req.headers, name) };
    if (!conn.authorize(request)) return { status: 403, flag: '-', detail: 'RBAC: access denied' };
    const wait = this.rateLimited(conn);
    if (wait > 0) return { status: 429, flag: 'RL', detail: 'local rate limit reached', headers: ['retry-after', retryAfter(wait)] };
    return { target: query === '' ? path : `${path}?${query}` };
  }

  /**
   * 0 when the request may go; otherwise the milliseconds until the bucket that refused it holds
   * a token. The client's own bucket first (its identity's, plaintext callers share one), then the
   * pod's total: a client over its share does not spend the others'.
   */
  private rateLimited(conn: HttpServerConnection): number {
    const t = conn.target();
    const limit = t?.policy.rateLimit;
    if (!t || !limit) return 0;
    if (limit.identity !== undefined) {
      const who = conn.facts.peer ? spiffeUri(conn.facts.peer) : 'unauthenticated';
      const wait = this.limiter(`identity|${t.key}`, limit.identity).wait(`${conn.pod.uid}|${who}`);
      if (wait > 0) return wait;
    }
    return limit.total === undefined ? 0 : this.limiter(`total|${t.key}`, limit.total).wait(conn.pod.uid);
  }

  private limiter(key: string, rate: number): RateLimiter {
    const known = this.limiters.get(key);
    if (known && known.rate === rate) return known.limiter;
    // Linkerd's burst: one second's worth.
    const limiter = new RateLimiter(rate, rate);
    this.limiters.set(key, { rate, limiter });
    return limiter;
  }

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    const conn = this.connections.get(req.socket);
    if (!conn) {
      res.destroy();
      return;
    }
    const started = performance.now();
    const requestId = requestIdOf(req);
    const access = { req, requestId, route: '', bytesIn: 0, bytesOut: 0, attempts: 0 };
    const admitted = this.admit(req, conn);
    if ('status' in admitted) {
      this.refused(conn, admitted);
      const body = `${admitted.detail}\n`;
      res.writeHead(admitted.status, [...(admitted.headers ?? []), 'content-type', 'text/plain', 'content-length', String(Buffer.byteLength(body))] as unknown as OutgoingHttpHeaders);
      res.end(body);
      drain(req, (bytesIn) => this.count(conn, admitted.status, admitted.flag, started, { ...access, bytesIn, bytesOut: Buffer.byteLength(body) }));
      return;
    }
    new Delivery(this, req, res, conn, admitted.target, requestId, started).start();
  }

  /** A protocol upgrade (WebSocket): admitted as any request, then joined to a connection of its own to the application. */
  private onUpgrade(req: IncomingMessage, client: Socket, head: Buffer): void {
    const conn = this.connections.get(req.socket);
    if (!conn) {
      client.destroy();
      return;
    }
    const started = performance.now();
    const requestId = requestIdOf(req);
    const access: AccessFacts = { req, requestId, route: '', bytesIn: 0, bytesOut: 0, attempts: 1 };
    const admitted = this.admit(req, conn);
    if ('status' in admitted) {
      this.refused(conn, admitted);
      client.end(rawHead(admitted.status, [...(admitted.headers ?? []), 'content-length', '0', 'connection', 'close']));
      this.count(conn, admitted.status, admitted.flag, started, access);
      return;
    }
    upgradeThrough(
      req,
      client,
      head,
      { path: admitted.target, headers: this.headersUp(req, requestId), open: () => conn.dial() },
      (raw) => [...raw],
      (status, flag, bytesIn, bytesOut) => this.count(conn, status, flag, started, { ...access, bytesIn, bytesOut }),
    );
  }

  /** The request's headers as they go to the application: hop-by-hop ones out, its framing kept, an x-request-id if it had none. */
  headersUp(req: RequestHead, requestId: string): string[] {
    const headers = forwardable(req.rawHeaders, headerValue(req.headers, 'connection'));
    if (req.headers['transfer-encoding'] !== undefined) headers.push('transfer-encoding', 'chunked');
    if (req.headers['x-request-id'] === undefined) headers.push('x-request-id', requestId);
    return headers;
  }

  /** How a request goes to the application: its pool, and a new connection from the node proxy when the pool has none. */
  upstreamOptions(req: IncomingMessage, conn: HttpServerConnection, target: string, headers: string[]): UpstreamRequestOptions {
    return { agent: this.agent, method: req.method ?? 'GET', path: target, headers: headers as unknown as OutgoingHttpHeaders, setHost: false, poolKey: conn.poolKey, open: () => conn.dial() };
  }

  /** A refusal, logged (at most 10 lines a second: a client can cause them at will; the metrics count all). */
  refused(conn: HttpServerConnection, r: Refusal): void {
    if (r.status === 403) return; // the node proxy logged and counted the policy's decision
    const now = Date.now();
    if (now - this.logWindow.start >= 1000) this.logWindow = { start: now, count: 0 };
    if (++this.logWindow.count <= 10) log.info({ pod: conn.pod.name, namespace: conn.pod.namespace, source: conn.source, status: r.status, responseFlags: r.flag, detail: r.detail }, 'request answered by the destination\'s proxy');
  }

  /** A request the engine passed on unread (unreadGate), counted: no access log line (there is no gate when one is asked for). */
  counted(conn: HttpServerConnection, status: number, flag: string, ms: number, bytesIn: number, bytesOut: number, grpcStatus: string | undefined): void {
    this.metrics.httpUnread.inc();
    recordRequest(this.metrics, conn.labels, status, flag, ms, bytesIn, bytesOut, grpcStatus);
  }

  count(conn: HttpServerConnection, status: number, flag: string, started: number, facts: AccessFacts, grpcStatus?: string): void {
    const logIt = this.options.accessLog(conn.pod.namespace) ? { upstreamService: conn.target()?.key ?? '', upstreamHost: `${conn.pod.namespace}/${conn.pod.name}:${conn.facts.destinationPort}`, sourcePod: conn.source } : undefined;
    countRequest(this.metrics, conn.labels, status, flag, started, facts, logIt, grpcStatus);
  }
}

/**
 * One admitted request to the application and its answer back. A request without a body that
 * fails on a reused idle connection before any answer (the application closed it just then) is
 * sent again once; nothing else is retried on this side (retries are the caller's node's).
 */
class Delivery {
  private finished = false;
  private bytesIn = 0;
  private bytesOut = 0;
  private attempt = 0;
  private readonly headers: string[];
  private readonly bodyless: boolean;

  constructor(
    private readonly inbound: HttpInbound,
    private readonly req: IncomingMessage,
    private readonly res: ServerResponse,
    private readonly conn: HttpServerConnection,
    private readonly target: string,
    private readonly requestId: string,
    private readonly started: number,
  ) {
    this.headers = inbound.headersUp(req, requestId);
    this.bodyless = req.headers['content-length'] === undefined && req.headers['transfer-encoding'] === undefined;
  }

  start(): void {
    this.res.on('close', () => this.done(0, 'DC'));
    if (this.bodyless) this.req.resume();
    this.send();
  }

  private send(): void {
    this.attempt++;
    let answered = false;
    const up: ClientRequest = httpRequest(this.inbound.upstreamOptions(this.req, this.conn, this.target, this.headers), (answer) => {
      answered = true;
      this.answered(up, answer);
    });
    this.res.once('close', () => {
      if (!this.res.writableFinished) up.destroy();
    });
    up.on('error', (e: NodeJS.ErrnoException) => {
      if (this.finished) return;
      if (answered) {
        this.done(this.res.statusCode, 'UPE');
        this.res.destroy();
        return;
      }
      if (up.reusedSocket && this.bodyless && this.attempt === 1) {
        this.send();
        return;
      }
      const reset = up.reusedSocket || (e.code === 'ECONNRESET' && up.socket !== null);
      this.answer(503, reset ? 'UC' : 'UF', e.message);
    });
    if (this.bodyless) {
      up.end();
      return;
    }
    this.req.on('data', (chunk: Buffer) => {
      this.bytesIn += chunk.length;
      if (!up.write(chunk)) {
        this.req.pause();
        up.once('drain', () => this.req.resume());
      }
    });
    this.req.on('end', () => up.end());
  }

  private answered(up: ClientRequest, answer: IncomingMessage): void {
    const status = answer.statusCode ?? 502;
    try {
      this.res.writeHead(status, answer.statusMessage, answerFields(this.req, answer) as unknown as OutgoingHttpHeaders);
    } catch (e) {
      answer.destroy();
      this.answer(502, 'UPE', `the answer could not be passed on: ${(e as Error).message}`);
      return;
    }
    pipeAnswer(answer, this.res, {
      data: (bytes) => (this.bytesOut += bytes),
      ended: () => this.done(status, '-'),
      cut: () => {
        up.destroy();
        this.done(status, 'UPE');
      },
    });
  }

  /** Answered here: the application could not be reached. */
  private answer(status: number, flag: string, detail: string): void {
    if (this.finished) return;
    if (this.res.headersSent) {
      this.done(this.res.statusCode, flag);
      this.res.destroy();
      return;
    }
    const body = `${detail}\n`;
    this.res.writeHead(status, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
    this.res.end(body);
    this.done(status, flag);
  }

  private done(status: number, flag: string): void {
    if (this.finished) return;
    this.finished = true;
    this.inbound.count(this.conn, status, flag, this.started, { req: this.req, requestId: this.requestId, route: '', bytesIn: this.bytesIn, bytesOut: this.bytesOut, attempts: this.attempt });
  }
}
