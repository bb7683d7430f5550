/**
 * The agent's workload certificates (design.md section 11): one ECDSA P-256 key and leaf per
 * identity present on the node, obtained from the control plane's CA when the first pod with that
 * identity is served, renewed at half life (a new key each time), dropped when the last such pod
 * leaves. Keys live in this process's memory only: never on disk, never in a log line.
 */
import { webcrypto } from 'node:crypto';

import { logger } from '../shared/log.js';
import { compareStrings } from '../shared/order.js';
import { parseSpiffeUri, spiffeUri, type WorkloadIdentity } from './spiffe.js';
import { CertificateInvalid, certificateInfo, createCsr, generateKeyPair, privateKeyPem, verifyChain, type KeyPair } from './x509.js';

const log = logger('certificates');

/** The control plane answers that it has no CA (Sign is not implemented there). */
export class NoCertificateAuthority extends Error {
  constructor() {
    super('the control plane has no certificate authority');
    this.name = 'NoCertificateAuthority';
  }
}

/** The CA as the agent reaches it: Certificates.Sign (NoCertificateAuthority when there is none). */
export interface CertificateSigner {
  sign(csr: string): Promise<{ certChain: ReadonlyArray<string>; roots: ReadonlyArray<string> }>;
}

/** A certificate the node holds for an identity, with its key (for node:tls only). */
export interface WorkloadCertificate {
  readonly identity: WorkloadIdentity;
  readonly uri: string;
  readonly keys: KeyPair;
  /** PKCS#8 PEM of the private key: for a TLS context, nothing else. */
  readonly keyPem: string;
  /** PEM, leaf first. */
  readonly chain: ReadonlyArray<string>;
  readonly serial: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  readonly renewAt: Date;
}

export interface CertificateStatus {
  readonly identity: string;
  readonly state: 'valid' | 'pending' | 'expired';
  readonly serial: string | undefined;
  readonly notAfter: string | undefined;
  readonly renewAt: string | undefined;
  readonly lastError: string | undefined;
}

const RETRY_BASE_MS = 200;
const RETRY_MAX_MS = 30_000;

interface Entry {
  readonly identity: WorkloadIdentity;
  readonly uri: string;
  cert: WorkloadCertificate | undefined;
  timer: NodeJS.Timeout | undefined;
  attempt: number;
  lastError: string | undefined;
  inFlight: boolean;
  dropped: boolean;
}

export interface CertificateEvents {
  /** A certificate was obtained or renewed, or (undefined) the CA turned out to be absent: waiters re-check. */
  onIssued?(cert: WorkloadCertificate | undefined): void;
  /** The trusted roots changed (a rotation step): new handshakes must check against them. */
  onRootsChanged?(roots: ReadonlyArray<string>): void;
  /** Every Sign attempt's result: signed, or the error's reason. */
  onResult?(result: string): void;
}

export class CertificateManager {
  private readonly entries = new Map<string, Entry>();
  /** The roots the CA sent last (several during a rotation): what peers are checked against. */
  private trustedRoots: ReadonlyArray<string>;
  private stopped = false;
  /** The control plane said it has no CA: workloads go without certificates (plaintext mesh). */
  private noCa = false;

  constructor(
    private readonly signer: CertificateSigner,
    initialRoots: ReadonlyArray<string>,
    private readonly events: CertificateEvents = {},
  ) {
    this.trustedRoots = initialRoots;
  }

  /** Makes the held identities exactly `wanted` (SPIFFE URIs): new ones are requested now, others dropped. */
  sync(wanted: ReadonlySet<string>): void {
    if (this.stopped) return;
    for (const [uri, e] of this.entries) {
      if (wanted.has(uri)) continue;
      clearTimeout(e.timer);
      e.dropped = true;
      this.entries.delete(uri);
      log.info({ identity: uri }, 'certificate dropped: no pod with this identity is left on the node');
    }
    for (const uri of wanted) {
      if (this.entries.has(uri)) continue;
      const entry: Entry = { identity: parseSpiffeUri(uri), uri, cert: undefined, timer: undefined, attempt: 0, lastError: undefined, inFlight: false, dropped: false };
      this.entries.set(uri, entry);
      void this.request(entry);
    }
  }

  /** The valid certificate of an identity, if the node holds one. */
  get(uri: string): WorkloadCertificate | undefined {
    const cert = this.entries.get(uri)?.cert;
    return cert && cert.notAfter.getTime() > Date.now() ? cert : undefined;
  }

  roots(): ReadonlyArray<string> {
    return this.trustedRoots;
  }

  /**
   * Checks a trust bundle from the control plane before anything uses it: every entry a
   * self-signed CA certificate that has not expired. Throws CertificateInvalid naming the entry.
   */
  checkRoots(roots: ReadonlyArray<string>): void {
    roots.forEach((pem, i) => {
      const info = certificateInfo(pem);
      if (!info.isCa || !info.selfSigned) throw new CertificateInvalid('untrusted', `root ${i} is not a self-signed CA certificate`);
      if (info.notAfter.getTime() < Date.now()) throw new CertificateInvalid('expired', `root ${i} expired on ${info.notAfter.toISOString()}`);
    });
  }

  /**
   * A root rotation step (the control plane's trust bundle, checked with checkRoots): peers are
   * checked against exactly these roots from the next handshake on (open connections go on), and
   * a held certificate that does not chain to the first root, the one the CA signs with now, is
   * renewed at once (within a second, spread), so that the old root can be removed soon.
   */
  setRoots(roots: ReadonlyArray<string>): void {
    if (roots.length === 0 || (roots.length === this.trustedRoots.length && roots.every((r, i) => r === this.trustedRoots[i]))) return;
    this.trustedRoots = roots;
    const signing = roots.slice(0, 1);
    let renewing = 0;
    for (const entry of this.entries.values()) {
      if (!entry.cert) continue;
      try {
        verifyChain(entry.cert.chain, signing);
      } catch {
        renewing++;
        this.schedule(entry, Math.random() * 1000);
      }
    }
    log.info({ roots: roots.length, renewing }, 'trusted roots changed');
    this.events.onRootsChanged?.(roots);
  }

  /** Whether the control plane has said it has no CA (asked again every 30 s or so). */
  caAbsent(): boolean {
    return this.noCa;
  }

  status(): CertificateStatus[] {
    return [...this.entries.values()]
      .map((e) => ({
        identity: e.uri,
        state: e.cert === undefined ? ('pending' as const) : e.cert.notAfter.getTime() > Date.now() ? ('valid' as const) : ('expired' as const),
        serial: e.cert?.serial,
        notAfter: e.cert?.notAfter.toISOString(),
        renewAt: e.cert?.renewAt.toISOString(),
        lastError: e.lastError,
      }))
      .sort((a, b) => compareStrings(a.identity, b.identity));
  }

  stop(): void {
    this.stopped = true;
    for (const e of this.entries.values()) clearTimeout(e.timer);
    this.entries.clear();
  }

  private async request(entry: Entry): Promise<void> {
    if (this.stopped || entry.dropped || entry.inFlight) return;
    entry.inFlight = true;
    try {
      const keys = await generateKeyPair();
      const answer = await this.signer.sign(await createCsr(keys, entry.uri));
      const cert = await this.accept(entry, keys, answer);
      if (entry.dropped || this.stopped) return;
      entry.cert = cert;
      entry.attempt = 0;
      this.noCa = false;
      entry.lastError = undefined;
      if (answer.roots.length > 0) this.setRoots(answer.roots);
      this.schedule(entry, cert.renewAt.getTime() - Date.now());
      log.info({ identity: entry.uri, serial: cert.serial, notAfter: cert.notAfter.toISOString(), renewAt: cert.renewAt.toISOString() }, 'certificate obtained');
      this.events.onResult?.('signed');
      this.events.onIssued?.(cert);
    } catch (e) {
      if (entry.dropped || this.stopped) return;
      const message = (e as Error).message;
      entry.lastError = message;
      if (e instanceof NoCertificateAuthority) {
        if (!this.noCa) log.warn({ identity: entry.uri }, 'the control plane has no CA: workloads get no certificates (no mTLS); asking again every 30 s');
        this.noCa = true;
        this.events.onResult?.('no_ca');
        this.events.onIssued?.(undefined);
        this.schedule(entry, RETRY_MAX_MS);
        return;
      }
      const delay = Math.random() * Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** entry.attempt) + RETRY_BASE_MS / 2;
      entry.attempt = Math.min(entry.attempt + 1, 16);
      log.warn({ identity: entry.uri, err: message, retryInMs: Math.round(delay), holds: entry.cert !== undefined }, 'certificate request failed; retrying');
      this.events.onResult?.(e instanceof CertificateInvalid ? `bad_answer_${e.reason}` : 'failed');
      this.schedule(entry, delay);
    } finally {
      entry.inFlight = false;
    }
  }

  /** Checks what the CA sent before it is used: a chain to the roots, the identity asked for, the key generated. */
  private async accept(entry: Entry, keys: KeyPair, answer: { certChain: ReadonlyArray<string>; roots: ReadonlyArray<string> }): Promise<WorkloadCertificate> {
    const roots = answer.roots.length > 0 ? answer.roots : this.trustedRoots;
    const uris = verifyChain(answer.certChain, roots);
    if (uris.length !== 1 || uris[0] !== entry.uri) throw new CertificateInvalid('san', `the CA signed ${uris.join(', ') || 'no URI'} for a request for ${entry.uri}`);
    const leaf = certificateInfo(answer.certChain[0] ?? '');
    const spki = Buffer.from(await webcrypto.subtle.exportKey('spki', keys.publicKey));
    if (!spki.equals(leaf.spki)) throw new CertificateInvalid('key_mismatch', 'the certificate is not for the key the request carried');
    const received = Date.now();
    const renewAt = new Date(received + Math.max(1000, (leaf.notAfter.getTime() - received) / 2));
    return {
      identity: entry.identity,
      uri: spiffeUri(entry.identity),
      keys,
      keyPem: await privateKeyPem(keys.privateKey),
      chain: answer.certChain,
      serial: leaf.serial,
      notBefore: leaf.notBefore,
      notAfter: leaf.notAfter,
      renewAt,
    };
  }

  private schedule(entry: Entry, delayMs: number): void {
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => void this.request(entry), Math.max(0, delayMs));
    entry.timer.unref();
  }
}
