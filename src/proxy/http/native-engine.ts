/**
 * HTTP/1.1 connections served on the addon's engine (native/src/http1.cc), for either side of L7:
 * the engine frames requests and answers in C++ on this thread's loop and asks a handler once per
 * request (the client side routes it, the server side authorizes it). A request the engine cannot
 * carry hands its connection back to node:http, from that request on.
 *
 * The engine reads and writes a duplicate of the client socket's fd; node:net keeps the original,
 * paused, so the pod's bookkeeping (its open connections, its sockets closed when it leaves) stays
 * as for any connection, and a connection handed back is the same socket.
 */
import type { IncomingHttpHeaders } from 'node:http';
import type { Socket } from 'node:net';

import { channelNew, closeFd, dropUpstream, dupFd, http1Engine, type ChannelRef, type EngineGate, type EngineRoutes, type EngineUpstream, type Http1Engine } from '../../datapath/native.js';
import { logger } from '../../shared/log.js';
import type { NodeMetrics } from '../metrics/metrics.js';
import { socketFd } from '../pod-listener.js';
import { HEADERS_TIMEOUT_MS, MAX_HEADER_BYTES, NO_BYTES, UPSTREAM_IDLE_MS, rawHead, socketTotals, type ConnectionBytes, type RequestHead } from './common.js';

const log = logger('http');

/** Idle upstream connections kept per pool. */
const MAX_IDLE_PER_POOL = 64;

/** One connection on the engine, with what its handler keeps of the request in flight. */
export interface Served<C, R> {
  readonly id: number;
  readonly conn: C;
  request: R | undefined;
}

/** How a request goes upstream (Http1Host.forward). */
export interface Forwarding {
  /** The pool: its idle connections are used first, a new one joins it. */
  readonly pool: string;
  /** The request line and headers, CRLFCRLF included. */
  readonly head: string;
  /** A new connection: its fd (the caller's), or a channel to an HBONE stream. */
  dial(): Promise<EngineUpstream>;
  failed(e: Error): void;
  /** Lower-case names removed from the answer's head, then these "name: value\r\n" lines added. */
  readonly answerRemove?: ReadonlyArray<string>;
  readonly answerAdd?: string;
  /** A connection closes after this many answers (0: no limit). */
  readonly maxRequests?: number;
  /** A route's retry: the codes it retries on (the handler's retry() is asked on those and on resets). */
  readonly retryOn?: ReadonlyArray<number>;
  /** The connection's later requests this gate passes go the same way without asking the handler, reported in its delivered() (Http1Engine.forward). */
  readonly gate?: EngineGate;
  /** Keep the request's body as it is sent (up to 64 KiB), for keptBody() (a mirror's copy). */
  readonly keep?: boolean;
}

/** What a side does with each request on the engine. */
export interface Http1Handler<C, R> {
  /** A request's head: answer it through the host (forward or respond), now or later. */
  head(s: Served<C, R>, req: RequestHead): void;
  /**
   * The attempt in flight got an answer with a code of its `retryOn` (or a reset before any
   * answer: status 0): true to send it again (later, through forward), false to let the answer
   * (or the engine's 503) stand, undefined when no retry rule applies.
   */
  retry?(s: Served<C, R>, status: number): boolean | undefined;
  /** The engine ended the request: its answer passed on (or cut), or the engine's own answer (flags DPE, UC, UPE). */
  done(s: Served<C, R>, status: number, flag: string, bytesIn: number, bytesOut: number, detail: string): void;
  /** The client left with the request in flight. */
  left(s: Served<C, R>): void;
  /** A request the engine sent on by itself (Forwarding.gate, or routed: Http1Host.route) ended (see Http1Events.delivered). */
  delivered?(s: Served<C, R>, status: number, flag: string, bytesIn: number, bytesOut: number, ms: number, routes: EngineRoutes | undefined, target: number | undefined, endpoint: number | undefined): void;
  /** A connection for a request the engine routed (Http1Events.dial): undefined when there is none to make (the request becomes a head()). */
  dialRouted?(s: Served<C, R>, routes: EngineRoutes, target: number, endpoint: number): Promise<EngineUpstream> | undefined;
}

/** Raw header pairs as node:http's IncomingMessage.headers has them: lower-case names, repeats joined (set-cookie kept as a list). */
export function headerObject(raw: ReadonlyArray<string>): IncomingHttpHeaders {
  const out: Record<string, string | string[]> = {};
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = (raw[i] ?? '').toLowerCase();
    const value = raw[i + 1] ?? '';
    const had = out[name];
    if (had === undefined) out[name] = name === 'set-cookie' ? [value] : value;
    else if (Array.isArray(had)) had.push(value);
    else out[name] = name === 'cookie' ? `${had}; ${value}` : `${had}, ${value}`;
  }
  return out;
}

/**
 * The fields that ask the upstream for the request's upgrade (WebSocket's mechanism), which
 * forwardable() drops as hop-by-hop: none for a request that asks for none.
 */
export function upgradeFields(req: RequestHead): ReadonlyArray<string> {
  const protocol = req.headers['upgrade'];
  return protocol === undefined ? NO_FIELDS : ['connection', 'upgrade', 'upgrade', String(protocol)];
}
export const NO_FIELDS: ReadonlyArray<string> = Object.freeze([]);

/**
 * A request head line and headers, as the engine sends them upstream: its pieces joined once,
 * into one flat string (adding them one by one made a tree of a string per piece, which the
 * engine's read of it then copied flat again).
 */
export function requestHead(method: string, target: string, headers: ReadonlyArray<string>, extra: ReadonlyArray<string> = NO_FIELDS): string {
  const parts: string[] = [method, ' ', target, ' HTTP/1.1\r\n'];
  for (let i = 0; i + 1 < headers.length; i += 2) parts.push(headers[i] ?? '', ': ', headers[i + 1] ?? '', '\r\n');
  for (let i = 0; i + 1 < extra.length; i += 2) parts.push(extra[i] ?? '', ': ', extra[i + 1] ?? '', '\r\n');
  parts.push('\r\n');
  return parts.join('');
}

/** The proxy's own answer: a whole message with a text body and any extra headers. */
export function proxyAnswer(status: number, detail: string, headers: ReadonlyArray<string> = []): Buffer {
  const body = `${detail}\n`;
  return Buffer.from(rawHead(status, [...headers, 'content-type', 'text/plain', 'content-length', String(Buffer.byteLength(body))]) + body);
}

/**
 * Stops node:net reading `client` and takes what it read and holds (a sniffed connection, or a
 * socket pair's end node:net started reading): from now on only the engine reads its fd. Its
 * _read is made a no-op so that nothing (not even taking the buffer) starts reading again;
 * resumeReading() gives it back to node:net.
 */
function stopReading(client: Socket): Buffer | undefined {
  const socket = client as unknown as { _handle?: { reading?: boolean; readStop?: () => number }; _read: (size: number) => void };
  socket._read = () => undefined;
  if (socket._handle?.reading) {
    socket._handle.reading = false;
    socket._handle.readStop?.();
  }
  if (client.readableLength === 0) return undefined;
  return (client.read() as Buffer | null) ?? undefined;
}

/**
 * An engine's own copy of an accepted client socket: a duplicate of its fd (node:net keeps the
 * original, its reading stopped) and what to feed the engine first (`initial`, then what
 * node:net had read and held). 'no_fd' when there is none: not a socket, or no fd left (EMFILE).
 */
export function engineCopy(client: Socket, initial: Buffer | undefined): { readonly fd: number; readonly initial: Buffer | undefined } | 'no_fd' {
  const fd = socketFd(client);
  if (fd === undefined) return 'no_fd';
  let own: number;
  try {
    own = dupFd(fd);
  } catch {
    return 'no_fd';
  }
  client.setNoDelay(true);
  const held = stopReading(client);
  return { fd: own, initial: held ? (initial ? Buffer.concat([initial, held]) : held) : initial };
}

function resumeReading(client: Socket): void {
  delete (client as unknown as { _read?: unknown })._read;
}

/** A connection the engine serves on a channel (Http1Host.serveChannel). */
export interface ChannelServed {
  /** Side 1 is the caller's to give an HBONE stream. */
  readonly channel: ChannelRef;
  /** Its bytes each way, once it closed (or node:http was done with it). */
  readonly done: Promise<ConnectionBytes>;
  /** Resets it (the pod left). */
  close(): void;
}

export class Http1Host<C, R> {
  private engine: Http1Engine | undefined;
  private readonly served = new Map<number, { readonly s: Served<C, R>; readonly end: (then?: Buffer, bytes?: ConnectionBytes, fd?: number) => void; answered?: (bytesIn: number) => void; how?: Forwarding; attempts: number }>();
  private nextId = 0;
  /** No engine: turned off, or the addon could not start one. */
  private failed: boolean;

  constructor(
    private readonly metrics: NodeMetrics,
    /** Which side: the metric's label. */
    private readonly side: 'client' | 'server',
    /** The engine may be used (off: every connection is node:http's). */
    enabled: boolean,
    private readonly idleTimeoutMs: number,
    private readonly handler: Http1Handler<C, R>,
    /** node:http's way, for a connection handed back (its unread bytes put back first). */
    private readonly fallback: (client: Socket, conn: C, unread: Buffer) => Promise<void>,
  ) {
    this.failed = !enabled;
  }

  /** node:http serves the connection (counted with why), its unread bytes put back first. */
  private async nodeServes(client: Socket, conn: C, unread: Buffer | undefined, why: string): Promise<ConnectionBytes> {
    this.metrics.httpEngine.inc({ side: this.side, engine: 'node', why });
    await this.fallback(client, conn, unread ?? Buffer.alloc(0));
    return socketTotals(client, NO_BYTES);
  }

  /**
   * Serves the connection on the engine until it closes (or is handed back and node:http is done
   * with it); `initial` holds bytes already read from it. node:http serves it when the engine
   * cannot take it: no engine (turned off, or no addon), no fd. Resolves with the connection's
   * bytes each way.
   */
  serve(client: Socket, conn: C, initial: Buffer | undefined): Promise<ConnectionBytes> {
    const engine = this.start();
    if (!engine) return this.nodeServes(client, conn, initial, 'no_addon');
    // No fd for the engine's copy: node:http serves this one on the socket it has.
    const copy = engineCopy(client, initial);
    if (copy === 'no_fd') return this.nodeServes(client, conn, initial, 'no_fd');
    const own = copy.fd;
    initial = copy.initial;
    return new Promise<ConnectionBytes>((resolve) => {
      const id = this.admit(conn, {
        handBack: (then, bytes) => {
          resumeReading(client);
          void this.fallback(client, conn, then).then(() => resolve(socketTotals(client, bytes)));
        },
        closed: (bytes) => {
          client.destroy();
          resolve(socketTotals(client, bytes));
        },
      });
      // The pod left (its sockets are destroyed) or the proxy closes: the engine's copy goes too.
      client.once('close', () => engine.close(id));
      try {
        engine.serve(id, own, initial);
        this.metrics.httpEngine.inc({ side: this.side, engine: 'addon', why: '' });
      } catch (e) {
        closeFd(own);
        this.served.delete(id);
        log.warn({ err: (e as Error).message }, 'the HTTP/1.1 engine could not take a connection: node:http serves it');
        resumeReading(client);
        void this.fallback(client, conn, initial ?? Buffer.alloc(0)).then(() => resolve(socketTotals(client, NO_BYTES)));
      }
    });
  }

  /**
   * A new channel whose side 0 the engine serves as a client connection until it closes (the
   * caller gives the other side to an HBONE stream: joined in memory, no socket): `done` resolves
   * with its bytes each way; `close()` resets it (the pod left). A connection handed back to
   * node:http (HTTP/1.0, CONNECT) gets a socket then: `socketFor` makes it of a socket pair's end
   * whose other end the engine joins to the channel. Undefined when there is no engine (the
   * caller gives the stream a socket instead).
   */
  serveChannel(conn: C, socketFor: (fd: number) => Socket): ChannelServed | undefined {
    const engine = this.start();
    if (!engine) return undefined;
    const channel = channelNew();
    let id = 0;
    const done = new Promise<ConnectionBytes>((resolve) => {
      id = this.admit(conn, {
        handBack: (then, bytes, fd) => {
          if (fd === undefined) return resolve(bytes);
          const socket = socketFor(fd);
          void this.fallback(socket, conn, then).then(() => resolve(socketTotals(socket, bytes)));
        },
        closed: resolve,
      });
    });
    engine.serve(id, channel);
    this.metrics.httpEngine.inc({ side: this.side, engine: 'addon', why: '' });
    return { channel, done, close: () => engine.close(id) };
  }

  /**
   * A new connection's entry under a new id: `handBack` when the engine gives it back to node:http
   * (`then`: its unread bytes; `fd`: a bridged channel's socket), `closed` when the engine closed it.
   */
  private admit(conn: C, on: { handBack(then: Buffer, bytes: ConnectionBytes, fd: number | undefined): void; closed(bytes: ConnectionBytes): void }): number {
    const id = ++this.nextId;
    const s: Served<C, R> = { id, conn, request: undefined };
    let ended = false;
    const end = (then?: Buffer, bytes: ConnectionBytes = NO_BYTES, fd?: number): void => {
      if (ended) return;
      ended = true;
      const answered = this.served.get(id)?.answered;
      this.served.delete(id);
      answered?.(0);
      if (then !== undefined) return on.handBack(then, bytes, fd);
      if (s.request !== undefined) this.handler.left(s);
      on.closed(bytes);
    };
    this.served.set(id, { s, end, attempts: 0 });
    return id;
  }

  /**
   * The request goes upstream (`how`): on an idle connection of its pool, else on a new one from
   * `dial` (pooled afterwards). `failed` is told when the dial fails (the request still waits for
   * an answer). A dial that comes back after its attempt was given up (answered, retried, or the
   * connection's next request) is closed unused.
   */
  forward(s: Served<C, R>, how: Forwarding): void {
    const engine = this.engine;
    const entry = this.served.get(s.id);
    if (!engine || !entry) return;
    const attempt = ++entry.attempts;
    const request = s.request;
    // The keep-alive race (the engine's retry event, no retry rule): the same request again, on another connection.
    entry.how = how;
    const { pool, head, answerRemove = NO_FIELDS, answerAdd = '', maxRequests = 0, retryOn, keep = false, gate } = how;
    if (engine.forward(s.id, pool, head, -1, answerRemove, answerAdd, maxRequests, retryOn, keep, gate)) return;
    how.dial().then(
      (fd) => {
        if (this.engine === engine && entry.attempts === attempt && s.request === request) engine.forward(s.id, pool, head, fd, answerRemove, answerAdd, maxRequests, retryOn, keep, gate);
        else dropUpstream(fd);
      },
      (e: Error) => {
        if (entry.attempts === attempt && s.request === request) how.failed(e);
      },
    );
  }

  /** The body of the request in flight on `s` as it was sent, when it was kept whole (Forwarding.keep): as the engine's keptBody(). */
  keptBody(s: Served<C, R>): Buffer | undefined {
    return this.engine?.keptBody(s.id);
  }

  /** Gives up the attempt in flight on `s` before its answer came (a per-try timeout): as the engine's abandon(). */
  abandon(s: Served<C, R>): -1 | 0 | 1 {
    return this.engine?.abandon(s.id) ?? 0;
  }

  /**
   * The proxy's own answer to the request waiting on `s` (status `status`); `counted` is called
   * with the request's body bytes once they were read and dropped (0 if the client left first).
   */
  respond(s: Served<C, R>, bytes: Buffer | string, status: number, counted: (bytesIn: number) => void): void {
    const entry = this.served.get(s.id);
    if (!entry || !this.engine) return counted(0);
    entry.answered = counted;
    this.engine.respond(s.id, bytes, false, status);
  }

  /**
   * The request in flight on `s` ran out of time. Answered with `bytes` if nothing of its answer
   * went out yet (`counted` as for respond): 0; else the connection is reset and the status of the
   * answer that was cut is returned (no done() follows); -1 when nothing was in flight.
   */
  expire(s: Served<C, R>, bytes: Buffer, status: number, counted: (bytesIn: number) => void): number {
    const entry = this.served.get(s.id);
    const engine = this.engine;
    if (!entry || !engine) return -1;
    entry.answered = counted;
    const r = engine.expire(s.id, bytes, status);
    if (r === 0) return 0;
    entry.answered = undefined;
    if (r > 0) engine.close(s.id);
    return r;
  }

  /** Gives the connection back to node:http from this request on. */
  private handBack(s: Served<C, R>, why: string): void {
    this.metrics.httpEngine.inc({ side: this.side, engine: 'node', why });
    const engine = this.engine;
    const back = engine?.release(s.id);
    if (!back) {
      engine?.close(s.id);
      return;
    }
    // A socket's copy is closed (node:net has the original); a channel's bridge is node:http's socket now.
    if (!back.bridged) closeFd(back.fd);
    this.served.get(s.id)?.end(back.buffered, { read: back.read, written: back.written }, back.bridged ? back.fd : undefined);
  }

  /** Closes the idle upstream connections of every pool whose key starts with `prefix`. */
  dropPools(prefix: string): void {
    this.engine?.dropPools(prefix);
  }

  /** Every request from now on goes to the handler again (the config it decided on changed). */
  undirect(): void {
    this.engine?.undirect();
  }

  /** The later requests of `s`'s connection are routed by the engine by `routes` (reported in the handler's delivered()); without, each goes to the handler. */
  route(s: Served<C, R>, routes: EngineRoutes | undefined): void {
    this.engine?.route(s.id, routes);
  }

  /** Requests to the backend Service `key` the engine routed itself that are in flight (the retry budget counts them). */
  inFlight(key: string): number {
    return this.engine?.inFlight(key) ?? 0;
  }

  close(): void {
    this.engine?.destroy();
    this.engine = undefined;
    for (const { end } of [...this.served.values()]) end();
  }

  private start(): Http1Engine | undefined {
    if (this.engine || this.failed) return this.engine;
    try {
      this.engine = http1Engine(
        {
          head: (id, method, url, minor, rawHeaders, _body, upgrade) => {
            const entry = this.served.get(id);
            if (!entry) return this.engine?.close(id);
            // HTTP/1.0 (its answers framed as it reads them) and CONNECT are node:http's; an
            // Upgrade is the engine's (a 101 joins the connections in C++).
            if (minor === 0 || (upgrade && method === 'CONNECT')) return this.handBack(entry.s, minor === 0 ? 'http1.0' : 'connect');
            this.handler.head(entry.s, { method, url, httpVersion: '1.1', headers: headerObject(rawHeaders), rawHeaders });
          },
          retry: (id, status) => {
            const entry = this.served.get(id);
            if (!entry || entry.s.request === undefined) return false;
            // A route's retry decides; without one, the keep-alive race is sent again once.
            const decided = this.handler.retry?.(entry.s, status);
            if (decided !== undefined) return decided;
            const how = entry.how;
            entry.how = undefined;
            if (!how || status !== 0) return false;
            this.forward(entry.s, how);
            return true;
          },
          done: (id, status, flag, bytesIn, bytesOut, detail) => {
            const entry = this.served.get(id);
            if (!entry) return;
            const answered = entry.answered;
            entry.answered = undefined;
            if (answered) return answered(bytesIn);
            // Refused before any decision: a request the parser would not take.
            if (entry.s.request === undefined) this.metrics.httpRefused.inc({ reason: detail.split(':')[0] || 'unknown' });
            else this.handler.done(entry.s, status, flag, bytesIn, bytesOut, detail);
          },
          delivered: (id, status, flag, bytesIn, bytesOut, ms, routes, target, endpoint) => {
            const entry = this.served.get(id);
            if (entry) this.handler.delivered?.(entry.s, status, flag, bytesIn, bytesOut, ms, routes, target, endpoint);
          },
          dial: (id, routes, target, endpoint) => {
            const engine = this.engine;
            const entry = this.served.get(id);
            const dialled = entry ? this.handler.dialRouted?.(entry.s, routes, target, endpoint) : undefined;
            if (!engine) return;
            if (!dialled) return engine.dialFailed(id);
            // Failed: the request is the handler's (which dials again, and answers a failure).
            dialled.then(
              (fd) => {
                if (this.engine === engine) engine.attach(id, fd);
                else dropUpstream(fd);
              },
              () => {
                if (this.engine === engine) engine.dialFailed(id);
              },
            );
          },
          closed: (id, _reason, read, written) => this.served.get(id)?.end(undefined, { read, written }),
        },
        { maxHeadBytes: MAX_HEADER_BYTES, idleMs: this.idleTimeoutMs, headTimeoutMs: HEADERS_TIMEOUT_MS, poolIdleMs: UPSTREAM_IDLE_MS, maxIdlePerPool: MAX_IDLE_PER_POOL },
      );
    } catch (e) {
      this.failed = true;
      log.warn({ err: (e as Error).message }, 'no HTTP/1.1 engine in the addon: node:http serves every HTTP/1.1 connection');
    }
    return this.engine;
  }
}
