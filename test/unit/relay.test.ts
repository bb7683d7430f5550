/** The JS relay of tunnelled connections (relayStreams) on loopback sockets: bytes, counts, the idle timeout re-armed by traffic. */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, connect, type Socket } from 'node:net';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { relayStreams } from '../../src/proxy/relay.js';

/** A connected pair of loopback sockets. */
async function pair(): Promise<[Socket, Socket]> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  const accepted = once(server, 'connection') as Promise<[Socket]>;
  const a = connect(port, '127.0.0.1');
  const [b] = await accepted;
  await once(a, 'connect');
  server.close();
  return [a, b];
}

test('relayStreams: bytes both ways and their counts; idle only after the last byte, not after the first', async () => {
  const [app, client] = await pair();
  const [upstream, server] = await pair();
  const result = relayStreams(client, upstream, 400);
  server.on('data', (d: Buffer) => server.write(d));
  let echoed = 0;
  app.on('data', (d: Buffer) => (echoed += d.length));
  // Traffic every 100 ms for 1 s: longer than the idle timeout, never idle that long.
  for (let i = 0; i < 10; i++) {
    app.write(Buffer.alloc(1000, i));
    await sleep(100);
  }
  assert.equal(client.destroyed, false, 'traffic keeps it open past the idle timeout');
  const r = await result;
  assert.equal(r.reason, 'idle_timeout');
  assert.equal(r.bytesFromClient, 10_000);
  assert.equal(r.bytesToClient, 10_000);
  assert.equal(echoed, 10_000);
  for (const s of [app, server]) s.destroy();
});
