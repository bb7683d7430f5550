import assert from 'node:assert/strict';
import { test } from 'node:test';

import { parseCgroup2Mount } from '../../src/runtime/cgroup.js';
import { DEFAULT_RUNTIME, hostAddress, parseCidr, podCapacity, runtimeConfigFromEnv } from '../../src/runtime/config.js';
import { parseLabels, validatePodSpec } from '../../src/runtime/pod-spec.js';
import { isNodemeshError } from '../../src/shared/errors.js';
import { checkKernel, parseKernelRelease } from '../../src/cli/preflight.js';

test('pod addresses come from the configured subnets', () => {
  assert.equal(hostAddress({ network: '10.200.0.0', prefix: 24 }, 4, 2), '10.200.0.2');
  assert.equal(hostAddress({ network: '10.200.1.0', prefix: 23 }, 4, 300), '10.200.1.44');
  assert.equal(hostAddress({ network: 'fd00:6e6d::', prefix: 64 }, 6, 258), 'fd00:6e6d::102');
  assert.equal(podCapacity({ network: '10.0.0.0', prefix: 24 }), 253);
});

test('bad subnets, bridges and prefixes are rejected with the setting named', () => {
  assert.throws(() => parseCidr('10.0.0.0/33', 4, 'NODEMESH_POD_CIDR'), (e) => isNodemeshError(e, 'NM_ERR_INVALID_ARGUMENT') && e.context.field === 'NODEMESH_POD_CIDR');
  assert.throws(() => parseCidr('fd00::/48', 6, 'NODEMESH_POD_CIDR6'), /NODEMESH_POD_CIDR6/);
  assert.throws(() => runtimeConfigFromEnv({ NODEMESH_BRIDGE: 'a-name-that-is-too-long' }), /NODEMESH_BRIDGE/);
  assert.throws(() => runtimeConfigFromEnv({ NODEMESH_NAME_PREFIX: 'UPPER' }), /NODEMESH_NAME_PREFIX/);
  assert.deepEqual(runtimeConfigFromEnv({}), DEFAULT_RUNTIME);
});

test('pod specs follow Kubernetes naming rules', () => {
  const spec = validatePodSpec({ name: 'web-1', namespace: 'shop', labels: ['app=web', 'example.com/tier=front', 'empty='], command: ['sleep', '1'] });
  assert.deepEqual(spec.labels, { app: 'web', 'example.com/tier': 'front', empty: '' });
  assert.equal(spec.serviceAccount, 'default');

  const bad: Array<[() => unknown, string]> = [
    [() => validatePodSpec({ name: 'Web', command: ['x'] }), 'name'],
    [() => validatePodSpec({ name: 'a'.repeat(64), command: ['x'] }), 'name'],
    [() => validatePodSpec({ name: 'ok', namespace: 'bad_ns', command: ['x'] }), 'namespace'],
    [() => validatePodSpec({ name: 'ok', serviceAccount: 'SA!', command: ['x'] }), 'service-account'],
    [() => validatePodSpec({ name: 'ok', command: [] }), 'command'],
    [() => parseLabels(['novalue']), 'label'],
    [() => parseLabels(['-bad=x']), 'label -bad'],
    [() => parseLabels(['k=bad value']), 'label k'],
    [() => parseLabels(['Bad_Prefix/k=v']), 'label Bad_Prefix/k'],
    [() => parseLabels(['a=1', 'a=2']), 'label a'],
  ];
  for (const [fn, field] of bad) {
    assert.throws(fn, (e) => isNodemeshError(e, 'NM_ERR_POD_INVALID') && e.context.field === field, field);
  }
});

test('kernel and cgroup checks', () => {
  assert.deepEqual(parseKernelRelease('6.18.44-fc-v669'), [6, 18]);
  assert.doesNotThrow(() => checkKernel('5.15.0-91-generic'));
  assert.throws(() => checkKernel('5.10.0-28-amd64'), (e) => isNodemeshError(e, 'NM_ERR_KERNEL_TOO_OLD') && /5\.10/.test(e.message));
  assert.throws(() => checkKernel('4.19.0'), (e) => isNodemeshError(e, 'NM_ERR_KERNEL_TOO_OLD'));
  const hybrid = 'tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n';
  assert.equal(parseCgroup2Mount(hybrid), '/sys/fs/cgroup/unified');
  assert.equal(parseCgroup2Mount('cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n'), '/sys/fs/cgroup');
  assert.equal(parseCgroup2Mount('cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n'), null);
});
