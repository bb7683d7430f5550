/**
 * Keys, certificate requests and certificates, through @peculiar/x509 (a maintained X.509 library
 * over WebCrypto: no hand-written ASN.1 here) and node's X509Certificate for reading. Every key
 * the mesh makes is ECDSA P-256. Private keys live in memory as CryptoKeys; privateKeyPem() is
 * only for handing one to node:tls, never for a file or a log line.
 */
import 'reflect-metadata';
import { X509Certificate, createPrivateKey, createPublicKey, randomBytes, webcrypto } from 'node:crypto';

import * as x509 from '@peculiar/x509';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

type CryptoKey = webcrypto.CryptoKey;
type EcdsaParams = webcrypto.EcdsaParams;
type RsaHashedImportParams = webcrypto.RsaHashedImportParams;
type EcKeyAlgorithm = webcrypto.EcKeyAlgorithm;

export const EC_P256 = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;

/** A CSR or certificate larger than this is refused before it is parsed. */
export const MAX_PEM_BYTES = 16 * 1024;

export type KeyPair = webcrypto.CryptoKeyPair;

/** Why a CSR or certificate is refused: a reason for metrics, and a message for the operator. */
export class CertificateInvalid extends Error {
  constructor(
    readonly reason: 'too_large' | 'malformed' | 'signature' | 'key_algorithm' | 'san' | 'expired' | 'untrusted' | 'key_mismatch',
    message: string,
  ) {
    super(message);
    this.name = 'CertificateInvalid';
  }
}

export async function generateKeyPair(): Promise<KeyPair> {
  return (await webcrypto.subtle.generateKey(EC_P256, true, ['sign', 'verify'])) as KeyPair;
}

function pem(label: string, der: ArrayBuffer): string {
  const b64 = Buffer.from(der).toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

/** PKCS#8 PEM of a private key, for node:tls (which takes no CryptoKey). */
export async function privateKeyPem(key: CryptoKey): Promise<string> {
  return pem('PRIVATE KEY', await webcrypto.subtle.exportKey('pkcs8', key));
}

/** A signing key from PEM (PKCS#8, SEC1 or PKCS#1): ECDSA P-256/P-384 or RSA, as an operator's CA may have. */
export async function importSigningKey(text: string): Promise<{ key: CryptoKey; algorithm: EcdsaParams | RsaHashedImportParams; spki: Buffer }> {
  let keyObject;
  try {
    keyObject = createPrivateKey(text);
  } catch (e) {
    throw new CertificateInvalid('malformed', `not a private key in PEM: ${(e as Error).message}`);
  }
  const der = keyObject.export({ type: 'pkcs8', format: 'der' });
  const spki = createPublicKey(keyObject).export({ type: 'spki', format: 'der' });
  if (keyObject.asymmetricKeyType === 'ec') {
    const curve = keyObject.asymmetricKeyDetails?.namedCurve;
    const namedCurve = curve === 'prime256v1' ? 'P-256' : curve === 'secp384r1' ? 'P-384' : undefined;
    if (!namedCurve) throw new CertificateInvalid('key_algorithm', `EC curve ${curve ?? '?'} is not supported (P-256 or P-384)`);
    const algorithm = { name: 'ECDSA', namedCurve, hash: namedCurve === 'P-256' ? 'SHA-256' : 'SHA-384' };
    return { key: await webcrypto.subtle.importKey('pkcs8', der, algorithm, false, ['sign']), algorithm, spki };
  }
  if (keyObject.asymmetricKeyType === 'rsa') {
    const algorithm = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
    return { key: await webcrypto.subtle.importKey('pkcs8', der, algorithm, false, ['sign']), algorithm, spki };
  }
  throw new CertificateInvalid('key_algorithm', `${keyObject.asymmetricKeyType ?? 'unknown'} keys are not supported (ECDSA or RSA)`);
}

/** A PKCS#10 request for one SPIFFE ID (its only subject alternative name), signed by the key. */
export async function createCsr(keys: KeyPair, uri: string): Promise<string> {
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({
    keys,
    signingAlgorithm: EC_P256,
    extensions: [new x509.SubjectAlternativeNameExtension([{ type: 'url', value: uri }])],
  });
  return csr.toString('pem');
}

export interface CheckedCsr {
  /** The one URI subject alternative name. */
  readonly uri: string;
  readonly publicKey: x509.PublicKey;
}

/**
 * Reads a CSR and checks what a CA must before signing: its size, that it parses, that it is
 * signed by the key it carries, that the key is ECDSA P-256, and that it asks for exactly one
 * name, a URI. The URI itself (trust domain, node authorization) is the caller's to check.
 */
export async function readCsr(text: string): Promise<CheckedCsr> {
  if (Buffer.byteLength(text) > MAX_PEM_BYTES) throw new CertificateInvalid('too_large', `the CSR is larger than ${MAX_PEM_BYTES} bytes`);
  let csr: x509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(text);
  } catch (e) {
    throw new CertificateInvalid('malformed', `not a PEM or DER PKCS#10 certificate request: ${(e as Error).message}`);
  }
  let signed: boolean;
  try {
    signed = await csr.verify();
  } catch (e) {
    throw new CertificateInvalid('signature', `the CSR's signature cannot be checked: ${(e as Error).message}`);
  }
  if (!signed) throw new CertificateInvalid('signature', "the CSR is not signed by the key it carries");
  const alg = csr.publicKey.algorithm as EcKeyAlgorithm;
  if (alg.name !== 'ECDSA' || alg.namedCurve !== 'P-256') throw new CertificateInvalid('key_algorithm', `the CSR's key is ${alg.name}${alg.namedCurve ? ` ${alg.namedCurve}` : ''}, not ECDSA P-256`);
  const sans = csr.extensions.filter((e): e is x509.SubjectAlternativeNameExtension => e instanceof x509.SubjectAlternativeNameExtension).flatMap((e) => e.names.items);
  const uris = sans.filter((n) => n.type === 'url');
  if (sans.length !== 1 || uris.length !== 1) {
    throw new CertificateInvalid('san', `the CSR must ask for exactly one name, a URI (it asks for ${sans.length === 0 ? 'none' : sans.map((n) => `${n.type}:${n.value}`).join(', ').slice(0, 300)})`);
  }
  return { uri: uris[0]?.value ?? '', publicKey: csr.publicKey };
}

/** A CA that signs: its certificate, its key and the chain above it (not including itself). */
export interface Signer {
  readonly cert: x509.X509Certificate;
  readonly key: CryptoKey;
  readonly algorithm: EcdsaParams | RsaHashedImportParams;
}

export interface LeafRequest {
  readonly publicKey: x509.PublicKey | CryptoKey;
  readonly uris?: ReadonlyArray<string>;
  readonly dnsNames?: ReadonlyArray<string>;
  readonly ips?: ReadonlyArray<string>;
  readonly notBefore: Date;
  readonly notAfter: Date;
}

/** A leaf for mutual TLS: the names given as SANs (critical, empty subject), client and server use. */
export async function issueLeaf(signer: Signer, request: LeafRequest): Promise<string> {
  const names: x509.JsonGeneralName[] = [
    ...(request.uris ?? []).map((value) => ({ type: 'url' as const, value })),
    ...(request.dnsNames ?? []).map((value) => ({ type: 'dns' as const, value })),
    ...(request.ips ?? []).map((value) => ({ type: 'ip' as const, value })),
  ];
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: '',
    // The signer's subject exactly as encoded (its DER, not re-encoded from text): chain
    // builders such as rustls/webpki (ztunnel) match issuer and subject byte for byte, and a
    // root whose O is a UTF8String must not become a PrintableString here.
    issuer: signer.cert.subjectName,
    notBefore: request.notBefore,
    notAfter: request.notAfter,
    signingAlgorithm: signer.algorithm,
    publicKey: request.publicKey,
    signingKey: signer.key,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension(names, true),
      await authorityKeyIdentifier(signer.cert),
    ],
  });
  return cert.toString('pem');
}

/** The signer's own key identifier when it has one (an operator's root may compute it otherwise), else one from its key. */
async function authorityKeyIdentifier(signer: x509.X509Certificate): Promise<x509.AuthorityKeyIdentifierExtension> {
  const ski = signer.getExtension(x509.SubjectKeyIdentifierExtension);
  return ski ? new x509.AuthorityKeyIdentifierExtension(ski.keyId) : x509.AuthorityKeyIdentifierExtension.create(signer.publicKey);
}

/** A self-signed root CA for the trust domain: ECDSA P-256, CA:true, keyCertSign. */
export async function createRoot(trustDomain: string, notAfter: Date): Promise<{ certPem: string; keyPem: string }> {
  const keys = await generateKeyPair();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: [{ O: [trustDomain] }, { CN: ['nodemesh root CA'] }],
    notBefore: new Date(Date.now() - 60_000),
    notAfter,
    signingAlgorithm: EC_P256,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certPem: cert.toString('pem'), keyPem: await privateKeyPem(keys.privateKey) };
}

/** Parses a PEM certificate for the library's generator (issuer name, public key). */
export function parseCertificate(text: string): x509.X509Certificate {
  try {
    return new x509.X509Certificate(text);
  } catch (e) {
    throw new CertificateInvalid('malformed', `not a PEM certificate: ${(e as Error).message}`);
  }
}

/** Every PEM certificate block of a text, in order. */
export function splitPem(text: string): string[] {
  return [...text.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g)].map((m) => `${m[0]}\n`);
}

export interface CertificateInfo {
  readonly pem: string;
  readonly uris: ReadonlyArray<string>;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly serial: string;
  readonly isCa: boolean;
  readonly selfSigned: boolean;
  /** DER SubjectPublicKeyInfo: compares a certificate with a private key. */
  readonly spki: Buffer;
}

/** What the mesh reads from a certificate; throws CertificateInvalid on anything that is not one. */
export function certificateInfo(text: string): CertificateInfo {
  if (Buffer.byteLength(text) > MAX_PEM_BYTES) throw new CertificateInvalid('too_large', `the certificate is larger than ${MAX_PEM_BYTES} bytes`);
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(text);
  } catch (e) {
    throw new CertificateInvalid('malformed', `not a PEM certificate: ${(e as Error).message}`);
  }
  const uris = (cert.subjectAltName ?? '')
    .split(', ')
    .filter((n) => n.startsWith('URI:'))
    .map((n) => n.slice(4));
  return {
    pem: cert.toString(),
    uris,
    notBefore: new Date(cert.validFrom),
    notAfter: new Date(cert.validTo),
    serial: cert.serialNumber,
    isCa: cert.ca,
    selfSigned: cert.checkIssued(cert) && cert.verify(cert.publicKey),
    spki: cert.publicKey.export({ type: 'spki', format: 'der' }),
  };
}

/**
 * Checks a leaf against trusted roots: within its validity, and signed by one of the roots
 * directly or through the intermediates given (leaf first). Returns the leaf's URI SANs.
 */
export function verifyChain(chain: ReadonlyArray<string>, roots: ReadonlyArray<string>, now = new Date()): ReadonlyArray<string> {
  const certs = chain.map((p) => {
    try {
      return new X509Certificate(p);
    } catch (e) {
      throw new CertificateInvalid('malformed', `not a PEM certificate: ${(e as Error).message}`);
    }
  });
  const leaf = certs[0];
  if (!leaf) throw new CertificateInvalid('malformed', 'no certificate');
  for (const c of certs) {
    if (now < new Date(c.validFrom) || now > new Date(c.validTo)) throw new CertificateInvalid('expired', `certificate ${c.serialNumber} is valid from ${c.validFrom} to ${c.validTo}`);
  }
  const anchors = roots
    .map((r) => {
      try {
        return new X509Certificate(r);
      } catch (e) {
        throw new CertificateInvalid('malformed', `a trusted root is not a PEM certificate: ${(e as Error).message}`);
      }
    })
    // A root past its dates anchors nothing (a rotation's old root once it expired).
    .filter((a) => now >= new Date(a.validFrom) && now <= new Date(a.validTo));
  let current = leaf;
  for (let depth = 0; depth <= certs.length; depth++) {
    if (anchors.some((a) => current.checkIssued(a) && current.verify(a.publicKey))) {
      return (leaf.subjectAltName ?? '').split(', ').filter((n) => n.startsWith('URI:')).map((n) => n.slice(4));
    }
    const next = certs.find((c) => c !== current && c.ca && current.checkIssued(c) && current.verify(c.publicKey));
    if (!next) break;
    current = next;
  }
  throw new CertificateInvalid('untrusted', `certificate ${leaf.serialNumber} does not chain to a trusted root`);
}

/** 128 random bits, positive (the top bit clear), as hex. */
function serial(): string {
  const b = randomBytes(16);
  b[0] = (b[0] ?? 0) & 0x7f;
  return b.toString('hex');
}
