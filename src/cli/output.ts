/** Output for humans (aligned tables) and for scripts (-o json). */
import { NodemeshError, isNodemeshError } from '../shared/errors.js';

export type OutputFormat = 'table' | 'json';

export function parseOutputFormat(value: string): OutputFormat {
  if (value === 'table' || value === 'json') return value;
  throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `-o ${value}: expected "table" or "json"`, { context: { field: 'output' }, hint: 'give -o table or -o json' });
}

export function table(headers: ReadonlyArray<string>, rows: ReadonlyArray<ReadonlyArray<string>>): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: ReadonlyArray<string>): string => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd();
  return [line(headers), ...rows.map(line)].join('\n') + '\n';
}

/** Prints an error for a human: code and message, then what to do. */
export function formatError(e: unknown): string {
  if (isNodemeshError(e)) {
    const ctx = Object.entries(e.context)
      .filter(([k]) => k !== 'detail')
      .map(([k, v]) => `${k}=${String(v)}`)
      .join(' ');
    let out = `error ${e.code}: ${e.message}\n`;
    if (ctx) out += `  context: ${ctx}\n`;
    if (e.context.detail) out += `  detail: ${e.context.detail.trim().split('\n').slice(-8).join('\n          ')}\n`;
    if (e.hint) out += `  fix: ${e.hint}\n`;
    return out;
  }
  // Not one of ours: a bug, since every failure a user can cause is a NodemeshError at its edge.
  // One line, not a stack: the stack says nothing to the user, and the log has the rest.
  const message = e instanceof Error ? e.message : String(e);
  return `error NM_ERR_INTERNAL: ${message.trim().split('\n')[0] ?? ''}\n  fix: this is a nodemesh bug: report it with the command, this message and the log (run again with NODEMESH_LOG_LEVEL=debug for more)\n`;
}
