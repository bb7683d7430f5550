/** A scratch folder and a stack of stop steps for a test: run last-in first-out, then the folder goes. */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';

export async function scratch(t: TestContext, prefix: string): Promise<{ dir: string; stops: Array<() => unknown> }> {
  const dir = await mkdtemp(join(tmpdir(), `${prefix}-`));
  const stops: Array<() => unknown> = [];
  t.after(async () => {
    for (const stop of stops.reverse()) await stop();
    await rm(dir, { recursive: true, force: true });
  });
  return { dir, stops };
}
