/** One ABI, three views: the TS codec, offsetof() in the addon, and the BTF of the BPF objects. */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { ABI_CONSTANTS, LAYOUTS } from '../../src/datapath/abi.js';
import { abiLayout } from '../../src/datapath/native.js';
import { BPF_OBJECT_DIR } from '../../src/shared/paths.js';

interface BtfType {
  readonly kind: string;
  readonly name?: string;
  readonly size?: number;
  readonly members?: ReadonlyArray<{ name: string; bits_offset: number }>;
}

test('the TypeScript layouts match offsetof() in the C++ addon', () => {
  const native = abiLayout();
  for (const [name, layout] of Object.entries(LAYOUTS)) {
    assert.deepEqual(native[name as keyof typeof LAYOUTS], layout, name);
  }
  assert.deepEqual(native.constants, ABI_CONSTANTS);
});

test('the TypeScript layouts match the BTF of every compiled BPF object', async () => {
  const objects = (await readdir(BPF_OBJECT_DIR)).filter((f) => f.endsWith('.bpf.o'));
  assert.ok(objects.length >= 2, 'capture and inbound objects are built');
  for (const object of objects) {
    const { stdout } = await promisify(execFile)('bpftool', ['-j', 'btf', 'dump', 'file', join(BPF_OBJECT_DIR, object)], { maxBuffer: 64 << 20 });
    const types = (JSON.parse(stdout) as { types: BtfType[] }).types;
    for (const [name, layout] of Object.entries(LAYOUTS)) {
      const t = types.find((x) => x.kind === 'STRUCT' && x.name === name);
      assert.ok(t, `${object} has BTF for struct ${name}`);
      assert.equal(t.size, layout.size, `${object}: sizeof(${name})`);
      const offsets = Object.fromEntries((t.members ?? []).map((m) => [m.name, m.bits_offset / 8]));
      assert.deepEqual(offsets, layout.offsets, `${object}: offsets of ${name}`);
    }
  }
});
