/**
 * The addon's HBONE engine (native/src/hbone.cc) on loopback sockets, with real TLS 1.3 and
 * HTTP/2 both ways: bytes and their counts through a tunnel, half-close, flow control against a
 * slow application, resets, identities, and a node:http2 peer on either end (another HTTP/2
 * stack's view of the wire). The agent-level behaviour (pods, policies, refusal metrics) is in
 * hbone.test.ts and security.test.ts.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect as h2connect, createSecureServer, type ServerHttp2Stream } from 'node:http2';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { dupFd } from '../../src/datapath/native.js';
import type { HboneEvent } from '../../src/datapath/native.js';
import { createRoot, generateKeyPair, importSigningKey, issueLeaf, parseCertificate, privateKeyPem, type Signer } from '../../src/identity/x509.js';
import { HboneEngine, NativeTunnelStream } from '../../src/proxy/tunnel/native.js';
import { socketFd } from '../../src/proxy/pod-listener.js';
import { waitFor } from '../support/sandbox.js';

const SERVER_ID = 'spiffe://cluster.local/ns/default/sa/server';
const CLIENT_ID = 'spiffe://cluster.local/ns/default/sa/client';

interface Credentials {
  readonly key: string;
  readonly cert: string;
}

async function pki(): Promise<{ root: string; leaf: (uri: string) => Promise<Credentials> }> {
  const r = await createRoot('cluster.local', new Date(Date.now() + 3600_000));
  const signer: Signer = { cert: parseCertificate(r.certPem), ...(await importSigningKey(r.keyPem)) };
  return {
    root: r.certPem,
    leaf: async (uri) => {
      const keys = await generateKeyPair();
      return { key: await privateKeyPem(keys.privateKey), cert: await issueLeaf(signer, { publicKey: keys.publicKey, uris: [uri], notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 3600_000) }) };
    },
  };
}

async function listening(server: Server): Promise<number> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return (server.address() as { port: number }).port;
}

/** A connected loopback pair: [the application's end, the fd the engine takes for the other]. */
async function socketPair(t: TestContext): Promise<[Socket, number]> {
  const server = createServer();
  const port = await listening(server);
  const accepted = once(server, 'connection') as Promise<[Socket]>;
  // Half-open allowed: the application ends its side when it is done, not when the tunnel's ends.
  const app = connect({ port, host: '127.0.0.1', allowHalfOpen: true });
  const [other] = await accepted;
  await once(app, 'connect');
  server.close();
  const fd = dupFd(socketFd(other) ?? -1);
  other.destroy();
  t.after(() => app.destroy());
  return [app, fd];
}

/** The engine serving on a loopback port: CONNECT requests and closed connections arrive as events. */
async function serve(engine: HboneEngine, creds: Credentials, root: string, onEvent: (e: Extract<HboneEvent, { type: 'request' | 'closed' }>) => void): Promise<{ port: number; close: () => void }> {
  const holder = createServer();
  const port = await listening(holder);
  // The listening socket's fd, as node:net made it (a server's handle has one, as a socket's does).
  const fd = dupFd(socketFd(holder as unknown as Socket) ?? -1);
  holder.close();
  const context = engine.addon.hboneContext(true, creds.key, creds.cert, [root]);
  const server = engine.serve(fd, context, onEvent);
  engine.addon.hboneContextFree(context);
  return { port, close: () => engine.closeServer(server) };
}

/** A tunnel from the engine to port, expecting `expected`. */
async function dial(engine: HboneEngine, port: number, creds: Credentials, root: string, expected: string): Promise<number> {
  const s = connect(port, '127.0.0.1');
  await once(s, 'connect');
  const fd = dupFd(socketFd(s) ?? -1);
  s.destroy();
  const context = engine.addon.hboneContext(false, creds.key, creds.cert, [root]);
  try {
    return await engine.dial(fd, context, expected, () => undefined);
  } finally {
    engine.addon.hboneContextFree(context);
  }
}

function readAll(s: Socket): Promise<{ bytes: number; sum: number; error?: string }> {
  return new Promise((resolve) => {
    let bytes = 0;
    let sum = 0;
    s.on('data', (d: Buffer) => {
      bytes += d.length;
      for (const b of d) sum = (sum + b) % 65521;
    });
    s.on('end', () => resolve({ bytes, sum }));
    s.on('error', (e: NodeJS.ErrnoException) => resolve({ bytes, sum, error: e.code ?? e.message }));
  });
}

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

function checksum(b: Buffer): number {
  let sum = 0;
  for (const x of b) sum = (sum + x) % 65521;
  return sum;
}

test('hbone engine: 8 MiB each way through a tunnel with half-close, exact counts, CONNECT headers as sent', async (t) => {
  const engine = HboneEngine.get();
  const { root, leaf } = await pki();
  const up = pattern(8 << 20, 1);
  const down = pattern(8 << 20, 7);
  let serverSide: Promise<{ got: Awaited<ReturnType<typeof readAll>>; relayed: Awaited<ReturnType<NativeTunnelStream['attach']>> }> | undefined;
  let request: Extract<HboneEvent, { type: 'request' }> | undefined;
  const server = await serve(engine, await leaf(SERVER_ID), root, (e) => {
    if (e.type !== 'request') return;
    request = e;
    serverSide = (async () => {
      const [app, fd] = await socketPair(t);
      const got = readAll(app);
      const relayed = new NativeTunnelStream(e.handle, engine).attach(fd, 30_000);
      // The server's application answers once the client's half is in (a request, then a response).
      await got;
      app.end(down);
      return { got: await got, relayed: await relayed };
    })();
  });
  t.after(() => server.close());
  const conn = await dial(engine, server.port, await leaf(CLIENT_ID), root, SERVER_ID);
  const { handle, status } = engine.request(conn, `127.0.0.1:${server.port}`, 'for="10.0.0.9:4242"');
  assert.equal(await status, 200);
  const [app, fd] = await socketPair(t);
  const back = readAll(app);
  const relayed = new NativeTunnelStream(handle, engine).attach(fd, 30_000);
  app.end(up);
  const [client, serverResult] = await Promise.all([relayed, back.then(async (b) => ({ b, s: await serverSide }))]);
  assert.ok(request && serverResult.s, "the server got the CONNECT");
  assert.equal(request.method, 'CONNECT');
  assert.equal(request.authority, `127.0.0.1:${server.port}`);
  assert.equal(request.forwarded, 'for="10.0.0.9:4242"');
  assert.equal(request.peer, CLIENT_ID, 'the client identity from its certificate');
  assert.equal(request.source, '127.0.0.1');
  assert.deepEqual(serverResult.s.got, { bytes: up.length, sum: checksum(up) }, 'the server application got every byte, then an end');
  assert.deepEqual(serverResult.b, { bytes: down.length, sum: checksum(down) }, 'the client application got every byte back, then an end');
  assert.equal(client.bytesFromClient, up.length);
  assert.equal(client.bytesToClient, down.length);
  assert.equal(client.error, undefined);
  assert.equal(serverResult.s.relayed.bytesFromClient, down.length, "server side: bytes from its application");
  assert.equal(serverResult.s.relayed.bytesToClient, up.length);
  engine.addon.hboneClose(conn);
});

test('hbone engine: a slow application holds the sender back by HTTP/2 flow control and loses nothing; a reset reaches the other application', async (t) => {
  const engine = HboneEngine.get();
  const { root, leaf } = await pki();
  const apps: Socket[] = [];
  const server = await serve(engine, await leaf(SERVER_ID), root, (e) => {
    if (e.type !== 'request') return;
    void socketPair(t).then(([app, fd]) => {
      app.pause();
      apps.push(app);
      void new NativeTunnelStream(e.handle, engine).attach(fd, 30_000);
    });
  });
  t.after(() => server.close());
  const conn = await dial(engine, server.port, await leaf(CLIENT_ID), root, SERVER_ID);

  // 96 MiB towards an application that reads nothing for a second: more than the stream's window
  // (4 MiB), the engine's read-ahead (512 KiB) and what the loopback sockets on the way can buffer
  // (here up to 4 MiB sent and 32 MiB received each), so the sender must be held back, then resume.
  const big = pattern(96 << 20, 3);
  const first = engine.request(conn, '127.0.0.1:1', '');
  assert.equal(await first.status, 200);
  const [sender, fd] = await socketPair(t);
  const relayed = new NativeTunnelStream(first.handle, engine).attach(fd, 30_000);
  let drained = false;
  sender.end(big, () => (drained = true));
  await sleep(1000);
  assert.equal(drained, false, 'the sender is held back while the application reads nothing');
  assert.equal(apps.length, 1);
  const receiver = apps[0] as Socket;
  const got = readAll(receiver);
  receiver.resume();
  const r = await got;
  assert.deepEqual(r, { bytes: big.length, sum: checksum(big) });
  receiver.end();
  const result = await relayed;
  assert.equal(result.bytesFromClient, big.length);

  // The server's application resets its connection: the client's application sees a reset, not an end.
  const second = engine.request(conn, '127.0.0.1:1', '');
  assert.equal(await second.status, 200);
  const [client, fd2] = await socketPair(t);
  const ended = readAll(client);
  const relayed2 = new NativeTunnelStream(second.handle, engine).attach(fd2, 30_000);
  client.write('hello');
  await waitFor(() => apps.length === 2, 5000, 'the second CONNECT delivered');
  const serverApp = apps[1] as Socket;
  serverApp.resume();
  await sleep(100);
  serverApp.resetAndDestroy();
  assert.equal((await ended).error, 'ECONNRESET');
  assert.equal((await relayed2).reason, 'reset');
  engine.addon.hboneClose(conn);
});

test('hbone engine: a server of another identity or another root is refused; a client of another root is refused by the server', async (t) => {
  const engine = HboneEngine.get();
  const { root, leaf } = await pki();
  const other = await pki();
  const closed: Array<Extract<HboneEvent, { type: 'closed' }>> = [];
  const server = await serve(engine, await leaf(SERVER_ID), root, (e) => {
    if (e.type === 'closed') closed.push(e);
    else engine.addon.hboneAnswer(e.handle, 503);
  });
  t.after(() => server.close());
  const wrongIdentity = await dial(engine, server.port, await leaf(CLIENT_ID), root, 'spiffe://cluster.local/ns/default/sa/other').catch((e: unknown) => e as Error & { reason?: string });
  assert.ok(wrongIdentity instanceof Error);
  assert.equal(wrongIdentity.reason, 'identity_mismatch');
  assert.match(wrongIdentity.message, /presented spiffe:\/\/cluster\.local\/ns\/default\/sa\/server, not spiffe:\/\/cluster\.local\/ns\/default\/sa\/other/);
  const wrongRoot = await dial(engine, server.port, await leaf(CLIENT_ID), other.root, SERVER_ID).catch((e: unknown) => e as Error & { reason?: string });
  assert.ok(wrongRoot instanceof Error);
  assert.equal(wrongRoot.reason, 'tls');
  assert.match(wrongRoot.message, /certificate verify failed/);
  // The client's certificate from another root: the server ends the handshake.
  const before = closed.length;
  const conn = await dial(engine, server.port, await other.leaf(CLIENT_ID), root, SERVER_ID).catch((e: unknown) => e);
  if (typeof conn === 'number') {
    // TLS 1.3: the client may finish before the server's verdict arrives; its CONNECT is never answered.
    const { status } = engine.request(conn, '127.0.0.1:1', '');
    await assert.rejects(status);
  }
  await waitFor(() => closed.length > before, 5000, 'the refused connection reported');
  assert.ok(closed.slice(before).some((e) => e.reason === 'tls_handshake' || e.during === 'tls'), JSON.stringify(closed));
});

test('hbone engine: a node:http2 peer on either end (another HTTP/2 client and server speaking the same wire)', async (t) => {
  const engine = HboneEngine.get();
  const { root, leaf } = await pki();
  // node:http2 serves CONNECT; the engine is the client.
  const serverCreds = await leaf(SERVER_ID);
  const h2server = createSecureServer({ ...serverCreds, ca: [root], requestCert: true, minVersion: 'TLSv1.3', ALPNProtocols: ['h2'] });
  h2server.on('stream', (stream: ServerHttp2Stream, headers) => {
    assert.equal(headers[':method'], 'CONNECT');
    stream.respond({ ':status': 200 });
    stream.pipe(stream);
  });
  h2server.listen(0, '127.0.0.1');
  await once(h2server, 'listening');
  t.after(() => h2server.close());
  const port = (h2server.address() as { port: number }).port;
  const conn = await dial(engine, port, await leaf(CLIENT_ID), root, SERVER_ID);
  const { handle, status } = engine.request(conn, `127.0.0.1:${port}`, '');
  assert.equal(await status, 200);
  const [app, fd] = await socketPair(t);
  const echoed = readAll(app);
  const relayed = new NativeTunnelStream(handle, engine).attach(fd, 30_000);
  const payload = pattern(1 << 20, 5);
  app.end(payload);
  assert.deepEqual(await echoed, { bytes: payload.length, sum: checksum(payload) });
  assert.equal((await relayed).bytesToClient, payload.length);
  engine.addon.hboneClose(conn);

  // The engine serves; node:http2 is the client.
  const server = await serve(engine, await leaf(SERVER_ID), root, (e) => {
    if (e.type !== 'request') return;
    void socketPair(t).then(([appEnd, appFd]) => {
      appEnd.pipe(appEnd);
      void new NativeTunnelStream(e.handle, engine).attach(appFd, 30_000);
    });
  });
  t.after(() => server.close());
  const session = h2connect(`https://127.0.0.1:${server.port}`, { ...(await leaf(CLIENT_ID)), ca: [root], checkServerIdentity: () => undefined });
  t.after(() => session.destroy());
  const stream = session.request({ ':method': 'CONNECT', ':authority': `127.0.0.1:${server.port}` });
  const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
  assert.equal(headers[':status'], 200);
  const chunks: Buffer[] = [];
  stream.on('data', (d: Buffer) => chunks.push(d));
  stream.end(payload);
  await once(stream, 'end');
  assert.equal(checksum(Buffer.concat(chunks)), checksum(payload));
  assert.equal(Buffer.concat(chunks).length, payload.length);
});

test('hbone engine: a relay with no traffic for its idle timeout ends with idle_timeout, both applications told', async (t) => {
  const engine = HboneEngine.get();
  const { root, leaf } = await pki();
  const serverApps: Socket[] = [];
  const server = await serve(engine, await leaf(SERVER_ID), root, (e) => {
    if (e.type !== 'request') return;
    void socketPair(t).then(([app, fd]) => {
      serverApps.push(app);
      void new NativeTunnelStream(e.handle, engine).attach(fd, 60_000);
    });
  });
  t.after(() => server.close());
  const conn = await dial(engine, server.port, await leaf(CLIENT_ID), root, SERVER_ID);
  const { handle, status } = engine.request(conn, '127.0.0.1:1', '');
  assert.equal(await status, 200);
  const [app, fd] = await socketPair(t);
  const started = Date.now();
  const relayed = new NativeTunnelStream(handle, engine).attach(fd, 500);
  const ended = readAll(app);
  // Traffic for a while keeps it open past its timeout; then nothing.
  for (let i = 0; i < 4; i++) {
    app.write('x');
    await sleep(200);
  }
  const r = await relayed;
  assert.equal(r.reason, 'idle_timeout');
  assert.equal(r.bytesFromClient, 4);
  assert.ok(Date.now() - started >= 1100, 'not before the last byte plus the timeout');
  assert.equal((await ended).error, undefined, 'the client application gets an end (FIN), not a reset');
  // The other side's stream was reset (CANCEL): its application is reset too.
  await waitFor(() => serverApps.length === 1, 5000, 'the CONNECT delivered');
  const other = await readAll(serverApps[0] as Socket);
  assert.equal(other.bytes, 4);
  assert.equal(other.error, 'ECONNRESET');
  engine.addon.hboneClose(conn);
});
