import assert from 'node:assert/strict';
import { test } from 'node:test';

import { checkPodReport } from '../../src/control-plane/pod-reports.js';
import type { WireWorkload } from '../../src/protocol/discovery.js';

const pod = (name: string, ip4: string, over: Partial<WireWorkload> = {}): WireWorkload => ({ uid: `uid-${name}`, namespace: 'shop', name, serviceAccount: 'web', labels: {}, ip4, ip6: '', node: '', ...over });

test("pod reports: a node is believed only about itself; another node's uids, addresses and names are not its to claim", () => {
  const others = new Map([['node-a', [pod('a-1', '10.0.0.2', { node: 'node-a' })]]]);
  const { pods, dropped } = checkPodReport(
    'node-b',
    [
      pod('b-1', '10.0.0.3'),
      pod('b-2', '10.0.0.2'),
      pod('b-3', '10.0.0.4', { uid: 'uid-a-1' }),
      pod('a-1', '10.0.0.5', { uid: 'uid-a-1-again' }),
      pod('b-1', '10.0.0.6', { uid: 'uid-b-1x' }),
      pod('b-4', '10.0.0.3', { uid: 'uid-b-4' }),
      pod('B_5', '10.0.0.7'),
      pod('b-6', 'not-an-ip'),
      pod('b-7', '', { ip6: '' }),
      pod('b-8', '10.0.0.8', { tunnel: 'WIREGUARD' }),
      pod('b-9', '10.0.0.9', { tunnel: 'HBONE' }),
    ],
    others,
  );
  assert.deepEqual(
    pods.map((p) => `${p.name}@${p.node}`),
    ['b-1@node-b', 'b-9@node-b'],
  );
  assert.deepEqual(
    dropped.map((d) => [d.pod, d.reason]),
    [
      ['shop/b-2', 'address_taken'],
      ['shop/b-3', 'duplicate_uid'],
      ['shop/a-1', 'name_taken'],
      ['shop/b-1', 'name_taken'],
      ['shop/b-4', 'address_taken'],
      ['shop/B_5', 'invalid'],
      ['shop/b-6', 'invalid'],
      ['shop/b-7', 'invalid'],
      ['shop/b-8', 'invalid'],
    ],
  );
  assert.match(dropped[0]?.message ?? '', /address 10\.0\.0\.2 is a pod of node node-a/);
  // The node's own previous report does not count against it.
  assert.equal(checkPodReport('node-a', [pod('a-1', '10.0.0.2')], others).pods.length, 1);
});

test('pod reports: addresses outside the pod ranges the node may claim are dropped (mesh-wide and per-node ranges)', async () => {
  const { PodRanges } = await import('../../src/control-plane/pod-ranges.js');
  const ranges = PodRanges.parse('10.0.0.0/24, fd00::/64, node-b=10.1.0.0/24');
  const report = [pod('in-mesh', '10.0.0.3'), pod('in-b', '10.1.0.3'), pod('outside', '192.168.1.3'), pod('v6-outside', '', { ip6: 'fd01::3' }), pod('mapped', '10.0.0.4', { ip6: 'fd00::4' })];
  const b = checkPodReport('node-b', report, new Map(), ranges.of('node-b'));
  assert.deepEqual(b.pods.map((p) => p.name), ['in-mesh', 'in-b', 'mapped']);
  assert.deepEqual(b.dropped.map((d) => [d.pod, d.reason]), [['shop/outside', 'address_out_of_range'], ['shop/v6-outside', 'address_out_of_range']]);
  assert.match(b.dropped[0]?.message ?? '', /192\.168\.1\.3 is outside the pod ranges node node-b may claim \(10\.0\.0\.0\/24, fd00::\/64, 10\.1\.0\.0\/24\)/);
  // node-b's own range is not node-a's.
  const a = checkPodReport('node-a', [pod('in-b', '10.1.0.3')], new Map(), ranges.of('node-a'));
  assert.deepEqual(a.dropped.map((d) => d.reason), ['address_out_of_range']);
  // Without ranges every address is believed.
  assert.equal(PodRanges.none().of('node-a'), undefined);
  assert.equal(checkPodReport('node-a', [pod('x', '192.168.1.3')], new Map(), PodRanges.none().of('node-a')).pods.length, 1);
  for (const bad of ['10.0.0.0/33', 'node_b=10.0.0.0/8', 'x=y', '10.0.0.0/8/1']) {
    assert.throws(() => PodRanges.parse(bad), (e: unknown) => e instanceof Error && 'code' in e && (e as { code: string }).code === 'NM_ERR_INVALID_ARGUMENT' && e.message.includes(bad), bad);
  }
});
