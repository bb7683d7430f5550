/**
 * The L4 data path against what one pod or one connection can do to the node (issue 11): each
 * test reproduces the attack or fault on the real kernel.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, readdir, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';

import { findCgroup2Mount } from '../../src/runtime/cgroup.js';
import { nodeCgroup } from '../../src/runtime/config.js';
import { run } from '../../src/shared/exec.js';
import { validatePodSpec } from '../../src/runtime/pod-spec.js';
import { waitForListener } from '../../src/runtime/wait.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import type { DialResult } from '../../src/cli/debug-tools.js';
import { metricValue, serviceYaml, startAgent } from '../support/agent.js';
import { cli, collect, createSandbox, readConnectionLog, waitFor } from '../support/sandbox.js';

const SVC = '10.96.0.70';

/**
 * eth0's link-local address in a pod, once duplicate address detection is over (a tentative
 * address takes no connection at all, steered or not).
 */
async function linkLocalOf(netns: string): Promise<string> {
  let linkLocal = '';
  await waitFor(async () => {
    const links = JSON.parse((await run('ip', ['-n', netns, '-j', '-6', 'addr', 'show', 'dev', 'eth0', 'scope', 'link'])).stdout) as Array<{ addr_info: Array<{ local?: string; tentative?: boolean }> }>;
    const a = links[0]?.addr_info.find((x) => x.local?.startsWith('fe80:'));
    linkLocal = a?.local ?? '';
    return a !== undefined && a.tentative !== true;
  }, 10_000, 'a usable link-local address');
  return linkLocal;
}

async function openFds(pid: number | undefined): Promise<number> {
  return (await readdir(`/proc/${pid ?? 0}/fd`)).length;
}

test('inbound: a connection to a proxy port (podIP:15006, podIP:15001, 127.0.0.1:15006 in the pod) is refused at once, never delivered to the proxy again', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const server = await sb.echoPod('server', 8080, ['app=server']);
  const client = await sb.idlePod('client', ['app=client']);
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }) });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'both pods verified');
  // Warm up: a normal inbound connection works, and the agent's fds settle.
  assert.ok((await sb.dialFrom(client, server.record.ip4, 8080)).intact);
  const before = { fds: await openFds(agent.child.pid), inbound: metricValue(await agent.metrics(), 'nodemesh_proxied_connections_total', { path: 'inbound' }) };

  for (const [host, port] of [[server.record.ip4, 15006], [server.record.ip4, 15001], [server.record.ip6, 15006]] as const) {
    const r = await sb.dialFrom(client, host, port);
    assert.equal(r.ok, false, `${host}:${port} must not be served`);
    // The client's own proxy takes the connection (capture) and finds nothing listening on the
    // server pod's address: the client gets a reset, at once.
    assert.match(r.error ?? '', /^(ECONNRESET|ECONNREFUSED)$/, `${host}:${port}: ${JSON.stringify(r)}`);
  }
  // From inside the server pod, to the listener's own loopback address: accepted by the kernel,
  // then reset by the proxy instead of delivered.
  const own = collect(sb.runtime.exec(server.record, [process.execPath, CLI_ENTRY, 'debug', 'dial', '127.0.0.1', '15006', '--bytes', '100'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const inPod = JSON.parse((await own).stdout.trim().split('\n').pop() ?? '{}') as DialResult;
  assert.equal(inPod.ok, false);
  assert.match(inPod.error ?? '', /ECONNRESET|EPIPE/, JSON.stringify(inPod));

  const m = await agent.metrics();
  assert.equal(metricValue(m, 'nodemesh_connections_refused_total', { direction: 'inbound', reason: 'proxy_port' }), 1);
  assert.equal(metricValue(m, 'nodemesh_proxied_connections_total', { path: 'inbound' }), before.inbound, 'nothing was delivered (no loop)');
  assert.ok((await openFds(agent.child.pid)) <= before.fds + 2, 'the agent holds no more sockets than before');
  // And the pod is served as before.
  assert.ok((await sb.dialFrom(client, server.record.ip4, 8080)).intact);
});

for (const relayMode of ['kernel', 'js'] as const) {
  test(`relay (${relayMode}): an upstream that sends half a response and resets makes the client see a reset, not a clean end; counted`, async (t) => {
    const sb = await createSandbox(t);
    await sb.blackhole(SVC);
    const spec = validatePodSpec({ name: 'dies', labels: ['app=dies'], command: [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', '8080', '--reset-after', '5000'] });
    const { record: server } = await sb.runtime.start(await sb.runtime.create(spec, { detached: true }));
    await waitForListener(server.ip4, 8080, 10_000);
    const client = await sb.idlePod('client', ['app=client']);
    const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('dies', [SVC], { app: 'dies' }) }, { args: ['--relay', relayMode] });
    await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'both pods verified');
    for (let i = 0; i < 5; i++) {
      const r = await sb.dialFrom(client, SVC, 80, { bytes: 100 });
      assert.equal(r.ok, false, JSON.stringify(r));
      assert.equal(r.error, 'ECONNRESET', `the client sees the upstream's reset: ${JSON.stringify(r)}`);
    }
    const m = await agent.metrics();
    assert.equal(metricValue(m, 'nodemesh_relay_abnormal_ends_total', { reason: 'reset' }), 5);
  });
}

test('fd exhaustion: under a 512 open file limit, one pod opening 1000 connections is held to its share, refused with a counted reason, and the agent serves on', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  await sb.echoPod('server', 8080, ['app=server']);
  const client = await sb.idlePod('client', ['app=client']);
  // Soft 256, hard 512: the agent raises its soft limit to the hard one at start.
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }) }, { prefix: ['prlimit', '--nofile=256:512', '--'] });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'both pods verified');
  assert.match(agent.log(), /"soft":512,"hard":512,"msg":"open file limit"/);

  const flood = await collect(sb.runtime.exec(client, ['prlimit', '--nofile=4096', '--', process.execPath, CLI_ENTRY, 'debug', 'flood', SVC, '80', '--connections', '1000', '--hold', '3000'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const result = JSON.parse(flood.stdout.trim().split('\n').pop() ?? '{}') as { held: number; failed: Record<string, number> };
  assert.equal(agent.child.exitCode, null, `the agent is still up: ${agent.log().slice(-2000)}`);
  assert.ok(result.held > 0, `some connections were served: ${flood.stdout}${flood.stderr}`);
  // (512 - reserved - the pods' own fds) / 6 fds a connection, half of it for one pod.
  assert.ok(result.held <= 40, `the pod was held to its share: ${JSON.stringify(result)}`);
  const m = await agent.metrics();
  const limited = metricValue(m, 'nodemesh_connections_refused_total', { direction: 'outbound', reason: 'connection_limit' });
  assert.ok(limited >= 900, `refusals counted: ${limited}`);
  assert.equal(metricValue(m, 'nodemesh_connections_refused_total', { reason: 'internal_error' }), 0);
  // The flood is over: the pod is served as before.
  for (let i = 0; i < 3; i++) assert.ok((await sb.dialFrom(client, SVC, 80)).intact);
});

test('marks: a pod process that marks its socket with the proxy mark or any other is still captured and served through the mesh', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  await sb.echoPod('server', 8080, ['app=server']);
  const client = await sb.idlePod('client', ['app=client']);
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }) });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'both pods verified');
  // The pod's process has a container's capabilities (CAP_NET_RAW, enough for SO_MARK), not root's.
  for (const mark of ['0x539', '0x53a', '0x1']) {
    const r = await collect(sb.runtime.exec(client, [process.execPath, CLI_ENTRY, 'debug', 'dial', SVC, '80', '--bytes', '512', '--mark-value', mark], { stdio: ['ignore', 'pipe', 'pipe'] }));
    const result = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as DialResult;
    assert.equal(result.intact, true, `mark ${mark}: ${r.stdout}${r.stderr}`);
  }
  assert.equal(metricValue(await agent.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', source_workload: 'client' }), 3, 'all three through the proxy');
  // And it cannot do what only the node may: no CAP_NET_ADMIN in a pod.
  const caps = await collect(sb.runtime.exec(client, ['sh', '-c', 'grep CapEff /proc/self/status'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const eff = BigInt(`0x${caps.stdout.trim().split(/\s+/).pop() ?? '0'}`);
  assert.equal(eff & (1n << 12n), 0n, 'no CAP_NET_ADMIN');
  assert.equal(eff & (1n << 21n), 0n, 'no CAP_SYS_ADMIN');
  assert.notEqual(eff & (1n << 13n), 0n, 'CAP_NET_RAW, as a container has');
});

test('stalled connects: 20 connects to an endpoint that drops SYNs hold no thread; another pod is served as usual meanwhile', async (t) => {
  const sb = await createSandbox(t);
  const STUCK = '10.96.0.71';
  await sb.blackhole(SVC);
  await sb.blackhole(STUCK);
  await sb.echoPod('server', 8080, ['app=server']);
  const stuck = await sb.echoPod('stuck', 9090, ['app=stuck']);
  // The stuck pod drops every SYN to its port (nftables in its own netns): connects hang.
  const nft = (...args: string[]): Promise<unknown> => run('ip', ['netns', 'exec', stuck.record.netns, 'nft', ...args]);
  await nft('add', 'table', 'inet', 'nmt');
  await nft('add', 'chain', 'inet', 'nmt', 'input', '{ type filter hook input priority 0 ; }');
  await nft('add', 'rule', 'inet', 'nmt', 'input', 'tcp', 'dport', '9090', 'tcp', 'flags', 'syn', 'drop');
  const stalling = await sb.idlePod('stalling', ['app=stalling']);
  const healthy = await sb.idlePod('healthy', ['app=healthy']);
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }) + '---\n' + serviceYaml('stuck', [STUCK], { app: 'stuck' }, 80, 9090) });
  await agent.waitForPods((p) => p.length === 4 && p.every((x) => x.verified), 'pods verified');

  const flood = collect(sb.runtime.exec(stalling, [process.execPath, CLI_ENTRY, 'debug', 'flood', STUCK, '80', '--connections', '20', '--hold', '4000'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  await agent.waitForPods((p) => (p.find((x) => x.name === 'stalling')?.connections ?? 0) >= 20, 'twenty connects in flight');
  // libuv has four pool threads: with connects waiting on them, these would queue for the
  // connect timeout (5 s). Waited for on the relay's epoll thread, they take what they take.
  for (let i = 0; i < 5; i++) {
    const r = await sb.dialFrom(healthy, SVC, 80);
    assert.ok(r.intact, JSON.stringify(r));
    assert.ok((r.connectMs ?? 0) + r.totalMs < 2000, `served while 20 connects hang: ${JSON.stringify(r)}`);
  }
  const result = JSON.parse((await flood).stdout.trim().split('\n').pop() ?? '{}') as { held: number };
  assert.equal(result.held, 20, 'the stalled connections were held open by the proxy, not refused');
});

test('inbound fail-closed: with the agent stopped an enrolled pod gets no connection around the proxy; its link-local address is steered and refused, never served directly', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const server = await sb.echoPod('server', 8080, ['app=server']);
  const log = join(sb.config.stateDir, 'server.connections.jsonl');
  const mesh = 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {failClosedEnrollment: "true"}\n';
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }), 'mesh.yaml': mesh });
  await agent.waitForPods((p) => p.length === 1 && p.every((x) => x.verified), 'server verified');
  const linkLocal = await linkLocalOf(server.record.netns);

  // From outside the pod (the host, on the pods' bridge) to the pod's link-local address.
  const before = (await readConnectionLog(log)).length;
  const ll = await cli(['debug', 'dial', `${linkLocal}%${sb.config.bridge}`, '8080', '--bytes', '100', '--timeout', '3000'], sb.env);
  assert.notEqual(ll.code, 0, `the link-local address is not served around the proxy: ${ll.stdout}`);
  assert.equal(metricValue(await agent.metrics(), 'nodemesh_connections_refused_total', { direction: 'inbound', reason: 'link_local' }), 1, `steered to the proxy, which refused it: ${ll.stdout}${ll.stderr}`);

  // The agent goes (its pinned links stay): the listener is gone, and in fail-closed mode
  // sk_lookup drops the connection rather than letting it reach the application.
  await agent.kill('SIGKILL');
  const direct = await cli(['debug', 'dial', server.record.ip4, '8080', '--bytes', '100', '--timeout', '1500'], sb.env);
  assert.notEqual(direct.code, 0, `not delivered while no agent runs: ${direct.stdout}`);
  assert.equal((await readConnectionLog(log)).length, before, 'the application saw neither connection');
});

test('fail-closed gate: an unverified pod sends no UDP but DNS, and no ICMP from a raw socket; a verified pod sends what it wants', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const server = await sb.echoPod('server', 8080, ['app=server']);
  const client = await sb.idlePod('client', ['app=client']);
  const mesh = 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {failClosedEnrollment: "true"}\n';
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }), 'mesh.yaml': mesh });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'pods verified');

  // Receivers in the server pod count the datagrams that arrive on a port, for 6 s.
  const receiver = (port: number): Promise<{ stdout: string }> =>
    collect(
      sb.runtime.exec(server.record, [process.execPath, '-e', `const s=require('dgram').createSocket('udp4');let n=0;s.on('message',()=>n++);s.bind(${port},()=>console.log('ready'));setTimeout(()=>{console.log('got '+n);process.exit(0)},6000)`], { stdio: ['ignore', 'pipe', 'pipe'] }),
    );
  const other = receiver(9999);
  const dns = receiver(53);
  await new Promise((r) => setTimeout(r, 1000));
  const send = `const s=require('dgram').createSocket('udp4');s.send('x',Number(process.argv[2]),process.argv[1],(e)=>{console.log(e?e.code:'sent');s.close()})`;
  // A process in the pods' cgroup tree the agent has not verified (it does not know it at all).
  const podsCgroup = nodeCgroup(await findCgroup2Mount(), sb.config, sb.config.node);
  const intruder = join(podsCgroup, 'not-yet-enrolled');
  await mkdir(intruder);
  sb.defer(() => rmdir(intruder));
  const fromCgroup = (cgroup: string, port: number): Promise<{ stdout: string }> =>
    collect(spawn('sh', ['-c', 'echo $$ > "$0/cgroup.procs" && exec ip netns exec "$1" "$2" -e "$3" "$4" "$5"', cgroup, client.netns, process.execPath, send, server.record.ip4, String(port)], { stdio: ['ignore', 'pipe', 'pipe'] }));
  await fromCgroup(intruder, 9999);
  await fromCgroup(intruder, 53);
  // A verified pod is not gated, nor are its containers (child cgroups of the pod's, as the
  // kubelet makes them); a container cgroup under the unverified one is gated like it.
  await collect(sb.runtime.exec(client, [process.execPath, '-e', send, server.record.ip4, '9999'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const containers = [join(client.cgroupPath, 'app'), join(client.cgroupPath, 'sidecar'), join(intruder, 'app')];
  for (const c of containers) {
    await mkdir(c);
    sb.defer(() => rmdir(c));
  }
  for (const c of containers) await fromCgroup(c, 9999);
  assert.match((await other).stdout, /got 3\b/, "only the verified pod's datagram and its two containers' arrived on 9999");
  assert.match((await dns).stdout, /got 1\b/, 'the unverified pod\'s DNS datagram arrived on 53');

  // ICMP from a raw socket (a pod has CAP_NET_RAW): an echo request, answered by the server
  // pod's kernel. The unverified process's never leaves; the verified pod's is answered.
  const ping = [
    'import socket,sys,struct',
    's=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP); s.settimeout(2)',
    'def csum(b):',
    '  t=sum(struct.unpack("!%dH"%(len(b)//2),b)); t=(t>>16)+(t&0xffff); t+=t>>16; return ~t&0xffff',
    'h=struct.pack("!BBHHH",8,0,0,0x4e4d,1)+b"nodemesh"; h=h[:2]+struct.pack("!H",csum(h))+h[4:]',
    'try: s.sendto(h,(sys.argv[1],0))',
    'except PermissionError: print("EPERM"); sys.exit(0)',
    'try:',
    '  while True:',
    '    d,a=s.recvfrom(1500)',
    '    if d[20]==0: print("reply"); break',
    'except socket.timeout: print("timeout")',
  ].join('\n');
  const pingFromIntruder = await collect(spawn('sh', ['-c', 'echo $$ > "$0/cgroup.procs" && exec ip netns exec "$1" python3 -c "$2" "$3"', intruder, client.netns, ping, server.record.ip4], { stdio: ['ignore', 'pipe', 'pipe'] }));
  assert.match(pingFromIntruder.stdout, /^(EPERM|timeout)$/m, `the unverified process's ICMP is dropped: ${pingFromIntruder.stdout}${pingFromIntruder.stderr}`);
  const pingFromClient = await collect(sb.runtime.exec(client, ['python3', '-c', ping, server.record.ip4], { stdio: ['ignore', 'pipe', 'pipe'] }));
  assert.match(pingFromClient.stdout, /^reply$/m, `the verified pod's ICMP is answered: ${pingFromClient.stdout}${pingFromClient.stderr}`);
});

test('metrics: a pod dialling 5,000 distinct passthrough ports adds no series per destination', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const spec = validatePodSpec({ name: 'many', labels: ['app=many'], command: [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', '8080', '--port-range', '20000-24999'] });
  const { record: server } = await sb.runtime.start(await sb.runtime.create(spec, { detached: true }));
  await waitForListener(server.ip4, 24999, 30_000);
  const client = await sb.idlePod('client', ['app=client']);
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'many' }) });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'pods verified');
  const series = (m: string): number => m.split('\n').filter((l) => l.startsWith('istio_tcp_connections_opened_total{')).length;
  const r = await collect(sb.runtime.exec(client, [process.execPath, CLI_ENTRY, 'debug', 'dial-ports', server.ip4, '20000-24999', '--parallel', '32'], { stdio: ['ignore', 'pipe', 'pipe'] }));
  const result = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { ok: number; failed: number };
  assert.equal(result.ok, 5000, `${r.stdout}${r.stderr}`);
  const m = await agent.metrics();
  // One series per reporter for all of them: the destination is PassthroughCluster, not ip:port.
  assert.ok(series(m) <= 2, `series: ${m.split('\n').filter((l) => l.startsWith('istio_tcp_connections_opened_total{')).join('\n')}`);
  assert.equal(metricValue(m, 'istio_tcp_connections_opened_total', { reporter: 'source', destination_service: 'PassthroughCluster' }), 5000);
});

test('link-local passthrough: a pod dialling another pod\'s link-local address is captured and reaches it through its own interface', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  // Outside the mesh (opted out): its link-local address is a plain passthrough destination.
  const outside = await sb.echoPod('outside', 8080, ['app=outside', 'nodemesh.io/capture=disabled']);
  const client = await sb.idlePod('client', ['app=client']);
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }) });
  await agent.waitForPods((p) => p.length === 1 && p.every((x) => x.verified), 'client verified');
  const linkLocal = await linkLocalOf(outside.record.netns);
  // The client pod's own interface is eth0 too: the application names the scope as it would.
  const r = await sb.dialFrom(client, `${linkLocal}%eth0`, 8080);
  assert.ok(r.intact, JSON.stringify(r));
  assert.equal(metricValue(await agent.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', source_workload: 'client', destination_service: 'PassthroughCluster' }), 1, 'through the proxy');
});

test('MPTCP: a pod dialling a Service with a Multipath TCP socket is captured and served (it falls back to TCP with the proxy)', async (t) => {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  await sb.echoPod('server', 8080, ['app=server']);
  const client = await sb.idlePod('client', ['app=client']);
  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }) });
  await agent.waitForPods((p) => p.length === 2 && p.every((x) => x.verified), 'pods verified');
  const script = [
    'import socket,sys',
    's=socket.socket(socket.AF_INET,socket.SOCK_STREAM,262); s.settimeout(5)',
    's.connect((sys.argv[1],80)); s.sendall(b"nodemesh-mptcp"); s.shutdown(socket.SHUT_WR)',
    'got=b""',
    'while True:',
    '  d=s.recv(100)',
    '  if not d: break',
    '  got+=d',
    'print(got.decode())',
  ].join('\n');
  const r = await collect(sb.runtime.exec(client, ['python3', '-c', script, SVC], { stdio: ['ignore', 'pipe', 'pipe'] }));
  assert.equal(r.stdout.trim(), 'nodemesh-mptcp', `${r.stdout}${r.stderr}`);
  assert.equal(metricValue(await agent.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', source_workload: 'client' }), 1, 'through the proxy');
});
