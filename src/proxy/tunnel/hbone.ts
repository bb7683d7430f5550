/**
 * HBONE as Istio ambient's ztunnel speaks it (docs/hbone.md has each fact's source): HTTP/2
 * CONNECT over mutual TLS 1.3 to <destination pod IP>:15008, ALPN "h2", no SNI, ECDSA P-256
 * certificates whose one URI SAN is the workload's SPIFFE ID. A classic CONNECT: `:method` and
 * `:authority` (the destination pod's IP and the application's port) only, plus `forwarded:
 * for="<client ip:port>"`. The server answers 200 once it has connected to the application, 400
 * for a malformed request or an authority that is not the address dialled, 401 when
 * authorization denies, 503 when it cannot deliver.
 */
import type { Http2Session } from 'node:http2';
import type { PeerCertificate } from 'node:tls';

import { NM_PROXY_PORTS } from '../../datapath/abi.js';
import { formatHostPort } from '../../shared/address.js';
import { parseSpiffeUri, type WorkloadIdentity } from '../../identity/spiffe.js';

export const HBONE_PORT = 15008;
export const HBONE_ALPN = ['h2'];
/** ztunnel's TLS 1.3 cipher suites: AES-GCM only (no ChaCha20). */
export const HBONE_CIPHERS = 'TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256';

/** ztunnel's HTTP/2 settings: 4 MiB per stream, 16 MiB per connection, 1 MiB frames. */
export const STREAM_WINDOW = 4 * 1024 * 1024;
export const CONNECTION_WINDOW = 16 * 1024 * 1024;
export const MAX_FRAME_SIZE = 1024 * 1024;
/** Streams a server accepts on one connection, and a client opens on one before it opens another. */
export const SERVER_MAX_STREAMS = 200;
export const CLIENT_MAX_STREAMS = 100;
/** A tunnel with no stream for this long is closed. */
export const IDLE_TUNNEL_MS = 5 * 60_000;
/** ztunnel's client keepalive: a ping every 10 s, no answer in 20 s ends the tunnel. */
export const CLIENT_PING = { intervalMs: 10_000, timeoutMs: 20_000 } as const;
/**
 * The server's: a connection that nghttp2 ended with GOAWAY for a protocol error (invalid frames)
 * stays open in node:http2 with no event at all (node 20, checked); it answers no ping, which is
 * how the server finds it and closes it, within 10 s.
 */
export const SERVER_PING = { intervalMs: 5_000, timeoutMs: 5_000 } as const;

/** Pings the peer every intervalMs; a ping not answered within timeoutMs, or refused, calls onDead (once). */
export function keepAlive(session: Http2Session, ping: { readonly intervalMs: number; readonly timeoutMs: number }, onDead: () => void): void {
  let dead = false;
  const die = (): void => {
    if (dead || session.destroyed) return;
    dead = true;
    onDead();
  };
  const timer = setInterval(() => {
    if (session.destroyed || session.closed) return;
    const timeout = setTimeout(die, ping.timeoutMs);
    timeout.unref();
    try {
      session.ping((err) => {
        clearTimeout(timeout);
        if (err) die();
      });
    } catch {
      clearTimeout(timeout);
      die();
    }
  }, ping.intervalMs);
  timer.unref();
  session.once('close', () => clearInterval(timer));
}

/** A TLS or HTTP/2 handshake that takes longer is given up. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Request headers a peer may send at most (ztunnel's server allows 64 KiB). */
export const MAX_HEADER_LIST = 64 * 1024;

/** What a node holds to speak HBONE: a certificate per identity of its pods, and the roots. */
export interface TunnelIdentities {
  /** The key (PKCS#8 PEM) and chain (PEM, leaf first) of an identity the node holds, if valid now. */
  certificate(uri: string): { readonly keyPem: string; readonly chain: ReadonlyArray<string> } | undefined;
  roots(): ReadonlyArray<string>;
  trustDomain(): string;
}

/** The workload identity of a peer's certificate: its first URI SAN that is one. */
export function peerIdentity(cert: PeerCertificate | undefined): WorkloadIdentity | undefined {
  const sans = (cert?.subjectaltname ?? '').split(', ');
  for (const san of sans) {
    if (!san.startsWith('URI:')) continue;
    try {
      return parseSpiffeUri(san.slice(4));
    } catch {
      // not a workload identity: the next one may be
    }
  }
  return undefined;
}

/** `forwarded: for="..."` as ztunnel writes it (RFC 7239: IPv6 in brackets, quoted). */
export function forwardedFor(address: string, port: number): string {
  return `for="${formatHostPort(address, port)}"`;
}

/** "10.1.2.3:8080" or "[fd00::1]:8080" to host and port; undefined for anything else. */
export function parseAuthority(authority: string | undefined): { host: string; port: number } | undefined {
  if (!authority) return undefined;
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|(\d{1,3}(?:\.\d{1,3}){3})):(\d{1,5})$/.exec(authority);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port < 1 || port > 65535) return undefined;
  return { host: (m[1] ?? m[2] ?? '').toLowerCase(), port };
}

/** A CONNECT that passed the tunnel's checks, whichever engine carries its stream. */
export interface TunnelRequestOf<S> {
  readonly stream: S;
  /** The client's workload identity, from its certificate. */
  readonly peer: WorkloadIdentity;
  /** The tunnel's TCP peer: the client pod's address (ztunnel dials from inside the client pod). */
  readonly source: { readonly address: string; readonly port: number };
  /** The application's address in this pod: the :authority, which is the address dialled. */
  readonly target: { readonly host: string; readonly port: number };
}

/** What a pod's HBONE listener reports: each CONNECT that passed, each refusal. */
export interface TunnelServerEventsOf<S> {
  onRequest(request: TunnelRequestOf<S>): void;
  onRefused(reason: TunnelRefusal, detail: Record<string, unknown>): void;
}

/** Why a tunnel or a CONNECT on it was refused (a metric label). */
export type TunnelRefusal = 'tls_handshake' | 'h2_handshake' | 'h2_error' | 'ping_timeout' | 'bad_request' | 'authority_mismatch' | 'proxy_port' | 'no_identity' | 'trust_domain';

/** A CONNECT as it arrived: its headers, the address the tunnel was dialled at, and the client's identity (read on demand). */
export interface ConnectFacts {
  readonly method: string | undefined;
  readonly authority: string | undefined;
  /** The tunnel's local address (the pod address dialled). */
  readonly local: string;
  readonly peer: () => WorkloadIdentity | undefined;
}

/**
 * The checks every CONNECT passes before the proxy sees it: the method, an authority that is the
 * address dialled (a tunnel lands in one pod), not a proxy port (that would loop; ztunnel
 * answers 503), and a client identity of this trust domain. Either the target and peer, or the
 * refusal with its HTTP status.
 */
export function checkConnect(c: ConnectFacts, trustDomain: string): { readonly target: { host: string; port: number }; readonly peer: WorkloadIdentity } | { readonly refuse: TunnelRefusal; readonly status: number; readonly detail: Record<string, unknown> } {
  if (c.method !== 'CONNECT') return { refuse: 'bad_request', status: 400, detail: { method: c.method } };
  const target = parseAuthority(c.authority);
  const local = c.local.replace(/^::ffff:/, '').toLowerCase();
  if (!target) return { refuse: 'bad_request', status: 400, detail: { authority: String(c.authority).slice(0, 100) } };
  if (target.host !== local) return { refuse: 'authority_mismatch', status: 400, detail: { authority: c.authority, dialled: local } };
  if (NM_PROXY_PORTS.has(target.port)) return { refuse: 'proxy_port', status: 503, detail: { authority: c.authority } };
  const peer = c.peer();
  if (!peer) return { refuse: 'no_identity', status: 401, detail: {} };
  if (peer.trustDomain !== trustDomain) return { refuse: 'trust_domain', status: 401, detail: { trustDomain: peer.trustDomain } };
  return { target, peer };
}
