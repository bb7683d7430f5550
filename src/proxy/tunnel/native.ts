/**
 * HBONE with the bytes in the addon (native/src/hbone.cc: TLS 1.3 and HTTP/2 on the JS thread's
 * loop, each CONNECT stream copied to and from its application socket, or joined in memory to
 * the HTTP/1.1 engine through a channel). The same
 * tunnels, checks and pooling as the node:tls + node:http2 engine (client.ts, server.ts), which
 * stays selectable (`nodemesh agent --hbone node`): JS still decides whom to dial and which
 * identity the peer must present, whether a CONNECT passes, and where a stream is delivered;
 * the addon moves the bytes and reports each step as an event.
 */
import { NM_PROXY_MARK } from '../../datapath/abi.js';
import { closeFd, connectInNetns, hboneAddon, type ChannelRef, type HboneAddon, type HboneEvent } from '../../datapath/native.js';
import { acceptWhenOurs, listenInPodNetns, type ListenerRef } from '../listen-sockets.js';
import { parseSpiffeUri, type WorkloadIdentity } from '../../identity/spiffe.js';
import { formatHostPort } from '../../shared/address.js';
import { logger } from '../../shared/log.js';
import type { RelayResult } from '../relay.js';
import { TunnelFailed, onPooledOrNew, poolKey, tunnelCount, type TunnelPoolEvents, type TunnelTarget } from './client.js';
import { CLIENT_MAX_STREAMS, HBONE_PORT, IDLE_TUNNEL_MS, checkConnect, forwardedFor, type TunnelIdentities, type TunnelRefusal, type TunnelRequestOf, type TunnelServerEventsOf } from './hbone.js';

const log = logger('hbone-native');

type Relayed = Extract<HboneEvent, { type: 'relayed' }>;
type Requested = Extract<HboneEvent, { type: 'request' }>;
type Closed = Extract<HboneEvent, { type: 'closed' }>;

/** The addon's engine, started once per process; routes its events to whoever waits for them (the pool and the servers below; tests drive it directly). */
export class HboneEngine {
  private static instance: HboneEngine | undefined;
  static get(): HboneEngine {
    HboneEngine.instance ??= new HboneEngine(hboneAddon());
    return HboneEngine.instance;
  }

  private readonly dials = new Map<number, (e: Extract<HboneEvent, { type: 'dialed' }>) => void>();
  private readonly responses = new Map<number, (e: Extract<HboneEvent, { type: 'response' }>) => void>();
  private readonly relays = new Map<number, (e: Relayed) => void>();
  /** Client tunnels: told when they close or their server sends GOAWAY. */
  private readonly tunnels = new Map<number, (e: Closed | { type: 'draining' }) => void>();
  /** Listeners: told of each CONNECT and of each connection that ends. */
  private readonly servers = new Map<number, (e: Requested | Closed) => void>();

  private constructor(readonly addon: HboneAddon) {
    addon.hboneInit((e) => this.dispatch(e));
  }

  /** Whether the engine holds the event loop: while anything waits for one of its events, or a listener serves. */
  private held = false;
  private hold(): void {
    const busy = this.dials.size + this.responses.size + this.relays.size + this.servers.size > 0;
    if (busy !== this.held) this.addon.hboneHold(busy);
    this.held = busy;
  }

  private dispatch(e: HboneEvent): void {
    this.route(e);
    this.hold();
  }

  private route(e: HboneEvent): void {
    switch (e.type) {
      case 'dialed':
        this.dials.get(e.conn)?.(e);
        this.dials.delete(e.conn);
        break;
      case 'response':
        this.responses.get(e.handle)?.(e);
        this.responses.delete(e.handle);
        break;
      case 'relayed':
        this.relays.get(e.relay)?.(e);
        this.relays.delete(e.relay);
        break;
      case 'request':
        if (this.servers.has(e.server)) this.servers.get(e.server)?.(e);
        else this.addon.hboneAnswer(e.handle, 503);
        break;
      case 'draining':
        this.tunnels.get(e.conn)?.(e);
        break;
      case 'closed':
        if (e.server !== undefined) this.servers.get(e.server)?.(e);
        else {
          this.tunnels.get(e.conn)?.(e);
          this.tunnels.delete(e.conn);
        }
        break;
    }
  }

  /** A TLS handshake and HTTP/2 on a connected socket (the addon takes fd): the tunnel's id. */
  dial(fd: number, context: number, expected: string, onEvent: (e: Closed | { type: 'draining' }) => void): Promise<number> {
    return new Promise((resolve, reject) => {
      const conn = this.addon.hboneDial(fd, context, expected);
      this.dials.set(conn, (e) => {
        if (e.error === undefined) {
          this.tunnels.set(conn, onEvent);
          resolve(conn);
        } else reject(new TunnelFailed(e.reason === 'identity_mismatch' ? 'identity_mismatch' : 'tls', e.error));
      });
      this.hold();
    });
  }

  /** A CONNECT on a tunnel: its stream's handle, and the status it was answered (rejects if none came). */
  request(conn: number, authority: string, forwarded: string): { handle: number; status: Promise<number> } {
    const handle = this.addon.hboneRequest(conn, authority, forwarded);
    const status = new Promise<number>((resolve, reject) => {
      this.responses.set(handle, (e) => (e.status !== undefined ? resolve(e.status) : reject(new TunnelFailed('unanswered', `CONNECT ${authority}: ${e.error ?? 'no answer'}`))));
    });
    this.hold();
    return { handle, status };
  }

  forget(handle: number): void {
    this.responses.delete(handle);
    this.hold();
  }

  async attach(handle: number, fd: number | ChannelRef, idleTimeoutMs: number, initial?: Buffer): Promise<RelayResult> {
    const e = await new Promise<Relayed>((resolve) => {
      this.relays.set(this.addon.hboneAttach(handle, fd, idleTimeoutMs, initial), resolve);
      this.hold();
    });
    return { bytesFromClient: e.bytesFromApp, bytesToClient: e.bytesToApp, ...(e.error !== undefined ? { error: e.error } : {}), ...(e.reason !== undefined ? { reason: e.reason } : {}) };
  }

  serve(fd: number, context: number, onEvent: (e: Requested | Closed) => void): number {
    const server = this.addon.hboneServe(fd, context);
    this.servers.set(server, onEvent);
    this.hold();
    return server;
  }

  /** Stops accepting on the server's socket; its connections go on. */
  stopListening(server: number): void {
    this.addon.hboneServerStopListening(server);
  }

  closeServer(server: number): void {
    this.servers.delete(server);
    this.addon.hboneServerClose(server);
    this.hold();
  }
}

/** TLS contexts (certificate, key, roots) by identity, made again when either changes. */
class Contexts {
  private readonly held = new Map<string, { readonly cert: string; readonly roots: string; readonly id: number }>();
  constructor(
    private readonly engine: HboneEngine,
    private readonly server: boolean,
  ) {}

  get(identity: string, identities: TunnelIdentities): number | undefined {
    const held = identities.certificate(identity);
    if (!held) return undefined;
    const cert = held.chain.join('');
    const roots = identities.roots().join('');
    const have = this.held.get(identity);
    if (have && have.cert === cert && have.roots === roots) return have.id;
    const id = this.engine.addon.hboneContext(this.server, held.keyPem, cert, [...identities.roots()]);
    // Connections made with the old context keep their own reference to it.
    if (have) this.engine.addon.hboneContextFree(have.id);
    this.held.set(identity, { cert, roots, id });
    return id;
  }

  clear(): void {
    for (const c of this.held.values()) this.engine.addon.hboneContextFree(c.id);
    this.held.clear();
  }
}

/** One CONNECT stream of a native tunnel, either end, until it is delivered or answered. */
export class NativeTunnelStream {
  private settled = false;

  constructor(
    readonly handle: number,
    private readonly engine: HboneEngine,
    private readonly onEnd: () => void = () => undefined,
  ) {}

  /**
   * Relays `fd` and the stream until both end (a server stream is answered 200 first); `initial`
   * (bytes already read from `fd`) goes first. Takes the fd; or the stream's side of a channel to
   * the HTTP/1.1 engine (which the engine's side then reads as reset if the stream was ended).
   */
  async attach(fd: number | ChannelRef, idleTimeoutMs: number, initial?: Buffer): Promise<RelayResult> {
    if (this.settled) {
      if (typeof fd === 'number') closeFd(fd);
      else this.engine.addon.channelDrop(fd.channel, 1);
      return { bytesFromClient: 0, bytesToClient: 0, error: 'the tunnel stream was already ended', reason: 'reset' };
    }
    this.settled = true;
    try {
      return await this.engine.attach(this.handle, fd, idleTimeoutMs, initial);
    } finally {
      this.onEnd();
    }
  }

  /** Ends a server stream with an HTTP status and no tunnel. */
  answer(status: number): void {
    if (this.settled) return;
    this.settled = true;
    this.engine.addon.hboneAnswer(this.handle, status);
    this.onEnd();
  }

  /** Ends the stream with RST_STREAM (CANCEL). */
  cancel(): void {
    if (this.settled) return;
    this.settled = true;
    this.engine.addon.hboneCancel(this.handle);
    this.onEnd();
  }
}

interface Tunnel {
  /** The engine's id of the connection, once its handshakes are done. */
  conn: number;
  streams: number;
  usable: boolean;
  idle: NodeJS.Timeout | undefined;
}

/** The outbound end (client.ts's TunnelPool, with the addon's engine). */
export class NativeTunnelPool {
  private readonly engine = HboneEngine.get();
  private readonly contexts = new Contexts(this.engine, false);
  private readonly tunnels = new Map<string, Tunnel[]>();
  private closed = false;

  constructor(
    private readonly identities: TunnelIdentities,
    private readonly events: TunnelPoolEvents = {},
  ) {}

  size(): number {
    return tunnelCount(this.tunnels);
  }

  /** A CONNECT stream to target's application, answered 200, on a pooled or new tunnel. */
  async open(target: TunnelTarget): Promise<NativeTunnelStream> {
    const key = poolKey(target);
    const pooled = this.tunnels.get(key)?.find((t) => t.usable && t.streams < CLIENT_MAX_STREAMS);
    return onPooledOrNew(pooled, () => this.dial(key, target), (tunnel) => this.request(tunnel, target));
  }

  private async request(tunnel: Tunnel, target: TunnelTarget): Promise<NativeTunnelStream> {
    tunnel.streams++;
    clearTimeout(tunnel.idle);
    const authority = formatHostPort(target.destination.address, target.port);
    const { handle, status } = this.engine.request(tunnel.conn, authority, forwardedFor(target.client.address, target.client.port));
    const stream = new NativeTunnelStream(handle, this.engine, () => this.release(tunnel));
    let timer: NodeJS.Timeout | undefined;
    try {
      const answered = await Promise.race([
        status,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new TunnelFailed('refused', `CONNECT ${authority}: no answer within ${target.connectTimeoutMs} ms`)), target.connectTimeoutMs);
        }),
      ]);
      if (answered !== 200) throw new TunnelFailed('refused', `CONNECT ${authority}: the destination answered ${answered}`, answered);
      return stream;
    } catch (e) {
      this.engine.forget(handle);
      stream.cancel();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  private release(tunnel: Tunnel): void {
    tunnel.streams--;
    if (tunnel.streams > 0) return;
    clearTimeout(tunnel.idle);
    tunnel.idle = setTimeout(() => this.engine.addon.hboneClose(tunnel.conn), IDLE_TUNNEL_MS);
    tunnel.idle.unref();
  }

  private async dial(key: string, target: TunnelTarget): Promise<Tunnel> {
    if (this.closed) throw new TunnelFailed('connect', 'the proxy is stopping');
    let context: number | undefined;
    try {
      context = this.contexts.get(target.source.identity, this.identities);
    } catch (e) {
      throw new TunnelFailed('no_certificate', `${target.source.identity}: ${(e as Error).message}`);
    }
    if (context === undefined) throw new TunnelFailed('no_certificate', `the node holds no certificate for ${target.source.identity}`);
    const peer = formatHostPort(target.destination.address, HBONE_PORT);
    let fd: number;
    try {
      fd = await connectInNetns({ netns: target.source.netnsPath, host: target.destination.address, port: HBONE_PORT, timeoutMs: target.connectTimeoutMs, mark: NM_PROXY_MARK });
    } catch (e) {
      throw new TunnelFailed('connect', `${peer}: ${(e as Error).message}`);
    }
    const tunnel: Tunnel = { conn: 0, streams: 0, usable: true, idle: undefined };
    const conn = await this.engine
      .dial(fd, context, target.destination.identity, (e) => {
        tunnel.usable = false;
        if (e.type === 'closed') {
          clearTimeout(tunnel.idle);
          const rest = (this.tunnels.get(key) ?? []).filter((t) => t !== tunnel);
          if (rest.length > 0) this.tunnels.set(key, rest);
          else this.tunnels.delete(key);
          if (e.reason !== 'closed' && e.reason !== 'eof') log.debug({ peer, reason: e.reason, detail: e.detail }, 'tunnel closed');
        }
      })
      .catch((e: unknown) => {
        throw e instanceof TunnelFailed ? new TunnelFailed(e.reason, `${peer}: ${e.message}`) : e;
      });
    tunnel.conn = conn;
    const list = this.tunnels.get(key) ?? [];
    list.push(tunnel);
    this.tunnels.set(key, list);
    this.events.onTunnelOpened?.();
    return tunnel;
  }

  /** Closes every tunnel of a source pod (it left the mesh). */
  closeSource(uid: string): void {
    for (const [key, list] of this.tunnels) if (key.startsWith(`${uid}|`)) for (const t of list) this.engine.addon.hboneClose(t.conn);
  }

  close(): void {
    this.closed = true;
    for (const list of this.tunnels.values()) for (const t of list) this.engine.addon.hboneClose(t.conn);
    this.tunnels.clear();
    this.contexts.clear();
  }
}

export type NativeTunnelRequest = TunnelRequestOf<NativeTunnelStream>;
export type NativeTunnelServerEvents = TunnelServerEventsOf<NativeTunnelStream>;

/** The inbound end for one pod (server.ts's TunnelServer, with the addon's engine). */
export class NativeTunnelServer {
  private readonly engine = HboneEngine.get();
  private readonly contexts = new Contexts(this.engine, true);
  private readonly servers: number[] = [];
  private readonly sockets: Array<ListenerRef & { readonly fd: number }> = [];
  /** Sockets handed over, not accepted on until the handover commits. */
  private readonly waiting = new Set<number>();

  private constructor(
    private readonly identity: string,
    private readonly identities: TunnelIdentities,
    private readonly events: NativeTunnelServerEvents,
  ) {}

  static async open(netnsPath: string, addresses: ReadonlyArray<string>, identity: string, identities: TunnelIdentities, events: NativeTunnelServerEvents): Promise<NativeTunnelServer> {
    const t = new NativeTunnelServer(identity, identities, events);
    try {
      for (const address of addresses) await t.listen(netnsPath, address);
    } catch (e) {
      t.close();
      throw e;
    }
    return t;
  }

  private context(): number {
    const id = this.contexts.get(this.identity, this.identities);
    if (id === undefined) throw new Error(`the node holds no certificate for ${this.identity}`);
    return id;
  }

  /** A renewed certificate or new roots: new handshakes use them, open tunnels go on. */
  refresh(): void {
    let id: number;
    try {
      id = this.context();
    } catch {
      return;
    }
    for (const s of this.servers) this.engine.addon.hboneServerContext(s, id);
  }

  private async listen(netnsPath: string, address: string): Promise<void> {
    // Throws while the node holds no certificate for the identity.
    this.context();
    const fd = await listenInPodNetns(netnsPath, address, HBONE_PORT);
    this.sockets.push({ host: address, port: HBONE_PORT, fd });
    // A socket handed over: accepted on from the commit (closed meanwhile: nothing to serve).
    this.waiting.add(fd);
    acceptWhenOurs(fd, () => {
      // Not waiting any more: close() came first.
      if (!this.waiting.delete(fd)) return;
      try {
        this.servers.push(this.engine.serve(fd, this.context(), (e) => (e.type === 'request' ? this.request(e) : this.closed(e))));
      } catch (e) {
        log.error({ address, err: (e as Error).message }, 'HBONE listener could not start accepting');
      }
    });
  }

  /** The listening sockets (for a handover: the next agent gets copies). */
  listeners(): ReadonlyArray<ListenerRef & { readonly fd: number }> {
    return this.sockets;
  }

  /** No new tunnels (the node was handed over); the open ones go on until they end or close(). */
  stopListening(): void {
    for (const s of this.servers) this.engine.stopListening(s);
    this.sockets.length = 0;
  }

  private request(e: Requested): void {
    const stream = new NativeTunnelStream(e.handle, this.engine);
    const checked = checkConnect({ method: e.method, authority: e.authority, local: e.local, peer: () => parsePeer(e.peer) }, this.identities.trustDomain());
    if ('refuse' in checked) {
      this.events.onRefused(checked.refuse, { ...checked.detail, peer: e.source });
      stream.answer(checked.status);
      return;
    }
    this.events.onRequest({ stream, peer: checked.peer, source: { address: e.source, port: e.sourcePort }, target: checked.target });
  }

  /** A connection that ended before it could carry anything, or on a fault, is a refusal. */
  private closed(e: Closed): void {
    const reason: TunnelRefusal | undefined =
      e.reason === 'tls_handshake' || e.during === 'tls' ? 'tls_handshake' : e.reason === 'h2_handshake' || (e.during === 'h2' && e.reason !== 'server_closed' && e.reason !== 'proxy_stopping') ? 'h2_handshake' : e.reason === 'ping_timeout' ? 'ping_timeout' : e.reason === 'h2_error' ? 'h2_error' : undefined;
    if (reason && e.reason !== 'server_closed' && e.reason !== 'proxy_stopping') this.events.onRefused(reason, { peer: e.source, ...(e.detail ? { err: e.detail } : {}) });
  }

  close(): void {
    for (const s of this.servers) this.engine.closeServer(s);
    this.servers.length = 0;
    // Sockets not served yet (waiting for a handover's commit) are closed here.
    for (const fd of this.waiting) closeFd(fd);
    this.waiting.clear();
    this.sockets.length = 0;
    this.contexts.clear();
  }
}

function parsePeer(uri: string): WorkloadIdentity | undefined {
  if (uri === '') return undefined;
  try {
    return parseSpiffeUri(uri);
  } catch {
    return undefined;
  }
}
