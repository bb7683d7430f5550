/**
 * The agent's side of nodemesh.v1.Discovery/Stream (design.md section 6): says Hello with the
 * version it serves, reports the node's pods, validates each snapshot at this edge and applies it
 * whole (Ack) or not at all (Nack, the last good one keeps serving). When the control plane is
 * gone the agent keeps serving and reconnects with jittered exponential backoff; it resumes from
 * its version, so an unchanged config is not sent again.
 */
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';

import { Metadata, credentials, makeClientConstructor, status as GrpcStatus, type ChannelCredentials, type Client, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js';

import type { Workload } from '../config/snapshot.js';
import { NoCertificateAuthority } from '../identity/certificates.js';
import { NodemeshError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { packageVersion } from '../shared/paths.js';
import {
  CAPABILITIES,
  CONTROL_PLANE_TLS_NAME,
  MAX_MESSAGE_BYTES,
  SnapshotInvalid,
  applyDelta,
  decodeResources,
  certificatesService,
  discoveryService,
  resourceKey,
  workloadToWire,
  type AgentMessage,
  type ControlPlaneMessage,
  type DecodedSnapshot,
  type SignRequest,
  type SignResponse,
  type WireResource,
} from '../protocol/discovery.js';
import type { HostPort } from '../shared/http.js';

const log = logger('cp-client');

/** What the client needs of the agent. */
export interface SnapshotTarget {
  /** Throws (an Error saying why) if the agent cannot use the snapshot's trust bundle. */
  checkTrustBundle(roots: ReadonlyArray<string>): void;
  applyRemote(remote: { version: number; digest: string } & DecodedSnapshot): void;
  remoteState(): { version: number; digest: string };
  onPods(listener: (pods: ReadonlyArray<Workload>) => void): void;
}

export interface ClientEvents {
  onAck?(version: number): void;
  onNack?(version: number, error: SnapshotInvalid): void;
  onConnected?(connected: boolean): void;
}

/**
 * The token in `file` (trimmed). NM_ERR_TOKEN_FILE when it cannot be read or is empty: the agent
 * checks it once at start, where that is a setup error that must stop it, not a reason to retry
 * forever; at a reconnect the client retries (a rotated token may be mid-write).
 */
export async function readTokenFile(file: string): Promise<string> {
  let token: string;
  try {
    token = (await readFile(file, 'utf8')).trim();
  } catch (e) {
    throw new NodemeshError('NM_ERR_TOKEN_FILE', `cannot read the control plane token file ${file}: ${(e as Error).message}`, {
      context: { path: file, field: 'token-file' },
      cause: e,
      hint: "give --token-file the file holding this node's token (its line in the control plane's --agent-tokens file)",
    });
  }
  if (token === '') {
    throw new NodemeshError('NM_ERR_TOKEN_FILE', `the control plane token file ${file} is empty`, {
      context: { path: file, field: 'token-file' },
      hint: "put this node's token in it (its line in the control plane's --agent-tokens file)",
    });
  }
  return token;
}

const BACKOFF_BASE_MS = 250;
const BACKOFF_MAX_MS = 30_000;

/**
 * The roots in the agent's --ca-root file: the control plane's TLS port is checked against them
 * (and, until the CA sends its own, so are workload certificates).
 */
export async function readCaRoot(file: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new NodemeshError('NM_ERR_CA_ROOT', `cannot read the mesh's root certificate ${file}: ${(e as Error).message}`, {
      context: { path: file, field: 'ca-root' },
      cause: e,
      hint: "give --ca-root the control plane's root-cert.pem (in its --ca-dir)",
    });
  }
  if (!/-----BEGIN CERTIFICATE-----/.test(text)) {
    throw new NodemeshError('NM_ERR_CA_ROOT', `${file} holds no PEM certificate`, { context: { path: file, field: 'ca-root' }, hint: "give --ca-root the control plane's root-cert.pem" });
  }
  return text;
}

export class ControlPlaneClient {
  private client: Client | undefined;
  private certificates: Client | undefined;
  private call: ClientDuplexStream<AgentMessage, ControlPlaneMessage> | undefined;
  /** The node's pods as the agent last reported them (none yet: the control plane keeps what it had). */
  private pods: ReadonlyArray<Workload> | undefined;
  /** The resources of the version applied, by key: what the next Delta applies to. */
  private held = new Map<string, WireResource>();
  private attempt = 0;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  /** A handover is under way: the stream is closed and not opened again until resume(). */
  private paused = false;
  private connected = false;

  constructor(
    private readonly address: HostPort,
    private readonly node: string,
    private readonly agent: SnapshotTarget,
    private readonly events: ClientEvents = {},
    /** A file holding this node's token for the control plane (read again at every connect: it may be rotated). */
    private readonly tokenFile?: string,
    /** PEM roots: the control plane is dialled over TLS and checked against them; undefined: plaintext (loopback). */
    private readonly caRoots?: string,
  ) {}

  start(): void {
    const Discovery = makeClientConstructor(discoveryService(), 'Discovery');
    const Certificates = makeClientConstructor(certificatesService(), 'Certificates');
    const host = this.address.host.includes(':') ? `[${this.address.host}]` : this.address.host;
    const channel: ChannelCredentials = this.caRoots === undefined ? credentials.createInsecure() : credentials.createSsl(Buffer.from(this.caRoots));
    const options = {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
      // Dialled by address: the certificate is checked for the control plane's service name
      // (which it carries), and no IP address goes out as SNI (RFC 6066 forbids it).
      ...(this.caRoots !== undefined && isIP(this.address.host) !== 0 ? { 'grpc.ssl_target_name_override': CONTROL_PLANE_TLS_NAME } : {}),
    };
    // A subchannel pool of the channel's own (not grpc-js's global one, which keeps a closed
    // channel's connection open for a while): stopping the client closes its connection.
    this.client = new Discovery(`${host}:${this.address.port}`, channel, { ...options, 'grpc.use_local_subchannel_pool': 1 });
    // The same channel, so the same connection, for Sign.
    this.certificates = new Certificates(`${host}:${this.address.port}`, channel, { channelOverride: this.client.getChannel() });
    this.agent.onPods((pods) => {
      this.pods = pods;
      this.send({ pods: { pods: pods.map((p) => workloadToWire(p, this.node)) } });
    });
    this.connect();
  }

  isConnected(): boolean {
    return this.connected;
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.call?.cancel();
    this.client?.close();
    this.certificates?.close();
  }

  /**
   * Closes the stream and does not connect again until resume() (the agent handing its node over:
   * the control plane keeps one stream per node, and two agents of a node would take it in turns).
   */
  pause(): void {
    this.paused = true;
    clearTimeout(this.timer);
    this.call?.cancel();
    this.call = undefined;
    this.setConnected(false);
  }

  /** Connects again after pause() (a handover that did not complete). */
  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.attempt = 0;
    this.connect();
  }

  /** Certificates.Sign for a CSR of this node (authenticated like the stream). */
  async sign(csr: string): Promise<SignResponse> {
    const client = this.certificates;
    if (!client || this.stopped) throw new Error('the control plane client is stopped');
    const metadata = new Metadata();
    if (this.tokenFile !== undefined) metadata.set('authorization', `Bearer ${await readTokenFile(this.tokenFile)}`);
    return new Promise<SignResponse>((resolve, reject) => {
      (client as unknown as { Sign(r: SignRequest, m: Metadata, o: { deadline: number }, cb: (e: ServiceError | null, r?: SignResponse) => void): void }).Sign(
        { csr, node: this.node },
        metadata,
        { deadline: Date.now() + 10_000 },
        (e, r) => (e?.code === GrpcStatus.UNIMPLEMENTED ? reject(new NoCertificateAuthority()) : e || !r ? reject(new Error(`Certificates.Sign: ${e?.details || e?.message || 'no answer'}`)) : resolve(r)),
      );
    });
  }

  private send(m: AgentMessage): void {
    this.call?.write(m);
  }

  private connect(): void {
    if (this.stopped || this.paused || !this.client) return;
    if (this.tokenFile === undefined) {
      this.open(new Metadata());
      return;
    }
    const file = this.tokenFile;
    readTokenFile(file).then(
      (token) => {
        const metadata = new Metadata();
        metadata.set('authorization', `Bearer ${token}`);
        this.open(metadata);
      },
      (e: unknown) => {
        log.error({ err: e, path: file }, 'cannot read the control plane token');
        this.retry(`the token file ${file} could not be read`);
      },
    );
  }

  private open(metadata: Metadata): void {
    if (this.stopped || this.paused || !this.client) return;
    const stream = (this.client as unknown as { Stream(metadata: Metadata): ClientDuplexStream<AgentMessage, ControlPlaneMessage> }).Stream(metadata);
    this.call = stream;
    const { version, digest } = this.agent.remoteState();
    stream.write({ hello: { node: this.node, agentVersion: packageVersion(), capabilities: [...CAPABILITIES], version, digest } });
    if (this.pods) stream.write({ pods: { pods: this.pods.map((p) => workloadToWire(p, this.node)) } });
    // The control plane answers Hello with headers: from then on the stream is up.
    stream.on('metadata', () => this.setConnected(true));
    stream.on('data', (m: ControlPlaneMessage) => {
      this.attempt = 0;
      if (m.snapshot) {
        const s = m.snapshot;
        this.apply(stream, s.version, 'snapshot', () => new Map(s.resources.map((r) => [resourceKey(r), r])), s.digest);
      } else if (m.delta) {
        const d = m.delta;
        this.apply(stream, d.version, 'delta', () => applyDelta(this.held, this.agent.remoteState().version, d), d.digest);
      } else {
        log.warn({ message: m.message }, 'control plane sent a message this agent does not handle; ignored');
      }
    });
    let ended = false;
    const lost = (reason: string): void => {
      if (ended) return;
      ended = true;
      if (this.call === stream) this.call = undefined;
      this.setConnected(false);
      this.retry(reason);
    };
    stream.on('error', (e: Error & { details?: string }) => lost(e.details ?? e.message));
    stream.on('end', () => lost('the control plane ended the stream'));
  }

  private retry(reason: string): void {
    if (this.stopped || this.paused) return;
    // Full jitter: agents that lost the same control plane do not all come back at once.
    const delay = Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 16);
    log.warn({ reason, retryInMs: Math.round(delay), version: this.agent.remoteState().version }, 'no control plane stream; serving the last snapshot and connecting again');
    this.timer = setTimeout(() => this.connect(), delay);
  }

  private setConnected(connected: boolean): void {
    if (this.connected === connected) return;
    this.connected = connected;
    this.events.onConnected?.(connected);
  }

  /** Validates and applies a Snapshot or Delta whole, then Acks; or Nacks and keeps the last good. */
  private apply(stream: ClientDuplexStream<AgentMessage, ControlPlaneMessage>, version: number, kind: 'snapshot' | 'delta', resources: () => Map<string, WireResource>, digest: string): void {
    const current = this.agent.remoteState().version;
    try {
      if (version < current) throw new SnapshotInvalid([{ object: 'Snapshot', field: 'version', message: `version ${version} is older than the version served (${current})` }]);
      const next = resources();
      const decoded = decodeResources(version, digest, [...next.values()]);
      // The roots are checked before anything of the snapshot applies: a bad bundle is refused whole.
      if (decoded.trustBundle) {
        try {
          this.agent.checkTrustBundle(decoded.trustBundle);
        } catch (e) {
          throw new SnapshotInvalid([{ object: 'TrustBundle mesh', field: 'roots', message: (e as Error).message }]);
        }
      }
      this.agent.applyRemote({ version, digest, ...decoded });
      this.held = next;
      stream.write({ ack: { version } });
      log.info({ version, kind, resources: next.size }, 'config applied');
      this.events.onAck?.(version);
    } catch (e) {
      if (!(e instanceof SnapshotInvalid)) throw e;
      stream.write({ nack: { version, errors: [...e.errors] } });
      log.error({ version, kind, errors: e.errors, serving: current }, 'config rejected; the last good one keeps serving');
      this.events.onNack?.(version, e);
    }
  }
}
