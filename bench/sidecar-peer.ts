/**
 * The sidecar-style peer: HAProxy (mode tcp or http, one thread, like a one-CPU sidecar) in each pod's
 * netns, with nft REDIRECT on both sides, the way iptables-based sidecars capture:
 *   client pod: output to the service address -> 127.0.0.1:15001/15002 -> server pod IP
 *   server pod: prerouting to the app ports   -> :15006/15007       -> 127.0.0.1:app port
 * With `tls`, the pair speaks mutual TLS between the pods, as sidecars of a mesh do: the client's
 * HAProxy originates TLS 1.3 with its client certificate and verifies the server's against the
 * root; the server's terminates it and requires a client certificate from the same root. The
 * certificates are the mesh's kind (ECDSA P-256 leaves with a SPIFFE URI, under a P-256 root).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';

import { run } from '../src/shared/exec.js';
import type { LocalPodRuntime } from '../src/runtime/pods.js';
import type { PodRecord } from '../src/runtime/store.js';

export interface SidecarPeer {
  readonly pids: () => number[];
  stop(): Promise<void>;
}

interface Route {
  readonly servicePort: number;
  readonly appPort: number;
  readonly outboundPort: number;
  readonly inboundPort: number;
  /** Relayed as bytes whatever the peer's mode (a port that is not HTTP, such as iperf's). */
  readonly opaque?: boolean;
}

async function nft(netnsPath: string, script: string): Promise<void> {
  const child = spawn('nsenter', [`--net=${netnsPath}`, 'nft', '-f', '-'], { stdio: ['pipe', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  child.stdin.end(script);
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  if (code !== 0) throw new Error(`nft in ${netnsPath} failed: ${err}`);
}

/** PEM files of one side: its certificate with its key (HAProxy's crt), and the root (ca-file). */
export interface SidecarTls {
  readonly client: { readonly crt: string };
  readonly server: { readonly crt: string };
  readonly ca: string;
}

function haproxyConfig(listens: Array<{ port: number; to: string; bindTls?: string; serverTls?: string; opaque?: boolean }>, mode: 'tcp' | 'http' | 'h2'): string {
  const lines = ['global', '  nbthread 1', '  maxconn 4000', '  ssl-default-bind-options ssl-min-ver TLSv1.3', '  ssl-default-server-options ssl-min-ver TLSv1.3', 'defaults', `  mode ${mode === 'tcp' ? 'tcp' : 'http'}`, '  timeout connect 5s', '  timeout client 1h', '  timeout server 1h'];
  // An L7 sidecar keeps its upstream connections and reuses them across client connections.
  if (mode !== 'tcp') lines.push('  option http-keep-alive', '  http-reuse always');
  // h2: HTTP/2 with prior knowledge on both sides (h2c), multiplexed upstream.
  const proto = mode === 'h2' ? ' proto h2' : '';
  for (const l of listens) lines.push(`listen p${l.port}`, ...(l.opaque && mode !== 'tcp' ? ['  mode tcp'] : []), `  bind :${l.port}${l.bindTls ?? ''}${l.opaque ? '' : proto}`, `  server s ${l.to}${l.serverTls ?? ''}${l.opaque ? '' : proto}`);
  return lines.join('\n') + '\n';
}

/** A root and two leaves (client, server) for the pair, written as HAProxy reads them. */
export async function writeSidecarTls(dir: string): Promise<SidecarTls> {
  const { createRoot, generateKeyPair, importSigningKey, issueLeaf, parseCertificate, privateKeyPem } = await import('../src/identity/x509.js');
  const root = await createRoot('cluster.local', new Date(Date.now() + 24 * 3600_000));
  const signer = { cert: parseCertificate(root.certPem), ...(await importSigningKey(root.keyPem)) };
  const leaf = async (name: string, sa: string): Promise<string> => {
    const keys = await generateKeyPair();
    const cert = await issueLeaf(signer, { publicKey: keys.publicKey, uris: [`spiffe://cluster.local/ns/default/sa/${sa}`], notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 24 * 3600_000) });
    const path = join(dir, `${name}.pem`);
    // One PEM block a line apart: HAProxy reads the certificate, then its key.
    await writeFile(path, `${cert.trimEnd()}\n${await privateKeyPem(keys.privateKey)}`, { mode: 0o600 });
    return path;
  };
  const ca = join(dir, 'sidecar-root.pem');
  await writeFile(ca, root.certPem);
  return { client: { crt: await leaf('sidecar-client', 'client') }, server: { crt: await leaf('sidecar-server', 'server') }, ca };
}

/** `mode`: tcp (an L4 sidecar), http (an L7 one: both HAProxies parse every request) or h2 (the same, HTTP/2 with prior knowledge on both sides). */
export async function startSidecarPeer(runtime: LocalPodRuntime, dir: string, client: PodRecord, server: PodRecord, serviceIp: string, routes: Route[], tls?: SidecarTls, mode: 'tcp' | 'http' | 'h2' = 'tcp'): Promise<SidecarPeer> {
  const children: ChildProcess[] = [];
  const start = async (pod: PodRecord, name: string, cfg: string): Promise<void> => {
    const path = join(dir, `${name}.cfg`);
    await writeFile(path, cfg);
    const child = runtime.exec(pod, ['haproxy', '-db', '-f', path], { stdio: ['ignore', 'ignore', 'inherit'] });
    children.push(child);
  };
  const serverTls = tls ? ` ssl crt ${tls.client.crt} ca-file ${tls.ca} verify required` : '';
  const bindTls = tls ? ` ssl crt ${tls.server.crt} ca-file ${tls.ca} verify required` : '';
  await start(client, 'client', haproxyConfig(routes.map((r) => ({ port: r.outboundPort, to: `${server.ip4}:${r.servicePort}`, serverTls, ...(r.opaque ? { opaque: true } : {}) })), mode));
  await start(server, 'server', haproxyConfig(routes.map((r) => ({ port: r.inboundPort, to: `127.0.0.1:${r.appPort}`, bindTls, ...(r.opaque ? { opaque: true } : {}) })), mode));
  const out = routes.map((r) => `ip daddr ${serviceIp} tcp dport ${r.servicePort} redirect to :${r.outboundPort}`).join('\n    ');
  const inb = routes.map((r) => `iifname "eth0" tcp dport ${r.servicePort} redirect to :${r.inboundPort}`).join('\n    ');
  // An iptables/nft sidecar needs a route to the service address (REDIRECT runs after routing);
  // local pods have none. If the redirect ever missed, the host's blackhole route drops it.
  await run('nsenter', [`--net=${client.netnsPath}`, 'ip', 'route', 'add', `${serviceIp}/32`, 'dev', 'eth0']);
  await nft(client.netnsPath, `table ip nmbench {\n  chain out {\n    type nat hook output priority -100;\n    ${out}\n  }\n}\n`);
  await nft(server.netnsPath, `table ip nmbench {\n  chain pre {\n    type nat hook prerouting priority -100;\n    ${inb}\n  }\n}\n`);
  await new Promise((r) => setTimeout(r, 300));
  return {
    pids: () => children.map((c) => c.pid ?? 0).filter(Boolean),
    async stop() {
      for (const c of children) c.kill('SIGTERM');
      for (const pod of [client, server]) await run('nsenter', [`--net=${pod.netnsPath}`, 'nft', 'delete', 'table', 'ip', 'nmbench']).catch(() => undefined);
      await run('nsenter', [`--net=${client.netnsPath}`, 'ip', 'route', 'del', `${serviceIp}/32`]).catch(() => undefined);
    },
  };
}
