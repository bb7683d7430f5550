import assert from 'node:assert/strict';
import { test } from 'node:test';

import { RateLimiter } from '../../src/shared/rate-limit.js';

test('rate limiter: a burst, then the refill rate, per key; the least recently used key is forgotten first', () => {
  const limit = new RateLimiter(3, 2, 2);
  const t0 = 1_000_000;
  assert.deepEqual([1, 2, 3, 4].map(() => limit.take('a', t0)), [true, true, true, false], 'a burst of 3');
  assert.equal(limit.take('b', t0), true, 'another key has its own bucket');
  assert.equal(limit.take('a', t0 + 400), false, '0.8 tokens after 400 ms at 2/s');
  assert.equal(limit.take('a', t0 + 500), true, 'one token after 500 ms');
  assert.equal(limit.take('a', t0 + 500), false);
  assert.deepEqual([1, 2, 3, 4].map(() => limit.take('a', t0 + 60_000)), [true, true, true, false], 'refilled to the burst, never above');
  // Two keys tracked at most: a third pushes out the least recently used (b), which starts full.
  limit.take('c', t0 + 60_000);
  assert.deepEqual([1, 2, 3, 4].map(() => limit.take('b', t0 + 60_000)), [true, true, true, false]);
});

test('rate limiter: an empty bucket says how long until its next token', () => {
  const limit = new RateLimiter(2, 4);
  const t0 = 5_000;
  assert.deepEqual([limit.wait('a', t0), limit.wait('a', t0)], [0, 0]);
  assert.equal(limit.wait('a', t0), 250, 'one token every 250 ms at 4/s');
  assert.equal(limit.wait('a', t0 + 100), 150, 'a refused request takes nothing');
  assert.equal(limit.wait('a', t0 + 250), 0);
});
