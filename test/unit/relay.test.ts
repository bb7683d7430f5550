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

test('relayStreams: a side that closes both ways while the other still sends ends the relay at once; what it sent first still arrives', async (t) => {
  // An HTTP/2 stream as the upstream (an HBONE tunnel's), whose peer answers and then closes the
  // stream (RST_STREAM NO_ERROR) while the client is still uploading.
  const { createServer: h2server, connect: h2connect, constants } = await import('node:http2');
  const server = h2server();
  server.on('stream', (stream) => {
    stream.respond({ ':status': 200 });
    stream.write(Buffer.from('the answer'), () => stream.close(constants.NGHTTP2_NO_ERROR));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => server.close());
  const session = h2connect(`http://127.0.0.1:${(server.address() as { port: number }).port}`);
  t.after(() => session.destroy());
  const stream = session.request({ ':method': 'POST', ':path': '/' }, { endStream: false });
  await once(stream, 'response');
  const [app, client] = await pair();
  const result = relayStreams(client, stream, 10_000);
  let received = '';
  app.on('data', (d: Buffer) => (received += d.toString()));
  app.on('error', () => undefined);
  const sending = setInterval(() => app.writable && app.write(Buffer.alloc(64 * 1024, 1)), 10);
  t.after(() => clearInterval(sending));
  const started = Date.now();
  const r = await result;
  clearInterval(sending);
  assert.ok(Date.now() - started < 3000, `the relay ended after ${Date.now() - started} ms, not at the idle timeout`);
  assert.equal(r.bytesToClient, 'the answer'.length);
  await once(app, 'close');
  assert.equal(received, 'the answer');
});
