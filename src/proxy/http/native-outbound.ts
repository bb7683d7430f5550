/**
 * The client side of L7 on the addon's HTTP/1.1 engine (native/src/http1.cc): requests are framed
 * in C++ and this code is asked once per request where it goes, with the same decide() as the
 * node:http path, so routing, weights, filters, affinity, circuit breaking and outlier detection
 * are one code. The engine does not do what needs the request kept or timed: retries, timeouts,
 * mirrors, faults, maxRequestsPerConnection, upgrades, HTTP/1.0. A request that needs one of them
 * hands its connection back to node:http (HttpOutbound) for the rest of its life, from that
 * request on, so nothing is refused for being unsupported here.
 *
 * The engine reads and writes a duplicate of the client socket's fd; node:net keeps the original,
 * paused, so the pod's bookkeeping (its open connections, its sockets closed when it leaves) stays
 * as for any connection, and a handed-back connection is the same socket.
 */
import { randomUUID } from 'node:crypto';
import type { IncomingHttpHeaders } from 'node:http';
import type { Socket } from 'node:net';

import type { Endpoint, ServiceTarget } from '../../config/snapshot.js';
import type { HeaderChanges } from '../../config/route-filters.js';
import { closeFd, dupFd, http1Engine, type Http1Engine } from '../../datapath/native.js';
import { logger } from '../../shared/log.js';
import { socketFd } from '../pod-listener.js';
import { MAX_HEADER_BYTES, UPSTREAM_IDLE_MS, UpstreamDenied, rawHead, type AccessFacts, type RequestHead } from './common.js';
import type { Decision, HttpClientConnection, HttpOutbound } from './outbound.js';

const log = logger('http');

/** Idle upstream connections kept per pool (source pod, backend Service, endpoint). */
const MAX_IDLE_PER_POOL = 64;

/** The request a connection is on, from its decision to its end. */
interface InFlight {
  readonly started: number;
  readonly facts: AccessFacts;
  readonly target: ServiceTarget;
  endpoint?: Endpoint;
  /** Gives the circuit breaker's slot (or place in line) and the endpoint's count back; once. */
  release?: () => void;
}

interface Served {
  readonly client: Socket;
  readonly conn: HttpClientConnection;
  /** The engine is done with it: closed, or handed back to node:http (`then` serves it there). */
  readonly end: (then?: Buffer) => void;
  request?: InFlight;
}

/** Why the engine cannot carry a request decided so (what needs it kept or timed), or undefined when it can. */
function engineCannot(d: Extract<Decision, { kind: 'forward' }>): string | undefined {
  const { entry, target, parent } = d;
  if (entry.retry !== undefined) return 'retry';
  if (entry.timeouts?.requestMs !== undefined || entry.timeouts?.backendRequestMs !== undefined) return 'timeout';
  if ((entry.mirrors?.length ?? 0) > 0) return 'mirror';
  if ((entry.fault ?? parent.policy.fault ?? target.policy.fault) !== undefined) return 'fault';
  if (target.policy.maxRequestsPerConnection !== 0) return 'max_requests_per_connection';
  return undefined;
}

/**
 * The answer's header changes as the engine applies them: names removed from the upstream's
 * answer, then lines added. Folded in order, as applyHeaderChanges() applies them one by one:
 * a later change's remove or set drops what an earlier one added.
 */
export function answerEdits(changes: ReadonlyArray<HeaderChanges>): { remove: string[]; add: string } {
  const remove = new Set<string>();
  let added: Array<readonly [string, string]> = [];
  for (const c of changes) {
    const drop = new Set([...c.remove, ...c.set.map(([n]) => n)].map((n) => n.toLowerCase()));
    for (const n of drop) remove.add(n);
    added = added.filter(([n]) => !drop.has(n.toLowerCase()));
    added.push(...c.set, ...c.add);
  }
  return { remove: [...remove], add: added.map(([n, v]) => `${n}: ${v}\r\n`).join('') };
}

/** Raw header pairs as node:http's IncomingMessage.headers has them: lower-case names, repeats joined (set-cookie kept as a list). */
function headerObject(raw: ReadonlyArray<string>): IncomingHttpHeaders {
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

export class NativeOutbound {
  private engine: Http1Engine | undefined;
  private readonly served = new Map<number, Served>();
  private nextId = 0;
  private failed = false;

  constructor(
    private readonly outbound: HttpOutbound,
    private readonly idleTimeoutMs: number,
    /** node:http's way, for a connection handed back (its unread bytes put back first). */
    private readonly fallback: (client: Socket, conn: HttpClientConnection, unread: Buffer) => Promise<void>,
  ) {}

  /**
   * Serves the client connection on the engine until it closes (or is handed back and node:http
   * is done with it). Undefined when the engine cannot take it (no fd): node:http serves it then.
   */
  serve(client: Socket, conn: HttpClientConnection, initial: Buffer | undefined): Promise<void> | undefined {
    const engine = this.start();
    const fd = socketFd(client);
    if (!engine || fd === undefined) return undefined;
    const own = dupFd(fd);
    const id = ++this.nextId;
    client.setNoDelay(true);
    return new Promise<void>((resolve) => {
      let ended = false;
      const end = (then?: Buffer): void => {
        if (ended) return;
        ended = true;
        this.served.delete(id);
        const s = served.request;
        if (s && then === undefined) {
          // The client left before its answer was whole (Envoy's DC).
          served.request = undefined;
          s.release?.();
          this.outbound.track('active', s.target, -1);
          this.outbound.count(conn, s.target, s.endpoint, 0, 'DC', s.started, s.facts);
        }
        if (then === undefined) {
          client.destroy();
          resolve();
          return;
        }
        void this.fallback(client, conn, then).then(resolve);
      };
      const served: Served = { client, conn, end };
      this.served.set(id, served);
      // The pod left (its sockets are destroyed) or the proxy closes: the engine's copy goes too.
      client.once('close', () => {
        if (!ended) engine.close(id);
      });
      try {
        engine.serve(id, own, initial);
        this.outbound.metrics.httpEngine.inc({ engine: 'addon', why: '' });
      } catch (e) {
        closeFd(own);
        this.served.delete(id);
        ended = true;
        log.warn({ err: (e as Error).message }, 'the HTTP/1.1 engine could not take a connection: node:http serves it');
        void this.fallback(client, conn, initial ?? Buffer.alloc(0)).then(resolve);
      }
    });
  }

  /** Whether the addon has the engine (known once a connection asked for it). */
  get available(): boolean {
    return !this.failed;
  }

  /** Closes the idle upstream connections pooled for a source pod (it left). */
  forgetPod(uid: string): void {
    this.engine?.dropPools(`${uid}|`);
  }

  close(): void {
    this.engine?.destroy();
    this.engine = undefined;
    for (const s of [...this.served.values()]) s.end();
  }

  private start(): Http1Engine | undefined {
    if (this.engine || this.failed) return this.engine;
    try {
      this.engine = http1Engine(
        {
          head: (id, method, target, minor, headers, _body, upgrade) => this.onHead(id, method, target, minor, headers, upgrade),
          done: (id, status, flag, bytesIn, bytesOut, detail) => this.onDone(id, status, flag, bytesIn, bytesOut, detail),
          closed: (id) => this.served.get(id)?.end(),
        },
        { maxHeadBytes: MAX_HEADER_BYTES, idleMs: this.idleTimeoutMs, poolIdleMs: UPSTREAM_IDLE_MS, maxIdlePerPool: MAX_IDLE_PER_POOL },
      );
    } catch (e) {
      this.failed = true;
      log.warn({ err: (e as Error).message }, 'no HTTP/1.1 engine in the addon: node:http serves every HTTP/1.1 connection');
    }
    return this.engine;
  }

  /** Gives the connection back to node:http from this request on. */
  private handBack(id: number, s: Served, why: string): void {
    this.outbound.metrics.httpEngine.inc({ engine: 'node', why });
    const engine = this.engine;
    const back = engine?.release(id);
    if (!back) {
      engine?.close(id);
      return;
    }
    closeFd(back.fd);
    s.end(back.buffered);
  }

  private onHead(id: number, method: string, url: string, minor: 0 | 1, rawHeaders: string[], upgrade: boolean): void {
    const engine = this.engine;
    const s = this.served.get(id);
    if (!engine) return;
    if (!s) return engine.close(id);
    // HTTP/1.0 (its answers framed as it reads them) and upgrades are node:http's.
    if (minor === 0 || upgrade) return this.handBack(id, s, minor === 0 ? 'http1.0' : 'upgrade');
    const req: RequestHead = { method, url, httpVersion: '1.1', headers: headerObject(rawHeaders), rawHeaders };
    const started = performance.now();
    const given = req.headers['x-request-id'];
    const requestId = typeof given === 'string' ? given : randomUUID();
    const { conn } = s;
    const d = this.outbound.decide(req, conn, requestId);
    const cannot = d.kind === 'forward' ? engineCannot(d) : undefined;
    if (cannot) return this.handBack(id, s, cannot);
    const facts = (bytesIn: number, bytesOut: number, attempts: number): AccessFacts => ({ req, requestId, route: d.route, bytesIn, bytesOut, attempts });
    if (d.kind === 'answer') {
      this.outbound.noteAnswer(conn, d.parent, undefined, started, d.answer, facts(0, 0, 0));
      return engine.respond(id, proxyAnswer(d.answer.status, d.answer.detail), false);
    }
    if (d.kind === 'redirect') {
      this.outbound.count(conn, d.parent, undefined, d.status, '-', started, facts(0, 0, 0));
      return engine.respond(id, rawHead(d.status, ['location', d.location, 'content-length', '0']), false);
    }
    const { target } = d;
    const request: InFlight = { started, target, facts: facts(0, 0, 0) };
    s.request = request;
    this.outbound.track('active', target, 1);
    const slot = this.outbound.admit(target, (leave) => this.send(id, s, request, d, leave));
    if ('status' in slot) {
      s.request = undefined;
      this.outbound.track('active', target, -1);
      this.outbound.noteAnswer(conn, target, undefined, started, slot, request.facts);
      return engine.respond(id, proxyAnswer(slot.status, slot.detail), false);
    }
    request.release = slot.leave;
    if (slot.now) this.send(id, s, request, d, slot.leave);
  }

  /** The request to an endpoint of its backend, once the circuit breaker lets it go. */
  private send(id: number, s: Served, request: InFlight, d: Extract<Decision, { kind: 'forward' }>, leave: () => void): void {
    const engine = this.engine;
    if (!engine || s.request !== request) return leave();
    const { target, upstream } = d;
    const lb = this.outbound.lb;
    const endpoint = lb.pick(target, undefined, upstream.hashKey);
    if (!endpoint) {
      leave();
      request.release = undefined;
      return this.proxyAnswers(id, s, request, 503, 'UH', `Service ${target.key} has no endpoints`);
    }
    request.endpoint = endpoint;
    lb.acquire(target, endpoint);
    let released = false;
    request.release = (): void => {
      if (released) return;
      released = true;
      lb.release(target, endpoint);
      leave();
    };
    let head = `${request.facts.req.method ?? 'GET'} ${upstream.path} HTTP/1.1\r\n`;
    const h = upstream.headers;
    for (let i = 0; i + 1 < h.length; i += 2) head += `${h[i]}: ${h[i + 1]}\r\n`;
    head += '\r\n';
    const pool = `${s.conn.source.uid}|${target.key}|${endpoint.workload.uid}|${endpoint.port}`;
    const edits = answerEdits(upstream.answerChanges);
    if (engine.forward(id, pool, head, -1, edits.remove, edits.add)) return;
    s.conn.dialFd(target, endpoint).then(
      (fd) => {
        lb.connectSucceeded(endpoint);
        // The client may have gone meanwhile: forward() closes the fd then.
        if (this.engine === engine) engine.forward(id, pool, head, fd, edits.remove, edits.add);
        else closeFd(fd);
      },
      (e: Error) => {
        if (s.request !== request) return;
        const denied = e instanceof UpstreamDenied;
        if (!denied && lb.connectFailed(target, endpoint)) this.outbound.ejected(target, endpoint, 'consecutive connect errors');
        this.proxyAnswers(id, s, request, denied ? 403 : 503, denied ? 'UAEX' : 'UF', e.message);
      },
    );
  }

  /** The proxy answers the request in flight itself (no endpoint, a failed connect, a refusal). */
  private proxyAnswers(id: number, s: Served, request: InFlight, status: number, flag: string, detail: string): void {
    s.request = undefined;
    request.release?.();
    this.outbound.track('active', request.target, -1);
    this.outbound.noteAnswer(s.conn, request.target, request.endpoint, request.started, { status, flag, detail }, request.facts);
    this.engine?.respond(id, proxyAnswer(status, detail), false);
  }

  /** A request ended in the engine: its answer passed on (or cut), or the engine's own answer. */
  private onDone(id: number, status: number, flag: string, bytesIn: number, bytesOut: number, detail: string): void {
    const s = this.served.get(id);
    if (!s) return;
    const request = s.request;
    if (!request) {
      // Refused before any decision: a request the parser would not take.
      this.outbound.metrics.httpRefused.inc({ reason: detail.split(':')[0] || 'unknown' });
      return;
    }
    s.request = undefined;
    request.release?.();
    this.outbound.track('active', request.target, -1);
    const { endpoint, target } = request;
    // Outlier detection on answers the backend gave (not on the engine's own).
    if (endpoint && flag === '-' && this.outbound.lb.answered(target, endpoint, status)) this.outbound.ejected(target, endpoint, `consecutive error answers (the last ${status})`);
    const facts = { ...request.facts, bytesIn, bytesOut, attempts: 1 };
    if (flag === 'UC' || flag === 'UPE') this.outbound.noteAnswer(s.conn, target, endpoint, request.started, { status, flag, detail }, facts);
    else this.outbound.count(s.conn, target, endpoint, status, flag, request.started, facts);
  }
}

/** The proxy's own answer, as HttpOutbound.answer() writes it. */
function proxyAnswer(status: number, detail: string): Buffer {
  const body = `${detail}\n`;
  return Buffer.from(rawHead(status, ['content-type', 'text/plain', 'content-length', String(Buffer.byteLength(body))]) + body);
}
