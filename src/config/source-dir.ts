/**
 * The local config source (design.md section 5): every *.yaml / *.yml file of a folder,
 * multi-document. Each object is validated on its own: a bad one is reported with file, object
 * and field and left out, the others apply.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';

import { NodemeshError, isSystemError } from '../shared/errors.js';
import { mergeObjects, parseObject, type ConfigObject, type ConfigObjects, type FileContents } from './objects.js';
import type { ConfigIssue } from './service.js';

/**
 * Parsed files by path, reused while a file's text is unchanged: the control plane re-reads the
 * folder at every edit, and parsing 1,000 unchanged files is most of an edit's cost.
 */
export type ConfigDirCache = Map<string, { readonly text: string; readonly contents: FileContents }>;

/**
 * A folder that is missing or cannot be read fails the read with NM_ERR_CONFIG_DIR naming it (at
 * start that stops the agent or control plane; at a re-read the last config keeps serving). So
 * does a file of it that cannot be read: its objects are unknown, and serving without them would
 * delete them. A file gone between the listing and the read is skipped (editors save by rename).
 */
export async function readConfigDir(dir: string, cache: ConfigDirCache = new Map()): Promise<ConfigObjects> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (e) {
    throw unreadable(e, dir, 'the config folder');
  }
  const files = names.filter((f) => /\.ya?ml$/.test(f)).sort();
  const contents: Array<{ file: string; contents: FileContents }> = [];
  const seen = new Set<string>();
  for (const f of files) {
    const file = join(dir, f);
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (e) {
      if (isSystemError(e) && e.code === 'ENOENT') continue;
      throw unreadable(e, file, 'a file of the config folder');
    }
    seen.add(file);
    let cached = cache.get(file);
    if (cached?.text !== text) {
      cached = { text, contents: parseFile(file, text) };
      cache.set(file, cached);
    }
    contents.push({ file, contents: cached.contents });
  }
  for (const file of cache.keys()) if (!seen.has(file)) cache.delete(file);
  return mergeObjects(contents);
}

function unreadable(e: unknown, path: string, what: string): NodemeshError {
  const code = isSystemError(e) ? e.code : undefined;
  const why = code === 'ENOENT' ? 'does not exist' : code === 'ENOTDIR' ? 'is not a folder' : code === 'EISDIR' ? 'is a folder' : code === 'EACCES' ? 'cannot be read (permission denied)' : `cannot be read: ${(e as Error).message}`;
  return new NodemeshError('NM_ERR_CONFIG_DIR', `${what} ${path} ${why}`, {
    context: { path, ...(code === undefined ? {} : { errnoCode: code }) },
    cause: e,
    hint:
      code === 'ENOENT' || code === 'ENOTDIR'
        ? 'give --config-dir a folder of Kubernetes YAML files (examples/mesh is one)'
        : code === 'EISDIR'
          ? `rename ${path}: every *.yaml and *.yml name in the folder is read as a file`
          : `check the permissions of ${path}`,
  });
}

function parseFile(file: string, text: string): FileContents {
  const objects: ConfigObject[] = [];
  const issues: ConfigIssue[] = [];
  const docs = parseAllDocuments(text);
  for (const [index, doc] of docs.entries()) {
    const where = `document ${index + 1}`;
    if (doc.errors.length > 0) {
      issues.push({ file, object: where, field: '', message: `not valid YAML: ${doc.errors[0]?.message ?? 'parse error'}` });
      continue;
    }
    const value: unknown = doc.toJS();
    if (value === null || value === undefined) continue;
    if (typeof value !== 'object' || Array.isArray(value)) {
      issues.push({ file, object: where, field: '', message: 'a document must be a Kubernetes object (a mapping)' });
      continue;
    }
    const parsed = parseObject(file, value as Record<string, unknown>);
    if ('issue' in parsed) issues.push(parsed.issue);
    else if (parsed.object) objects.push(parsed.object);
  }
  return { objects, issues };
}
