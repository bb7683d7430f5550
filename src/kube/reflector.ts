/**
 * A local copy of one Kubernetes resource kept current by list + watch (client-go's Reflector):
 * list, then watch from the list's resourceVersion with bookmarks; a watch that ends is resumed
 * from the last version seen; 410 Gone (the version is too old) lists again and replaces the copy
 * whole; any other failure keeps the copy serving and retries with jittered backoff.
 */
import { logger } from '../shared/log.js';
import type { Counter } from '../shared/prom.js';
import { KubeApiError, type KubeApi, type KubeObject, type WatchEvent } from './api.js';

const log = logger('kubernetes');

const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 30_000;

export interface ReflectorMetrics {
  readonly events: Counter<'resource' | 'type'>;
  readonly lists: Counter<'resource' | 'reason'>;
  readonly errors: Counter<'resource' | 'reason'>;
}

export interface ReflectorOptions {
  /** Short name for logs and metrics ("services"). */
  readonly resource: string;
  /** The collection path, all namespaces: /api/v1/services, /apis/networking.nodemesh.io/v1alpha1/trafficpolicies. */
  readonly path: string;
  /** Server-side watch timeout; a random value around it spreads the re-watches of many resources. */
  readonly watchTimeoutSeconds?: number;
  /**
   * A custom resource whose CRD may not be installed: 404 counts as "no objects" (synced, so the
   * rest of the config is served) and the list is tried again every OPTIONAL_RETRY_MS.
   */
  readonly optional?: boolean;
}

const OPTIONAL_RETRY_MS = 30_000;

export class Reflector {
  private readonly objects = new Map<string, KubeObject>();
  private resourceVersion = '';
  private synced = false;
  private readonly abort = new AbortController();
  private failures = 0;
  /** The failure the copy is being retried after, until a list or watch works again. */
  private lastError: string | undefined;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    private readonly api: KubeApi,
    private readonly options: ReflectorOptions,
    private readonly metrics: ReflectorMetrics,
    /** After every change of the copy (a list, an event). */
    private readonly onChange: () => void,
  ) {}

  get resource(): string {
    return this.options.resource;
  }

  /** True once a list has succeeded: before that the copy is empty, not "no objects". */
  hasSynced(): boolean {
    return this.synced;
  }

  /** What keeps the copy from being current (reason and message), or undefined while it is. */
  failing(): string | undefined {
    return this.lastError;
  }

  /** The objects now, in namespace/name order. */
  list(): KubeObject[] {
    return [...this.objects.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, o]) => o);
  }

  start(): void {
    void this.run('initial');
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.abort.abort();
  }

  private async run(listReason: string | undefined): Promise<void> {
    let relist = listReason;
    while (!this.stopped) {
      try {
        if (relist !== undefined) await this.relist(relist);
        relist = undefined;
        const timeout = Math.round((this.options.watchTimeoutSeconds ?? 300) * (1 + Math.random()));
        // Accepted: whatever failed before is over (no event may come for a long time).
        await this.api.watch(this.options.path, this.resourceVersion, timeout, this.abort.signal, (e) => this.event(e), () => (this.lastError = undefined));
        // The server ended the watch (its timeout): resume from the last version seen.
        this.failures = 0;
      } catch (e) {
        if (this.stopped) return;
        const err = e instanceof KubeApiError ? e : new KubeApiError(this.options.path, 0, 'Error', (e as Error).message);
        if (err.expired) {
          log.info({ resource: this.resource, resourceVersion: this.resourceVersion }, 'watch version too old (410 Gone); listing again');
          relist = 'expired';
          continue;
        }
        if (err.status === 404 && this.options.optional) {
          if (!this.synced || this.objects.size > 0) {
            log.warn({ resource: this.resource, path: this.options.path }, 'the API server does not serve this resource (CRD not installed?): no objects of it until it does');
            this.objects.clear();
            this.synced = true;
            this.onChange();
          }
          relist = 'retry';
          await new Promise<void>((resolve) => {
            this.timer = setTimeout(resolve, OPTIONAL_RETRY_MS);
          });
          continue;
        }
        this.metrics.errors.inc({ resource: this.resource, reason: errorReason(err) });
        this.lastError = `${errorReason(err)}: ${err.message}`;
        this.failures++;
        const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this.failures - 1, 10)) * (0.5 + Math.random() / 2);
        log.warn({ resource: this.resource, status: err.status, reason: err.reason, retryInMs: Math.round(delay), synced: this.synced }, `${err.message}; the last objects keep serving`);
        // Without a list yet, or after a list failed, list again; otherwise watch on from where we were.
        if (!this.synced || relist !== undefined) relist = relist ?? 'retry';
        await new Promise<void>((resolve) => {
          this.timer = setTimeout(resolve, delay);
        });
      }
    }
  }

  private async relist(reason: string): Promise<void> {
    const { items, resourceVersion } = await this.api.list(this.options.path, this.abort.signal);
    this.metrics.lists.inc({ resource: this.resource, reason });
    this.objects.clear();
    for (const o of items) this.objects.set(keyOf(o), o);
    this.resourceVersion = resourceVersion;
    this.synced = true;
    this.lastError = undefined;
    log.info({ resource: this.resource, objects: items.length, resourceVersion, reason }, 'listed');
    this.onChange();
  }

  private event(e: WatchEvent): void {
    this.metrics.events.inc({ resource: this.resource, type: e.type });
    if (e.type !== 'ERROR') this.lastError = undefined;
    if (e.type === 'ERROR') {
      const status = e.object as { code?: unknown; reason?: unknown; message?: unknown };
      const code = typeof status.code === 'number' ? status.code : 0;
      throw new KubeApiError(this.options.path, code, typeof status.reason === 'string' ? status.reason : 'WatchError', `watch ${this.options.path}: ${String(status.message ?? 'error event')}`);
    }
    const rv = e.object.metadata?.resourceVersion;
    if (typeof rv === 'string' && rv !== '') this.resourceVersion = rv;
    if (e.type === 'BOOKMARK') return;
    const key = keyOf(e.object);
    if (e.type === 'DELETED') this.objects.delete(key);
    else this.objects.set(key, e.object);
    this.onChange();
  }
}

function keyOf(o: KubeObject): string {
  return `${o.metadata?.namespace ?? ''}/${o.metadata?.name ?? ''}`;
}

/** A bounded label: the HTTP status class or the socket error. */
function errorReason(e: KubeApiError): string {
  if (e.reason === 'Garbled' || e.reason === 'BadList') return 'garbled';
  if (e.status === 0) return e.reason === 'Dropped' || e.reason === 'Truncated' || /^E[A-Z]+$/.test(e.reason) ? 'connection' : 'error';
  if (e.status === 401 || e.status === 403) return 'unauthorized';
  return e.status >= 500 ? 'server_error' : 'client_error';
}
