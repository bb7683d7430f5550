/**
 * The addon on the real kernel: typed errors, map operations, pinning under our own bpffs
 * folder, and sk_lookup on a pod's netns steering a connection to a listener made in that netns.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { test } from 'node:test';

import { NM_ROLE_INBOUND, encodeAddr, encodeListenerKey, encodeOrigKey } from '../../src/datapath/abi.js';
import { OutboundCapture } from '../../src/datapath/capture.js';
import { BpfLink, BpfMap, BpfObject, closeFd, listenInNetns, netnsCookie, releaseNetns, socketCookie } from '../../src/datapath/native.js';
import { BPF_OBJECT_DIR } from '../../src/shared/paths.js';
import { isNodemeshError } from '../../src/shared/errors.js';
import { createSandbox, waitFor } from '../support/sandbox.js';

test('addon failures carry code, errno, syscall and the path involved', async (t) => {
  const sb = await createSandbox(t);
  const capture = await OutboundCapture.load();
  sb.defer(() => capture.close());
  const missing = `/sys/fs/cgroup/unified/${sb.config.cgroupSubtree}/no-such-pod`;
  await assert.rejects(capture.attach(missing), (e) => {
    assert.ok(isNodemeshError(e, 'NM_ERR_DATAPATH'));
    assert.equal(e.context.errnoCode, 'ENOENT');
    assert.equal(e.context.errno, 2);
    assert.equal(e.context.syscall, 'open');
    assert.equal(e.context.path, missing);
    return true;
  });
  await assert.rejects(BpfObject.load('/nonexistent/x.bpf.o'), (e) => isNodemeshError(e, 'NM_ERR_BPF_LOAD') && e.context.path === '/nonexistent/x.bpf.o');
  await assert.rejects(listenInNetns({ netns: '/run/netns/nmt-missing', host: '127.0.0.1', port: 1 }), (e) => isNodemeshError(e, 'NM_ERR_DATAPATH') && e.context.errnoCode === 'ENOENT' && e.context.path === '/run/netns/nmt-missing');
});

test('maps: update, lookup, iterate, delete; pins under our folder survive the object', async (t) => {
  const sb = await createSandbox(t);
  const capture = await OutboundCapture.load({ mapPinDir: sb.bpffsDir });
  const map = capture.object.map('nm_orig_dst');
  const key = encodeOrigKey({ netnsCookie: 42n, port: 40000, family: 4 });
  const value = encodeAddr({ family: 4, address: '10.96.0.10', port: 80 });
  map.update(key, value);
  assert.deepEqual(map.lookup(key), value);
  assert.deepEqual(map.keys(), [key]);
  assert.throws(() => map.update(Buffer.alloc(3), value), RangeError, 'a key of the wrong size is refused before the syscall');

  // The pinned map is the same map: a second handle sees the entry.
  const pinPath = join(sb.bpffsDir, 'nm_orig_dst');
  assert.ok(existsSync(pinPath));
  capture.close();
  const again = BpfMap.openPinned(pinPath);
  assert.deepEqual(again.lookup(key), value);
  assert.equal(again.delete(key), true);
  assert.equal(again.delete(key), false);
  assert.equal(again.lookup(key), null);
  again.close();

  // A reload reuses the pinned maps instead of making new ones.
  const reloaded = await OutboundCapture.load({ mapPinDir: sb.bpffsDir });
  sb.defer(() => reloaded.close());
  const fresh = reloaded.object.maps().find((m) => m.name === 'nm_orig_dst');
  assert.equal(fresh?.pinPath, pinPath);
});

test('a pinned link keeps capturing after its creator lets go, until detached', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole('10.96.0.11');
  const client = await sb.idlePod('pinned-a');
  const capture = await OutboundCapture.load({ mapPinDir: sb.bpffsDir });
  sb.defer(() => capture.close());
  const attached = await capture.attach(client.cgroupPath);
  const pinPath = join(sb.bpffsDir, 'link_connect4');
  attached.links[0]?.pin(pinPath);
  for (const link of attached.links) link.close();

  // connect4 is still attached through the pin: the dial is captured (and refused, as nothing
  // listens on 15001 in the pod), instead of failing for want of a route.
  const captured = await sb.dialFrom(client, '10.96.0.11', 80);
  assert.equal(captured.error, 'ECONNREFUSED');

  const link = BpfLink.openPinned(pinPath);
  link.unpin();
  link.detach();
  link.close();
  assert.equal(existsSync(pinPath), false);
  const after = await sb.dialFrom(client, '10.96.0.11', 80);
  assert.equal(after.error, 'ENETUNREACH');
});

test('sk_lookup on a pod netns steers inbound connections to the in-pod listener', async (t) => {
  const sb = await createSandbox(t);
  const server = await sb.idlePod('inbound-b');
  const client = await sb.idlePod('inbound-a');
  const object = await BpfObject.load(join(BPF_OBJECT_DIR, 'inbound.bpf.o'));
  sb.defer(() => object.close());
  const listeners = object.map('nm_pod_listeners');

  const fd = await listenInNetns({ netns: server.netnsPath, host: '0.0.0.0', port: 15006 });
  sb.defer(() => releaseNetns(server.netnsPath));
  assert.notEqual(netnsCookie(fd), 0n);
  assert.notEqual(socketCookie(fd), 0n);
  const fdValue = Buffer.alloc(8);
  fdValue.writeBigUInt64LE(BigInt(fd));
  listeners.update(encodeListenerKey({ family: 4, role: NM_ROLE_INBOUND, address: server.ip4 }), fdValue);

  const accepted: Array<{ localPort?: number; remoteAddress?: string }> = [];
  const proxy = createServer((s: Socket) => {
    accepted.push({ localPort: s.localPort, remoteAddress: s.remoteAddress });
    s.end('steered\n');
  });
  await new Promise<void>((resolve) => proxy.listen({ fd }, resolve));
  sb.defer(() => new Promise((resolve) => proxy.close(resolve)));

  // Nothing listens on 9999 in the pod: without steering the dial is refused.
  const before = await sb.dialFrom(client, server.ip4, 9999, { bytes: 0 });
  assert.equal(before.error, 'ECONNREFUSED');

  const link = await object.attachNetns('nm_sk_lookup', server.netnsPath);
  sb.defer(() => link.close());
  await sb.dialFrom(client, server.ip4, 9999, { bytes: 0 });
  await waitFor(() => accepted.length === 1, 5000, 'steered connection');
  assert.equal(accepted[0]?.localPort, 9999, 'the connection keeps the port the client dialed');
  assert.equal(accepted[0]?.remoteAddress, client.ip4);

  link.detach();
  const after = await sb.dialFrom(client, server.ip4, 9999, { bytes: 0 });
  assert.equal(after.error, 'ECONNREFUSED');
  assert.equal(accepted.length, 1);
});

test('in-pod sockets follow a netns path to a new pod that reuses it', async (t) => {
  const sb = await createSandbox(t);
  const client = await sb.idlePod('reuse-client');
  const first = await sb.idlePod('reuse');
  const fd1 = await listenInNetns({ netns: first.netnsPath, host: '0.0.0.0', port: 7000 });
  closeFd(fd1);
  await sb.runtime.remove(first, 200);
  // Same name, same netns path, a new namespace: the socket must be made in the new one.
  const second = await sb.idlePod('reuse');
  sb.defer(() => releaseNetns(second.netnsPath));
  const fd2 = await listenInNetns({ netns: second.netnsPath, host: '0.0.0.0', port: 7000 });
  const accepted: string[] = [];
  const server = createServer((s: Socket) => {
    accepted.push(s.remoteAddress ?? '');
    s.end();
  });
  await new Promise<void>((resolve) => server.listen({ fd: fd2 }, resolve));
  sb.defer(() => new Promise((resolve) => server.close(resolve)));
  const r = await sb.dialFrom(client, second.ip4, 7000, { bytes: 0 });
  assert.equal(r.error, undefined, JSON.stringify(r));
  assert.deepEqual(accepted, [client.ip4]);
});
