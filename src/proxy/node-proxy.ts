/**
 * The shared node proxy (L4). For every enrolled pod it serves four sockets made inside the pod's
 * netns: 127.0.0.1:15001 and [::1]:15001 for captured outbound connections, 0.0.0.0:15006 and
 * [::]:15006 for inbound connections steered by sk_lookup. Outbound: original destination from
 * the BPF maps, Service lookup, endpoint choice, connect from inside the pod's netns (marked, so
 * never captured again), relay. Inbound: deliver to the application at the address the client
 * dialed, from inside the pod (self-addressed, so sk_lookup lets it through).
 */
import { writeSync } from 'node:fs';
import { constants as h2constants, type ClientHttp2Stream } from 'node:http2';
import { Socket, type Server } from 'node:net';

import { NM_DELIVERY_MARK, NM_PORT_INBOUND, NM_PORT_OUTBOUND, NM_PROXY_MARK, NM_PROXY_PORTS, type OrigKey } from '../datapath/abi.js';
import { formatHostPort, isLoopback, type Family, type SocketAddress } from '../shared/address.js';
import { channelNew, closeFd, connectInNetns, dupFd, hboneAbortAll, relayAbortAll, relayFds, releaseNetns, socketPair, type ChannelRef, type EngineUpstream } from '../datapath/native.js';
import { exportedTo, type Service } from '../config/service.js';
import { MeshSnapshot, type Endpoint, type ServiceTarget, type Workload } from '../config/snapshot.js';
import { logger } from '../shared/log.js';
import { LoadBalancer } from './pool/load-balancer.js';
import { principal, workloadLabels, type NodeMetrics, type RefuseReason, type TcpLabels } from './metrics/metrics.js';
import { listenInPod, socketFd } from './pod-listener.js';
import type { ListenerRef } from './listen-sockets.js';
import { relay, relayStreams, type RelayResult, type RelaySide } from './relay.js';
import { TunnelFailed, TunnelPool } from './tunnel/client.js';
import type { TunnelIdentities } from './tunnel/hbone.js';
import { TunnelServer, answer as answerStream, type TunnelRequest } from './tunnel/server.js';
import { NativeTunnelPool, NativeTunnelServer, NativeTunnelStream, type NativeTunnelRequest } from './tunnel/native.js';
import { spiffeUri, type WorkloadIdentity } from '../identity/spiffe.js';
import { NO_SECURITY } from '../config/security.js';
import { portProtocol, speaksRequests } from '../config/service.js';
import { OPEN_GATE, PolicyEngine, type ConnectionFacts, type RequestFacts, type Verdict } from './policy.js';
import { HttpOutbound, UpstreamDenied, type HttpClientConnection } from './http/outbound.js';
import { HttpInbound, type HttpServerConnection } from './http/inbound.js';
import { NO_BYTES, SNIFF_DEADLINE_MS, sniff, withHead, type ConnectionBytes } from './http/common.js';

const log = logger('proxy');

/** Upstream connects in flight at once, per pod and per node. */
const MAX_CONNECTING_PER_POD = 128;
const MAX_CONNECTING = 1024;

/** More connects in flight than the limits allow (a refusal, not a failure of the endpoint). */
class ConnectLimitReached extends Error {}

/** Fds one proxied connection may hold: the client, the upstream, two pipes of the kernel relay. */
const FDS_PER_CONNECTION = 6;
/** Fds kept aside for the agent itself (maps, links, HTTP servers, gRPC, files). */
const FDS_RESERVED = 128;
/** Fds each enrolled pod holds without connections: four listeners, its netns, its links. */
const FDS_PER_POD = 12;

/** The ports of the proxy's own in-pod listeners (design.md section 2): never a destination. */

/** What socketAddress returns for an address with a scope (link-local) of another netns. */
const SCOPED = 'scoped';

/**
 * A socket's local or remote address, without its IPv4-mapped prefix. node:net names the scope of
 * a link-local address by its interface, looked up in the agent's netns, where a pod's interface
 * does not exist: it throws (ENXIO). Such an address is SCOPED here.
 */
function socketAddress(s: Socket, which: 'local' | 'remote'): string {
  try {
    return ((which === 'local' ? s.localAddress : s.remoteAddress) ?? '').replace(/^::ffff:/, '');
  } catch {
    return SCOPED;
  }
}

function isLinkLocal(host: string): boolean {
  return /^fe[89ab][0-9a-f]:/i.test(host);
}

/** How the destination's side reads a pod's port (NodeProxy.readsHttp). */
type Reads = 'http1' | 'http2' | 'sniff';

/** A pod the proxy serves: its identity and where its network namespace is. */
export interface ProxyPod extends Workload {
  readonly netnsPath: string;
}

/** What the proxy asks of the datapath (the agent's NodeDatapath). */
export interface ProxyDatapath {
  originalDestination(key: OrigKey): SocketAddress | null;
  registerInboundListener(family: Family, address: string, fd: number): void;
  unregisterInboundListener(family: Family, address: string): void;
  /** Every non-loopback address of the pod's interfaces (link-local ones too). */
  podAddresses(uid: string): ReadonlyArray<{ readonly family: Family; readonly address: string; readonly ifindex: number }>;
  readonly inboundBypassFd: number;
}

export interface ProxyOptions {
  /** The mesh's trust domain now (the mesh config's `data.trustDomain`): identities and principal labels. */
  readonly trustDomain: () => string;
  /** Whether HTTP requests from pods of this namespace get an access log line each (the mesh config's `data.accessLog`). */
  readonly accessLog?: (namespace: string) => boolean;
  /** Destinations that are not mesh Services: pass through to the original address, or refuse. */
  readonly passthrough: 'allow' | 'deny';
  readonly connectTimeoutMs: number;
  readonly idleTimeoutMs: number;
  /** Connections to this address prove capture works for the pod; they are not relayed. */
  readonly probe: SocketAddress;
  readonly onProbe: (uid: string) => void;
  /** Relay bytes with splice() in the addon instead of JS streams. */
  readonly kernelRelay: boolean;
  /** HTTP/1.1 routed on the addon's engine (native/src/http1.cc) instead of node:http; default: as kernelRelay. */
  readonly nativeHttp?: boolean;
  /** RLIMIT_NOFILE (soft) of this process: the connection limits stay below it. */
  readonly fdLimit: number;
  /** Open connections node-wide; default: as many as the fd limit allows. */
  readonly maxConnections?: number;
  /** Open connections of one pod; default: half the node's. */
  readonly maxConnectionsPerPod?: number;
  /** Which HBONE engine carries the tunnels: the addon's (TLS and HTTP/2 on its thread; default) or node:tls with node:http2. */
  readonly hboneEngine?: 'native' | 'node';
  /** The node's workload certificates: with them, connections to meshed pods of other nodes go through HBONE tunnels, and pods accept tunnels on 15008. */
  readonly tunnel?: TunnelIdentities;
}

type ServiceLabels = Pick<TcpLabels, 'destination_service' | 'destination_service_namespace' | 'destination_service_name'>;

/**
 * Istio's destination_service labels: the Service's cluster name; a destination that is no
 * Service is Istio's PassthroughCluster (outbound) or InboundPassthroughCluster (inbound), never
 * its address: a pod dialling many addresses or ports must not grow the metrics without bound.
 */
function serviceLabels(service: Service | undefined, direction: 'outbound' | 'inbound'): ServiceLabels {
  if (service) return { destination_service: `${service.name}.${service.namespace}.svc.cluster.local`, destination_service_namespace: service.namespace, destination_service_name: service.name };
  const cluster = direction === 'outbound' ? 'PassthroughCluster' : 'InboundPassthroughCluster';
  return { destination_service: cluster, destination_service_namespace: 'unknown', destination_service_name: cluster };
}

/** The labels cache's key for a request answered before an endpoint was picked. */
const NO_ENDPOINT = Symbol('no endpoint');

/** Where a connection goes, from which netns, and the metric labels it is reported under. */
interface Upstream {
  readonly path: 'same_node' | 'outbound' | 'inbound' | 'hbone';
  readonly netnsPath: string;
  readonly host: string;
  readonly port: number;
  /** Connect with the client's address (delivery into the destination pod). */
  readonly transparentSource?: string;
  /** path 'hbone': the identity the destination pod must present. */
  readonly destinationIdentity?: string;
  /** path 'same_node': the destination pod (its policies are enforced on this side). */
  readonly local?: PodState;
  readonly labels: ReadonlyArray<TcpLabels>;
}

/** A connected upstream: a socket's fd (kernel or JS relay), a tunnelled stream of node:http2 (JS relay), or one of the addon's engine (relayed there). */
type Connected = { readonly fd: number } | { readonly stream: ClientHttp2Stream } | { readonly native: NativeTunnelStream };

/** The tunnelled side of an inbound HBONE connection, from either engine. */
type InboundStream = TunnelRequest['stream'] | NativeTunnelStream;

/**
 * The client's connection taken from node:net for the addon (the kernel relay or the HBONE
 * engine): a duplicate of its fd, and node:net's copy goes. Without an fd for the copy (EMFILE)
 * `release` frees the upstream, which is then the caller's to give back.
 */
function takeFd(client: Socket, clientFd: number, release: () => void): number {
  let own: number;
  try {
    own = dupFd(clientFd);
  } catch (e) {
    release();
    throw e;
  }
  client.destroy();
  return own;
}

/** Writes what a non-blocking socket takes of `bytes` now; how many it took (0 on an error: the relay reports it). */
function writeNow(fd: number, bytes: Buffer): number {
  let sent = 0;
  while (sent < bytes.length) {
    try {
      sent += writeSync(fd, bytes, sent, bytes.length - sent);
    } catch {
      break;
    }
  }
  return sent;
}

/** Ends an inbound CONNECT with an HTTP status (either engine). */
function answer(stream: InboundStream, status: number): void {
  if (stream instanceof NativeTunnelStream) stream.answer(status);
  else answerStream(stream, status);
}

interface PodState {
  readonly pod: ProxyPod;
  readonly servers: Server[];
  /** The listening sockets of `servers` (a handover gives the next agent copies). */
  readonly listeners: Array<ListenerRef & { readonly fd: number }>;
  /** Its open connections (sockets, or engine connections on a channel): a pod that leaves destroys them. */
  readonly sockets: Set<{ destroy(): void }>;
  /** Connections accepted on the pod's listeners and not ended (its share of the limits; status shows it). */
  open: number;
  /** Upstream connects in flight for the pod. */
  connecting: number;
  /** The addresses sk_lookup steers to this pod's inbound listeners. */
  readonly steered: Array<{ readonly family: Family; readonly address: string; readonly fd: number }>;
  /** The snapshot holds the pod's complete config; until then its outbound connections wait. */
  configured: boolean;
  /** Connections waiting for the pod's config, called when it arrives. */
  readonly waiting: Set<() => void>;
  /** The pod's HBONE listeners (15008), once the node holds its identity's certificate. */
  tunnelServer: TunnelServer | NativeTunnelServer | undefined;
  tunnelOpening: boolean;
}

export class NodeProxy {
  private snapshot = MeshSnapshot.empty();
  /** The snapshot's PeerAuthentications and AuthorizationPolicies, ready to evaluate. */
  private policies = new PolicyEngine(NO_SECURITY);
  private readonly pods = new Map<string, PodState>();
  private readonly lb: LoadBalancer;
  /** Connections accepted and not ended, node-wide. */
  private open = 0;
  /** Upstream connects in flight, node-wide. */
  private connecting = 0;

  /** Outbound tunnels to other nodes' pods (with workload certificates only). */
  private readonly tunnels: TunnelPool | NativeTunnelPool | undefined;
  /** Connections to HTTP Service ports with routes: terminated, routed per request. */
  private readonly http: HttpOutbound;
  /** Connections into pods' HTTP ports with request-level config there: read request by request (see readsHttp). */
  private readonly httpIn: HttpInbound;
  /** readsHttp's answers for the snapshot, by "uid|port" (null: not read). */
  /** readsHttp's answers by pod uid and port, until the next snapshot. */
  private readsHttpCache = new Map<string, Map<number, Reads | null>>();
  /**
   * Bumped whenever what a connection's metric labels are made of may change (the snapshot, the
   * pods of this node, identities): a client connection keeps the labels of its requests' targets
   * (HttpClientConnection.labels) while it is unchanged, instead of making them per request.
   */
  private labelsGeneration = 0;

  constructor(
    private readonly datapath: ProxyDatapath,
    private readonly metrics: NodeMetrics,
    private readonly options: ProxyOptions,
  ) {
    this.lb = new LoadBalancer();
    this.httpIn = new HttpInbound(metrics, { idleTimeoutMs: options.idleTimeoutMs, accessLog: options.accessLog ?? (() => false), nativeHttp: options.nativeHttp ?? options.kernelRelay });
    this.http = new HttpOutbound(this.lb, metrics, { idleTimeoutMs: options.idleTimeoutMs, accessLog: options.accessLog ?? (() => false), nativeHttp: options.nativeHttp ?? options.kernelRelay, destinationSide: this.httpIn });
    const tunnelEvents = { onTunnelOpened: () => metrics.tunnelsOpened.inc() };
    this.tunnels = !options.tunnel ? undefined : options.hboneEngine === 'node' ? new TunnelPool(options.tunnel, tunnelEvents) : new NativeTunnelPool(options.tunnel, tunnelEvents);
  }

  /** The pod's workload identity in the mesh's trust domain. */
  private workloadIdentity(w: Pick<Workload, 'namespace' | 'serviceAccount'>): WorkloadIdentity {
    return { trustDomain: this.options.trustDomain(), namespace: w.namespace, serviceAccount: w.serviceAccount };
  }

  /** The pod's workload identity as a SPIFFE URI. */
  private identityOf(w: Pick<Workload, 'namespace' | 'serviceAccount'>): string {
    return spiffeUri(this.workloadIdentity(w));
  }

  /**
   * The node's certificates changed (one obtained or renewed, new roots): pods whose identity
   * now has one get their HBONE listeners; the open ones present the renewed certificate from
   * their next handshake on.
   */
  identitiesChanged(): void {
    this.labelsGeneration++;
    for (const state of this.pods.values()) void this.openTunnelServer(state);
  }

  private async openTunnelServer(state: PodState): Promise<void> {
    const identities = this.options.tunnel;
    if (!identities || this.handedOver) return;
    if (state.tunnelServer) {
      state.tunnelServer.refresh();
      return;
    }
    const identity = this.identityOf(state.pod);
    if (state.tunnelOpening || !identities.certificate(identity)) return;
    state.tunnelOpening = true;
    try {
      const addresses = [state.pod.ip4, state.pod.ip6].filter(Boolean);
      const events = {
        onRequest: (request: TunnelRequest | NativeTunnelRequest) => void this.inboundTunnel(state, request).catch((e: unknown) => {
          this.metrics.tunnelRefused.inc({ reason: 'internal_error' });
          log.error({ pod: state.pod.name, namespace: state.pod.namespace, err: (e as Error).message }, 'HBONE request failed');
          answer(request.stream, 503);
        }),
        onRefused: (reason: string, detail: Record<string, unknown>) => {
          this.metrics.tunnelRefused.inc({ reason });
          this.refusalLog(state, reason, detail);
        },
      };
      const server =
        this.options.hboneEngine === 'node'
          ? await TunnelServer.open(state.pod.netnsPath, addresses, identity, identities, events, this.options.idleTimeoutMs)
          : await NativeTunnelServer.open(state.pod.netnsPath, addresses, identity, identities, events);
      if (this.pods.get(state.pod.uid) !== state) {
        await server.close();
        return;
      }
      state.tunnelServer = server;
    } catch (e) {
      log.error({ pod: state.pod.name, namespace: state.pod.namespace, err: (e as Error).message }, 'the pod\'s HBONE listener could not be opened');
    } finally {
      state.tunnelOpening = false;
    }
  }

  /** One warning per refused tunnel or CONNECT (rate-limited, see limitedLog). */
  private refusalLog(state: PodState, reason: string, detail: Record<string, unknown>): void {
    this.limitedLog('warn', { pod: state.pod.name, namespace: state.pod.namespace, reason, ...detail }, 'HBONE tunnel refused');
  }

  /**
   * Lines a peer can cause at will (refused tunnels, denied connections): at most 10 a second
   * node-wide, so that a scanner or a denied client in a loop cannot flood the log; the metrics
   * count every one.
   */
  private limitedLog(level: 'warn' | 'info', fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    if (now - this.logWindow.start >= 1000) this.logWindow = { start: now, count: 0 };
    if (++this.logWindow.count > 10) return;
    log[level](fields, message);
  }

  private logWindow = { start: 0, count: 0 };

  /**
   * Whether connections into the pod's port are read as HTTP on this side, and how: only where
   * something there acts on requests (an AuthorizationPolicy rule with request attributes for the
   * pod, or a localRateLimit on the Service), as the port's Service says (HTTP/1.1 or HTTP/2 by
   * its appProtocol or name), or sniffed from the client's first bytes when it says nothing (or
   * no Service has the port). Everything else stays on the L4 relay: L7 costs only where it is used.
   */
  /** Whether `endpoint` is a pod of this node whose port its side reads as `protocol`. */
  private readsHere(endpoint: Endpoint, protocol: 'http1' | 'http2'): boolean {
    const here = this.pods.get(endpoint.workload.uid);
    return here !== undefined && this.readsHttp(here, endpoint.port) === protocol;
  }

  private readsHttp(destination: PodState, port: number): Reads | undefined {
    let ports = this.readsHttpCache.get(destination.pod.uid);
    if (!ports) this.readsHttpCache.set(destination.pod.uid, (ports = new Map()));
    let reads = ports.get(port);
    if (reads === undefined) {
      const target = this.snapshot.serviceOf(destination.pod.uid, port);
      const acts = target?.policy.rateLimit !== undefined || this.policies.hasRequestRules(destination.pod);
      const said = target ? portProtocol(target.port) : 'unknown';
      reads = !acts ? null : said === 'unknown' ? 'sniff' : (speaksRequests(target?.port ?? { name: '', appProtocol: '' }) ?? null);
      ports.set(port, reads);
    }
    return reads ?? undefined;
  }

  /**
   * Access control for one connection into a pod this node serves (design.md section 4): the
   * pod's PeerAuthentication mode and AuthorizationPolicies decide (on a port read as HTTP, only
   * the mode: the policies then decide per request, see authorizeRequest). Denials are counted by
   * policy and logged once per connection (rate-limited); AUDIT matches are counted and logged too.
   */
  private authorize(destination: PodState, facts: Omit<ConnectionFacts, 'destination'>, path: 'same_node' | 'inbound' | 'hbone'): boolean {
    if (this.policies.empty) return true;
    const all = { ...facts, destination: destination.pod };
    const verdict = this.readsHttp(destination, facts.destinationPort) !== undefined ? this.policies.admitConnection(all) : this.policies.authorize(all);
    return this.judged(destination, facts, path, verdict, undefined);
  }

  /**
   * `look` of the snapshot in force, worked out again only when the snapshot changes: what a
   * connection asks of the config on every request (a key made per request is hashed per request).
   */
  private perSnapshot<T>(look: (snapshot: MeshSnapshot) => T): () => T {
    let made: { readonly snapshot: MeshSnapshot; readonly value: T } | undefined;
    return () => {
      if (made?.snapshot !== this.snapshot) made = { snapshot: this.snapshot, value: look(this.snapshot) };
      return made.value;
    };
  }

  /** Access control for one request on a port read as HTTP (its connection passed authorize). */
  private authorizeRequest(destination: PodState, facts: ConnectionFacts, path: 'same_node' | 'inbound' | 'hbone', request: RequestFacts): boolean {
    if (this.policies.empty) return true;
    return this.judged(destination, facts, path, this.policies.authorizeRequest(facts, request), request);
  }

  /** A verdict counted and logged (AUDIT matches, denials); whether it allows. */
  private judged(destination: PodState, facts: Omit<ConnectionFacts, 'destination'>, path: 'same_node' | 'inbound' | 'hbone', verdict: Verdict, request: RequestFacts | undefined): boolean {
    if (verdict.allowed && verdict.audited.length === 0) return true;
    // Only for what is logged: an allowed connection on the hot path builds none of it.
    const who = {
      pod: destination.pod.name,
      namespace: destination.pod.namespace,
      source: facts.peer ? spiffeUri(facts.peer) : 'plaintext',
      sourceIp: facts.sourceIp,
      destination: formatHostPort(facts.destinationIp, facts.destinationPort),
      path,
      ...(request ? { method: request.method, host: request.host, requestPath: request.path } : {}),
    };
    const what = request ? 'request' : 'connection';
    for (const policy of verdict.audited) {
      this.metrics.policyAudits.inc({ policy });
      this.limitedLog('info', { ...who, policy, allowed: verdict.allowed }, `${what} matched an AUDIT policy`);
    }
    if (verdict.allowed) return true;
    this.metrics.policyDenials.inc({ kind: verdict.kind, policy: verdict.policy, reason: verdict.reason, path });
    if (!request) this.metrics.refused.inc({ direction: 'inbound', reason: 'policy_denied' });
    this.limitedLog('warn', { ...who, kind: verdict.kind, policy: verdict.policy, reason: verdict.reason }, `${what} denied by policy`);
    return false;
  }

  /**
   * Serves a connection into a pod's port read as HTTP (readsHttp) until it ends: each request
   * authorized and rate-limited, then delivered to the application from the caller's address.
   */
  private serveHttpIn(state: PodState, client: Socket, protocol: 'http1' | 'http2', facts: Omit<ConnectionFacts, 'destination'>, path: 'same_node' | 'inbound' | 'hbone', labels: TcpLabels, source: Workload | undefined, sniffedHead?: Buffer): Promise<ConnectionBytes> {
    return this.httpIn.serve(client, this.serverConnection(state, protocol, facts, path, labels, source), sniffedHead);
  }

  /** What the server side needs of one connection into `state`'s pod: its facts, labels, policy, and how to reach the application. */
  private serverConnection(state: PodState, protocol: 'http1' | 'http2', facts: Omit<ConnectionFacts, 'destination'>, path: 'same_node' | 'inbound' | 'hbone', labels: TcpLabels, source: Workload | undefined): HttpServerConnection {
    const { destinationIp: host, destinationPort: port, sourceIp } = facts;
    const dial = async (): Promise<number> => {
      const target = this.snapshot.serviceOf(state.pod.uid, port);
      const upstream: Upstream = { path: 'inbound', netnsPath: state.pod.netnsPath, host, port, transparentSource: sourceIp, labels: [] };
      const connected = await this.connect(state, upstream, target?.policy.connectTimeoutMs ?? this.options.connectTimeoutMs);
      if (!('fd' in connected)) throw new Error('a delivery into a pod is a socket');
      return connected.fd;
    };
    let all: ConnectionFacts = { ...facts, destination: state.pod };
    return {
      protocol,
      pod: state.pod,
      facts: all,
      labels,
      source: source ? `${source.namespace}/${source.name}` : sourceIp,
      target: this.perSnapshot((snapshot) => snapshot.serviceOf(state.pod.uid, port)),
      authorize: (request) => {
        // Made again only when the pod's object changed (its labels), not per request.
        if (all.destination !== state.pod) all = { ...facts, destination: state.pod };
        return this.authorizeRequest(state, all, path, request);
      },
      requestGate: this.perSnapshot(() => (this.policies.empty ? OPEN_GATE : this.policies.requestGate({ ...facts, destination: state.pod }))),
      dial: async () => this.podSocket(state, await dial(), false).setNoDelay(true),
      dialFd: dial,
      poolKey: `${state.pod.uid}|${formatHostPort(host, port)}|${sourceIp}`,
    };
  }

  /**
   * A connection into a pod's port that readsHttp says to read: served as HTTP/1.1 or HTTP/2, or
   * first sniffed. A sniffed connection that is no HTTP is judged by the policies' TCP reading
   * (its connection was admitted on its mTLS mode alone) and relayed to the application with its
   * first bytes (through JS: they were read).
   */
  private async serveRead(state: PodState, client: Socket, reads: Reads, facts: Omit<ConnectionFacts, 'destination'>, path: 'same_node' | 'inbound' | 'hbone', labels: TcpLabels, source: Workload | undefined): Promise<ConnectionBytes | undefined> {
    if (reads !== 'sniff') return this.serveHttpIn(state, client, reads, facts, path, labels, source);
    const { protocol, head } = await sniff(client, SNIFF_DEADLINE_MS);
    this.metrics.sniffed.inc({ protocol });
    if (protocol !== 'opaque') return this.serveHttpIn(state, client, protocol, facts, path, labels, source, head);
    withHead(client, head, protocol);
    if (!this.judged(state, facts, path, this.policies.authorize({ ...facts, destination: state.pod }), undefined)) {
      // A TCP client is reset; a socket pair's end (HBONE, same node) is closed, and its other side with it.
      if (path === 'inbound') client.resetAndDestroy();
      else client.destroy();
      return;
    }
    const target = this.snapshot.serviceOf(state.pod.uid, facts.destinationPort);
    const upstream: Upstream = { path: 'inbound', netnsPath: state.pod.netnsPath, host: facts.destinationIp, port: facts.destinationPort, transparentSource: facts.sourceIp, labels: [labels] };
    await this.forward(state, client, 'inbound', upstream, target?.policy.connectTimeoutMs ?? this.options.connectTimeoutMs, target?.policy.idleTimeoutMs ?? this.options.idleTimeoutMs);
    return undefined;
  }

  /**
   * A socket pair whose one end is served as a connection into `state`'s pod that readsHttp says
   * to read; the other end (its fd) is the caller's to relay from the tunnel or the same-node source.
   */
  private readPair(state: PodState, reads: Reads, facts: Omit<ConnectionFacts, 'destination'>, path: 'same_node' | 'hbone', labels: TcpLabels, source: Workload | undefined): number {
    const [ours, theirs] = socketPair();
    const socket = this.podSocket(state, ours, true);
    socket.on('error', () => undefined);
    // Already counted against the limits: as the tunnel's stream, or as the source's connection.
    void this.serveRead(state, socket, reads, facts, path, labels, source).catch((e: unknown) => {
      log.warn({ pod: state.pod.name, namespace: state.pod.namespace, path, err: (e as Error).message }, 'connection into the pod failed');
      socket.destroy();
    });
    return theirs;
  }

  /**
   * A tunnelled connection into `state`'s pod whose port reads `protocol`, served by the addon's
   * engine on a channel (no socket pair between the engine and the HBONE stream): the channel's
   * side for the stream, or undefined when the engine is not there.
   */
  private serveChannel(state: PodState, protocol: 'http1' | 'http2', facts: Omit<ConnectionFacts, 'destination'>, labels: TcpLabels, source: Workload | undefined): ChannelRef | undefined {
    const served = this.httpIn.serveChannel(this.serverConnection(state, protocol, facts, 'hbone', labels, source), (fd) => this.podSocket(state, fd, true).on('error', () => undefined));
    if (!served) return undefined;
    // A pod that leaves resets its connections, this one as its sockets.
    const held = { destroy: () => served.close() };
    state.sockets.add(held);
    void served.done.finally(() => state.sockets.delete(held));
    return served.channel;
  }

  /**
   * The same-node fast path delivers straight into a local pod: that pod's policies apply here,
   * with the source's identity known first-hand (the node captured the connection in the source
   * pod's own cgroup; nothing crossed a network).
   */
  private admitLocal(state: PodState, upstream: Upstream): boolean {
    if (upstream.path !== 'same_node' || !upstream.local) return true;
    return this.authorize(upstream.local, { sourceIp: upstream.transparentSource ?? '', peer: this.workloadIdentity(state.pod), destinationIp: upstream.host, destinationPort: upstream.port }, 'same_node');
  }

  setSnapshot(snapshot: MeshSnapshot): void {
    this.snapshot = snapshot;
    this.policies = new PolicyEngine(snapshot.security);
    this.readsHttpCache = new Map();
    this.labelsGeneration++;
    this.httpIn.configChanged();
    this.http.routesChanged();
    this.lb.retain(snapshot.targets());
  }

  currentSnapshot(): MeshSnapshot {
    return this.snapshot;
  }

  /** Open connections the load balancer counts on an endpoint, and whether it is ejected. */
  endpointState(e: Endpoint): { activeConnections: number; ejected: boolean } {
    return { activeConnections: this.lb.activeConnections(e), ejected: this.lb.isEjected(e) };
  }

  activeConnections(uid: string): number {
    return this.pods.get(uid)?.open ?? 0;
  }

  /** Opens the pod's listeners and registers the inbound ones for sk_lookup. All or nothing. */
  async addPod(pod: ProxyPod): Promise<void> {
    const state: PodState = { pod, servers: [], listeners: [], sockets: new Set(), open: 0, connecting: 0, steered: [], configured: false, waiting: new Set(), tunnelServer: undefined, tunnelOpening: false };
    try {
      for (const host of ['127.0.0.1', '::1']) await this.serve(state, host, NM_PORT_OUTBOUND, 'outbound', (s, cookie) => this.outbound(state, s, cookie));
      // Bound to loopback, not the pod's address: sk_lookup hands the listener its connections
      // whatever address it is bound to, and nothing can dial podIP:15006 directly (which the
      // inbound side would deliver to podIP:15006 again, a loop).
      for (const [family, host, address] of [[4, '127.0.0.1', pod.ip4], [6, '::1', pod.ip6]] as const) {
        const fd = await this.serve(state, host, NM_PORT_INBOUND, 'inbound', (s) => this.inbound(state, s));
        // A single-stack pod has no address of the other family ("" here), though maybe a link-local one.
        if (address !== '') {
          this.datapath.registerInboundListener(family, address, fd);
          state.steered.push({ family, address, fd });
        }
        // Every other address of the pod (eth0's link-local one): steered too, never around the proxy.
        for (const other of this.datapath.podAddresses(pod.uid)) {
          if (other.family !== family || other.address === address) continue;
          this.datapath.registerInboundListener(family, other.address, fd);
          state.steered.push({ family, address: other.address, fd });
        }
      }
    } catch (e) {
      await this.closeState(state);
      throw e;
    }
    this.pods.set(pod.uid, state);
    this.labelsGeneration++;
    // A pod of this node may now be served in the same pass (what the engines route themselves leaves it out).
    this.http.routesChanged();
    await this.openTunnelServer(state);
  }

  /**
   * Whether the snapshot has the pod's complete config (the agent decides: with a control plane,
   * once a snapshot that covers the pod is applied). Until then no outbound connection of the pod
   * is routed, since a Service's route or the Service itself may still be missing: connections
   * wait for it, up to the connect timeout, and are then refused (`no_config`).
   */
  setConfigured(uid: string, configured: boolean): void {
    const state = this.pods.get(uid);
    if (!state || state.configured === configured) return;
    state.configured = configured;
    if (!configured) return;
    for (const resume of [...state.waiting]) resume();
  }

  async removePod(uid: string): Promise<void> {
    const state = this.pods.get(uid);
    if (!state) return;
    this.pods.delete(uid);
    this.labelsGeneration++;
    this.http.routesChanged();
    await this.closeState(state);
  }

  /**
   * Every listening socket the proxy holds in pods, by pod (the agent taking the node over gets
   * copies of them, see src/agent/handover.ts).
   */
  listeningSockets(): Array<{ readonly uid: string; readonly netnsPath: string; readonly listeners: ReadonlyArray<ListenerRef & { readonly fd: number }> }> {
    return [...this.pods.values()].map((state) => ({ uid: state.pod.uid, netnsPath: state.pod.netnsPath, listeners: [...state.listeners, ...(state.tunnelServer?.listeners() ?? [])] }));
  }

  /**
   * The node was handed over to another agent, which holds the same listening sockets and the
   * BPF map entries that point to them: this proxy stops accepting, keeps relaying what it holds,
   * and from now on never touches the maps (closing a pod leaves its sk_lookup entries alone).
   */
  stopListening(): void {
    this.handedOver = true;
    for (const state of this.pods.values()) {
      for (const server of state.servers) server.close();
      state.listeners.length = 0;
      state.tunnelServer?.stopListening();
    }
  }

  /** Writes every pod's sk_lookup entries again (idempotent: after a handover, in case the old agent dropped one as it went). */
  resteer(): void {
    for (const state of this.pods.values()) for (const { family, address, fd } of state.steered) this.datapath.registerInboundListener(family, address, fd);
  }

  /** Connections still relayed (a proxy that handed its node over drains them). */
  openConnections(): number {
    return this.open;
  }

  private handedOver = false;

  private async closeState(state: PodState): Promise<void> {
    for (const { family, address } of this.handedOver ? [] : state.steered) {
      try {
        this.datapath.unregisterInboundListener(family, address);
      } catch {
        // the entry goes away with its socket anyway
      }
    }
    for (const resume of [...state.waiting]) resume();
    this.tunnels?.closeSource(state.pod.uid);
    this.http.forgetPod(state.pod.uid);
    this.httpIn.forgetPod(state.pod.uid);
    await state.tunnelServer?.close();
    state.tunnelServer = undefined;
    for (const s of state.sockets) s.destroy();
    await Promise.all(state.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    releaseNetns(state.pod.netnsPath);
  }

  async close(): Promise<void> {
    for (const uid of [...this.pods.keys()]) await this.removePod(uid);
    this.http.close();
    this.httpIn.close();
    this.tunnels?.close();
    if (this.options.kernelRelay) relayAbortAll();
    // Streams of the addon's tunnels still relaying end with their tunnels.
    if (this.tunnels instanceof NativeTunnelPool) hboneAbortAll();
  }

  /**
   * Serves one in-pod listener. Every accepted connection is owned here from accept to its end:
   * it counts against the node's and the pod's connection limits (refused with
   * `connection_limit` beyond them, before any fd more is spent on it), and whatever fails while
   * it is handled (an EMFILE from dup(), a bug) resets the client and is counted, never an
   * unhandled rejection that takes the node's proxy down.
   */
  private async serve(state: PodState, host: string, port: number, direction: 'outbound' | 'inbound', onConnection: (s: Socket, cookie: bigint) => Promise<void>): Promise<number> {
    const listener = await listenInPod(state.pod.netnsPath, host, port, (s, cookie) => {
      s.on('error', () => undefined);
      const limit = this.connectionLimits();
      if (this.open >= limit.node || state.open >= limit.pod) {
        this.refuse(state, s, direction, 'connection_limit', { open: this.open, podOpen: state.open, limit });
        return;
      }
      this.open++;
      state.open++;
      state.sockets.add(s);
      s.once('close', () => state.sockets.delete(s));
      onConnection(s, cookie)
        .catch((e: unknown) => {
          const err = e as NodeJS.ErrnoException & { context?: { errnoCode?: string } };
          const fdExhausted = (err.context?.errnoCode ?? err.code) === 'EMFILE' || (err.context?.errnoCode ?? err.code) === 'ENFILE';
          this.refuse(state, s, direction, fdExhausted ? 'fd_exhausted' : 'internal_error', { err: err.message });
        })
        .finally(() => {
          this.open--;
          state.open--;
        });
    });
    // For the listener's lifetime: an accept that fails (EMFILE) is logged and counted; the
    // listener keeps serving (libuv drops the connection it could not accept).
    listener.server.on('error', (e: NodeJS.ErrnoException) => {
      this.metrics.acceptErrors.inc({ code: e.code ?? 'unknown' });
      log.warn({ pod: state.pod.name, namespace: state.pod.namespace, listener: formatHostPort(host, port), err: e.message }, 'accept failed');
    });
    state.servers.push(listener.server);
    state.listeners.push({ host, port, fd: listener.fd });
    return listener.fd;
  }

  /**
   * How many connections may be open: node-wide below RLIMIT_NOFILE (each one holds up to
   * FDS_PER_CONNECTION fds; the pods' listeners and netns fds and the agent's own are kept
   * aside), and per pod a share of that, so one pod cannot take the node's.
   */
  private connectionLimits(): { node: number; pod: number } {
    const spare = this.options.fdLimit - FDS_RESERVED - FDS_PER_POD * this.pods.size;
    const node = Math.max(0, Math.min(this.options.maxConnections ?? Infinity, Math.floor(spare / FDS_PER_CONNECTION)));
    return { node, pod: Math.min(node, this.options.maxConnectionsPerPod ?? Math.ceil(node / 2)) };
  }

  /**
   * A tunnelled side (an HTTP/2 stream, either end): with the addon's engine the stream and the
   * socket are joined on its thread; a node:http2 stream is relayed through JS streams. Socket to
   * socket goes to relay().
   */
  private async relayConnected(state: PodState, client: RelaySide | NativeTunnelStream, connected: Connected, idleTimeoutMs: number): Promise<RelayResult> {
    // The addon's engine: the stream and the socket meet on its thread.
    if (client instanceof NativeTunnelStream) {
      if (!('fd' in connected)) throw new Error('a native tunnel stream is delivered to a socket');
      return client.attach(connected.fd, idleTimeoutMs);
    }
    if ('native' in connected) {
      if (!(client instanceof Socket)) throw new Error('a native tunnel stream is relayed from a socket');
      const clientFd = socketFd(client);
      if (clientFd === undefined) {
        connected.native.cancel();
        throw new Error('the client socket has no fd');
      }
      // Bytes already read into JS (a sniffed connection's first ones) go first, from the engine.
      const held = client.readableLength > 0 ? ((client.read() as Buffer | null) ?? undefined) : undefined;
      return connected.native.attach(takeFd(client, clientFd, () => connected.native.cancel()), idleTimeoutMs, held);
    }
    // Bytes already read into JS would be skipped by a relay that takes the client's fd: through
    // JS then (node's own HBONE engine).
    if (client instanceof Socket && client.readableLength > 0 && !('fd' in connected)) return relay(client, this.socketOf(state, connected, idleTimeoutMs), idleTimeoutMs);
    if ('stream' in connected) return relayStreams(client, connected.stream, idleTimeoutMs);
    if (!(client instanceof Socket)) return relayStreams(client, this.podSocket(state, connected.fd, true), idleTimeoutMs);
    return this.relay(state, client, connected.fd, idleTimeoutMs);
  }

  /**
   * Copies bytes both ways until both directions end. In the kernel (splice on the addon's relay
   * thread) when the accepted socket's fd is reachable, which it is for TCP on Linux; through JS
   * streams otherwise.
   */
  private async relay(state: PodState, client: Socket, upstreamFd: number, idleTimeoutMs: number): Promise<RelayResult> {
    const clientFd = socketFd(client);
    if (clientFd !== undefined && this.options.kernelRelay) {
      // Bytes already read into JS (a sniffed connection's first ones) would be skipped by the
      // kernel: written to the upstream first (a new connection takes them at once; if it would
      // not, through JS).
      const held = client.readableLength > 0 ? ((client.read() as Buffer | null) ?? undefined) : undefined;
      const sent = held ? writeNow(upstreamFd, held) : 0;
      if (!held || sent === held.length) {
        const result = await relayFds(takeFd(client, clientFd, () => closeFd(upstreamFd)), upstreamFd, idleTimeoutMs);
        return { ...result, bytesFromClient: result.bytesFromClient + sent };
      }
      client.unshift(held.subarray(sent));
      const result = await relay(client, this.podSocket(state, upstreamFd, true), idleTimeoutMs);
      return { ...result, bytesFromClient: result.bytesFromClient + sent };
    }
    return relay(client, this.podSocket(state, upstreamFd, true), idleTimeoutMs);
  }

  private refuse(state: PodState, client: Socket, direction: 'outbound' | 'inbound', reason: RefuseReason, detail: Record<string, unknown>): void {
    this.metrics.refused.inc({ direction, reason });
    log.warn({ pod: state.pod.name, namespace: state.pod.namespace, direction, reason, ...detail }, 'connection refused');
    client.resetAndDestroy();
  }

  private async outbound(state: PodState, client: Socket, cookie: bigint): Promise<void> {
    const family: Family = client.remoteFamily === 'IPv6' ? 6 : 4;
    const original = this.datapath.originalDestination({ netnsCookie: cookie, port: client.remotePort ?? 0, family });
    if (!original) {
      this.refuse(state, client, 'outbound', 'no_original_destination', { peerPort: client.remotePort });
      return;
    }
    const probe = this.options.probe;
    if (original.address === probe.address && original.port === probe.port) {
      client.destroy();
      this.options.onProbe(state.pod.uid);
      return;
    }
    if (!state.configured) {
      this.metrics.heldForConfig.inc();
      const ok = await this.whenConfigured(state, client);
      if (client.destroyed) return;
      if (!ok) {
        this.refuse(state, client, 'outbound', 'no_config', { original: formatHostPort(original.address, original.port), waitedMs: this.options.connectTimeoutMs });
        return;
      }
    }
    await this.route(state, client, original);
  }

  /** Resolves true once the pod's config is here, false after the connect timeout (or if the client left, or the pod). */
  private whenConfigured(state: PodState, client: Socket): Promise<boolean> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        state.waiting.delete(done);
        client.off('close', done);
        resolve(state.configured && this.pods.get(state.pod.uid) === state);
      };
      const timer = setTimeout(done, this.options.connectTimeoutMs);
      state.waiting.add(done);
      client.once('close', done);
    });
  }

  /** An outbound connection of a configured pod: to a Service, or passed through. */
  private async route(state: PodState, client: Socket, original: SocketAddress): Promise<void> {
    const snapshot = this.snapshot;
    const target = snapshot.service(original);
    // A Service not exported to the caller's namespace is not the caller's to see: to it, the
    // address is one like any other (Istio's exportTo), whatever else this node serves.
    if (target && exportedTo(target.service, state.pod.namespace)) {
      await this.toService(state, client, original, target);
      return;
    }
    if (this.options.passthrough === 'deny') {
      this.refuse(state, client, 'outbound', 'passthrough_denied', { original: formatHostPort(original.address, original.port) });
      return;
    }
    // A link-local destination is only reachable through an interface: the pod's own (capture
    // keeps no scope; the pod's interface with a link-local address is the one it can mean).
    const host = isLinkLocal(original.address) ? this.scoped(state, original.address) : original.address;
    const upstream = this.upstreamTo(state, snapshot.workload(original.address), host, original.port, serviceLabels(undefined, 'outbound'));
    if (!this.admitLocal(state, upstream)) {
      client.resetAndDestroy();
      return;
    }
    await this.forward(state, client, 'outbound', upstream, this.options.connectTimeoutMs, this.options.idleTimeoutMs);
  }

  /** "fe80::1%<ifindex>" with the index of the pod's interface that has a link-local address. */
  private scoped(state: PodState, address: string): string {
    const own = this.datapath.podAddresses(state.pod.uid).find((a) => a.family === 6 && isLinkLocal(a.address));
    return own ? `${address}%${own.ifindex}` : address;
  }

  /** One connect attempt, then the relay; a failed connect refuses the client. */
  private async forward(state: PodState, client: Socket, direction: 'outbound' | 'inbound', upstream: Upstream, connectTimeoutMs: number, idleTimeoutMs: number): Promise<void> {
    let connected: Connected;
    try {
      connected = await this.connect(state, upstream, connectTimeoutMs, client);
    } catch (e) {
      const reason = e instanceof ConnectLimitReached ? 'connect_limit' : e instanceof TunnelFailed ? 'tunnel_failed' : 'upstream_connect_failed';
      this.refuse(state, client, direction, reason, { upstream: formatHostPort(upstream.host, upstream.port), err: (e as Error).message });
      return;
    }
    await this.relayAndCount(state, client, connected, upstream, idleTimeoutMs);
  }

  /**
   * A connection to a Service: within its connection limit, to an endpoint the load balancer
   * picks; a failed connect counts against that endpoint's health and is tried once more on
   * another endpoint before the client is refused.
   */
  private async toService(state: PodState, client: Socket, original: SocketAddress, routed: ServiceTarget): Promise<void> {
    // A routed Service: this connection goes to one backend Service by weight, and from there
    // on it is that Service's connection (its policy, endpoints and metric labels).
    let target = routed;
    if (routed.http) {
      const conn = this.httpConnection(state, client, original, routed);
      if (portProtocol(routed.port) !== 'unknown') {
        await this.http.serve(client, conn);
        return;
      }
      // The port says no protocol: the client's first bytes decide. HTTP is routed per request;
      // anything else cannot be, and goes to the Service's own endpoints (Istio's TCP default).
      const { protocol, head } = await sniff(client, SNIFF_DEADLINE_MS);
      this.metrics.sniffed.inc({ protocol });
      if (protocol !== 'opaque') {
        await this.http.serve(client, conn, { protocol, head });
        return;
      }
      withHead(client, head, protocol);
      target = { ...routed, http: undefined };
    }
    if (routed.split) {
      const backend = this.lb.pickBackend(routed);
      if (!backend) {
        this.refuse(state, client, 'outbound', 'no_endpoints', { service: routed.key, route: routed.route, original: formatHostPort(original.address, original.port) });
        return;
      }
      target = backend;
    }
    const policy = target.policy;
    const service = serviceLabels(target.service, 'outbound');
    if (!this.lb.hasCapacity(target)) {
      this.refuse(state, client, 'outbound', 'overflow', { service: target.key, maxConnections: policy.maxConnections });
      return;
    }
    const attempts = Math.min(2, target.endpoints.length);
    let avoid: Endpoint | undefined;
    // Consistent hashing on the source (loadBalancer.consistentHash.useSourceIp) works per
    // connection too; header and cookie keys need the request (HTTP ports go through HttpOutbound).
    const hashKey = target.policy.hashOn && 'sourceIp' in target.policy.hashOn ? state.pod.ip4 || state.pod.ip6 : undefined;
    for (let attempt = 1; ; attempt++) {
      const endpoint = this.lb.pick(target, avoid, hashKey);
      if (!endpoint) {
        this.refuse(state, client, 'outbound', 'no_endpoints', { service: target.key, original: formatHostPort(original.address, original.port) });
        return;
      }
      // The same family as the client's connection when the endpoint has it, else the other one
      // (the proxy terminates the client's connection; upstream it may use either).
      const host = (original.family === 6 ? endpoint.workload.ip6 : endpoint.workload.ip4) || endpoint.workload.ip4 || endpoint.workload.ip6;
      const upstream = this.upstreamTo(state, endpoint.workload, host, endpoint.port, service);
      // Refused by the destination: the client's answer, not a fault of the endpoint.
      if (!this.admitLocal(state, upstream)) {
        client.resetAndDestroy();
        return;
      }
      const read = this.readHere(state, upstream);
      this.lb.acquire(target, endpoint);
      try {
        // A pod of this node whose side reads the port as HTTP (and says so: no sniffing): that
        // side serves the client's own connection, with no relay and no socket pair between.
        if (read && read.reads !== 'sniff') {
          await this.serveHere(state, client, upstream, read, read.reads);
          return;
        }
        let connected: Connected;
        try {
          connected = await this.connect(state, upstream, policy.connectTimeoutMs ?? this.options.connectTimeoutMs, client);
        } catch (e) {
          // Too many connects in flight here says nothing of the endpoint's health.
          if (e instanceof ConnectLimitReached) {
            this.refuse(state, client, 'outbound', 'connect_limit', { service: target.key, err: e.message });
            return;
          }
          if (this.lb.connectFailed(target, endpoint)) {
            this.metrics.ejections.inc({ service: target.key });
            log.warn({ service: target.key, endpoint: `${endpoint.workload.namespace}/${endpoint.workload.name}`, port: endpoint.port }, 'endpoint ejected after consecutive connect errors');
          }
          if (attempt < attempts && !client.destroyed) {
            this.metrics.connectRetries.inc({ service: target.key });
            avoid = endpoint;
            continue;
          }
          this.refuse(state, client, 'outbound', 'upstream_connect_failed', { service: target.key, upstream: formatHostPort(host, endpoint.port), attempts: attempt, err: (e as Error).message });
          return;
        }
        this.lb.connectSucceeded(endpoint);
        await this.relayAndCount(state, client, connected, upstream, policy.idleTimeoutMs ?? this.options.idleTimeoutMs);
        return;
      } finally {
        this.lb.release(target, endpoint);
      }
    }
  }

  /**
   * What the HTTP side needs for one client connection of `state`'s pod: how to open a connection
   * to an endpoint (as toService would, policy of a same-node destination included) and the
   * metric labels of a request to it.
   */
  private httpConnection(state: PodState, client: Socket, original: SocketAddress, parent: ServiceTarget): HttpClientConnection {
    const hostOf = (endpoint: Endpoint): string => (original.family === 6 ? endpoint.workload.ip6 : endpoint.workload.ip4) || endpoint.workload.ip4 || endpoint.workload.ip6;
    const upstreamOf = (target: ServiceTarget, endpoint: Endpoint): Upstream => this.upstreamTo(state, endpoint.workload, hostOf(endpoint), endpoint.port, serviceLabels(target.service, 'outbound'));
    // The destination's policy on this node judges the connection (admitLocal).
    const admitted = (upstream: Upstream, endpoint: Endpoint): Upstream => {
      if (!this.admitLocal(state, upstream)) throw new UpstreamDenied(`the policy of ${endpoint.workload.namespace}/${endpoint.workload.name} refused the connection`);
      return upstream;
    };
    const dial = async (target: ServiceTarget, endpoint: Endpoint): Promise<Connected> => {
      const upstream = admitted(upstreamOf(target, endpoint), endpoint);
      const connected = await this.connect(state, upstream, target.policy.connectTimeoutMs ?? this.options.connectTimeoutMs, client);
      this.metrics.proxied.inc({ path: upstream.path });
      return connected;
    };
    // This connection's requests to a pod of this node, served in one pass, by target and endpoint.
    let servedMade: { generation: number; byTarget: WeakMap<ServiceTarget, WeakMap<Endpoint, HttpServerConnection>> } = { generation: this.labelsGeneration, byTarget: new WeakMap() };
    // Each request's metric labels, by target and endpoint, while labelsGeneration stays.
    let labelsMade: { generation: number; byTarget: WeakMap<ServiceTarget, Map<Endpoint | typeof NO_ENDPOINT, TcpLabels>> } = { generation: this.labelsGeneration, byTarget: new WeakMap() };
    return {
      parent,
      current: this.perSnapshot((snapshot) => {
        const now = snapshot.service(original);
        return now && exportedTo(now.service, state.pod.namespace) ? now : undefined;
      }),
      source: state.pod,
      dial: async (target, endpoint) => this.socketOf(state, await dial(target, endpoint), target.policy.idleTimeoutMs ?? this.options.idleTimeoutMs),
      dialFd: async (target, endpoint) => this.fdOf(state, await dial(target, endpoint), target.policy.idleTimeoutMs ?? this.options.idleTimeoutMs),
      dialEngine: async (target, endpoint) => this.engineUpstreamOf(state, await dial(target, endpoint), target.policy.idleTimeoutMs ?? this.options.idleTimeoutMs),
      servesHere: (endpoint, protocol) => this.readsHere(endpoint, protocol),
      localServer: (target, endpoint, protocol) => {
        // A pod of this node whose port its side reads as `protocol`: that side is served here, in
        // the same pass, with the source's identity known first-hand (as connect() would hand it
        // a socket pair, judged by admitLocal). Judged once per target and endpoint on this
        // connection while labelsGeneration stays (a policy change bumps it), as a connection is.
        if (!this.readsHere(endpoint, protocol)) return undefined;
        if (servedMade.generation !== this.labelsGeneration) servedMade = { generation: this.labelsGeneration, byTarget: new WeakMap() };
        let byEndpoint = servedMade.byTarget.get(target);
        if (!byEndpoint) servedMade.byTarget.set(target, (byEndpoint = new WeakMap()));
        const known = byEndpoint.get(endpoint);
        if (known) return known;
        const u = upstreamOf(target, endpoint);
        const read = this.readHere(state, u);
        if (read?.reads !== protocol) return undefined;
        admitted(u, endpoint);
        const server = this.serverConnection(read.local, protocol, read.facts, 'same_node', read.labels, state.pod);
        byEndpoint.set(endpoint, server);
        return server;
      },
      labels: (target, endpoint) => {
        if (labelsMade.generation !== this.labelsGeneration) labelsMade = { generation: this.labelsGeneration, byTarget: new WeakMap() };
        let byEndpoint = labelsMade.byTarget.get(target);
        if (!byEndpoint) labelsMade.byTarget.set(target, (byEndpoint = new Map()));
        const key = endpoint ?? NO_ENDPOINT;
        let labels = byEndpoint.get(key);
        if (!labels) {
          const service = serviceLabels(target.service, 'outbound');
          labels = !endpoint
            ? { reporter: 'source', ...this.sourceLabels(state.pod), ...service, ...this.destinationLabels(undefined) }
            : (this.upstreamTo(state, endpoint.workload, hostOf(endpoint), endpoint.port, service).labels[0] ?? { reporter: 'source', ...this.sourceLabels(state.pod), ...service, ...this.destinationLabels(endpoint.workload) });
          byEndpoint.set(key, labels);
        }
        return labels;
      },
    };
  }

  /**
   * A connected upstream as a node:net socket (what node:http reads and writes): a socket's fd as
   * it is; a tunnel stream joined to one end of a socket pair (relayed on the addon's thread, or
   * through JS streams for node:http2's), whose other end node:net takes.
   */
  private socketOf(state: PodState, connected: Connected, idleTimeoutMs: number): Socket {
    // No Nagle on the upstream side either (see HttpOutbound.serve); a no-op on a socket pair.
    if ('fd' in connected) return this.podSocket(state, connected.fd, false).setNoDelay(true);
    return this.podSocket(state, this.fdOf(state, connected, idleTimeoutMs), false);
  }

  /** A connected upstream as an fd the caller owns: a socket's as it is, a tunnel stream's joined to a socket pair's other end. */
  private fdOf(state: PodState, connected: Connected, idleTimeoutMs: number): number {
    if ('fd' in connected) return connected.fd;
    let pair: [number, number];
    try {
      pair = socketPair();
    } catch (e) {
      if ('native' in connected) connected.native.cancel();
      else connected.stream.close(h2constants.NGHTTP2_CANCEL);
      throw e;
    }
    const [ours, tunnelSide] = pair;
    if ('native' in connected) void connected.native.attach(tunnelSide, idleTimeoutMs);
    else void relayStreams(this.podSocket(state, tunnelSide, true), connected.stream, idleTimeoutMs);
    return ours;
  }

  /**
   * A connected upstream for the addon's HTTP engines: a native tunnel's stream is joined to it
   * in memory (a channel; the engine and the stream share the JS thread's loop), anything else as fdOf.
   */
  private engineUpstreamOf(state: PodState, connected: Connected, idleTimeoutMs: number): EngineUpstream {
    if (!('native' in connected)) return this.fdOf(state, connected, idleTimeoutMs);
    const channel = channelNew();
    void connected.native.attach(channel, idleTimeoutMs);
    return channel;
  }

  /** A node:net socket on `fd`, held by the pod's state until it closes (a pod that leaves ends it). */
  private podSocket(state: PodState, fd: number, allowHalfOpen: boolean): Socket {
    const s = new Socket({ fd, readable: true, writable: true, allowHalfOpen });
    state.sockets.add(s);
    s.once('close', () => state.sockets.delete(s));
    return s;
  }

  /**
   * Where an outbound connection goes and how it is reported. Same-node fast path: a destination
   * pod served by this proxy too gets the connection straight from the outbound side (as its
   * inbound side would, with the client's address), skipping the second hop; both sides' metrics
   * are still reported, as the two proxies of two nodes would.
   */
  private upstreamTo(
    state: PodState,
    destination: Workload | undefined,
    host: string,
    port: number,
    service: ServiceLabels,
  ): Upstream {
    const labels: TcpLabels = { reporter: 'source', ...this.sourceLabels(state.pod), ...service, ...this.destinationLabels(destination) };
    const local = destination ? this.pods.get(destination.uid) : undefined;
    if (local) {
      // The source pod's address of the family the upstream connection uses.
      const transparentSource = host.includes(':') ? state.pod.ip6 : state.pod.ip4;
      // Both identities are known to this node first-hand and policy applies as for mTLS
      // (PeerAuthentication STRICT admits it): reported as mutual_tls, as the HBONE path is.
      const secured = { ...labels, connection_security_policy: 'mutual_tls' };
      return { path: 'same_node', netnsPath: local.pod.netnsPath, host, port, transparentSource, local, labels: [secured, { ...secured, reporter: 'destination' }] };
    }
    // A meshed pod of another node: through an HBONE tunnel to it, mutual TLS with both
    // identities; unless the destination's PeerAuthentication disables mTLS on that port.
    if (destination?.tunnel === 'hbone' && this.tunnels && !isLinkLocal(host) && this.policies.mtlsMode(destination, port).mode !== 'DISABLE') {
      return { path: 'hbone', netnsPath: state.pod.netnsPath, host, port, destinationIdentity: this.identityOf(destination), labels: [{ ...labels, connection_security_policy: 'mutual_tls' }] };
    }
    return { path: 'outbound', netnsPath: state.pod.netnsPath, host, port, labels: [labels] };
  }

  private async inbound(state: PodState, client: Socket): Promise<void> {
    const host = socketAddress(client, 'local');
    const port = client.localPort ?? 0;
    // Steered connections keep the address and port their client dialed. One that names the
    // listener itself (127.0.0.1:15006 from inside the pod) or another proxy port was not
    // steered: delivering it would connect to the proxy again.
    if (NM_PROXY_PORTS.has(port) || isLoopback(host)) {
      this.refuse(state, client, 'inbound', 'proxy_port', { local: formatHostPort(host, port) });
      return;
    }
    // A link-local destination (eth0's fe80::): captured so that it never reaches the application
    // around the proxy, but not delivered (that needs the interface's scope): refused.
    if (host === SCOPED || isLinkLocal(host)) {
      this.refuse(state, client, 'inbound', 'link_local', { local: formatHostPort(host, port) });
      return;
    }
    const from = socketAddress(client, 'remote');
    const source = this.snapshot.workload(from);
    const target = this.snapshot.serviceOf(state.pod.uid, port);
    const labels: TcpLabels = {
      reporter: 'destination',
      ...this.sourceLabels(source),
      // Plaintext proves no identity: the address may name a workload, never its principal.
      source_principal: 'unknown',
      ...serviceLabels(target?.service, 'inbound'),
      ...this.destinationLabels(state.pod),
    };
    const facts = { sourceIp: from, peer: undefined, destinationIp: host, destinationPort: port };
    if (!this.authorize(state, facts, 'inbound')) {
      client.resetAndDestroy();
      return;
    }
    const reads = this.readsHttp(state, port);
    if (reads !== undefined) {
      this.metrics.proxied.inc({ path: 'inbound' });
      await this.serveRead(state, client, reads, facts, 'inbound', labels, source);
      return;
    }
    // Delivered from a transparent socket with the client's address, so the application sees
    // who called (see datapath/pod-routing.ts for how the replies come back).
    const upstream: Upstream = { path: 'inbound', netnsPath: state.pod.netnsPath, host, port, transparentSource: from, labels: [labels] };
    await this.forward(state, client, 'inbound', upstream, target?.policy.connectTimeoutMs ?? this.options.connectTimeoutMs, target?.policy.idleTimeoutMs ?? this.options.idleTimeoutMs);
  }

  /**
   * A CONNECT that passed the tunnel's checks: delivered to the application from a transparent
   * socket with the client pod's address (the tunnel's TCP peer), answered 200 once connected,
   * 503 when the application cannot be reached or the node is at its connection limits. The
   * source is who its certificate says, whatever its address claims.
   */
  private async inboundTunnel(state: PodState, request: TunnelRequest | NativeTunnelRequest): Promise<void> {
    const { stream, peer, source, target } = request;
    const limit = this.connectionLimits();
    if (this.open >= limit.node || state.open >= limit.pod) {
      this.metrics.refused.inc({ direction: 'inbound', reason: 'connection_limit' });
      answer(stream, 503);
      return;
    }
    this.open++;
    state.open++;
    try {
      const byAddress = this.snapshot.workload(source.address);
      const principalUri = spiffeUri(peer);
      // The address's workload names the source only if it is the identity that authenticated.
      const sourceWorkload = byAddress && byAddress.namespace === peer.namespace && byAddress.serviceAccount === peer.serviceAccount ? byAddress : undefined;
      const serviceTarget = this.snapshot.serviceOf(state.pod.uid, target.port);
      const labels: TcpLabels = {
        reporter: 'destination',
        ...this.sourceLabels(sourceWorkload),
        source_workload_namespace: peer.namespace,
        source_principal: principalUri,
        ...serviceLabels(serviceTarget?.service, 'inbound'),
        ...this.destinationLabels(state.pod),
        connection_security_policy: 'mutual_tls',
      };
      const facts = { sourceIp: source.address, peer, destinationIp: target.host, destinationPort: target.port };
      if (!this.authorize(state, facts, 'hbone')) {
        answer(stream, 401);
        return;
      }
      const reads = this.readsHttp(state, target.port);
      if (reads !== undefined) {
        this.metrics.proxied.inc({ path: 'inbound' });
        const idle = serviceTarget?.policy.idleTimeoutMs ?? this.options.idleTimeoutMs;
        if (stream instanceof NativeTunnelStream) {
          // HTTP/1.1 or HTTP/2 on the addon's engines: the stream joined to it in memory; else (a
          // port to sniff) a socket pair.
          const joined = reads !== 'sniff' ? this.serveChannel(state, reads, facts, labels, sourceWorkload) : undefined;
          await stream.attach(joined ?? this.readPair(state, reads, facts, 'hbone', labels, sourceWorkload), idle);
          return;
        }
        const tunnelSide = this.readPair(state, reads, facts, 'hbone', labels, sourceWorkload);
        stream.respond({ ':status': 200 });
        await relayStreams(this.podSocket(state, tunnelSide, true), stream, idle);
        return;
      }
      const upstream: Upstream = { path: 'inbound', netnsPath: state.pod.netnsPath, host: target.host, port: target.port, transparentSource: source.address, labels: [labels] };
      let connected: Connected;
      try {
        connected = await this.connect(state, upstream, serviceTarget?.policy.connectTimeoutMs ?? this.options.connectTimeoutMs);
      } catch (e) {
        this.metrics.refused.inc({ direction: 'inbound', reason: e instanceof ConnectLimitReached ? 'connect_limit' : 'upstream_connect_failed' });
        log.warn({ pod: state.pod.name, namespace: state.pod.namespace, source: principalUri, upstream: formatHostPort(target.host, target.port), err: (e as Error).message }, 'tunnelled connection refused');
        answer(stream, 503);
        return;
      }
      if (!(stream instanceof NativeTunnelStream)) {
        if (stream.destroyed) {
          if ('fd' in connected) closeFd(connected.fd);
          return;
        }
        stream.respond({ ':status': 200 });
      }
      await this.relayAndCount(state, stream, connected, upstream, serviceTarget?.policy.idleTimeoutMs ?? this.options.idleTimeoutMs);
    } finally {
      this.open--;
      state.open--;
    }
  }

  private sourceLabels(w: Workload | undefined): Pick<TcpLabels, 'source_workload' | 'source_workload_namespace' | 'source_principal' | 'source_version'> {
    const { name, namespace, version } = workloadLabels(w);
    return { source_workload: name, source_workload_namespace: namespace, source_principal: principal(this.options.trustDomain(), w), source_version: version };
  }

  private destinationLabels(
    w: Workload | undefined,
  ): Pick<TcpLabels, 'destination_workload' | 'destination_workload_namespace' | 'destination_principal' | 'destination_version' | 'request_protocol' | 'response_flags' | 'connection_security_policy'> {
    const { name, namespace, version } = workloadLabels(w);
    return {
      destination_workload: name,
      destination_workload_namespace: namespace,
      destination_principal: principal(this.options.trustDomain(), w),
      destination_version: version,
      request_protocol: 'tcp',
      response_flags: '-',
      connection_security_policy: 'none',
    };
  }

  /**
   * Connects to the upstream from inside a pod's netns. With transparentSource the socket carries
   * the client's address (inbound delivery); otherwise the proxy's mark.
   */
  private async connect(state: PodState, u: Upstream, timeoutMs: number, client?: Socket): Promise<Connected> {
    // Connects in flight are bounded per pod and per node: a pod dialling a black hole gets its
    // excess refused instead of piling up sockets and timers for everyone.
    if (state.connecting >= MAX_CONNECTING_PER_POD || this.connecting >= MAX_CONNECTING) {
      throw new ConnectLimitReached(`${state.connecting} connects in flight for the pod, ${this.connecting} on the node (at most ${MAX_CONNECTING_PER_POD} and ${MAX_CONNECTING})`);
    }
    // The same-node fast path into a port read as HTTP: the destination's side serves one end of a
    // socket pair, with the source's identity known first-hand (as admitLocal judged it).
    const read = this.readHere(state, u);
    if (read) return { fd: this.readPair(read.local, read.reads, read.facts, 'same_node', read.labels, state.pod) };
    const how = u.transparentSource
      ? { mark: NM_DELIVERY_MARK, localHost: u.transparentSource, transparent: true, bypassMapFd: this.datapath.inboundBypassFd }
      : { mark: NM_PROXY_MARK };
    state.connecting++;
    this.connecting++;
    try {
      if (u.path === 'hbone' && this.tunnels && u.destinationIdentity) {
        const opened = await this.tunnels.open({
          source: { uid: state.pod.uid, netnsPath: state.pod.netnsPath, identity: this.identityOf(state.pod) },
          destination: { address: u.host, identity: u.destinationIdentity },
          port: u.port,
          client: { address: (client?.remoteAddress ?? '').replace(/^::ffff:/, ''), port: client?.remotePort ?? 0 },
          connectTimeoutMs: timeoutMs,
        });
        return opened instanceof NativeTunnelStream ? { native: opened } : { stream: opened };
      }
      return { fd: await connectInNetns({ netns: u.netnsPath, host: u.host, port: u.port, timeoutMs, ...how }) };
    } finally {
      state.connecting--;
      this.connecting--;
    }
  }

  /**
   * A same-node upstream into a port its pod's side reads as HTTP (readsHttp): that pod, how it
   * reads, and the connection's facts and destination labels as that side sees them (the source's
   * identity known first-hand). Undefined for any other upstream.
   */
  private readHere(state: PodState, u: Upstream): { local: PodState; reads: Reads; facts: Omit<ConnectionFacts, 'destination'>; labels: TcpLabels } | undefined {
    const reads = u.path === 'same_node' && u.local ? this.readsHttp(u.local, u.port) : undefined;
    if (!u.local || reads === undefined) return undefined;
    const labels = u.labels.find((l) => l.reporter === 'destination') ?? u.labels[0];
    if (!labels) throw new Error('a same-node upstream has its destination labels');
    return { local: u.local, reads, facts: { sourceIp: u.transparentSource ?? '', peer: this.workloadIdentity(state.pod), destinationIp: u.host, destinationPort: u.port }, labels };
  }

  /**
   * The same-node connection served by the destination's side directly (readHere): reported as
   * relayAndCount reports a relayed one, under each of its labels, with the bytes the serving
   * engine (or node:net) moved on the client's socket. The socket is the destination pod's too
   * while it lasts: it is cut when that pod leaves, as a relayed one is.
   */
  private async serveHere(state: PodState, client: Socket, u: Upstream, read: NonNullable<ReturnType<NodeProxy['readHere']>>, protocol: 'http1' | 'http2'): Promise<void> {
    this.countOpened(u);
    read.local.sockets.add(client);
    let bytes: ConnectionBytes = NO_BYTES;
    try {
      bytes = await this.serveHttpIn(read.local, client, protocol, read.facts, 'same_node', read.labels, state.pod);
    } finally {
      read.local.sockets.delete(client);
      this.countClosed(u, bytes.read, bytes.written);
    }
  }

  /** A connection to `u` began: counted by path and under each of its labels. */
  private countOpened(u: Upstream): void {
    this.metrics.proxied.inc({ path: u.path });
    for (const l of u.labels) this.metrics.tcpOpened.inc(l);
  }

  /** A connection to `u` ended, with the bytes from and to its client, under each of its labels. */
  private countClosed(u: Upstream, fromClient: number, toClient: number): void {
    for (const l of u.labels) {
      this.metrics.tcpClosed.inc(l);
      this.metrics.tcpReceived.inc(l, fromClient);
      this.metrics.tcpSent.inc(l, toClient);
    }
  }

  /** Relays a connected upstream fd and reports the connection under each of its labels. */
  private async relayAndCount(state: PodState, client: RelaySide | NativeTunnelStream, connected: Connected, u: Upstream, idleTimeoutMs: number): Promise<void> {
    // The client went away (or the pod left the mesh) while we were connecting.
    if (('destroyed' in client && client.destroyed) || !this.pods.has(state.pod.uid)) {
      if ('fd' in connected) closeFd(connected.fd);
      else if ('native' in connected) connected.native.cancel();
      else connected.stream.close(h2constants.NGHTTP2_CANCEL);
      if (client instanceof NativeTunnelStream) client.answer(503);
      return;
    }
    this.countOpened(u);
    const result = await this.relayConnected(state, client, connected, idleTimeoutMs);
    if (result.reason) this.metrics.relayEnds.inc({ reason: result.reason });
    this.countClosed(u, result.bytesFromClient, result.bytesToClient);
  }
}
