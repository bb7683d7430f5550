/**
 * The node agent: discovers the pods of its node, enrolls them (BPF links pinned, in-pod
 * listeners, a probe proving capture), keeps the proxy's routing snapshot current from the
 * config, and serves metrics, readiness and admin. One reconcile loop, one mutator per state:
 * the datapath owns BPF, the proxy owns sockets, the agent owns the set of enrolled pods.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Server } from 'node:http';

import { DEFAULT_MESH, logsAccess, shouldEnroll } from '../config/mesh.js';
import { MeshSnapshot, type Workload } from '../config/snapshot.js';
import { ConfigDirReader, ConfigStore, EMPTY_CONFIG, recordConfigObjects, recordRejections, type MeshConfig, type RejectedObject } from '../config/store.js';
import { NodeMetrics, type EnrollErrorReason } from '../proxy/metrics/metrics.js';
import { NodeProxy } from '../proxy/node-proxy.js';
import { rmdirWhenEmpty } from '../runtime/cgroup.js';
import { agentAnswers, ENROLL_SOCKET, type CniPod, type CniRef, type EnrollAnswer, type EnrollPod } from '../runtime/enrollment.js';
import { NodemeshError, isNodemeshError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { isAlive } from '../shared/process.js';
import { Gauge } from '../shared/prom.js';
import type { SocketAddress } from '../shared/address.js';
import { channelStats, probeConnect, raiseFdLimit } from '../datapath/native.js';
import { NodeDatapath } from '../datapath/node-datapath.js';
import { teardownNode, type KnownPod, type TeardownReport } from '../datapath/teardown.js';
import type { CertificateManager } from '../identity/certificates.js';
import { spiffeUri } from '../identity/spiffe.js';
import type { TunnelIdentities } from '../proxy/tunnel/hbone.js';
import type { ControlPlaneClient } from './control-plane-client.js';
import { CniInstaller, type CniInstallOptions } from './cni-install.js';
import { EnrollmentServer, type EnrollTarget, type HoldOutcome } from './enrollment-server.js';
import { abortHandover, beginHandover, checkBeginRequest, commitHandover, ENROLL_SOCKET_NEXT, HANDOVER_COMMIT_MS, HANDOVER_PROTOCOL, HANDOVER_THAW_MS, handoverRefused, postJson, sendSockets, type BeginAnswer } from './handover.js';
import { closeInherited, handoverCommitted } from '../proxy/listen-sockets.js';
import { json, serveHttp, serveHttpUnix, type HostPort, type Routes } from '../shared/http.js';
import type { NodePod, PodSource } from './pods/source.js';
import type { PodEdge } from './pods/validate.js';
import { byNamespaceName } from '../shared/order.js';

const log = logger('agent');

/** A link-local address no workload uses: a probe to it must be captured to succeed. */
export const PROBE_ADDRESS: SocketAddress = { family: 4, address: '169.254.255.253', port: 15999 };

export interface AgentOptions {
  readonly node: string;
  /** The cgroup every pod of this node lives under (fail-closed enrollment gates it). */
  readonly podsCgroup: string;
  /** The agent's run folder: its enrollment socket (root only). */
  readonly runDir: string;
  /** What a pod handed over must satisfy besides podsCgroup (the local runtime's netns folder and subnets). */
  readonly podEdge?: Omit<PodEdge, 'podsCgroup'>;
  /** Kubernetes: nodemesh-cni is installed into the node's CNI folders while the agent runs (the enrollment socket is the run folder's). */
  readonly cni?: Omit<CniInstallOptions, 'enrollSocket'>;
  /** Where the config comes from: a folder (standalone mode) or the control plane's stream. */
  readonly config: ConfigFeed;
  readonly pinRoot: string;
  readonly metrics: HostPort;
  readonly ready: HostPort;
  readonly admin: HostPort;
  readonly passthrough: 'allow' | 'deny';
  readonly connectTimeoutMs: number;
  readonly idleTimeoutMs: number;
  readonly probeTimeoutMs: number;
  /** Copy bytes with splice() in the addon (default) rather than through JS streams. */
  readonly kernelRelay: boolean;
  /** What carries HBONE tunnels (see ProxyOptions.hboneEngine). */
  readonly hboneEngine?: 'native' | 'node';
  /** Open proxied connections node-wide (default: what the open file limit allows). */
  readonly maxConnections?: number;
  /** Open proxied connections of one pod (default: half the node's). */
  readonly maxConnectionsPerPod?: number;
  /**
   * An agent already serving the node is asked to hand it over (src/agent/handover.ts) instead of
   * this one refusing to start: a DaemonSet rolling with maxSurge.
   */
  readonly takeOver?: boolean;
  /** After a handover, how long the old agent keeps relaying its connections once told to stop (default 20 s). */
  readonly drainTimeoutMs?: number;
  /** This agent's pod UID (Kubernetes): readiness is also served on <run dir>/ready-<uid>.sock. */
  readonly instance?: string;
}

export type ConfigFeed =
  | { readonly kind: 'dir'; readonly dir: string }
  | {
      readonly kind: 'control-plane';
      readonly address: HostPort;
      readonly tokenFile?: string;
      /** PEM roots from --ca-root: the control plane is dialled over TLS and checked against them. */
      readonly caRoots?: string;
    };

/** The config the control plane sent for this node: applied whole, under the control plane's version. */
export interface RemoteConfig {
  readonly version: number;
  /** The snapshot's digest (the agent says it in Hello when it reconnects). */
  readonly digest: string;
  readonly config: MeshConfig;
  /** Workloads of the whole mesh this node needs (endpoints elsewhere, its own pods). */
  readonly workloads: ReadonlyArray<Workload>;
  /** The mesh's roots, the signing one first (with a CA). */
  readonly trustBundle?: ReadonlyArray<string>;
}

export interface EnrolledPodStatus {
  readonly uid: string;
  readonly namespace: string;
  readonly name: string;
  readonly ip4: string;
  readonly ip6: string;
  readonly verified: boolean;
  /** The proxy holds the pod's config (with a control plane: the snapshot applied covers the pod). */
  readonly configured: boolean;
  /** The pod's workload identity (spiffe://...). */
  readonly identity: string;
  /** The node holds a valid certificate for that identity (always true without a control plane: no CA). */
  readonly certified: boolean;
  readonly connections: number;
  readonly enrolledAt: string;
}

interface EnrollWaiter {
  readonly pod: EnrollPod;
  settle(result: EnrollAnswer | NodemeshError): void;
}

interface Enrolled {
  readonly pod: NodePod;
  verified: boolean;
  readonly enrolledAt: string;
}

export class NodeAgent {
  private readonly enrolled = new Map<string, Enrolled>();
  /** Pods that failed to enroll: not retried before `retryAt`, and logged once per reason. */
  private readonly failed = new Map<string, { reason: EnrollErrorReason; message: string; retryAt: number; attempts: number }>();
  private readonly probeWaiters = new Map<string, () => void>();
  /**
   * Pods a runtime handed over before their command runs (the enrollment endpoint), until the
   * pod source lists them. `until`: dropped then if the source never does (the runtime died).
   */
  private readonly announced = new Map<string, { readonly pod: NodePod; until: number }>();
  /** Runtimes waiting for a pod to be enrolled, verified and configured. */
  private readonly enrollWaiters = new Map<string, Set<EnrollWaiter>>();
  /** Control plane mode: the uids of the workloads in the applied snapshot (its own pods among them). */
  private remoteUids: ReadonlySet<string> = new Set();
  private enrollment: EnrollmentServer | undefined;
  /** Pods whose runtime is stopping them: no longer endpoints (dropped when the pod is gone). */
  private readonly draining = new Set<string>();
  private stopping = false;
  /** cgroup id -> pod, for the cgroups allowed past the fail-closed gate. */
  private readonly allowedCgroups = new Map<bigint, string>();
  private readonly servers: Server[] = [];
  private config: MeshConfig = EMPTY_CONFIG;
  /** Standalone mode: the config folder. */
  private store: ConfigStore | undefined;
  /** Control plane mode: the Discovery stream. */
  private cpClient: ControlPlaneClient | undefined;
  /** The node's workload certificates (with a control plane, whose CA signs them). */
  private certificates: CertificateManager | undefined;
  /** Control plane mode: the last snapshot applied. */
  private remote: RemoteConfig | undefined;
  /** Every pod on the node (the source's and the handed-over ones). */
  private pods: ReadonlyArray<NodePod> = [];
  /** The pods the mesh serves now (see servable): the snapshot's and the control plane's view of this node. */
  private served: ReadonlyArray<NodePod> = [];
  private version = 0;
  /** Called when the node's pods change (the control plane client reports them). */
  private readonly podListeners: Array<(pods: ReadonlyArray<Workload>) => void> = [];
  private configLoaded = false;
  private reconciled = false;
  private running: Promise<void> | undefined;
  private again = false;
  private stopWatch: (() => void) | undefined;

  private constructor(
    private readonly options: AgentOptions,
    private readonly source: PodSource,
    private readonly datapath: NodeDatapath,
    readonly metrics: NodeMetrics,
    private readonly proxy: NodeProxy,
  ) {}

  static async start(options: AgentOptions, source: PodSource): Promise<NodeAgent> {
    // First: it also proves that no other agent serves this node, before anything is touched.
    let agent: NodeAgent | undefined;
    const target: EnrollTarget = {
      enrollAnnounced: (pod, deadline, signal) => {
        if (!agent) return Promise.reject(new NodemeshError('NM_ERR_ENROLL_FAILED', 'the agent is starting', { hint: 'try again in a moment' }));
        return agent.enrollAnnounced(pod, deadline, signal);
      },
      drain: async (uid) => agent?.drain(uid),
      enrollCni: (pod, deadline, signal) => {
        if (!agent) return Promise.reject(new NodemeshError('NM_ERR_ENROLL_FAILED', 'the agent is starting', { hint: 'try again in a moment' }));
        return agent.enrollCni(pod, deadline, signal);
      },
      checkCni: async (ref) => {
        if (!agent) throw new NodemeshError('NM_ERR_ENROLL_FAILED', 'the agent is starting', { hint: 'try again in a moment' });
        return agent.checkCni(ref);
      },
      releaseCni: async (ref) => agent?.releaseCni(ref),
      handoverBegin: async (request) => {
        if (!agent) throw new NodemeshError('NM_ERR_AGENT_RUNNING', 'the agent is starting');
        return agent.handoverBegin(request);
      },
      handoverCommit: async () => agent?.handoverCommit(),
      handoverAbort: async () => agent?.thaw('the new agent gave up'),
      probeArrived: (uid) => agent?.probeWaiters.get(uid)?.(),
    };
    // Another agent serves the node: it hands the node over (a surge rollout), or this one stops.
    const taking = options.takeOver && (await agentAnswers(join(options.runDir, ENROLL_SOCKET))) ? await beginHandover(options.runDir) : undefined;
    // Failing before the commit: the old agent carries on with the sockets it sent.
    const giveUp = async (): Promise<void> => {
      if (!taking) return;
      await abortHandover(options.runDir);
      closeInherited();
    };
    let enrollment: EnrollmentServer;
    let datapath: NodeDatapath;
    try {
      enrollment = await EnrollmentServer.start(options.runDir, { ...options.podEdge, podsCgroup: options.podsCgroup }, target, { next: taking !== undefined });
    } catch (e) {
      await giveUp();
      throw e;
    }
    try {
      datapath = await NodeDatapath.open(options.pinRoot);
    } catch (e) {
      await enrollment.close();
      await giveUp();
      throw e;
    }
    const metrics = new NodeMetrics(() => datapath.mapEntries(), () => datapath.captureRefusals(), channelStats);
    source.register?.(metrics.registry);
    new Gauge({
      name: 'nodemesh_agent_degraded',
      help: 'Whether the agent serves its pods while a part of it is failing (the pod source cannot reach the Kubernetes API, ...); /healthz/ready names the cause',
      registers: [metrics.registry],
      collect() {
        this.set((agent?.health().degraded.length ?? 0) > 0 ? 1 : 0);
      },
    });
    // Each proxied connection holds several fds: the soft limit (often 1024) is raised to the hard
    // one, and the proxy keeps its connection limits below it (NodeProxy.connectionLimits).
    const fds = raiseFdLimit();
    log.info({ soft: fds.soft, hard: fds.hard }, 'open file limit');
    // With a control plane, the node holds workload certificates (its CA signs them): pods of
    // other nodes are reached through HBONE tunnels and this node's pods accept them.
    // One setting, the mesh config's: certificates, tunnels and metric labels never disagree.
    const trustDomain = (): string => agent?.config.mesh.trustDomain ?? DEFAULT_MESH.trustDomain;
    const tunnel: TunnelIdentities | undefined =
      options.config.kind === 'control-plane'
        ? {
            certificate: (uri) => agent?.certificates?.get(uri),
            roots: () => agent?.certificates?.roots() ?? [],
            trustDomain,
          }
        : undefined;
    const proxy = new NodeProxy(datapath, metrics, {
      ...(tunnel ? { tunnel } : {}),
      trustDomain,
      accessLog: (namespace) => logsAccess(agent?.config.mesh ?? DEFAULT_MESH, namespace),
      passthrough: options.passthrough,
      connectTimeoutMs: options.connectTimeoutMs,
      idleTimeoutMs: options.idleTimeoutMs,
      probe: PROBE_ADDRESS,
      onProbe: (uid) => agent?.probeArrived(uid),
      kernelRelay: options.kernelRelay,
      ...(options.hboneEngine ? { hboneEngine: options.hboneEngine } : {}),
      fdLimit: fds.soft,
      ...(options.maxConnections === undefined ? {} : { maxConnections: options.maxConnections }),
      ...(options.maxConnectionsPerPod === undefined ? {} : { maxConnectionsPerPod: options.maxConnectionsPerPod }),
    });
    agent = new NodeAgent(options, source, datapath, metrics, proxy);
    agent.enrollment = enrollment;
    agent.taking = taking;
    try {
      await agent.startInstanceSocket();
      // Taking over: the host ports are the old agent's until the commit.
      if (!taking) await agent.startServers();
      if (options.config.kind === 'dir') {
        const self = agent;
        agent.store = new ConfigStore(new ConfigDirReader(options.config.dir), { onLoad: (config, rejected) => self.configRead(config, rejected) });
        await agent.store.load();
        agent.store.watch();
      } else {
        // Loaded only in this mode: gRPC and protobuf cost ~5 MiB of resident memory (bench/memory.ts).
        const { ControlPlaneClient, readTokenFile } = await import('./control-plane-client.js');
        // A token file that cannot be read at start is a setup error: stop with it (the client
        // would retry it forever, as it does at a reconnect while the token is rotated).
        if (options.config.tokenFile !== undefined) await readTokenFile(options.config.tokenFile);
        const m = metrics;
        const client = new ControlPlaneClient(options.config.address, options.node, agent, {
          onAck: () => m.snapshots.inc({ result: 'applied' }),
          onNack: () => m.snapshots.inc({ result: 'rejected' }),
          onConnected: (up) => m.controlPlaneConnected.set(up ? 1 : 0),
        }, options.config.tokenFile, options.config.caRoots);
        agent.cpClient = client;
        const { CertificateManager } = await import('../identity/certificates.js');
        const { splitPem } = await import('../identity/x509.js');
        const self = agent;
        agent.certificates = new CertificateManager({ sign: (csr) => client.sign(csr) }, options.config.caRoots === undefined ? [] : splitPem(options.config.caRoots), {
          onIssued: () => {
            self.recordCertificates();
            self.proxy.identitiesChanged();
            self.settleEnrollWaiters();
          },
          onResult: (result) => m.certificateRequests.inc({ result }),
          onRootsChanged: (roots) => {
            m.trustedRoots.set(roots.length);
            self.proxy.identitiesChanged();
          },
        });
        m.trustedRoots.set(agent.certificates.roots().length);
        client.start();
      }
      await agent.reconcile();
      agent.stopWatch = source.watch(() => void agent?.reconcile());
      if (taking) await agent.commit(taking);
    } catch (e) {
      if (agent.taking) {
        // The old agent keeps serving with the same sockets and map entries: leave them alone.
        agent.proxy.stopListening();
        await giveUp();
      }
      await agent.stop();
      throw e;
    }
    if (options.cni) {
      // Last: from here the runtime holds new pods' starts until this agent has them.
      agent.cni = new CniInstaller({ ...options.cni, enrollSocket: join(options.runDir, ENROLL_SOCKET) });
      try {
        await agent.cni.start();
      } catch (e) {
        await agent.stop();
        throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `nodemesh-cni cannot be installed: ${(e as Error).message}`, { context: { path: options.cni.binDir, field: 'cni-bin-dir' }, hint: "mount the node's CNI folders into the agent (the DaemonSet does)", cause: e });
      }
    }
    log.info({ node: options.node, pods: agent.enrolled.size, services: agent.config.services.length, config: options.config.kind }, 'agent started');
    return agent;
  }

  private cni: CniInstaller | undefined;

  /** New agent: the handover this agent started with, until it commits. */
  private taking: BeginAnswer | undefined;
  /** Old agent: a handover under way (frozen until commit, abort, or the new agent's end). */
  private handover: { readonly pid: number; settle(outcome: HoldOutcome): void; readonly timer: NodeJS.Timeout; readonly watch: NodeJS.Timeout } | undefined;
  /** Old agent: the node was handed over; this agent only drains what it holds. */
  handedOver = false;

  /**
   * Old agent: a new agent asks for the node. Freezes (no reconcile, no enrollment: requests wait;
   * the control plane stream closed so the new agent gets it), sends copies of every in-pod
   * listening socket, and answers with the pods verified here. Keeps accepting and relaying until
   * the commit.
   */
  async handoverBegin(request: unknown): Promise<BeginAnswer> {
    if (this.stopping || this.handedOver) throw handoverRefused('this agent is stopping');
    if (this.handover) throw handoverRefused(`a handover to process ${this.handover.pid} is under way`);
    if (this.taking) throw handoverRefused('this agent is itself taking the node over');
    const begin = checkBeginRequest(request, this.options.runDir);
    let settle: (outcome: HoldOutcome) => void = () => undefined;
    const outcome = new Promise<HoldOutcome>((resolve) => (settle = resolve));
    this.handover = {
      pid: begin.pid,
      settle,
      timer: setTimeout(() => this.thaw(`no commit within ${HANDOVER_THAW_MS / 1000} s`), HANDOVER_THAW_MS),
      watch: setInterval(() => {
        if (!isAlive(begin.pid)) this.thaw(`the new agent (process ${begin.pid}) exited`);
      }, 250),
    };
    this.enrollment?.hold(outcome);
    this.cpClient?.pause();
    // Nothing is written to the pins or maps from here: a pass under way ends first.
    await this.running;
    let sockets: number;
    try {
      sockets = sendSockets(begin.socket, this.proxy.listeningSockets());
    } catch (e) {
      this.thaw(`the sockets could not be sent: ${(e as Error).message}`);
      throw e;
    }
    const verified = [...this.enrolled.values()].filter((e) => e.verified).map((e) => e.pod.uid);
    log.info({ to: begin.pid, sockets, pods: this.enrolled.size, verified: verified.length }, 'handing the node over: frozen, listening sockets sent');
    return { protocol: HANDOVER_PROTOCOL, pid: process.pid, verified };
  }

  /** Old agent: the new agent serves the node. Stops accepting and answering; drains what it holds. */
  async handoverCommit(): Promise<void> {
    const h = this.endHandover();
    if (!h) throw new NodemeshError('NM_ERR_AGENT_RUNNING', 'no handover is under way');
    this.handedOver = true;
    this.proxy.stopListening();
    for (const s of this.servers) {
      s.close();
      s.closeAllConnections();
    }
    this.servers.length = 0;
    // Requests held meanwhile go to the new agent; the commit's own answer is written first.
    h.settle('committed');
    void this.enrollment?.closeHandedOver();
    log.info({ to: h.pid, connections: this.proxy.openConnections() }, 'node handed over: draining the connections held here');
  }

  /** Old agent: the handover under way, if any, is over (its timers stopped); returns it. */
  private endHandover(): typeof this.handover {
    const h = this.handover;
    if (!h) return undefined;
    clearTimeout(h.timer);
    clearInterval(h.watch);
    this.handover = undefined;
    return h;
  }

  /** Old agent: the handover did not complete; this agent carries on as before it. */
  thaw(reason: string): void {
    const h = this.endHandover();
    if (!h) return;
    this.datapath.reclaimPrograms();
    // The new agent may have pointed a pod's address at a socket of its own, gone with it.
    this.proxy.resteer();
    this.cpClient?.resume();
    h.settle('thawed');
    log.warn({ to: h.pid, reason }, 'handover off: serving the node again');
    void this.reconcile();
  }

  /**
   * New agent: commits once it serves every pod the old agent had verified (with its config and
   * certificates), then takes the host ports and the enrollment socket.
   */
  private async commit(taking: BeginAnswer): Promise<void> {
    const deadline = Date.now() + HANDOVER_COMMIT_MS;
    for (;;) {
      const missing = this.notTakenOver(taking.verified);
      if (missing.length === 0) break;
      if (Date.now() > deadline) {
        throw new NodemeshError('NM_ERR_AGENT_RUNNING', `the node cannot be taken over: not served within ${HANDOVER_COMMIT_MS / 1000} s: ${missing.join(', ')}`, { hint: 'the running agent keeps serving the node; see this agent\'s log' });
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
      await this.reconcile();
    }
    await commitHandover(this.options.runDir);
    // The old agent no longer accepts: this one does (connections waited in the queues meanwhile).
    handoverCommitted();
    this.enrollment?.moved(join(this.options.runDir, ENROLL_SOCKET));
    this.taking = undefined;
    // The old agent may have dropped a map entry while it went (a stop mid-handover).
    this.proxy.resteer();
    for (let attempt = 0; ; attempt++) {
      try {
        await this.startServers();
        break;
      } catch (e) {
        for (const s of this.servers.splice(0)) s.close();
        if ((e as NodeJS.ErrnoException).code !== 'EADDRINUSE' || attempt >= 50) throw e;
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    const orphans = closeInherited();
    log.info({ from: taking.pid, pods: this.enrolled.size, orphanSockets: orphans }, 'node taken over');
  }

  /** What keeps the new agent from committing: each pod the old one had verified must be served here too. */
  private notTakenOver(verified: ReadonlyArray<string>): string[] {
    const missing: string[] = [];
    if (!this.configLoaded) missing.push('the config');
    if (!this.reconciled || !this.health().synced) missing.push("the node's pods");
    for (const uid of verified) {
      const pod = this.pods.find((p) => p.uid === uid);
      if (!pod || !this.wants(pod) || this.draining.has(uid)) continue;
      const e = this.enrolled.get(uid);
      if (!e?.verified || !this.configured(uid) || !this.certified(pod)) missing.push(`${pod.namespace}/${pod.name}`);
    }
    return missing;
  }

  /** Whether the pod source knows the node's pods, and what keeps the agent degraded (serving, but not whole). */
  private health(): { synced: boolean; degraded: ReadonlyArray<string> } {
    const source = this.source.health?.() ?? { synced: true, degraded: [] };
    const cni = this.cni?.problem;
    return { synced: source.synced, degraded: [...source.degraded, ...(cni === undefined ? [] : [`nodemesh-cni: ${cni}`])] };
  }

  /** Liveness and readiness: on the host's port, and on this instance's own socket (see startInstanceSocket). */
  private healthRoutes(): Routes {
    return {
      // Live while the event loop answers: a pod that is not yet verified makes the agent not
      // ready, never a reason to restart it.
      '/healthz/live': async () => json({ live: true }, 200),
      '/healthz/ready': async () => {
        // Ready: every pod of the node is captured, proven, and served with the complete config
        // the control plane has for it (its snapshot covers the pod), not a part of it.
        const enrolled = [...this.enrolled.values()];
        const notVerified = enrolled.filter((e) => !e.verified).map((e) => `${e.pod.namespace}/${e.pod.name}`);
        const notConfigured = enrolled.filter((e) => !this.configured(e.pod.uid)).map((e) => `${e.pod.namespace}/${e.pod.name}`);
        const notCertified = enrolled.filter((e) => !this.certified(e.pod)).map((e) => `${e.pod.namespace}/${e.pod.name}`);
        // Degraded (the API server went away after the pods were listed) is said, not unready:
        // the node's pods keep being served from what the agent knows.
        // With nodemesh-cni to install: not ready until it is chained (a pod started before
        // that would not wait for its capture).
        const health = this.health();
        const cniChained = this.options.cni === undefined || this.cni?.installed === true;
        // Taking the node over: ready once the node is this agent's (the commit). Handed over: never again.
        const serving = this.taking === undefined && !this.handedOver;
        const ok = serving && this.configLoaded && this.reconciled && health.synced && cniChained && notVerified.length === 0 && notConfigured.length === 0 && notCertified.length === 0;
        return json({ ready: ok, ...(this.taking ? { takingOver: true } : {}), ...(this.handedOver ? { handedOver: true } : {}), configLoaded: this.configLoaded, reconciled: this.reconciled, podsListed: health.synced, ...(this.options.cni ? { cniChained } : {}), degraded: health.degraded, notVerified, notConfigured, notCertified }, ok ? 200 : 503);
      },
    };
  }

  /**
   * Kubernetes: readiness on <run dir>/ready-<pod uid>.sock, which the DaemonSet's exec probe
   * (`nodemesh-cni agent-ready`) asks. Two agent pods of a node share the host's port 15021
   * while one takes the node over, so an HTTP probe there could get the other agent's answer.
   */
  private async startInstanceSocket(): Promise<void> {
    const instance = this.options.instance;
    if (instance === undefined) return;
    // Sockets of agent pods that were killed (a SIGKILL leaves its socket): one per pod would pile up.
    for (const name of await readdir(this.options.runDir).catch(() => [])) {
      const path = join(this.options.runDir, name);
      const handover = /^handover-(\d+)\.sock$/.exec(name);
      if (handover ? !isAlive(Number(handover[1])) : /^ready-[0-9a-f-]{36}\.sock$/.test(name) && !(await agentAnswers(path))) await rm(path, { force: true });
    }
    this.instanceSocket = join(this.options.runDir, `ready-${instance}.sock`);
    this.instanceServer = await serveHttpUnix(this.instanceSocket, this.healthRoutes());
  }

  private instanceSocket: string | undefined;
  private instanceServer: Server | undefined;

  private async startServers(): Promise<void> {
    const { metrics, ready, admin } = this.options;
    this.servers.push(
      await serveHttp(metrics, {
        '/metrics': async () => ({ status: 200, type: this.metrics.registry.contentType, body: await this.metrics.registry.metrics() }),
      }, 'metrics'),
    );
    this.servers.push(await serveHttp(ready, this.healthRoutes(), 'ready'));
    this.servers.push(
      await serveHttp(admin, {
        '/pods': async () =>
          json({
            node: this.options.node,
            configVersion: this.version,
            ...(this.cpClient ? { controlPlane: { connected: this.cpClient.isConnected(), version: this.remote?.version ?? 0 } } : {}),
            pods: this.status(),
            certificates: this.certificates?.status() ?? [],
          }),
        '/config': async () => json(this.configDump()),
        '/debug/memory': async () => json({ ...process.memoryUsage(), pods: this.enrolled.size }),
      }, 'admin'),
    );
  }

  status(): EnrolledPodStatus[] {
    return [...this.enrolled.values()]
      .map((e) => ({
        uid: e.pod.uid,
        namespace: e.pod.namespace,
        name: e.pod.name,
        ip4: e.pod.ip4,
        ip6: e.pod.ip6,
        verified: e.verified,
        configured: this.configured(e.pod.uid),
        identity: this.identityOf(e.pod),
        certified: this.certified(e.pod),
        connections: this.proxy.activeConnections(e.pod.uid),
        enrolledAt: e.enrolledAt,
      }))
      .sort(byNamespaceName);
  }

  private configDump(): unknown {
    const snapshot = this.proxy.currentSnapshot();
    return {
      version: snapshot.version,
      warnings: snapshot.warnings,
      services: snapshot.targets().map((t) => ({
        service: t.key,
        clusterIPs: t.service.clusterIPs,
        targetPort: t.port.targetPort,
        policy: t.policy,
        endpoints: t.endpoints.map((e) => ({ pod: `${e.workload.namespace}/${e.workload.name}`, ip4: e.workload.ip4, ip6: e.workload.ip6, port: e.port, ...this.proxy.endpointState(e) })),
        ...(t.split ? { route: t.route, split: t.split.map((b) => ({ backend: b.target.key, weight: b.weight })) } : {}),
        // An HTTP port routed per request: its matches in the order they are tried.
        ...(t.http
          ? {
              routes: t.http.routes,
              http: t.http.entries.map((e) => ({
                route: e.route,
                rule: e.rule,
                match: { path: `${e.match.path.type} ${e.match.path.value}`, ...(e.match.method ? { method: e.match.method } : {}), headers: e.match.headers.map((h) => `${h.name} ${h.type} ${h.value}`), queryParams: e.match.queryParams.map((q) => `${q.name} ${q.type} ${q.value}`) },
                backends: e.backends.map((b) => ({ backend: b.target.key, weight: b.weight })),
              })),
            }
          : {}),
      })),
    };
  }

  /** Standalone mode: the config folder was read (rejected objects keep their last good versions). */
  private configRead(config: MeshConfig, rejected: ReadonlyArray<RejectedObject>): void {
    recordRejections(rejected, this.metrics.configErrors, this.metrics.configRejected);
    this.applyConfig(config);
  }

  /**
   * Control plane mode: a snapshot for this node, validated by the client. Applied whole (routing
   * tables and enrollment settings together) before the client acknowledges it.
   */
  /** Control plane mode: whether the snapshot's roots can be trusted (throws why not). */
  checkTrustBundle(roots: ReadonlyArray<string>): void {
    this.certificates?.checkRoots(roots);
  }

  applyRemote(remote: RemoteConfig): void {
    this.remote = remote;
    if (remote.trustBundle) this.certificates?.setRoots(remote.trustBundle);
    this.remoteUids = new Set(remote.workloads.map((w) => w.uid));
    this.applyConfig(remote.config);
  }

  /**
   * Whether the proxy serves the pod with its complete config. Standalone, the folder's config
   * is local: once read, it covers every pod. With a control plane, only a snapshot that includes
   * the pod was computed for it (the Services exported to its namespace come with it).
   */
  private configured(uid: string): boolean {
    // Until the first pass has enrolled the node's pods, a Service's endpoints on this node are
    // not known yet (a restarting agent accepts on a pod's listeners as soon as it has enrolled
    // it): its connections wait for the pass rather than be refused no_endpoints.
    return this.configLoaded && this.reconciled && (this.cpClient === undefined || this.remoteUids.has(uid));
  }

  /** A pod's workload identity, in the mesh config's trust domain. */
  private identityOf(p: Pick<NodePod, 'namespace' | 'serviceAccount'>): string {
    return spiffeUri({ trustDomain: this.config.mesh.trustDomain, namespace: p.namespace, serviceAccount: p.serviceAccount });
  }

  /** Whether the node holds a valid certificate for the pod's identity (without a CA, there is nothing to hold). */
  private certified(p: Pick<NodePod, 'namespace' | 'serviceAccount'>): boolean {
    return this.certificates === undefined || this.certificates.caAbsent() || this.certificates.get(this.identityOf(p)) !== undefined;
  }

  /**
   * The identities the node needs certificates for: those of its served pods that are in the
   * mesh. A pod is reported to the control plane once served, and the CA signs only identities
   * of pods a node reported, so a certificate is asked for once its first pod is served.
   */
  private syncIdentities(): void {
    if (!this.certificates) return;
    this.certificates.sync(new Set(this.served.filter((p) => this.wants(p)).map((p) => this.identityOf(p))));
    this.recordCertificates();
  }

  /** The expiry of each certificate held, as a gauge. */
  recordCertificates(): void {
    if (!this.certificates) return;
    this.metrics.certificateExpiry.reset();
    for (const c of this.certificates.status()) if (c.notAfter) this.metrics.certificateExpiry.set({ identity: c.identity }, Date.parse(c.notAfter) / 1000);
  }

  /** The control plane snapshot applied (version 0: none); the client resumes from it. */
  remoteState(): { version: number; digest: string } {
    return { version: this.remote?.version ?? 0, digest: this.remote?.digest ?? '' };
  }

  /** Calls `listener` with the node's served pods now and after every change (until the agent stops). */
  onPods(listener: (pods: ReadonlyArray<Workload>) => void): void {
    this.podListeners.push(listener);
    // Only once the first pass knows the node's pods: an empty report from an agent that has just
    // started would take them out of every other node's endpoints until the next one.
    if (this.reconciled) listener(this.reported());
  }

  /**
   * The served pods as the control plane hears of them: those in the mesh are marked as HBONE
   * destinations when this node takes tunnels (it has a CA to get their certificates from).
   */
  private reported(): ReadonlyArray<Workload> {
    const tunnels = this.certificates !== undefined && !this.certificates.caAbsent();
    return this.served.map((p) => (tunnels && this.wants(p) ? { ...p, tunnel: 'hbone' as const } : p));
  }

  /**
   * A pod of this node is a workload of the mesh (an endpoint here, reported to the control
   * plane) only once the mesh serves it: enrolled and its capture verified, or left out of the
   * mesh by its settings. Before that, a connection to it could reach the application around
   * the proxy, or land on listeners that are not there yet.
   */
  private servable(p: NodePod): boolean {
    if (this.draining.has(p.uid)) return false;
    if (!this.wants(p)) return true;
    // Taking the node over: what the old agent verified it serves until the commit, and this
    // agent reports it from the start (the control plane hears one pod list per node).
    if (this.taking?.verified.includes(p.uid) === true) return true;
    return this.enrolled.get(p.uid)?.verified === true;
  }

  /** Whether the mesh's settings (its enrollment mode, the pod's and its Namespace's labels) take the pod in. */
  private wants(p: Pick<NodePod, 'labels' | 'namespace'>): boolean {
    return shouldEnroll(p.labels, this.config.namespaces.get(p.namespace), this.config.mesh);
  }

  /** Publishes a new snapshot and reports the pods when the set of served pods changed. */
  private publishServed(): void {
    const served = this.pods.filter((p) => this.servable(p));
    // The source hands out the same object for a pod that did not change.
    if (served.length === this.served.length && served.every((p, i) => p === this.served[i])) return;
    this.served = served;
    this.publish();
    if (this.reconciled) {
      const reported = this.reported();
      for (const l of this.podListeners) l(reported);
    }
    this.syncIdentities();
  }

  private applyConfig(config: MeshConfig): void {
    this.config = config;
    recordConfigObjects(config, this.metrics.configObjects);
    const first = !this.configLoaded;
    this.configLoaded = true;
    this.publish();
    // The trust domain may have changed: the identities are named in it.
    this.syncIdentities();
    for (const w of this.proxy.currentSnapshot().warnings) log.warn({ object: w.object }, `config warning: ${w.message}`);
    // Enrollment depends on namespace labels and the mesh settings.
    if (!first) void this.reconcile();
  }

  /**
   * A new routing snapshot from the config and the workloads, swapped in whole. Standalone, the
   * workloads are this node's pods; with a control plane, the mesh's workloads it sent plus this
   * node's pods as the agent sees them now (a new pod routes before the control plane echoes it).
   */
  private publish(): void {
    const { services, trafficPolicies, routes, peerAuthentications, authorizationPolicies, mesh } = this.config;
    const security = { peerAuthentications, authorizationPolicies, mtlsMode: mesh.mtlsMode };
    if (this.remote) {
      // The node's own pods as the agent sees them now win over the control plane's copy; one
      // that is not served yet is no endpoint even if the control plane still has it.
      const local = new Set(this.pods.map((p) => p.uid));
      const workloads = [...this.remote.workloads.filter((w) => !local.has(w.uid)), ...this.served];
      this.version = this.remote.version;
      this.proxy.setSnapshot(new MeshSnapshot(this.version, services, workloads, trafficPolicies, routes, security));
    } else {
      this.version++;
      this.proxy.setSnapshot(new MeshSnapshot(this.version, services, this.served, trafficPolicies, routes, security));
    }
    // Connections of a pod whose config is not here yet wait for it (NodeProxy.setConfigured).
    for (const uid of this.enrolled.keys()) this.proxy.setConfigured(uid, this.configured(uid));
    this.settleEnrollWaiters();
  }

  /** Brings enrolled pods in line with the pods on the node. Serialised; a call during a run schedules one more. */
  reconcile(): Promise<void> {
    // Frozen for a handover (thaw reconciles), or handed over: the pins and maps are not ours.
    if (this.handover || this.handedOver) return Promise.resolve();
    if (this.running) {
      this.again = true;
      return this.running;
    }
    this.running = (async () => {
      do {
        this.again = false;
        await this.reconcileOnce().catch((e: unknown) => log.error({ err: e }, 'reconcile failed'));
      } while (this.again);
      this.running = undefined;
    })();
    return this.running;
  }

  private async reconcileOnce(): Promise<void> {
    const listing = await this.source.list();
    const problems = listing.problems;
    const pods = this.withAnnounced(listing.pods);
    for (const p of problems) {
      // A pod being deleted loses its netns before its record: for a pod that was enrolled until
      // now that is a removal, not an error (a record that stays broken is one on the next pass).
      if (p.reason === 'netns_missing' && this.enrolled.has(p.uid)) {
        log.info({ pod: p.name, namespace: p.namespace, uid: p.uid }, 'network namespace gone: the pod is being removed');
        continue;
      }
      this.noteFailure(p, p.reason, p.message);
    }
    this.pods = pods;
    for (const uid of this.draining) if (!pods.some((p) => p.uid === uid)) this.draining.delete(uid);
    // Pods that are gone stop being endpoints before they are unenrolled.
    this.publishServed();

    const wanted = new Map(pods.filter((p) => this.wants(p)).map((p) => [p.uid, p]));
    // A listing that is not complete yet (the API server has not answered) says nothing of the
    // pods it lacks: they stay as they are, enrolled or pinned.
    const complete = listing.complete !== false;
    const listed = new Set(pods.map((p) => p.uid));
    const gone = (uid: string): boolean => !wanted.has(uid) && (complete || listed.has(uid));
    for (const uid of [...this.enrolled.keys()]) if (gone(uid)) await this.unenroll(uid);
    // Pinned state of pods that are gone (from this or an earlier agent) is removed; what stays
    // pinned belongs to wanted pods, which an earlier agent may have enrolled.
    const pinned = new Set(await this.datapath.pinnedPods());
    for (const uid of pinned) {
      if (gone(uid) && !this.enrolled.has(uid)) {
        await this.datapath.detachPod(uid);
        log.info({ uid }, 'removed pinned state of a pod that is gone');
      }
    }
    for (const pod of wanted.values()) {
      const e = this.enrolled.get(pod.uid);
      if (!e) await this.enroll(pod, pinned.has(pod.uid));
      else if (!e.verified && Date.now() >= (this.failed.get(pod.uid)?.retryAt ?? 0)) await this.verify(e);
    }
    for (const uid of [...this.failed.keys()]) if (!wanted.has(uid) && !problems.some((p) => p.uid === uid)) this.failed.delete(uid);
    await this.syncGate(pods, wanted, complete);
    // Pods enrolled and verified on this pass become endpoints (and are reported).
    this.publishServed();
    if (!this.reconciled) {
      this.reconciled = true;
      for (const uid of this.enrolled.keys()) this.proxy.setConfigured(uid, this.configured(uid));
      const reported = this.reported();
      for (const l of this.podListeners) l(reported);
    }
    this.metrics.podsEnrolled.set(this.enrolled.size);
    this.settleEnrollWaiters();
  }

  /**
   * The source's pods plus the handed-over pods it does not list yet (their records say
   * "creating" until the command runs). The source is the authority once it lists a pod; an
   * announced pod whose netns is gone, or that the source never lists, is dropped.
   */
  private withAnnounced(listed: ReadonlyArray<NodePod>): ReadonlyArray<NodePod> {
    if (this.announced.size === 0) return listed;
    const uids = new Set(listed.map((p) => p.uid));
    const extra: NodePod[] = [];
    const now = Date.now();
    for (const [uid, a] of this.announced) {
      if (uids.has(uid) || !existsSync(a.pod.netnsPath) || (now > a.until && !this.enrollWaiters.has(uid))) this.announced.delete(uid);
      else extra.push(a.pod);
    }
    return extra.length === 0 ? listed : [...listed, ...extra];
  }

  /**
   * The enrollment endpoint: a runtime hands over a new pod before its command runs. Resolves
   * once the pod is enrolled, verified and configured, or once the mesh's settings leave it out;
   * rejects when enrolling it fails (a probe that fails is retried until the deadline).
   */
  enrollAnnounced(pod: EnrollPod, deadline: number, signal: AbortSignal): Promise<EnrollAnswer> {
    if (this.stopping) return Promise.reject(new NodemeshError('NM_ERR_ENROLL_FAILED', 'the agent is stopping', { context: { pod: pod.name, namespace: pod.namespace } }));
    const clash = this.pods.find((p) => p.uid !== pod.uid && ((pod.ip4 !== '' && p.ip4 === pod.ip4) || (pod.ip6 !== '' && p.ip6 === pod.ip6)));
    if (clash) {
      return Promise.reject(
        new NodemeshError('NM_ERR_ENROLL_FAILED', `its address ${clash.ip4 === pod.ip4 ? pod.ip4 : pod.ip6} is pod ${clash.namespace}/${clash.name}'s`, { context: { pod: pod.name, namespace: pod.namespace, field: 'pod.ip4' } }),
      );
    }
    const known = this.announced.get(pod.uid);
    // Longer than the runtime waits: the source lists the pod once its command runs.
    const until = Math.max(known?.until ?? 0, deadline + 30_000);
    if (known) known.until = until;
    else if (!this.pods.some((p) => p.uid === pod.uid)) this.announced.set(pod.uid, { pod, until });
    log.info({ pod: pod.name, namespace: pod.namespace, uid: pod.uid }, 'pod handed over by the runtime');
    return new Promise<EnrollAnswer>((resolve, reject) => {
      const waiter: EnrollWaiter = {
        pod,
        settle: (result) => {
          const set = this.enrollWaiters.get(pod.uid);
          set?.delete(waiter);
          if (set?.size === 0) this.enrollWaiters.delete(pod.uid);
          signal.removeEventListener('abort', onAbort);
          const outcome = result instanceof NodemeshError ? (result.code === 'NM_ERR_ENROLL_TIMEOUT' ? 'timeout' : 'failed') : result.enrolled ? 'enrolled' : 'not_enrolled';
          this.metrics.enrollments.inc({ result: outcome });
          log.info({ pod: pod.name, namespace: pod.namespace, uid: pod.uid, result: outcome, ...(result instanceof Error ? { err: result.message } : {}) }, 'hand-over answered');
          if (result instanceof Error) reject(result);
          else resolve(result);
        },
      };
      const onAbort = (): void => waiter.settle(this.enrollTimeout(pod));
      signal.addEventListener('abort', onAbort);
      const set = this.enrollWaiters.get(pod.uid) ?? new Set<EnrollWaiter>();
      set.add(waiter);
      this.enrollWaiters.set(pod.uid, set);
      void this.reconcile();
    });
  }

  /** The CNI plugin's ADD: the pod source completes the pod (Pod object, cgroup), then as a runtime's hand-over. */
  async enrollCni(req: CniPod, deadline: number, signal: AbortSignal): Promise<EnrollAnswer> {
    if (!this.source.fromCni) {
      throw new NodemeshError('NM_ERR_ENROLL_FAILED', 'this agent does not serve Kubernetes pods (it runs with --source local): a CNI hand-over has no Pod to complete it', { context: { pod: req.name, namespace: req.namespace }, hint: 'run the agent with --source kubernetes' });
    }
    const pod = await this.source.fromCni(req, deadline, signal);
    return this.enrollAnnounced(pod, deadline, signal);
  }

  /** The pod that a CNI call names: by uid when given, else by namespace and name. */
  private cniPod(ref: CniRef): NodePod | undefined {
    return this.withAnnounced(this.pods).find((p) => (ref.uid !== undefined ? p.uid === ref.uid : p.namespace === ref.namespace && p.name === ref.name));
  }

  /** The CNI plugin's CHECK: whether the pod is as ADD left it (enrolled and verified, or not the mesh's). */
  checkCni(ref: CniRef): EnrollAnswer {
    const pod = this.cniPod(ref);
    if (!pod) throw new NodemeshError('NM_ERR_ENROLL_FAILED', `pod ${ref.namespace}/${ref.name} is not known to the agent of this node`, { context: { pod: ref.name, namespace: ref.namespace } });
    if (!this.wants(pod)) return { enrolled: false, reason: `capture is not enabled for the pod or its namespace (enrollment: ${this.config.mesh.enrollment})` };
    const e = this.enrolled.get(pod.uid);
    if (e?.verified) return { enrolled: true, verified: true };
    const failure = this.failed.get(pod.uid);
    throw new NodemeshError('NM_ERR_ENROLL_FAILED', `pod ${ref.namespace}/${ref.name} is ${e ? 'enrolled but its capture is not verified' : 'not enrolled'}${failure ? ` (${failure.reason}: ${failure.message})` : ''}`, { context: { pod: ref.name, namespace: ref.namespace } });
  }

  /** The CNI plugin's DEL: the pod's network goes away; it stops being an endpoint now (the source unenrolls it once its Pod is gone). */
  releaseCni(ref: CniRef): void {
    const pod = this.cniPod(ref);
    if (pod) this.drain(pod.uid);
  }

  /** A runtime is about to stop the pod: no new connection goes to it from now on. */
  drain(uid: string): void {
    if (!this.pods.some((p) => p.uid === uid)) return;
    this.draining.add(uid);
    log.info({ uid }, 'pod draining: no longer an endpoint');
    this.publishServed();
  }

  private enrollTimeout(pod: EnrollPod): NodemeshError {
    const e = this.enrolled.get(pod.uid);
    const failure = this.failed.get(pod.uid);
    const lastCertError = this.certificates?.status().find((c) => c.identity === this.identityOf(pod))?.lastError;
    const state = !e
      ? 'not enrolled'
      : !e.verified
        ? 'enrolled, capture not verified'
        : !this.configured(pod.uid)
          ? 'enrolled and verified, but the control plane has not sent its config'
          : `enrolled, verified and configured, but the node holds no certificate for ${this.identityOf(pod)} yet${lastCertError ? ` (${lastCertError})` : ''}`;
    return new NodemeshError('NM_ERR_ENROLL_TIMEOUT', `${state}${failure ? ` (last error, ${failure.reason}: ${failure.message})` : ''}`, {
      context: { pod: pod.name, namespace: pod.namespace, ...(failure ? { detail: failure.reason } : {}) },
      hint: this.cpClient && e?.verified ? 'check the control plane (`nodemesh status --control-plane HOST:PORT`) and the agent log' : 'see the agent log',
    });
  }

  /** Answers the runtimes whose pods are now served, left out, or failed to enroll. */
  private settleEnrollWaiters(): void {
    for (const [uid, waiters] of [...this.enrollWaiters]) {
      const first = [...waiters][0];
      if (!first) continue;
      const pod = first.pod;
      let result: EnrollAnswer | NodemeshError | undefined;
      const e = this.enrolled.get(uid);
      const failure = this.failed.get(uid);
      if (this.stopping) result = new NodemeshError('NM_ERR_ENROLL_FAILED', 'the agent stopped', { context: { pod: pod.name, namespace: pod.namespace } });
      else if (e?.verified && this.configured(uid) && this.certified(pod)) result = { enrolled: true, verified: true };
      else if (this.configLoaded && !this.wants(pod)) {
        result = { enrolled: false, reason: `capture is not enabled for the pod or its namespace (enrollment: ${this.config.mesh.enrollment})` };
      } else if (failure && failure.reason !== 'probe_failed') {
        result = new NodemeshError('NM_ERR_ENROLL_FAILED', `${failure.reason}: ${failure.message}`, { context: { pod: pod.name, namespace: pod.namespace, detail: failure.reason }, hint: 'see the agent log' });
      }
      if (result !== undefined) for (const w of [...waiters]) w.settle(result);
    }
  }

  /**
   * Fail-closed enrollment: the gate is on while the mesh config asks for it; verified pods and
   * pods that opted out may connect past it, every other pod only through capture.
   */
  private async syncGate(pods: ReadonlyArray<NodePod>, wanted: ReadonlyMap<string, NodePod>, complete: boolean): Promise<void> {
    this.datapath.setStrictInbound(this.config.mesh.failClosedEnrollment);
    if (this.config.mesh.failClosedEnrollment) {
      if (await this.datapath.enableGate(this.options.podsCgroup)) {
        log.error({ podsCgroup: this.options.podsCgroup }, "the node's pod cgroup was removed and made again: the fail-closed gate is attached to the new one");
      }
    } else {
      if (this.datapath.gateEnabled) {
        await this.datapath.disableGate();
        log.info({ podsCgroup: this.options.podsCgroup }, 'fail-closed enrollment off');
      }
      return;
    }
    const allow = new Map<bigint, string>();
    for (const pod of pods) {
      const enrolled = this.enrolled.get(pod.uid);
      if (wanted.has(pod.uid) && !enrolled?.verified) continue;
      try {
        allow.set((await stat(pod.cgroupPath, { bigint: true })).ino, `${pod.namespace}/${pod.name}`);
      } catch {
        // the pod is going away
      }
    }
    // Entries an earlier agent left in the pinned map are reconciled like our own.
    if (this.allowedCgroups.size === 0) for (const id of this.datapath.allowedCgroupIds()) this.allowedCgroups.set(id, 'earlier agent');
    for (const [id, pod] of allow) {
      if (this.allowedCgroups.has(id)) continue;
      this.datapath.allowCgroup(id);
      this.allowedCgroups.set(id, pod);
    }
    // Until the source knows every pod, what an earlier pass or agent allowed stays allowed.
    for (const id of complete ? [...this.allowedCgroups.keys()] : []) {
      if (allow.has(id)) continue;
      this.datapath.disallowCgroup(id);
      this.allowedCgroups.delete(id);
    }
  }

  private noteFailure(pod: { uid: string; namespace: string; name: string }, reason: EnrollErrorReason, message: string): void {
    const prev = this.failed.get(pod.uid);
    const attempts = (prev?.attempts ?? 0) + 1;
    this.failed.set(pod.uid, { reason, message, attempts, retryAt: Date.now() + Math.min(30_000, 500 * 2 ** attempts) });
    if (prev?.reason === reason) return;
    this.metrics.enrollErrors.inc({ reason });
    log.error({ pod: pod.name, namespace: pod.namespace, uid: pod.uid, reason }, `pod not enrolled: ${message}`);
  }

  private async enroll(pod: NodePod, pinned: boolean): Promise<void> {
    const failure = this.failed.get(pod.uid);
    if (failure && Date.now() < failure.retryAt) return;
    let step: EnrollErrorReason = pinned ? 'readopt_failed' : 'attach_failed';
    try {
      if (pinned) await this.datapath.readopt(pod);
      else await this.datapath.attachPod(pod);
      step = 'listen_failed';
      await this.proxy.addPod(pod);
      this.proxy.setConfigured(pod.uid, this.configured(pod.uid));
    } catch (e) {
      if (step === 'listen_failed' || pinned) await this.datapath.detachPod(pod.uid).catch(() => undefined);
      const message = isNodemeshError(e) ? e.message : (e as Error).message;
      this.noteFailure(pod, step, message);
      return;
    }
    this.failed.delete(pod.uid);
    const entry: Enrolled = { pod, verified: false, enrolledAt: new Date().toISOString() };
    this.enrolled.set(pod.uid, entry);
    this.metrics.podVerified.set({ namespace: pod.namespace, pod: pod.name }, 0);
    log.info({ pod: pod.name, namespace: pod.namespace, uid: pod.uid, ip4: pod.ip4, ip6: pod.ip6, readopted: pinned }, 'pod enrolled');
    await this.verify(entry);
  }

  probeArrived(uid: string): void {
    this.probeWaiters.get(uid)?.();
    // Frozen: the listener that accepted it is shared with the new agent, whose probe it is.
    if (this.handover) {
      void postJson(join(this.options.runDir, ENROLL_SOCKET_NEXT), '/v1/handover/probe', { uid }, 2000).catch((e: Error) => log.warn({ uid, err: e.message }, "the new agent's capture probe could not be passed on"));
    }
  }

  /** Proves capture: a connection from inside the pod's cgroup and netns must reach the proxy. */
  private async verify(entry: Enrolled): Promise<void> {
    const { pod } = entry;
    const arrived = new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), this.options.probeTimeoutMs);
      this.probeWaiters.set(pod.uid, () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    let result: number | string;
    // From a leaf of its own under the pod's cgroup: a kubelet's pod cgroup delegates controllers
    // to its containers' cgroups, and cgroup v2 then lets no process join the pod's cgroup itself
    // (and at CNI ADD no container cgroup exists yet). The pod's programs apply to its whole subtree.
    const probeCgroup = join(pod.cgroupPath, PROBE_CGROUP);
    try {
      await mkdir(probeCgroup).catch((e: NodeJS.ErrnoException) => {
        if (e.code !== 'EEXIST') throw e;
      });
      result = await probeConnect({ cgroup: probeCgroup, netns: pod.netnsPath, host: PROBE_ADDRESS.address, port: PROBE_ADDRESS.port, timeoutMs: this.options.probeTimeoutMs });
    } catch (e) {
      result = (e as Error).message;
    } finally {
      // Once the probe process has left it (an exited task may hold it for a moment).
      await rmdirWhenEmpty(probeCgroup, true).catch((e: NodeJS.ErrnoException) => {
        if (e.code !== 'ENOENT') log.warn({ path: probeCgroup, err: e.message }, "the capture probe's cgroup could not be removed");
      });
    }
    const ok = result === 0 && (await arrived);
    this.probeWaiters.delete(pod.uid);
    if (!this.enrolled.has(pod.uid)) return;
    entry.verified = ok;
    this.metrics.podVerified.set({ namespace: pod.namespace, pod: pod.name }, ok ? 1 : 0);
    if (ok) {
      this.failed.delete(pod.uid);
      log.info({ pod: pod.name, namespace: pod.namespace }, 'pod redirection verified');
    } else this.noteFailure(pod, 'probe_failed', `capture probe did not reach the proxy (connect result ${String(result)})`);
  }

  private async unenroll(uid: string): Promise<void> {
    const e = this.enrolled.get(uid);
    if (!e) return;
    await this.proxy.removePod(uid);
    // The pod may still run (opted out): give its netns back as it was.
    await this.datapath.detachPod(uid, existsSync(e.pod.netnsPath) ? e.pod.netnsPath : undefined);
    // Reported as enrolled until its state is gone, so `status` never shows a half-removed pod as gone.
    this.enrolled.delete(uid);
    this.metrics.podVerified.remove({ namespace: e.pod.namespace, pod: e.pod.name });
    log.info({ pod: e.pod.name, namespace: e.pod.namespace, uid }, 'pod unenrolled');
  }

  /** Stops serving. Pinned links stay, so pods stay captured until the next agent takes over. */
  async stop(): Promise<void> {
    this.stopping = true;
    // Stopped mid-handover: the new agent holds the same sockets and map entries (and commits
    // to nobody: it then takes the node as it is).
    const h = this.endHandover();
    if (h) {
      this.proxy.stopListening();
      h.settle('thawed');
    }
    if (this.handedOver) {
      // The node is the new agent's (CNI config, enrollment socket, pins): only the connections
      // held here are this agent's, and they end or are cut at the drain deadline.
      const deadline = Date.now() + (this.options.drainTimeoutMs ?? 20_000);
      while (this.proxy.openConnections() > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
      log.info({ left: this.proxy.openConnections() }, 'drained');
    } else {
      // First: pods that start from now on do not wait for an agent that is going.
      await this.cni?.stop();
    }
    this.settleEnrollWaiters();
    // Before the enrollment socket: the run folder goes with it when nothing else is left there.
    if (this.instanceServer) {
      const server = this.instanceServer;
      await new Promise((resolve) => {
        server.close(resolve);
        server.closeAllConnections();
      });
      await rm(this.instanceSocket ?? '', { force: true });
    }
    if (!this.handedOver) await this.enrollment?.close();
    this.stopWatch?.();
    this.store?.close();
    this.cpClient?.stop();
    this.certificates?.stop();
    this.podListeners.length = 0;
    await this.running;
    await this.proxy.close();
    for (const s of this.servers) await new Promise((resolve) => s.close(resolve));
    this.datapath.close();
  }

  /**
   * Stops, then takes nodemesh off the node as `nodemesh cleanup` does (its DaemonSet was
   * deleted): every pin and link, the gate, and the in-pod delivery routing of the pods that still
   * run. Returns what was removed, failed or left.
   */
  async uninstall(): Promise<TeardownReport> {
    if (this.handedOver || this.handover) throw new NodemeshError('NM_ERR_AGENT_RUNNING', 'this agent handed the node over (or is handing it over): the node is not its to uninstall');
    const known: KnownPod[] = [...this.enrolled.values()].map((e) => ({ uid: e.pod.uid, name: `${e.pod.namespace}/${e.pod.name}`, netnsPath: e.pod.netnsPath }));
    await this.stop();
    const report = await teardownNode(this.options.pinRoot, known);
    const summary = { removed: report.removed.length, failed: report.failed.map((f) => `${f.kind} ${f.what}: ${f.error.message}`), left: report.left.map((l) => `${l.kind} ${l.what}: ${l.reason}`) };
    if (report.failed.length > 0) log.error(summary, 'nodemesh taken off this node, but not all of it: run `nodemesh cleanup` on the node');
    else log.info(summary, 'nodemesh taken off this node');
    return report;
  }

  /** Stops and removes every pin: pods lose capture (uninstall, tests). */
  async stopAndPurge(): Promise<void> {
    await this.stop();
    await this.datapath.purge();
  }
}

/** The probe's own cgroup under a pod's (see verify()). */
const PROBE_CGROUP = 'nodemesh-probe';
