/**
 * The outbound path of one pod, in its first form: accept captured connections on the pod's
 * 15001 listener, read each one's original destination from the BPF maps, choose where to send
 * it, connect from inside the pod's netns (marked, from the agent's cgroup, so never captured
 * again) and relay both ways with half-close and backpressure.
 */
import { Socket, type Server } from 'node:net';
import { performance } from 'node:perf_hooks';

import { NM_PORT_OUTBOUND, NM_PROXY_MARK } from '../../datapath/abi.js';
import type { Family, SocketAddress } from '../../shared/address.js';
import type { OutboundCapture } from '../../datapath/capture.js';
import { connectInNetns, releaseNetns } from '../../datapath/native.js';
import { listenInPod } from '../pod-listener.js';
import { relay } from '../relay.js';
import { logger } from '../../shared/log.js';

const log = logger('proxy.outbound');

/** Where a captured connection goes: null refuses it. */
export type Router = (original: SocketAddress) => { host: string; port: number } | null;

export interface RelayedConnection {
  readonly original: SocketAddress | null;
  readonly upstream: { host: string; port: number } | null;
  readonly bytesFromClient: number;
  readonly bytesToClient: number;
  readonly durationMs: number;
  /** Why the connection was refused or failed; absent if it was relayed to the end. */
  readonly error?: string;
}

export interface PodEndpoint {
  readonly name: string;
  readonly namespace: string;
  readonly netnsPath: string;
}

export interface CaptureRelayOptions {
  readonly capture: OutboundCapture;
  readonly pod: PodEndpoint;
  readonly route: Router;
  readonly connectTimeoutMs?: number;
  readonly idleTimeoutMs?: number;
  readonly onConnection?: (c: RelayedConnection) => void;
}

export class CaptureRelay {
  private readonly servers: Server[] = [];
  private readonly sockets = new Set<Socket>();

  constructor(private readonly options: CaptureRelayOptions) {}

  /** Opens 127.0.0.1:15001 and [::1]:15001 inside the pod and starts serving them. */
  async start(): Promise<void> {
    for (const host of ['127.0.0.1', '::1']) {
      const listener = await listenInPod(this.options.pod.netnsPath, host, NM_PORT_OUTBOUND, (socket, cookie) => this.accept(socket, cookie));
      this.servers.push(listener.server);
    }
  }

  private accept(client: Socket, cookie: bigint): void {
    const started = performance.now();
    this.sockets.add(client);
    client.once('close', () => this.sockets.delete(client));
    const family: Family = client.remoteFamily === 'IPv6' ? 6 : 4;
    const original = this.options.capture.originalDestination({ netnsCookie: cookie, port: client.remotePort ?? 0, family });
    const finish = (c: Omit<RelayedConnection, 'durationMs'>): void => {
      const record: RelayedConnection = { ...c, durationMs: performance.now() - started };
      if (record.error) log.warn({ pod: this.options.pod.name, namespace: this.options.pod.namespace, ...record }, 'outbound connection failed');
      this.options.onConnection?.(record);
    };
    if (!original) {
      client.destroy();
      finish({ original, upstream: null, bytesFromClient: 0, bytesToClient: 0, error: 'no original destination in nm_orig_dst' });
      return;
    }
    const upstream = this.options.route(original);
    if (!upstream) {
      client.destroy();
      finish({ original, upstream, bytesFromClient: 0, bytesToClient: 0, error: 'no route for original destination' });
      return;
    }
    connectInNetns({
      netns: this.options.pod.netnsPath,
      host: upstream.host,
      port: upstream.port,
      mark: NM_PROXY_MARK,
      timeoutMs: this.options.connectTimeoutMs ?? 5_000,
    }).then(
      async (fd) => {
        const server = new Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
        this.sockets.add(server);
        server.once('close', () => this.sockets.delete(server));
        const result = await relay(client, server, this.options.idleTimeoutMs ?? 3_600_000);
        finish({ original, upstream, ...result });
      },
      (e: unknown) => {
        client.destroy();
        finish({ original, upstream, bytesFromClient: 0, bytesToClient: 0, error: (e as Error).message });
      },
    );
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    this.servers.length = 0;
    releaseNetns(this.options.pod.netnsPath);
  }
}
