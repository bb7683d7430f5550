/**
 * HBONE between two nodes on the real kernel, with real TLS: what crosses the bridge between
 * pods of different nodes is mutual TLS to 15008 (a packet capture finds the TLS handshake and not
 * one copy of the application's marker), while traffic to a pod outside the mesh stays visible;
 * and the inbound end refuses what it must: a client certificate from another root or expired,
 * junk instead of TLS, a CONNECT to an address that is not the pod's, to a proxy port, or with
 * another method; the outbound end refuses a server that is not the identity it expects.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { connect as h2connect, type ClientHttp2Session } from 'node:http2';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { connect as tlsConnect } from 'node:tls';

import { createRoot, generateKeyPair, importSigningKey, issueLeaf, parseCertificate, privateKeyPem, type Signer } from '../../src/identity/x509.js';
import { TunnelFailed, TunnelPool, type TunnelTarget } from '../../src/proxy/tunnel/client.js';
import { NativeTunnelPool, NativeTunnelStream } from '../../src/proxy/tunnel/native.js';
import { metricValue, serviceYaml, startAgent, startControlPlane } from '../support/agent.js';
import { readPcap } from '../support/pcap.js';
import { collect, createSandbox, waitFor, type Sandbox } from '../support/sandbox.js';

const SVC = '10.96.0.71';

/** Two nodes behind one control plane (agents over TLS): a client pod on A, server pods on B. */
async function twoNodes(t: Parameters<typeof createSandbox>[0], options: { certTtl?: string } = {}) {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const nodeB = `${sb.config.node}-b`;
  const cp = await startControlPlane(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }) }, options.certTtl === undefined ? {} : { certTtl: options.certTtl });
  const agentA = await startAgent(sb, { controlPlane: cp.tlsAddress, caRoot: cp.caRoot });
  const agentB = await startAgent(sb, { controlPlane: cp.tlsAddress, caRoot: cp.caRoot }, { node: nodeB });
  const server = await sb.echoPod('server-b', 8080, ['app=server'], { node: nodeB, serviceAccount: 'server' });
  const client = await sb.idlePod('client-a', [], { serviceAccount: 'client' });
  await waitFor(async () => ((await agentA.config()).services.find((s) => s.service === 'default/server:80')?.endpoints.length ?? 0) === 1, 10_000, "B's server as an endpoint on A");
  return { sb, cp, nodeB, agentA, agentB, server, client };
}

/**
 * tcpdump on a port of the sandbox's bridge (a pod's host-side veth: the bridge device itself only
 * sees frames for the host) until stop(); started and stopped by PID, removed by the sandbox.
 */
async function capture(sb: Sandbox, hostVeth: string): Promise<{ stop(): Promise<string> }> {
  const dir = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-pcap-`));
  sb.defer(() => rm(dir, { recursive: true, force: true }));
  const file = join(dir, 'bridge.pcap');
  // --immediate-mode: each packet is handed over as it comes, so stopping loses none still in the kernel's ring.
  const child = spawn('tcpdump', ['-i', hostVeth, '--immediate-mode', '-U', '-s', '0', '-w', file, 'tcp'], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  sb.defer(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    await exited;
  });
  await waitFor(() => /listening on/.test(stderr), 10_000, `tcpdump listening (${stderr})`);
  return {
    async stop() {
      child.kill('SIGINT');
      await exited;
      return file;
    },
  };
}

test('hbone: between nodes the application bytes cross the bridge only inside mutual TLS to 15008', async (t) => {
  const { sb, agentA, agentB, server, client, nodeB } = await twoNodes(t);
  // A pod outside the mesh on node B: traffic to it is plain TCP (what the capture must see).
  const outside = await sb.echoPod('outside-b', 8080, ['nodemesh.io/capture=disabled'], { node: nodeB });
  // Everything the client pod sends or receives crosses its bridge port.
  const pcap = await capture(sb, client.hostVeth);
  const secret = `nodemesh-secret-${randomBytes(8).toString('hex')}`;
  const visible = `nodemesh-visible-${randomBytes(8).toString('hex')}`;
  const meshed = await sb.dialFrom(client, SVC, 80, { bytes: 256 * 1024, marker: secret });
  assert.ok(meshed.intact, JSON.stringify(meshed));
  const plain = await sb.dialFrom(client, outside.record.ip4, 8080, { bytes: 4096, marker: visible });
  assert.ok(plain.intact, JSON.stringify(plain));
  await waitFor(async () => (await server.connections()).length === 1, 5000, 'the server got the meshed connection');
  const segments = await readPcap(await pcap.stop());
  const wire = Buffer.concat(segments.map((s) => s.payload));

  assert.ok(wire.includes(visible), `the capture sees plain TCP (the control): ${segments.length} segments, ports ${[...new Set(segments.map((x) => `${x.srcPort}>${x.dstPort}`))].slice(0, 20).join(' ')}`);
  assert.ok(!wire.includes(secret), 'no copy of the marker in clear on the bridge');
  // To B's pod on 15008: a TLS handshake record (0x16 0x03) opens the tunnel, then TLS records only.
  const toTunnel = segments.filter((s) => s.dstPort === 15008 && s.payload.length > 0);
  assert.ok(toTunnel.length > 0, 'segments to 15008');
  assert.equal(toTunnel[0]?.payload[0], 0x16, 'a TLS handshake record first');
  assert.equal(toTunnel[0]?.payload[1], 0x03);
  assert.ok(toTunnel[0]?.payload.includes(Buffer.from([0x02, 0x68, 0x32])), 'the ClientHello offers ALPN h2');
  assert.equal(segments.filter((s) => s.dstPort === 8080 && s.payload.includes(Buffer.from(secret.slice(0, 16)))).length, 0, 'nothing of it went to the application port');

  const mtls = { connection_security_policy: 'mutual_tls', source_principal: 'spiffe://cluster.local/ns/default/sa/client', destination_principal: 'spiffe://cluster.local/ns/default/sa/server' };
  assert.equal(metricValue(await agentA.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', ...mtls }), 1);
  await waitFor(async () => metricValue(await agentB.metrics(), 'istio_tcp_connections_closed_total', { reporter: 'destination', ...mtls }) === 1, 5000, "B's mutual_tls report");
  assert.ok(metricValue(await agentB.metrics(), 'istio_tcp_received_bytes_total', { reporter: 'destination', ...mtls }) >= 256 * 1024);
  // The plain connection to the pod outside the mesh is reported as such by A (passed through).
  assert.equal(metricValue(await agentA.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', connection_security_policy: 'none', destination_service: 'PassthroughCluster' }), 1);
});

test('hbone: the inbound end refuses bad certificates, junk and bad CONNECTs with counted reasons; the outbound end refuses a server of the wrong identity', async (t) => {
  const { cp, agentB, server, client } = await twoNodes(t);
  // The mesh CA, as the test can reach it: leaves for any identity, with any lifetime.
  const ca: Signer = { cert: parseCertificate(readFileSync(cp.caRoot, 'utf8')), ...(await importSigningKey(readFileSync(join(cp.caRoot, '..', 'root-key.pem'), 'utf8'))) };
  const root = readFileSync(cp.caRoot, 'utf8');
  const leaf = async (uri: string, signer: Signer, notAfter = new Date(Date.now() + 3600_000)): Promise<{ key: string; cert: string }> => {
    const keys = await generateKeyPair();
    return { key: await privateKeyPem(keys.privateKey), cert: await issueLeaf(signer, { publicKey: keys.publicKey, uris: [uri], notBefore: new Date(Date.now() - 60_000), notAfter }) };
  };
  const pod = server.record.ip4;
  const refused = async (reason: string): Promise<number> => metricValue(await agentB.metrics(), 'nodemesh_hbone_refused_total', { reason });

  /** An HTTP/2 session to B's pod on 15008 with a client certificate. */
  const session = (creds: { key: string; cert: string }): Promise<ClientHttp2Session> =>
    new Promise((resolve, reject) => {
      const s = h2connect(`https://${pod}:15008`, { ...creds, ca: root, minVersion: 'TLSv1.3', checkServerIdentity: () => undefined });
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
  /** The status a request is answered with; rejects if the stream or session ends first. */
  const status = (s: ClientHttp2Session, headers: Record<string, string>): Promise<number> =>
    new Promise((resolve, reject) => {
      const req = s.request(headers, { endStream: false });
      const timer = setTimeout(() => reject(new Error('no answer in 5 s')), 5000);
      req.once('response', (h) => {
        clearTimeout(timer);
        resolve(Number(h[':status']));
      });
      req.once('error', (e: Error) => {
        clearTimeout(timer);
        reject(e);
      });
      req.once('close', () => {
        clearTimeout(timer);
        reject(new Error(`stream closed (code ${req.rstCode ?? '?'})`));
      });
    });

  // A valid client: CONNECT to the pod's own address works (the control); the wrong ones do not.
  const good = await session(await leaf('spiffe://cluster.local/ns/default/sa/tester', ca));
  t.after(() => good.destroy());
  assert.equal(await status(good, { ':method': 'CONNECT', ':authority': `${pod}:8080` }), 200);
  assert.equal(await status(good, { ':method': 'CONNECT', ':authority': `${client.ip4}:8080` }), 400, 'another address than the one dialled');
  assert.equal(await status(good, { ':method': 'CONNECT', ':authority': `${pod}:15006` }), 503, 'a proxy port');
  assert.equal(await status(good, { ':method': 'GET', ':path': '/', ':scheme': 'https', ':authority': `${pod}:8080` }), 400, 'not CONNECT');
  assert.equal(await refused('authority_mismatch'), 1);
  assert.equal(await refused('proxy_port'), 1);
  assert.equal(await refused('bad_request'), 1);

  // Certificates B must not accept: another root's, an expired one of the mesh's.
  const otherRoot = await createRoot('cluster.local', new Date(Date.now() + 3600_000));
  const other: Signer = { cert: parseCertificate(otherRoot.certPem), ...(await importSigningKey(otherRoot.keyPem)) };
  // (TLS 1.3: the client's handshake completes before the server has checked its certificate;
  // the server's alert ends the connection then, so no CONNECT is ever answered.)
  const refusedCert = async (creds: { key: string; cert: string }): Promise<boolean> => {
    const s = await session(creds).catch(() => undefined);
    if (!s) return true;
    const answered = await status(s, { ':method': 'CONNECT', ':authority': `${pod}:8080` }).then(
      () => true,
      () => false,
    );
    s.destroy();
    return !answered;
  };
  assert.ok(await refusedCert(await leaf('spiffe://cluster.local/ns/default/sa/tester', other)), "another root's certificate");
  assert.ok(await refusedCert(await leaf('spiffe://cluster.local/ns/default/sa/tester', ca, new Date(Date.now() - 1000))), 'an expired certificate');
  // Junk instead of a TLS ClientHello; a TLS client that never speaks HTTP/2.
  await new Promise<void>((resolve) => {
    const s = netConnect({ host: pod, port: 15008 }, () => s.end(Buffer.from('GET / HTTP/1.1\r\n\r\n')));
    s.on('error', () => resolve()).on('close', () => resolve());
  });
  await waitFor(async () => (await refused('tls_handshake')) >= 3, 5000, 'three refused handshakes');
  // A peer that authenticates and settles HTTP/2, then sends an invalid frame (a SETTINGS frame
  // of 5 bytes: FRAME_SIZE_ERROR). nghttp2 answers GOAWAY and the addon's engine closes the
  // connection (h2_error); node:http2 (--hbone node) keeps it open without an event, and the
  // server's unanswered pings end it (ping_timeout): closed and counted either way.
  const framesFrom = await leaf('spiffe://cluster.local/ns/default/sa/tester', ca);
  await new Promise<void>((resolve, reject) => {
    const s = tlsConnect({ host: pod, port: 15008, ...framesFrom, ca: root, ALPNProtocols: ['h2'], checkServerIdentity: () => undefined }, () => {
      const settings = Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0]);
      s.write(Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'), settings, Buffer.from([0, 0, 5, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5])]));
    });
    const timer = setTimeout(() => reject(new Error('the server kept a connection that sent an invalid frame')), 15_000);
    s.on('error', () => undefined);
    s.resume();
    s.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
  await waitFor(async () => (await refused('h2_error')) + (await refused('ping_timeout')) >= 1, 5000, 'the dead connection counted');
  assert.equal(await status(good, { ':method': 'CONNECT', ':authority': `${pod}:8080` }), 200, 'the listener serves on');

  // The outbound end, both engines: B's server presents sa/server; a tunnel that expects sa/other is refused.
  const creds = await leaf('spiffe://cluster.local/ns/default/sa/client', ca);
  const identities = { certificate: () => ({ keyPem: creds.key, chain: [creds.cert] }), roots: () => [root], trustDomain: () => 'cluster.local' };
  for (const pool of [new TunnelPool(identities), new NativeTunnelPool(identities)]) {
    t.after(() => pool.close());
    const target = (identity: string): TunnelTarget => ({ source: { uid: client.uid, netnsPath: client.netnsPath, identity: 'spiffe://cluster.local/ns/default/sa/client' }, destination: { address: pod, identity }, port: 8080, client: { address: client.ip4, port: 1 }, connectTimeoutMs: 5000 });
    const wrong = await pool.open(target('spiffe://cluster.local/ns/default/sa/other')).then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(wrong instanceof TunnelFailed && wrong.reason === 'identity_mismatch', String(wrong));
    assert.match(wrong.message, /presented spiffe:\/\/cluster\.local\/ns\/default\/sa\/server, not spiffe:\/\/cluster\.local\/ns\/default\/sa\/other/);
    // The same pool, expecting the right identity: through.
    const right = await pool.open(target('spiffe://cluster.local/ns/default/sa/server'));
    if (right instanceof NativeTunnelStream) right.cancel();
    else right.close();
  }
  // TLS alone (no HTTP/2 preface) is given up after the handshake deadline: counted, not kept.
  const silent = tlsConnect({ host: pod, port: 15008, ...(await leaf('spiffe://cluster.local/ns/default/sa/tester', ca)), ca: root, ALPNProtocols: ['h2'], checkServerIdentity: () => undefined });
  silent.on('error', () => undefined);
  // Reading (and dropping) what the server sends: a paused socket would not notice the close.
  silent.resume();
  await new Promise<void>((resolve) => silent.once('close', () => resolve()));
  // Counted as the engine reports the close to JS, which can be just after the peer sees it.
  await waitFor(async () => (await refused('h2_handshake')) === 1, 5000, 'the silent connection counted as h2_handshake');
  assert.ok(!/PRIVATE KEY/.test(agentB.log()), 'no key material in the log');
});

test('hbone: certificates renew at half life with traffic running: the open tunnel carries on, later handshakes get the new certificate', async (t) => {
  const { sb, cp, agentB, server, client } = await twoNodes(t, { certTtl: '16s' });
  const serial = async (): Promise<string | undefined> => {
    const body = (await (await fetch(`http://127.0.0.1:${agentB.ports.admin}/pods`)).json()) as { certificates: Array<{ identity: string; serial?: string }> };
    return body.certificates.find((c) => c.identity.endsWith('/sa/server'))?.serial;
  };
  const before = await serial();
  // A connection through the tunnel that sends 1 KiB every 100 ms for 14 s and checks each echo.
  const script = `const s=require('net').connect(80,process.argv[1]);let sent=0,got=0,bad=0;const chunk=Buffer.alloc(1024,7);
s.on('data',(d)=>{for(const b of d)if(b!==7)bad++;got+=d.length});s.on('error',(e)=>{console.log(JSON.stringify({error:e.code||e.message,sent,got}));process.exit(1)});
const t=setInterval(()=>{s.write(chunk);sent+=chunk.length},100);
setTimeout(()=>{clearInterval(t);setTimeout(()=>{console.log(JSON.stringify({sent,got,bad}));s.end();process.exit(0)},500)},14000);`;
  const running = collect(sb.runtime.exec(client, [process.execPath, '-e', script, SVC], { stdio: ['ignore', 'pipe', 'pipe'] }));
  // The server's certificate is renewed (a new serial) while the bytes flow.
  await waitFor(async () => (await serial()) !== before, 15_000, "B's server certificate renewed");
  const result = await running;
  assert.equal(result.code, 0, result.stdout + result.stderr);
  const counts = JSON.parse(result.stdout.trim().split('\n').pop() ?? '{}') as { sent: number; got: number; bad: number };
  assert.ok(counts.sent > 100 * 1024, `sent ${counts.sent}`);
  assert.deepEqual([counts.got, counts.bad], [counts.sent, 0], 'every byte came back, across the renewal');
  // A handshake now gets the renewed certificate.
  const root = readFileSync(cp.caRoot, 'utf8');
  const presented = await new Promise<string>((resolve, reject) => {
    const s = tlsConnect({ host: server.record.ip4, port: 15008, ca: root, ALPNProtocols: ['h2'], checkServerIdentity: () => undefined, rejectUnauthorized: false }, () => {
      resolve(s.getPeerCertificate().serialNumber);
      s.destroy();
    });
    s.once('error', reject);
  });
  assert.equal(presented, await serial());
  assert.notEqual(presented, before);
  // And new connections still go through.
  assert.ok((await sb.dialFrom(client, SVC, 80)).intact);
});

test('hbone: root rotation with traffic running: both roots trusted during the overlap, certificates move to the new root, the old root goes; nothing is dropped', async (t) => {
  const { sb, cp, agentA, agentB, server, client } = await twoNodes(t);
  const caDir = dirname(cp.caRoot);
  const oldRoot = readFileSync(cp.caRoot, 'utf8');
  const oldSigner: Signer = { cert: parseCertificate(oldRoot), ...(await importSigningKey(readFileSync(join(caDir, 'root-key.pem'), 'utf8'))) };
  const fresh = await createRoot('cluster.local', new Date(Date.now() + 365 * 24 * 3600_000));
  // Each file is replaced whole (written aside, renamed), as an operator's tools or a mounted Secret do.
  const put = async (name: string, text: string, mode = 0o644): Promise<void> => {
    await writeFile(join(caDir, `.${name}.new`), text, { mode });
    await rename(join(caDir, `.${name}.new`), join(caDir, name));
  };
  const trusted = async (): Promise<number[]> => Promise.all([agentA, agentB].map(async (a) => metricValue(await a.metrics(), 'nodemesh_trusted_roots')));
  const serials = async (): Promise<string[]> =>
    (
      await Promise.all(
        [agentA, agentB].map(async (a) => ((await (await fetch(`http://127.0.0.1:${a.ports.admin}/pods`)).json()) as { certificates: Array<{ serial?: string }> }).certificates.map((c) => c.serial ?? '')),
      )
    ).flat();
  assert.deepEqual(await trusted(), [1, 1]);

  // Traffic for the whole rotation: one connection through the tunnel sending 1 KiB every 100 ms
  // and checking each echo, and a new connection after another.
  const script = `const s=require('net').connect(80,process.argv[1]);let sent=0,got=0,bad=0;const chunk=Buffer.alloc(1024,7);
s.on('data',(d)=>{for(const b of d)if(b!==7)bad++;got+=d.length});s.on('error',(e)=>{console.log(JSON.stringify({error:e.code||e.message,sent,got}));process.exit(1)});
const t=setInterval(()=>{s.write(chunk);sent+=chunk.length},100);
setTimeout(()=>{clearInterval(t);setTimeout(()=>{console.log(JSON.stringify({sent,got,bad}));s.end();process.exit(0)},500)},20000);`;
  let longDone = false;
  const long = collect(sb.runtime.exec(client, [process.execPath, '-e', script, SVC], { stdio: ['ignore', 'pipe', 'pipe'] })).finally(() => (longDone = true));
  let stop = false;
  const dials: Array<{ intact: boolean; error?: string }> = [];
  const loop = (async () => {
    while (!stop) dials.push(await sb.dialFrom(client, SVC, 80, { bytes: 1024 }));
  })();

  // 1. The new root is trusted beside the old one; the old one still signs.
  await put('trusted-roots.pem', fresh.certPem);
  await waitFor(async () => (await trusted()).every((n) => n === 2), 10_000, 'both nodes trust both roots');
  // 2. The new root signs, the old one stays trusted: every certificate is renewed onto the new root.
  const before = await serials();
  await put('root-key.pem', fresh.keyPem, 0o600);
  await put('root-cert.pem', fresh.certPem);
  await put('trusted-roots.pem', oldRoot);
  await waitFor(async () => (await serials()).every((s, i) => s !== before[i]), 10_000, 'every certificate renewed');
  assert.deepEqual(await trusted(), [2, 2]);
  // B's pod now presents a certificate that chains to the new root (checked against it alone).
  await new Promise<void>((resolve, reject) => {
    const s = tlsConnect({ host: server.record.ip4, port: 15008, ca: fresh.certPem, ALPNProtocols: ['h2'], checkServerIdentity: () => undefined }, () => {
      s.destroy();
      resolve();
    });
    s.once('error', reject);
  });
  // 3. The old root goes.
  await rm(join(caDir, 'trusted-roots.pem'));
  await waitFor(async () => (await trusted()).every((n) => n === 1), 10_000, 'both nodes trust the new root only');
  assert.equal(longDone, false, 'the long connection ran through the whole rotation');

  // A client certificate from the old root is refused now; a new pod (a new tunnel, new handshakes) gets through.
  const refusedBefore = metricValue(await agentB.metrics(), 'nodemesh_hbone_refused_total', { reason: 'tls_handshake' });
  const keys = await generateKeyPair();
  const oldLeaf = { key: await privateKeyPem(keys.privateKey), cert: await issueLeaf(oldSigner, { publicKey: keys.publicKey, uris: ['spiffe://cluster.local/ns/default/sa/client'], notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 3600_000) }) };
  const session = h2connect(`https://${server.record.ip4}:15008`, { ...oldLeaf, ca: [oldRoot, fresh.certPem], checkServerIdentity: () => undefined });
  session.on('error', () => undefined);
  await new Promise<void>((resolve) => session.once('close', () => resolve()));
  await waitFor(async () => metricValue(await agentB.metrics(), 'nodemesh_hbone_refused_total', { reason: 'tls_handshake' }) > refusedBefore, 5000, 'the old-root client refused');
  const late = await sb.idlePod('late-a', [], { serviceAccount: 'client' });
  assert.ok((await sb.dialFrom(late, SVC, 80)).intact, 'a new tunnel after the rotation');

  stop = true;
  await loop;
  const result = await long;
  assert.equal(result.code, 0, result.stdout + result.stderr);
  const counts = JSON.parse(result.stdout.trim().split('\n').pop() ?? '{}') as { sent: number; got: number; bad: number };
  assert.deepEqual([counts.got, counts.bad], [counts.sent, 0], 'every byte of the long connection came back');
  assert.ok(dials.length >= 5, `${dials.length} new connections during the rotation`);
  assert.deepEqual(dials.filter((d) => !d.intact), [], 'no new connection failed');
  assert.equal(metricValue(await cp.metrics(), 'nodemesh_cp_ca_reloads_total', { result: 'loaded' }), 3);
});
