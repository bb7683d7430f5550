import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';

import { ERROR_CODES, NodemeshError } from '../../src/shared/errors.js';
import { PACKAGE_ROOT } from '../../src/shared/paths.js';

test('docs/errors.md and src/shared/errors.ts list the same codes', async () => {
  const doc = await readFile(join(PACKAGE_ROOT, 'docs', 'errors.md'), 'utf8');
  const documented = [...doc.matchAll(/^\| `(NM_ERR_[A-Z0-9_]+)` \|/gm)].map((m) => m[1]).sort();
  const defined = Object.keys(ERROR_CODES).sort();
  assert.deepEqual(documented, defined);
  assert.equal(new Set(documented).size, documented.length, 'no code is documented twice');
});

test('every src file that throws a code uses one from the registry', async () => {
  const { readdir } = await import('node:fs/promises');
  const files = (await readdir(join(PACKAGE_ROOT, 'src'), { recursive: true })).filter((f) => f.endsWith('.ts'));
  const used = new Set<string>();
  for (const f of files) {
    const text = await readFile(join(PACKAGE_ROOT, 'src', f), 'utf8');
    for (const m of text.matchAll(/'(NM_ERR_[A-Z0-9_]+)'/g)) used.add(m[1] ?? '');
  }
  for (const code of used) assert.ok(code in ERROR_CODES, `${code} is used but not registered`);
});

test('NodemeshError serialises code, context and hint for -o json and logs', () => {
  const e = new NodemeshError('NM_ERR_POD_EXISTS', 'pod default/a already exists', { context: { pod: 'a', namespace: 'default' }, hint: 'remove it' });
  assert.deepEqual(e.toJSON(), { code: 'NM_ERR_POD_EXISTS', message: 'pod default/a already exists', pod: 'a', namespace: 'default', hint: 'remove it' });
});
