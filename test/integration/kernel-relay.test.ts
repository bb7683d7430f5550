/** The addon's splice relay on real TCP sockets and socket pairs: bytes, half-close both ways, counts, slow readers, idle timeout. */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { Socket, connect, createServer } from 'node:net';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { dupFd, relayFds, socketPair } from '../../src/datapath/native.js';
import { socketFd } from '../../src/proxy/pod-listener.js';

/** A connected pair on loopback: [the side we keep, the side we hand to the relay]. */
async function tcpPair(): Promise<[Socket, Socket]> {
  let accepted: (s: Socket) => void = () => undefined;
  const acceptedP = new Promise<Socket>((resolve) => (accepted = resolve));
  const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => accepted(s));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  const client = connect({ host: '127.0.0.1', port, allowHalfOpen: true });
  await new Promise((resolve) => client.once('connect', resolve));
  const peer = await acceptedP;
  server.close();
  return [client, peer];
}

function handOver(s: Socket): number {
  const fd = socketFd(s);
  assert.ok(fd !== undefined, 'node:net exposes the fd');
  const own = dupFd(fd);
  s.destroy();
  return own;
}

function readAll(s: Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  s.on('data', (c: Buffer) => chunks.push(c));
  return new Promise((resolve, reject) => {
    s.once('end', () => resolve(Buffer.concat(chunks)));
    s.once('error', reject);
  });
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

test('kernel relay: 8 MiB one way, 4 MiB back, half-close each way, exact counts', async () => {
  const [left, leftPeer] = await tcpPair();
  const [right, rightPeer] = await tcpPair();
  // The relay joins leftPeer and right: what `left` writes arrives at `rightPeer`.
  const done = relayFds(handOver(leftPeer), handOver(right), 10_000);
  rightPeer.resume();
  const up = randomBytes(8 << 20);
  const down = randomBytes(4 << 20);
  const atRight = readAll(rightPeer);
  const atLeft = readAll(left);
  left.end(up);
  assert.equal(sha(await atRight), sha(up), 'upstream bytes intact, then EOF');
  // The other direction still works after the first one ended (half-close).
  rightPeer.end(down);
  assert.equal(sha(await atLeft), sha(down), 'downstream bytes intact, then EOF');
  assert.deepEqual(await done, { bytesFromClient: 8 << 20, bytesToClient: 4 << 20 });
  left.destroy();
  rightPeer.destroy();
});

test('kernel relay: a socket pair end and a TCP socket, each reader stopped for a while: the relay waits for room and loses nothing', async () => {
  const [left, leftPeer] = await tcpPair();
  const [relayed, kept] = socketPair();
  // A socket pair's end as the L7 paths hand it over (the other end served in this process).
  const app = new Socket({ fd: kept, readable: true, writable: true, allowHalfOpen: true });
  app.pause();
  left.pause();
  const done = relayFds(handOver(leftPeer), relayed, 10_000);
  const up = randomBytes(16 << 20);
  const down = randomBytes(16 << 20);
  left.end(up);
  // Nobody reads the pair's end: the relay fills it and must wait for room (EPOLLOUT).
  await sleep(300);
  const atApp = readAll(app);
  app.resume();
  assert.equal(sha(await atApp), sha(up), 'bytes into the socket pair intact, then EOF');
  app.end(down);
  await sleep(300);
  const atLeft = readAll(left);
  left.resume();
  assert.equal(sha(await atLeft), sha(down), 'bytes into the TCP socket intact, then EOF');
  assert.deepEqual(await done, { bytesFromClient: 16 << 20, bytesToClient: 16 << 20 });
  left.destroy();
  app.destroy();
});

test('kernel relay: an idle connection ends after the timeout with the reason', async () => {
  const [left, leftPeer] = await tcpPair();
  const [right, rightPeer] = await tcpPair();
  const started = Date.now();
  const result = await relayFds(handOver(leftPeer), handOver(right), 300);
  assert.equal(result.error, 'idle for 300 ms');
  assert.ok(Date.now() - started >= 300);
  left.destroy();
  rightPeer.destroy();
});
