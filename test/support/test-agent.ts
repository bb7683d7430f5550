/** A Discovery client for control plane tests: says Hello, reports pods, holds what it is sent and Acks it. */
import { credentials, makeClientConstructor, type ClientDuplexStream } from '@grpc/grpc-js';

import { applyDelta, discoveryService, resourceKey, type AgentMessage, type ControlPlaneMessage, type WireResource, type WireWorkload } from '../../src/shared/protocol/discovery.js';

/** An agent that only holds what it is sent (Snapshot, then Deltas) and Acks it. */
export class TestAgent {
  held = new Map<string, WireResource>();
  version = 0;
  private readonly call: ClientDuplexStream<AgentMessage, ControlPlaneMessage>;

  constructor(address: string, node: string, pods: WireWorkload[]) {
    const Client = makeClientConstructor(discoveryService(), 'Discovery');
    const client = new Client(address, credentials.createInsecure());
    this.call = (client as unknown as { Stream(): ClientDuplexStream<AgentMessage, ControlPlaneMessage> }).Stream();
    this.call.on('error', () => undefined);
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

