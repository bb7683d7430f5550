/**
 * The client side of L7 (issue 14): a captured connection to a Service port that speaks HTTP/1.1
 * and has routes is terminated here, and each request on it is routed on its own: the first route
 * entry whose match holds (Gateway API precedence, see config/snapshot.ts), a backend Service by
 * the rule's weights, an endpoint of it by the Service's load balancing. Requests go upstream
 * over keep-alive connections pooled per source pod and endpoint, opened by the node proxy like
 * any other (same-node delivery, an HBONE stream, or plain TCP), so one keep-alive client spreads
 * its requests as the weights say.
 *
 * node:http parses both sides for now: strict (no lenient flags), with its limits on header size;
 * bench/l7-parsers.ts and the README say why and what replaces it.
 */
import { randomUUID } from 'node:crypto';
import { Agent, createServer, request as httpRequest, type AgentOptions, type ClientRequest, type ClientRequestArgs, type IncomingMessage, type OutgoingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';

import type { Endpoint, HttpRouteEntry, ServiceTarget } from '../../config/snapshot.js';
import type { RouteMatch } from '../../config/route.js';
import { logger } from '../../shared/log.js';
import type { LoadBalancer } from '../pool/load-balancer.js';
import type { NodeMetrics, RequestLabels, TcpLabels } from '../metrics/metrics.js';

const log = logger('http');

/** Headers of one hop only (RFC 9110 section 7.6.1): never forwarded. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'transfer-encoding', 'upgrade']);
/** Idle upstream connections are closed after this: below the 5 s of node:http servers, so a pooled connection is rarely reused just as its server closes it. */
const UPSTREAM_IDLE_MS = 4000;
/** Idle upstream connections kept per source pod and endpoint. */
const MAX_IDLE_PER_ENDPOINT = 32;
const MAX_HEADER_BYTES = 16 * 1024;

/** The proxy refused the upstream connection itself (the destination's policy): answered 403. */
export class UpstreamDenied extends Error {}

/** What the node proxy tells the HTTP side about one client connection. */
export interface HttpClientConnection {
  /** The Service port the client dialled, with its routes. */
  readonly parent: ServiceTarget;
  /** The source pod, for logs. */
  readonly source: { readonly namespace: string; readonly name: string; readonly uid: string };
  /**
   * A new connection to `endpoint` of `target` from the source pod (same node, HBONE or plain):
   * a socket node:http can use. Rejects with UpstreamDenied when policy refuses it.
   */
  dial(target: ServiceTarget, endpoint: Endpoint): Promise<Socket>;
  /** The request metric labels (as for a TCP connection to that endpoint). */
  labels(target: ServiceTarget, endpoint: Endpoint | undefined): TcpLabels;
}

/** What node:http's Agent is given per request: which pool, and how to open a connection for it. */
interface UpstreamRequestOptions extends ClientRequestArgs {
  readonly poolKey: string;
  readonly open: () => Promise<Socket>;
}

/** Keep-alive connections pooled by source pod and endpoint; new ones opened by the node proxy. */
class UpstreamAgent extends Agent {
  constructor(options: AgentOptions) {
    super(options);
  }

  override getName(options?: ClientRequestArgs): string {
    return (options as UpstreamRequestOptions).poolKey;
  }

  /** node:http's Agent calls this to open a connection; the callback form lets it be asynchronous. */
  override createConnection(options: ClientRequestArgs, callback?: (err: Error | null, socket: Duplex) => void): undefined {
    (options as UpstreamRequestOptions).open().then(
      (socket) => callback?.(null, socket),
      (e: unknown) => callback?.(e as Error, undefined as unknown as Duplex),
    );
    return undefined;
  }
}

/** Why a request was answered by the proxy, Envoy's response flags (Istio's `response_flags`). */
type ProxyAnswer = { status: number; flag: string; detail: string };

interface ConnectionContext {
  readonly conn: HttpClientConnection;
}

/** A request as route matching sees it. */
interface RequestFacts {
  readonly method: string;
  readonly path: string;
  readonly query: string;
  readonly headers: IncomingMessage['headers'];
}

function headerValue(headers: IncomingMessage['headers'], name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v.join(',') : v;
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

/** The request target's path and query; an absolute-form target ("http://host/p?q") too. */
function splitTarget(url: string): { path: string; query: string } {
  let rest = url;
  if (!url.startsWith('/')) {
    const m = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i.exec(url);
    rest = m ? url.slice(m[0].length) || '/' : url;
  }
  const q = rest.indexOf('?');
  return q < 0 ? { path: rest, query: '' } : { path: rest.slice(0, q), query: rest.slice(q + 1) };
}

/** Raw header pairs minus hop-by-hop ones and those the Connection header names. */
function forwardable(raw: ReadonlyArray<string>, connection: string | undefined): string[] {
  const named = connection ? new Set(connection.toLowerCase().split(',').map((s) => s.trim())) : undefined;
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i] ?? '';
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || named?.has(lower)) continue;
    out.push(name, raw[i + 1] ?? '');
  }
  return out;
}

export class HttpOutbound {
  private readonly server: Server;
  private readonly agent = new UpstreamAgent({ keepAlive: true, maxFreeSockets: MAX_IDLE_PER_ENDPOINT, timeout: UPSTREAM_IDLE_MS, scheduling: 'lifo' });
  private readonly contexts = new WeakMap<Socket, ConnectionContext>();
  private logWindow = { start: 0, count: 0 };

  constructor(
    private readonly lb: LoadBalancer,
    private readonly metrics: NodeMetrics,
    options: { readonly idleTimeoutMs: number },
  ) {
    this.server = createServer(
      {
        maxHeaderSize: MAX_HEADER_BYTES,
        insecureHTTPParser: false,
        // A slow client may take its time with a body (uploads); its head must come in time.
        requestTimeout: 0,
        headersTimeout: 60_000,
        keepAliveTimeout: options.idleTimeoutMs,
      },
      (req, res) => this.onRequest(req, res),
    );
    // Idle client connections end as the L4 path's do (node:http's own header and request timers
    // run only for servers that listen, which this one never does: it is handed connections).
    this.server.setTimeout(options.idleTimeoutMs);
    // A request node:http cannot parse: 400 (431 for oversized headers) and the connection closed; it never goes upstream.
    this.server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
      const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
      this.metrics.httpRefused.inc({ reason: err.code ?? 'unknown' });
      if ((socket as Socket).writable && !(socket as Socket).destroyed) socket.end(`HTTP/1.1 ${status} ${status === 431 ? 'Request Header Fields Too Large' : status === 408 ? 'Request Timeout' : 'Bad Request'}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n`);
      else socket.destroy();
    });
    // Protocol upgrades (WebSocket) are not routed yet: refused rather than passed through unrouted.
    this.server.on('upgrade', (_req: IncomingMessage, socket: Duplex) => {
      this.metrics.httpRefused.inc({ reason: 'upgrade' });
      socket.end('HTTP/1.1 501 Not Implemented\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
    });
  }

  /** Serves the client connection (accepted paused, as the pods' listeners do) until it closes. */
  serve(client: Socket, conn: HttpClientConnection): Promise<void> {
    this.contexts.set(client, { conn });
    return new Promise((resolve) => {
      client.once('close', () => resolve());
      this.server.emit('connection', client);
      client.resume();
    });
  }

  /** Closes every pooled upstream connection. */
  close(): void {
    this.agent.destroy();
  }

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    const ctx = this.contexts.get(req.socket);
    if (!ctx) {
      res.destroy();
      return;
    }
    const started = performance.now();
    const { conn } = ctx;
    const routing = conn.parent.http;
    const { path, query } = splitTarget(req.url ?? '/');
    const facts: RequestFacts = { method: req.method ?? 'GET', path, query, headers: req.headers };
    const entry = routing ? routeRequest(routing.entries, facts) : undefined;
    if (!entry) {
      this.answer(res, conn, conn.parent, undefined, started, { status: 404, flag: 'NR', detail: 'no route matched the request' });
      req.resume();
      return;
    }
    const target = this.lb.pickWeighted(`${conn.parent.key}#${entry.route}#${entry.rule}`, entry.backends);
    if (!target) {
      this.answer(res, conn, conn.parent, undefined, started, { status: 500, flag: 'NR', detail: `${entry.route} rule ${entry.rule} has no backend that exists` });
      req.resume();
      return;
    }
    const headers = forwardable(req.rawHeaders, headerValue(req.headers, 'connection'));
    // node:http frames what it sends itself; a chunked body must stay chunked whatever the method.
    if (req.headers['transfer-encoding'] !== undefined) headers.push('transfer-encoding', 'chunked');
    if (req.headers['x-request-id'] === undefined) headers.push('x-request-id', randomUUID());
    this.forward(req, res, conn, target, headers, started, 1);
  }

  /**
   * Sends the request to an endpoint of `target`. A request without a body that fails on a reused
   * keep-alive connection before any answer (its server closed the idle connection just then) is
   * sent once more on a new one, as node:http's documentation advises.
   */
  private forward(req: IncomingMessage, res: ServerResponse, conn: HttpClientConnection, target: ServiceTarget, headers: string[], started: number, attempt: number): void {
    const endpoint = this.lb.pick(target);
    if (!endpoint) {
      this.answer(res, conn, target, undefined, started, { status: 503, flag: 'UH', detail: `Service ${target.key} has no endpoints` });
      req.resume();
      return;
    }
    this.lb.acquire(target, endpoint);
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      this.lb.release(target, endpoint);
    };
    const bodyless = req.headers['content-length'] === undefined && req.headers['transfer-encoding'] === undefined;
    const options: UpstreamRequestOptions = {
      agent: this.agent,
      method: req.method ?? 'GET',
      path: req.url ?? '/',
      // Raw pairs in the client's order and case; its Host header goes as it came.
      headers: headers as unknown as OutgoingHttpHeaders,
      setHost: false,
      poolKey: `${conn.source.uid}|${endpoint.workload.uid}|${endpoint.port}`,
      open: async () => {
        try {
          const socket = await conn.dial(target, endpoint);
          this.lb.connectSucceeded(endpoint);
          return socket;
        } catch (e) {
          if (!(e instanceof UpstreamDenied) && this.lb.connectFailed(target, endpoint)) {
            this.metrics.ejections.inc({ service: target.key });
            log.warn({ service: target.key, endpoint: `${endpoint.workload.namespace}/${endpoint.workload.name}`, port: endpoint.port }, 'endpoint ejected after consecutive connect errors');
          }
          throw e;
        }
      },
    };
    let answered = false;
    const up: ClientRequest = httpRequest(options, (answer) => {
      answered = true;
      const out = forwardable(answer.rawHeaders, headerValue(answer.headers, 'connection'));
      const status = answer.statusCode ?? 502;
      try {
        res.writeHead(status, answer.statusMessage, out as unknown as OutgoingHttpHeaders);
      } catch (e) {
        answer.destroy();
        this.answer(res, conn, target, endpoint, started, { status: 502, flag: 'UPE', detail: `the answer could not be passed on: ${(e as Error).message}` });
        release();
        return;
      }
      answer.on('data', (chunk: Buffer) => {
        if (!res.write(chunk)) answer.pause();
      });
      res.on('drain', () => answer.resume());
      answer.on('end', () => {
        if (answer.rawTrailers.length > 0) res.addTrailers(pairs(answer.rawTrailers));
        res.end();
        release();
        this.count(conn, target, endpoint, status, '-', started);
      });
      // Cut before its end (a reset, a framing error upstream): so is the client's answer.
      answer.on('close', () => {
        if (answer.complete) return;
        release();
        this.count(conn, target, endpoint, status, 'UPE', started);
        res.destroy();
      });
    });
    up.on('error', (e: NodeJS.ErrnoException) => {
      release();
      if (answered) {
        res.destroy();
        return;
      }
      // The client left first (Envoy's DC: downstream connection termination).
      if (res.destroyed || req.socket.destroyed) {
        this.count(conn, target, endpoint, 0, 'DC', started);
        return;
      }
      if (attempt === 1 && up.reusedSocket && bodyless && (e.code === 'ECONNRESET' || e.code === 'EPIPE')) {
        this.forward(req, res, conn, target, headers, started, attempt + 1);
        return;
      }
      const denied = e instanceof UpstreamDenied;
      this.answer(res, conn, target, endpoint, started, denied ? { status: 403, flag: 'UAEX', detail: e.message } : { status: 503, flag: up.reusedSocket ? 'UC' : 'UF', detail: e.message });
    });
    // The client went away: so does the request upstream.
    res.on('close', () => {
      if (!res.writableFinished) up.destroy();
    });
    if (!bodyless) {
      req.pipe(up);
      return;
    }
    up.end();
    if (attempt === 1) req.resume();
  }

  /** An answer of the proxy itself, counted and logged. */
  private answer(res: ServerResponse, conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint | undefined, started: number, a: ProxyAnswer): void {
    this.count(conn, target, endpoint, a.status, a.flag, started);
    // A client can cause these at will (a scanner's 404s): at most 10 lines a second; the metrics count all.
    const now = Date.now();
    if (now - this.logWindow.start >= 1000) this.logWindow = { start: now, count: 0 };
    if (++this.logWindow.count <= 10) log.info({ pod: conn.source.name, namespace: conn.source.namespace, service: target.key, status: a.status, responseFlags: a.flag, detail: a.detail }, 'request answered by the proxy');
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const body = `${a.detail}\n`;
    res.writeHead(a.status, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  private count(conn: HttpClientConnection, target: ServiceTarget, endpoint: Endpoint | undefined, status: number, flag: string, started: number): void {
    const labels: RequestLabels = { ...conn.labels(target, endpoint), request_protocol: 'http', response_flags: flag, response_code: String(status), grpc_response_status: '' };
    this.metrics.requests.inc(labels);
    this.metrics.requestDuration.observe(labels, performance.now() - started);
  }
}

/** [name, value, name, value] as [[name, value], ...]. */
function pairs(raw: ReadonlyArray<string>): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (let i = 0; i + 1 < raw.length; i += 2) out.push([raw[i] ?? '', raw[i + 1] ?? '']);
  return out;
}
