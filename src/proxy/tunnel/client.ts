/**
 * The outbound end of HBONE: tunnels from a source pod to a destination pod's 15008, made from
 * inside the source pod's netns (so the destination sees the pod's own address) and pooled per
 * (source pod, its identity, destination identity, destination address), as ztunnel pools them:
 * one TCP connection can only leave from one pod and land in one pod, presenting one identity
 * each way. Up to CLIENT_MAX_STREAMS connections share a tunnel; an idle one is closed after
 * IDLE_TUNNEL_MS. The server's certificate must carry exactly the identity the config expects for
 * the destination, and chain to the mesh roots.
 */
import { connect as h2connect, constants as h2, type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders } from 'node:http2';
import { Socket } from 'node:net';
import { connect as tlsConnect, type PeerCertificate, type TLSSocket } from 'node:tls';

import { NM_PROXY_MARK } from '../../datapath/abi.js';
import { closeFd, connectInNetns } from '../../datapath/native.js';
import { formatHostPort } from '../../shared/address.js';
import { logger } from '../../shared/log.js';
import { spiffeUri } from '../../identity/spiffe.js';
import { CLIENT_MAX_STREAMS, CLIENT_PING, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT_MS, HBONE_ALPN, HBONE_CIPHERS, HBONE_PORT, IDLE_TUNNEL_MS, MAX_FRAME_SIZE, STREAM_WINDOW, forwardedFor, keepAlive, peerIdentity, type TunnelIdentities } from './hbone.js';

const log = logger('hbone-client');

/**
 * A CONNECT on a pooled tunnel, or on a new one when there is none; and on a new one again when
 * the pooled tunnel's destination was closing it (GOAWAY: an agent handing its node over, or
 * stopping), since then the CONNECT never got there (`unanswered`).
 */
export async function onPooledOrNew<T, S>(pooled: T | undefined, dial: () => Promise<T>, request: (tunnel: T) => Promise<S>): Promise<S> {
  try {
    return await request(pooled ?? (await dial()));
  } catch (e) {
    if (pooled === undefined || !(e instanceof TunnelFailed) || e.reason !== 'unanswered') throw e;
    return request(await dial());
  }
}

/** A tunnel could not carry the connection: why, for metrics and the refusal log. */
export class TunnelFailed extends Error {
  constructor(
    /**
     * `unanswered`: the stream ended (reset, refused, or its tunnel closed) before any answer, so
     * the destination's application never saw it: it may go again on a new tunnel.
     */
    readonly reason: 'no_certificate' | 'connect' | 'tls' | 'identity_mismatch' | 'refused' | 'h2' | 'unanswered',
    message: string,
    /** The HTTP status the peer answered, for `refused`. */
    readonly status?: number,
  ) {
    super(message);
    this.name = 'TunnelFailed';
  }
}

export interface TunnelTarget {
  /** The source pod: its netns (the tunnel leaves from there) and its identity's certificate. */
  readonly source: { readonly uid: string; readonly netnsPath: string; readonly identity: string };
  /** The destination pod's address (the tunnel goes to its 15008) and the identity it must present. */
  readonly destination: { readonly address: string; readonly identity: string };
  /** The application's port in the destination pod. */
  readonly port: number;
  /** The client's own address and port, sent as `forwarded: for=`. */
  readonly client: { readonly address: string; readonly port: number };
  readonly connectTimeoutMs: number;
}

interface Tunnel {
  readonly key: string;
  readonly session: ClientHttp2Session;
  streams: number;
  idle: NodeJS.Timeout | undefined;
}

/** The pool a connection's tunnel comes from: one source pod and identity to one destination pod and identity (both engines). */
export function poolKey(target: TunnelTarget): string {
  return `${target.source.uid}|${target.source.identity}|${target.destination.identity}|${target.destination.address}`;
}

/** Tunnels open in a pool's map. */
export function tunnelCount(tunnels: ReadonlyMap<string, ReadonlyArray<unknown>>): number {
  let n = 0;
  for (const list of tunnels.values()) n += list.length;
  return n;
}

export interface TunnelPoolEvents {
  /** A new TLS connection (a tunnel) was made; streams reuse it otherwise. */
  onTunnelOpened?(): void;
}

export class TunnelPool {
  private readonly tunnels = new Map<string, Tunnel[]>();
  private closed = false;

  constructor(
    private readonly identities: TunnelIdentities,
    private readonly events: TunnelPoolEvents = {},
  ) {}

  /** Tunnels open now (for status and the benchmark's reuse figure). */
  size(): number {
    return tunnelCount(this.tunnels);
  }

  /** A CONNECT stream to target's application, answered 200, on a pooled or new tunnel. */
  async open(target: TunnelTarget): Promise<ClientHttp2Stream> {
    const key = poolKey(target);
    return onPooledOrNew(this.reusable(key), () => this.dial(key, target), (tunnel) => this.request(tunnel, target));
  }

  private async request(tunnel: Tunnel, target: TunnelTarget): Promise<ClientHttp2Stream> {
    tunnel.streams++;
    clearTimeout(tunnel.idle);
    const authority = formatHostPort(target.destination.address, target.port);
    let stream: ClientHttp2Stream;
    try {
      stream = tunnel.session.request({ ':method': 'CONNECT', ':authority': authority, forwarded: forwardedFor(target.client.address, target.client.port) }, { endStream: false });
    } catch (e) {
      this.release(tunnel);
      throw new TunnelFailed('h2', `CONNECT ${authority}: ${(e as Error).message}`);
    }
    stream.once('close', () => this.release(tunnel));
    // For the stream's life (the relay adds its own): an error is never an unhandled event.
    stream.on('error', () => undefined);
    const status = await new Promise<number>((resolve, reject) => {
      // Whichever comes first settles it, and the others' listeners go: a stream that closes
      // after its answer must not build an error (a stack trace per connection, in the profile).
      const done = (): void => {
        clearTimeout(timer);
        stream.off('response', onResponse);
        stream.off('error', onError);
        stream.off('close', onClose);
      };
      const onResponse = (headers: IncomingHttpHeaders): void => {
        done();
        resolve(Number(headers[':status']));
      };
      const onError = (e: Error): void => {
        done();
        reject(new TunnelFailed('unanswered', `CONNECT ${authority}: ${e.message}`));
      };
      const onClose = (): void => {
        done();
        reject(new TunnelFailed('unanswered', `CONNECT ${authority}: stream closed before an answer (code ${stream.rstCode ?? '?'})`));
      };
      const timer = setTimeout(() => {
        done();
        reject(new TunnelFailed('refused', `CONNECT ${authority}: no answer within ${target.connectTimeoutMs} ms`));
      }, target.connectTimeoutMs);
      stream.once('response', onResponse);
      stream.once('error', onError);
      stream.once('close', onClose);
    }).catch((e: unknown) => {
      if (!stream.destroyed) stream.close(h2.NGHTTP2_CANCEL);
      throw e;
    });
    if (status !== 200) {
      if (!stream.destroyed) stream.close(h2.NGHTTP2_CANCEL);
      throw new TunnelFailed('refused', `CONNECT ${authority}: the destination answered ${status}`, status);
    }
    return stream;
  }

  private reusable(key: string): Tunnel | undefined {
    return this.tunnels.get(key)?.find((t) => !t.session.closed && !t.session.destroyed && t.streams < CLIENT_MAX_STREAMS);
  }

  private release(tunnel: Tunnel): void {
    tunnel.streams--;
    if (tunnel.streams > 0) return;
    clearTimeout(tunnel.idle);
    tunnel.idle = setTimeout(() => tunnel.session.close(), IDLE_TUNNEL_MS);
    tunnel.idle.unref();
  }

  /** A new tunnel: TCP from inside the source pod, TLS 1.3 with its certificate, HTTP/2. */
  private async dial(key: string, target: TunnelTarget): Promise<Tunnel> {
    if (this.closed) throw new TunnelFailed('connect', 'the proxy is stopping');
    const held = this.identities.certificate(target.source.identity);
    if (!held) throw new TunnelFailed('no_certificate', `the node holds no certificate for ${target.source.identity}`);
    const peer = formatHostPort(target.destination.address, HBONE_PORT);
    let fd: number;
    try {
      fd = await connectInNetns({ netns: target.source.netnsPath, host: target.destination.address, port: HBONE_PORT, timeoutMs: target.connectTimeoutMs, mark: NM_PROXY_MARK });
    } catch (e) {
      throw new TunnelFailed('connect', `${peer}: ${(e as Error).message}`);
    }
    let tcp: Socket;
    try {
      tcp = new Socket({ fd, readable: true, writable: true });
      // Many connections' small frames share this socket: none waits for another's ACK (Nagle).
      tcp.setNoDelay(true);
    } catch (e) {
      closeFd(fd);
      throw new TunnelFailed('connect', `${peer}: ${(e as Error).message}`);
    }
    const expected = target.destination.identity;
    const tls: TLSSocket = tlsConnect({
      socket: tcp,
      key: held.keyPem,
      cert: held.chain.join(''),
      ca: [...this.identities.roots()],
      minVersion: 'TLSv1.3',
      ciphers: HBONE_CIPHERS,
      ALPNProtocols: HBONE_ALPN,
      // ztunnel sends no SNI; the peer is checked by its workload identity, not a host name.
      checkServerIdentity: (_host: string, cert: PeerCertificate) => {
        const got = peerIdentity(cert);
        const uri = got ? spiffeUri(got) : undefined;
        return uri === expected ? undefined : new TunnelFailed('identity_mismatch', `${peer} presented ${uri ?? 'no workload identity'}, not ${expected}`);
      },
    });
    tls.on('error', () => undefined);
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new TunnelFailed('tls', `${peer}: no TLS handshake within ${HANDSHAKE_TIMEOUT_MS} ms`)), HANDSHAKE_TIMEOUT_MS);
        tls.once('secureConnect', () => {
          clearTimeout(timer);
          if (tls.alpnProtocol !== 'h2') reject(new TunnelFailed('tls', `${peer}: ALPN "${String(tls.alpnProtocol)}", not h2`));
          else resolve();
        });
        tls.once('error', (e: Error) => {
          clearTimeout(timer);
          reject(e instanceof TunnelFailed ? e : new TunnelFailed('tls', `${peer}: ${e.message}`));
        });
      });
    } catch (e) {
      tls.destroy();
      throw e;
    }
    const session = h2connect(`https://${peer}`, {
      createConnection: () => tls,
      settings: { initialWindowSize: STREAM_WINDOW, maxFrameSize: MAX_FRAME_SIZE, enablePush: false },
      maxSessionMemory: 64,
    });
    session.on('error', (e: Error) => log.debug({ peer, err: e.message }, 'tunnel error'));
    session.setLocalWindowSize(CONNECTION_WINDOW);
    const tunnel: Tunnel = { key, session, streams: 0, idle: undefined };
    keepAlive(session, CLIENT_PING, () => session.destroy());
    const list = this.tunnels.get(key) ?? [];
    list.push(tunnel);
    this.tunnels.set(key, list);
    session.once('close', () => {
      clearTimeout(tunnel.idle);
      // The TLS socket and the TCP socket under it go with the session (a destroyed session
      // does not always take the socket it was given along).
      tls.destroy();
      tcp.destroy();
      const rest = (this.tunnels.get(key) ?? []).filter((t) => t !== tunnel);
      if (rest.length > 0) this.tunnels.set(key, rest);
      else this.tunnels.delete(key);
    });
    this.events.onTunnelOpened?.();
    return tunnel;
  }

  /** Closes every tunnel of a source pod (it left the mesh). */
  closeSource(uid: string): void {
    for (const [key, list] of this.tunnels) if (key.startsWith(`${uid}|`)) for (const t of list) t.session.destroy();
  }

  close(): void {
    this.closed = true;
    for (const list of this.tunnels.values()) for (const t of list) t.session.destroy();
    this.tunnels.clear();
  }
}
