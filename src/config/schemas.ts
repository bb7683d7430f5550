/**
 * Validation of nodemesh's own kinds against the OpenAPI v3 schemas of their CRDs
 * (daemonset/crds/*.yaml): one source of truth for the API server and for local files. The
 * schemas are compiled with ajv as they are, with one change a structural CRD schema cannot say:
 * every object that lists its properties rejects others, as `kubectl --validate=strict` does
 * (the API server would silently prune them, which hides typos).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { parse } from 'yaml';

import { PACKAGE_ROOT } from '../shared/paths.js';
import { ObjectInvalid } from './service.js';

export const CRD_DIR = join(PACKAGE_ROOT, 'daemonset', 'crds');

type Json = Record<string, unknown>;
const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Kubernetes' schema extensions: allowed in the schemas, no meaning for local validation. */
const KUBERNETES_KEYWORDS = [
  'x-kubernetes-preserve-unknown-fields',
  'x-kubernetes-int-or-string',
  'x-kubernetes-embedded-resource',
  'x-kubernetes-list-type',
  'x-kubernetes-list-map-keys',
  'x-kubernetes-map-type',
  'x-kubernetes-validations',
];

/** A copy of the schema where objects with listed properties refuse unlisted ones. */
function strictCopy(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(strictCopy);
  if (!isObject(schema)) return schema;
  const out: Json = {};
  for (const [k, v] of Object.entries(schema)) out[k] = k === 'enum' || k === 'default' || k === 'example' ? v : strictCopy(v);
  if (out['type'] === 'object' && isObject(out['properties']) && out['additionalProperties'] === undefined && out['x-kubernetes-preserve-unknown-fields'] !== true) {
    out['additionalProperties'] = false;
  }
  return out;
}

/** `/spec/targetRefs/0/kind` -> `spec.targetRefs[0].kind` */
export function fieldPath(pointer: string, extra?: string): string {
  let out = '';
  for (const part of pointer.split('/').slice(1)) {
    const key = part.replace(/~1/g, '/').replace(/~0/g, '~');
    out += /^[0-9]+$/.test(key) ? `[${key}]` : out === '' ? key : `.${key}`;
  }
  if (extra !== undefined) out += out === '' ? extra : `.${extra}`;
  return out;
}

function describe(e: ErrorObject): { field: string; message: string } {
  if (e.keyword === 'additionalProperties') {
    const field = fieldPath(e.instancePath, String((e.params as { additionalProperty: string }).additionalProperty));
    return { field, message: `unknown field "${field}"` };
  }
  if (e.keyword === 'required') {
    const field = fieldPath(e.instancePath, String((e.params as { missingProperty: string }).missingProperty));
    return { field, message: `${field} is required` };
  }
  const field = fieldPath(e.instancePath);
  if (e.keyword === 'enum') {
    const allowed = (e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(', ');
    return { field, message: `${field} must be one of ${allowed}` };
  }
  return { field, message: `${field || 'the object'} ${e.message ?? 'is not valid'}` };
}

export interface KindSchema {
  readonly group: string;
  readonly version: string;
  readonly kind: string;
  readonly plural: string;
}

class SchemaRegistry {
  private readonly validators = new Map<string, ValidateFunction>();
  readonly kinds: KindSchema[] = [];

  constructor(dir: string) {
    const ajv = new Ajv({ allErrors: false, strict: true, strictRequired: false });
    ajv.addVocabulary(KUBERNETES_KEYWORDS);
    for (const file of readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort()) {
      const crd = parse(readFileSync(join(dir, file), 'utf8')) as {
        spec: { group: string; names: { kind: string; plural: string }; versions: Array<{ name: string; schema: { openAPIV3Schema: unknown } }> };
      };
      for (const v of crd.spec.versions) {
        const key = `${crd.spec.group}/${v.name}/${crd.spec.names.kind}`;
        this.validators.set(key, ajv.compile(strictCopy(v.schema.openAPIV3Schema) as object));
        this.kinds.push({ group: crd.spec.group, version: v.name, kind: crd.spec.names.kind, plural: crd.spec.names.plural });
      }
    }
  }

  /** Whether `apiVersion`/`kind` is one of nodemesh's own kinds. */
  has(apiVersion: string, kind: string): boolean {
    return this.validators.has(`${apiVersion}/${kind}`);
  }

  /** Throws ObjectInvalid naming the first failing field. */
  validate(apiVersion: string, kind: string, doc: unknown): void {
    const validate = this.validators.get(`${apiVersion}/${kind}`);
    if (!validate) throw new ObjectInvalid('apiVersion', `${apiVersion} ${kind} is not a nodemesh kind`);
    if (validate(doc)) return;
    const first = validate.errors?.[0];
    const { field, message } = first ? describe(first) : { field: '', message: 'not valid' };
    throw new ObjectInvalid(field, message);
  }
}

let registry: SchemaRegistry | undefined;

/** The CRD schemas of this build, compiled once on first use. */
export function schemas(): SchemaRegistry {
  registry ??= new SchemaRegistry(CRD_DIR);
  return registry;
}

/** "1m30s", "250ms", "1.5s" -> milliseconds. The schema's pattern has already checked the form. */
export function parseDuration(text: string, field: string): number {
  let ms = 0;
  const unit: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  const re = /([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)/gy;
  let consumed = 0;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    ms += Number(m[1]) * (unit[m[2] ?? ''] ?? 0);
    consumed = re.lastIndex;
  }
  if (consumed !== text.length || text.length === 0) throw new ObjectInvalid(field, `${field} "${text}" is not a duration (such as 250ms, 10s, 1m)`);
  return Math.round(ms);
}
