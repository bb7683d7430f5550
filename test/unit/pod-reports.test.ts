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
