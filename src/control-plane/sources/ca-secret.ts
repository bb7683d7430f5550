/**
 * The mesh CA in a cluster (design.md section 12): its root (or intermediate) and key are kept in
 * one Secret of the control plane's namespace, created on the first start and read back on every
 * later one, so a rescheduled control plane signs with the same root. The CA itself still loads
 * from its folder (--ca-dir, an in-memory volume in the Deployment): this module copies the
 * Secret into the folder before the CA opens, stores a root the CA created, and keeps the folder
 * following the Secret (an operator rotates the root by updating the Secret; the folder watcher
 * then reloads the CA as for a local rotation). The roots agents trust are published in the
 * ConfigMap nodemesh-ca-root of the same namespace, which the agents mount.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

import { NodemeshError } from '../../shared/errors.js';
import { logger } from '../../shared/log.js';
import { DNS_LABEL, parseNamespacedName } from '../../shared/names.js';
import { ROOT_CERT, ROOT_KEY, TRUSTED_ROOTS, writeNew } from '../ca/ca.js';
import { KubeApiError, type KubeApi, type KubeObject } from '../../kube/api.js';

const log = logger('ca-secret');

/** The ConfigMap of the trusted roots (key root-cert.pem), next to the Secret. */
export const CA_ROOT_CONFIGMAP = 'nodemesh-ca-root';

const FILES: ReadonlyArray<{ key: string; mode: number; required: boolean }> = [
  { key: ROOT_CERT, mode: 0o644, required: true },
  { key: ROOT_KEY, mode: 0o600, required: true },
  { key: TRUSTED_ROOTS, mode: 0o644, required: false },
];

export class CaSecret {
  private constructor(
    private readonly api: KubeApi,
    readonly namespace: string,
    readonly name: string,
  ) {}

  /** From "namespace/name" (--ca-secret). */
  static of(api: KubeApi, ref: string): CaSecret {
    const parsed = parseNamespacedName(ref);
    // The Secret's name is a DNS-1123 label here (a subdomain would do for Kubernetes).
    if (!parsed || !DNS_LABEL.test(parsed.name)) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--ca-secret "${ref}" is not NAMESPACE/NAME`, { context: { field: 'ca-secret' }, hint: 'give the Secret as NAMESPACE/NAME, e.g. nodemesh-system/nodemesh-ca' });
    }
    return new CaSecret(api, parsed.namespace, parsed.name);
  }

  get ref(): string {
    return `${this.namespace}/${this.name}`;
  }

  private path(kind: 'secrets' | 'configmaps', name?: string): string {
    return `/api/v1/namespaces/${this.namespace}/${kind}${name === undefined ? '' : `/${name}`}`;
  }

  private error(message: string, cause?: unknown): NodemeshError {
    return new NodemeshError('NM_ERR_CA', message, {
      context: { object: `Secret/${this.ref}` },
      ...(cause === undefined ? {} : { cause }),
      hint: `the Secret holds ${ROOT_CERT} and ${ROOT_KEY} (and optionally ${TRUSTED_ROOTS}); the control plane's ServiceAccount may get, create and update it (daemonset/03-rbac.yaml)`,
    });
  }

  /**
   * Writes the Secret's files into the CA folder where they differ from what is there. Undefined
   * when there is no Secret; otherwise whether a file changed.
   */
  async restore(dir: string, signal: AbortSignal): Promise<boolean | undefined> {
    let secret: KubeObject | undefined;
    try {
      secret = await this.api.get(this.path('secrets', this.name), signal);
    } catch (e) {
      throw this.error(`the CA Secret ${this.ref} cannot be read: ${(e as Error).message}`, e);
    }
    if (!secret) return undefined;
    const data = (secret['data'] ?? {}) as Record<string, unknown>;
    let changed = false;
    for (const f of FILES) {
      const value = data[f.key];
      if (value === undefined && !f.required) continue;
      if (typeof value !== 'string' || value === '') throw this.error(`the CA Secret ${this.ref} has no ${f.key}`);
      const text = Buffer.from(value, 'base64').toString('utf8');
      const path = join(dir, f.key);
      if ((await readFile(path, 'utf8').catch(() => undefined)) === text) continue;
      await writeNew(path, text, f.mode);
      changed = true;
    }
    return changed;
  }

  /** Creates the Secret from the CA folder's files. False when it exists already (another control plane made it first). */
  async store(dir: string, signal: AbortSignal): Promise<boolean> {
    const data: Record<string, string> = {};
    for (const f of FILES) {
      const text = await readFile(join(dir, f.key), 'utf8').catch((e: NodeJS.ErrnoException) => {
        if (e.code === 'ENOENT' && !f.required) return undefined;
        throw e;
      });
      if (text !== undefined) data[f.key] = Buffer.from(text).toString('base64');
    }
    const body = { apiVersion: 'v1', kind: 'Secret', type: 'Opaque', metadata: { name: this.name, namespace: this.namespace, labels: { 'app.kubernetes.io/part-of': 'nodemesh' } }, data };
    try {
      await this.api.create(this.path('secrets'), body, signal);
      return true;
    } catch (e) {
      if (e instanceof KubeApiError && e.status === 409) return false;
      throw this.error(`the CA Secret ${this.ref} cannot be created: ${(e as Error).message}`, e);
    }
  }

  /** The trusted roots as the ConfigMap agents mount: created, or replaced when they changed. */
  async publishRoots(roots: ReadonlyArray<string>, signal: AbortSignal): Promise<void> {
    const text = roots.map((r) => `${r.trim()}\n`).join('');
    const path = this.path('configmaps', CA_ROOT_CONFIGMAP);
    const object = (resourceVersion?: string): KubeObject => ({
      apiVersion: 'v1',
      kind: 'ConfigMap',
      metadata: { name: CA_ROOT_CONFIGMAP, namespace: this.namespace, labels: { 'app.kubernetes.io/part-of': 'nodemesh' }, ...(resourceVersion === undefined ? {} : { resourceVersion }) },
      data: { [ROOT_CERT]: text },
    });
    const current = await this.api.get(path, signal);
    if (!current) {
      await this.api.create(this.path('configmaps'), object(), signal);
      log.info({ configMap: `${this.namespace}/${CA_ROOT_CONFIGMAP}`, roots: roots.length }, 'published the trusted roots');
      return;
    }
    if ((current['data'] as Record<string, unknown> | undefined)?.[ROOT_CERT] === text) return;
    await this.api.replace(path, object(current.metadata?.resourceVersion), signal);
    log.info({ configMap: `${this.namespace}/${CA_ROOT_CONFIGMAP}`, roots: roots.length }, 'published the new trusted roots');
  }
}
