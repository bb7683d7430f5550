/** Workload identities (SPIFFE IDs), CSRs and certificate chains: what is accepted, and each refusal by its reason. */
import assert from 'node:assert/strict';
import { webcrypto } from 'node:crypto';
import { test } from 'node:test';

import { IdentityInvalid, parseSpiffeUri, spiffeUri, type WorkloadIdentity } from '../../src/identity/spiffe.js';
import {
  CertificateInvalid,
  createCsr,
  createRoot,
  generateKeyPair,
  importSigningKey,
  issueLeaf,
  MAX_PEM_BYTES,
  parseCertificate,
  readCsr,
  type Signer,
  verifyChain,
} from '../../src/identity/x509.js';
// After src/identity/x509.js: that module sets the library's crypto provider.
import 'reflect-metadata';
import * as x509 from '@peculiar/x509';

const URI = 'spiffe://cluster.local/ns/shop/sa/web';

/** Asserts that fn rejects with a CertificateInvalid of the given reason. */
async function refused(fn: () => Promise<unknown>, reason: CertificateInvalid['reason'], what: string): Promise<void> {
  await assert.rejects(fn, (e) => e instanceof CertificateInvalid && e.reason === reason, what);
}

/** A PKCS#10 request signed by a P-256 key with the given extensions, built without createCsr's one-URI rule. */
async function csrWith(extensions: x509.Extension[]): Promise<string> {
  const keys = await generateKeyPair();
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({ name: 'CN=test', keys, signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' }, extensions });
  return csr.toString('pem');
}

function pemToDer(pem: string): Buffer {
  return Buffer.from(pem.replace(/-----(BEGIN|END) [A-Z ]+-----/g, '').replace(/\s+/g, ''), 'base64');
}

function derToPem(label: string, der: Buffer): string {
  const b64 = der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

async function signerOf(root: { certPem: string; keyPem: string }): Promise<Signer> {
  const { key, algorithm } = await importSigningKey(root.keyPem);
  return { cert: parseCertificate(root.certPem), key, algorithm };
}

test('spiffeUri and parseSpiffeUri are inverses for a workload identity', () => {
  const id: WorkloadIdentity = { trustDomain: 'cluster.local', namespace: 'shop', serviceAccount: 'web' };
  assert.equal(spiffeUri(id), URI);
  assert.deepEqual(parseSpiffeUri(spiffeUri(id)), id);
  const dotted: WorkloadIdentity = { trustDomain: 'example_org.test-1', namespace: 'a-0', serviceAccount: 'build.bot-2' };
  assert.deepEqual(parseSpiffeUri(spiffeUri(dotted)), dotted);
  assert.equal(spiffeUri(parseSpiffeUri(URI)), URI);
});

test('parseSpiffeUri refuses with IdentityInvalid anything that is not spiffe://TD/ns/NS/sa/SA with valid parts', () => {
  const bad: Array<[string, string, RegExp]> = [
    ['https://cluster.local/ns/shop/sa/web', 'wrong scheme', /expected spiffe:\/\//],
    ['spiffe://cluster.local/shop/sa/web', 'no /ns/ segment', /expected spiffe:\/\//],
    ['spiffe://cluster.local/ns/shop/web', 'no /sa/ segment', /expected spiffe:\/\//],
    ['spiffe://cluster.local/ns/shop', 'neither /sa/ nor a service account', /expected spiffe:\/\//],
    ['spiffe://cluster.local/ns/shop/sa/web/extra', 'an extra path segment', /expected spiffe:\/\//],
    ['spiffe://cluster.local/ns/shop/sa/web/', 'a trailing slash', /expected spiffe:\/\//],
    ['spiffe://cluster.local/foo', 'not a workload path', /expected spiffe:\/\//],
    ['spiffe://Cluster.Local/ns/shop/sa/web', 'an uppercase trust domain', /trust domain "Cluster\.Local"/],
    ['spiffe://cluster.local/ns/Shop/sa/web', 'an uppercase namespace', /namespace "Shop" is not a DNS-1123 label/],
    ['spiffe://cluster.local/ns/a.b/sa/web', 'a namespace with a dot', /namespace "a\.b" is not a DNS-1123 label/],
    ['spiffe://cluster.local/ns/-shop/sa/web', 'a namespace starting with a dash', /namespace "-shop"/],
    [`spiffe://cluster.local/ns/${'a'.repeat(64)}/sa/web`, 'a 64-character namespace', /namespace "a{64}" is not a DNS-1123 label/],
    ['spiffe://cluster.local/ns/shop/sa/Web', 'an uppercase service account', /service account "Web" is not a DNS-1123 subdomain/],
    ['spiffe://cluster.local/ns/shop/sa/web_1', 'a service account with an underscore', /service account "web_1"/],
    ['spiffe://cluster.local/ns/shop/sa/web.', 'a service account ending in a dot', /service account "web\."/],
    [`spiffe://cluster.local/ns/shop/sa/${'a'.repeat(254)}`, 'a 254-character service account', /service account "a+" is not a DNS-1123 subdomain/],
    [`spiffe://cluster.local/ns/shop/sa/${'a.'.repeat(1100)}a`, 'a URI over 2048 characters', /longer than 2048 characters/],
  ];
  for (const [uri, what, message] of bad) {
    assert.throws(() => parseSpiffeUri(uri), (e) => e instanceof IdentityInvalid && e.uri === uri && message.test(e.message), what);
  }
  // At the limits: a 63-character namespace and a 253-character service account are identities.
  const ns = 'a'.repeat(63);
  const sa = `${'a'.repeat(63)}.${'b'.repeat(63)}.${'c'.repeat(63)}.${'d'.repeat(61)}`;
  assert.equal(sa.length, 253);
  assert.deepEqual(parseSpiffeUri(`spiffe://cluster.local/ns/${ns}/sa/${sa}`), { trustDomain: 'cluster.local', namespace: ns, serviceAccount: sa });
});

test('a CSR made by createCsr reads back with its one URI and its P-256 key', async () => {
  const keys = await generateKeyPair();
  const pem = await createCsr(keys, URI);
  assert.match(pem, /^-----BEGIN CERTIFICATE REQUEST-----\n/);
  const checked = await readCsr(pem);
  assert.equal(checked.uri, URI);
  const alg = checked.publicKey.algorithm as { name: string; namedCurve?: string };
  assert.equal(alg.name, 'ECDSA');
  assert.equal(alg.namedCurve, 'P-256');
  const spki = Buffer.from(await webcrypto.subtle.exportKey('spki', keys.publicKey));
  assert.deepEqual(Buffer.from(checked.publicKey.rawData), spki);
});

test('readCsr refuses garbage and a truncated PEM as malformed', async () => {
  await refused(() => readCsr('not a certificate request'), 'malformed', 'garbage text');
  await refused(() => readCsr(''), 'malformed', 'empty text');
  const pem = await createCsr(await generateKeyPair(), URI);
  const lines = pem.trimEnd().split('\n');
  // Half the base64 body, with both PEM markers kept: a DER structure cut short.
  const truncated = [lines[0], ...lines.slice(1, -1).join('').slice(0, 120).match(/.{1,64}/g) ?? [], lines[lines.length - 1]].join('\n');
  await refused(() => readCsr(`${truncated}\n`), 'malformed', 'a truncated body');
  // The text cut in the middle, with no END marker.
  await refused(() => readCsr(pem.slice(0, Math.floor(pem.length / 2))), 'malformed', 'a PEM cut in half');
});

test('readCsr refuses a text over MAX_PEM_BYTES as too_large before parsing it', async () => {
  await refused(() => readCsr('x'.repeat(MAX_PEM_BYTES + 1)), 'too_large', 'a text one byte over the limit');
  // A real CSR padded past the limit is refused for its size too, whatever it holds.
  const pem = await createCsr(await generateKeyPair(), URI);
  await refused(() => readCsr(pem + '\n'.repeat(MAX_PEM_BYTES)), 'too_large', 'a padded CSR');
});

test('readCsr refuses a CSR whose signature bytes were changed as a bad signature', async () => {
  const pem = await createCsr(await generateKeyPair(), URI);
  const der = pemToDer(pem);
  // The DER ends with the signature BIT STRING: SEQUENCE { INTEGER r, INTEGER s }. Its last byte is s's.
  der[der.length - 1] = (der[der.length - 1] ?? 0) ^ 0x01;
  await refused(() => readCsr(derToPem('CERTIFICATE REQUEST', der)), 'signature', 'a flipped signature byte');
});

test('readCsr refuses a CSR with an ECDSA P-384 key as key_algorithm', async () => {
  const keys = (await webcrypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-384' }, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    keys,
    signingAlgorithm: { name: 'ECDSA', hash: 'SHA-384' },
    extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: URI }])],
  });
  await refused(() => readCsr(csr.toString('pem')), 'key_algorithm', 'a P-384 key');
});

test('readCsr refuses a CSR that does not ask for exactly one name, a URI, as san', async () => {
  const twoUris = await csrWith([new x509.SubjectAlternativeNameExtension([{ type: 'url', value: URI }, { type: 'url', value: 'spiffe://cluster.local/ns/shop/sa/db' }])]);
  await refused(() => readCsr(twoUris), 'san', 'two URI SANs');
  const dnsOnly = await csrWith([new x509.SubjectAlternativeNameExtension([{ type: 'dns', value: 'web.shop.svc' }])]);
  await refused(() => readCsr(dnsOnly), 'san', 'a DNS SAN only');
  const uriAndDns = await csrWith([new x509.SubjectAlternativeNameExtension([{ type: 'url', value: URI }, { type: 'dns', value: 'web.shop.svc' }])]);
  await refused(() => readCsr(uriAndDns), 'san', 'a URI and a DNS SAN');
  const none = await csrWith([]);
  await refused(() => readCsr(none), 'san', 'no SAN extension');
});

test('verifyChain accepts a leaf issued by the root, returns its URIs, and refuses it under another root or past its notAfter', async () => {
  const root = await createRoot('cluster.local', new Date(Date.now() + 3600_000));
  const other = await createRoot('cluster.local', new Date(Date.now() + 3600_000));
  const keys = await generateKeyPair();
  const notAfter = new Date(Date.now() + 600_000);
  const leaf = await issueLeaf(await signerOf(root), { publicKey: keys.publicKey, uris: [URI], notBefore: new Date(Date.now() - 60_000), notAfter });
  assert.deepEqual(verifyChain([leaf], [root.certPem]), [URI]);
  // Any one of several roots will do.
  assert.deepEqual(verifyChain([leaf], [other.certPem, root.certPem]), [URI]);
  assert.throws(() => verifyChain([leaf], [other.certPem]), (e) => e instanceof CertificateInvalid && e.reason === 'untrusted', 'another root');
  assert.throws(() => verifyChain([leaf], []), (e) => e instanceof CertificateInvalid && e.reason === 'untrusted', 'no roots');
  assert.throws(() => verifyChain([leaf], [root.certPem], new Date(notAfter.getTime() + 60_000)), (e) => e instanceof CertificateInvalid && e.reason === 'expired', 'after notAfter');
  assert.throws(() => verifyChain([leaf], [root.certPem], new Date(Date.now() - 3600_000)), (e) => e instanceof CertificateInvalid && e.reason === 'expired', 'before notBefore');
  assert.throws(() => verifyChain([], [root.certPem]), (e) => e instanceof CertificateInvalid && e.reason === 'malformed', 'an empty chain');
  assert.throws(() => verifyChain(['garbage'], [root.certPem]), (e) => e instanceof CertificateInvalid && e.reason === 'malformed', 'a garbage chain');
});

test("leaves name their issuer exactly as the signer's certificate encodes its subject, and carry the signer's own key identifier", async () => {
  // An operator's root (ztunnel's test root is one): O as a UTF8String, a key identifier that is
  // not SHA-1 of the key. rustls/webpki builds chains by byte-equal names; OpenSSL matches AKI to SKI.
  const alg = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const root = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    // SEQUENCE { SET { SEQUENCE { O, UTF8String "cluster.local" } } }
    name: new x509.Name(Buffer.from('301831163014060355040a0c0d636c75737465722e6c6f63616c', 'hex')),
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 3600_000),
    signingAlgorithm: alg,
    keys,
    extensions: [new x509.BasicConstraintsExtension(true, undefined, true), new x509.SubjectKeyIdentifierExtension('0102030405060708')],
  });
  const signer = { cert: root, key: keys.privateKey, algorithm: alg };
  const leafKeys = await generateKeyPair();
  const leaf = new x509.X509Certificate(await issueLeaf(signer, { publicKey: leafKeys.publicKey, uris: ['spiffe://cluster.local/ns/a/sa/b'], notBefore: new Date(Date.now() - 60_000), notAfter: new Date(Date.now() + 3600_000) }));
  assert.equal(Buffer.from(leaf.issuerName.toArrayBuffer()).toString('hex'), Buffer.from(root.subjectName.toArrayBuffer()).toString('hex'));
  assert.equal(leaf.getExtension(x509.AuthorityKeyIdentifierExtension)?.keyId, '0102030405060708');
  assert.deepEqual(verifyChain([leaf.toString('pem')], [root.toString('pem')]), ['spiffe://cluster.local/ns/a/sa/b']);
});
