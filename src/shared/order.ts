/**
 * Ordinal string order (by UTF-16 code units). Snapshots and tables sort with it rather than
 * localeCompare: the order is the same on every node whatever its locale, and it does not pull
 * ICU's collation data into the agent's memory.
 */
export function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Sorts objects by "namespace/name". */
export const byNamespaceName = (a: { namespace: string; name: string }, b: { namespace: string; name: string }): number =>
  compareStrings(`${a.namespace}/${a.name}`, `${b.namespace}/${b.name}`);
