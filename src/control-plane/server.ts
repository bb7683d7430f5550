/**
 * The control plane (design.md sections 1 and 6): reads the config (a folder of YAML now, the
 * Kubernetes API later) through the same ConfigStore as a standalone agent, merges the pods the
 * agents report, and streams each node a versioned snapshot of what it needs over gRPC
 * (nodemesh.v1.Discovery/Stream). One owner per state: the store owns config, this module owns
 * versions, node pods and the streams.
 *
 * A node first gets a Snapshot, then Deltas against what it acknowledged (resources added or
 * changed, keys removed). Changes are batched for a few milliseconds, then pushed as one version.
 * Flow control: a stream has at most one push waiting for its Ack. Changes made meanwhile are
 * folded into the next push, sent when the Ack (or Nack) arrives, so an agent that never answers
 * costs one message of memory, not a queue.
 */
import type { Server as HttpServer } from 'node:http';

import { hostname, networkInterfaces } from 'node:os';
import { watch, type FSWatcher } from 'node:fs';
import { mkdir } from 'node:fs/promises';

import { Metadata, Server, ServerCredentials, status as GrpcStatus, type sendUnaryData, type ServerCredentials as Credentials, type ServerDuplexStream, type ServerUnaryCall } from '@grpc/grpc-js';

import { json, serveHttp, type HostPort } from '../shared/http.js';
import { MeshSnapshot, SelectorIndex, type SnapshotWarning } from '../config/snapshot.js';
import { ConfigDirReader, ConfigStore, recordConfigObjects, recordRejections, type ConfigReader, type MeshConfig, type RejectedObject } from '../config/store.js';
import { NodemeshError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { compareStrings } from '../shared/order.js';
import { checkListen, listenError } from '../shared/ports.js';
import {
  CONTROL_PLANE_TLS_NAME,
  MAX_MESSAGE_BYTES,
  configResources,
  digestHex,
  certificatesService,
  discoveryServerService,
  encodeControlPlaneMessage,
  EncodedMessage,
  keyParts,
  resourceHash,
  resourceKey,
  routeToWire,
  serviceToWire,
  sortByKey,
  trafficPolicyToWire,
  type AgentMessage,
  type ControlPlaneMessage,
  type SignRequest,
  type SignResponse,
  type WireConfigError,
  type WireResource,
  type WireSnapshot,
  type WireWorkload,
} from '../protocol/discovery.js';
import { spiffeUri, type WorkloadIdentity } from '../identity/spiffe.js';
import { AgentTokens, type AgentAuthenticator } from './agent-tokens.js';
import { CertificateAuthority, DEFAULT_CERT_TTL_MS, SignRefused } from './ca/ca.js';
import { RateLimiter } from '../shared/rate-limit.js';
import { isNodeName, parseNamespacedName } from '../shared/names.js';
import { checkPodReport } from './pod-reports.js';
import { PodRanges } from './pod-ranges.js';
import { ControlPlaneMetrics } from './metrics.js';
import type { KubernetesSourceOptions } from './sources/kubernetes.js';

const log = logger('control-plane');

/** Pods one agent may report: a node runs at most a few hundred (kubelet's default limit is 110). */
const MAX_PODS_PER_NODE = 1000;
/** Pod reports applied per second per node, after a burst of 20. */
const PODS_PER_SECOND = 10;
/** How long a node that stopped reporting keeps its pods as endpoints. */
const POD_GRACE_MS = 60_000;
/** Changes within this window go out as one version (a burst of pod reports, an editor's saves). */
const BATCH_MS = 10;
/** How long after the last change in the CA folder it is loaded again (an edit is several writes). */
const CA_RELOAD_DELAY_MS = 500;
/** How often the CA folder is compared with its Secret, and the trusted roots ConfigMap with the CA (--ca-secret). */
const CA_SECRET_SYNC_MS = 30_000;
const CA_SECRET_TIMEOUT_MS = 15_000;
/** After a start, how long agents get to report their pods before the first push. */
const WARMUP_MS = 2000;

/** Where config comes from: a folder of YAML (pods from the agents' reports), or the Kubernetes API (pods from it too). */
export type ControlPlaneSource = { readonly kind: 'dir'; readonly dir: string } | ({ readonly kind: 'kubernetes' } & Omit<KubernetesSourceOptions, 'registry'>);

export interface ControlPlaneOptions {
  readonly source: ControlPlaneSource;
  /** gRPC, plaintext (15010): loopback development only. */
  readonly listen?: HostPort;
  /** gRPC over TLS (15012), with a serving certificate from the CA: what agents use. */
  readonly listenTls?: HostPort;
  /** The certificate authority: its folder (root-cert.pem, root-key.pem) and the leaves' lifetime. Without it, no certificates and no TLS. */
  readonly ca?: {
    readonly dir: string;
    readonly certTtlMs?: number;
    /** With the Kubernetes source: "namespace/name" of the Secret that keeps the root and key (the folder follows it) and, beside it, the ConfigMap of trusted roots. */
    readonly secret?: string;
  };
  /** HTTP: /metrics, /healthz/ready, /debug/snapshot, /debug/nodes (15014). */
  readonly http: HostPort;
  /** How long agents get to report their pods after a start before the first push (default 2 s). */
  readonly warmupMs?: number;
  /** How long a disconnected node's pods stay endpoints (default 60 s). */
  readonly podGraceMs?: number;
  /** `<node> <token>` lines: agents must present a token, and may speak only for its node. Without: any agent is accepted. */
  readonly agentTokens?: string;
  /** With the Kubernetes source: "namespace/name" of the agents' ServiceAccount, whose pod-bound tokens are checked with TokenReview. */
  readonly agentServiceAccount?: string;
  /** The pod addresses nodes may claim in their reports (`--pod-cidrs`); none: any. */
  readonly podRanges?: PodRanges;
}

/** What `nodemesh status` and /debug/nodes show per node. */
export interface NodeSyncStatus {
  readonly node: string;
  readonly connected: boolean;
  readonly pods: number;
  /** Version of the last push to this node, and the last one it acknowledged. */
  readonly sentVersion: number;
  readonly ackedVersion: number;
  /** The node acknowledged the snapshot of the current config, and no change is waiting to go out. */
  readonly inSync: boolean;
  readonly lastNack: ReadonlyArray<WireConfigError>;
  /** The last certificate signed for each identity of the node's pods (that has not expired). */
  readonly certificates: ReadonlyArray<IssuedCertificate>;
}

export interface IssuedCertificate {
  readonly identity: string;
  readonly serial: string;
  readonly notAfter: string;
}

/** What a node should hold now: resources by key, their hashes, and their digest. */
interface NodeView {
  readonly resources: ReadonlyMap<string, WireResource>;
  readonly hashes: ReadonlyMap<string, bigint>;
  readonly digest: string;
}

class AgentStream {
  /** What the agent holds (its last Ack): resource hashes by key; undefined: it needs a Snapshot. */
  held: ReadonlyMap<string, bigint> | undefined;
  heldVersion = 0;
  heldDigest = '';
  /** The outstanding push, applied to `held` when the agent Acks it. */
  pending: { version: number; digest: string; hashes: ReadonlyMap<string, bigint>; at: number } | undefined;
  dirty = false;
  lastNack: ReadonlyArray<WireConfigError> = [];

  constructor(
    readonly node: string,
    readonly call: ServerDuplexStream<AgentMessage, ControlPlaneMessage>,
  ) {}
}

export class ControlPlane {
  private readonly store: ConfigStore;
  readonly metrics = new ControlPlaneMetrics();
  private readonly streams = new Map<string, AgentStream>();
  private podsByNode = new Map<string, ReadonlyArray<WireWorkload>>();
  /** Pods come from the config source (the Kubernetes API); agents' reports are then not used. */
  private podsFromSource = false;
  private warnings: ReadonlyArray<SnapshotWarning> = [];
  private readonly tokens: AgentAuthenticator | undefined;
  /** What each node last acknowledged, kept across reconnects (for status). */
  private readonly acked = new Map<string, number>();
  private version = 0;
  /** When the current version's first change happened (for the propagation histogram). */
  private versionAt = 0;
  /** Changes since the last push, pushed together after BATCH_MS. */
  private batch: NodeJS.Timeout | undefined;
  /** False until the agents had time to report their pods after a start. */
  private warm = true;
  private warmup: NodeJS.Timeout | undefined;
  private changedAt = 0;
  /** What nodes are sent at the current version, computed once per version (see computeScopes). */
  private scopes: VersionScopes = emptyScopes();
  /** Each node's view at the current version (nodes with the same scope share its maps). */
  private views = new Map<string, NodeView>();
  /**
   * Messages of this version, encoded, by what the node holds and what it needs ("version:digest
   * held>digest wanted", or ">digest" for a Snapshot): nodes that hold the same and need the same
   * share one computation and one encoding.
   */
  private encoded = new Map<string, EncodedMessage>();
  private grpc: Server | undefined;
  private http: HttpServer | undefined;
  private port = 0;
  private tlsPort = 0;
  private ca: CertificateAuthority | undefined;
  private caSecret: import('./sources/ca-secret.js').CaSecret | undefined;
  private caSecretTimer: NodeJS.Timeout | undefined;
  /** The roots last published to the ConfigMap (joined PEM), so an unchanged bundle is not written again. */
  private publishedRoots = '';
  /** Certificates signed, by node, then by identity (the last one). */
  private readonly issued = new Map<string, Map<string, IssuedCertificate>>();
  /** Sign requests per node: a node asks once per identity per half life, and again after a restart. */
  private readonly signLimit = new RateLimiter(200, 20);
  /** Pod reports applied per node: a burst, then PODS_PER_SECOND; faster ones wait (the latest wins). */
  private readonly reportLimit = new RateLimiter(20, PODS_PER_SECOND);
  private readonly pendingReports = new Map<string, { pods: ReadonlyArray<WireWorkload>; timer: NodeJS.Timeout }>();
  /** Nodes whose agent went away, until their pods are withdrawn. */
  private readonly graceTimers = new Map<string, NodeJS.Timeout>();
  private readonly podGraceMs: number;

  private constructor(
    private readonly options: ControlPlaneOptions,
    kubernetes: typeof import('./sources/kubernetes.js') | undefined,
  ) {
    this.podGraceMs = options.podGraceMs ?? POD_GRACE_MS;
    const source = options.source;
    if (options.agentServiceAccount !== undefined && source.kind !== 'kubernetes') {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', '--agent-service-account needs --source kubernetes (TokenReview asks the API server)', {
        context: { field: 'agent-service-account' },
        hint: 'add --source kubernetes, or authenticate agents with --agent-tokens FILE',
      });
    }
    if (options.agentServiceAccount !== undefined && !parseNamespacedName(options.agentServiceAccount)) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--agent-service-account "${options.agentServiceAccount}" is not NAMESPACE/NAME`, {
        context: { field: 'agent-service-account' },
        hint: 'give the agents\' ServiceAccount as NAMESPACE/NAME, e.g. nodemesh-system/nodemesh-agent',
      });
    }
    let reader: ConfigReader;
    let tokenReview: AgentAuthenticator | undefined;
    if (source.kind === 'dir') reader = new ConfigDirReader(source.dir);
    else {
      if (!kubernetes) throw new Error('internal: the Kubernetes source module is not loaded');
      const kube = new kubernetes.KubernetesSource({ ...source, registry: this.metrics.registry });
      // The API knows every pod, with its node: endpoints come from it, not from agent reports.
      this.podsFromSource = true;
      kube.watchPods((pods) => this.sourcePods(pods));
      reader = kube;
      if (options.agentServiceAccount !== undefined) tokenReview = new kubernetes.TokenReviewAuthenticator(kube.api, options.agentServiceAccount);
      if (options.ca?.secret !== undefined) this.caSecret = kubernetes.CaSecret.of(kube.api, options.ca.secret);
    }
    if (options.ca?.secret !== undefined && source.kind !== 'kubernetes') {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', '--ca-secret needs --source kubernetes (the Secret is kept in the API server)', {
        context: { field: 'ca-secret' },
        hint: 'add --source kubernetes, or keep the CA in --ca-dir only',
      });
    }
    this.store = new ConfigStore(reader, { onLoad: (config, rejected) => this.configRead(config, rejected) });
    this.tokens = options.agentTokens === undefined ? tokenReview : new AgentTokens(options.agentTokens);
  }

  static async start(options: ControlPlaneOptions): Promise<ControlPlane> {
    // The Kubernetes client is loaded only for that source: it is most of the modules there are.
    const cp = new ControlPlane(options, options.source.kind === 'kubernetes' ? await import('./sources/kubernetes.js') : undefined);
    try {
      if (cp.tokens) log.info({ by: cp.tokens.description, identities: await cp.tokens.check() }, 'agents authenticate with node-bound tokens');
      else log.warn({ listen: options.listen ? `${options.listen.host}:${options.listen.port}` : undefined, listenTls: options.listenTls ? `${options.listenTls.host}:${options.listenTls.port}` : undefined }, 'agents are not authenticated (no --agent-tokens): any agent may speak for any node and obtain its identities; use on loopback only');
      if (!options.podRanges?.restricted && !cp.podsFromSource) log.warn({}, 'no --pod-cidrs: a node\'s pod report is believed whatever addresses it claims (only addresses another node reported are refused)');
      await cp.store.load();
      cp.store.watch();
      if (options.ca) {
        // The trust domain is the mesh config's when the control plane starts: a CA signs for one.
        const trustDomain = cp.store.current().mesh.trustDomain;
        cp.ca = await cp.openCa(options.ca.dir, trustDomain);
        cp.watchCa(options.ca.dir);
        if (cp.caSecret) {
          await cp.syncCaSecret(options.ca.dir);
          cp.caSecretTimer = setInterval(() => void cp.syncCaSecret(options.ca?.dir ?? ''), CA_SECRET_SYNC_MS);
          cp.caSecretTimer.unref();
        }
      }
      // Pods come from the agents' reports: until they have had time to report after a restart,
      // a push would tell every node that the endpoints on other nodes are gone.
      // With pods from the API there is nothing to wait for but the source's first list.
      cp.warm = false;
      cp.warmup = setTimeout(
        () => {
          cp.warm = true;
          cp.flush();
        },
        cp.podsFromSource ? 0 : (options.warmupMs ?? WARMUP_MS),
      );
      await cp.serveGrpc();
      cp.http = await serveHttp(options.http, {
        '/metrics': async () => ({ status: 200, type: cp.metrics.registry.contentType, body: await cp.metrics.registry.metrics() }),
        '/healthz/live': async () => json({ live: true }, 200),
        '/healthz/ready': async () => {
          const synced = cp.store.reader.synced();
          const ready = cp.store.hasLoaded() && cp.warm && synced && cp.version > 0;
          return json({ ready, warm: cp.warm, synced, version: cp.version }, ready ? 200 : 503);
        },
        '/debug/nodes': async () => json({ version: cp.version, nodes: cp.nodes() }),
        '/debug/snapshot': async (req) => {
          const node = new URL(req.url ?? '/', 'http://x').searchParams.get('node');
          if (!node) return json({ error: 'add ?node=NAME (GET /debug/nodes lists them)' }, 400);
          return json({ node, version: cp.version, snapshot: cp.snapshotFor(node), status: cp.nodes().find((n) => n.node === node), configErrors: cp.store.lastRejected(), configWarnings: cp.warnings });
        },
      }, 'http');
    } catch (e) {
      await cp.stop();
      throw e;
    }
    log.info({ grpc: options.listen ? `${options.listen.host}:${cp.port}` : undefined, grpcTls: options.listenTls ? `${options.listenTls.host}:${cp.tlsPort}` : undefined, http: `${options.http.host}:${options.http.port}`, version: cp.version }, 'control plane started');
    return cp;
  }

  /** The plaintext gRPC port (the one asked for, or the one the kernel chose for port 0). */
  grpcPort(): number {
    return this.port;
  }

  /** The HTTP port (the one asked for, or the one the kernel chose for port 0). */
  httpPort(): number {
    const a = this.http?.address();
    return typeof a === 'object' && a !== null ? a.port : 0;
  }

  currentVersion(): number {
    return this.version;
  }

  async stop(): Promise<void> {
    this.store.close();
    this.caWatcher?.close();
    clearTimeout(this.caReloadTimer);
    clearInterval(this.caSecretTimer);
    clearTimeout(this.batch);
    clearTimeout(this.warmup);
    for (const t of this.graceTimers.values()) clearTimeout(t);
    for (const p of this.pendingReports.values()) clearTimeout(p.timer);
    for (const s of this.streams.values()) s.call.end();
    const grpc = this.grpc;
    if (grpc) await new Promise<void>((resolve) => grpc.tryShutdown(() => resolve()));
    this.grpc = undefined;
    const http = this.http;
    if (http) await new Promise((resolve) => http.close(resolve));
  }

  nodes(): NodeSyncStatus[] {
    const names = new Set([...this.podsByNode.keys(), ...this.streams.keys(), ...this.acked.keys(), ...this.issued.keys()]);
    return [...names].sort(compareStrings).map((node) => {
      const s = this.streams.get(node);
      const acked = this.acked.get(node) ?? 0;
      return {
        node,
        connected: s !== undefined,
        pods: this.podsByNode.get(node)?.length ?? 0,
        sentVersion: s?.pending?.version ?? s?.heldVersion ?? 0,
        ackedVersion: acked,
        inSync: s !== undefined && this.batch === undefined && s.pending === undefined && !s.dirty && s.held !== undefined && s.heldDigest === this.viewOf(node).digest,
        lastNack: s?.lastNack ?? [],
        certificates: [...(this.issued.get(node)?.values() ?? [])].filter((c) => Date.parse(c.notAfter) > Date.now()).sort((a, b) => compareStrings(a.identity, b.identity)),
      };
    });
  }

  /** What a node should hold now, as the Snapshot it would get (/debug/snapshot). */
  snapshotFor(node: string): WireSnapshot {
    const view = this.viewOf(node);
    return { version: this.version, digest: view.digest, resources: [...view.resources.values()] };
  }

  /**
   * What a node needs (design.md section 6: not the whole mesh): the mesh settings and every
   * Namespace (their labels decide enrollment); the Services its pods may call (exported to all
   * namespaces or to one of its pods' namespaces) and the Services its pods serve (for the
   * destination side's labels); the TrafficPolicies of those Services; their endpoints; its own
   * pods. Nodes whose pods have the same namespaces and serve the same Services share one view.
   */
  private viewOf(node: string): NodeView {
    const cached = this.views.get(node);
    if (cached) return cached;
    const pods = this.podsByNode.get(node) ?? [];
    const sc = this.scopes;
    const extra = new Set<string>();
    for (const p of pods) {
      for (const k of sc.exportedTo.get(p.namespace) ?? []) extra.add(k);
      for (const k of sc.servicesOf.get(p.uid) ?? []) if (!sc.everywhere.has(k)) extra.add(k);
    }
    const scopeKey = [...extra].sort(compareStrings).join(',');
    let scoped = sc.byScope.get(scopeKey);
    if (!scoped) {
      scoped = sc.base.clone();
      for (const k of extra) for (const r of sc.perService.get(k) ?? []) scoped.add(r);
      sc.byScope.set(scopeKey, scoped);
    }
    const own = pods.filter((p) => !scoped.has(`Workload/${p.namespace}/${p.name}`));
    let view: NodeView = scoped;
    if (own.length > 0) {
      const set = scoped.clone();
      for (const p of sortByKey(own)) set.add(this.workloadResource(p));
      view = set;
    }
    this.views.set(node, view);
    return view;
  }

  /** Which resources go to which nodes, once per version: the part every node gets, and the rest by Service. */
  private computeScopes(): void {
    const config = this.store.current();
    const pods = [...this.podsByNode.values()].flat();
    const index = new SelectorIndex(pods);
    const base = new ResourceSet();
    const perService = new Map<string, WireResource[]>();
    const everywhere = new Set<string>();
    const exportedTo = new Map<string, string[]>();
    const servicesOf = new Map<string, string[]>();
    // Mesh settings and Namespaces: configResources puts them first, in canonical order.
    for (const r of configResources({ ...config, services: [], trafficPolicies: [], routes: [] })) base.add(r);
    // The mesh's roots (the signing one first): agents verify peers against exactly these.
    if (this.ca) base.add({ trustBundle: { roots: [...this.ca.roots()] } });
    const policies = new Map<string, WireResource[]>();
    const known = new Set(config.services.map((svc) => `${svc.namespace}/${svc.name}`));
    for (const t of sortByKey(config.trafficPolicies)) {
      const r: WireResource = { trafficPolicy: trafficPolicyToWire(t) };
      const targets = t.services.map((name) => `${t.namespace}/${name}`).filter((k) => known.has(k));
      // A policy that targets nothing (yet) goes everywhere, so every agent's warnings name it.
      if (targets.length === 0) base.add(r);
      for (const k of targets) policies.set(k, [...(policies.get(k) ?? []), r]);
    }
    // Each Service with what comes with it: its policies and endpoints.
    const own = new Map<string, WireResource[]>();
    for (const svc of sortByKey(config.services)) {
      const key = `${svc.namespace}/${svc.name}`;
      const members = sortByKey(index.members(svc.namespace, svc.selector));
      own.set(key, [{ service: serviceToWire(svc) }, ...(policies.get(key) ?? []), ...members.map((p) => this.workloadResource(p))]);
      for (const p of members) servicesOf.set(p.uid, [...(servicesOf.get(p.uid) ?? []), key]);
    }
    // A routed Service brings its routes and their backends (whoever may call the parent is
    // sent where its connections go).
    const routed = new Map<string, WireResource[]>();
    for (const r of sortByKey(config.routes)) {
      const resource: WireResource = { route: routeToWire(r) };
      const backends = r.backends.flatMap((b) => own.get(`${b.namespace}/${b.name}`) ?? []);
      for (const p of r.parents) {
        const key = `${p.namespace}/${p.name}`;
        routed.set(key, [...(routed.get(key) ?? []), resource, ...backends]);
      }
    }
    for (const svc of config.services) {
      const key = `${svc.namespace}/${svc.name}`;
      const resources = [...(own.get(key) ?? []), ...(routed.get(key) ?? [])];
      if (svc.exportTo.includes('*')) {
        everywhere.add(key);
        for (const r of resources) base.add(r);
      } else {
        perService.set(key, resources);
        for (const ns of svc.exportTo) exportedTo.set(ns, [...(exportedTo.get(ns) ?? []), key]);
      }
    }
    this.scopes = { base, perService, everywhere, exportedTo, servicesOf, byScope: new Map() };
    this.views = new Map();
    this.encoded = new Map();
  }

  /** One resource object per reported pod object, so its hash is computed once. */
  private readonly workloadResources = new WeakMap<WireWorkload, WireResource>();
  private workloadResource(p: WireWorkload): WireResource {
    let r = this.workloadResources.get(p);
    if (!r) {
      r = { workload: p };
      this.workloadResources.set(p, r);
    }
    return r;
  }

  /** All pods from the config source (Kubernetes): grouped by node, replacing what was there. */
  private sourcePods(pods: ReadonlyArray<WireWorkload>): void {
    const byNode = new Map<string, WireWorkload[]>();
    for (const p of pods) {
      const list = byNode.get(p.node);
      if (list) list.push(p);
      else byNode.set(p.node, [p]);
    }
    this.podsByNode = byNode;
    this.changed();
  }

  private configRead(config: MeshConfig, rejected: ReadonlyArray<RejectedObject>): void {
    recordRejections(rejected, this.metrics.configErrors, this.metrics.configRejected);
    recordConfigObjects(config, this.metrics.configObjects);
    // Valid objects that do not fit the rest (a policy for a Service that does not exist yet):
    // served, and shown, as every agent will show them.
    this.warnings = new MeshSnapshot(0, config.services, [], config.trafficPolicies, config.routes).warnings;
    this.metrics.configWarnings.set(this.warnings.length);
    for (const w of this.warnings) log.warn({ object: w.object }, `config warning: ${w.message}`);
    if (this.ca && config.mesh.trustDomain !== this.ca.trustDomain) {
      // Agents ask for identities in the new domain and are refused until a restart: said loudly.
      log.error({ configured: config.mesh.trustDomain, signing: this.ca.trustDomain }, 'the mesh trust domain changed: the CA signs only for the one it started with; restart the control plane');
    }
    this.changed();
  }

  private caWatcher: FSWatcher | undefined;
  private caReloadTimer: NodeJS.Timeout | undefined;
  private caReloading: Promise<void> = Promise.resolve();

  /**
   * Root rotation (design.md section 11): the operator changes the CA folder and the control plane
   * loads it again shortly after (a change arrives as several file events; they are folded). A
   * folder that does not load (a key that does not match its certificate half-way through an
   * edit) is logged and counted, and the CA keeps the one it has. A new trust bundle goes to
   * every node with the next version.
   */
  private watchCa(dir: string): void {
    try {
      this.caWatcher = watch(dir, () => {
        clearTimeout(this.caReloadTimer);
        this.caReloadTimer = setTimeout(() => {
          this.caReloading = this.caReloading.then(() => this.reloadCa(dir));
        }, CA_RELOAD_DELAY_MS);
      });
      this.caWatcher.on('error', (e) => log.error({ dir, err: e.message }, 'the CA folder cannot be watched: restart the control plane after changing it'));
    } catch (e) {
      log.error({ dir, err: (e as Error).message }, 'the CA folder cannot be watched: restart the control plane after changing it');
    }
  }

  /**
   * The CA, from its folder; with --ca-secret the Secret decides what the folder holds: its root
   * when it exists, else the root this control plane creates, stored as the Secret (another
   * control plane that stored one first wins, and its root is used).
   */
  private async openCa(dir: string, trustDomain: string): Promise<CertificateAuthority> {
    const secret = this.caSecret;
    if (!secret) return CertificateAuthority.open(dir, trustDomain);
    const signal = AbortSignal.timeout(CA_SECRET_TIMEOUT_MS);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    if ((await secret.restore(dir, signal)) === undefined) {
      const ca = await CertificateAuthority.open(dir, trustDomain);
      if (await secret.store(dir, signal)) {
        this.metrics.caSecret.inc({ result: 'stored' });
        log.info({ secret: secret.ref, created: ca.created }, 'stored the CA in its Secret');
        return ca;
      }
      if ((await secret.restore(dir, signal)) === undefined) throw new NodemeshError('NM_ERR_CA', `the CA Secret ${secret.ref} was created by another control plane and then deleted`, { context: { object: `Secret/${secret.ref}` } });
    }
    this.metrics.caSecret.inc({ result: 'restored' });
    log.info({ secret: secret.ref }, 'the CA comes from its Secret');
    return CertificateAuthority.open(dir, trustDomain, { create: false });
  }

  /**
   * Keeps the CA folder following its Secret (a rotation is an update of the Secret; the folder
   * watcher reloads the CA) and the ConfigMap of trusted roots following the CA. A failure is
   * logged and counted, and tried again at the next round; the CA keeps what it has.
   */
  private async syncCaSecret(dir: string): Promise<void> {
    const secret = this.caSecret;
    if (!secret || !this.ca) return;
    const signal = AbortSignal.timeout(CA_SECRET_TIMEOUT_MS);
    try {
      if ((await secret.restore(dir, signal)) === true) {
        this.metrics.caSecret.inc({ result: 'restored' });
        log.info({ secret: secret.ref }, 'the CA Secret changed: the CA folder follows it');
      }
      const roots = this.ca.roots().join('');
      if (roots !== this.publishedRoots) {
        await secret.publishRoots(this.ca.roots(), signal);
        this.publishedRoots = roots;
      }
    } catch (e) {
      this.metrics.caSecret.inc({ result: 'failed' });
      log.error({ secret: secret.ref, err: (e as Error).message }, 'the CA Secret or the trusted roots ConfigMap cannot be synced; tried again shortly');
    }
  }

  private async reloadCa(dir: string): Promise<void> {
    const current = this.ca;
    if (!current) return;
    let next: CertificateAuthority;
    try {
      next = await CertificateAuthority.open(dir, current.trustDomain, { create: false });
    } catch (e) {
      this.metrics.caReloads.inc({ result: 'failed' });
      log.error({ dir, err: (e as Error).message }, 'the CA folder changed but does not load; the CA keeps signing as before');
      return;
    }
    if (next.sameAs(current)) return;
    this.ca = next;
    this.metrics.caReloads.inc({ result: 'loaded' });
    log.info({ dir, roots: next.roots().length }, 'CA reloaded: new certificates chain to its signing root; every node gets the new trust bundle');
    if (this.caSecret) void this.syncCaSecret(dir);
    this.changed();
  }

  /** A change: pushed with the others of the next BATCH_MS as one version. */
  private changed(): void {
    if (this.batch || !this.warm) return;
    this.changedAt = performance.now();
    this.batch = setTimeout(() => this.flush(), BATCH_MS);
  }

  /** A new version (monotonic across restarts: never below the wall clock in ms), pushed to every node. */
  private flush(): void {
    this.batch = undefined;
    // Before the source's first full view, any version would tell agents that objects are gone.
    if (!this.store.reader.synced()) return;
    this.version = Math.max(this.version + 1, Date.now());
    this.versionAt = this.changedAt;
    this.metrics.configVersion.set(this.version);
    this.computeScopes();
    for (const s of this.streams.values()) this.push(s);
  }

  private push(s: AgentStream): void {
    if (!this.warm) return;
    if (s.pending) {
      s.dirty = true;
      return;
    }
    s.dirty = false;
    const view = this.viewOf(s.node);
    // Nothing this node needs changed: it stays on the version it has.
    if (s.held && s.heldDigest === view.digest) return;
    const held = s.held;
    s.pending = { version: this.version, digest: view.digest, hashes: view.hashes, at: this.versionAt };
    // Nodes that need the same get the same bytes: each message is encoded once per version.
    const memo = held ? `${s.heldVersion}:${s.heldDigest}>${view.digest}` : `>${view.digest}`;
    let message = this.encoded.get(memo);
    if (!message) {
      if (!held) message = encodeControlPlaneMessage({ snapshot: { version: this.version, digest: view.digest, resources: [...view.resources.values()] } });
      else {
        const upserts: WireResource[] = [];
        for (const [k, h] of view.hashes) if (held.get(k) !== h) upserts.push(view.resources.get(k) as WireResource);
        const removals = [...held.keys()].filter((k) => !view.hashes.has(k)).map(keyParts);
        message = encodeControlPlaneMessage({ delta: { version: this.version, baseVersion: s.heldVersion, digest: view.digest, upserts, removals } });
      }
      this.encoded.set(memo, message);
    }
    this.metrics.pushes.inc({ type: held ? 'delta' : 'snapshot' });
    s.call.write(message as unknown as ControlPlaneMessage);
  }

  private async serveGrpc(): Promise<void> {
    const { listen, listenTls } = this.options;
    if (!listen && !listenTls) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', 'the control plane needs a gRPC port: --listen-tls (TLS, 15012) or --listen (plaintext, loopback)', { context: { field: 'listen-tls' }, hint: 'give --listen-tls 0.0.0.0:15012' });
    if (listenTls && !this.ca) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', '--listen-tls needs the CA (--ca-dir) for its serving certificate', { context: { field: 'ca-dir' }, hint: 'give --ca-dir DIR' });
    const server = new Server({
      'grpc.max_receive_message_length': 4 * 1024 * 1024,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
    });
    server.addService(discoveryServerService(), { Stream: (call: ServerDuplexStream<AgentMessage, ControlPlaneMessage>) => this.serveStream(call) });
    if (this.ca) server.addService(certificatesService(), { Sign: (call: ServerUnaryCall<SignRequest, SignResponse>, done: sendUnaryData<SignResponse>) => void this.serveSign(call, done) });
    this.grpc = server;
    if (listen) this.port = await bind(server, listen, 'listen', ServerCredentials.createInsecure());
    if (listenTls && this.ca) {
      const serving = await this.ca.servingCertificate(servingNames(), servingAddresses(listenTls.host));
      const credentials = ServerCredentials.createSsl(null, [{ cert_chain: Buffer.from(serving.chainPem), private_key: Buffer.from(serving.keyPem) }], false);
      this.tlsPort = await bind(server, listenTls, 'listen-tls', credentials);
      log.info({ listenTls: `${listenTls.host}:${this.tlsPort}`, notAfter: serving.notAfter.toISOString() }, 'gRPC over TLS, with a serving certificate from the mesh CA');
    }
  }

  /**
   * Certificates.Sign: a certificate for a workload identity, only for a node that runs a pod with
   * that identity now (by the pods it reports, or the API's pods on it). The caller's node is its
   * token's; without agent authentication, the request's. Every outcome is counted by reason.
   */
  private async serveSign(call: ServerUnaryCall<SignRequest, SignResponse>, done: sendUnaryData<SignResponse>): Promise<void> {
    const refuse = (reason: string, code: GrpcStatus, message: string, node?: string): void => {
      this.metrics.certificates.inc({ result: reason });
      log.warn({ node, peer: call.getPeer(), reason }, `certificate refused: ${message}`);
      done({ code, details: message });
    };
    const ca = this.ca;
    if (!ca) return refuse('internal', GrpcStatus.UNIMPLEMENTED, 'this control plane has no CA');
    const request = call.request;
    let node = typeof request.node === 'string' ? request.node : '';
    if (this.tokens) {
      let authenticated: string | undefined;
      try {
        authenticated = await this.authenticate(call);
      } catch (e) {
        log.error({ err: e }, 'agent token check failed');
        return refuse('unauthenticated', GrpcStatus.UNAVAILABLE, 'the control plane cannot check agent tokens now');
      }
      if (authenticated === undefined) return refuse('unauthenticated', GrpcStatus.UNAUTHENTICATED, 'no valid agent token');
      if (node !== '' && node !== authenticated) return refuse('node_mismatch', GrpcStatus.PERMISSION_DENIED, `agent authenticated as node ${authenticated} asks for node ${node.slice(0, 253)}`, authenticated);
      node = authenticated;
    }
    if (!isNodeName(node)) return refuse('bad_request', GrpcStatus.INVALID_ARGUMENT, 'the request names no valid node');
    if (!this.signLimit.take(node)) return refuse('rate_limited', GrpcStatus.RESOURCE_EXHAUSTED, `node ${node} asks for certificates too often`, node);
    const authorize = (id: WorkloadIdentity): void => {
      const pods = this.podsByNode.get(node) ?? [];
      if (!pods.some((p) => p.namespace === id.namespace && p.serviceAccount === id.serviceAccount)) {
        throw new SignRefused('not_on_node', `node ${node} runs no pod with service account ${id.namespace}/${id.serviceAccount}`);
      }
    };
    let issued;
    try {
      issued = await ca.sign(typeof request.csr === 'string' ? request.csr : '', authorize, this.options.ca?.certTtlMs ?? DEFAULT_CERT_TTL_MS);
    } catch (e) {
      if (e instanceof SignRefused) return refuse(e.reason, e.reason === 'not_on_node' ? GrpcStatus.PERMISSION_DENIED : GrpcStatus.INVALID_ARGUMENT, e.message, node);
      log.error({ err: e, node }, 'signing failed');
      return refuse('internal', GrpcStatus.INTERNAL, 'signing failed', node);
    }
    const identity = spiffeUri(issued.identity);
    let byIdentity = this.issued.get(node);
    if (!byIdentity) this.issued.set(node, (byIdentity = new Map()));
    byIdentity.set(identity, { identity, serial: issued.serial, notAfter: issued.notAfter.toISOString() });
    this.metrics.certificates.inc({ result: 'signed' });
    log.info({ node, identity, serial: issued.serial, notAfter: issued.notAfter.toISOString() }, 'certificate signed');
    done(null, { certChain: [...issued.chain], roots: [...issued.roots] });
  }

  /**
   * A node's pod report: checked (a node is believed only about itself: its pods' uids, addresses
   * and names must not be another node's), applied at most PODS_PER_SECOND times a second per
   * node (a report that comes faster waits, and only the latest one is applied).
   */
  private report(node: string, pods: ReadonlyArray<WireWorkload>): void {
    const pending = this.pendingReports.get(node);
    if (pending) {
      pending.pods = pods;
      return;
    }
    if (!this.reportLimit.take(node)) {
      const entry = { pods, timer: setTimeout(() => {
        this.pendingReports.delete(node);
        this.applyReport(node, entry.pods);
      }, 1000 / PODS_PER_SECOND) };
      this.pendingReports.set(node, entry);
      this.metrics.podReports.inc({ result: 'delayed' });
      return;
    }
    this.applyReport(node, pods);
  }

  private applyReport(node: string, report: ReadonlyArray<WireWorkload>): void {
    const { pods, dropped } = checkPodReport(node, report, this.podsByNode, (this.options.podRanges ?? PodRanges.none()).of(node));
    for (const d of dropped) {
      this.metrics.podReports.inc({ result: d.reason });
      log.warn({ node, pod: d.pod, reason: d.reason }, `pod report entry dropped: ${d.message}`);
    }
    this.metrics.podReports.inc({ result: 'applied' });
    if (JSON.stringify(pods) === JSON.stringify(this.podsByNode.get(node))) return;
    this.podsByNode.set(node, pods);
    this.changed();
  }

  /**
   * A node whose agent went away keeps its pods as endpoints for POD_GRACE_MS (an agent restart,
   * a control plane failover), then they are withdrawn: a node that stopped reporting is not
   * believed forever.
   */
  private withdrawLater(node: string): void {
    clearTimeout(this.graceTimers.get(node));
    log.info({ node, graceMs: this.podGraceMs }, 'agent disconnected; its pods stay endpoints for the grace period unless it reports again');
    const timer = setTimeout(() => {
      this.graceTimers.delete(node);
      if (this.streams.has(node) || this.podsFromSource || !this.podsByNode.has(node)) return;
      log.warn({ node, pods: this.podsByNode.get(node)?.length ?? 0 }, 'node stopped reporting: its pods are no longer endpoints');
      this.podsByNode.delete(node);
      this.changed();
    }, this.podGraceMs);
    timer.unref();
    this.graceTimers.set(node, timer);
  }

  /** A Hello believed: the node's stream, replacing an older one of the same node. */
  private accept(call: ServerDuplexStream<AgentMessage, ControlPlaneMessage>, hello: NonNullable<AgentMessage['hello']>): AgentStream {
    const previous = this.streams.get(hello.node);
    if (previous) {
      log.info({ node: hello.node }, 'agent reconnected; the older stream of that node is closed');
      previous.call.end();
    }
    const stream = new AgentStream(hello.node, call);
    clearTimeout(this.graceTimers.get(hello.node));
    this.graceTimers.delete(hello.node);
    // The agent holds exactly what the node needs now (same digest): nothing is sent, and
    // later changes come as Deltas against it. Otherwise it gets a Snapshot.
    const view = this.viewOf(hello.node);
    if (hello.version > 0 && hello.digest === view.digest) {
      stream.held = view.hashes;
      stream.heldVersion = hello.version;
      stream.heldDigest = hello.digest;
      this.acked.set(hello.node, hello.version);
    }
    // Headers now: the agent knows it is connected even when it has nothing new to receive.
    call.sendMetadata(new Metadata());
    this.streams.set(hello.node, stream);
    this.metrics.connectedAgents.set(this.streams.size);
    log.info({ node: hello.node, agentVersion: hello.agentVersion, version: hello.version }, 'agent connected');
    this.push(stream);
    return stream;
  }

  /** The node the caller's token is bound to; undefined without a valid one (or when tokens are off). */
  private async authenticate(call: { readonly metadata: Metadata }): Promise<string | undefined> {
    if (!this.tokens) return undefined;
    const header = call.metadata.get('authorization')[0];
    const token = typeof header === 'string' && header.startsWith('Bearer ') ? header.slice(7) : undefined;
    return token === undefined ? undefined : this.tokens.nodeOf(token);
  }

  private serveStream(call: ServerDuplexStream<AgentMessage, ControlPlaneMessage>): void {
    let stream: AgentStream | undefined;
    const fail = (reason: string, code: GrpcStatus, message: string): void => {
      this.metrics.streamErrors.inc({ reason });
      log.warn({ node: stream?.node, peer: call.getPeer(), reason }, `discovery stream closed: ${message}`);
      // grpc-js ends the call with this status.
      call.emit('error', { code, details: message });
    };
    // Who the agent is, from its token (before any Hello is believed).
    const authenticated = this.authenticate(call);
    let authFailed = false;
    void authenticated.catch(() => undefined);
    call.on('data', (m: AgentMessage) => {
      if (authFailed) return;
      if (!stream) {
        const hello = m.hello;
        if (!hello || !/^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/.test(hello.node)) {
          fail('bad_hello', GrpcStatus.INVALID_ARGUMENT, hello ? `node name "${hello.node}" is not a Kubernetes node name` : 'the first message must be Hello');
          return;
        }
        if (this.tokens) {
          // Messages wait for the token check; the first (Hello) decides.
          call.pause();
          authenticated.then(
            (node) => {
              if (node === undefined) fail('unauthenticated', GrpcStatus.UNAUTHENTICATED, `agent for node ${hello.node} presented no valid token`);
              else if (node !== hello.node) fail('node_mismatch', GrpcStatus.PERMISSION_DENIED, `agent authenticated as node ${node} claims node ${hello.node}`);
              else {
                stream = this.accept(call, hello);
                call.resume();
                return;
              }
              authFailed = true;
            },
            (e: unknown) => {
              authFailed = true;
              log.error({ err: e }, 'agent token check failed');
              fail('unauthenticated', GrpcStatus.UNAVAILABLE, 'the control plane cannot check agent tokens now');
            },
          );
          return;
        }
        stream = this.accept(call, hello);
        return;
      }
      const s = stream;
      if (m.pods && this.podsFromSource) {
        log.debug({ node: s.node, pods: m.pods.pods.length }, 'pod report ignored: pods come from the Kubernetes API');
      } else if (m.pods) {
        if (m.pods.pods.length > MAX_PODS_PER_NODE) {
          fail('too_many_pods', GrpcStatus.RESOURCE_EXHAUSTED, `node ${s.node} reported ${m.pods.pods.length} pods (at most ${MAX_PODS_PER_NODE})`);
          return;
        }
        this.report(s.node, m.pods.pods);
      } else if (m.ack || m.nack) {
        const version = m.ack?.version ?? m.nack?.version ?? 0;
        const pending = s.pending;
        if (!pending || version !== pending.version) {
          log.warn({ node: s.node, version, expected: pending?.version }, 'answer for a version that was not sent; ignored');
          return;
        }
        s.pending = undefined;
        if (m.ack) {
          s.held = pending.hashes;
          s.heldVersion = pending.version;
          s.heldDigest = pending.digest;
          s.lastNack = [];
          this.acked.set(s.node, version);
          this.metrics.acks.inc({ result: 'ack' });
          this.metrics.pushSeconds.observe((performance.now() - pending.at) / 1000);
        } else {
          s.lastNack = (m.nack?.errors ?? []).slice(0, 100);
          this.metrics.acks.inc({ result: 'nack' });
          // A Delta on a base the agent does not hold: it gets a Snapshot right away. Anything
          // else would be rejected again: the next push goes out at the next change.
          if (s.lastNack.some((e) => e.object === 'Delta' && e.field === 'baseVersion')) {
            log.warn({ node: s.node, version }, 'agent holds another version than the delta assumed; sending a snapshot');
            s.held = undefined;
            s.dirty = true;
          } else {
            log.error({ node: s.node, version, errors: s.lastNack }, 'agent rejected the config; it keeps serving its last good one');
          }
        }
        if (s.dirty) this.push(s);
      }
    });
    const closed = (): void => {
      if (stream && this.streams.get(stream.node) === stream) {
        this.streams.delete(stream.node);
        this.metrics.connectedAgents.set(this.streams.size);
        this.withdrawLater(stream.node);
      }
    };
    call.on('end', () => {
      closed();
      call.end();
    });
    call.on('error', (e: Error) => {
      closed();
      log.debug({ node: stream?.node, err: e }, 'discovery stream error');
    });
    call.on('cancelled', closed);
  }
}


/** Resources by key with their hashes and the running digest; added to, never changed. */
class ResourceSet implements NodeView {
  private sum = 0n;

  constructor(
    readonly resources = new Map<string, WireResource>(),
    readonly hashes = new Map<string, bigint>(),
  ) {}

  get digest(): string {
    return digestHex(this.sum);
  }

  has(key: string): boolean {
    return this.resources.has(key);
  }

  /** Adds a resource unless one of that key is there (a workload that is the endpoint of several Services). */
  add(r: WireResource): void {
    const k = resourceKey(r);
    if (this.resources.has(k)) return;
    const h = resourceHash(r);
    this.resources.set(k, r);
    this.hashes.set(k, h);
    this.sum += h;
  }

  clone(): ResourceSet {
    const c = new ResourceSet(new Map(this.resources), new Map(this.hashes));
    c.sum = this.sum;
    return c;
  }
}

/** The resources of one version, grouped by who needs them. */
interface VersionScopes {
  /** What every node gets: mesh settings, Namespaces, Services exported everywhere with their policies and endpoints. */
  readonly base: ResourceSet;
  /** Services exported to some namespaces only: their resources (Service, policies, endpoints) by namespace/name. */
  readonly perService: ReadonlyMap<string, ReadonlyArray<WireResource>>;
  readonly everywhere: ReadonlySet<string>;
  /** Namespace -> the Services exported to it by name (not by "*"). */
  readonly exportedTo: ReadonlyMap<string, ReadonlyArray<string>>;
  /** Pod uid -> the Services it is an endpoint of. */
  readonly servicesOf: ReadonlyMap<string, ReadonlyArray<string>>;
  /** Views by the set of extra Services, shared by nodes that need the same. */
  readonly byScope: Map<string, ResourceSet>;
}

function emptyScopes(): VersionScopes {
  return { base: new ResourceSet(), perService: new Map(), everywhere: new Set(), exportedTo: new Map(), servicesOf: new Map(), byScope: new Map() };
}

/** Binds one gRPC port; a port that is taken is found first with a plain listen (NM_ERR_PORT_IN_USE, naming the option). */
async function bind(server: Server, at: HostPort, field: string, credentials: Credentials): Promise<number> {
  // gRPC's bind error is a sentence without the errno (and it prints it to stderr itself).
  await checkListen(at, field);
  return new Promise<number>((resolve, reject) => {
    server.bindAsync(`${at.host.includes(':') ? `[${at.host}]` : at.host}:${at.port}`, credentials, (err, bound) => {
      if (!err) resolve(bound);
      // Taken in the moment between the check and the bind.
      else if (err.message.includes('EADDRINUSE')) reject(listenError(Object.assign(new Error(err.message), { code: 'EADDRINUSE', syscall: 'listen' }), at, field));
      else reject(err);
    });
  });
}

/** The names agents may dial the control plane by: this host, and its Service in a cluster. */
function servingNames(): string[] {
  const service = 'nodemesh-control-plane';
  // CONTROL_PLANE_TLS_NAME is among them: agents that dial an address check the certificate for it.
  return [...new Set(['localhost', hostname().toLowerCase(), service, `${service}.nodemesh-system`, CONTROL_PLANE_TLS_NAME, `${service}.nodemesh-system.svc.cluster.local`])];
}

/** The addresses agents may dial it at: the one it listens on, or every address of this host. */
function servingAddresses(listenHost: string): string[] {
  const all = Object.values(networkInterfaces()).flatMap((list) => (list ?? []).map((i) => i.address.split('%')[0] ?? i.address));
  const specific = listenHost !== '0.0.0.0' && listenHost !== '::' && /^[0-9a-f.:]+$/i.test(listenHost);
  return [...new Set(specific ? [listenHost, '127.0.0.1', '::1'] : ['127.0.0.1', '::1', ...all])];
}
