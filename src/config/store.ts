/**
 * The config of the mesh as read from a source (design.md section 5: a folder of Kubernetes
 * YAML, or the Kubernetes API), kept current: read, validated, last-good applied, watched. One
 * owner for it, shared by the agent's standalone mode and the control plane, so both serve exactly
 * the same objects from the same sources. Readers get an immutable MeshConfig; a new one replaces
 * it whole after every read.
 */
import { watch, type FSWatcher } from 'node:fs';

import type { Counter, Gauge } from '../shared/prom.js';
import { logger } from '../shared/log.js';
import { keepLastGood } from './last-good.js';
import { DEFAULT_MESH, type MeshSettings, type Namespace } from './mesh.js';
import type { ConfigIssue, Service } from './service.js';
import type { ConfigObjects } from './objects.js';
import { readConfigDir, type ConfigDirCache } from './source-dir.js';
import { checkRouteRefs, type ServiceRoute } from './route.js';
import type { TrafficPolicy } from './traffic-policy.js';
import type { AuthorizationPolicy, PeerAuthentication } from './security.js';

const log = logger('config');

export interface MeshConfig {
  readonly services: ReadonlyArray<Service>;
  readonly trafficPolicies: ReadonlyArray<TrafficPolicy>;
  /** HTTPRoutes and GRPCRoutes whose parents and backends exist (checked against services). */
  readonly routes: ReadonlyArray<ServiceRoute>;
  readonly namespaces: ReadonlyMap<string, Namespace>;
  readonly peerAuthentications: ReadonlyArray<PeerAuthentication>;
  readonly authorizationPolicies: ReadonlyArray<AuthorizationPolicy>;
  readonly mesh: MeshSettings;
}

export const EMPTY_CONFIG: MeshConfig = Object.freeze({ services: [], trafficPolicies: [], routes: [], namespaces: new Map(), peerAuthentications: [], authorizationPolicies: [], mesh: DEFAULT_MESH });

/** What the last read rejected, with whether the object's last good version still serves. */
export interface RejectedObject extends ConfigIssue {
  readonly keptLastGood: boolean;
}

/** Kinds counted in metrics: the config kinds plus "yaml" for documents that do not parse. */
export const CONFIG_KINDS = ['Service', 'TrafficPolicy', 'HTTPRoute', 'GRPCRoute', 'Namespace', 'ConfigMap', 'AuthorizationPolicy', 'PeerAuthentication', 'yaml', 'other'] as const;

export interface ConfigStoreEvents {
  /** After every read: the config now served and what was rejected. */
  onLoad(config: MeshConfig, rejected: ReadonlyArray<RejectedObject>): void;
}

/** Where config comes from: objects validated one by one, and a signal when they change. */
export interface ConfigReader {
  /** Names the source in logs: a folder, a Kubernetes API server. */
  readonly description: string;
  /** False until the source has its first complete view (an API source that has not listed yet): nothing is pushed then. */
  synced(): boolean;
  /** What the source holds now, each object validated on its own. */
  read(): Promise<ConfigObjects>;
  /** From now on, calls onChange (a few at a time are folded together by the reader) after changes. */
  watch(onChange: () => void): void;
  close(): void;
}

/** The folder source: every *.yaml/*.yml file, re-read shortly after any change in the folder. */
export class ConfigDirReader implements ConfigReader {
  private watcher: FSWatcher | undefined;
  private timer: NodeJS.Timeout | undefined;
  private readonly parsed: ConfigDirCache = new Map();

  constructor(readonly dir: string) {}

  get description(): string {
    return this.dir;
  }

  synced(): boolean {
    return true;
  }

  read(): Promise<ConfigObjects> {
    return readConfigDir(this.dir, this.parsed);
  }

  watch(onChange: () => void): void {
    try {
      this.watcher = watch(this.dir, () => {
        clearTimeout(this.timer);
        this.timer = setTimeout(onChange, 100);
      });
    } catch (e) {
      log.warn({ err: e, dir: this.dir }, 'cannot watch the config folder; edits need a restart');
    }
  }

  close(): void {
    clearTimeout(this.timer);
    this.watcher?.close();
  }
}

export class ConfigStore {
  private config: MeshConfig = EMPTY_CONFIG;
  private rejected: ReadonlyArray<RejectedObject> = [];
  private files: ReadonlyMap<string, string> = new Map();
  private loaded = false;
  private reading: Promise<void> = Promise.resolve();

  constructor(
    readonly reader: ConfigReader,
    private readonly events: ConfigStoreEvents,
  ) {}

  current(): MeshConfig {
    return this.config;
  }

  lastRejected(): ReadonlyArray<RejectedObject> {
    return this.rejected;
  }

  hasLoaded(): boolean {
    return this.loaded;
  }

  /** Reads the source now (reads are serialised). A rejected object keeps its last good version. */
  load(): Promise<void> {
    this.reading = this.reading.then(() => this.read());
    return this.reading;
  }

  /** Reads again after every change of the source. */
  watch(): void {
    this.reader.watch(() => {
      this.load().catch((e: unknown) => log.error({ err: e, source: this.reader.description }, 'config reload failed; the last config keeps serving'));
    });
  }

  close(): void {
    this.reader.close();
  }

  private async read(): Promise<void> {
    const read = await this.reader.read();
    const previous = this.config;
    const services = keepLastGood('Service', read.services, previous.services, this.files, read.issues);
    const policies = keepLastGood('TrafficPolicy', read.trafficPolicies, previous.trafficPolicies, this.files, read.issues);
    // A route is valid only with the Services it names: checked against those that will serve.
    const byName = new Map(services.objects.map((s) => [`${s.namespace}/${s.name}`, s]));
    const issues = [...read.issues];
    const routes = read.routes.filter((r) => {
      const bad = checkRouteRefs(r, byName);
      const object = `${r.kind} ${r.namespace}/${r.name}`;
      if (bad) issues.push({ file: read.files.get(object) ?? '', object, ...bad });
      return !bad;
    });
    const byKind = (k: ServiceRoute['kind']) => (r: ServiceRoute): boolean => r.kind === k;
    const http = keepLastGood('HTTPRoute', routes.filter(byKind('HTTPRoute')), previous.routes.filter(byKind('HTTPRoute')), this.files, issues);
    const grpc = keepLastGood('GRPCRoute', routes.filter(byKind('GRPCRoute')), previous.routes.filter(byKind('GRPCRoute')), this.files, issues);
    // A policy that is rejected on update keeps its last good version: a typo must not open access.
    const peer = keepLastGood('PeerAuthentication', read.peerAuthentications, previous.peerAuthentications, this.files, issues);
    const authz = keepLastGood('AuthorizationPolicy', read.authorizationPolicies, previous.authorizationPolicies, this.files, issues);
    const kept = new Set([...services.kept, ...policies.kept, ...http.kept, ...grpc.kept, ...peer.kept, ...authz.kept]);
    const files = new Map(read.files);
    for (const id of kept) {
      const file = this.files.get(id);
      if (file !== undefined) files.set(id, file);
    }
    // An invalid mesh ConfigMap keeps the last good settings, like any other object.
    const meshRejected = issues.some((i) => i.object.startsWith('ConfigMap '));
    const config: MeshConfig = Object.freeze({
      services: services.objects,
      trafficPolicies: policies.objects,
      routes: [...http.objects, ...grpc.objects],
      namespaces: new Map(read.namespaces.map((n) => [n.name, n])),
      peerAuthentications: peer.objects,
      authorizationPolicies: authz.objects,
      mesh: read.mesh ?? (meshRejected ? previous.mesh : DEFAULT_MESH),
    });
    this.files = files;
    this.config = config;
    const before = new Set(this.rejected.map(rejectionKey));
    this.rejected = issues.map((i) => ({ ...i, keptLastGood: kept.has(i.object) || (i.object.startsWith('ConfigMap ') && read.mesh === undefined) }));
    this.loaded = true;
    // One line per rejection when it appears (or changes), not again at every read: a watched
    // API source reads after every event, and the same refusal a thousand times hides new ones.
    for (const r of this.rejected) {
      if (before.has(rejectionKey(r))) continue;
      log.error({ file: r.file, object: r.object, field: r.field, keptLastGood: r.keptLastGood }, `config rejected: ${r.message}`);
    }
    const now = new Set(this.rejected.map(rejectionKey));
    for (const key of before) if (!now.has(key)) log.info({ rejection: key }, 'config rejection resolved');
    this.events.onLoad(config, this.rejected);
  }
}

const rejectionKey = (r: RejectedObject): string => `${r.file}|${r.object}|${r.field}|${r.message}|${r.keptLastGood}`;

/** The number of objects served, by kind (the agent's and the control plane's nodemesh_*config_objects). */
export function recordConfigObjects(config: MeshConfig, objects: Gauge<'kind'>): void {
  objects.set({ kind: 'Service' }, config.services.length);
  objects.set({ kind: 'TrafficPolicy' }, config.trafficPolicies.length);
  objects.set({ kind: 'HTTPRoute' }, config.routes.filter((r) => r.kind === 'HTTPRoute').length);
  objects.set({ kind: 'GRPCRoute' }, config.routes.filter((r) => r.kind === 'GRPCRoute').length);
  objects.set({ kind: 'Namespace' }, config.namespaces.size);
  objects.set({ kind: 'PeerAuthentication' }, config.peerAuthentications.length);
  objects.set({ kind: 'AuthorizationPolicy' }, config.authorizationPolicies.length);
}

/** Counts a read's rejections: every one (errors counter) and those of this read, by kind (gauge). */
export function recordRejections(rejected: ReadonlyArray<RejectedObject>, errors: Counter<'kind'>, current: Gauge<'kind'>): void {
  const counts = new Map<string, number>(CONFIG_KINDS.map((k) => [k, 0]));
  for (const r of rejected) {
    const kind = rejectedKind(r);
    counts.set(kind, (counts.get(kind) ?? 0) + 1);
    errors.inc({ kind });
  }
  for (const [kind, n] of counts) current.set({ kind }, n);
}

/** The metrics kind of a rejected object: its Kind, or "yaml" for a document that did not parse. */
export function rejectedKind(issue: Pick<ConfigIssue, 'object'>): (typeof CONFIG_KINDS)[number] {
  if (issue.object.startsWith('document ')) return 'yaml';
  const kind = issue.object.split(' ')[0] ?? '';
  // A bounded label: any kind nodemesh does not know is "other" (the log names it).
  return (CONFIG_KINDS as ReadonlyArray<string>).includes(kind) ? (kind as (typeof CONFIG_KINDS)[number]) : 'other';
}
