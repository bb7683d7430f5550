/**
 * The local config source (design.md section 5): every *.yaml / *.yml file of a folder,
 * multi-document. Each object is validated on its own: a bad one is reported with file, object
 * and field and left out, the others apply.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';

import { MESH_CONFIG_NAME, parseMeshConfig, parseNamespace, type MeshSettings, type Namespace } from './mesh.js';
import { schemas } from './schemas.js';
import { ObjectInvalid, parseService, type ConfigIssue, type Service } from './service.js';
import { TRAFFIC_POLICY_API, parseTrafficPolicy, type TrafficPolicy } from './traffic-policy.js';

const TRAFFIC_POLICY = `${TRAFFIC_POLICY_API}/TrafficPolicy`;

export interface ConfigObjects {
  readonly services: ReadonlyArray<Service>;
  readonly trafficPolicies: ReadonlyArray<TrafficPolicy>;
  readonly namespaces: ReadonlyArray<Namespace>;
  /** From the `nodemesh` ConfigMap, if there is one (and it is valid). */
  readonly mesh: MeshSettings | undefined;
  readonly issues: ReadonlyArray<ConfigIssue>;
  /** The file each accepted object came from, by object id ("Service ns/name"). */
  readonly files: ReadonlyMap<string, string>;
}

/** How config objects are named in issues, logs and metrics: "Kind namespace/name". */
export const objectId = (kind: string, o: { namespace: string; name: string }): string => `${kind} ${o.namespace}/${o.name}`;

export async function readConfigDir(dir: string): Promise<ConfigObjects> {
  const files = (await readdir(dir)).filter((f) => /\.ya?ml$/.test(f)).sort();
  const services: Service[] = [];
  const trafficPolicies: TrafficPolicy[] = [];
  const namespaces: Namespace[] = [];
  let mesh: MeshSettings | undefined;
  const issues: ConfigIssue[] = [];
  const names = new Map<string, string>();
  for (const f of files) {
    const file = join(dir, f);
    const text = await readFile(file, 'utf8');
    const docs = parseAllDocuments(text);
    for (const [index, doc] of docs.entries()) {
      const where = `document ${index + 1}`;
      if (doc.errors.length > 0) {
        issues.push({ file, object: where, field: '', message: `not valid YAML: ${doc.errors[0]?.message ?? 'parse error'}` });
        continue;
      }
      const value: unknown = doc.toJS();
      if (value === null || value === undefined) continue;
      if (typeof value !== 'object' || Array.isArray(value)) {
        issues.push({ file, object: where, field: '', message: 'a document must be a Kubernetes object (a mapping)' });
        continue;
      }
      const obj = value as Record<string, unknown>;
      const kind = `${String(obj['apiVersion'])}/${String(obj['kind'])}`;
      const meta = obj['metadata'] as { name?: unknown; namespace?: unknown } | undefined;
      const id = `${String(obj['kind'])} ${String(meta?.namespace ?? 'default')}/${String(meta?.name ?? '?')}`;
      try {
        if (kind === 'v1/Namespace') {
          namespaces.push(parseNamespace(obj));
          continue;
        }
        if (kind === 'v1/ConfigMap') {
          if (meta?.name === MESH_CONFIG_NAME) mesh = parseMeshConfig(obj);
          continue;
        }
        const isService = kind === 'v1/Service';
        const isPolicy = kind === TRAFFIC_POLICY;
        if (!isService && !isPolicy) {
          const known = schemas().has(String(obj['apiVersion']), String(obj['kind']));
          issues.push({ file, object: id, field: 'kind', message: `${kind} is ${known ? 'not used by this agent yet' : 'not a supported kind'} (supported: v1 Service, Namespace, the nodemesh ConfigMap, ${TRAFFIC_POLICY})` });
          continue;
        }
        const parsed = isService ? { service: parseService(obj) } : { policy: parseTrafficPolicy(obj) };
        const first = names.get(id);
        if (first) {
          issues.push({ file, object: id, field: 'metadata.name', message: `duplicate ${id} (first defined in ${first})` });
          continue;
        }
        names.set(id, file);
        if (parsed.service) services.push(parsed.service);
        if (parsed.policy) trafficPolicies.push(parsed.policy);
      } catch (e) {
        if (!(e instanceof ObjectInvalid)) throw e;
        issues.push({ file, object: id, field: e.field, message: e.message });
      }
    }
  }
  return { services, trafficPolicies, namespaces, mesh, issues, files: names };
}
