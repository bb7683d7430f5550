/** Whether a process runs. */
import { readFileSync } from 'node:fs';

/** Running means it exists and is not a zombie (an exited child nobody reaped yet). */
export function isAlive(pid: number | null): boolean {
  if (!pid) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}
