/**
 * The mesh's certificate authority. Its signing certificate and key are two files in the CA
 * folder (--ca-dir): root-cert.pem and root-key.pem (0600). An operator's own root, or an
 * intermediate with its chain up to the root in root-cert.pem, is used as it is; with neither file
 * the control plane creates a self-signed ECDSA P-256 root on its first start and keeps it.
 * trusted-roots.pem, if present, adds roots that stay trusted (the old root while a rotation
 * overlaps). Leaves are ECDSA P-256 keys of the agents, for workload identities only, within the
 * trust domain, and for nodes that run the identity (the caller decides that, see sign()).
 */
import { constants } from 'node:fs';
import { access, mkdir, open, readFile, rename, stat } from 'node:fs/promises';
import { join } from 'node:path';

import { IdentityInvalid, parseSpiffeUri, spiffeUri, type WorkloadIdentity } from '../../identity/spiffe.js';
import { CertificateInvalid, certificateInfo, createRoot, generateKeyPair, importSigningKey, issueLeaf, parseCertificate, privateKeyPem, readCsr, splitPem, type Signer } from '../../identity/x509.js';
import { NodemeshError } from '../../shared/errors.js';
import { logger } from '../../shared/log.js';

const log = logger('ca');

export const ROOT_CERT = 'root-cert.pem';
export const ROOT_KEY = 'root-key.pem';
export const TRUSTED_ROOTS = 'trusted-roots.pem';

/** A created root lasts this long. */
const ROOT_LIFETIME_MS = 10 * 365 * 24 * 3600_000;
/** Leaves start a minute in the past: clocks of nodes differ a little. */
const BACKDATE_MS = 60_000;

export const DEFAULT_CERT_TTL_MS = 24 * 3600_000;
export const CERT_TTL_BOUNDS = { min: 10_000, max: 90 * 24 * 3600_000 } as const;

/** Why a CSR was not signed: a reason (a metric label) and what to tell the agent. */
export class SignRefused extends Error {
  constructor(
    readonly reason: 'too_large' | 'malformed' | 'signature' | 'key_algorithm' | 'san' | 'identity' | 'trust_domain' | 'not_on_node' | 'internal',
    message: string,
  ) {
    super(message);
    this.name = 'SignRefused';
  }
}

export interface Issued {
  readonly identity: WorkloadIdentity;
  /** PEM, leaf first, then the intermediates (not the root). */
  readonly chain: ReadonlyArray<string>;
  readonly roots: ReadonlyArray<string>;
  readonly notAfter: Date;
  readonly serial: string;
}

function caError(message: string, path: string, cause?: unknown): NodemeshError {
  return new NodemeshError('NM_ERR_CA', message, {
    context: { path },
    ...(cause === undefined ? {} : { cause }),
    hint: `put both ${ROOT_CERT} and ${ROOT_KEY} (chmod 600) in the CA folder, or neither: the control plane then creates a root`,
  });
}

async function exists(path: string): Promise<boolean> {
  return access(path, constants.F_OK).then(
    () => true,
    () => false,
  );
}

/** Writes a file whole (temp file, then rename) with the given mode from its creation on. */
export async function writeNew(path: string, text: string, mode: number): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  const f = await open(tmp, 'wx', mode);
  try {
    await f.writeFile(text);
    await f.sync();
  } finally {
    await f.close();
  }
  await rename(tmp, path);
}

export class CertificateAuthority {
  private constructor(
    readonly trustDomain: string,
    private readonly signer: Signer,
    /** Intermediates between the signer and the root (PEM), the signer itself first when it is not a root. */
    private readonly intermediates: ReadonlyArray<string>,
    private readonly trusted: ReadonlyArray<string>,
    private readonly signerNotAfter: Date,
    readonly created: boolean,
    /** The signing certificate (PEM): a reload with the same one and the same roots changes nothing. */
    private readonly signerPem: string,
  ) {}

  /** Whether another load of the folder signs with the same certificate and trusts the same roots. */
  sameAs(other: CertificateAuthority): boolean {
    return this.signerPem === other.signerPem && this.trusted.length === other.trusted.length && this.trusted.every((r, i) => r === other.trusted[i]);
  }

  /**
   * Loads the CA folder's root (or intermediate) and key, or creates a root when neither exists
   * (at start only: a reload that finds the files gone refuses rather than starting a new mesh
   * root that no node trusts).
   */
  static async open(dir: string, trustDomain: string, options: { create?: boolean } = {}): Promise<CertificateAuthority> {
    const certPath = join(dir, ROOT_CERT);
    const keyPath = join(dir, ROOT_KEY);
    const [haveCert, haveKey] = [await exists(certPath), await exists(keyPath)];
    let created = false;
    if (!haveCert && !haveKey && options.create === false) throw caError(`${certPath} and ${keyPath} are gone: the CA keeps the root it has`, certPath);
    if (!haveCert && !haveKey) {
      try {
        await mkdir(dir, { recursive: true, mode: 0o700 });
        const root = await createRoot(trustDomain, new Date(Date.now() + ROOT_LIFETIME_MS));
        await writeNew(keyPath, root.keyPem, 0o600);
        await writeNew(certPath, root.certPem, 0o644);
      } catch (e) {
        throw caError(`a root CA cannot be created in ${dir}: ${(e as Error).message}`, dir, e);
      }
      created = true;
      log.info({ dir, trustDomain }, 'created a self-signed root CA');
    } else if (!haveCert || !haveKey) {
      const missing = haveCert ? keyPath : certPath;
      throw caError(`${missing} is missing while ${haveCert ? certPath : keyPath} is there: the CA needs both`, missing);
    }
    const keyStat = await stat(keyPath);
    if ((keyStat.mode & 0o077) !== 0) {
      throw caError(`${keyPath} can be read by others than its owner (mode ${(keyStat.mode & 0o777).toString(8)}): the mesh's signing key must be 0600`, keyPath);
    }
    const certText = await readFile(certPath, 'utf8').catch((e: unknown) => {
      throw caError(`${certPath} cannot be read: ${(e as Error).message}`, certPath, e);
    });
    const keyText = await readFile(keyPath, 'utf8').catch((e: unknown) => {
      throw caError(`${keyPath} cannot be read: ${(e as Error).message}`, keyPath, e);
    });
    const chain = splitPem(certText);
    if (chain.length === 0) throw caError(`${certPath} holds no PEM certificate`, certPath);
    let infos;
    try {
      infos = chain.map((p) => certificateInfo(p));
    } catch (e) {
      throw caError(`${certPath}: ${(e as Error).message}`, certPath, e);
    }
    let signing;
    try {
      signing = await importSigningKey(keyText);
    } catch (e) {
      throw caError(`${keyPath}: ${(e as Error).message}`, keyPath, e);
    }
    const first = infos[0];
    const last = infos[infos.length - 1];
    if (!first || !last) throw caError(`${certPath} holds no PEM certificate`, certPath);
    if (!first.isCa) throw caError(`the first certificate of ${certPath} is not a CA certificate (basicConstraints CA:true)`, certPath);
    if (!first.spki.equals(signing.spki)) throw caError(`${keyPath} is not the key of the first certificate in ${certPath}`, keyPath);
    if (!last.selfSigned) throw caError(`${certPath} must end with the self-signed root of its chain`, certPath);
    if (first.notAfter.getTime() < Date.now()) throw caError(`the CA certificate in ${certPath} expired on ${first.notAfter.toISOString()}`, certPath);
    const extraPath = join(dir, TRUSTED_ROOTS);
    const extra = (await exists(extraPath)) ? splitPem(await readFile(extraPath, 'utf8')) : [];
    for (const p of extra) {
      try {
        if (!certificateInfo(p).selfSigned) throw new CertificateInvalid('untrusted', 'not a self-signed root');
      } catch (e) {
        throw caError(`${extraPath}: ${(e as Error).message}`, extraPath, e);
      }
    }
    const roots = [last.pem, ...extra.filter((p) => certificateInfo(p).pem !== last.pem)];
    const signer: Signer = { cert: parseCertificate(first.pem), key: signing.key, algorithm: signing.algorithm };
    log.info({ dir, trustDomain, roots: roots.length, intermediate: chain.length > 1, notAfter: first.notAfter.toISOString() }, 'CA loaded');
    return new CertificateAuthority(trustDomain, signer, chain.length > 1 ? infos.slice(0, -1).map((i) => i.pem) : [], roots, first.notAfter, created, first.pem);
  }

  /** The roots agents trust (PEM): the signing chain's root first, then the extra ones during a rotation. */
  roots(): ReadonlyArray<string> {
    return this.trusted;
  }

  /**
   * Signs a CSR for a workload identity. `authorize` throws SignRefused('not_on_node') unless the
   * calling node runs a pod with that identity right now. Every refusal is a SignRefused.
   */
  async sign(csr: string, authorize: (identity: WorkloadIdentity) => void, ttlMs: number): Promise<Issued> {
    let checked;
    try {
      checked = await readCsr(csr);
    } catch (e) {
      if (e instanceof CertificateInvalid) throw new SignRefused(e.reason === 'expired' || e.reason === 'untrusted' || e.reason === 'key_mismatch' ? 'malformed' : e.reason, e.message);
      throw e;
    }
    let identity: WorkloadIdentity;
    try {
      identity = parseSpiffeUri(checked.uri);
    } catch (e) {
      if (e instanceof IdentityInvalid) throw new SignRefused('identity', e.message);
      throw e;
    }
    if (identity.trustDomain !== this.trustDomain) {
      throw new SignRefused('trust_domain', `${checked.uri} is in trust domain "${identity.trustDomain}", not this mesh's "${this.trustDomain}"`);
    }
    authorize(identity);
    const now = Date.now();
    const notAfter = new Date(Math.min(now + ttlMs, this.signerNotAfter.getTime()));
    const leaf = await issueLeaf(this.signer, { publicKey: checked.publicKey, uris: [spiffeUri(identity)], notBefore: new Date(now - BACKDATE_MS), notAfter });
    return { identity, chain: [leaf, ...this.intermediates], roots: this.trusted, notAfter, serial: certificateInfo(leaf).serial };
  }

  /**
   * A serving certificate for the control plane's own TLS port (15012): a fresh key in memory,
   * the names agents dial it by as SANs. Agents check it against the roots they were given.
   */
  async servingCertificate(dnsNames: ReadonlyArray<string>, ips: ReadonlyArray<string>, ttlMs = 365 * 24 * 3600_000): Promise<{ chainPem: string; keyPem: string; notAfter: Date }> {
    const keys = await generateKeyPair();
    const now = Date.now();
    const notAfter = new Date(Math.min(now + ttlMs, this.signerNotAfter.getTime()));
    const leaf = await issueLeaf(this.signer, { publicKey: keys.publicKey, dnsNames, ips, notBefore: new Date(now - BACKDATE_MS), notAfter });
    return { chainPem: [leaf, ...this.intermediates].join(''), keyPem: await privateKeyPem(keys.privateKey), notAfter };
  }
}
