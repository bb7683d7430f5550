/**
 * Workload identities and the mesh CA, with real processes: the control plane creates its root,
 * serves gRPC over TLS, and signs certificates only for identities of pods on the calling node;
 * agents dial it over TLS checked against the root, hold one certificate per identity of their
 * pods, renew at half life and drop an identity whose last pod left.
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { Metadata, credentials, makeClientConstructor, type ServiceError } from '@grpc/grpc-js';

import type { CertificateStatus } from '../../src/identity/certificates.js';
import { createCsr, createRoot, generateKeyPair, verifyChain } from '../../src/identity/x509.js';
import { certificatesService, type SignRequest, type SignResponse } from '../../src/protocol/discovery.js';
import { metricValue, startAgent, startControlPlane, type AgentProcess } from '../support/agent.js';
import { cli, createSandbox, waitFor } from '../support/sandbox.js';

async function certificatesOf(agent: AgentProcess): Promise<CertificateStatus[]> {
  const body = (await (await fetch(`http://127.0.0.1:${agent.ports.admin}/pods`)).json()) as { certificates: CertificateStatus[] };
  return body.certificates;
}

/** Certificates.Sign as any gRPC client could call it: over TLS checked against `root`, with a token. */
async function sign(address: string, root: string, request: SignRequest, token?: string): Promise<SignResponse> {
  const Client = makeClientConstructor(certificatesService(), 'Certificates');
  const client = new Client(address, credentials.createSsl(Buffer.from(root)));
  const metadata = new Metadata();
  if (token !== undefined) metadata.set('authorization', `Bearer ${token}`);
  try {
    return await new Promise<SignResponse>((resolve, reject) => {
      (client as unknown as { Sign(r: SignRequest, m: Metadata, cb: (e: ServiceError | null, r?: SignResponse) => void): void }).Sign(request, metadata, (e, r) => (e || !r ? reject(e ?? new Error('no answer')) : resolve(r)));
    });
  } finally {
    client.close();
  }
}

test('identity: the CA signs over TLS only for pods on the calling node; agents hold, renew and drop one certificate per identity', async (t) => {
  const sb = await createSandbox(t);
  const nodeA = sb.config.node;
  const nodeB = `${nodeA}-b`;
  const tokens = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-tokens-`));
  sb.defer(() => rm(tokens, { recursive: true, force: true }));
  await writeFile(join(tokens, 'agents'), `${nodeA} token-of-node-a-0123456789\n${nodeB} token-of-node-b-0123456789\n`);
  await writeFile(join(tokens, 'a'), 'token-of-node-a-0123456789\n');
  await writeFile(join(tokens, 'b'), 'token-of-node-b-0123456789\n');
  const cp = await startControlPlane(sb, {}, { agentTokens: join(tokens, 'agents'), certTtl: '16s' });

  // The CA made its root on the first start: the key is the owner's only.
  const root = readFileSync(cp.caRoot, 'utf8');
  assert.equal(statSync(join(cp.caRoot, '..', 'root-key.pem')).mode & 0o777, 0o600);
  assert.ok(new X509Certificate(root).ca, 'root-cert.pem is a CA certificate');

  const agentA = await startAgent(sb, { controlPlane: cp.tlsAddress, caRoot: cp.caRoot, tokenFile: join(tokens, 'a') });
  const agentB = await startAgent(sb, { controlPlane: cp.tlsAddress, caRoot: cp.caRoot, tokenFile: join(tokens, 'b') }, { node: nodeB });
  // A pod starts only once its node holds a certificate for its identity (the hand-over waits).
  const web = await sb.idlePod('web-1', [], { serviceAccount: 'web' });
  await sb.idlePod('web-2', [], { serviceAccount: 'web' });
  const db = await sb.idlePod('db-1', [], { serviceAccount: 'db' });
  await sb.idlePod('api-1', [], { node: nodeB, serviceAccount: 'api' });
  const pods = await agentA.pods();
  assert.ok(pods.every((p) => p.certified), JSON.stringify(pods));
  assert.equal(pods.find((p) => p.name === 'web-1')?.identity, 'spiffe://cluster.local/ns/default/sa/web');

  // One certificate per identity present on the node, none of the other node's.
  const idA = (await certificatesOf(agentA)).map((c) => `${c.identity}:${c.state}`);
  assert.deepEqual(idA, ['spiffe://cluster.local/ns/default/sa/db:valid', 'spiffe://cluster.local/ns/default/sa/web:valid']);
  assert.deepEqual((await certificatesOf(agentB)).map((c) => c.identity), ['spiffe://cluster.local/ns/default/sa/api']);
  assert.equal(metricValue(await agentA.metrics(), 'nodemesh_certificate_requests_total', { result: 'signed' }), 2);
  assert.ok(metricValue(await agentA.metrics(), 'nodemesh_workload_certificate_expiry_timestamp_seconds', { identity: 'spiffe://cluster.local/ns/default/sa/web' }) > Date.now() / 1000);

  // `nodemesh status` shows the node's identities; with --control-plane, what was signed per node.
  const status = await cli(['status', '--admin', `127.0.0.1:${agentA.ports.admin}`], sb.env);
  assert.equal(status.code, 0, status.stderr);
  assert.match(status.stdout, /IDENTITY\s+STATE\s+SERIAL\s+EXPIRES\s+RENEWS/);
  assert.match(status.stdout, /spiffe:\/\/cluster\.local\/ns\/default\/sa\/web\s+valid\s+[0-9A-F]+\s+20\d\d-/);
  const cpStatus = await cli(['status', '--control-plane', `127.0.0.1:${cp.httpPort}`], sb.env);
  assert.equal(cpStatus.code, 0, cpStatus.stderr);
  assert.match(cpStatus.stdout, new RegExp(`${nodeB}\\s+spiffe://cluster\\.local/ns/default/sa/api\\s+[0-9A-F]+\\s+20\\d\\d-`));

  // Renewed at half life (16 s certificates: after about 8 s), with a new serial.
  const before = (await certificatesOf(agentA)).find((c) => c.identity.endsWith('/sa/web'));
  await waitFor(async () => (await certificatesOf(agentA)).find((c) => c.identity.endsWith('/sa/web'))?.serial !== before?.serial, 15_000, 'the web certificate renewed');
  assert.ok(metricValue(await agentA.metrics(), 'nodemesh_certificate_requests_total', { result: 'signed' }) >= 3);

  // The last db pod leaves: its identity goes from the node.
  await sb.runtime.remove(db, 500);
  await waitFor(async () => (await certificatesOf(agentA)).every((c) => !c.identity.endsWith('/sa/db')), 5000, 'db identity dropped');

  // Node authorization, asked directly: node A's token, an identity only node B runs.
  const keys = await generateKeyPair();
  const apiCsr = await createCsr(keys, 'spiffe://cluster.local/ns/default/sa/api');
  const refused = await sign(cp.tlsAddress, root, { csr: apiCsr, node: '' }, 'token-of-node-a-0123456789').then(
    () => undefined,
    (e: ServiceError) => e,
  );
  assert.equal(refused?.code, 7, 'PERMISSION_DENIED');
  assert.match(refused?.details ?? '', new RegExp(`node ${nodeA} runs no pod with service account default/api`));
  // Node A's token claiming node B: refused before the CSR is looked at.
  const claimed = await sign(cp.tlsAddress, root, { csr: apiCsr, node: nodeB }, 'token-of-node-a-0123456789').catch((e: ServiceError) => e);
  assert.equal((claimed as ServiceError).code, 7);
  // No token at all; a CSR for another trust domain; garbage.
  assert.equal(((await sign(cp.tlsAddress, root, { csr: apiCsr, node: nodeB }).catch((e: ServiceError) => e)) as ServiceError).code, 16, 'UNAUTHENTICATED');
  const foreign = await createCsr(keys, 'spiffe://example.org/ns/default/sa/web');
  const foreignRefused = (await sign(cp.tlsAddress, root, { csr: foreign, node: '' }, 'token-of-node-a-0123456789').catch((e: ServiceError) => e)) as ServiceError;
  assert.equal(foreignRefused.code, 3, 'INVALID_ARGUMENT');
  assert.match(foreignRefused.details, /trust domain "example\.org"/);
  assert.equal(((await sign(cp.tlsAddress, root, { csr: 'not a csr', node: '' }, 'token-of-node-a-0123456789').catch((e: ServiceError) => e)) as ServiceError).code, 3);
  // Node B's own identity, asked by node B: signed, and it chains to the root.
  const signed = await sign(cp.tlsAddress, root, { csr: apiCsr, node: nodeB }, 'token-of-node-b-0123456789');
  assert.deepEqual(verifyChain(signed.certChain, signed.roots), ['spiffe://cluster.local/ns/default/sa/api']);
  const cpMetrics = await cp.metrics();
  for (const reason of ['not_on_node', 'node_mismatch', 'unauthenticated', 'trust_domain', 'malformed']) {
    assert.equal(metricValue(cpMetrics, 'nodemesh_cp_certificate_requests_total', { result: reason }), 1, reason);
  }
  assert.ok(!/PRIVATE KEY/.test(agentA.log() + agentB.log() + cp.log()), 'no key material in any log');
  void web;
});

test('identity: an agent given another root does not trust the control plane and gets nothing from it', async (t) => {
  const sb = await createSandbox(t);
  const cp = await startControlPlane(sb, {});
  const dir = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-root-`));
  sb.defer(() => rm(dir, { recursive: true, force: true }));
  const otherRoot = join(dir, 'other-root.pem');
  await writeFile(otherRoot, (await createRoot('cluster.local', new Date(Date.now() + 3600_000))).certPem);
  // The agent starts (it serves its last config when the control plane is away) but is not ready.
  const agent = await startAgent(sb, { controlPlane: cp.tlsAddress, caRoot: otherRoot }, { waitReady: false });
  await waitFor(() => /certificate|self[- ]signed|unable to verify/i.test(agent.log()), 10_000, 'a TLS verification failure in the agent log');
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_control_plane_connected'), 0);
  assert.equal((await cp.nodes()).nodes.length, 0, 'the control plane never heard of the node');
});
