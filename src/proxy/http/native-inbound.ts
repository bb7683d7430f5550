/**
 * The server side of L7 on the addon's HTTP/1.1 engine (native-engine.ts): each request is
 * admitted by the same HttpInbound.admit() as on node:http (its path normalized, authorized,
 * rate-limited), then the engine delivers it to the application over its pooled connections and
 * passes the answer back; the request is reported as `reporter="destination"`.
 */
import type { Socket } from 'node:net';

import { requestIdOf, withBytes, type AccessFacts, type RequestHead } from './common.js';
import type { RequestGate } from '../policy.js';
import type { HttpInbound, HttpServerConnection } from './inbound.js';
import { Http1Host, proxyAnswer, requestHead, upgradeFields, type Forwarding, type Http1Handler, type Served } from './native-engine.js';

interface Delivering {
  readonly started: number;
  readonly facts: AccessFacts;
}

/** A request on its way to the application: one object per request, no closures (its dial and failure on the prototype). */
class Delivery implements Forwarding {
  constructor(
    private readonly handler: NativeInbound,
    private readonly s: Served<HttpServerConnection, Delivering>,
    readonly pool: string,
    readonly head: string,
    readonly gate: RequestGate | undefined,
  ) {}

  dial(): Promise<number> {
    return this.s.conn.dialFd();
  }

  failed(e: Error): void {
    this.handler.answers(this.s, 503, 'UF', e.message);
  }
}

export class NativeInbound implements Http1Handler<HttpServerConnection, Delivering> {
  readonly host: Http1Host<HttpServerConnection, Delivering>;

  constructor(
    private readonly inbound: HttpInbound,
    metrics: HttpInbound['metrics'],
    enabled: boolean,
    idleTimeoutMs: number,
    fallback: (client: Socket, conn: HttpServerConnection, unread: Buffer) => Promise<void>,
  ) {
    this.host = new Http1Host(metrics, 'server', enabled, idleTimeoutMs, this, fallback);
  }

  head(s: Served<HttpServerConnection, Delivering>, req: RequestHead): void {
    const started = performance.now();
    const requestId = requestIdOf(req);
    const { conn } = s;
    const facts: AccessFacts = { req, requestId, route: '', bytesIn: 0, bytesOut: 0, attempts: 0 };
    const admitted = this.inbound.admit(req, conn);
    if ('status' in admitted) {
      this.inbound.refused(conn, admitted);
      const bytesOut = Buffer.byteLength(`${admitted.detail}\n`);
      return this.host.respond(s, proxyAnswer(admitted.status, admitted.detail, admitted.headers), admitted.status, (bytesIn) => this.inbound.count(conn, admitted.status, admitted.flag, started, { ...facts, bytesIn, bytesOut }));
    }
    const headers = this.inbound.headersUp(req, requestId);
    s.request = { started, facts: withBytes(facts, 0, 0, 1) };
    // What the config now lets through unread on this connection: the engine sends those of its
    // later requests on itself, and asks for the others.
    this.host.forward(s, new Delivery(this, s, conn.poolKey, requestHead(req.method ?? 'GET', admitted.target, headers, upgradeFields(req)), this.inbound.unreadGate(conn)));
  }

  delivered(s: Served<HttpServerConnection, Delivering>, status: number, flag: string, bytesIn: number, bytesOut: number, ms: number): void {
    this.inbound.counted(s.conn, flag === 'DC' ? 0 : status, flag, ms, bytesIn, bytesOut, undefined);
  }

  /** Answered here: the application could not be reached. */
  answers(s: Served<HttpServerConnection, Delivering>, status: number, flag: string, detail: string): void {
    const r = s.request;
    if (!r) return;
    s.request = undefined;
    this.host.respond(s, proxyAnswer(status, detail), status, (bytesIn) => this.inbound.count(s.conn, status, flag, r.started, { ...r.facts, bytesIn }));
  }

  done(s: Served<HttpServerConnection, Delivering>, status: number, flag: string, bytesIn: number, bytesOut: number): void {
    const r = s.request;
    if (!r) return;
    s.request = undefined;
    this.inbound.count(s.conn, status, flag, r.started, withBytes(r.facts, bytesIn, bytesOut, r.facts.attempts));
  }

  left(s: Served<HttpServerConnection, Delivering>): void {
    const r = s.request;
    if (!r) return;
    s.request = undefined;
    this.inbound.count(s.conn, 0, 'DC', r.started, r.facts);
  }
}
