/**
 * The few calls the control plane makes to a Kubernetes API server: a paged list and a watch
 * stream of one resource. Connection settings and credentials come from @kubernetes/client-node's
 * KubeConfig (kubeconfig files, in-cluster service account, exec and token-file auth), applied
 * again for every request so rotated tokens are picked up.
 */
import { existsSync } from 'node:fs';
import { request as httpRequest, type IncomingMessage, type RequestOptions } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { join } from 'node:path';

import { KubeConfig } from '@kubernetes/client-node';

import { NodemeshError } from '../shared/errors.js';

/** Where a pod's service account token is mounted (client-node's in-cluster config reads it). */
const SERVICE_ACCOUNT_TOKEN = '/var/run/secrets/kubernetes.io/serviceaccount/token';
/** A watch line longer than this is not an object we could use: the stream is treated as garbled. */
const MAX_LINE_BYTES = 16 * 1024 * 1024;
/** A list page: the API server's paging keeps one response (and our memory for it) bounded. */
const PAGE_LIMIT = 500;

export type KubeObject = Record<string, unknown> & { metadata?: { name?: string; namespace?: string; resourceVersion?: string; uid?: string; labels?: Record<string, string> } };

export interface WatchEvent {
  readonly type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK' | 'ERROR';
  readonly object: KubeObject;
}

/** A request the API server answered with an error status (or did not answer). */
export class KubeApiError extends Error {
  constructor(
    readonly path: string,
    /** HTTP status, 0 when the request did not get an answer. */
    readonly status: number,
    /** The Status object's reason (Expired, Gone, Forbidden, ...) or the socket error's code. */
    readonly reason: string,
    message: string,
  ) {
    super(message);
  }

  /** 410 Gone: the resourceVersion (or continue token) is too old; list again. */
  get expired(): boolean {
    return this.status === 410;
  }
}

export interface KubeApiOptions {
  /** A kubeconfig file; without it: $KUBECONFIG, ~/.kube/config, then the in-cluster service account. */
  readonly kubeconfig?: string;
}

export class KubeApi {
  private constructor(
    private readonly config: KubeConfig,
    readonly server: string,
  ) {}

  static load(options: KubeApiOptions = {}): KubeApi {
    const config = new KubeConfig();
    // With nothing to load, client-node falls back to http://localhost:8080 and the control plane
    // would retry that forever: a missing config is said as such, at start.
    const home = process.env['HOME'];
    if (
      options.kubeconfig === undefined &&
      (process.env['KUBECONFIG'] ?? '') === '' &&
      process.env['KUBERNETES_SERVICE_HOST'] === undefined &&
      !(home !== undefined && existsSync(join(home, '.kube', 'config'))) &&
      !existsSync(SERVICE_ACCOUNT_TOKEN)
    ) {
      throw new NodemeshError('NM_ERR_KUBE_CONFIG', 'no Kubernetes client config: no --kubeconfig, no $KUBECONFIG, no ~/.kube/config, and no in-cluster service account', {
        context: { path: '~/.kube/config' },
        hint: 'pass --kubeconfig FILE, set KUBECONFIG, or run in a pod with a service account',
      });
    }
    try {
      if (options.kubeconfig !== undefined) config.loadFromFile(options.kubeconfig);
      else if (process.env['KUBECONFIG'] === undefined && process.env['KUBERNETES_SERVICE_HOST'] !== undefined) config.loadFromCluster();
      else config.loadFromDefault();
    } catch (e) {
      // A YAML error's message goes on with an excerpt of the file: that is detail, not the message.
      const [first = '', ...rest] = (e as Error).message.split('\n');
      const excerpt = rest.join('\n').trim();
      throw new NodemeshError('NM_ERR_KUBE_CONFIG', `cannot load the Kubernetes client config: ${first}`, {
        context: { path: options.kubeconfig ?? process.env['KUBECONFIG'] ?? '~/.kube/config', ...(excerpt === '' ? {} : { detail: excerpt }) },
        hint: 'pass --kubeconfig FILE, set KUBECONFIG, or run in a pod with a service account',
        cause: e,
      });
    }
    const cluster = config.getCurrentCluster();
    if (!cluster) {
      throw new NodemeshError('NM_ERR_KUBE_CONFIG', 'the Kubernetes client config has no current cluster', {
        context: { path: options.kubeconfig ?? process.env['KUBECONFIG'] ?? '~/.kube/config' },
        hint: 'give a kubeconfig whose current-context names a cluster (kubectl config use-context NAME)',
      });
    }
    return new KubeApi(config, cluster.server.replace(/\/+$/, ''));
  }

  /** Every object of a resource, page by page, and the list's resourceVersion (where a watch starts). */
  async list(path: string, signal: AbortSignal): Promise<{ items: KubeObject[]; resourceVersion: string }> {
    const items: KubeObject[] = [];
    let cont = '';
    for (;;) {
      const query: Record<string, string> = { limit: String(PAGE_LIMIT) };
      if (cont !== '') query['continue'] = cont;
      const res = await this.send(path, query, signal);
      const body = await readJson(res, path);
      if (res.statusCode !== 200) throw statusError(path, res.statusCode ?? 0, body);
      const list = body as { items?: unknown; metadata?: { resourceVersion?: unknown; continue?: unknown } };
      if (!Array.isArray(list.items)) throw new KubeApiError(path, 200, 'BadList', `GET ${path}: the answer is not a list (no items)`);
      for (const item of list.items) items.push(item as KubeObject);
      cont = typeof list.metadata?.continue === 'string' ? list.metadata.continue : '';
      if (cont === '') return { items, resourceVersion: String(list.metadata?.resourceVersion ?? '') };
    }
  }

  /**
   * A watch from resourceVersion: onOpen once the server has accepted it (a 410 comes as an event
   * after that), onEvent for each event in order. Resolves when the server ends
   * the stream (its timeout; the caller watches again from the last version it saw), rejects on an
   * error status (410 when the version is too old), a dropped connection or a garbled line.
   */
  async watch(path: string, resourceVersion: string, timeoutSeconds: number, signal: AbortSignal, onEvent: (e: WatchEvent) => void, onOpen?: () => void): Promise<void> {
    const query = { watch: 'true', resourceVersion, allowWatchBookmarks: 'true', timeoutSeconds: String(timeoutSeconds) };
    const res = await this.send(path, query, signal);
    if (res.statusCode !== 200) throw statusError(path, res.statusCode ?? 0, await readJson(res, path).catch(() => undefined));
    onOpen?.();
    await new Promise<void>((resolve, reject) => {
      let buffered: Buffer[] = [];
      let size = 0;
      let failed = false;
      const fail = (e: Error): void => {
        if (failed) return;
        failed = true;
        res.destroy();
        reject(e);
      };
      const line = (bytes: Buffer): void => {
        if (bytes.length === 0) return;
        let event: WatchEvent;
        try {
          event = JSON.parse(bytes.toString('utf8')) as WatchEvent;
        } catch {
          throw new KubeApiError(path, 200, 'Garbled', `watch ${path}: a line is not JSON (${bytes.subarray(0, 80).toString('utf8')}...)`);
        }
        if (typeof event !== 'object' || event === null || typeof event.type !== 'string' || typeof event.object !== 'object' || event.object === null) {
          throw new KubeApiError(path, 200, 'Garbled', `watch ${path}: an event without type or object`);
        }
        onEvent(event);
      };
      res.on('data', (chunk: Buffer) => {
        if (failed) return;
        try {
          let start = 0;
          for (let nl = chunk.indexOf(10); nl !== -1; nl = chunk.indexOf(10, start)) {
            const piece = chunk.subarray(start, nl);
            line(buffered.length === 0 ? piece : Buffer.concat([...buffered, piece]));
            buffered = [];
            size = 0;
            start = nl + 1;
          }
          if (start < chunk.length) {
            buffered.push(chunk.subarray(start));
            size += chunk.length - start;
            if (size > MAX_LINE_BYTES) throw new KubeApiError(path, 200, 'Garbled', `watch ${path}: a line is longer than ${MAX_LINE_BYTES} bytes`);
          }
        } catch (e) {
          fail(e as Error);
        }
      });
      res.on('end', () => {
        if (failed) return;
        if (size > 0) fail(new KubeApiError(path, 200, 'Truncated', `watch ${path}: the stream ended inside an event`));
        else resolve();
      });
      const dropped = (why: string): void =>
        fail(size > 0 ? new KubeApiError(path, 0, 'Truncated', `watch ${path}: the connection dropped inside an event (${why})`) : new KubeApiError(path, 0, 'Dropped', `watch ${path}: the connection dropped (${why})`));
      res.on('error', (e: Error) => dropped((e as NodeJS.ErrnoException).code ?? e.message));
      res.on('aborted', () => dropped('aborted'));
    });
  }

  /** POSTs an object (a TokenReview, a Secret) and returns the API server's answer, or throws its Status (409 AlreadyExists included). */
  async create(path: string, body: unknown, signal: AbortSignal): Promise<unknown> {
    const res = await this.send(path, {}, signal, JSON.stringify(body), 'POST');
    const answer = await readJson(res, path);
    if (res.statusCode !== 200 && res.statusCode !== 201) throw statusError(path, res.statusCode ?? 0, answer);
    return answer;
  }

  /** One object, or undefined when there is none (404). */
  async get(path: string, signal: AbortSignal): Promise<KubeObject | undefined> {
    const res = await this.send(path, {}, signal);
    const answer = await readJson(res, path);
    if (res.statusCode === 404) return undefined;
    if (res.statusCode !== 200) throw statusError(path, res.statusCode ?? 0, answer);
    return answer as KubeObject;
  }

  /** PUTs an object whole; its metadata.resourceVersion makes it conditional (409 Conflict if it moved on). */
  async replace(path: string, body: KubeObject, signal: AbortSignal): Promise<KubeObject> {
    const res = await this.send(path, {}, signal, JSON.stringify(body), 'PUT');
    const answer = await readJson(res, path);
    if (res.statusCode !== 200) throw statusError(path, res.statusCode ?? 0, answer);
    return answer as KubeObject;
  }

  private async send(path: string, query: Record<string, string>, signal: AbortSignal, body?: string, method: 'GET' | 'POST' | 'PUT' = 'GET'): Promise<IncomingMessage> {
    const url = new URL(this.server + path);
    for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
    const headers: Record<string, string> = { Accept: 'application/json', ...(body === undefined ? {} : { 'Content-Type': 'application/json' }) };
    const options: RequestOptions & { headers: Record<string, string> } = { method, headers, signal };
    await this.config.applyToHTTPSOptions(options as Parameters<KubeConfig['applyToHTTPSOptions']>[0]);
    const request = url.protocol === 'http:' ? httpRequest : httpsRequest;
    return new Promise<IncomingMessage>((resolve, reject) => {
      const req = request(url, options, resolve);
      req.on('error', (e: NodeJS.ErrnoException) => reject(new KubeApiError(path, 0, e.code ?? e.name, `${method} ${url.pathname}: ${e.message}`)));
      req.end(body);
    });
  }
}

async function readJson(res: IncomingMessage, path: string): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  const text = Buffer.concat(chunks).toString('utf8');
  try {
    return JSON.parse(text) as unknown;
  } catch {
    throw new KubeApiError(path, res.statusCode ?? 0, 'Garbled', `GET ${path}: HTTP ${res.statusCode ?? 0}, the answer is not JSON`);
  }
}

/** An error from a Status object (`{kind: Status, code, reason, message}`) or a bare status code. */
function statusError(path: string, status: number, body: unknown): KubeApiError {
  const s = (typeof body === 'object' && body !== null ? body : {}) as { code?: unknown; reason?: unknown; message?: unknown };
  const code = typeof s.code === 'number' ? s.code : status;
  return new KubeApiError(path, code, typeof s.reason === 'string' ? s.reason : `HTTP${code}`, `${path}: HTTP ${code}${typeof s.message === 'string' ? `: ${s.message}` : ''}`);
}
