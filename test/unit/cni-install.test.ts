/**
 * The agent's CNI installer on real folders: nodemesh-cni's binary goes into the bin folder and
 * its entry to the end of the node's network config; a network plugin that writes its config
 * again gets the entry put back; a single-plugin .conf becomes a conflist; a node with no network
 * config yet gets it once one appears; stop leaves the config as the network plugin wrote it.
 */
import assert from 'node:assert/strict';
import { readdir, readFile, stat, writeFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { test } from 'node:test';

import { CniInstaller } from '../../src/agent/cni-install.js';
import { waitFor } from '../support/sandbox.js';
import { scratch } from '../support/scratch.js';

const BRIDGE = { cniVersion: '1.0.0', name: 'k8s-pod-network', plugins: [{ type: 'bridge', bridge: 'cni0', ipam: { type: 'host-local', ranges: [[{ subnet: '10.244.0.0/24' }]] } }, { type: 'portmap', capabilities: { portMappings: true } }] };

async function setup(t: Parameters<typeof scratch>[0]): Promise<{ installer: CniInstaller; bin: string; conf: string }> {
  const { dir } = await scratch(t, 'nodemesh-cni-install');
  const bin = join(dir, 'bin');
  const conf = join(dir, 'net.d');
  await mkdir(bin);
  await mkdir(conf);
  const plugin = join(dir, 'nodemesh-cni.built');
  await writeFile(plugin, '#!/bin/sh\n');
  const installer = new CniInstaller({ binDir: bin, confDir: conf, pluginBinary: plugin, enrollSocket: '/var/run/nodemesh/enroll.sock', timeoutSeconds: 20, excludeNamespaces: ['kube-system'] });
  t.after(() => installer.stop());
  return { installer, bin, conf };
}

const plugins = async (path: string): Promise<string[]> => ((JSON.parse(await readFile(path, 'utf8')) as { plugins: Array<{ type: string }> }).plugins).map((p) => p.type);

test('CNI install: chained last in the first conflist, put back after the network plugin rewrites it, removed on stop', async (t) => {
  const { installer, bin, conf } = await setup(t);
  const primary = join(conf, '10-bridge.conflist');
  await writeFile(primary, JSON.stringify(BRIDGE));
  // Not the runtime's: a later file by name.
  await writeFile(join(conf, '99-other.conflist'), JSON.stringify({ ...BRIDGE, name: 'other' }));
  await installer.start();
  assert.equal(installer.installed, true);

  assert.equal(((await stat(join(bin, 'nodemesh-cni'))).mode & 0o777).toString(8), '755');
  assert.deepEqual(await plugins(primary), ['bridge', 'portmap', 'nodemesh-cni']);
  const entry = (JSON.parse(await readFile(primary, 'utf8')) as { plugins: Array<Record<string, unknown>> }).plugins[2];
  assert.deepEqual(entry, { type: 'nodemesh-cni', enrollSocket: '/var/run/nodemesh/enroll.sock', timeoutSeconds: 20, excludeNamespaces: ['kube-system'] });
  assert.deepEqual(await plugins(join(conf, '99-other.conflist')), ['bridge', 'portmap'], 'only the config the runtime uses');

  // The network plugin's agent writes its config again: the entry comes back.
  await writeFile(primary, JSON.stringify(BRIDGE));
  await waitFor(async () => (await plugins(primary)).includes('nodemesh-cni'), 15_000, 'the entry put back');
  assert.deepEqual(await plugins(primary), ['bridge', 'portmap', 'nodemesh-cni'], 'once, at the end');
  assert.deepEqual((await readdir(conf)).sort(), ['10-bridge.conflist', '99-other.conflist'], 'no temporary file left where the runtime reads');

  await installer.stop();
  assert.deepEqual(JSON.parse(await readFile(primary, 'utf8')), BRIDGE, 'the network config as the network plugin wrote it');
  await assert.rejects(stat(join(bin, 'nodemesh-cni')), { code: 'ENOENT' });
});

test('CNI install: a single-plugin .conf becomes a conflist; a node without a network config yet is told, then served', async (t) => {
  const { installer, conf } = await setup(t);
  await installer.start();
  assert.match(installer.problem ?? '', /no CNI network config/);
  assert.equal(installer.installed, false);
  await writeFile(join(conf, '10-flannel.conf'), JSON.stringify({ cniVersion: '0.4.0', name: 'cbr0', type: 'flannel', delegate: { isDefaultGateway: true } }));
  await waitFor(async () => (await readdir(conf)).includes('10-flannel.conflist'), 15_000, 'the conf turned into a conflist');
  assert.deepEqual(await readdir(conf), ['10-flannel.conflist']);
  const list = JSON.parse(await readFile(join(conf, '10-flannel.conflist'), 'utf8')) as { cniVersion: string; name: string; plugins: Array<{ type: string }> };
  assert.equal(list.cniVersion, '0.4.0');
  assert.equal(list.name, 'cbr0');
  assert.deepEqual(list.plugins.map((p) => p.type), ['flannel', 'nodemesh-cni']);
  assert.equal(installer.problem, undefined);
  assert.equal(installer.installed, true);
});
