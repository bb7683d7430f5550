/** The heap given back when idle: the addon's collection shrinks a real V8 heap, and HeapTrim makes it only after an idle spell and growth. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { getHeapStatistics } from 'node:v8';

import { trimHeap } from '../../src/datapath/native.js';
import { HeapTrim } from '../../src/shared/heap-trim.js';

const MiB = 1024 * 1024;

test('trimHeap: a heap grown by garbage is collected and its pages given back', () => {
  // ~64 MiB of arrays, kept until the heap holds them, then dropped: garbage in old space.
  let keep: number[][] | undefined = [];
  for (let i = 0; i < 2048; i++) keep.push(Array.from({ length: 4096 }, (_, j) => i + j + 0.5));
  const grown = getHeapStatistics().total_heap_size;
  assert.ok(grown > 48 * MiB, `the heap grew (${(grown / MiB).toFixed(1)} MiB)`);
  keep.length = 0;
  keep = undefined;
  trimHeap();
  const after = getHeapStatistics().total_heap_size;
  assert.ok(after < grown - 32 * MiB, `trimmed from ${(grown / MiB).toFixed(1)} to ${(after / MiB).toFixed(1)} MiB`);
});

test('HeapTrim: trims after quietSamples idle samples in a row, only when the heap grew since the last trim', () => {
  let busy = 0;
  let heap = 20 * MiB;
  const trims: number[] = [];
  const t = new HeapTrim({
    trim: () => {
      trims.push(heap);
      heap = 21 * MiB;
    },
    quietSamples: 2,
    idleShare: 0.01,
    growthBytes: 4 * MiB,
    busyShare: () => busy,
    heapBytes: () => heap,
  });
  // Under load the heap grows: no trim while the loop is busy.
  busy = 0.4;
  heap = 60 * MiB;
  assert.equal(t.sample(), false);
  assert.equal(t.sample(), false);
  // The load drops to a lower rate (busier than idleShare): still none.
  busy = 0.05;
  assert.equal(t.sample(), false);
  assert.equal(t.sample(), false);
  // Idle: the first sample waits, the second trims.
  busy = 0.002;
  assert.equal(t.sample(), false);
  assert.equal(t.sample(), true);
  assert.deepEqual(trims, [60 * MiB]);
  assert.deepEqual(t.trims.map((r) => [r.before, r.after]), [[60 * MiB, 21 * MiB]]);
  // Still idle, the heap where the trim left it: nothing more to give back.
  for (let i = 0; i < 5; i++) assert.equal(t.sample(), false);
  // Grown by 9 MiB while idle (idle samples already counted): trimmed at once.
  heap = 30 * MiB;
  assert.equal(t.sample(), true);
  // A busy sample between idle ones starts the count again.
  heap = 40 * MiB;
  assert.equal(t.sample(), false);
  busy = 0.5;
  assert.equal(t.sample(), false);
  busy = 0;
  assert.equal(t.sample(), false);
  assert.equal(t.sample(), true);
  assert.equal(trims.length, 3);
});

test('HeapTrim: the first idle spell trims what starting up left; a heap that shrank on its own lowers the mark it must grow from', () => {
  let heap = 40 * MiB;
  let busy = 0;
  let trims = 0;
  const t = new HeapTrim({ trim: () => void trims++, quietSamples: 1, busyShare: () => busy, heapBytes: () => heap });
  assert.equal(t.sample(), true, 'no trim yet: the first idle sample trims');
  assert.equal(trims, 1);
  // The trim left 40 MiB (this heap does not shrink); a collection under load leaves 30: growing
  // to 33 is not 4 MiB over that mark.
  busy = 0.5;
  heap = 30 * MiB;
  assert.equal(t.sample(), false);
  busy = 0;
  assert.equal(t.sample(), false);
  heap = 33 * MiB;
  assert.equal(t.sample(), false);
  heap = 35 * MiB;
  assert.equal(t.sample(), true);
  assert.equal(trims, 2);
});
