/** Running the system tools the local runtime is built on (iproute2), with typed errors. */
import { execFile } from 'node:child_process';
import { constants } from 'node:fs';
import { access } from 'node:fs/promises';
import { delimiter, isAbsolute, join } from 'node:path';

import { NodemeshError } from './errors.js';

export interface ExecResult {
  readonly stdout: string;
  readonly stderr: string;
}

export class CommandFailed extends Error {
  override readonly name = 'CommandFailed';
  constructor(
    readonly argv: ReadonlyArray<string>,
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super(`\`${argv.join(' ')}\` failed (exit ${exitCode ?? 'signal'}): ${stderr.trim()}`);
  }
}

export function run(file: string, args: ReadonlyArray<string>, options: { timeoutMs?: number } = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: options.timeoutMs ?? 30_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (!err) {
        resolve({ stdout, stderr });
        return;
      }
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        reject(
          new NodemeshError('NM_ERR_TOOL_MISSING', `${file} is not installed`, {
            context: { path: file },
            hint: 'install iproute2 (apt-get install -y iproute2)',
          }),
        );
        return;
      }
      const code = typeof err.code === 'number' ? err.code : null;
      reject(new CommandFailed([file, ...args], code, stderr || err.message));
    });
  });
}

/** `ip ...` from iproute2. */
export function ip(...args: string[]): Promise<ExecResult> {
  return run('ip', args);
}

/** Runs a cleanup step that may find its object already gone. */
export async function bestEffort(step: () => Promise<unknown>, onError: (e: unknown) => void): Promise<void> {
  try {
    await step();
  } catch (e) {
    onError(e);
  }
}

/** The absolute path `command` would run as, or null: like `command -v`. */
export async function resolveExecutable(command: string, path = process.env['PATH'] ?? ''): Promise<string | null> {
  const candidates = command.includes('/') ? [command] : path.split(delimiter).filter(Boolean).map((d) => join(d, command));
  for (const c of candidates) {
    try {
      await access(c, constants.X_OK);
      return isAbsolute(c) ? c : join(process.cwd(), c);
    } catch {
      // next candidate
    }
  }
  return null;
}
