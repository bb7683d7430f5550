/**
 * nodemesh's own kinds as their CRDs define them (daemonset/01-crd-*.yaml): the one source of truth
 * for the API server and for local validation. `npm run build` compiles these schemas into
 * validators (src/config/generate-validators.ts); this module is what both sides read.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

import { parseAllDocuments } from 'yaml';

import { PACKAGE_ROOT } from '../shared/paths.js';

/** The install manifests' folder: its CustomResourceDefinitions are nodemesh's kinds. */
export const CRD_DIR = join(PACKAGE_ROOT, 'daemonset');

export interface CrdKind {
  readonly group: string;
  readonly version: string;
  readonly kind: string;
  readonly plural: string;
  /** `group/version/Kind`, the key of its validator. */
  readonly key: string;
  readonly schema: unknown;
}

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

/**
 * The schema with one rule a structural CRD schema cannot state: an object that lists its
 * properties refuses others (what `kubectl --validate=strict` reports; the API server would
 * prune them silently, hiding typos), unless it preserves unknown fields.
 */
export function strictSchema(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(strictSchema);
  if (!isObject(schema)) return schema;
  const out: Json = {};
  for (const [k, v] of Object.entries(schema)) out[k] = k === 'enum' || k === 'default' || k === 'example' ? v : strictSchema(v);
  if (out['type'] === 'object' && isObject(out['properties']) && out['additionalProperties'] === undefined && out['x-kubernetes-preserve-unknown-fields'] !== true) {
    out['additionalProperties'] = false;
  }
  return out;
}

export function readCrds(dir = CRD_DIR): CrdKind[] {
  const kinds: CrdKind[] = [];
  for (const file of readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort()) {
    for (const doc of parseAllDocuments(readFileSync(join(dir, file), 'utf8'))) {
      const crd = doc.toJS() as {
        kind?: string;
        spec: { group: string; names: { kind: string; plural: string }; versions: Array<{ name: string; schema: { openAPIV3Schema: unknown } }> };
      } | null;
      if (crd?.kind !== 'CustomResourceDefinition') continue;
      for (const v of crd.spec.versions) {
        const { group, names } = crd.spec;
        kinds.push({ group, version: v.name, kind: names.kind, plural: names.plural, key: `${group}/${v.name}/${names.kind}`, schema: strictSchema(v.schema.openAPIV3Schema) });
      }
    }
  }
  return kinds;
}
