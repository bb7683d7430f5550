import assert from 'node:assert/strict';
import { readFile, readdir } from 'node:fs/promises';
import { dirname, join, normalize, relative, sep } from 'node:path';
import { test } from 'node:test';

import { PACKAGE_ROOT } from '../../src/shared/paths.js';

/**
 * The folders of src/ are layers (design.md section 8, ARCHITECTURE.md "Code map"): a folder
 * imports only the folders listed for it here. Reading the data path from the folder names only
 * works while this holds, so it is a test, not a convention.
 */
const MAY_IMPORT: Readonly<Record<string, readonly string[]>> = {
  shared: [],
  config: ['shared'],
  protocol: ['config', 'shared'],
  datapath: ['shared'],
  identity: ['config', 'shared'],
  runtime: ['config', 'shared'],
  kube: ['shared'],
  proxy: ['datapath', 'identity', 'config', 'shared'],
  agent: ['proxy', 'datapath', 'identity', 'protocol', 'runtime', 'kube', 'config', 'shared'],
  'control-plane': ['identity', 'protocol', 'kube', 'config', 'shared'],
  cli: ['control-plane', 'agent', 'proxy', 'datapath', 'identity', 'protocol', 'runtime', 'kube', 'config', 'shared'],
};

const IMPORT = /(?:^|\n)\s*(?:import|export)[^;]*?from\s+'(\.{1,2}\/[^']+)'|import\(\s*'(\.{1,2}\/[^']+)'\s*\)/g;

async function sourceImports(): Promise<Array<{ file: string; from: string; to: string }>> {
  const src = join(PACKAGE_ROOT, 'src');
  const files = (await readdir(src, { recursive: true })).filter((f) => f.endsWith('.ts'));
  const edges: Array<{ file: string; from: string; to: string }> = [];
  for (const file of files) {
    const text = await readFile(join(src, file), 'utf8');
    const from = file.split(sep)[0] ?? '';
    for (const m of text.matchAll(IMPORT)) {
      const spec = m[1] ?? m[2] ?? '';
      const target = relative(src, normalize(join(src, dirname(file), spec)));
      assert.ok(!target.startsWith('..'), `${file} imports ${spec}, outside src/`);
      edges.push({ file, from, to: target.split(sep)[0] ?? '' });
    }
  }
  return edges;
}

test('every folder of src/ is a known layer', async () => {
  const entries = await readdir(join(PACKAGE_ROOT, 'src'), { withFileTypes: true });
  for (const e of entries) assert.ok(!e.isDirectory() || e.name in MAY_IMPORT, `src/${e.name}/ is not placed in the layers`);
});

test('imports point down the layers: no folder imports one above it or beside it', async () => {
  const edges = await sourceImports();
  assert.ok(edges.length > 100, 'the import scan found the imports');
  const wrong = edges
    .filter((e) => e.from !== e.to && !(MAY_IMPORT[e.from] ?? []).includes(e.to))
    .map((e) => `src/${e.file} imports src/${e.to}/ (src/${e.from}/ may import: ${(MAY_IMPORT[e.from] ?? []).join(', ') || 'nothing of ours'})`);
  assert.deepEqual(wrong, []);
});

test('the layer table itself has no cycle', () => {
  const seen = new Set<string>();
  const visit = (folder: string, path: readonly string[]): void => {
    assert.ok(!path.includes(folder), `cycle: ${[...path, folder].join(' -> ')}`);
    if (seen.has(folder)) return;
    for (const next of MAY_IMPORT[folder] ?? []) visit(next, [...path, folder]);
    seen.add(folder);
  };
  for (const folder of Object.keys(MAY_IMPORT)) visit(folder, []);
});
