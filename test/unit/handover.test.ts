import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect, createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { checkBeginRequest, HANDOVER_PROTOCOL } from '../../src/agent/handover.js';
import { closeFd, fdsListen, fdsReceive, fdsSend } from '../../src/datapath/native.js';
import { isNodemeshError } from '../../src/shared/errors.js';

test('handover begin: only this protocol, a process id, and a socket of the run folder named for that process', () => {
  const runDir = '/var/run/nodemesh';
  const ok = { protocol: HANDOVER_PROTOCOL, pid: 4242, socket: '/var/run/nodemesh/handover-4242.sock' };
  assert.deepEqual(checkBeginRequest(ok, runDir), ok);
  const refused = (value: unknown, message: RegExp): void => {
    assert.throws(
      () => checkBeginRequest(value, runDir),
      (e: unknown) => isNodemeshError(e) && e.code === 'NM_ERR_AGENT_RUNNING' && message.test(e.message),
    );
  };
  refused(null, /not an object/);
  refused({ ...ok, protocol: HANDOVER_PROTOCOL + 1 }, /protocol 2 is not this agent's \(1\)/);
  refused({ ...ok, protocol: undefined }, /protocol undefined/);
  refused({ ...ok, pid: 0 }, /pid must be a process id/);
  refused({ ...ok, pid: '4242' }, /pid must be a process id/);
  // The old agent connects to the socket it is given: never one outside its run folder.
  refused({ ...ok, socket: '/tmp/handover-4242.sock' }, /socket must be \/var\/run\/nodemesh\/handover-4242.sock/);
  refused({ ...ok, socket: '/var/run/nodemesh/../x/handover-4242.sock' }, /socket must be/);
  refused({ ...ok, socket: '/var/run/nodemesh/handover-4243.sock' }, /socket must be/);
});

test('descriptor passing: a listening socket sent with SCM_RIGHTS is the same socket on the other side', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'nodemesh-fds-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const original = createServer();
  await new Promise<void>((resolve) => original.listen(0, '127.0.0.1', resolve));
  const port = (original.address() as AddressInfo).port;
  const fd = (original as unknown as { _handle: { fd: number } })._handle.fd;

  const path = join(dir, 'handover-1.sock');
  const listenFd = fdsListen(path);
  t.after(() => closeFd(listenFd));
  const received = fdsReceive(listenFd, 5000);
  fdsSend(path, [{ data: JSON.stringify({ pod: 'a' }), fds: [fd] }, { data: '{"done":true}', fds: [] }], 2000);
  const { peerPid, messages } = await received;
  assert.equal(peerPid, process.pid);
  assert.deepEqual(messages.map((m) => [JSON.parse(m.data), m.fds.length]), [[{ pod: 'a' }, 1], [{ done: true }, 0]]);
  const copy = messages[0]?.fds[0];
  assert.ok(copy !== undefined && copy !== fd, 'a descriptor of its own');

  // The original stops accepting: a connection to its port is accepted on the copy.
  await new Promise<void>((resolve) => original.close(() => resolve()));
  const served = createServer((s) => s.end('from the copy'));
  await new Promise<void>((resolve) => served.listen({ fd: copy }, resolve));
  t.after(() => served.close());
  const answer = await new Promise<string>((resolve, reject) => {
    const c = connect(port, '127.0.0.1');
    let text = '';
    c.on('data', (d: Buffer) => (text += d.toString()));
    c.on('end', () => resolve(text));
    c.on('error', reject);
  });
  assert.equal(answer, 'from the copy');

  // Nobody listening: the sender's error names the socket.
  assert.throws(() => fdsSend(join(dir, 'nobody.sock'), [{ data: '{}', fds: [] }], 500), /nobody\.sock/);
  // Nobody sending: the receiver gives up at its deadline.
  const lonely = fdsListen(join(dir, 'handover-2.sock'));
  t.after(() => closeFd(lonely));
  await assert.rejects(fdsReceive(lonely, 100), /ETIMEDOUT|timed out/);
});
