/** The control plane's CA: its files (created, reused, refused), the leaves it signs, and each refusal by its reason. */
import assert from 'node:assert/strict';
import { X509Certificate, createPrivateKey, createPublicKey, randomBytes, webcrypto } from 'node:crypto';
import { chmod, copyFile, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';

import { CertificateAuthority, ROOT_CERT, ROOT_KEY, SignRefused, TRUSTED_ROOTS } from '../../src/control-plane/ca/ca.js';
import type { WorkloadIdentity } from '../../src/identity/spiffe.js';
import { createCsr, createRoot, generateKeyPair, importSigningKey, issueLeaf, parseCertificate, privateKeyPem, splitPem, verifyChain } from '../../src/identity/x509.js';
import { isNodemeshError, NodemeshError } from '../../src/shared/errors.js';
// After src/identity/x509.js: that module sets the library's crypto provider.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';

const TD = 'cluster.local';
const URI = 'spiffe://cluster.local/ns/shop/sa/web';
const SERVER_AUTH = '1.3.6.1.5.5.7.3.1';
const CLIENT_AUTH = '1.3.6.1.5.5.7.3.2';
const accept = (): void => {};

async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-ca-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Writes a file and sets its mode whatever the umask. */
async function put(path: string, text: string, mode: number): Promise<void> {
  await writeFile(path, text);
  await chmod(path, mode);
}

/** PEM as node writes it, for comparing certificates whatever their line breaks. */
const norm = (pem: string): string => new X509Certificate(pem).toString();

const spkiOf = (certPem: string): Buffer => new X509Certificate(certPem).publicKey.export({ type: 'spki', format: 'der' });

/** Asserts that fn rejects with a NodemeshError NM_ERR_CA whose message matches. */
async function caRefused(fn: () => Promise<unknown>, message: RegExp, what: string): Promise<void> {
  await assert.rejects(fn, (e) => isNodemeshError(e, 'NM_ERR_CA') && e instanceof NodemeshError && message.test(e.message), what);
}

async function refusedWith(fn: () => Promise<unknown>, reason: SignRefused['reason'], what: string): Promise<void> {
  await assert.rejects(fn, (e) => e instanceof SignRefused && e.reason === reason, what);
}

/** A CA certificate signed by the root, with a key of its own: an operator's intermediate. */
async function intermediateOf(root: { certPem: string; keyPem: string }): Promise<{ certPem: string; keyPem: string }> {
  const { key, algorithm } = await importSigningKey(root.keyPem);
  const rootCert = parseCertificate(root.certPem);
  const keys = await generateKeyPair();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomBytes(8).toString('hex').replace(/^./, '1'),
    subject: 'O=cluster.local, CN=operator intermediate CA',
    issuer: rootCert.subject,
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 24 * 3600_000),
    signingAlgorithm: algorithm,
    publicKey: keys.publicKey,
    signingKey: key,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(rootCert.publicKey),
    ],
  });
  return { certPem: cert.toString('pem'), keyPem: await privateKeyPem(keys.privateKey) };
}

test('open() on an empty folder creates a self-signed root and a 0600 key, and a second open() reuses them', async (t) => {
  const dir = await tempDir(t);
  const ca = await CertificateAuthority.open(dir, TD);
  assert.equal(ca.created, true);
  assert.equal(ca.trustDomain, TD);
  const certPem = await readFile(join(dir, ROOT_CERT), 'utf8');
  const root = new X509Certificate(certPem);
  assert.equal(root.ca, true);
  assert.equal(root.checkIssued(root), true);
  assert.equal(root.verify(root.publicKey), true);
  assert.match(root.subject, /O=cluster\.local/);
  assert.equal((await stat(join(dir, ROOT_KEY))).mode & 0o777, 0o600);
  // The key on disk is the root certificate's.
  const keyPem = await readFile(join(dir, ROOT_KEY), 'utf8');
  assert.deepEqual(createPublicKey(createPrivateKey(keyPem)).export({ type: 'spki', format: 'der' }), spkiOf(certPem));
  assert.deepEqual(ca.roots(), [norm(certPem)]);

  const again = await CertificateAuthority.open(dir, TD);
  assert.equal(again.created, false);
  assert.equal(await readFile(join(dir, ROOT_CERT), 'utf8'), certPem);
  assert.equal(await readFile(join(dir, ROOT_KEY), 'utf8'), keyPem);
  assert.deepEqual(again.roots(), ca.roots());
  assert.ok(again.sameAs(ca), 'a reload of an unchanged folder changes nothing');

  // A reload (create: false) never makes a new root where the files have gone.
  const empty = await tempDir(t);
  await assert.rejects(CertificateAuthority.open(empty, TD, { create: false }), /are gone/);
  assert.deepEqual(await readdir(empty), []);
});

test('open() refuses a folder with only one of the two files, naming the missing one', async (t) => {
  const full = await tempDir(t);
  await CertificateAuthority.open(full, TD);

  const certOnly = await tempDir(t);
  await copyFile(join(full, ROOT_CERT), join(certOnly, ROOT_CERT));
  await caRefused(() => CertificateAuthority.open(certOnly, TD), new RegExp(`${join(certOnly, ROOT_KEY).replace(/[.]/g, '\\.')} is missing`), 'only root-cert.pem');

  const keyOnly = await tempDir(t);
  await put(join(keyOnly, ROOT_KEY), await readFile(join(full, ROOT_KEY), 'utf8'), 0o600);
  await caRefused(() => CertificateAuthority.open(keyOnly, TD), new RegExp(`${join(keyOnly, ROOT_CERT).replace(/[.]/g, '\\.')} is missing`), 'only root-key.pem');
  // Neither refusal created the missing half.
  await assert.rejects(stat(join(certOnly, ROOT_KEY)), { code: 'ENOENT' });
  await assert.rejects(stat(join(keyOnly, ROOT_CERT)), { code: 'ENOENT' });
});

test('open() refuses a signing key that others than its owner can read', async (t) => {
  const dir = await tempDir(t);
  await CertificateAuthority.open(dir, TD);
  await chmod(join(dir, ROOT_KEY), 0o644);
  await caRefused(() => CertificateAuthority.open(dir, TD), /mode 644\).*must be 0600/, 'a 0644 key');
  await chmod(join(dir, ROOT_KEY), 0o640);
  await caRefused(() => CertificateAuthority.open(dir, TD), /0600/, 'a 0640 key');
});

test("open() refuses a key that is not the root certificate's", async (t) => {
  const dir = await tempDir(t);
  const other = await tempDir(t);
  await CertificateAuthority.open(dir, TD);
  await CertificateAuthority.open(other, TD);
  await put(join(dir, ROOT_KEY), await readFile(join(other, ROOT_KEY), 'utf8'), 0o600);
  await caRefused(() => CertificateAuthority.open(dir, TD), /is not the key of the first certificate/, "another root's key");
});

test('open() names root-key.pem when it is not a private key, and root-cert.pem when it is not a certificate', async (t) => {
  const badKey = await tempDir(t);
  await CertificateAuthority.open(badKey, TD);
  await put(join(badKey, ROOT_KEY), 'not a key', 0o600);
  await assert.rejects(
    () => CertificateAuthority.open(badKey, TD),
    (e) => isNodemeshError(e, 'NM_ERR_CA') && e.message.startsWith(`${join(badKey, ROOT_KEY)}:`) && e.context.path === join(badKey, ROOT_KEY),
    'a garbage root-key.pem is named as the file at fault',
  );
  const badCert = await tempDir(t);
  await CertificateAuthority.open(badCert, TD);
  await put(join(badCert, ROOT_CERT), '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n', 0o644);
  await assert.rejects(
    () => CertificateAuthority.open(badCert, TD),
    (e) => isNodemeshError(e, 'NM_ERR_CA') && e.message.startsWith(`${join(badCert, ROOT_CERT)}:`) && e.context.path === join(badCert, ROOT_CERT),
    'a broken root-cert.pem is named as the file at fault',
  );
});

test('open() refuses a root-cert.pem that is not a CA certificate', async (t) => {
  const dir = await tempDir(t);
  // Self-signed and with its own key beside it: only CA:false is wrong.
  const keys = await generateKeyPair();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    name: 'CN=not a CA',
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 3600_000),
    signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
    keys,
    extensions: [new x509.BasicConstraintsExtension(false, undefined, true)],
  });
  await put(join(dir, ROOT_CERT), cert.toString('pem'), 0o644);
  await put(join(dir, ROOT_KEY), await privateKeyPem(keys.privateKey), 0o600);
  await caRefused(() => CertificateAuthority.open(dir, TD), /is not a CA certificate/, 'a CA:false certificate');
});

test('sign() issues a leaf for the CSR key and identity, for client and server use, valid for the TTL, that verifies against the roots', async (t) => {
  const dir = await tempDir(t);
  const ca = await CertificateAuthority.open(dir, TD);
  const keys = await generateKeyPair();
  const csr = await createCsr(keys, URI);
  const before = Date.now();
  const issued = await ca.sign(csr, accept, 60_000);
  const after = Date.now();
  assert.deepEqual(issued.identity, { trustDomain: TD, namespace: 'shop', serviceAccount: 'web' });
  assert.equal(issued.chain.length, 1, 'a root signs directly: no intermediates');
  assert.deepEqual(issued.roots, ca.roots());
  const leafPem = issued.chain[0] ?? '';
  assert.deepEqual(verifyChain(issued.chain, ca.roots()), [URI]);

  const leaf = new X509Certificate(leafPem);
  assert.equal(leaf.ca, false);
  assert.equal(leaf.subjectAltName, `URI:${URI}`);
  assert.ok(leaf.keyUsage?.includes(SERVER_AUTH), `extKeyUsage ${String(leaf.keyUsage)} has serverAuth`);
  assert.ok(leaf.keyUsage?.includes(CLIENT_AUTH), `extKeyUsage ${String(leaf.keyUsage)} has clientAuth`);
  const notAfter = new Date(leaf.validTo).getTime();
  assert.ok(notAfter >= before + 60_000 - 2000 && notAfter <= after + 60_000 + 2000, `notAfter ${leaf.validTo} is now + 60 s`);
  assert.ok(Math.abs(issued.notAfter.getTime() - notAfter) < 1000, 'Issued.notAfter is the certificate\'s');
  const notBefore = new Date(leaf.validFrom).getTime();
  assert.ok(notBefore >= before - 62_000 && notBefore <= after, `notBefore ${leaf.validFrom} is about a minute back`);
  assert.equal(issued.serial, leaf.serialNumber);
  assert.deepEqual(spkiOf(leafPem), Buffer.from(await webcrypto.subtle.exportKey('spki', keys.publicKey)));

  const second = await ca.sign(csr, accept, 60_000);
  assert.notEqual(second.serial, issued.serial);
  assert.notEqual(new X509Certificate(second.chain[0] ?? '').serialNumber, leaf.serialNumber);
});

test('sign() refuses garbage, another trust domain and a non-workload identity, each with its reason', async (t) => {
  const dir = await tempDir(t);
  const ca = await CertificateAuthority.open(dir, TD);
  const keys = await generateKeyPair();
  let asked = 0;
  const count = (): void => {
    asked++;
  };
  await refusedWith(() => ca.sign('garbage', count, 60_000), 'malformed', 'garbage');
  await refusedWith(() => ca.sign('x'.repeat(20_000), count, 60_000), 'too_large', 'an over-large CSR');
  await refusedWith(async () => ca.sign(await createCsr(keys, 'spiffe://other.org/ns/shop/sa/web'), count, 60_000), 'trust_domain', 'another trust domain');
  await refusedWith(async () => ca.sign(await createCsr(keys, 'spiffe://cluster.local/foo'), count, 60_000), 'identity', 'not a workload identity');
  assert.equal(asked, 0, 'authorize is not asked about a refused CSR');
});

test("sign() passes the parsed identity to authorize and propagates its not_on_node refusal", async (t) => {
  const dir = await tempDir(t);
  const ca = await CertificateAuthority.open(dir, TD);
  const csr = await createCsr(await generateKeyPair(), URI);
  const seen: WorkloadIdentity[] = [];
  await refusedWith(
    () =>
      ca.sign(
        csr,
        (identity) => {
          seen.push(identity);
          throw new SignRefused('not_on_node', 'no pod of shop/web runs on this node');
        },
        60_000,
      ),
    'not_on_node',
    'a refusing authorize',
  );
  assert.deepEqual(seen, [{ trustDomain: TD, namespace: 'shop', serviceAccount: 'web' }]);
});

test('servingCertificate() gives a chain that verifies against the roots, its key, and the DNS and IP names as SANs', async (t) => {
  const dir = await tempDir(t);
  const ca = await CertificateAuthority.open(dir, TD);
  const { chainPem, keyPem, notAfter } = await ca.servingCertificate(['localhost'], ['127.0.0.1']);
  const chain = splitPem(chainPem);
  assert.equal(chain.length, 1);
  assert.deepEqual(verifyChain(chain, ca.roots()), []);
  const leafPem = chain[0] ?? '';
  assert.deepEqual(createPublicKey(createPrivateKey(keyPem)).export({ type: 'spki', format: 'der' }), spkiOf(leafPem));
  const leaf = new X509Certificate(leafPem);
  const sans = (leaf.subjectAltName ?? '').split(', ');
  assert.ok(sans.includes('DNS:localhost'), `SAN ${String(leaf.subjectAltName)} has DNS:localhost`);
  assert.ok(sans.includes('IP Address:127.0.0.1'), `SAN ${String(leaf.subjectAltName)} has IP Address:127.0.0.1`);
  assert.equal(leaf.ca, false);
  assert.ok(Math.abs(new Date(leaf.validTo).getTime() - notAfter.getTime()) < 1000);
});

test("an operator's intermediate signs leaves whose chain carries it, while roots() is the root alone", async (t) => {
  const dir = await tempDir(t);
  const root = await createRoot(TD, new Date(Date.now() + 7 * 24 * 3600_000));
  const inter = await intermediateOf(root);
  await put(join(dir, ROOT_CERT), inter.certPem + root.certPem, 0o644);
  await put(join(dir, ROOT_KEY), inter.keyPem, 0o600);
  const ca = await CertificateAuthority.open(dir, TD);
  assert.equal(ca.created, false);
  assert.deepEqual(ca.roots(), [norm(root.certPem)]);

  const issued = await ca.sign(await createCsr(await generateKeyPair(), URI), accept, 60_000);
  assert.equal(issued.chain.length, 2);
  assert.equal(norm(issued.chain[1] ?? ''), norm(inter.certPem));
  const leaf = new X509Certificate(issued.chain[0] ?? '');
  assert.equal(leaf.checkIssued(new X509Certificate(inter.certPem)), true, 'the intermediate signed the leaf');
  assert.deepEqual(verifyChain(issued.chain, ca.roots()), [URI]);
  // The leaf alone does not reach the root: the intermediate in the chain is what links them.
  assert.throws(() => verifyChain([issued.chain[0] ?? ''], ca.roots()), { name: 'CertificateInvalid', reason: 'untrusted' });

  // The serving certificate's chain carries the intermediate too.
  const serving = await ca.servingCertificate(['localhost'], []);
  assert.equal(splitPem(serving.chainPem).length, 2);
  assert.deepEqual(verifyChain(splitPem(serving.chainPem), ca.roots()), []);
});

test('open() refuses a root-cert.pem holding an intermediate without the self-signed root at its end', async (t) => {
  const dir = await tempDir(t);
  const root = await createRoot(TD, new Date(Date.now() + 7 * 24 * 3600_000));
  const inter = await intermediateOf(root);
  await put(join(dir, ROOT_CERT), inter.certPem, 0o644);
  await put(join(dir, ROOT_KEY), inter.keyPem, 0o600);
  await caRefused(() => CertificateAuthority.open(dir, TD), /must end with the self-signed root/, 'an intermediate alone');
});

test('trusted-roots.pem adds a root that stays trusted, after the signing root', async (t) => {
  const dir = await tempDir(t);
  const first = await CertificateAuthority.open(dir, TD);
  const signingRoot = first.roots()[0] ?? '';
  const old = await createRoot(TD, new Date(Date.now() + 24 * 3600_000));
  // The signing root listed again in trusted-roots.pem is not counted twice.
  await put(join(dir, TRUSTED_ROOTS), old.certPem + (await readFile(join(dir, ROOT_CERT), 'utf8')), 0o644);
  const ca = await CertificateAuthority.open(dir, TD);
  assert.deepEqual(ca.roots(), [signingRoot, norm(old.certPem)]);

  // A leaf the old root issued still verifies against the roots agents are given.
  const { key, algorithm } = await importSigningKey(old.keyPem);
  const oldLeaf = await issueLeaf(
    { cert: parseCertificate(old.certPem), key, algorithm },
    { publicKey: (await generateKeyPair()).publicKey, uris: [URI], notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 60_000) },
  );
  assert.deepEqual(verifyChain([oldLeaf], ca.roots()), [URI]);
});
