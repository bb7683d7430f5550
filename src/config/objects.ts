/**
 * One Kubernetes object in, one validated config object (or one issue naming its field) out;
 * then the objects of a whole source merged into ConfigObjects. Both config sources use this:
 * the folder of YAML (a file's documents) and the Kubernetes API (a watch cache's objects), so
 * an object means the same whichever way it arrives.
 */
import { MESH_CONFIG_NAME, parseMeshConfig, parseNamespace, type MeshSettings, type Namespace } from './mesh.js';
import { ObjectInvalid, parseService, type ConfigIssue, type Service } from './service.js';
import { GATEWAY_API, ROUTE_KINDS, parseRoute, type ServiceRoute } from './route.js';
import { TRAFFIC_POLICY_API, parseTrafficPolicy, type TrafficPolicy } from './traffic-policy.js';
import { SECURITY_API, parseAuthorizationPolicy, parsePeerAuthentication, type AuthorizationPolicy, type PeerAuthentication } from './security.js';

const TRAFFIC_POLICY = `${TRAFFIC_POLICY_API}/TrafficPolicy`;

export interface ConfigObjects {
  readonly services: ReadonlyArray<Service>;
  readonly trafficPolicies: ReadonlyArray<TrafficPolicy>;
  readonly routes: ReadonlyArray<ServiceRoute>;
  readonly namespaces: ReadonlyArray<Namespace>;
  readonly peerAuthentications: ReadonlyArray<PeerAuthentication>;
  readonly authorizationPolicies: ReadonlyArray<AuthorizationPolicy>;
  /** From the `nodemesh` ConfigMap, if there is one (and it is valid). */
  readonly mesh: MeshSettings | undefined;
  readonly issues: ReadonlyArray<ConfigIssue>;
  /** Where each accepted object came from (a file, or "kubernetes:<resource>"), by object id ("Service ns/name"). */
  readonly files: ReadonlyMap<string, string>;
}


export type ConfigObject = { readonly id: string } & (
  | { readonly service: Service }
  | { readonly policy: TrafficPolicy }
  | { readonly route: ServiceRoute }
  | { readonly namespace: Namespace }
  | { readonly peerAuthentication: PeerAuthentication }
  | { readonly authorizationPolicy: AuthorizationPolicy }
  | { readonly mesh: MeshSettings }
);

/** What one origin (a file, a watched resource) holds, before the objects of all origins are merged. */
export interface FileContents {
  readonly objects: ReadonlyArray<ConfigObject>;
  readonly issues: ReadonlyArray<ConfigIssue>;
}

/**
 * Validates one object. `object` is undefined for objects that are not the mesh's business
 * (ConfigMaps other than `nodemesh`).
 */
export function parseObject(origin: string, obj: Record<string, unknown>): { object: ConfigObject | undefined } | { issue: ConfigIssue } {
  const kind = `${String(obj['apiVersion'])}/${String(obj['kind'])}`;
  const meta = obj['metadata'] as { name?: unknown; namespace?: unknown } | undefined;
  const id = `${String(obj['kind'])} ${String(meta?.namespace ?? 'default')}/${String(meta?.name ?? '?')}`;
  try {
    if (kind === 'v1/Namespace') return { object: { id, namespace: parseNamespace(obj) } };
    if (kind === 'v1/ConfigMap') return { object: meta?.name === MESH_CONFIG_NAME ? { id, mesh: parseMeshConfig(obj) } : undefined };
    if (kind === 'v1/Service') return { object: { id, service: parseService(obj) } };
    if (kind === TRAFFIC_POLICY) return { object: { id, policy: parseTrafficPolicy(obj) } };
    if (obj['apiVersion'] === GATEWAY_API && (ROUTE_KINDS as ReadonlyArray<unknown>).includes(obj['kind'])) return { object: { id, route: parseRoute(obj) } };
    if (kind === `${SECURITY_API}/PeerAuthentication`) return { object: { id, peerAuthentication: parsePeerAuthentication(obj) } };
    if (kind === `${SECURITY_API}/AuthorizationPolicy`) return { object: { id, authorizationPolicy: parseAuthorizationPolicy(obj) } };
    return {
      issue: {
        file: origin,
        object: id,
        field: 'kind',
        message: `${kind} is not a supported kind (supported: v1 Service, Namespace, the nodemesh ConfigMap, ${TRAFFIC_POLICY}, ${GATEWAY_API} HTTPRoute and GRPCRoute, ${SECURITY_API} PeerAuthentication and AuthorizationPolicy)`,
      },
    };
  } catch (e) {
    if (!(e instanceof ObjectInvalid)) throw e;
    return { issue: { file: origin, object: id, field: e.field, message: e.message } };
  }
}

/** The objects of every origin, in the order given: a second object of the same id is an issue naming the first's origin. */
export function mergeObjects(origins: ReadonlyArray<{ readonly file: string; readonly contents: FileContents }>): ConfigObjects {
  const services: Service[] = [];
  const trafficPolicies: TrafficPolicy[] = [];
  const routes: ServiceRoute[] = [];
  const namespaces: Namespace[] = [];
  const peerAuthentications: PeerAuthentication[] = [];
  const authorizationPolicies: AuthorizationPolicy[] = [];
  let mesh: MeshSettings | undefined;
  const issues: ConfigIssue[] = [];
  const names = new Map<string, string>();
  for (const { file, contents } of origins) {
    issues.push(...contents.issues);
    for (const o of contents.objects) {
      if ('namespace' in o) namespaces.push(o.namespace);
      else if ('mesh' in o) mesh = o.mesh;
      else {
        const first = names.get(o.id);
        if (first) {
          issues.push({ file, object: o.id, field: 'metadata.name', message: `duplicate ${o.id} (first defined in ${first})` });
          continue;
        }
        names.set(o.id, file);
        if ('service' in o) services.push(o.service);
        else if ('route' in o) routes.push(o.route);
        else if ('peerAuthentication' in o) peerAuthentications.push(o.peerAuthentication);
        else if ('authorizationPolicy' in o) authorizationPolicies.push(o.authorizationPolicy);
        else trafficPolicies.push(o.policy);
      }
    }
  }
  return { services, trafficPolicies, routes, namespaces, peerAuthentications, authorizationPolicies, mesh, issues, files: names };
}
