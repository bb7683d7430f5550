/**
 * `npm run bench:tunnel-layers`: what each layer of the HBONE data path costs in node, measured in
 * one run so the next optimisation is chosen by numbers (issue 12: node:tls and node:http2 against
 * a native path). Two relay processes on loopback stand for the two node proxies: A takes
 * plaintext connections and forwards each to B over plain TCP, over mutual TLS 1.3 (node:tls,
 * P-256, HBONE's ciphers), or over TLS 1.3 + an HTTP/2 CONNECT stream on one shared session
 * (node:http2 with HBONE's windows and frame size: the HBONE data path without the proxy around
 * it); B forwards to nginx (1 KB responses). wrk drives keep-alive requests through them; the
 * relays' CPU per 1000 requests is read from /proc; iperf3 (one stream) gives the throughput.
 * Relays pipe JS streams, as the HBONE path does.
 * Numbers, not assertions; loopback only.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { connect as h2connect, createSecureServer, type ClientHttp2Session, type ServerHttp2Stream } from 'node:http2';
import { connect as netConnect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { connect as tlsConnect, createServer as tlsServer } from 'node:tls';

import { CONNECTION_WINDOW, HBONE_ALPN, HBONE_CIPHERS, MAX_FRAME_SIZE, STREAM_WINDOW } from '../src/proxy/tunnel/hbone.js';
import { cpuSeconds, outputOf as output, parseIperf, wrkLocal, writeNginxConf } from './tools.js';

type Mode = 'tcp' | 'tls' | 'h2';
const MODES: ReadonlyArray<Mode> = ['tcp', 'tls', 'h2'];
const SECONDS = Number(process.env['BENCH_SECONDS'] ?? 5);
const PORTS = { nginx: 18080, iperf: 18201, a: 18001, b: 18002 };

const say = (s: string): void => void process.stderr.write(`» ${s}\n`);

interface Creds {
  key: string;
  cert: string;
  ca: string;
}

/** Both directions piped; either side's end or error ends both. */
function splice(a: NodeJS.ReadWriteStream & { destroy(): void }, b: NodeJS.ReadWriteStream & { destroy(): void }): void {
  a.pipe(b).on('error', () => a.destroy());
  b.pipe(a).on('error', () => b.destroy());
  a.on('error', () => b.destroy());
  b.on('error', () => a.destroy());
}

/** One relay process: `a` (plaintext in, `mode` out to b) or `b` (`mode` in, plaintext out to nginx). */
async function relay(role: 'a' | 'b', mode: Mode, credsFile: string, appPort: number): Promise<void> {
  const creds = JSON.parse(await readFile(credsFile, 'utf8')) as { client: Creds; server: Creds };
  const tlsOptions = { minVersion: 'TLSv1.3' as const, ciphers: HBONE_CIPHERS };
  if (role === 'b') {
    const toApp = (from: NodeJS.ReadWriteStream & { destroy(): void }): void => {
      const app = netConnect(appPort, '127.0.0.1');
      app.setNoDelay(true);
      splice(from, app);
    };
    if (mode === 'tcp') createServer((s) => (s.setNoDelay(true), toApp(s))).listen(PORTS.b, '127.0.0.1');
    if (mode === 'tls') tlsServer({ ...creds.server, ...tlsOptions, requestCert: true, rejectUnauthorized: true }, (s) => (s.setNoDelay(true), toApp(s))).listen(PORTS.b, '127.0.0.1');
    if (mode === 'h2') {
      const server = createSecureServer({ ...creds.server, ...tlsOptions, requestCert: true, rejectUnauthorized: true, ALPNProtocols: [...HBONE_ALPN], settings: { initialWindowSize: STREAM_WINDOW, maxFrameSize: MAX_FRAME_SIZE } });
      server.on('session', (session) => session.setLocalWindowSize(CONNECTION_WINDOW));
      server.on('stream', (stream: ServerHttp2Stream) => {
        stream.respond({ ':status': 200 });
        toApp(stream);
      });
      server.listen(PORTS.b, '127.0.0.1');
    }
  } else {
    let session: ClientHttp2Session | undefined;
    const h2session = (): ClientHttp2Session => {
      if (session && !session.destroyed) return session;
      session = h2connect(`https://127.0.0.1:${PORTS.b}`, { ...creds.client, ...tlsOptions, ALPNProtocols: [...HBONE_ALPN], checkServerIdentity: () => undefined, settings: { initialWindowSize: STREAM_WINDOW, maxFrameSize: MAX_FRAME_SIZE } });
      session.on('connect', (s) => s.setLocalWindowSize(CONNECTION_WINDOW));
      session.on('error', () => undefined);
      return session;
    };
    createServer((client: Socket) => {
      client.setNoDelay(true);
      if (mode === 'tcp') splice(client, netConnect(PORTS.b, '127.0.0.1').setNoDelay(true));
      if (mode === 'tls') splice(client, tlsConnect({ port: PORTS.b, host: '127.0.0.1', ...creds.client, ...tlsOptions, checkServerIdentity: () => undefined }).setNoDelay(true));
      if (mode === 'h2') splice(client, h2session().request({ ':method': 'CONNECT', ':authority': `127.0.0.1:${PORTS.nginx}` }, { endStream: false }));
    }).listen(PORTS.a, '127.0.0.1');
  }
  process.stdout.write('listening\n');
}

async function waitListening(child: ChildProcess): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    child.stdout?.on('data', (d: Buffer) => d.toString().includes('listening') && resolve());
    child.once('exit', (code) => reject(new Error(`relay exited (${code})`)));
  });
}

const wrk = async (port: number): Promise<{ rps: number; requests: number }> => wrkLocal(port, SECONDS);

/** One iperf3 stream for SECONDS through `port`, Gbit/s at the receiver. */
const iperf = async (port: number): Promise<number> => parseIperf(await output(['iperf3', '-c', '127.0.0.1', '-p', String(port), '-t', String(SECONDS), '-J']), `127.0.0.1:${port}`);

async function main(): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'nodemesh-bench-layers-'));
  const children: ChildProcess[] = [];
  try {
    const { createRoot, generateKeyPair, importSigningKey, issueLeaf, parseCertificate, privateKeyPem } = await import('../src/identity/x509.js');
    const root = await createRoot('cluster.local', new Date(Date.now() + 3600_000));
    const signer = { cert: parseCertificate(root.certPem), ...(await importSigningKey(root.keyPem)) };
    const leaf = async (sa: string): Promise<Creds> => {
      const keys = await generateKeyPair();
      const cert = await issueLeaf(signer, { publicKey: keys.publicKey, uris: [`spiffe://cluster.local/ns/default/sa/${sa}`], notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 3600_000) });
      return { key: await privateKeyPem(keys.privateKey), cert, ca: root.certPem };
    };
    const credsFile = join(work, 'creds.json');
    await writeFile(credsFile, JSON.stringify({ client: await leaf('client'), server: await leaf('server') }), { mode: 0o600 });
    const nginx = spawn('nginx', ['-c', await writeNginxConf(work, PORTS.nginx)], { stdio: 'inherit' });
    children.push(nginx);
    await sleep(500);
    const iperfd = spawn('iperf3', ['-s', '-p', String(PORTS.iperf), '-B', '127.0.0.1'], { stdio: 'ignore' });
    children.push(iperfd);
    await sleep(500);
    const rows: string[] = ['| A -> B | keep-alive req/s | relays CPU s / 1000 req | throughput Gbit/s (one stream) |', '|---|---|---|---|'];
    const direct = await wrk(PORTS.nginx);
    rows.push(`| (direct) | ${Math.round(direct.rps)} | - | ${(await iperf(PORTS.iperf)).toFixed(2)} |`);
    const self = fileURLToPath(import.meta.url);
    /** The two relays over `mode`, B forwarding to `appPort`; stopped by the returned function. */
    const relays = async (mode: Mode, appPort: number): Promise<{ pids: number[]; stop(): Promise<void> }> => {
      const b = spawn(process.execPath, ['--max-semi-space-size=1', '--optimize-for-size', self, 'relay', 'b', mode, credsFile, String(appPort)], { stdio: ['ignore', 'pipe', 'inherit'] });
      children.push(b);
      await waitListening(b);
      const a = spawn(process.execPath, ['--max-semi-space-size=1', '--optimize-for-size', self, 'relay', 'a', mode, credsFile, String(appPort)], { stdio: ['ignore', 'pipe', 'inherit'] });
      children.push(a);
      await waitListening(a);
      return {
        pids: [a.pid ?? 0, b.pid ?? 0],
        async stop() {
          for (const c of [a, b]) {
            const exited = new Promise((r) => c.once('exit', r));
            c.kill('SIGTERM');
            await exited;
          }
        },
      };
    };
    for (const mode of MODES) {
      say(`relays over ${mode}`);
      const web = await relays(mode, PORTS.nginx);
      await wrk(PORTS.a); // warm-up (sessions, JIT)
      const cpu0 = await cpuSeconds(web.pids);
      const run = await wrk(PORTS.a);
      const cpu1 = await cpuSeconds(web.pids);
      await web.stop();
      const bulk = await relays(mode, PORTS.iperf);
      const gbps = await iperf(PORTS.a);
      await bulk.stop();
      rows.push(`| ${mode === 'tcp' ? 'TCP (JS pipe)' : mode === 'tls' ? 'mutual TLS 1.3, a connection per connection' : 'mutual TLS 1.3 + HTTP/2 CONNECT, one session'} | ${Math.round(run.rps)} | ${(((cpu1 - cpu0) / run.requests) * 1000).toFixed(3)} | ${gbps.toFixed(2)} |`);
    }
    process.stdout.write(rows.join('\n') + '\n');
  } finally {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
    await sleep(200);
    await rm(work, { recursive: true, force: true });
  }
}

if (process.argv[2] === 'relay') await relay(process.argv[3] as 'a' | 'b', process.argv[4] as Mode, process.argv[5] ?? '', Number(process.argv[6]));
else await main();
