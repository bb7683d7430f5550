/** A Discovery client for control plane tests: says Hello, reports pods, holds what it is sent and Acks it. */
import { Metadata, credentials, makeClientConstructor, type ClientDuplexStream, type ServiceError } from '@grpc/grpc-js';

import { applyDelta, discoveryService, resourceKey, type AgentMessage, type ControlPlaneMessage, type WireResource, type WireWorkload } from '../../src/protocol/discovery.js';

/** An agent that only holds what it is sent (Snapshot, then Deltas) and Acks it. */
export class TestAgent {
  held = new Map<string, WireResource>();
  version = 0;
  private readonly call: ClientDuplexStream<AgentMessage, ControlPlaneMessage>;

  /** How the control plane ended the stream, if it did. */
  error: ServiceError | undefined;

  constructor(address: string, node: string, pods: WireWorkload[], token?: string) {
    const Client = makeClientConstructor(discoveryService(), 'Discovery');
    const client = new Client(address, credentials.createInsecure());
    const metadata = new Metadata();
    if (token !== undefined) metadata.set('authorization', `Bearer ${token}`);
    this.call = (client as unknown as { Stream(m: Metadata): ClientDuplexStream<AgentMessage, ControlPlaneMessage> }).Stream(metadata);
    this.call.on('error', (e: ServiceError) => (this.error = e));
    this.call.on('data', (m: ControlPlaneMessage) => {
      if (m.snapshot) this.held = new Map(m.snapshot.resources.map((r) => [resourceKey(r), r]));
      else if (m.delta) this.held = applyDelta(this.held, this.version, m.delta);
      this.version = m.snapshot?.version ?? m.delta?.version ?? 0;
      this.call.write({ ack: { version: this.version } });
    });
    this.call.write({ hello: { node, agentVersion: 'test', capabilities: [], version: 0, digest: '' } });
    this.call.write({ pods: { pods } });
  }

  keys(kind: string): string[] {
    return [...this.held.keys()].filter((k) => k.startsWith(`${kind}/`)).sort();
  }

  stop(): void {
    this.call.cancel();
  }
}

