/**
 * Pod records on disk (one JSON file per pod in <stateDir>/pods) and the runtime lock. Other
 * processes (the agent, `pod list`) read the same files; only the runtime writes them.
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { NodemeshError } from '../shared/errors.js';
import { defaultNodeName } from './config.js';

export interface PodRecord {
  readonly uid: string;
  /** The node whose agent captures the pod. */
  readonly node: string;
  readonly name: string;
  readonly namespace: string;
  readonly serviceAccount: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly ip4: string;
  readonly ip6: string;
  /** Index of the pod's addresses in the pod subnets. */
  readonly slot: number;
  readonly netns: string;
  readonly netnsPath: string;
  readonly cgroupPath: string;
  readonly hostVeth: string;
  readonly bridge: string;
  readonly command: ReadonlyArray<string>;
  readonly detached: boolean;
  readonly logPath: string | null;
  readonly pid: number | null;
  readonly phase: 'creating' | 'running';
  readonly createdAt: string;
}

export const podKey = (namespace: string, name: string): string => `${namespace}_${name}`;

/** Parsed records by path with the file's identity (inode, size, mtime) when they were read. */
export type RecordCache = Map<string, { readonly signature: string; readonly record: PodRecord }>;

export class PodStore {
  readonly podsDir: string;
  private readonly lockDir: string;

  constructor(readonly stateDir: string) {
    this.podsDir = join(stateDir, 'pods');
    this.lockDir = join(stateDir, 'lock');
  }

  recordPath(namespace: string, name: string): string {
    return join(this.podsDir, `${podKey(namespace, name)}.json`);
  }

  logPath(namespace: string, name: string): string {
    return join(this.podsDir, `${podKey(namespace, name)}.log`);
  }

  /** Every record; a corrupt one throws (NM_ERR_STATE). Use scan() to skip and report instead. */
  async list(): Promise<PodRecord[]> {
    const { records, errors } = await this.scan();
    if (errors[0]) throw errors[0];
    return records;
  }

  /**
   * Every readable record, and an error for each record that cannot be read. A record removed
   * while we read the folder is simply gone, not an error.
   */
  async scan(cache?: RecordCache): Promise<{ records: PodRecord[]; errors: NodemeshError[] }> {
    let files: string[];
    try {
      files = await readdir(this.podsDir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { records: [], errors: [] };
      throw stateDirError(e, this.podsDir);
    }
    const records: PodRecord[] = [];
    const errors: NodemeshError[] = [];
    const seen = new Set<string>();
    for (const f of files.filter((f) => f.endsWith('.json')).sort()) {
      const path = join(this.podsDir, f);
      seen.add(path);
      try {
        records.push(cache ? await this.readCached(path, cache) : await this.read(path));
      } catch (e) {
        if (e instanceof NodemeshError && (e.cause as NodeJS.ErrnoException | undefined)?.code === 'ENOENT') continue;
        if (e instanceof NodemeshError) errors.push(e);
        else throw e;
      }
    }
    if (cache) for (const path of cache.keys()) if (!seen.has(path)) cache.delete(path);
    return { records, errors };
  }

  async get(namespace: string, name: string): Promise<PodRecord | null> {
    try {
      return await this.read(this.recordPath(namespace, name));
    } catch (e) {
      if (e instanceof NodemeshError && (e.cause as NodeJS.ErrnoException | undefined)?.code === 'ENOENT') return null;
      throw e;
    }
  }

  /**
   * The same record object as last time while the file is the same (records are replaced by
   * rename, so a new version is a new inode): a reader that polls reads and parses only what changed.
   */
  private async readCached(path: string, cache: RecordCache): Promise<PodRecord> {
    let st;
    try {
      st = await stat(path);
    } catch (e) {
      throw new NodemeshError('NM_ERR_STATE', `pod record ${path} cannot be read: ${(e as Error).message}`, { context: { path }, cause: e });
    }
    const signature = `${st.ino}:${st.size}:${st.mtimeMs}`;
    const hit = cache.get(path);
    if (hit?.signature === signature) return hit.record;
    const record = await this.read(path);
    cache.set(path, { signature, record });
    return record;
  }

  private async read(path: string): Promise<PodRecord> {
    try {
      const record = JSON.parse(await readFile(path, 'utf8')) as PodRecord;
      // Records written before pods had a node are this machine's node's.
      return typeof record.node === 'string' ? record : { ...record, node: defaultNodeName() };
    } catch (e) {
      // Not the record's fault: the state folder (or a folder above it) is a file.
      if ((e as NodeJS.ErrnoException).code === 'ENOTDIR') throw stateDirError(e, this.podsDir);
      throw new NodemeshError('NM_ERR_STATE', `pod record ${path} cannot be read: ${(e as Error).message}`, {
        context: { path },
        cause: e,
        hint: 'remove the file if the pod is gone; `nodemesh pod rm` cleans what the record names',
      });
    }
  }

  /** Writes atomically (temp file + rename) so readers never see half a record. */
  async write(record: PodRecord): Promise<void> {
    await mkdir(this.podsDir, { recursive: true });
    const path = this.recordPath(record.namespace, record.name);
    const tmp = `${path}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(record, null, 2) + '\n');
    await rename(tmp, path);
  }

  async remove(record: Pick<PodRecord, 'namespace' | 'name'>): Promise<void> {
    await rm(this.recordPath(record.namespace, record.name), { force: true });
    await rm(this.logPath(record.namespace, record.name), { force: true });
  }

  /** Removes the pods folder if no pod is left; withLock then removes the state folder. */
  async removeIfEmpty(): Promise<void> {
    if ((await this.list()).length > 0) return;
    await rm(this.podsDir, { recursive: true, force: true });
  }

  /**
   * Runs fn holding the runtime lock (a directory: mkdir is atomic). A lock whose owner died is
   * taken over.
   */
  async withLock<T>(fn: () => Promise<T>, timeoutMs = 30_000): Promise<T> {
    await mkdir(this.stateDir, { recursive: true }).catch((e: unknown) => {
      throw stateDirError(e, this.stateDir);
    });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        await mkdir(this.lockDir);
        await writeFile(join(this.lockDir, 'owner'), String(process.pid));
        break;
      } catch (e) {
        // The folder was removed by a process that just released the last pod: make it again.
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
          await mkdir(this.stateDir, { recursive: true });
          continue;
        }
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        if (await this.lockIsStale()) {
          await rm(this.lockDir, { recursive: true, force: true });
          continue;
        }
        if (Date.now() > deadline) {
          throw new NodemeshError('NM_ERR_LOCK_TIMEOUT', `runtime lock ${this.lockDir} held for more than ${timeoutMs} ms`, {
            context: { path: this.lockDir },
            hint: 'another `nodemesh pod` command is running; if none is, remove the lock folder',
          });
        }
        await sleep(20);
      }
    }
    try {
      return await fn();
    } finally {
      await rm(this.lockDir, { recursive: true, force: true });
      // No pods left (removeIfEmpty took the pods folder): leave nothing behind. rmdir fails,
      // harmlessly, if another process has put something there meanwhile.
      if (!existsSync(this.podsDir)) await rmdir(this.stateDir).catch(() => undefined);
    }
  }

  private async lockIsStale(): Promise<boolean> {
    try {
      const owner = Number(await readFile(join(this.lockDir, 'owner'), 'utf8'));
      if (!Number.isInteger(owner) || owner <= 0) return false;
      process.kill(owner, 0);
      return false;
    } catch (e) {
      // ESRCH: the owner is gone. ENOENT: the owner is between mkdir and writing its pid.
      return (e as NodeJS.ErrnoException).code === 'ESRCH';
    }
  }
}

/**
 * The state folder itself is unusable (NODEMESH_STATE_DIR names a file, or a folder that cannot
 * be read or made): nothing of any pod can be known, so every pod command stops with it.
 */
function stateDirError(e: unknown, path: string): NodemeshError {
  const code = (e as NodeJS.ErrnoException).code;
  return new NodemeshError('NM_ERR_STATE', `the runtime state folder ${path} cannot be used: ${(e as Error).message}`, {
    context: { path, ...(code === undefined ? {} : { errnoCode: code }) },
    cause: e,
    hint: 'set NODEMESH_STATE_DIR to a folder root can write (the default is /run/nodemesh), or remove what is in the way',
  });
}
