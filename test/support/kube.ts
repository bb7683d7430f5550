/**
 * The real Kubernetes API server of scripts/kube-local.sh (etcd, kube-apiserver and
 * kube-controller-manager built from the Go module proxy) for tests: start it for one test, run
 * its kubectl, and make a kubeconfig that acts as a ServiceAccount.
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestContext } from 'node:test';

import { PACKAGE_ROOT } from '../../src/shared/paths.js';
import { collect } from './sandbox.js';

const KUBE_LOCAL = join(PACKAGE_ROOT, 'scripts', 'kube-local.sh');
/** kube-local.sh's state folder ($STATE): the kubeconfig, the PKI, the processes' logs. */
export const KUBE_STATE = join(PACKAGE_ROOT, 'build', 'kube');
export const KUBECONFIG = join(KUBE_STATE, 'kubeconfig');

/** Runs a command with the admin's kubeconfig; its exit code and output, whatever the code. */
export async function runStatus(cmd: string, args: ReadonlyArray<string>, input?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, KUBECONFIG } });
  child.stdin.end(input ?? '');
  return collect(child);
}

/** Runs a command with the admin's kubeconfig; its stdout, or an error with its stderr. */
export async function run(cmd: string, args: ReadonlyArray<string>, input?: string): Promise<string> {
  const r = await runStatus(cmd, args, input);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.code}: ${r.stderr.trim()}`);
  return r.stdout;
}

/** kubectl of the API server's release (built with it: no version skew). */
export function kubectlPath(): string {
  return process.env['NODEMESH_KUBECTL'] ?? join(process.env['NODEMESH_TOOLS_CACHE'] ?? '/var/cache/nodemesh', `kubernetes-${process.env['NODEMESH_K8S_VERSION'] ?? 'v1.37.2'}`, 'kubectl');
}

export const kubectl = (args: ReadonlyArray<string>, input?: string): Promise<string> => run(kubectlPath(), args, input);

/** Starts the API server (building it on first use) for this test; stopped and removed after it. */
export async function cluster(t: TestContext): Promise<void> {
  await run('bash', [KUBE_LOCAL, 'up']);
  t.after(() => run('bash', [KUBE_LOCAL, 'down']));
}

/** A kubeconfig (0600, under build/kube, removed with it) that authenticates as a ServiceAccount with a fresh token. */
export async function serviceAccountKubeconfig(namespace: string, name: string): Promise<string> {
  const token = (await kubectl(['create', 'token', name, '-n', namespace, '--duration', '1h'])).trim();
  const ca = readFileSync(join(KUBE_STATE, 'pki', 'ca.crt')).toString('base64');
  const server = /server: (\S+)/.exec(readFileSync(KUBECONFIG, 'utf8'))?.[1] ?? '';
  const file = join(KUBE_STATE, `${namespace}.${name}.kubeconfig`);
  writeFileSync(file, `apiVersion: v1\nkind: Config\nclusters: [{name: local, cluster: {server: "${server}", certificate-authority-data: ${ca}}}]\nusers: [{name: ${name}, user: {token: "${token}"}}]\ncontexts: [{name: local, context: {cluster: local, user: ${name}}}]\ncurrent-context: local\n`, { mode: 0o600 });
  return file;
}
