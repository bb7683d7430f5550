/**
 * nodemesh-cni the way a container runtime calls it: cnitool (the CNI project's own runner) runs
 * a conflist of the reference `bridge` and `host-local` plugins (Debian's
 * containernetworking-plugins) with nodemesh-cni chained after them, on a real network namespace,
 * with the CNI_ARGS a kubelet's runtime passes (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID).
 * The Pod is a real object of a real API server bound to the agent's node; its cgroup is made
 * where the kubelet would have made it before the sandbox (no container yet). When ADD returns,
 * the pod is captured: the first connection of its first container goes through the proxy. Then
 * CHECK, DEL, VERSION, and the bad cases: no agent, a Pod the agent does not know, a netns that
 * does not exist, a garbled config. Each answers with a CNI error result in bounded time.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, readFile, rmdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';

import type { DialResult } from '../../src/cli/debug-tools.js';
import { findCgroup2Mount } from '../../src/runtime/cgroup.js';
import { agentRunDir } from '../../src/runtime/enrollment.js';
import { run } from '../../src/shared/exec.js';
import { CLI_ENTRY, PACKAGE_ROOT } from '../../src/shared/paths.js';
import { serviceYaml, startAgent } from '../support/agent.js';
import { cluster, kubectl, serviceAccountKubeconfig } from '../support/kube.js';
import { collect, createSandbox, waitFor } from '../support/sandbox.js';

const SVC = '10.96.0.80';
const PLUGIN = join(PACKAGE_ROOT, 'build', 'cni', 'nodemesh-cni');
const REFERENCE_PLUGINS = '/usr/lib/cni';

/** The plugin run directly, as a runtime would: its environment, its config on stdin. */
async function plugin(env: Record<string, string>, stdin: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(PLUGIN, [], { env, stdio: ['pipe', 'pipe', 'pipe'] });
  child.stdin.end(stdin);
  return collect(child);
}

interface CniRun {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
}

test('nodemesh-cni chained after bridge and host-local (cnitool, a real netns, a real Pod): ADD returns once the pod is captured, its first connection is the proxy\'s; CHECK, DEL, VERSION; no agent, an unknown Pod, a missing netns and a garbled config each get a CNI error in time', async (t) => {
  await cluster(t);
  await kubectl(['apply', '-f', join(PACKAGE_ROOT, 'daemonset')]);
  const kubeconfig = await serviceAccountKubeconfig('nodemesh-system', 'nodemesh-agent');
  // Built on first use (about 30 s), like the API server.
  const cnitool = (await run('bash', [join(PACKAGE_ROOT, 'scripts', 'cni-tools.sh')], { timeoutMs: 600_000 })).stdout.trim();
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const node = sb.config.node;

  // The network: a bridge of its own and a subnet no one else uses, host-local's state in the sandbox.
  const netName = `nm-${sb.id}`;
  const bridge = `nmc${sb.id}`;
  const netns = `nmcni-${sb.id}`;
  const subnet = `10.203.${1 + (parseInt(sb.id.slice(0, 2), 16) % 250)}.0/24`;
  // The node's CNI folders: the network plugin's config (bridge, host-local) as its installer
  // wrote it; nodemesh-cni's binary and its entry in that config are the agent's to add.
  const binDir = join(sb.config.stateDir, 'cni-bin');
  const confDir = join(sb.config.stateDir, 'cni-conf');
  await mkdir(binDir, { recursive: true });
  await mkdir(confDir, { recursive: true });
  const runDir = agentRunDir(sb.config.stateDir, node);
  const network = { cniVersion: '1.0.0', name: netName, plugins: [{ type: 'bridge', bridge, ipam: { type: 'host-local', ranges: [[{ subnet }]], dataDir: join(sb.config.stateDir, 'cni-ipam') } }] };
  const primary = join(confDir, '10-bridge.conflist');
  await writeFile(primary, JSON.stringify(network));
  // Before the agent: the same chain written by hand (the binary as built), for a node whose agent is down.
  const downConfDir = join(sb.config.stateDir, 'cni-conf-down');
  await mkdir(downConfDir, { recursive: true });
  await writeFile(join(downConfDir, '10-bridge.conflist'), JSON.stringify({ ...network, plugins: [...network.plugins, { type: 'nodemesh-cni', enrollSocket: join(runDir, 'enroll.sock'), timeoutSeconds: 10 }] }));
  await run('ip', ['netns', 'add', netns]);
  sb.defer(() => run('ip', ['netns', 'del', netns]).catch(() => undefined));
  sb.defer(() => run('ip', ['link', 'del', bridge]).catch(() => undefined));
  const netnsPath = `/run/netns/${netns}`;

  const cni = async (command: 'add' | 'check' | 'del', args: string, network = netName, dir = confDir, path = netnsPath): Promise<CniRun> => {
    const started = Date.now();
    const r = await collect(
      spawn(cnitool, [command, network, path], {
        env: { ...process.env, CNI_PATH: `${REFERENCE_PLUGINS}:${dir === downConfDir ? join(PACKAGE_ROOT, 'build', 'cni') : binDir}`, NETCONFPATH: dir, CNI_ARGS: args, CNI_IFNAME: 'eth0' },
        stdio: ['ignore', 'pipe', 'pipe'],
      }),
    );
    return { ...r, ms: Date.now() - started };
  };
  const podArgs = (name: string, uid: string): string => `IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=${name};K8S_POD_INFRA_CONTAINER_ID=sandbox-${name};K8S_POD_UID=${uid}`;

  // The Pod, bound to the node; its cgroup as the kubelet makes it before the sandbox starts.
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'web', namespace: 'default', labels: { app: 'web' } }, spec: { nodeName: node, automountServiceAccountToken: false, containers: [{ name: 'app', image: 'example.invalid/web:1' }] } }));
  const uid = (await kubectl(['get', 'pod', 'web', '-n', 'default', '-o', 'jsonpath={.metadata.uid}'])).trim();
  const root = join(await findCgroup2Mount(), sb.config.cgroupSubtree, 'host');
  const podCgroup = join(root, 'kubepods.slice', 'kubepods-besteffort.slice', `kubepods-besteffort-pod${uid.replace(/-/g, '_')}.slice`);
  const container = join(podCgroup, 'cri-containerd-0123456789ab.scope');
  // (The sandbox's cgroup subtree, root's parent, is removed with the sandbox.)
  await mkdir(root, { recursive: true });
  sb.defer(() => rmdir(root).catch(() => undefined));
  for (const dir of [join(root, 'kubepods.slice'), join(root, 'kubepods.slice', 'kubepods-besteffort.slice'), podCgroup]) {
    await mkdir(dir);
    sb.defer(() => rmdir(dir).catch(() => undefined));
  }

  // The plugin as the runtime's CNI library calls it, with the previous plugin's result: the
  // error results a runtime gets (cnitool prints only their text).
  const direct = (command: string, name: string, podUid: string, path: string, conf: Record<string, unknown> = {}): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    plugin(
      { CNI_COMMAND: command, CNI_CONTAINERID: `sandbox-${name}`, CNI_NETNS: path, CNI_IFNAME: 'eth0', CNI_PATH: REFERENCE_PLUGINS, CNI_ARGS: podArgs(name, podUid) },
      JSON.stringify({ cniVersion: '1.0.0', name: netName, type: 'nodemesh-cni', enrollSocket: join(runDir, 'enroll.sock'), timeoutSeconds: 10, ...conf, prevResult: { cniVersion: '1.0.0', interfaces: [{ name: 'eth0', sandbox: path }], ips: [{ address: '10.203.250.9/24', interface: 0 }] } }),
    );
  const errorOf = (r: { code: number | null; stdout: string }): { code: number; msg: string } => {
    assert.notEqual(r.code, 0, r.stdout);
    return JSON.parse(r.stdout) as { code: number; msg: string };
  };

  // ADD with no agent on the node: refused at once ("try again later"), the pod does not start.
  const noAgent = await cni('add', podArgs('web', uid), netName, downConfDir);
  assert.notEqual(noAgent.code, 0);
  assert.match(noAgent.stderr, /no nodemesh agent answers on .*pod default\/web is not started outside the mesh/);
  assert.equal(errorOf(await direct('ADD', 'web', uid, netnsPath)).code, 11);
  await cni('del', podArgs('web', uid), netName, downConfDir);

  const agent = await startAgent(sb, { 'svc.yaml': serviceYaml('web', [SVC], { app: 'web' }, 80, 8080) }, { args: ['--source', 'kubernetes', '--kubeconfig', kubeconfig, '--cgroup-root', root, '--cni-bin-dir', binDir, '--cni-conf-dir', confDir, '--cni-timeout', '10s'] });
  // Installed: the binary, and the entry chained last in the network config.
  const installed = JSON.parse(await readFile(primary, 'utf8')) as { plugins: Array<{ type: string; enrollSocket?: string }> };
  assert.deepEqual(installed.plugins.map((p) => p.type), ['bridge', 'nodemesh-cni']);
  assert.equal(installed.plugins[1]?.enrollSocket, join(runDir, 'enroll.sock'));
  assert.ok((await stat(join(binDir, 'nodemesh-cni'))).isFile());

  // ADD: bridge and host-local give the pod eth0 and an address; nodemesh-cni returns once the agent has it captured.
  const added = await cni('add', podArgs('web', uid));
  assert.equal(added.code, 0, `${added.stdout} ${added.stderr}`);
  const result = JSON.parse(added.stdout) as { ips: Array<{ address: string }> };
  const ip4 = result.ips[0]?.address.split('/')[0] ?? '';
  assert.ok(ip4.startsWith(subnet.split('.').slice(0, 3).join('.')), `the bridge plugin's result passes through: ${added.stdout}`);
  const enrolled = (await agent.pods()).find((p) => p.uid === uid);
  assert.ok(enrolled?.verified, `captured and verified when ADD returned: ${JSON.stringify(enrolled)}`);
  assert.equal(enrolled?.ip4, ip4);

  // The first container starts: its very first connection, to the Service (no route for it
  // exists in the pod), is served by the proxy.
  await mkdir(container);
  sb.defer(() => rmdir(container).catch(() => undefined));
  sb.startIn({ cgroupPath: container, netns }, [process.execPath, CLI_ENTRY, 'debug', 'echo-server', '--port', '8080']);
  const dial = (): Promise<DialResult> => sb.dialFrom({ name: 'web', cgroupPath: container, netns }, SVC, 80, { bytes: 2048 });
  // The echo server needs a moment to listen; the capture does not (a refusal is the proxy's).
  await waitFor(async () => (await dial()).intact, 10_000, 'the pod reaches its Service through the proxy');
  // The kubelet then reports the sandbox's address: the Pod as the API says it takes over from the hand-over.
  await kubectl(['patch', 'pod', 'web', '-n', 'default', '--subresource=status', '--type=merge', '-p', JSON.stringify({ status: { phase: 'Running', podIP: ip4, podIPs: [{ ip: ip4 }] } })]);

  // CHECK: captured, so no error.
  const checked = await cni('check', podArgs('web', uid));
  assert.equal(checked.code, 0, `${checked.stdout} ${checked.stderr}`);

  // VERSION, as a runtime asks it.
  const version = await plugin({ CNI_COMMAND: 'VERSION' }, '{"cniVersion":"1.0.0"}');
  assert.deepEqual((JSON.parse(version.stdout) as { supportedVersions: string[] }).supportedVersions, ['0.4.0', '1.0.0', '1.1.0']);

  // A Pod the API server has not bound here (or that does not exist): the agent waits for it
  // until the plugin's timeout, then the runtime gets "try again later", never a hang.
  const otherNetns = `nmcni2-${sb.id}`;
  await run('ip', ['netns', 'add', otherNetns]);
  sb.defer(() => run('ip', ['netns', 'del', otherNetns]).catch(() => undefined));
  const started = Date.now();
  const unknown = errorOf(await direct('ADD', 'ghost', '0f0e0d0c-0b0a-4909-8807-060504030201', `/run/netns/${otherNetns}`, { timeoutSeconds: 2 }));
  const took = Date.now() - started;
  assert.equal(unknown.code, 11, unknown.msg);
  assert.match(unknown.msg, /Pod default\/ghost .* is not known from the Kubernetes API/);
  assert.ok(took >= 1900 && took < 6000, `answered after the 2 s timeout, not a hang: ${took} ms`);

  // A network namespace that does not exist: refused by the agent, named.
  const missing = errorOf(await direct('ADD', 'web', uid, `/run/netns/nmcni-missing-${sb.id}`));
  assert.equal(missing.code, 100, missing.msg);
  assert.match(missing.msg, /netnsPath: .* does not exist/);

  // A garbled config on stdin: a CNI error result (decoding failure), not a crash.
  const garbled = errorOf(await plugin({ CNI_COMMAND: 'ADD', CNI_CONTAINERID: 'x', CNI_NETNS: netnsPath, CNI_IFNAME: 'eth0', CNI_PATH: REFERENCE_PLUGINS, CNI_ARGS: podArgs('web', uid) }, '{"cniVersion": "1.0.0", "name": '));
  assert.equal(garbled.code, 6, garbled.msg);
  // Without the previous plugin's result (not chained): named.
  const unchained = errorOf(await plugin({ CNI_COMMAND: 'ADD', CNI_CONTAINERID: 'x', CNI_NETNS: netnsPath, CNI_IFNAME: 'eth0', CNI_PATH: REFERENCE_PLUGINS, CNI_ARGS: podArgs('web', uid) }, JSON.stringify({ cniVersion: '1.0.0', name: netName, type: 'nodemesh-cni', enrollSocket: join(runDir, 'enroll.sock') })));
  assert.match(unchained.msg, /chained plugin/);

  // DEL: the pod stops being an endpoint; the network plugins release its address.
  const deleted = await cni('del', podArgs('web', uid));
  assert.equal(deleted.code, 0, `${deleted.stdout} ${deleted.stderr}`);
  await kubectl(['delete', 'pod', 'web', '-n', 'default', '--grace-period=0', '--force']);
  await agent.waitForPods((p) => !p.some((x) => x.uid === uid), 'the pod unenrolled once its Pod is gone');

  // The agent stops: the node's network config is as the network plugin wrote it, the binary gone.
  await agent.kill('SIGTERM');
  assert.deepEqual(JSON.parse(await readFile(primary, 'utf8')), network);
  await assert.rejects(stat(join(binDir, 'nodemesh-cni')), { code: 'ENOENT' });
});
