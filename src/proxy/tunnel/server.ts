/**
 * The inbound end of HBONE for one pod: listeners on <pod IP>:15008 inside the pod's netns
 * (real sockets: sk_lookup lets the proxy ports through), TLS 1.3 with the pod's own workload
 * certificate, a client certificate required and checked against the mesh roots, HTTP/2 with
 * ztunnel's settings. Each CONNECT is checked here (method, authority = the address dialled,
 * not a proxy port, a workload identity of this trust domain); what passes is handed to the
 * proxy, which answers 200 once it has connected to the application.
 */
import { constants as h2, createSecureServer, type Http2SecureServer, type Http2Session, type Http2Stream, type IncomingHttpHeaders, type ServerHttp2Stream } from 'node:http2';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';

import { closeFd } from '../../datapath/native.js';
import { listenInPodNetns, type ListenerRef } from '../listen-sockets.js';
import { serveOnFd } from '../pod-listener.js';
import { logger } from '../../shared/log.js';
import {
  CONNECTION_WINDOW,
  HANDSHAKE_TIMEOUT_MS,
  HBONE_ALPN,
  HBONE_CIPHERS,
  HBONE_PORT,
  MAX_FRAME_SIZE,
  MAX_HEADER_LIST,
  SERVER_MAX_STREAMS,
  SERVER_PING,
  STREAM_WINDOW,
  checkConnect,
  keepAlive,
  peerIdentity,
  type TunnelIdentities,
  type TunnelRefusal,
  type TunnelRequestOf,
  type TunnelServerEventsOf,
} from './hbone.js';

export type { TunnelRefusal };

const log = logger('hbone-server');

export type TunnelRequest = TunnelRequestOf<ServerHttp2Stream>;
export type TunnelServerEvents = TunnelServerEventsOf<ServerHttp2Stream>;

export class TunnelServer {
  private readonly servers: Http2SecureServer[] = [];
  private readonly sockets: Array<ListenerRef & { readonly fd: number }> = [];
  /** Every accepted connection, from its first byte (a handshake in progress too): close() ends them all. */
  private readonly connections = new Set<Socket>();
  /** Every HTTP/2 session: close() destroys them, and with them the TLS sockets they own (destroying the raw socket under TLS does not). */
  private readonly sessions = new Set<Http2Session>();

  private constructor(
    private readonly identity: string,
    private readonly identities: TunnelIdentities,
    private readonly events: TunnelServerEvents,
  ) {}

  /**
   * Listens on each of the pod's addresses, port 15008, inside its netns, presenting the pod's
   * certificate (`identity`, which the node must hold). Throws if it does not.
   */
  static async open(netnsPath: string, addresses: ReadonlyArray<string>, identity: string, identities: TunnelIdentities, events: TunnelServerEvents, idleTimeoutMs: number): Promise<TunnelServer> {
    const t = new TunnelServer(identity, identities, events);
    try {
      for (const address of addresses) await t.listen(netnsPath, address, idleTimeoutMs);
    } catch (e) {
      await t.close();
      throw e;
    }
    return t;
  }

  /** The pod identity's key and chain with the mesh roots; undefined while the node holds no valid certificate for it. */
  private credentials(): { key: string; cert: string; ca: string[] } | undefined {
    const held = this.identities.certificate(this.identity);
    return held && { key: held.keyPem, cert: held.chain.join(''), ca: [...this.identities.roots()] };
  }

  /** A renewed certificate or new roots: new handshakes use them, open tunnels go on. */
  refresh(): void {
    const creds = this.credentials();
    if (!creds) return;
    for (const s of this.servers) s.setSecureContext({ ...creds, minVersion: 'TLSv1.3', ciphers: HBONE_CIPHERS });
  }

  private async listen(netnsPath: string, address: string, idleTimeoutMs: number): Promise<void> {
    const creds = this.credentials();
    if (!creds) throw new Error(`the node holds no certificate for ${this.identity}`);
    const server = createSecureServer({
      ...creds,
      minVersion: 'TLSv1.3',
      ciphers: HBONE_CIPHERS,
      requestCert: true,
      rejectUnauthorized: true,
      ALPNProtocols: HBONE_ALPN,
      allowHTTP1: false,
      handshakeTimeout: HANDSHAKE_TIMEOUT_MS,
      settings: { initialWindowSize: STREAM_WINDOW, maxConcurrentStreams: SERVER_MAX_STREAMS, maxFrameSize: MAX_FRAME_SIZE, maxHeaderListSize: MAX_HEADER_LIST, enableConnectProtocol: false },
      maxSessionMemory: 64,
    });
    // Idle relays end on the proxy's idle timeout; the connection under them lasts at least as long.
    server.setTimeout(idleTimeoutMs + 60_000);
    server.on('tlsClientError', (e: Error & { code?: string }) => this.events.onRefused('tls_handshake', { err: e.code ?? e.message }));
    server.on('connection', (socket: Socket) => {
      // Many connections' small frames share this socket: none waits for another's ACK (Nagle).
      socket.setNoDelay(true);
      this.connections.add(socket);
      socket.once('close', () => this.connections.delete(socket));
    });
    server.on('session', (session: Http2Session) => this.adopt(session));
    server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => this.request(stream, headers));
    server.on('sessionError', (e: Error) => this.events.onRefused('h2_error', { err: e.message }));
    const fd = await listenInPodNetns(netnsPath, address, HBONE_PORT);
    try {
      await serveOnFd(server, fd);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
    server.on('error', (e: Error) => log.warn({ address, err: e.message }, 'HBONE listener error'));
    this.servers.push(server);
    this.sockets.push({ host: address, port: HBONE_PORT, fd });
  }

  /** A new session: its connection window, and a deadline for the peer's HTTP/2 preface. */
  private adopt(session: Http2Session): void {
    session.on('error', () => undefined);
    this.sessions.add(session);
    session.once('close', () => this.sessions.delete(session));
    session.setLocalWindowSize(CONNECTION_WINDOW);
    const deadline = setTimeout(() => {
      this.events.onRefused('h2_handshake', { peer: (session.socket as TLSSocket | undefined)?.remoteAddress });
      session.destroy();
    }, HANDSHAKE_TIMEOUT_MS);
    deadline.unref();
    session.once('remoteSettings', () => clearTimeout(deadline));
    session.once('close', () => clearTimeout(deadline));
    keepAlive(session, SERVER_PING, () => {
      this.events.onRefused('ping_timeout', { peer: (session.socket as TLSSocket | undefined)?.remoteAddress });
      session.destroy();
    });
  }

  /**
   * The client's identity, read from its certificate once per connection: the certificate cannot
   * change within a TLS 1.3 connection (no renegotiation), and decoding it for every CONNECT cost
   * 2.5% of a loaded agent's CPU (profiled, bench:two-hop).
   */
  private readonly peers = new WeakMap<TLSSocket, ReturnType<typeof peerIdentity>>();
  private peerOf(socket: TLSSocket): ReturnType<typeof peerIdentity> {
    if (!this.peers.has(socket)) this.peers.set(socket, peerIdentity(socket.getPeerCertificate()));
    return this.peers.get(socket);
  }

  private request(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
    stream.on('error', () => undefined);
    const socket = stream.session?.socket as TLSSocket | undefined;
    const refuse = (reason: TunnelRefusal, status: number, detail: Record<string, unknown>): void => {
      this.events.onRefused(reason, { ...detail, peer: socket?.remoteAddress });
      if (!stream.destroyed && !stream.headersSent) stream.respond({ ':status': status }, { endStream: true });
      else stream.close(h2.NGHTTP2_REFUSED_STREAM);
    };
    if (!socket) return refuse('bad_request', 400, { detail: 'no connection' });
    const checked = checkConnect({ method: headers[':method'], authority: headers[':authority'], local: socket.localAddress ?? '', peer: () => this.peerOf(socket) }, this.identities.trustDomain());
    if ('refuse' in checked) return refuse(checked.refuse, checked.status, checked.detail);
    this.events.onRequest({ stream, peer: checked.peer, source: { address: (socket.remoteAddress ?? '').replace(/^::ffff:/, ''), port: socket.remotePort ?? 0 }, target: checked.target });
  }

  /** The listening sockets (for a handover: the next agent gets copies). */
  listeners(): ReadonlyArray<ListenerRef & { readonly fd: number }> {
    return this.sockets;
  }

  /** No new tunnels (the node was handed over); the open ones go on until they end or close(). */
  stopListening(): void {
    for (const s of this.servers) s.close();
    this.sockets.length = 0;
    // GOAWAY: open streams go on, clients open new ones on a new tunnel (elsewhere).
    for (const session of this.sessions) session.close();
  }

  async close(): Promise<void> {
    this.sockets.length = 0;
    // server.close() waits for every connection: they are ended first, sessions and handshakes alike.
    const closed = Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    for (const s of this.sessions) s.destroy();
    for (const c of this.connections) c.destroy();
    await closed;
    this.servers.length = 0;
  }
}

/** Ends a tunnelled stream with an HTTP status before any byte is relayed. */
export function answer(stream: Http2Stream & { respond?: ServerHttp2Stream['respond'] }, status: number): void {
  if (stream.destroyed) return;
  const s = stream as ServerHttp2Stream;
  if (!s.headersSent) s.respond({ ':status': status }, { endStream: true });
  else s.close(h2.NGHTTP2_CANCEL);
}
