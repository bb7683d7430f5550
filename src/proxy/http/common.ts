/**
 * What both ends of L7 share: the client side (outbound.ts, on the source's node) and the server
 * side (inbound.ts, on the destination's): the strict node:http server that is handed connections,
 * keep-alive pools whose connections the node proxy opens, hop-by-hop header handling, joined
 * protocol upgrades, Istio's request metrics and the access log line.
 */
import { randomFillSync } from 'node:crypto';
import { Agent, STATUS_CODES, createServer, request as httpRequest, type AgentOptions, type ClientRequestArgs, type IncomingHttpHeaders, type IncomingMessage, type OutgoingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import { Socket } from 'node:net';
import { Duplex, PassThrough, type Readable } from 'node:stream';

import { logger } from '../../shared/log.js';
import type { NodeMetrics, TcpLabels } from '../metrics/metrics.js';

/** One line per request, where the mesh config asks for it (data.accessLog). */
const accessLog = logger('access');

/** Headers of one hop only (RFC 9110 section 7.6.1): never forwarded. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'te', 'transfer-encoding', 'upgrade']);
/** Idle upstream connections are closed after this: below the 5 s of node:http servers, so a pooled connection is rarely reused just as its server closes it. */
export const UPSTREAM_IDLE_MS = 4000;
/** Idle upstream connections kept per pool. */
const MAX_IDLE_PER_POOL = 32;
export const MAX_HEADER_BYTES = 16 * 1024;
/** A request head must come whole within this after its first byte (node:http's headersTimeout; the engine's too). */
export const HEADERS_TIMEOUT_MS = 60_000;

/** What node:http's Agent is given per request: which pool, and how to open a connection for it. */
export interface UpstreamRequestOptions extends ClientRequestArgs {
  readonly poolKey: string;
  readonly open: () => Promise<Socket>;
}

/** Keep-alive connections pooled by a key the caller gives (poolKey); new ones opened by the node proxy. */
export class UpstreamAgent extends Agent {
  constructor(options: AgentOptions = { keepAlive: true, maxFreeSockets: MAX_IDLE_PER_POOL, timeout: UPSTREAM_IDLE_MS, scheduling: 'lifo' }) {
    super(options);
  }

  override getName(options?: ClientRequestArgs): string {
    return (options as UpstreamRequestOptions).poolKey;
  }

  /** node:http's Agent calls this to open a connection; the callback form lets it be asynchronous. */
  override createConnection(options: ClientRequestArgs, callback?: ConnectionCallback): undefined {
    return connectLater((options as UpstreamRequestOptions).open(), callback);
  }
}

type ConnectionCallback = (err: Error | null, socket: Duplex) => void;

/** node:http's createConnection, callback form: the socket or the error once `opening` settles. */
function connectLater(opening: Promise<Socket>, callback: ConnectionCallback | undefined): undefined {
  opening.then(
    (socket) => callback?.(null, socket),
    (e: unknown) => callback?.(e as Error, undefined as unknown as Duplex),
  );
  return undefined;
}

/**
 * The HTTP/1.1 server both sides hand their connections to: strict parsing (no lenient flags),
 * bounded headers, idle connections ended as the L4 path's are, and a request it cannot parse
 * answered 400 (431 for oversized headers) and its connection closed: it never goes upstream.
 */
export function handedServer(
  metrics: NodeMetrics,
  idleTimeoutMs: number,
  onRequest: (req: IncomingMessage, res: ServerResponse) => void,
  onUpgrade: (req: IncomingMessage, client: Socket, head: Buffer) => void,
): Server {
  const server = createServer(
    {
      maxHeaderSize: MAX_HEADER_BYTES,
      insecureHTTPParser: false,
      // A slow client may take its time with a body (uploads); its head must come in time.
      requestTimeout: 0,
      headersTimeout: HEADERS_TIMEOUT_MS,
      keepAliveTimeout: idleTimeoutMs,
    },
    onRequest,
  );
  // node:http's own header and request timers run only for servers that listen, which this one
  // never does: it is handed connections.
  server.setTimeout(idleTimeoutMs);
  server.on('clientError', (err: NodeJS.ErrnoException, socket: Duplex) => {
    const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
    metrics.httpRefused.inc({ reason: err.code ?? 'unknown' });
    if ((socket as Socket).writable && !(socket as Socket).destroyed) socket.end(rawHead(status, ['connection', 'close', 'content-length', '0']));
    else socket.destroy();
  });
  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => onUpgrade(req, socket as Socket, head));
  return server;
}

/**
 * Hands an HTTP/1.1 client connection (accepted paused, as the pods' listeners do) to `server`,
 * its facts kept in `facts` where each request finds them (by req.socket); resolves when it closes.
 * Such a connection is always a socket (a sniffed one has its first bytes put back in it).
 */
export function serveHttp1<C>(server: Server, facts: WeakMap<Socket, C>, client: Socket | Duplex, conn: C): Promise<void> {
  if (!(client instanceof Socket)) throw new Error('an HTTP/1.1 connection is a socket');
  facts.set(client, conn);
  // Heads and bodies go in separate writes: with Nagle's algorithm each answer would wait for the
  // client's delayed ACK (tens of ms).
  client.setNoDelay(true);
  return new Promise((resolve) => {
    client.once('close', () => resolve());
    server.emit('connection', client);
    client.resume();
  });
}

/** An answer's head as bytes for a socket node:http no longer writes to (a refused request, an upgrade). */
export function rawHead(status: number, headers: ReadonlyArray<string>, message = STATUS_CODES[status] ?? ''): string {
  let text = `HTTP/1.1 ${status} ${message}\r\n`;
  for (let i = 0; i + 1 < headers.length; i += 2) text += `${headers[i] ?? ''}: ${headers[i + 1] ?? ''}\r\n`;
  return `${text}\r\n`;
}

/** `f` the first time only. */
export function once(f: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    f();
  };
}

export function headerValue(headers: IncomingHttpHeaders, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v.join(',') : v;
}

/** The request target's path and query; an absolute-form target ("http://host/p?q") too. */
export function splitTarget(url: string): { path: string; query: string } {
  let rest = url;
  if (!url.startsWith('/')) {
    const m = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*/i.exec(url);
    rest = m ? url.slice(m[0].length) || '/' : url;
  }
  const q = rest.indexOf('?');
  return q < 0 ? { path: rest, query: '' } : { path: rest.slice(0, q), query: rest.slice(q + 1) };
}

/** Raw header pairs minus hop-by-hop ones and those the Connection header names. */
export function forwardable(raw: ReadonlyArray<string>, connection: string | undefined): string[] {
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

/**
 * An upstream answer's fields as they go to the client of `req`: forwardable(), and no Trailer
 * field for an HTTP/1.0 client. Without chunked coding its trailers cannot be framed, so they are
 * dropped (node:http refuses to send a Trailer field it cannot honour).
 */
export function answerFields(req: IncomingMessage, answer: IncomingMessage): string[] {
  const out = forwardable(answer.rawHeaders, headerValue(answer.headers, 'connection'));
  if (req.httpVersion !== '1.0') return out;
  const kept: string[] = [];
  for (let i = 0; i + 1 < out.length; i += 2) if ((out[i] ?? '').toLowerCase() !== 'trailer') kept.push(out[i] ?? '', out[i + 1] ?? '');
  return kept;
}

/** [name, value, name, value] as [[name, value], ...]. */
export function pairs(raw: ReadonlyArray<string>): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (let i = 0; i + 1 < raw.length; i += 2) out.push([raw[i] ?? '', raw[i + 1] ?? '']);
  return out;
}

/** Reads a request's body to its end (or its connection's), dropping it; `then` gets how many bytes it had. */
export function drain(req: Readable, then: (bytes: number) => void): void {
  let bytes = 0;
  req.on('data', (chunk: Buffer) => (bytes += chunk.length));
  const end = once(() => then(bytes));
  req.once('end', end);
  req.once('close', end);
  req.resume();
}

/**
 * Streams an upstream answer's body and trailers into the client's response, with backpressure:
 * `data` per chunk, `ended` once it is whole; if it breaks off (a reset, a framing error upstream)
 * the client's answer is cut too and `cut` is told.
 */
export function pipeAnswer(answer: IncomingMessage, res: ServerResponse, events: { data(bytes: number): void; ended(): void; cut(): void }): void {
  answer.on('data', (chunk: Buffer) => {
    events.data(chunk.length);
    if (!res.write(chunk)) answer.pause();
  });
  res.on('drain', () => answer.resume());
  answer.on('end', () => {
    if (answer.rawTrailers.length > 0) res.addTrailers(pairs(answer.rawTrailers));
    res.end();
    events.ended();
  });
  answer.on('close', () => {
    if (answer.complete) return;
    events.cut();
    res.destroy();
  });
}

/** Random bytes for request ids, refilled 256 ids at a time (crypto.randomUUID's own scheme). */
const ID_RANDOM = Buffer.alloc(16 * 256);
let idRandomAt = ID_RANDOM.length;
/** An id's text, written in place; read out as one string. */
const ID_TEXT = Buffer.alloc(36);
const HEX_DIGITS = Buffer.from('0123456789abcdef', 'latin1');

/**
 * A random (version 4) UUID as crypto.randomUUID() makes it, as one flat string: randomUUID()
 * joins it of 20 pieces, which V8 keeps as a tree of strings until something flattens it, and
 * at this rate (one per request without an x-request-id) that tree was an eighth of what the
 * L7 path allocated per request.
 */
export function newRequestId(): string {
  if (idRandomAt === ID_RANDOM.length) {
    randomFillSync(ID_RANDOM);
    idRandomAt = 0;
  }
  let at = 0;
  for (let i = 0; i < 16; i++) {
    let byte = ID_RANDOM[idRandomAt + i] ?? 0;
    if (i === 6) byte = (byte & 0x0f) | 0x40;
    else if (i === 8) byte = (byte & 0x3f) | 0x80;
    if (i === 4 || i === 6 || i === 8 || i === 10) ID_TEXT[at++] = 0x2d;
    ID_TEXT[at++] = HEX_DIGITS[byte >> 4] ?? 0;
    ID_TEXT[at++] = HEX_DIGITS[byte & 0x0f] ?? 0;
  }
  idRandomAt += 16;
  return ID_TEXT.toString('latin1', 0, 36);
}

/** The request's id: its x-request-id, or a new one (then added to what goes upstream). */
export function requestIdOf(req: RequestHead): string {
  return headerValue(req.headers, 'x-request-id') ?? newRequestId();
}

/** Unreserved characters (RFC 3986 section 2.3): their percent-encodings mean the characters themselves. */
const UNRESERVED = /^[A-Za-z0-9\-._~]$/;

/**
 * A request path as RFC 3986 normalizes it (what Istio's default path normalization does before
 * authorization): percent-encoded unreserved characters decoded, other encodings upper-cased,
 * "." and ".." segments resolved. Undefined for what is no origin-form path (it does not start
 * with "/", or holds a bad percent-encoding). An encoded "/" stays encoded: it is not a separator.
 */
export function normalizePath(path: string): string | undefined {
  if (!path.startsWith('/')) return undefined;
  let decoded = '';
  for (let i = 0; i < path.length; i++) {
    const c = path[i];
    if (c !== '%') {
      decoded += c;
      continue;
    }
    const hex = path.slice(i + 1, i + 3);
    if (!/^[0-9A-Fa-f]{2}$/.test(hex)) return undefined;
    const ch = String.fromCharCode(parseInt(hex, 16));
    decoded += UNRESERVED.test(ch) ? ch : `%${hex.toUpperCase()}`;
    i += 2;
  }
  const out: string[] = [];
  const segments = decoded.split('/').slice(1);
  for (const [i, s] of segments.entries()) {
    const last = i === segments.length - 1;
    if (s === '.' || s === '..') {
      if (s === '..') out.pop();
      // "/a/." and "/a/.." end in a directory: "/a/" and "/".
      if (last) out.push('');
      continue;
    }
    out.push(s);
  }
  return `/${out.join('/')}`;
}

/**
 * A protocol upgrade (WebSocket) sent on a connection of its own (never pooled): a 101 answer
 * joins the two connections byte for byte until either ends; any other answer is passed on and the
 * connection closed. `answerHeaders` may change the answer's headers; `done` gets the status (503
 * when no connection could be opened, 403 when policy refused it) and the bytes each way.
 */
export function upgradeThrough(
  req: IncomingMessage,
  client: Socket,
  head: Buffer,
  upstream: { readonly path: string; readonly headers: ReadonlyArray<string>; readonly open: () => Promise<Socket> },
  answerHeaders: (raw: ReadonlyArray<string>) => string[],
  done: (status: number, flag: string, bytesIn: number, bytesOut: number, error?: Error) => void,
): void {
  // The upgrade's own headers go too (forwardable drops them as hop-by-hop).
  const headers = [...upstream.headers, 'connection', 'upgrade', 'upgrade', headerValue(req.headers, 'upgrade') ?? ''];
  // No agent, a connection of its own: node:http uses createConnection when no agent is given.
  const up = httpRequest({
    method: req.method ?? 'GET',
    path: upstream.path,
    headers: headers as unknown as OutgoingHttpHeaders,
    setHost: false,
    createConnection: (_options: ClientRequestArgs, callback: ConnectionCallback) => connectLater(upstream.open(), callback),
  } as ClientRequestArgs);
  up.on('upgrade', (answer: IncomingMessage, socket: Socket, upstreamHead: Buffer) => {
    client.write(rawHead(answer.statusCode ?? 101, answerHeaders(answer.rawHeaders), answer.statusMessage ?? 'Switching Protocols'));
    if (upstreamHead.length > 0) client.write(upstreamHead);
    if (head.length > 0) socket.write(head);
    let bytesIn = head.length;
    let bytesOut = upstreamHead.length;
    client.on('data', (b: Buffer) => (bytesIn += b.length));
    socket.on('data', (b: Buffer) => (bytesOut += b.length));
    client.pipe(socket);
    socket.pipe(client);
    const end = once(() => {
      client.destroy();
      socket.destroy();
      done(answer.statusCode ?? 101, '-', bytesIn, bytesOut);
    });
    for (const s of [client, socket]) {
      s.on('close', end);
      s.on('error', end);
    }
  });
  up.on('response', (answer: IncomingMessage) => {
    // Not upgraded: the answer, then the connection closes (its end frames the body).
    const out = answerHeaders(forwardable(answer.rawHeaders, headerValue(answer.headers, 'connection')));
    client.write(rawHead(answer.statusCode ?? 502, [...out, 'connection', 'close'], answer.statusMessage ?? ''));
    answer.pipe(client);
    answer.on('end', () => done(answer.statusCode ?? 502, '-', head.length, 0));
  });
  up.on('error', (e: Error) => {
    if (client.destroyed) return;
    const denied = e instanceof UpstreamDenied;
    client.end(rawHead(denied ? 403 : 503, ['content-length', '0', 'connection', 'close']));
    done(denied ? 403 : 503, denied ? 'UAEX' : 'UF', head.length, 0, e);
  });
  up.end();
}

/** The proxy refused the upstream connection itself (the destination's policy): answered 403. */
export class UpstreamDenied extends Error {}

/** What routing, metrics and logs read of a request, whichever protocol carried it (an IncomingMessage is one). */
export interface RequestHead {
  readonly method?: string | undefined;
  readonly url?: string | undefined;
  /** "1.1", or "2.0" for an HTTP/2 stream. */
  readonly httpVersion?: string;
  /** Lower-case names; Host is :authority for HTTP/2. */
  readonly headers: IncomingHttpHeaders;
  /** Name, value, name, value; no pseudo-headers. */
  readonly rawHeaders: ReadonlyArray<string>;
}

/**
 * Bytes a served connection's engine read from and wrote to its socket itself; node:net counts
 * what it read and wrote on the socket (`bytesRead`, `bytesWritten`), so the connection's totals
 * are the sum (socketTotals).
 */
export interface ConnectionBytes {
  readonly read: number;
  readonly written: number;
}

export const NO_BYTES: ConnectionBytes = Object.freeze({ read: 0, written: 0 });

/** A connection's totals: what node:net moved on `socket` and what an engine moved (`engine`). */
export function socketTotals(socket: Socket, engine: ConnectionBytes): ConnectionBytes {
  return { read: socket.bytesRead + engine.read, written: socket.bytesWritten + engine.written };
}

/** What an access log line says of a request beyond its answer. */
export interface AccessFacts {
  readonly req: RequestHead;
  readonly requestId: string;
  /** "HTTPRoute ns/name rule n", or '' when no rule took it (always '' on the destination's side). */
  readonly route: string;
  readonly bytesIn: number;
  readonly bytesOut: number;
  readonly attempts: number;
}

/** A request's facts once it ended: a literal of one shape rather than a spread (this runs for every request). */
export function withBytes(f: AccessFacts, bytesIn: number, bytesOut: number, attempts: number): AccessFacts {
  return { req: f.req, requestId: f.requestId, route: f.route, bytesIn, bytesOut, attempts };
}

/**
 * Istio's request metrics for one request under `tcp` (the connection's labels, its reporter
 * among them); a gRPC request (content-type application/grpc) as Istio reports it: protocol grpc,
 * with its grpc-status. Every request is counted here, the engines' unread and routed ones too.
 */
export function recordRequest(metrics: NodeMetrics, tcp: TcpLabels, status: number, flag: string, ms: number, bytesIn: number, bytesOut: number, grpcStatus: string | undefined): void {
  metrics.requests.record(tcp, { protocol: grpcStatus === undefined ? 'http' : 'grpc', flag, status, grpcStatus: grpcStatus ?? '' }, ms, bytesIn, bytesOut);
}

/**
 * Where every request JS read ends, on either side: its metrics (recordRequest) with the answer's
 * code and flags; and an access log line when `log` is set (the mesh config asks for it:
 * data.accessLog).
 */
export function countRequest(
  metrics: NodeMetrics,
  tcp: TcpLabels,
  status: number,
  flag: string,
  started: number,
  facts: AccessFacts,
  log: { readonly upstreamService: string; readonly upstreamHost: string; readonly sourcePod: string } | undefined,
  grpcStatus: string | undefined = undefined,
): void {
  const ms = performance.now() - started;
  recordRequest(metrics, tcp, status, flag, ms, facts.bytesIn, facts.bytesOut, grpcStatus);
  if (!log) return;
  const { req } = facts;
  // A stable field set (Envoy's names where it has one); `msg` is always "request".
  accessLog.info(
    {
      reporter: tcp.reporter,
      start_time: new Date(Date.now() - ms).toISOString(),
      method: req.method,
      path: req.url,
      protocol: `HTTP/${req.httpVersion ?? '1.1'}`,
      response_code: status,
      response_flags: flag,
      bytes_received: facts.bytesIn,
      bytes_sent: facts.bytesOut,
      duration_ms: Math.round(ms * 1000) / 1000,
      attempts: facts.attempts,
      request_id: facts.requestId,
      authority: req.headers.host ?? '',
      user_agent: req.headers['user-agent'] ?? '',
      trace_id: /^[0-9a-f]{2}-([0-9a-f]{32})-/.exec(headerValue(req.headers, 'traceparent') ?? '')?.[1] ?? headerValue(req.headers, 'x-b3-traceid') ?? '',
      route: facts.route,
      upstream_service: log.upstreamService,
      upstream_host: log.upstreamHost,
      source_pod: log.sourcePod,
      source_principal: tcp.source_principal,
      destination_principal: tcp.destination_principal,
      connection_security_policy: tcp.connection_security_policy,
    },
    'request',
  );
}

/** How long the proxy waits for a client's first bytes on a port that does not say its protocol (Istio's protocol detection timeout was 100 ms). */
export const SNIFF_DEADLINE_MS = 100;
const H2_PREFACE = Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1');
/** An HTTP/1.x request line (RFC 9112 section 3): a method token, a target, the version. */
const REQUEST_LINE = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP\/1\.[01]\r?\n/;

export type Sniffed = 'http1' | 'http2' | 'opaque';

/** What the first bytes of a connection say it speaks; 'more' while they could still be either HTTP. */
export function classify(head: Buffer, final: boolean): Sniffed | 'more' {
  const n = Math.min(head.length, H2_PREFACE.length);
  if (head.subarray(0, n).equals(H2_PREFACE.subarray(0, n))) return n === H2_PREFACE.length ? 'http2' : final ? 'opaque' : 'more';
  const text = head.subarray(0, 8192).toString('latin1');
  if (REQUEST_LINE.test(text)) return 'http1';
  // Still within a request line's first line, and nothing yet that no request line has.
  if (!final && !text.includes('\n') && head.length < 8192 && /^[!#$%&'*+.^_`|~0-9A-Za-z-]*( [^ \r\n]*( [HTP/1.]*\r?)?)?$/.test(text)) return 'more';
  return 'opaque';
}

/**
 * Protocol detection on a port that does not say what it speaks: the client's first bytes, read
 * until they say HTTP/1.1, HTTP/2 (the preface) or anything else, or until `deadlineMs` passes
 * with nothing conclusive (a server-first protocol sends nothing: opaque). The socket is left
 * paused; the bytes read are returned, for `withHead` to put back.
 */
export function sniff(socket: Socket, deadlineMs: number): Promise<{ readonly protocol: Sniffed; readonly head: Buffer }> {
  return new Promise((resolve) => {
    let head = Buffer.alloc(0);
    const finish = (final: boolean): void => {
      const verdict = classify(head, final);
      if (verdict === 'more') return;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('end', onEnd);
      socket.pause();
      resolve({ protocol: verdict, head });
    };
    const onData = (chunk: Buffer): void => {
      head = Buffer.concat([head, chunk]);
      finish(false);
    };
    const onEnd = (): void => finish(true);
    const timer = setTimeout(() => finish(true), deadlineMs);
    socket.on('data', onData);
    socket.once('end', onEnd);
    socket.resume();
  });
}

/**
 * The sniffed socket with its first bytes back in front: put back into the socket itself (node:http
 * and the relays read what is buffered), or, for HTTP/2, a stream that yields them first, since
 * node:http2 reads the socket's handle directly and would miss them.
 */
export function withHead(socket: Socket, head: Buffer, protocol: Sniffed): Socket | Duplex {
  if (protocol !== 'http2') {
    if (head.length > 0) socket.unshift(head);
    return socket;
  }
  const inbound = new PassThrough();
  inbound.write(head);
  socket.pipe(inbound);
  const joined = Duplex.from({ readable: inbound, writable: socket });
  socket.once('close', () => joined.destroy());
  joined.on('error', () => socket.destroy());
  return joined;
}
