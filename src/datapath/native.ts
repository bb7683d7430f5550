/**
 * The one typed view of the native addon (native/). Nothing else in nodemesh loads the .node
 * file. Errors from the addon carry code/errno/syscall/path and are rethrown as NodemeshError
 * NM_ERR_DATAPATH (NM_ERR_BPF_LOAD for a refused object) with that context kept.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { getSystemErrorMap } from 'node:util';

import { NodemeshError, isSystemError, type ErrorCode } from '../shared/errors.js';
import { NATIVE_ADDON_PATH } from '../shared/paths.js';
import { formatHostPort } from '../shared/address.js';

export interface ProgramInfo {
  readonly name: string;
  readonly section: string;
  readonly fd: number;
}

export interface MapInfo {
  readonly name: string;
  readonly fd: number;
  readonly type: number;
  readonly keySize: number;
  readonly valueSize: number;
  readonly maxEntries: number;
  readonly pinPath?: string;
}

export interface StructLayout {
  readonly size: number;
  readonly offsets: Readonly<Record<string, number>>;
}

export interface AbiLayout {
  readonly nm_addr: StructLayout;
  readonly nm_orig_key: StructLayout;
  readonly nm_listener_key: StructLayout;
  readonly nm_bypass_key: StructLayout;
  readonly constants: Readonly<Record<string, number>>;
}

interface RawLink {
  fd(): number;
  pin(path: string): void;
  unpin(): void;
  detach(): void;
  close(): void;
  updateProgram(object: RawObject, program: string): void;
}

interface RawObject {
  programs(): ProgramInfo[];
  maps(): MapInfo[];
  attachCgroup(program: string, cgroupPath: string): Promise<RawLink>;
  attachNetns(program: string, netnsPath: string): Promise<RawLink>;
  close(): void;
}

interface RawMapInfo {
  readonly id: number;
  readonly name: string;
  readonly type: number;
  readonly keySize: number;
  readonly valueSize: number;
  readonly maxEntries: number;
}

export interface ListenOptions {
  /** Path of the network namespace, e.g. /run/netns/NAME or /proc/PID/ns/net. */
  readonly netns: string;
  readonly host: string;
  readonly port: number;
  readonly backlog?: number;
  readonly transparent?: boolean;
}

export interface ConnectOptions {
  readonly netns: string;
  readonly host: string;
  readonly port: number;
  /** SO_MARK for the socket; the proxy's sockets carry NM_PROXY_MARK. */
  readonly mark?: number;
  readonly timeoutMs?: number;
  /** Local address to bind before connecting (with transparent: a non-local one). */
  readonly localHost?: string;
  readonly transparent?: boolean;
  /** fd of nm_inbound_bypass: the connection's 4-tuple is registered there during the handshake. */
  readonly bypassMapFd?: number;
}

/** Why a relayed connection ended other than by both sides closing. */
export type RelayEndReason = 'reset' | 'error' | 'idle_timeout' | 'proxy_stopping';

export interface KernelRelayResult {
  readonly bytesFromClient: number;
  readonly bytesToClient: number;
  readonly error?: string;
  /** Set when it did not end by both sides closing; after a reset or an error both peers were reset. */
  readonly reason?: RelayEndReason;
}

export interface ProbeOptions {
  /** The pod's cgroup directory: the probe process joins it before connecting. */
  readonly cgroup: string;
  readonly netns: string;
  readonly host: string;
  readonly port: number;
  readonly timeoutMs?: number;
}

interface RawAddon {
  loadObject(path: string, options: { mapPinDir?: string }): Promise<RawObject>;
  openPinnedLink(path: string): RawLink;
  probeBpf(): void;
  mapInfo(fd: number): RawMapInfo;
  mapLookup(fd: number, key: Buffer): Buffer | null;
  mapUpdate(fd: number, key: Buffer, value: Buffer, flags: number): void;
  mapDelete(fd: number, key: Buffer): boolean;
  mapKeys(fd: number): Buffer[];
  mapCount(fd: number): number;
  openPinned(path: string): number;
  pinFd(fd: number, path: string): void;
  closeFd(fd: number): void;
  listenInNetns(options: ListenOptions): Promise<number>;
  connectStartInNetns(options: ConnectOptions): Promise<{ fd: number; pending: boolean; bypassKey?: Buffer }>;
  awaitConnected(fd: number, timeoutMs: number): Promise<number>;
  probeConnect(options: ProbeOptions): Promise<number>;
  releaseNetns(netnsPath: string): boolean;
  relayFds(clientFd: number, upstreamFd: number, idleTimeoutMs: number): Promise<KernelRelayResult>;
  relayAbortAll(): void;
  dupFd(fd: number): number;
  socketPair(): [number, number];
  fdsListen(path: string): number;
  fdsReceive(listenFd: number, timeoutMs: number): Promise<{ peerPid: number; messages: FdMessage[] }>;
  fdsSend(path: string, messages: ReadonlyArray<FdMessage>, timeoutMs: number): void;
  socketCookie(fd: number): bigint;
  netnsCookie(fd: number): bigint;
  abiLayout(): AbiLayout;
  raiseFdLimit(): { soft: number; hard: number };
  trimHeap(): void;
  hboneInit(onEvent: (event: HboneEvent) => void): void;
  hboneContext(server: boolean, keyPem: string, chainPem: string, roots: ReadonlyArray<string>): number;
  hboneContextFree(context: number): void;
  hboneDial(fd: number, context: number, expectedIdentity: string): number;
  hboneServe(listenFd: number, context: number): number;
  hboneServerContext(server: number, context: number): void;
  hboneServerClose(server: number): void;
  hboneServerStopListening(server: number): void;
  hboneRequest(conn: number, authority: string, forwarded: string): number;
  /** Relays `fd` (or a channel's side 1) and the stream (`initial`, bytes already read from the fd, first); takes the fd. */
  hboneAttach(handle: number, fd: number | ChannelRef, idleTimeoutMs: number, initial?: Buffer): number;
  hboneAnswer(handle: number, status: number): void;
  hboneCancel(handle: number): void;
  hboneClose(conn: number): void;
  hboneAbortAll(): void;
  hboneHold(hold: boolean): void;
  Http1Engine: new (events: Http1Events, options: Http1Options) => Http1Engine;
  channelNew(): number;
  channelDrop(channel: number, side: 0 | 1): void;
  channelStats(): ChannelStats;
  H2Engine: new (events: H2Events, options: H2Options) => H2Engine;
}

/** How a request's body is framed, as the engine found it: none, Content-Length, chunked. */
export type Http1Body = 0 | 1 | 2;

/** What the HTTP/1.1 engine tells JS, by the ids given to serve(). */
export interface Http1Events {
  /** A request's head: answer it with forward(), respond() or release() (now or later). Names and values are Latin-1 as sent. */
  head(id: number, method: string, target: string, minor: 0 | 1, headers: string[], body: Http1Body, upgrade: boolean): void;
  /**
   * The request on `id` (nothing of an answer passed on; no body, or one read whole and kept)
   * may go again: its answer has a code of its `retryOn` (`status`), or its connection ended
   * before any answer (status 0: a reset, or the keep-alive race on a reused idle connection). True: it is dropped and waits for
   * forward() again (later is fine); false: the answer is passed on (or 503 UC answers the reset).
   */
  retry(id: number, status: number): boolean;
  /**
   * A request ended: the status the client got (0 if none), Envoy's response flag (`-`, or DPE,
   * UC, UPE when the engine answered or cut it), body bytes both ways.
   */
  done(id: number, status: number, flag: string, bytesIn: number, bytesOut: number, detail: string): void;
  /**
   * A request the engine sent on without a head() event (forward's `gate`, or the connection's
   * routes) ended: as done() says (status 0 and flag DC when the client left with it in flight),
   * with the milliseconds from its head to its end; a routed one with its routes (the object given
   * to route()), the index of its backend in their targets and of its endpoint in that target's pools.
   */
  delivered(id: number, status: number, flag: string, bytesIn: number, bytesOut: number, ms: number, routes: EngineRoutes | undefined, target: number | undefined, endpoint: number | undefined): void;
  /**
   * A request the engine routed (route()) waits for a connection of the pool its routes give for
   * target `target`'s endpoint `endpoint`, which has no idle one: dial it from the client's source
   * and attach() it, or call dialFailed() (the request becomes a head() event).
   */
  dial(id: number, routes: EngineRoutes, target: number, endpoint: number): void;
  /** The client connection is closed ('' when it ended cleanly, else why); the bytes the engine read from it and wrote to it. */
  closed(id: number, reason: string, read: number, written: number): void;
}

export interface Http1Options {
  /** The request head's limit (431 above it); an answer's head may be 4 times that. */
  readonly maxHeadBytes: number;
  /** A client connection with nothing passing either way this long (between requests, or a stalled exchange) is closed. */
  readonly idleMs: number;
  /** A request head not whole this long after its first byte is answered 408 (node:http's headersTimeout). */
  readonly headTimeoutMs: number;
  /** A pooled upstream connection idle this long is closed. */
  readonly poolIdleMs: number;
  /** Idle connections kept per pool (0: none kept). */
  readonly maxIdlePerPool: number;
}

/**
 * HTTP/1.1 framing and forwarding in the addon (native/src/http1.cc), on the JS thread's event
 * loop: the engine reads each request's head, JS decides, the engine moves bodies and answers.
 */
export interface Http1Engine {
  /**
   * Takes an accepted client socket's fd (the engine owns it from now on) under `id` (the
   * caller's, unique among its open connections); `initial` holds bytes already read from it.
   * Or an HBONE stream's side of a channel: release() then bridges it to a socket pair's end.
   */
  serve(id: number, fd: number | ChannelRef, initial?: Buffer): void;
  /**
   * The request waiting on `id` goes upstream with `head` (its request line and headers, CRLFCRLF
   * included): on `fd` (a new connection, pooled as `pool` afterwards: a socket, or a channel to
   * an HBONE stream) or, with fd -1, on an idle
   * connection of `pool`. False when there is none; then dial and call again with the fd.
   * `answerRemove` (lower-case names) and `answerAdd` ("name: value\r\n" lines) change the answer's head.
   * With a `gate`, the connection's later requests that it passes go to an idle connection of the
   * same pool as they came (hop-by-hop fields out, chunked framing kept) without a head() event,
   * while they are HTTP/1.1 with one Host, no upgrade, a Connection field naming nothing else and
   * a target the destination's admission passes on unchanged (see H2Engine.forward); each is
   * reported in delivered(). Without one, each is asked again. undirect() ends it for all.
   */
  forward(id: number, pool: string, head: string, fd: number | ChannelRef, answerRemove: ReadonlyArray<string>, answerAdd: string, maxRequests?: number, retryOn?: ReadonlyArray<number>, keep?: boolean, gate?: EngineGate): boolean;
  /** Every request from now on gets a head() event again (the config changed): see forward's `gate` and route(). */
  undirect(): void;
  /**
   * The connection's later requests are routed by the engine by `routes` (reported in
   * delivered()) where they allow it; without `routes`, each gets a head() event. Routes are read
   * once per id, until undirect().
   */
  route(id: number, routes: EngineRoutes | undefined): void;
  /** Requests to the backend Service `key` the engine routed itself that are in flight. */
  inFlight(key: string): number;
  /** The connection dialled for the routed request waiting on `id` (a dial() event): the request goes on it. False (and it is closed) when nothing waits for it. */
  attach(id: number, upstream: EngineUpstream): boolean;
  /** No connection comes for the routed request waiting on `id`: it gets a head() event. */
  dialFailed(id: number): void;
  /**
   * The body of the request in flight on `id` as it was sent (framing included; empty without
   * one), once read whole and kept (forward's `keep`, or a retry's): undefined otherwise (over
   * 64 KiB, not kept, not whole yet).
   */
  keptBody(id: number): Buffer | undefined;
  /**
   * Gives up the attempt in flight on `id` before its answer came (its upstream closed; the
   * request waits for forward() again): 1. 0 when there is none to give up (its answer is under
   * way); -1 when it cannot be sent again (a body not read whole yet, or not kept: over 64 KiB,
   * or no retry on its route): nothing is done.
   */
  abandon(id: number): -1 | 0 | 1;
  /**
   * The proxy's own answer (a whole HTTP/1.1 message, its status `status`) to the request waiting
   * on `id`; `close` ends the connection after it. The request's body, if any, is read and
   * dropped; then done() reports it with flag '-' and the body bytes dropped.
   */
  respond(id: number, bytes: string | Buffer, close: boolean, status: number): void;
  /**
   * The request in flight on `id` ran out of time (a route's timeouts.request): when nothing of
   * its answer reached the client yet, its upstream is closed and `bytes` (status `status`) answer
   * it, done() following as for respond(): 0. When the answer is under way: its status, and
   * nothing is done (reset the connection with close()). -1: no request in flight.
   */
  expire(id: number, bytes: Buffer, status: number): number;
  /** The connection back to JS at the waiting request: its fd, and the bytes read from it (that request's head on). */
  release(id: number): { fd: number; buffered: Buffer; read: number; written: number; bridged?: boolean } | undefined;
  /** Resets the client connection (and its upstream). */
  close(id: number): void;
  /** Closes the idle pooled connections of every pool whose key starts with `prefix`. */
  dropPools(prefix: string): void;
  stats(): { clients: number; upstreams: number; idle: number };
  /** Closes every connection; no event follows. */
  destroy(): void;
}

/** A new HTTP/1.1 engine on this thread's event loop. */
export function http1Engine(events: Http1Events, options: Http1Options): Http1Engine {
  return call('start the HTTP/1.1 engine', () => new (native().Http1Engine)(events, options));
}

/** What the HTTP/2 engine tells JS: connections by the ids given to serve(), streams by the engine's ids. */
export interface H2Events {
  /**
   * A client stream's headers, joined by NUL: "host", its :authority, its other fields as name
   * and value (:scheme left out), then its :method and :path. Answer it with forward() or
   * respond(), now or later.
   */
  request(conn: number, stream: number, head: string): void;
  /**
   * The stream's attempt in flight got an answer with a code of its `retryOn` (`status`), or
   * ended before any answer (status 0: reset, refused, its session lost), and its request can go
   * again (ended; no body, or one kept whole). True: the attempt is dropped and the stream waits
   * for forward() again (later is fine); false: the answer is passed on (or 503 answers the reset).
   */
  retry(stream: number, status: number): boolean;
  /**
   * A stream ended: the status the client got (0 if none), Envoy's response flag (`-`; DC, UC,
   * UF, UPE, DPE when the engine saw it end otherwise; '' after respond() or expire()), body bytes
   * both ways, the answer's grpc-status ('' if none), why (when the engine answered).
   */
  done(stream: number, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string, detail: string): void;
  /**
   * A stream the engine forwarded by its connection's gate (forward's `gate`) or routed by its
   * routes (route()), JS never told of it, ended: as done() says, with its gRPC status (undefined
   * when it was no gRPC request) and the milliseconds from its headers to its end; a routed one
   * with its routes (the object given to route()), the index of its backend in their targets and
   * of its endpoint in that target's pools.
   */
  delivered(conn: number, status: number, flag: string, bytesIn: number, bytesOut: number, grpcStatus: string | undefined, ms: number, routes: EngineRoutes | undefined, target: number | undefined, endpoint: number | undefined): void;
  /**
   * A stream the engine routed (route()) waits for a session of the pool its routes give for
   * target `target`'s endpoint `endpoint`, which has none: dial it from the client's source and
   * attach() it (the streams that wait go out on it), or call dialFailed() (they become request()
   * events). One event per pool while streams wait for it.
   */
  dial(conn: number, routes: EngineRoutes, target: number, endpoint: number): void;
  /** The client connection closed; the bytes the engine read from it and wrote to it. */
  closed(conn: number, read: number, written: number): void;
  /** A client broke the protocol (a bad frame, a flood): its session ended with GOAWAY. */
  refused(conn: number, reason: string): void;
}

/**
 * Which requests of a client connection the HTTP/1.1 and HTTP/2 engines forward without asking
 * JS (their forward's `gate`): those that match no `deny` operation and, when `allow` is set, one of its operations.
 * An operation matches as an AuthorizationPolicy operation does (Istio's string match: exact,
 * "prefix*", "*suffix", "*" for any non-empty value; hosts case-insensitive, a host without a port
 * matching any port), on the request's method, Host (:authority) and path without its query.
 */
export interface EngineGate {
  /** The engine reads a connection's gate again only when its id changes. */
  readonly id: number;
  readonly deny: ReadonlyArray<EngineGateOperation>;
  readonly allow: ReadonlyArray<EngineGateOperation> | undefined;
}

/** Each list: patterns the request's attribute must match one of (empty: any), or none of (not*). */
export type EngineGateOperation = Readonly<Record<'hosts' | 'notHosts' | 'methods' | 'notMethods' | 'paths' | 'notPaths', ReadonlyArray<string>>>;

/**
 * A client connection's routes as an HTTP engine follows them itself (route()): the route
 * entries of the Service port the client called, in precedence order. The engine routes a request
 * by the first rule whose match holds when that rule has `backends`: a backend by smooth weighted
 * round robin, then an endpoint of its target by round robin (or at random), to that endpoint's
 * pool, the request's fields as they came (HTTP/1.1: its hop-by-hop fields out). A request is
 * JS's (a request() or head() event) when it reaches a rule without `match` (the engine cannot
 * read it), when the rule it matches has no `backends`, when it matches none, when a header a rule
 * reads comes more than once, for HTTP/2 when it has a host field, for HTTP/1.1 when it is not
 * one the engine sends on as it came (HTTP/1.0, an upgrade, not one Host, a Connection field
 * naming another), and when no connection comes for the endpoint's pool (a dial() event).
 */
export interface EngineRoutes {
  /** The engine reads routes again only for a new id (until undirect()). */
  readonly id: number;
  /** Milliseconds after which the engine stops following them (an ejection ends); -1: until undirect(). */
  readonly ttlMs: number;
  readonly rules: ReadonlyArray<EngineRouteRule>;
  readonly targets: ReadonlyArray<EngineRouteTarget>;
}

export interface EngineRouteRule {
  /** Gateway API's path (Exact, or PathPrefix without a trailing "/"), method and exact header values (lower-case names; "host" is the :authority). */
  readonly match?: { readonly exact: boolean; readonly path: string; readonly method?: string; readonly headers: ReadonlyArray<readonly [string, string]> };
  /** Where a stream it matches goes: [index in targets, weight] each. */
  readonly backends?: ReadonlyArray<readonly [number, number]>;
}

export interface EngineRouteTarget {
  /** The backend Service's key (inFlight()). */
  readonly key: string;
  /** The pool of each endpoint that may be picked. */
  readonly pools: ReadonlyArray<string>;
  /** An endpoint at random, else round robin. */
  readonly random: boolean;
  /** HTTP/1.1: an upstream connection closes after this many answers (0 or absent: no limit); HTTP/2 takes it from the dial. */
  readonly maxRequests?: number;
}

export interface H2Options {
  /** A client connection with no stream this long ends (GOAWAY). */
  readonly idleMs: number;
  /** An upstream session with no stream this long ends. */
  readonly poolIdleMs: number;
  /** SETTINGS_MAX_HEADER_LIST_SIZE, enforced: a longer header block resets its stream. */
  readonly maxHeaderListBytes: number;
  /** A gRPC request message longer than this is refused (RESOURCE_EXHAUSTED) before it goes upstream. */
  readonly grpcMaxMessage: number;
}

/**
 * HTTP/2 (h2c) proxying in the addon (native/src/h2.cc), on the JS thread's event loop: nghttp2
 * serves the client connection and the upstream sessions, JS decides each stream once.
 */
export interface H2Engine {
  /** Takes an accepted client socket's fd under `id` (the caller's); `initial` holds bytes already read from it. Or an HBONE stream's side of a channel. */
  serve(id: number, fd: number | ChannelRef, initial?: Buffer): void;
  /**
   * A new upstream connection joins `pool` (its session starts; it closes after `maxRequests`
   * streams, 0: no limit): its fd, or a channel to an HBONE stream.
   */
  attach(pool: string, fd: number | ChannelRef, maxRequests: number): void;
  /**
   * The stream goes upstream on a session of `pool` with `fields` (names and values joined by
   * NUL, pseudo-header fields first, lower-case names): false when the pool has none that takes a
   * stream (attach one, call again). `answerRemove` (lower-case names) and `answerAdd` (joined as
   * `fields` are) change the answer's header fields. With `own`, the stream's own fields as the
   * client sent them (all but host) follow `fields`, which then hold the pseudo-header fields and
   * what is added. With `own` and a `gate` on a client connection, its later streams that the
   * gate passes go to the same pool as they came (pseudo-header fields, an x-request-id when they
   * have none, their own fields) without a request() event, while their :path is one the
   * destination's admission passes on unchanged (no percent-encoding, no "." or ".." segment, an
   * empty query) and the pool has a session that takes them; each is reported in delivered().
   * undirect() ends that for all.
   */
  forward(stream: number, pool: string, fields: string, answerRemove: ReadonlyArray<string>, answerAdd: string, retryOn?: ReadonlyArray<number>, keep?: boolean, own?: boolean, gate?: EngineGate): boolean;
  /** Every stream from now on gets a request() event again (the config changed): see forward's `gate` and route(). */
  undirect(): void;
  /** The later streams of the stream's client connection are routed by the engine by `routes` (each reported in delivered()); without, each is JS's again. */
  route(stream: number, routes: EngineRoutes | undefined): void;
  /** Streams to the backend Service `key` the engine routed itself that are in flight. */
  inFlight(key: string): number;
  /** No session of `pool` came after a dial() event: the routed streams that wait for it become request() events. */
  dialFailed(pool: string): void;
  /**
   * Gives up the attempt in flight before its answer came (a per-try timeout; the stream waits for
   * forward() again): 1. 0 when there is none to give up; -1 when it cannot go again (its body not
   * ended yet, or not kept: over 64 KiB, or no retry or mirror asked for it): nothing is done.
   */
  abandon(stream: number): -1 | 0 | 1;
  /** The stream's request body once it ended and was kept whole (forward's `keep`, or a retry's; empty without one); undefined otherwise. */
  keptBody(stream: number): Buffer | undefined;
  /** The proxy's own answer to a stream waiting for a decision; its body (if any) is read and dropped. */
  respond(stream: number, status: number, fields: string, body: string): void;
  /**
   * The stream's time ran out: answered so if nothing of its answer went yet (0); else it is
   * reset and the status of the answer that was cut returned; -1 when it is not in flight.
   */
  expire(stream: number, status: number, fields: string, body: string): number;
  /** Resets the client connection (and its streams upstream). */
  close(id: number): void;
  /** Upstream sessions of every pool whose key starts with `prefix` take no new stream and end once idle. */
  dropPools(prefix: string): void;
  stats(): { clients: number; upstreams: number; streams: number };
  /** Closes every connection; no event follows. */
  destroy(): void;
}

/** A new HTTP/2 engine on this thread's event loop. */
export function h2Engine(events: H2Events, options: H2Options): H2Engine {
  return call('start the HTTP/2 engine', () => new (native().H2Engine)(events, options));
}

let addon: RawAddon | undefined;

function native(): RawAddon {
  if (addon) return addon;
  if (!existsSync(NATIVE_ADDON_PATH)) {
    throw new NodemeshError('NM_ERR_NATIVE_MISSING', `native addon not built: ${NATIVE_ADDON_PATH} is missing`, {
      context: { path: NATIVE_ADDON_PATH },
      hint: 'run `npm run build` (it installs clang, libbpf-dev and cmake if they are missing)',
    });
  }
  const require = createRequire(import.meta.url);
  addon = require(NATIVE_ADDON_PATH) as RawAddon;
  return addon;
}

/** Rethrows an addon failure as a NodemeshError that keeps errno, syscall and path. */
function datapathError(e: unknown, what: string, code: ErrorCode = 'NM_ERR_DATAPATH'): never {
  if (isSystemError(e) && typeof e.errno === 'number') {
    throw new NodemeshError(code, `${what}: ${e.message}`, {
      context: {
        errno: e.errno,
        errnoCode: e.code,
        ...(e.syscall ? { syscall: e.syscall } : {}),
        ...(e.path ? { path: e.path } : {}),
        ...(e.detail ? { detail: e.detail } : {}),
      },
      cause: e,
    });
  }
  throw e;
}

function call<T>(what: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    return datapathError(e, what);
  }
}

async function callAsync<T>(what: string, fn: () => Promise<T>, code?: ErrorCode): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    return datapathError(e, what, code);
  }
}

/** An attachment of a program to a hook. Closing an unpinned link detaches the program. */
export class BpfLink {
  constructor(
    private readonly raw: RawLink,
    readonly description: string,
  ) {}

  get fd(): number {
    return this.raw.fd();
  }

  pin(path: string): void {
    call(`pin ${this.description} at ${path}`, () => this.raw.pin(path));
  }

  unpin(): void {
    call(`unpin ${this.description}`, () => this.raw.unpin());
  }

  /** Takes the program off its hook now, even if the link is pinned or held by others. */
  detach(): void {
    call(`detach ${this.description}`, () => this.raw.detach());
  }

  close(): void {
    this.raw.close();
  }

  /** Swaps the program behind a live link atomically (no window without capture). */
  updateProgram(object: BpfObject, program: string): void {
    call(`update ${this.description} to ${program}`, () => this.raw.updateProgram(object.raw, program));
  }

  static openPinned(path: string): BpfLink {
    return new BpfLink(call(`open pinned link ${path}`, () => native().openPinnedLink(path)), path);
  }
}

/**
 * What the kernel says of a pinned BPF object, from /proc/self/fdinfo of an fd on it: whether it
 * is a link, a map or a program, and its fields (for a link: link_type, link_id, prog_id, and
 * cgroup_id or netns_ino, 0 once its cgroup or netns is gone). No syscall beyond BPF_OBJ_GET, so
 * it works on pins of any build.
 */
export interface PinnedObjectInfo {
  readonly kind: 'link' | 'map' | 'prog' | 'other';
  readonly fields: Readonly<Record<string, string>>;
}

export function pinnedObjectInfo(path: string): PinnedObjectInfo {
  const fd = call(`open pinned object ${path}`, () => native().openPinned(path));
  try {
    const fields: Record<string, string> = {};
    for (const line of readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').split('\n')) {
      const at = line.indexOf(':');
      if (at > 0) fields[line.slice(0, at)] = line.slice(at + 1).trim();
    }
    const kind = 'link_type' in fields ? 'link' : 'map_type' in fields ? 'map' : 'prog_type' in fields ? 'prog' : 'other';
    return { kind, fields };
  } finally {
    native().closeFd(fd);
  }
}

/** Takes each program off its hook now (pinned or not) and releases the link. */
export function detachAll(links: Iterable<BpfLink>): void {
  for (const link of links) {
    link.detach();
    link.close();
  }
}

/** A BPF map seen through an fd; keys and values are raw bytes (see abi.ts for codecs). */
export class BpfMap {
  readonly keySize: number;
  readonly valueSize: number;

  constructor(
    readonly fd: number,
    readonly name: string,
    private readonly ownsFd: boolean,
  ) {
    const info = call(`map info of ${name}`, () => native().mapInfo(fd));
    this.keySize = info.keySize;
    this.valueSize = info.valueSize;
  }

  static openPinned(path: string): BpfMap {
    const fd = call(`open pinned map ${path}`, () => native().openPinned(path));
    return new BpfMap(fd, path, true);
  }

  lookup(key: Buffer): Buffer | null {
    return call(`lookup in ${this.name}`, () => native().mapLookup(this.fd, key));
  }

  update(key: Buffer, value: Buffer, flags = 0): void {
    call(`update of ${this.name}`, () => native().mapUpdate(this.fd, key, value, flags));
  }

  delete(key: Buffer): boolean {
    return call(`delete from ${this.name}`, () => native().mapDelete(this.fd, key));
  }

  keys(): Buffer[] {
    return call(`iterate ${this.name}`, () => native().mapKeys(this.fd));
  }

  /** Entries in the map, counted in the kernel's batches (no key copied to JS). */
  count(): number {
    return call(`count ${this.name}`, () => native().mapCount(this.fd));
  }

  pin(path: string): void {
    call(`pin ${this.name} at ${path}`, () => native().pinFd(this.fd, path));
  }

  close(): void {
    if (this.ownsFd) native().closeFd(this.fd);
  }
}

export interface LoadOptions {
  /** Reuse maps pinned in this bpffs folder, and pin the ones that are not there yet. */
  readonly mapPinDir?: string;
}

/** A loaded BPF object file: its programs and maps. */
export class BpfObject {
  private constructor(
    readonly raw: RawObject,
    readonly path: string,
  ) {}

  static async load(path: string, options: LoadOptions = {}): Promise<BpfObject> {
    const raw = await callAsync(`load BPF object ${path}`, () => native().loadObject(path, options), 'NM_ERR_BPF_LOAD');
    return new BpfObject(raw, path);
  }

  programs(): ProgramInfo[] {
    return this.raw.programs();
  }

  maps(): MapInfo[] {
    return this.raw.maps();
  }

  map(name: string): BpfMap {
    const info = this.raw.maps().find((m) => m.name === name);
    if (!info) {
      throw new NodemeshError('NM_ERR_ABI_MISMATCH', `BPF object ${this.path} has no map ${name}`, {
        context: { object: name, path: this.path },
      });
    }
    return new BpfMap(info.fd, name, false);
  }

  attachCgroup(program: string, cgroupPath: string): Promise<BpfLink> {
    return callAsync(`attach ${program} to cgroup ${cgroupPath}`, async () => {
      return new BpfLink(await this.raw.attachCgroup(program, cgroupPath), `${program}@${cgroupPath}`);
    });
  }

  attachNetns(program: string, netnsPath: string): Promise<BpfLink> {
    return callAsync(`attach ${program} to netns ${netnsPath}`, async () => {
      return new BpfLink(await this.raw.attachNetns(program, netnsPath), `${program}@${netnsPath}`);
    });
  }

  close(): void {
    this.raw.close();
  }
}

/** A listening TCP socket made inside a network namespace; serve it with server.listen({ fd }). */
export function listenInNetns(options: ListenOptions): Promise<number> {
  return callAsync(`listen in ${options.netns}`, () => native().listenInNetns(options));
}

/**
 * A connected TCP socket made inside a network namespace; wrap it with new net.Socket({ fd }).
 * socket(), bind() and a non-blocking connect() run on a pool thread for microseconds; the wait
 * for the handshake runs on the relay's epoll thread, so connects that hang (a destination that
 * drops SYNs) hold no pool thread, and every other pod's connects, probes and fs work go on.
 */
export async function connectInNetns(options: ConnectOptions): Promise<number> {
  const what = `connect in ${options.netns}`;
  const started = await callAsync(what, () => native().connectStartInNetns(options));
  let connected = false;
  try {
    if (started.pending) {
      const err = await native().awaitConnected(started.fd, options.timeoutMs ?? 10_000);
      if (err !== 0) {
        const [code, message] = getSystemErrorMap().get(-err) ?? [`errno ${err}`, `errno ${err}`];
        throw new NodemeshError('NM_ERR_DATAPATH', `${what}: connect ${formatHostPort(options.host, options.port)} in ${options.netns}: ${message}`, { context: { errno: err, errnoCode: code, syscall: 'connect', path: options.netns } });
      }
    }
    connected = true;
    return started.fd;
  } finally {
    // The handshake is over either way: its bypass entry goes (sk_lookup needed it for the SYN).
    if (started.bypassKey && options.bypassMapFd !== undefined) native().mapDelete(options.bypassMapFd, started.bypassKey);
    if (!connected) native().closeFd(started.fd);
  }
}

/**
 * Relays two connected sockets in the kernel (splice through pipes, on the addon's epoll thread)
 * until both directions end, an error, or idleTimeoutMs without traffic. Takes ownership of both
 * fds: give it a dupFd() of a socket node:net still holds, then destroy that socket.
 */
export function relayFds(clientFd: number, upstreamFd: number, idleTimeoutMs: number): Promise<KernelRelayResult> {
  return native().relayFds(clientFd, upstreamFd, idleTimeoutMs);
}

/**
 * What the addon's HBONE thread reports (native/src/hbone.cc): a client tunnel's handshake
 * (`dialed`, with `error` and `reason` when it failed), a CONNECT's answer (`response`), a CONNECT
 * arriving at a server (`request`), a relay's end (`relayed`), a tunnel closing (`closed`, with
 * `during: 'tls' | 'h2'` for a server connection that never finished its handshakes), and a
 * GOAWAY from a server (`draining`).
 */
export type HboneEvent =
  | { readonly type: 'dialed'; readonly conn: number; readonly error?: string; readonly reason?: string }
  | { readonly type: 'response'; readonly handle: number; readonly status?: number; readonly error?: string }
  | {
      readonly type: 'request';
      readonly server: number;
      readonly conn: number;
      readonly handle: number;
      readonly method: string;
      readonly authority: string;
      readonly forwarded: string;
      readonly peer: string;
      readonly source: string;
      readonly sourcePort: number;
      readonly local: string;
    }
  | { readonly type: 'relayed'; readonly relay: number; readonly bytesFromApp: number; readonly bytesToApp: number; readonly error?: string; readonly reason?: RelayEndReason }
  | { readonly type: 'closed'; readonly conn: number; readonly reason: string; readonly detail?: string; readonly server?: number; readonly source?: string; readonly during?: 'tls' | 'h2' }
  | { readonly type: 'draining'; readonly conn: number };

/** The addon's HBONE engine: TLS 1.3 and HTTP/2 on the JS thread's loop, driven by handles (see HboneEvent). */
export type HboneAddon = Pick<
  RawAddon,
  'hboneInit' | 'hboneContext' | 'hboneContextFree' | 'hboneDial' | 'hboneServe' | 'hboneServerContext' | 'hboneServerClose' | 'hboneServerStopListening' | 'hboneRequest' | 'hboneAttach' | 'hboneAnswer' | 'hboneCancel' | 'hboneClose' | 'hboneAbortAll' | 'hboneHold' | 'channelDrop'
>;

export function hboneAddon(): HboneAddon {
  return native();
}

/** Ends every tunnel and listener of the addon's HBONE engine (the proxy is stopping). */
export function hboneAbortAll(): void {
  native().hboneAbortAll();
}

/** Raises RLIMIT_NOFILE's soft limit to the hard one; returns both as they are then. */
export function raiseFdLimit(): { soft: number; hard: number } {
  return call('raise the open file limit', () => native().raiseFdLimit());
}

/** V8's full, compacting, memory-reducing collection, now (a pause of the JS thread: call it when idle). */
export function trimHeap(): void {
  native().trimHeap();
}

/** Ends every kernel-relayed connection (the proxy is stopping). */
export function relayAbortAll(): void {
  native().relayAbortAll();
}

/** One message of a descriptor handover: its JSON and the fds that go with it (SCM_RIGHTS). */
export interface FdMessage {
  readonly data: string;
  readonly fds: ReadonlyArray<number>;
}

/** A SOCK_SEQPACKET Unix socket listening at `path` (made anew, root only), for fdsReceive. */
export function fdsListen(path: string): number {
  return call(`listen on ${path}`, () => native().fdsListen(path));
}

/**
 * Accepts one sender (root only) on a socket from fdsListen and reads its messages until it
 * closes or `timeoutMs` passes; the fds received are the caller's to close.
 */
export function fdsReceive(listenFd: number, timeoutMs: number): Promise<{ peerPid: number; messages: FdMessage[] }> {
  return callAsync('receive descriptors', () => native().fdsReceive(listenFd, timeoutMs));
}

/** Sends copies of open fds to a socket from fdsListen (SCM_RIGHTS), one message each, then closes. */
export function fdsSend(path: string, messages: ReadonlyArray<FdMessage>, timeoutMs: number): void {
  call(`send descriptors to ${path}`, () => native().fdsSend(path, messages, timeoutMs));
}

export function dupFd(fd: number): number {
  return call(`dup fd ${fd}`, () => native().dupFd(fd));
}

/**
 * A channel between an HTTP engine's connection and an HBONE stream, joined in memory on the JS
 * thread's loop instead of through a socket pair (native/src/channel.h): the stream takes side 1
 * in hboneAttach, the engine side 0 (the HTTP/1.1 engine's forward or serve, the HTTP/2 engine's
 * attach or serve). An upstream no engine took is given up with dropUpstream.
 */
export interface ChannelRef {
  readonly channel: number;
}

/** A new upstream connection for the addon's HTTP engines: an fd, or a channel to an HBONE stream. */
export type EngineUpstream = number | ChannelRef;

export function channelNew(): ChannelRef {
  return { channel: native().channelNew() };
}

/** Channels either engine still holds (open), ids made that no engine took yet (unclaimed), and all made. */
export interface ChannelStats {
  readonly open: number;
  readonly unclaimed: number;
  readonly made: number;
}

export function channelStats(): ChannelStats {
  return native().channelStats();
}

/** Gives up an upstream that no engine took: closes the fd, or resets the channel's stream. */
export function dropUpstream(upstream: EngineUpstream): void {
  if (typeof upstream === 'number') closeFd(upstream);
  else native().channelDrop(upstream.channel, 0);
}

/** Two connected Unix stream sockets (non-blocking, close-on-exec); both fds are the caller's. */
export function socketPair(): [number, number] {
  return call('socketpair', () => native().socketPair());
}

/**
 * Closes the fd the addon keeps of a pod's netns (to make sockets in it). Call it when the proxy
 * is done with the pod: an open fd keeps a network namespace (and its veth) alive.
 */
export function releaseNetns(netnsPath: string): boolean {
  return native().releaseNetns(netnsPath);
}

/**
 * Connects from a child process placed in the pod's cgroup and netns; resolves with 0 if the
 * connection was established, or the errno connect() failed with (111 ECONNREFUSED, ...).
 */
export function probeConnect(options: ProbeOptions): Promise<number> {
  return callAsync(`capture probe in ${options.cgroup}`, () => native().probeConnect(options));
}

export function socketCookie(fd: number): bigint {
  return call(`SO_COOKIE of fd ${fd}`, () => native().socketCookie(fd));
}

export function netnsCookie(fd: number): bigint {
  return call(`SO_NETNS_COOKIE of fd ${fd}`, () => native().netnsCookie(fd));
}

export function closeFd(fd: number): void {
  call(`close fd ${fd}`, () => native().closeFd(fd));
}

/** Throws NM_ERR_NO_BPF context (errno) if the bpf() syscall is missing or forbidden. */
export function probeBpf(): void {
  call('bpf() probe', () => native().probeBpf());
}

export function abiLayout(): AbiLayout {
  return native().abiLayout();
}
