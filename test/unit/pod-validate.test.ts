/** Pods the agent is told about are checked at its edge: each refused input, named. */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { LocalRuntimePodSource } from '../../src/agent/pods/source.js';
import { checkPodFields, PodFieldInvalid, type PodEdge } from '../../src/agent/pods/validate.js';
import { cidrContains } from '../../src/runtime/config.js';

const EDGE: PodEdge = {
  podsCgroup: '/sys/fs/cgroup/nodemesh/pods',
  netnsDir: '/run/netns',
  cidr4: { network: '10.200.0.0', prefix: 24 },
  cidr6: { network: 'fd00:6e6d::', prefix: 64 },
};

const POD = {
  uid: '0f8fad5b-d9cb-469f-a165-70867728950e',
  name: 'web',
  namespace: 'shop',
  serviceAccount: 'default',
  labels: { app: 'web' },
  ip4: '10.200.0.2',
  ip6: 'fd00:6e6d::2',
  netnsPath: '/run/netns/nm_shop_web',
  cgroupPath: '/sys/fs/cgroup/nodemesh/pods/shop_web',
};

test('pod fields: a good pod passes; every bad field is refused, named', () => {
  assert.equal(checkPodFields(POD, EDGE).uid, POD.uid);
  const bad: Array<[Record<string, unknown>, string, RegExp]> = [
    [{ ...POD, uid: '../../../../etc' }, 'uid', /not a UUID/],
    [{ ...POD, uid: 'A0F8FAD5-D9CB-469F-A165-70867728950E' }, 'uid', /not a UUID/],
    [{ ...POD, name: 'Web' }, 'name', /DNS-1123/],
    [{ ...POD, namespace: 'a/b' }, 'namespace', /DNS-1123/],
    [{ ...POD, ip4: '10.201.0.2' }, 'ip4', /not in the pod subnet 10\.200\.0\.0\/24/],
    [{ ...POD, ip4: 'x' }, 'ip4', /not an IPv4 address/],
    [{ ...POD, ip6: 'fd00:6e6e::2' }, 'ip6', /not in the pod subnet/],
    [{ ...POD, labels: { app: 1 } }, 'labels["app"]', /must be a string/],
    [{ ...POD, netnsPath: '/proc/1/ns/net' }, 'netnsPath', /not a network namespace of the runtime/],
    [{ ...POD, netnsPath: '/run/netns/../../proc/1/ns/net' }, 'netnsPath', /not an absolute, normalised path/],
    [{ ...POD, netnsPath: '/run/netns/a/b' }, 'netnsPath', /not a network namespace of the runtime/],
    [{ ...POD, cgroupPath: '/sys/fs/cgroup' }, 'cgroupPath', /not under this node's pod cgroups/],
    [{ ...POD, cgroupPath: '/sys/fs/cgroup/nodemesh/pods' }, 'cgroupPath', /not under this node's pod cgroups/],
    [{ ...POD, cgroupPath: 'relative/path' }, 'cgroupPath', /not an absolute/],
    [{ ...POD, serviceAccount: undefined }, 'serviceAccount', /must be a string/],
  ];
  for (const [pod, field, message] of bad) {
    assert.throws(() => checkPodFields(pod, EDGE), (e) => e instanceof PodFieldInvalid && e.field === field && message.test(e.message), field);
  }
  // Without a netns folder (a CNI's paths vary), any absolute path that names no parent passes.
  assert.equal(checkPodFields({ ...POD, netnsPath: '/var/run/netns/cni-1234' }, { podsCgroup: EDGE.podsCgroup }).netnsPath, '/var/run/netns/cni-1234');
});

test('subnets: addresses inside and outside', () => {
  assert.equal(cidrContains({ network: '10.200.0.0', prefix: 24 }, 4, '10.200.0.255'), true);
  assert.equal(cidrContains({ network: '10.200.0.0', prefix: 24 }, 4, '10.200.1.0'), false);
  assert.equal(cidrContains({ network: '10.200.0.0', prefix: 20 }, 4, '10.200.15.1'), true);
  assert.equal(cidrContains({ network: 'fd00:6e6d::', prefix: 64 }, 6, 'fd00:6e6d::ffff:1'), true);
  assert.equal(cidrContains({ network: 'fd00:6e6d::', prefix: 64 }, 6, 'fd00:6e6d:0:1::1'), false);
});

test("pod records: a bad record and a second claim of an address are problems naming the record; another node's pods are not this node's", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-unit-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  await mkdir(join(dir, 'pods'));
  const record = (over: Record<string, unknown>): string =>
    JSON.stringify({ ...POD, slot: 2, netns: 'x', hostVeth: 'v', bridge: 'b', command: ['true'], detached: true, logPath: null, pid: 1, phase: 'running', createdAt: '2026-01-01T00:00:00Z', node: 'node-a', ...over });
  // The netns of the good pod must exist for it to be listed: use one that does on any machine.
  const edge: PodEdge = { ...EDGE, netnsDir: '/proc/self/ns' };
  await writeFile(join(dir, 'pods', 'shop_a.json'), record({ name: 'a', netnsPath: '/proc/self/ns/net', cgroupPath: '/sys/fs/cgroup/nodemesh/pods/shop_a' }));
  await writeFile(join(dir, 'pods', 'shop_b.json'), record({ name: 'b', uid: '1f8fad5b-d9cb-469f-a165-70867728950e', netnsPath: '/proc/self/ns/net', cgroupPath: '/sys/fs/cgroup/nodemesh/pods/shop_b' }));
  await writeFile(join(dir, 'pods', 'shop_c.json'), record({ name: 'c', uid: '../../../../etc' }));
  // Node B's pod, even one that would be refused here, is neither listed nor a problem of node A.
  await writeFile(join(dir, 'pods', 'shop_d.json'), record({ name: 'd', uid: '../../../../tmp', node: 'node-b' }));
  const { pods, problems } = await new LocalRuntimePodSource(dir, 'node-a', edge).list();
  assert.deepEqual(
    problems.map((p) => [p.name, p.reason, p.message]),
    [
      // a passes the checks; its cgroup does not exist here, a problem of its own kind.
      ['a', 'cgroup_missing', 'cgroup /sys/fs/cgroup/nodemesh/pods/shop_a does not exist'],
      ['b', 'invalid_record', "pod record shop/b: address 10.200.0.2 is pod shop/a's"],
      ['c', 'invalid_record', 'pod record shop/c: uid: "../../../../etc" is not a UUID'],
    ],
  );
  assert.deepEqual(pods, []);
});
