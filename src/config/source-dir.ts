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

/** What one file holds, before the objects of all files are merged (duplicates are found then). */
interface FileContents {
  readonly objects: ReadonlyArray<{ readonly id: string } & ({ readonly service: Service } | { readonly policy: TrafficPolicy } | { readonly namespace: Namespace } | { readonly mesh: MeshSettings })>;
  readonly issues: ReadonlyArray<ConfigIssue>;
}

/**
 * Parsed files by path, reused while a file's text is unchanged: the control plane re-reads the
 * folder at every edit, and parsing 1,000 unchanged files is most of an edit's cost.
 */
export type ConfigDirCache = Map<string, { readonly text: string; readonly contents: FileContents }>;

export async function readConfigDir(dir: string, cache: ConfigDirCache = new Map()): Promise<ConfigObjects> {
  const files = (await readdir(dir)).filter((f) => /\.ya?ml$/.test(f)).sort();
  const services: Service[] = [];
  const trafficPolicies: TrafficPolicy[] = [];
  const namespaces: Namespace[] = [];
  let mesh: MeshSettings | undefined;
  const issues: ConfigIssue[] = [];
  const names = new Map<string, string>();
  const seen = new Set<string>();
  for (const f of files) {
    const file = join(dir, f);
    seen.add(file);
    const text = await readFile(file, 'utf8');
    let cached = cache.get(file);
    if (cached?.text !== text) {
      cached = { text, contents: parseFile(file, text) };
      cache.set(file, cached);
    }
    issues.push(...cached.contents.issues);
    for (const o of cached.contents.objects) {
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
        else trafficPolicies.push(o.policy);
      }
    }
  }
  for (const file of cache.keys()) if (!seen.has(file)) cache.delete(file);
  return { services, trafficPolicies, namespaces, mesh, issues, files: names };
}

function parseFile(file: string, text: string): FileContents {
  const objects: Array<FileContents['objects'][number]> = [];
  const issues: ConfigIssue[] = [];
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
        objects.push({ id, namespace: parseNamespace(obj) });
        continue;
      }
      if (kind === 'v1/ConfigMap') {
        if (meta?.name === MESH_CONFIG_NAME) objects.push({ id, mesh: parseMeshConfig(obj) });
        continue;
      }
      if (kind === 'v1/Service') objects.push({ id, service: parseService(obj) });
      else if (kind === TRAFFIC_POLICY) objects.push({ id, policy: parseTrafficPolicy(obj) });
      else {
        const known = schemas().has(String(obj['apiVersion']), String(obj['kind']));
        issues.push({ file, object: id, field: 'kind', message: `${kind} is ${known ? 'not used by this agent yet' : 'not a supported kind'} (supported: v1 Service, Namespace, the nodemesh ConfigMap, ${TRAFFIC_POLICY})` });
      }
    } catch (e) {
      if (!(e instanceof ObjectInvalid)) throw e;
      issues.push({ file, object: id, field: e.field, message: e.message });
    }
  }
  return { objects, issues };
}
