/**
 * Reading fields of a config object (parsed YAML or JSON): each check throws ObjectInvalid naming
 * the field, so every kind reports its problems the same way.
 */

/** A config object is invalid; `field` is its path in the object (spec.rules[0].matches). */
export class ObjectInvalid extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}

export type Json = Record<string, unknown>;

/** Kubernetes names of Services and namespaces (at most 63 characters too). */
export const DNS1123_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
/** RFC 9110 token: what a header name may be. */
export const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

export const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

/** Unknown fields are errors (as `kubectl --validate=strict`): a typo is not silently ignored. */
export function only(obj: Json, allowed: ReadonlyArray<string>, at: string): void {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) throw new ObjectInvalid(`${at}${key}`, `unknown field "${at}${key}"`);
  }
}

export function object(v: unknown, field: string): Json {
  if (!isObject(v)) throw new ObjectInvalid(field, `${field} must be an object`);
  return v;
}

/** A list of at most `max` entries; absent is empty. */
export function list(v: unknown, field: string, max: number): unknown[] {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw new ObjectInvalid(field, `${field} must be a list`);
  if (v.length > max) throw new ObjectInvalid(field, `${field} has ${v.length} entries (at most ${max})`);
  return v;
}
