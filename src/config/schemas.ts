/**
 * Validation of nodemesh's own kinds against the OpenAPI v3 schemas of their CRDs
 * (daemonset/01-crd-*.yaml, read by crds.ts): one source of truth for the API server and for local
 * files. The build compiles them into ajv standalone validators; this module loads those and
 * turns their errors into ObjectInvalid with the field named.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

import type { ErrorObject } from 'ajv';

import { NodemeshError } from '../shared/errors.js';
import { PACKAGE_ROOT } from '../shared/paths.js';
import { ObjectInvalid } from './service.js';

/** The validators `npm run build` compiles from the CRDs in daemonset/ (src/config/generate-validators.ts). */
export const GENERATED_VALIDATORS = join(PACKAGE_ROOT, 'build', 'generated', 'crd-validators.cjs');

interface Validator {
  (doc: unknown): boolean;
  errors?: ErrorObject[] | null;
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

class SchemaRegistry {
  private readonly validators: ReadonlyMap<string, Validator>;

  constructor(file: string) {
    if (!existsSync(file)) {
      throw new NodemeshError('NM_ERR_NATIVE_MISSING', `the compiled CRD validators are missing: ${file}`, { context: { path: file }, hint: 'run `npm run build`' });
    }
    const mod = createRequire(import.meta.url)(file) as Record<string, Validator>;
    this.validators = new Map(Object.entries(mod));
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

/** The validators of this build's CRD schemas, loaded once on first use. */
export function schemas(): SchemaRegistry {
  registry ??= new SchemaRegistry(GENERATED_VALIDATORS);
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
