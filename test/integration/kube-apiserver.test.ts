/**
 * Against a real kube-apiserver and etcd (scripts/kube-local.sh, built from the Go module proxy
 * once per version): nodemesh's CRDs are accepted and become Established, and the control plane's
 * Kubernetes source serves what is created through the API server (a Namespace, a Service, a Pod
 * bound to a node with its status written as a kubelet would), then follows an update and a
 * delete. No kubelet runs here: the Pod's status is patched through the status subresource.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';

import { ControlPlane } from '../../src/control-plane/server.js';
import { PACKAGE_ROOT } from '../../src/shared/paths.js';
import { metricValue } from '../support/agent.js';
import { collect, waitFor } from '../support/sandbox.js';
import { TestAgent } from '../support/test-agent.js';

const KUBE_LOCAL = join(PACKAGE_ROOT, 'scripts', 'kube-local.sh');
const KUBECONFIG = join(PACKAGE_ROOT, 'build', 'kube', 'kubeconfig');

async function run(cmd: string, args: ReadonlyArray<string>, input?: string): Promise<string> {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, KUBECONFIG } });
  child.stdin.end(input ?? '');
  const r = await collect(child);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.code}: ${r.stderr.trim()}`);
  return r.stdout;
}

const kubectl = (args: ReadonlyArray<string>, input?: string): Promise<string> => run(process.env['NODEMESH_KUBECTL'] ?? kubectlPath(), args, input);

function kubectlPath(): string {
  return join(process.env['NODEMESH_TOOLS_CACHE'] ?? '/var/cache/nodemesh', `kubernetes-${process.env['NODEMESH_K8S_VERSION'] ?? 'v1.37.2'}`, 'kubectl');
}

async function cluster(t: TestContext): Promise<void> {
  await run('bash', [KUBE_LOCAL, 'up']);
  t.after(() => run('bash', [KUBE_LOCAL, 'down']));
}

test('real API server: the CRDs become Established; the Kubernetes source serves a Namespace, Service and Pod made through it, and follows an update and a delete', async (t) => {
  await cluster(t);
  await kubectl(['apply', '-f', join(PACKAGE_ROOT, 'daemonset', 'crds')]);
  await kubectl(['wait', '--for=condition=Established', '--timeout=30s', 'crd/authorizationpolicies.security.nodemesh.io', 'crd/peerauthentications.security.nodemesh.io', 'crd/trafficpolicies.networking.nodemesh.io']);

  await kubectl(['create', 'namespace', 'shop']);
  await kubectl(['label', 'namespace', 'shop', 'nodemesh.io/enabled=true']);
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Service', metadata: { name: 'web', namespace: 'shop' }, spec: { selector: { app: 'web' }, ports: [{ name: 'http', port: 80, targetPort: 8080 }] } }));
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'web', namespace: 'shop' } }));
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'web-1', namespace: 'shop', labels: { app: 'web' } }, spec: { nodeName: 'node-a', serviceAccountName: 'web', automountServiceAccountToken: false, containers: [{ name: 'app', image: 'example.invalid/web:1' }] } }));
  // What the kubelet would report once the pod runs.
  await kubectl(['patch', 'pod', 'web-1', '-n', 'shop', '--subresource=status', '--type=merge', '-p', JSON.stringify({ status: { phase: 'Running', podIP: '10.200.0.5', podIPs: [{ ip: '10.200.0.5' }], conditions: [{ type: 'Ready', status: 'True' }] } })]);

  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig: KUBECONFIG, watchTimeoutSeconds: 60 }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  t.after(() => cp.stop());
  const agent = new TestAgent(`127.0.0.1:${cp.grpcPort()}`, 'node-b', []);
  t.after(() => agent.stop());
  const service = (): { ports: Array<{ port: number }> } | undefined => agent.held.get('Service/shop/web')?.service;

  await waitFor(() => service() !== undefined && agent.keys('Workload').includes('Workload/shop/web-1'), 15_000, 'web and its endpoint from the API server');
  assert.equal(service()?.ports[0]?.port, 80);
  assert.equal(agent.held.get('Workload/shop/web-1')?.workload?.ip4, '10.200.0.5');
  assert.equal(agent.held.get('Workload/shop/web-1')?.workload?.serviceAccount, 'web');
  assert.deepEqual(agent.held.get('Namespace//shop')?.namespace?.labels?.['nodemesh.io/enabled'], 'true');

  await kubectl(['patch', 'service', 'web', '-n', 'shop', '--type=json', '-p', JSON.stringify([{ op: 'replace', path: '/spec/ports/0/port', value: 8081 }])]);
  await waitFor(() => service()?.ports[0]?.port === 8081, 15_000, 'the update through the watch');
  await kubectl(['delete', 'service', 'web', '-n', 'shop', '--wait=false']);
  await waitFor(() => service() === undefined, 15_000, 'the delete through the watch');
});

/** The API server's own count of requests to a resource (its /metrics, as the admin reads it). */
async function apiRequests(resource: string, verb: string): Promise<number> {
  const text = await kubectl(['get', '--raw', '/metrics']);
  let n = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('apiserver_request_total{') && line.includes(`resource="${resource}"`) && line.includes(`verb="${verb}"`)) n += Number(line.split(' ').pop());
  }
  return n;
}

test('real API server: agents authenticate with pod-bound ServiceAccount tokens from the TokenRequest API (TokenReview) and speak only for their node', async (t) => {
  await cluster(t);
  for (const ns of ['nodemesh-system', 'shop']) await kubectl(['create', 'namespace', ns]);
  await kubectl(['create', 'serviceaccount', 'nodemesh-agent', '-n', 'nodemesh-system']);
  await kubectl(['create', 'serviceaccount', 'web', '-n', 'shop']);
  const pod = (name: string, ns: string, sa: string): string =>
    JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name, namespace: ns }, spec: { nodeName: 'node-a', serviceAccountName: sa, automountServiceAccountToken: false, containers: [{ name: 'c', image: 'example.invalid/c:1' }] } });
  await kubectl(['apply', '-f', '-'], pod('agent-a', 'nodemesh-system', 'nodemesh-agent'));
  await kubectl(['apply', '-f', '-'], pod('web-1', 'shop', 'web'));
  // Tokens as the kubelet would project them: bound to a pod (so to its node), for an audience.
  const token = async (ns: string, sa: string, audience: string, boundPod?: string): Promise<string> =>
    (await kubectl(['create', 'token', sa, '-n', ns, '--audience', audience, '--duration', '10m', ...(boundPod ? ['--bound-object-kind', 'Pod', '--bound-object-name', boundPod] : [])])).trim();
  const agentToken = await token('nodemesh-system', 'nodemesh-agent', 'nodemesh', 'agent-a');
  const tokens = {
    otherAccount: await token('shop', 'web', 'nodemesh', 'web-1'),
    unbound: await token('nodemesh-system', 'nodemesh-agent', 'nodemesh'),
    otherAudience: await token('nodemesh-system', 'nodemesh-agent', 'https://kubernetes.default.svc.cluster.local', 'agent-a'),
  };

  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig: KUBECONFIG }, agentServiceAccount: 'nodemesh-system/nodemesh-agent', listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  t.after(() => cp.stop());
  const address = `127.0.0.1:${cp.grpcPort()}`;
  const agents = {
    good: new TestAgent(address, 'node-a', [], agentToken),
    otherNode: new TestAgent(address, 'node-b', [], agentToken),
    otherAccount: new TestAgent(address, 'node-a', [], tokens.otherAccount),
    unbound: new TestAgent(address, 'node-a', [], tokens.unbound),
    unknown: new TestAgent(address, 'node-a', [], 'not-a-token'),
    otherAudience: new TestAgent(address, 'node-a', [], tokens.otherAudience),
  };
  t.after(() => Object.values(agents).forEach((a) => a.stop()));
  await waitFor(() => agents.good.version > 0, 15_000, "node-a's agent is served");
  const refused = [agents.otherNode, agents.otherAccount, agents.unbound, agents.unknown, agents.otherAudience];
  await waitFor(() => refused.every((a) => a.error !== undefined), 15_000, 'the others are refused');
  assert.equal(agents.otherNode.error?.code, 7, "PERMISSION_DENIED: node-a's agent claiming node-b");
  assert.deepEqual([agents.otherAccount, agents.unbound, agents.unknown, agents.otherAudience].map((a) => a.error?.code), [16, 16, 16, 16], 'UNAUTHENTICATED');
  assert.ok(refused.every((a) => a.version === 0));
  // A reconnect is answered from the review cache: the API server sees no TokenReview for it.
  const before = await apiRequests('tokenreviews', 'POST');
  assert.ok(before >= 1, 'the reviews reached the API server');
  const again = new TestAgent(address, 'node-a', [], agentToken);
  t.after(() => again.stop());
  await waitFor(() => again.version > 0, 15_000, 'the reconnect is served');
  assert.equal(await apiRequests('tokenreviews', 'POST'), before);
});

test('real API server: RBAC that forbids reading Pods is named and counted, the control plane stays not ready, and recovers once the permission is granted', async (t) => {
  await cluster(t);
  await kubectl(['create', 'namespace', 'nodemesh-system']);
  await kubectl(['create', 'namespace', 'shop']);
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Service', metadata: { name: 'web', namespace: 'shop' }, spec: { selector: { app: 'web' }, ports: [{ port: 80 }] } }));
  await kubectl(['create', 'serviceaccount', 'cp', '-n', 'nodemesh-system']);
  // Everything the source reads but Pods.
  const rules = (withPods: boolean): string =>
    JSON.stringify({
      apiVersion: 'rbac.authorization.k8s.io/v1',
      kind: 'ClusterRole',
      metadata: { name: 'nodemesh-test-reader' },
      rules: [
        { apiGroups: [''], resources: ['namespaces', 'services', 'configmaps', ...(withPods ? ['pods'] : [])], verbs: ['get', 'list', 'watch'] },
        { apiGroups: ['discovery.k8s.io'], resources: ['endpointslices'], verbs: ['get', 'list', 'watch'] },
        { apiGroups: ['networking.nodemesh.io', 'security.nodemesh.io', 'gateway.networking.k8s.io'], resources: ['*'], verbs: ['get', 'list', 'watch'] },
      ],
    });
  await kubectl(['apply', '-f', '-'], rules(false));
  await kubectl(['create', 'clusterrolebinding', 'nodemesh-test-reader', '--clusterrole', 'nodemesh-test-reader', '--serviceaccount', 'nodemesh-system:cp']);
  const token = (await kubectl(['create', 'token', 'cp', '-n', 'nodemesh-system', '--duration', '1h'])).trim();
  const ca = readFileSync(join(PACKAGE_ROOT, 'build', 'kube', 'pki', 'ca.crt')).toString('base64');
  const server = /server: (\S+)/.exec(readFileSync(KUBECONFIG, 'utf8'))?.[1] ?? '';
  const kubeconfig = join(PACKAGE_ROOT, 'build', 'kube', 'cp.kubeconfig');
  writeFileSync(kubeconfig, `apiVersion: v1\nkind: Config\nclusters: [{name: local, cluster: {server: "${server}", certificate-authority-data: ${ca}}}]\nusers: [{name: cp, user: {token: "${token}"}}]\ncontexts: [{name: local, context: {cluster: local, user: cp}}]\ncurrent-context: local\n`, { mode: 0o600 });

  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig, watchTimeoutSeconds: 60 }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  t.after(() => cp.stop());
  const http = `http://127.0.0.1:${cp.httpPort()}`;
  const metrics = async (): Promise<string> => (await fetch(`${http}/metrics`)).text();
  await waitFor(async () => metricValue(await metrics(), 'nodemesh_cp_kube_errors_total', { resource: 'pods', reason: 'unauthorized' }) >= 1, 15_000, 'the forbidden list of pods counted');
  for (const resource of ['services', 'namespaces', 'configmaps']) assert.equal(metricValue(await metrics(), 'nodemesh_cp_kube_errors_total', { resource, reason: 'unauthorized' }), 0, `only what RBAC forbids (${resource})`);
  assert.equal((await fetch(`${http}/healthz/ready`)).status, 503, 'not ready while a resource cannot be read');

  await kubectl(['apply', '-f', '-'], rules(true));
  // The reflector retries with backoff (at most 30 s between tries); the grant is picked up without a restart.
  await waitFor(async () => (await fetch(`${http}/healthz/ready`)).status === 200, 45_000, 'ready once Pods may be read');
  const agent = new TestAgent(`127.0.0.1:${cp.grpcPort()}`, 'node-a', []);
  t.after(() => agent.stop());
  await waitFor(() => agent.held.has('Service/shop/web'), 15_000, 'the Service served');
});
