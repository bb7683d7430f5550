/**
 * The foundation's bet, on the real kernel: eBPF on a pod's cgroup captures its outbound
 * connections to addresses no host has, hands them to a listener this process opened inside the
 * pod's netns, the BPF maps give back exactly the address dialed, and bytes relayed to another
 * pod come back intact. The relay's own sockets are never captured.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { OutboundCapture, type CgroupCapture } from '../../src/datapath/capture.js';
import { CaptureRelay, type RelayedConnection } from '../../src/proxy/outbound/capture-relay.js';
import { createSandbox, waitFor } from '../support/sandbox.js';

const SERVICE_V4 = '10.96.0.10';
const SERVICE_V6 = 'fd00:96::a';
const SERVICE_PORT = 80;
const SERVER_PORT = 8080;

test('outbound capture: original destination, intact bytes, no loop; detached means not captured', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SERVICE_V4);
  await sb.blackhole(SERVICE_V6);

  const server = await sb.echoPod('server-b', SERVER_PORT);
  const client = await sb.idlePod('client-a');

  // Without capture, the pod cannot reach a service address at all: it has no route to it.
  const before = await sb.dialFrom(client, SERVICE_V4, SERVICE_PORT);
  assert.equal(before.ok, false);
  assert.equal(before.error, 'ENETUNREACH');

  const capture = await OutboundCapture.load({ mapPinDir: sb.bpffsDir });
  sb.defer(() => capture.close());
  const attached: CgroupCapture = await capture.attach(client.cgroupPath);
  sb.defer(() => attached.detach());

  const relayed: RelayedConnection[] = [];
  const relay = new CaptureRelay({
    capture,
    pod: { name: client.name, namespace: client.namespace, netnsPath: client.netnsPath },
    route: (orig) => ({ host: orig.family === 4 ? server.record.ip4 : server.record.ip6, port: SERVER_PORT }),
    onConnection: (c) => relayed.push(c),
  });
  await relay.start();
  sb.defer(() => relay.close());

  const cases = [
    { dial: SERVICE_V4, expect: { family: 4, address: SERVICE_V4 }, peer: client.ip4 },
    { dial: SERVICE_V6, expect: { family: 6, address: SERVICE_V6 }, peer: client.ip6 },
    // A dual-stack socket dialing a v4-mapped address is an IPv4 connection to the listener.
    { dial: `::ffff:${SERVICE_V4}`, expect: { family: 4, address: SERVICE_V4 }, peer: client.ip4 },
  ] as const;

  for (const [i, c] of cases.entries()) {
    const result = await sb.dialFrom(client, c.dial, SERVICE_PORT, { bytes: 256 * 1024 });
    assert.equal(result.error, undefined, `dial ${c.dial}`);
    assert.equal(result.received, 256 * 1024, `dial ${c.dial}: echoed bytes`);
    assert.ok(result.intact, `dial ${c.dial}: bytes came back intact`);

    await waitFor(() => relayed.length === i + 1, 5000, `relay record for ${c.dial}`);
    const conn = relayed[i];
    assert.ok(conn);
    assert.equal(conn.error, undefined);
    assert.deepEqual(conn.original, { ...c.expect, port: SERVICE_PORT }, `original destination of ${c.dial}`);
    assert.equal(conn.bytesFromClient, 256 * 1024);
    assert.equal(conn.bytesToClient, 256 * 1024);

    // The server saw the connection come from pod A's own address: the relay dialed from
    // inside A's netns, not from the host, and exactly once.
    await waitFor(async () => (await server.connections()).length === i + 1, 5000, 'server log');
    const seen = (await server.connections())[i];
    assert.equal(seen?.address.replace(/^::ffff:/, ''), c.peer);
    assert.equal(seen?.bytes, 256 * 1024);
  }

  // No loop: every accepted connection was one the client made, and the relay's upstream
  // sockets (agent cgroup, marked) left no capture entries behind.
  assert.equal(relayed.length, cases.length);
  assert.deepEqual(capture.pending(), { connecting: 0, established: 0 });

  // A socket the pod's process marked with the proxy's mark is captured like any other: the
  // mark is not trusted (a pod may set it), only the cgroup is.
  const marked = await sb.dialFrom(client, SERVICE_V4, SERVICE_PORT, { mark: true });
  assert.ok(marked.intact, `marked: ${JSON.stringify(marked)}`);
  assert.equal(relayed.length, cases.length + 1);

  // Detached: the same dials are no longer captured.
  attached.detach();
  for (const dial of [SERVICE_V4, SERVICE_V6]) {
    const after = await sb.dialFrom(client, dial, SERVICE_PORT);
    assert.equal(after.ok, false, `dial ${dial} after detach`);
    assert.equal(after.error, 'ENETUNREACH', `dial ${dial} after detach`);
  }
  assert.equal(relayed.length, cases.length + 1, 'no connection reached the relay after detach');

  // Pod-to-pod traffic was never the relay's business either way.
  const direct = await sb.dialFrom(client, server.record.ip4, SERVER_PORT);
  assert.ok(direct.intact);
});
