/**
 * The control plane (design.md sections 1 and 6): reads the config (a folder of YAML now, the
 * Kubernetes API later) through the same ConfigStore as a standalone agent, merges the pods the
 * agents report, and streams each node a versioned snapshot of what it needs over gRPC
 * (nodemesh.v1.Discovery/Stream). One owner per state: the store owns config, this module owns
 * versions, node pods and the streams.
 *
 * Flow control: a stream has at most one push waiting for its Ack. Changes made meanwhile are
 * folded into the next push, sent when the Ack (or Nack) arrives, so an agent that never answers
 * costs one snapshot of memory, not a queue.
 */
import type { Server as HttpServer } from 'node:http';

import { Metadata, Server, ServerCredentials, status as GrpcStatus, type ServerDuplexStream } from '@grpc/grpc-js';

import { json, serveHttp, type HostPort } from '../agent/http.js';
import { selects } from '../config/snapshot.js';
import { ConfigStore, recordRejections, type MeshConfig, type RejectedObject } from '../config/store.js';
import { logger } from '../shared/log.js';
import { compareStrings } from '../shared/order.js';
import {
  MAX_MESSAGE_BYTES,
  discoveryService,
  snapshotMessage,
  type AgentMessage,
  type ControlPlaneMessage,
  type WireConfigError,
  type WireSnapshot,
  type WireWorkload,
} from '../shared/protocol/discovery.js';
import { ControlPlaneMetrics } from './metrics.js';

const log = logger('control-plane');

/** Pods one agent may report: a node runs at most a few hundred (kubelet's default limit is 110). */
const MAX_PODS_PER_NODE = 1000;

export interface ControlPlaneOptions {
  readonly configDir: string;
  /** gRPC, plaintext (15010). */
  readonly listen: HostPort;
  /** HTTP: /metrics, /healthz/ready, /debug/snapshot, /debug/nodes (15014). */
  readonly http: HostPort;
}

/** What `nodemesh status` and /debug/nodes show per node. */
export interface NodeSyncStatus {
  readonly node: string;
  readonly connected: boolean;
  readonly pods: number;
  /** Version of the last push to this node, and the last one it acknowledged. */
  readonly sentVersion: number;
  readonly ackedVersion: number;
  /** The node acknowledged the snapshot of the current config. */
  readonly inSync: boolean;
  readonly lastNack: ReadonlyArray<WireConfigError>;
}

class AgentStream {
  sent: WireSnapshot | undefined;
  /** The last version the agent answered (Ack or Nack), or served when it connected. */
  answered = 0;
  /** When the config version of the outstanding push was made (for the propagation histogram). */
  sentAt = 0;
  awaitingAck = false;
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
  private readonly podsByNode = new Map<string, ReadonlyArray<WireWorkload>>();
  /** What each node last acknowledged, kept across reconnects (for status). */
  private readonly acked = new Map<string, number>();
  private version = 0;
  /** When the current version was made. */
  private versionAt = 0;
  private grpc: Server | undefined;
  private http: HttpServer | undefined;
  private port = 0;

  private constructor(private readonly options: ControlPlaneOptions) {
    this.store = new ConfigStore(options.configDir, { onLoad: (config, rejected) => this.configRead(config, rejected) });
  }

  static async start(options: ControlPlaneOptions): Promise<ControlPlane> {
    const cp = new ControlPlane(options);
    try {
      await cp.store.load();
      cp.store.watch();
      await cp.serveGrpc();
      cp.http = await serveHttp(options.http, {
        '/metrics': async () => ({ status: 200, type: cp.metrics.registry.contentType, body: await cp.metrics.registry.metrics() }),
        '/healthz/ready': async () => json({ ready: cp.store.hasLoaded(), version: cp.version }, cp.store.hasLoaded() ? 200 : 503),
        '/debug/nodes': async () => json({ version: cp.version, nodes: cp.nodes() }),
        '/debug/snapshot': async (req) => {
          const node = new URL(req.url ?? '/', 'http://x').searchParams.get('node');
          if (!node) return json({ error: 'add ?node=NAME (GET /debug/nodes lists them)' }, 400);
          return json({ node, version: cp.version, snapshot: cp.snapshotFor(node), status: cp.nodes().find((n) => n.node === node), configErrors: cp.store.lastRejected() });
        },
      });
    } catch (e) {
      await cp.stop();
      throw e;
    }
    log.info({ grpc: `${options.listen.host}:${cp.port}`, http: `${options.http.host}:${options.http.port}`, version: cp.version }, 'control plane started');
    return cp;
  }

  /** The gRPC port (the one asked for, or the one the kernel chose for port 0). */
  grpcPort(): number {
    return this.port;
  }

  currentVersion(): number {
    return this.version;
  }

  async stop(): Promise<void> {
    this.store.close();
    for (const s of this.streams.values()) s.call.end();
    const grpc = this.grpc;
    if (grpc) await new Promise<void>((resolve) => grpc.tryShutdown(() => resolve()));
    const http = this.http;
    if (http) await new Promise((resolve) => http.close(resolve));
  }

  nodes(): NodeSyncStatus[] {
    const names = new Set([...this.podsByNode.keys(), ...this.streams.keys(), ...this.acked.keys()]);
    return [...names].sort(compareStrings).map((node) => {
      const s = this.streams.get(node);
      const acked = this.acked.get(node) ?? 0;
      return {
        node,
        connected: s !== undefined,
        pods: this.podsByNode.get(node)?.length ?? 0,
        sentVersion: s?.sent?.version ?? 0,
        ackedVersion: acked,
        inSync: s !== undefined && !s.awaitingAck && !s.dirty && s.sent !== undefined && acked === s.sent.version && s.sent.digest === this.snapshotFor(node).digest,
        lastNack: s?.lastNack ?? [],
      };
    });
  }

  /**
   * What a node needs: the mesh settings, namespaces, Services and TrafficPolicies, the workloads
   * that are endpoints of a Service, and the node's own pods. Workloads nobody selects on other
   * nodes are left out; narrowing Services to those a node's pods may call is future work.
   */
  snapshotFor(node: string): WireSnapshot {
    const config = this.store.current();
    const workloads: WireWorkload[] = [];
    for (const [n, pods] of this.podsByNode) {
      for (const p of pods) {
        if (n === node || config.services.some((s) => s.namespace === p.namespace && selects(s.selector, p.labels))) workloads.push(p);
      }
    }
    return snapshotMessage(this.version, config, workloads);
  }

  private configRead(config: MeshConfig, rejected: ReadonlyArray<RejectedObject>): void {
    recordRejections(rejected, this.metrics.configErrors, this.metrics.configRejected);
    this.metrics.configObjects.set({ kind: 'Service' }, config.services.length);
    this.metrics.configObjects.set({ kind: 'TrafficPolicy' }, config.trafficPolicies.length);
    this.metrics.configObjects.set({ kind: 'Namespace' }, config.namespaces.size);
    this.changed();
  }

  /** A new version (monotonic across restarts: never below the wall clock in ms), pushed to every node. */
  private changed(): void {
    this.version = Math.max(this.version + 1, Date.now());
    this.versionAt = performance.now();
    this.metrics.configVersion.set(this.version);
    for (const s of this.streams.values()) this.push(s);
  }

  private push(s: AgentStream): void {
    if (s.awaitingAck) {
      s.dirty = true;
      return;
    }
    s.dirty = false;
    const snapshot = this.snapshotFor(s.node);
    // Nothing this node needs changed: it stays on the version it has.
    if (s.sent && s.sent.digest === snapshot.digest && s.answered === s.sent.version) return;
    s.sent = snapshot;
    s.sentAt = this.versionAt;
    s.awaitingAck = true;
    this.metrics.pushes.inc({ type: 'snapshot' });
    s.call.write({ snapshot });
  }

  private async serveGrpc(): Promise<void> {
    const server = new Server({
      'grpc.max_receive_message_length': 4 * 1024 * 1024,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
    });
    server.addService(discoveryService(), { Stream: (call: ServerDuplexStream<AgentMessage, ControlPlaneMessage>) => this.serveStream(call) });
    const { host, port } = this.options.listen;
    this.port = await new Promise<number>((resolve, reject) => {
      server.bindAsync(`${host.includes(':') ? `[${host}]` : host}:${port}`, ServerCredentials.createInsecure(), (err, bound) => (err ? reject(err) : resolve(bound)));
    });
    this.grpc = server;
  }

  private serveStream(call: ServerDuplexStream<AgentMessage, ControlPlaneMessage>): void {
    let stream: AgentStream | undefined;
    const fail = (reason: string, code: GrpcStatus, message: string): void => {
      this.metrics.streamErrors.inc({ reason });
      log.warn({ node: stream?.node, peer: call.getPeer(), reason }, `discovery stream closed: ${message}`);
      // grpc-js ends the call with this status.
      call.emit('error', { code, details: message });
    };
    call.on('data', (m: AgentMessage) => {
      if (!stream) {
        const hello = m.hello;
        if (!hello || !/^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/.test(hello.node)) {
          fail('bad_hello', GrpcStatus.INVALID_ARGUMENT, hello ? `node name "${hello.node}" is not a Kubernetes node name` : 'the first message must be Hello');
          return;
        }
        const previous = this.streams.get(hello.node);
        if (previous) {
          log.info({ node: hello.node }, 'agent reconnected; the older stream of that node is closed');
          previous.call.end();
        }
        stream = new AgentStream(hello.node, call);
        // The agent serves this version already: if it is still what the node needs, nothing is sent.
        if (hello.version > 0) {
          stream.answered = hello.version;
          this.acked.set(hello.node, hello.version);
          stream.sent = { version: hello.version, digest: hello.digest, resources: [] };
        }
        // Headers now: the agent knows it is connected even when it has nothing new to receive.
        call.sendMetadata(new Metadata());
        this.streams.set(hello.node, stream);
        this.metrics.connectedAgents.set(this.streams.size);
        log.info({ node: hello.node, agentVersion: hello.agentVersion, version: hello.version }, 'agent connected');
        this.push(stream);
        return;
      }
      const s = stream;
      if (m.pods) {
        if (m.pods.pods.length > MAX_PODS_PER_NODE) {
          fail('too_many_pods', GrpcStatus.RESOURCE_EXHAUSTED, `node ${s.node} reported ${m.pods.pods.length} pods (at most ${MAX_PODS_PER_NODE})`);
          return;
        }
        const pods = m.pods.pods.map((p) => ({ ...p, node: s.node }));
        if (JSON.stringify(pods) === JSON.stringify(this.podsByNode.get(s.node))) return;
        this.podsByNode.set(s.node, pods);
        this.changed();
      } else if (m.ack || m.nack) {
        const version = m.ack?.version ?? m.nack?.version ?? 0;
        if (!s.awaitingAck || version !== s.sent?.version) {
          log.warn({ node: s.node, version, expected: s.sent?.version }, 'answer for a version that was not sent; ignored');
          return;
        }
        s.awaitingAck = false;
        s.answered = version;
        if (m.ack) {
          s.lastNack = [];
          this.acked.set(s.node, version);
          this.metrics.acks.inc({ result: 'ack' });
          this.metrics.pushSeconds.observe((performance.now() - s.sentAt) / 1000);
        } else {
          s.lastNack = (m.nack?.errors ?? []).slice(0, 100);
          this.metrics.acks.inc({ result: 'nack' });
          log.error({ node: s.node, version, errors: s.lastNack }, 'agent rejected the snapshot; it keeps serving its last good one');
          // The same snapshot would be rejected again: the next one goes out at the next change.
        }
        if (s.dirty) this.push(s);
      }
    });
    const closed = (): void => {
      if (stream && this.streams.get(stream.node) === stream) {
        this.streams.delete(stream.node);
        this.metrics.connectedAgents.set(this.streams.size);
        log.info({ node: stream.node }, 'agent disconnected; its pods stay endpoints until it reports again');
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

