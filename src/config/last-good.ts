/**
 * "The last good version keeps serving" (design.md section 5): after a read of the config, an
 * object that was rejected, or that sat in a file that no longer parses, keeps its previous
 * accepted version. Objects that are simply gone (deleted from a file that parses) go.
 */
import type { ConfigIssue } from './service.js';

export interface Named {
  readonly namespace: string;
  readonly name: string;
}

export interface Accepted<T> {
  readonly objects: ReadonlyArray<T>;
  /** Ids of objects served from their previous version. */
  readonly kept: ReadonlyArray<string>;
}

export function keepLastGood<T extends Named>(
  kind: string,
  fresh: ReadonlyArray<T>,
  previous: ReadonlyArray<T>,
  previousFiles: ReadonlyMap<string, string>,
  issues: ReadonlyArray<ConfigIssue>,
): Accepted<T> {
  const id = (o: Named): string => `${kind} ${o.namespace}/${o.name}`;
  const rejected = new Set(issues.map((i) => i.object));
  // A document that is not YAML hides which objects it held: keep everything that file had.
  const brokenFiles = new Set(issues.filter((i) => i.object.startsWith('document ')).map((i) => i.file));
  const have = new Set(fresh.map(id));
  const objects = [...fresh];
  const kept: string[] = [];
  for (const p of previous) {
    const k = id(p);
    if (have.has(k)) continue;
    const file = previousFiles.get(k);
    if (rejected.has(k) || (file !== undefined && brokenFiles.has(file))) {
      objects.push(p);
      kept.push(k);
    }
  }
  return { objects, kept };
}
