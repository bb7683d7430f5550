/**
 * The Kubernetes config source (design.md section 5, `nodemesh control-plane --source
 * kubernetes`): list + watch of the kinds the config model has, each object validated by the same
 * code as a file's (src/config/objects.ts), and the cluster's Pods as the mesh's workloads.
 * Until every resource has been listed once the source is not synced, and the control plane
 * pushes nothing: an empty copy must never reach an agent as "no Services".
 */
import { mergeObjects, parseObject, type ConfigObjects, type FileContents } from '../../config/objects.js';
import type { ConfigIssue } from '../../config/service.js';
import type { ConfigReader } from '../../config/store.js';
import { TRAFFIC_POLICY_API } from '../../config/traffic-policy.js';
import { MESH_CONFIG_NAME, ROOT_NAMESPACE } from '../../config/mesh.js';
import { Counter, type Registry } from '../../shared/prom.js';
import type { WireWorkload } from '../../protocol/discovery.js';
import { KubeApi, type KubeApiOptions, type KubeObject } from '../../kube/api.js';
import { Reflector, type ReflectorMetrics } from '../../kube/reflector.js';

/** Many events in a burst (a rollout) become one read. */
const DEBOUNCE_MS = 20;

interface ConfigResource {
  readonly resource: string;
  /** Defined by a CRD that may not be installed (see ReflectorOptions.optional). */
  readonly optional?: boolean;
  readonly path: string;
  /** List items carry no apiVersion/kind; the parser needs them. */
  readonly apiVersion: string;
  readonly kind: string;
}

const CONFIG_RESOURCES: ReadonlyArray<ConfigResource> = [
  { resource: 'namespaces', path: '/api/v1/namespaces', apiVersion: 'v1', kind: 'Namespace' },
  // Only nodemesh-system/nodemesh configures the mesh (whoever may write ConfigMaps in another
  // namespace may not change mesh-wide settings), and RBAC can grant exactly that one by name.
  { resource: 'configmaps', path: `/api/v1/namespaces/${ROOT_NAMESPACE}/configmaps?fieldSelector=metadata.name%3D${MESH_CONFIG_NAME}`, apiVersion: 'v1', kind: 'ConfigMap' },
  { resource: 'services', path: '/api/v1/services', apiVersion: 'v1', kind: 'Service' },
  { resource: 'trafficpolicies', path: `/apis/${TRAFFIC_POLICY_API}/trafficpolicies`, apiVersion: TRAFFIC_POLICY_API, kind: 'TrafficPolicy', optional: true },
  { resource: 'httproutes', path: '/apis/gateway.networking.k8s.io/v1/httproutes', apiVersion: 'gateway.networking.k8s.io/v1', kind: 'HTTPRoute', optional: true },
  { resource: 'grpcroutes', path: '/apis/gateway.networking.k8s.io/v1/grpcroutes', apiVersion: 'gateway.networking.k8s.io/v1', kind: 'GRPCRoute', optional: true },
  // Not enforced yet: watched so that each one is reported (refused), never silently ignored.
  { resource: 'authorizationpolicies', path: '/apis/security.nodemesh.io/v1/authorizationpolicies', apiVersion: 'security.nodemesh.io/v1', kind: 'AuthorizationPolicy', optional: true },
  { resource: 'peerauthentications', path: '/apis/security.nodemesh.io/v1/peerauthentications', apiVersion: 'security.nodemesh.io/v1', kind: 'PeerAuthentication', optional: true },
];

/**
 * Services without a selector get their endpoints from their EndpointSlices (the slices of a
 * selector Service are computed by Kubernetes from the same ready Pods nodemesh reads, so those
 * are not needed). Each such endpoint becomes a workload labelled with this, and the Service is
 * given it as its selector: one endpoint model for both kinds of Service.
 */
export const SLICE_SERVICE_LABEL = 'endpointslice.nodemesh.io/service';
const SERVICE_NAME_LABEL = 'kubernetes.io/service-name';

/** Pods that are the mesh's workloads, by node, from the API (instead of the agents' reports). */
export interface PodInventory {
  watchPods(onChange: (pods: ReadonlyArray<WireWorkload>) => void): void;
}

export interface KubernetesSourceOptions extends KubeApiOptions {
  readonly registry: Registry;
  /** For tests: the server's watch timeout (default 300 s, randomised up to twice that). */
  readonly watchTimeoutSeconds?: number;
}

export class KubernetesSource implements ConfigReader, PodInventory {
  readonly api: KubeApi;
  private readonly config: Array<{ spec: ConfigResource; reflector: Reflector }>;
  private readonly pods: Reflector;
  private readonly slices: Reflector;
  private readonly invalidPods: Counter<'reason'>;
  private onConfig: (() => void) | undefined;
  private onPods: ((pods: ReadonlyArray<WireWorkload>) => void) | undefined;
  private configTimer: NodeJS.Timeout | undefined;
  /** Parse results by resource/namespace/name, reused while the object is unchanged. */
  private readonly parsed = new Map<string, { signature: string; result: ReturnType<typeof parseObject> }>();
  /** What selector-less Services take from the slices (ports): slice events that do not change it are no config change. */
  private slicePorts = '';
  private podsTimer: NodeJS.Timeout | undefined;

  constructor(options: KubernetesSourceOptions) {
    this.api = KubeApi.load(options);
    const registers = [options.registry];
    const metrics: ReflectorMetrics = {
      events: new Counter({ name: 'nodemesh_cp_kube_watch_events_total', help: 'Watch events from the Kubernetes API, by resource and type', labelNames: ['resource', 'type'], registers }),
      lists: new Counter({ name: 'nodemesh_cp_kube_lists_total', help: 'Full lists of a resource, by reason (initial, expired: after 410 Gone, retry)', labelNames: ['resource', 'reason'], registers }),
      errors: new Counter({ name: 'nodemesh_cp_kube_errors_total', help: 'Failed lists and watches of the Kubernetes API, by resource and reason', labelNames: ['resource', 'reason'], registers }),
    };
    this.invalidPods = new Counter({ name: 'nodemesh_cp_kube_pods_skipped_total', help: 'Pod objects from the API that could not be read as workloads, by reason', labelNames: ['reason'], registers });
    const timeout = options.watchTimeoutSeconds === undefined ? {} : { watchTimeoutSeconds: options.watchTimeoutSeconds };
    // A Service that gains or loses its selector changes which slices are its endpoints: workloads too.
    const onConfig = (spec: ConfigResource) => (): void => {
      this.configChanged();
      if (spec.kind === 'Service') this.podsChanged();
    };
    this.config = CONFIG_RESOURCES.map((spec) => ({ spec, reflector: new Reflector(this.api, { resource: spec.resource, path: spec.path, optional: spec.optional === true, ...timeout }, metrics, onConfig(spec)) }));
    this.pods = new Reflector(this.api, { resource: 'pods', path: '/api/v1/pods', ...timeout }, metrics, () => this.podsChanged());
    // Slices change both a selector-less Service (its ports) and the workloads (its endpoints).
    // Slices change the workloads (endpoints) and, rarely, the config (a selector-less Service's
    // ports): both are worked out in the debounced pass of podsChanged.
    this.slices = new Reflector(this.api, { resource: 'endpointslices', path: '/apis/discovery.k8s.io/v1/endpointslices', ...timeout }, metrics, () => this.podsChanged());
    for (const { reflector } of this.config) reflector.start();
    this.pods.start();
    this.slices.start();
  }

  get description(): string {
    return `Kubernetes API ${this.api.server}`;
  }

  synced(): boolean {
    return this.config.every((c) => c.reflector.hasSynced()) && this.pods.hasSynced() && this.slices.hasSynced();
  }

  async read(): Promise<ConfigObjects> {
    const slices = this.sliceEndpoints();
    const seen = new Set<string>();
    const origins = this.config.map(({ spec, reflector }) => {
      const file = `kubernetes:${spec.resource}`;
      const objects: Array<FileContents['objects'][number]> = [];
      const issues: ConfigIssue[] = [];
      for (const raw of reflector.list()) {
        const o = spec.kind === 'Service' ? withSliceEndpoints(raw, slices) : raw;
        // An object is parsed again only when it changed (its resourceVersion, or for a
        // selector-less Service what its slices add): a big cluster's reads stay cheap.
        const key = `${spec.resource}/${o.metadata?.namespace ?? ''}/${o.metadata?.name ?? ''}`;
        const signature = `${o.metadata?.resourceVersion ?? ''}|${o === raw ? '' : JSON.stringify(o['spec'])}`;
        let parsed = this.parsed.get(key);
        if (parsed?.signature !== signature || parsed.signature === '|') {
          parsed = { signature, result: parseObject(file, { ...o, apiVersion: spec.apiVersion, kind: spec.kind }) };
          this.parsed.set(key, parsed);
        }
        seen.add(key);
        const result = parsed.result;
        if ('issue' in result) issues.push(result.issue);
        else if (result.object) objects.push(result.object);
      }
      return { file, contents: { objects, issues } };
    });
    for (const key of this.parsed.keys()) if (!seen.has(key)) this.parsed.delete(key);
    return mergeObjects(origins);
  }

  watch(onChange: () => void): void {
    this.onConfig = onChange;
  }

  watchPods(onChange: (pods: ReadonlyArray<WireWorkload>) => void): void {
    this.onPods = onChange;
    if (this.pods.hasSynced()) this.podsChanged();
  }

  close(): void {
    clearTimeout(this.configTimer);
    clearTimeout(this.podsTimer);
    for (const { reflector } of this.config) reflector.stop();
    this.pods.stop();
    this.slices.stop();
  }

  private configChanged(): void {
    if (this.configTimer || !this.config.every((c) => c.reflector.hasSynced())) return;
    this.configTimer = setTimeout(() => {
      this.configTimer = undefined;
      this.onConfig?.();
    }, DEBOUNCE_MS);
  }

  /** The ready endpoints of selector-less Services' slices, by Service ("ns/name"). */
  private sliceEndpoints(): Map<string, { ports: Map<string, number>; endpoints: WireWorkload[] }> {
    const selectorless = new Set(
      (this.config.find((c) => c.spec.kind === 'Service')?.reflector.list() ?? [])
        .filter((svc) => {
          const sel = (svc['spec'] as { selector?: unknown } | undefined)?.selector;
          return sel === undefined || sel === null || (typeof sel === 'object' && Object.keys(sel).length === 0);
        })
        .map((svc) => `${svc.metadata?.namespace ?? ''}/${svc.metadata?.name ?? ''}`),
    );
    const out = new Map<string, { ports: Map<string, number>; endpoints: WireWorkload[] }>();
    for (const slice of this.slices.list()) {
      const ns = slice.metadata?.namespace ?? '';
      const labels = (slice.metadata as { labels?: Record<string, string> } | undefined)?.labels ?? {};
      const svc = labels[SERVICE_NAME_LABEL];
      if (!svc || !selectorless.has(`${ns}/${svc}`)) continue;
      const family = slice['addressType'];
      if (family !== 'IPv4' && family !== 'IPv6') continue;
      const entry = out.get(`${ns}/${svc}`) ?? { ports: new Map<string, number>(), endpoints: [] as WireWorkload[] };
      out.set(`${ns}/${svc}`, entry);
      for (const p of (slice['ports'] as Array<{ name?: string; port?: number }> | undefined) ?? []) {
        if (typeof p.port === 'number' && !entry.ports.has(p.name ?? '')) entry.ports.set(p.name ?? '', p.port);
      }
      for (const e of (slice['endpoints'] as Array<{ addresses?: string[]; conditions?: { ready?: boolean }; targetRef?: { name?: string }; nodeName?: string }> | undefined) ?? []) {
        // Ready unless said otherwise (Kubernetes: an unknown state counts as ready).
        if (e.conditions?.ready === false) continue;
        for (const ip of e.addresses ?? []) {
          entry.endpoints.push({
            uid: `${ns}/${svc}/${ip}`,
            namespace: ns,
            name: e.targetRef?.name ?? `${svc}-${ip.replace(/[.:]/g, '-')}`,
            serviceAccount: 'default',
            labels: { [SLICE_SERVICE_LABEL]: svc },
            ip4: family === 'IPv4' ? ip : '',
            ip6: family === 'IPv6' ? ip : '',
            node: e.nodeName ?? '',
          });
        }
      }
    }
    return out;
  }

  private podsChanged(): void {
    if (this.podsTimer || !this.pods.hasSynced() || !this.slices.hasSynced()) return;
    this.podsTimer = setTimeout(() => {
      this.podsTimer = undefined;
      const pods: WireWorkload[] = [];
      for (const o of this.pods.list()) {
        const w = podWorkload(o);
        if (typeof w === 'string') {
          if (w !== 'not_running') this.invalidPods.inc({ reason: w });
        } else pods.push(w);
      }
      const slices = this.sliceEndpoints();
      for (const { endpoints } of slices.values()) pods.push(...endpoints);
      this.onPods?.(pods);
      // Slices change with every pod that comes and goes; the config only when a selector-less
      // Service's ports do.
      const ports = JSON.stringify([...slices].map(([k, v]) => [k, [...v.ports]]));
      if (ports !== this.slicePorts) {
        this.slicePorts = ports;
        this.configChanged();
      }
    }, DEBOUNCE_MS);
  }
}

/** A selector-less Service with slices: selects its slice endpoints, and its target ports are the slices' ports. */
function withSliceEndpoints(svc: KubeObject, slices: ReadonlyMap<string, { ports: ReadonlyMap<string, number> }>): KubeObject {
  const found = slices.get(`${svc.metadata?.namespace ?? ''}/${svc.metadata?.name ?? ''}`);
  if (!found) return svc;
  const spec = (svc['spec'] ?? {}) as { ports?: Array<Record<string, unknown>> };
  const ports = (spec.ports ?? []).map((p) => {
    const target = found.ports.get(typeof p['name'] === 'string' ? p['name'] : '');
    return target === undefined ? p : { ...p, targetPort: target };
  });
  return { ...svc, spec: { ...spec, ports, selector: { [SLICE_SERVICE_LABEL]: svc.metadata?.name ?? '' } } };
}

/**
 * A Pod object as a workload: scheduled, running, with an address, ready and not being deleted
 * (what the EndpointSlice controller counts as a ready endpoint). Otherwise why not.
 */
export function podWorkload(o: KubeObject): WireWorkload | 'not_running' | 'invalid' {
  const meta = o.metadata;
  const spec = (o['spec'] ?? {}) as { nodeName?: unknown; serviceAccountName?: unknown };
  const status = (o['status'] ?? {}) as { phase?: unknown; podIP?: unknown; podIPs?: unknown; conditions?: unknown };
  if (typeof meta?.name !== 'string' || typeof meta.namespace !== 'string' || typeof meta.uid !== 'string') return 'invalid';
  if ((meta as { deletionTimestamp?: unknown }).deletionTimestamp !== undefined) return 'not_running';
  if (status.phase !== 'Running' || typeof spec.nodeName !== 'string') return 'not_running';
  const conditions = Array.isArray(status.conditions) ? (status.conditions as Array<{ type?: unknown; status?: unknown }>) : [];
  if (!conditions.some((c) => c.type === 'Ready' && c.status === 'True')) return 'not_running';
  const ips = Array.isArray(status.podIPs) ? (status.podIPs as Array<{ ip?: unknown }>).map((p) => p.ip).filter((ip): ip is string => typeof ip === 'string') : typeof status.podIP === 'string' ? [status.podIP] : [];
  const ip4 = ips.find((ip) => !ip.includes(':')) ?? '';
  const ip6 = ips.find((ip) => ip.includes(':')) ?? '';
  if (ip4 === '' && ip6 === '') return 'not_running';
  const labels = (meta as { labels?: unknown }).labels;
  return {
    uid: meta.uid,
    namespace: meta.namespace,
    name: meta.name,
    serviceAccount: typeof spec.serviceAccountName === 'string' ? spec.serviceAccountName : 'default',
    labels: typeof labels === 'object' && labels !== null ? Object.fromEntries(Object.entries(labels).filter(([, v]) => typeof v === 'string')) as Record<string, string> : {},
    ip4,
    ip6,
    node: spec.nodeName,
  };
}

// What else needs the API server comes with this (lazily loaded) module: the agents'
// authenticator and the CA's Secret.
export { TokenReviewAuthenticator } from './token-review.js';
export { CaSecret } from './ca-secret.js';
