/**
 * `nodemesh up` (what `npm run demo` runs) end to end: control plane on examples/mesh, an agent,
 * the example's pods and traffic through the mesh; the summary counts requests per Service and
 * version, and nothing the demo made is left.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { test } from 'node:test';

import { ip } from '../../src/shared/exec.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import { collect, createSandbox } from '../support/sandbox.js';

test('demo: the example mesh on two nodes serves every Service, the reviews canary splits 75/25, and it cleans up', async (t) => {
  const sb = await createSandbox(t);
  const child = spawn(process.execPath, [CLI_ENTRY, 'up', '--duration', '4s', '--rate', '5'], { env: sb.env, stdio: ['ignore', 'pipe', 'pipe'] });
  const { code, stdout, stderr } = await collect(child);
  assert.equal(code, 0, `demo failed:\n${stdout}\n${stderr}`);
  const rows = stdout.split('\n').filter((l) => /\.shop\.svc\.cluster\.local/.test(l)).map((l) => l.split(/\s+/));
  // SERVICE WORKLOAD VERSION REQUESTS BYTES-IN BYTES-OUT NODE MTLS: the pods are spread over the
  // sandbox's node (with loadgen) and a second one.
  const [a, b] = [sb.config.node, `${sb.config.node}-b`];
  // From loadgen on the first node: to the second node's pods over HBONE (mutual TLS), to its own
  // node's pods on the same-node path (they never leave the node; both identities are known to it
  // first-hand, reported as mutual_tls too).
  assert.deepEqual(
    rows.map((r) => [r[0], r[2], r[6], r[7]]),
    [
      ['frontend.shop.svc.cluster.local', 'v1', a, 'yes'],
      ['ratings.shop.svc.cluster.local', 'v1', b, 'yes'],
      ['reviews-v1.shop.svc.cluster.local', 'v1', a, 'yes'],
      ['reviews-v2.shop.svc.cluster.local', 'v2', b, 'yes'],
    ],
  );
  // The canary route: reviews' connections go 3:1 to v1 and v2 (smooth weighted round robin).
  const v1 = Number(rows[2]?.[3]);
  const v2 = Number(rows[3]?.[3]);
  assert.ok(Math.abs(v1 - 3 * v2) <= 3, `reviews-v1 ${v1} vs reviews-v2 ${v2}: 75/25`);
  for (const r of rows) assert.ok(Number(r[3]) > 0, `${r[0]} ${r[2]} got requests`);
  // frontend is dual-stack and called on both addresses: twice the requests of ratings.
  const requests = (svc: string): number => rows.filter((r) => r[0] === svc).reduce((n, r) => n + Number(r[3]), 0);
  assert.ok(requests('frontend.shop.svc.cluster.local') > requests('ratings.shop.svc.cluster.local'));
  assert.match(stdout, /what loadgen saw/);
  assert.doesNotMatch(stdout.split('what loadgen saw')[1] ?? '', /\s[1-9]\d*\s+\S+: /, 'loadgen saw no failures');
  assert.deepEqual(await sb.runtime.list(), [], 'no pod left');
  assert.equal(existsSync('/sys/fs/bpf/nodemesh-demo'), false, 'no pins left');
  assert.doesNotMatch((await ip('route', 'show')).stdout, /10\.96\.100\./, 'no blackhole route left');
});
