/**
 * The control plane against a real kube-apiserver and etcd (scripts/kube-local.sh, built from the
 * Go module proxy once per version): the Kubernetes source (adds, updates, deletes, EndpointSlices,
 * a missing CRD, refused objects, the API server going away and the 410 relist after it),
 * TokenReview with real pod-bound tokens and its rate bound, RBAC refusals, and the control plane
 * as daemonset/ installs it. No kubelet runs here: Pod status is written through the status
 * subresource. The faults a real API server cannot be made to produce on demand (a watch cut in
 * the middle of an event, a garbled line, a refused watch, a bookmark) are in
 * test/unit/kubernetes-source.test.ts, against the in-test server.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import { ControlPlane } from '../../src/control-plane/server.js';
import { ReviewRateLimited, TokenReviewAuthenticator } from '../../src/control-plane/sources/token-review.js';
import { KubeApi } from '../../src/kube/api.js';
import { run } from '../../src/shared/exec.js';
import { PACKAGE_ROOT } from '../../src/shared/paths.js';
import { metricValue } from '../support/agent.js';
import { cluster, KUBE_STATE, KUBECONFIG, kubectl, serviceAccountKubeconfig } from '../support/kube.js';
import { waitFor } from '../support/sandbox.js';
import { scratch } from '../support/scratch.js';
import { TestAgent } from '../support/test-agent.js';

test('real API server: the CRDs become Established; the Kubernetes source follows adds, updates and deletes of Services, Pods (ready or not) and EndpointSlices, serves without a CRD that is not installed, keeps the last good version of an object it refuses; the API server goes away and comes back: the last config keeps serving, and the re-watch its new cache cannot serve (410) lists again and catches up', async (t) => {
  await cluster(t);
  // AuthorizationPolicy and TrafficPolicy only: PeerAuthentication is a CRD this cluster lacks.
  for (const f of readdirSync(join(PACKAGE_ROOT, 'daemonset')).filter((f) => f.startsWith('01-crd-') && !f.includes('peerauthentications'))) await kubectl(['apply', '-f', join(PACKAGE_ROOT, 'daemonset', f)]);
  await kubectl(['wait', '--for=condition=Established', '--timeout=30s', 'crd/authorizationpolicies.security.nodemesh.io', 'crd/trafficpolicies.networking.nodemesh.io']);

  await kubectl(['create', 'namespace', 'shop']);
  await kubectl(['label', 'namespace', 'shop', 'nodemesh.io/enabled=true']);
  const svc = (name: string, port: number, selector?: Record<string, string>): string =>
    JSON.stringify({ apiVersion: 'v1', kind: 'Service', metadata: { name, namespace: 'shop' }, spec: { ...(selector ? { selector } : {}), ports: [{ name: 'http', port, targetPort: 8080 }] } });
  await kubectl(['apply', '-f', '-'], svc('web', 80, { app: 'web' }));
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'ServiceAccount', metadata: { name: 'web', namespace: 'shop' } }));
  // What the kubelet would report once a pod runs (no kubelet here: the status subresource).
  const pod = async (name: string, ip: string, ready: boolean, app = 'web'): Promise<void> => {
    await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name, namespace: 'shop', labels: { app } }, spec: { nodeName: 'node-a', serviceAccountName: 'web', automountServiceAccountToken: false, containers: [{ name: 'app', image: 'example.invalid/web:1' }] } }));
    await kubectl(['patch', 'pod', name, '-n', 'shop', '--subresource=status', '--type=merge', '-p', JSON.stringify({ status: { phase: 'Running', podIP: ip, podIPs: [{ ip }], conditions: [{ type: 'Ready', status: ready ? 'True' : 'False' }] } })]);
  };
  await pod('web-1', '10.200.0.5', true);
  await pod('web-2', '10.200.0.6', false);
  // A field nodemesh does not enforce (a JWT's principals): refused and named, never silently ignored.
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'security.nodemesh.io/v1', kind: 'AuthorizationPolicy', metadata: { name: 'deny-jwt', namespace: 'shop' }, spec: { action: 'DENY', rules: [{ from: [{ source: { requestPrincipals: ['*'] } }] }] } }));

  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig: KUBECONFIG, watchTimeoutSeconds: 60 }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  t.after(() => cp.stop());
  const http = `http://127.0.0.1:${cp.httpPort()}`;
  const metrics = async (): Promise<string> => (await fetch(`${http}/metrics`)).text();
  const agent = new TestAgent(`127.0.0.1:${cp.grpcPort()}`, 'node-b', []);
  t.after(() => agent.stop());
  const service = (name = 'web'): { ports: Array<{ port: number; targetPort: number }>; selector?: Record<string, string> } | undefined => agent.held.get(`Service/shop/${name}`)?.service;
  const workloads = (): string[] => agent.keys('Workload');

  await waitFor(() => service() !== undefined && workloads().includes('Workload/shop/web-1'), 15_000, 'web and its endpoint from the API server');
  assert.equal((await fetch(`${http}/healthz/ready`)).status, 200, 'ready without the PeerAuthentication CRD');
  assert.equal(service()?.ports[0]?.port, 80);
  assert.deepEqual(workloads(), ['Workload/shop/web-1'], 'the not-ready pod is no endpoint');
  assert.equal(agent.held.get('Workload/shop/web-1')?.workload?.ip4, '10.200.0.5');
  assert.equal(agent.held.get('Workload/shop/web-1')?.workload?.serviceAccount, 'web');
  assert.deepEqual(agent.held.get('Namespace//shop')?.namespace?.labels?.['nodemesh.io/enabled'], 'true');
  assert.equal(metricValue(await metrics(), 'nodemesh_cp_config_rejected_objects', { kind: 'AuthorizationPolicy' }), 1, 'the JWT policy refused');
  const debug = (await (await fetch(`${http}/debug/snapshot?node=node-b`)).json()) as { configErrors: Array<{ object: string; field: string; file: string }> };
  assert.deepEqual(debug.configErrors.map((e) => [e.file, e.object, e.field]), [['kubernetes:authorizationpolicies', 'AuthorizationPolicy shop/deny-jwt', 'spec.rules[0].from[0].source.requestPrincipals']]);

  // Updates and deletes through the watch; readiness makes an endpoint.
  await kubectl(['patch', 'service', 'web', '-n', 'shop', '--type=json', '-p', JSON.stringify([{ op: 'replace', path: '/spec/ports/0/port', value: 8081 }])]);
  await waitFor(() => service()?.ports[0]?.port === 8081, 15_000, 'the update through the watch');
  await kubectl(['patch', 'pod', 'web-2', '-n', 'shop', '--subresource=status', '--type=merge', '-p', JSON.stringify({ status: { conditions: [{ type: 'Ready', status: 'True' }] } })]);
  await waitFor(() => workloads().includes('Workload/shop/web-2'), 15_000, 'web-2 ready: an endpoint now');

  // A Service without a selector: its endpoints are its EndpointSlices' ready ones, its target
  // port the slices' port of the same name.
  await kubectl(['apply', '-f', '-'], svc('db', 5432));
  const slice = (ready51: boolean): string =>
    JSON.stringify({
      apiVersion: 'discovery.k8s.io/v1',
      kind: 'EndpointSlice',
      metadata: { name: 'db-x1', namespace: 'shop', labels: { 'kubernetes.io/service-name': 'db' } },
      addressType: 'IPv4',
      ports: [{ name: 'http', port: 15432, protocol: 'TCP' }],
      endpoints: [
        { addresses: ['10.200.0.50'], conditions: { ready: true } },
        { addresses: ['10.200.0.51'], conditions: { ready: ready51 } },
      ],
    });
  await kubectl(['apply', '-f', '-'], slice(false));
  const sliceWorkloads = (): string[] => workloads().filter((k) => k.includes('db'));
  await waitFor(() => sliceWorkloads().length === 1 && service('db')?.ports[0]?.targetPort === 15432, 15_000, 'the ready slice endpoint, the slice port');
  await kubectl(['apply', '-f', '-'], slice(true));
  await waitFor(() => sliceWorkloads().length === 2, 15_000, 'the second endpoint, ready now');
  await kubectl(['delete', 'endpointslice', 'db-x1', '-n', 'shop']);
  await waitFor(() => sliceWorkloads().length === 0, 15_000, 'slice deleted: no endpoints');
  await kubectl(['delete', 'service', 'db', '-n', 'shop', '--wait=false']);
  await waitFor(() => service('db') === undefined, 15_000, 'the delete through the watch');

  // The API server goes away (etcd stays) and comes back; changes are made as soon as it is back.
  // Meanwhile the agent keeps what it has, and the failures are counted. The source's watches
  // resume from versions older than the new server's watch cache: 410, a new list, caught up.
  const listsBefore = metricValue(await metrics(), 'nodemesh_cp_kube_lists_total', { resource: 'services', reason: 'expired' });
  await run('bash', [join(PACKAGE_ROOT, 'scripts', 'kube-local.sh'), 'restart-apiserver']);
  assert.equal(service()?.ports[0]?.port, 8081, 'the last config kept meanwhile');
  await kubectl(['apply', '-f', '-'], svc('late', 82, { app: 'late' }));
  await kubectl(['delete', 'pod', 'web-1', '-n', 'shop', '--grace-period=0', '--force']);
  await waitFor(() => service('late') !== undefined && !workloads().includes('Workload/shop/web-1'), 45_000, 'caught up after the restart');
  const m = await metrics();
  assert.ok(metricValue(m, 'nodemesh_cp_kube_errors_total', { resource: 'services', reason: 'connection' }) >= 1, 'the outage counted');
  assert.ok(metricValue(m, 'nodemesh_cp_kube_lists_total', { resource: 'services', reason: 'expired' }) > listsBefore, 'listed again after 410 Gone');
  assert.equal((await fetch(`${http}/healthz/ready`)).status, 200);
});

test('real API server: a control plane the API server refuses (a token it does not know) runs, is not ready and sends agents nothing; a bad kubeconfig is a clear error', async (t) => {
  await cluster(t);
  await kubectl(['create', 'namespace', 'shop']);
  const { dir } = await scratch(t, 'nodemesh-kube');
  await assert.rejects(
    ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig: join(dir, 'missing') }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }),
    (e: Error & { code?: string }) => e.code === 'NM_ERR_KUBE_CONFIG' && e.message.includes('missing'),
  );
  await assert.rejects(
    ControlPlane.start({ source: { kind: 'dir', dir }, agentServiceAccount: 'nodemesh-system/nodemesh-agent', listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } }),
    (e: Error & { code?: string }) => e.code === 'NM_ERR_INVALID_ARGUMENT',
  );
  const kubeconfig = join(dir, 'kubeconfig');
  const ca = readFileSync(join(KUBE_STATE, 'pki', 'ca.crt')).toString('base64');
  const server = /server: (\S+)/.exec(readFileSync(KUBECONFIG, 'utf8'))?.[1] ?? '';
  writeFileSync(kubeconfig, `apiVersion: v1\nkind: Config\nclusters: [{name: local, cluster: {server: "${server}", certificate-authority-data: ${ca}}}]\nusers: [{name: x, user: {token: "not-a-token-of-this-cluster"}}]\ncontexts: [{name: local, context: {cluster: local, user: x}}]\ncurrent-context: local\n`, { mode: 0o600 });
  const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
  t.after(() => cp.stop());
  const http = cp.httpPort();
  const agent = new TestAgent(`127.0.0.1:${cp.grpcPort()}`, 'node-a', []);
  t.after(() => agent.stop());
  await waitFor(async () => metricValue(await (await fetch(`http://127.0.0.1:${http}/metrics`)).text(), 'nodemesh_cp_kube_errors_total', { reason: 'unauthorized' }) >= 5, 15_000, 'every resource refused');
  assert.equal((await fetch(`http://127.0.0.1:${http}/healthz/ready`)).status, 503);
  assert.equal(agent.version, 0, 'the agent was sent nothing (not an empty config)');
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
  const kubeconfig = await serviceAccountKubeconfig('nodemesh-system', 'cp');

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

test('real API server, installed from daemonset/: the control plane runs with exactly its RBAC, keeps the CA in its Secret (made on first start, the same root after a restart), publishes the trusted roots, and only nodemesh-system/nodemesh configures the mesh', async (t) => {
  await cluster(t);
  const daemonset = join(PACKAGE_ROOT, 'daemonset');
  await kubectl(['apply', '-f', daemonset]);
  await kubectl(['wait', '--for=condition=Established', '--timeout=30s', 'crd/authorizationpolicies.security.nodemesh.io', 'crd/peerauthentications.security.nodemesh.io', 'crd/trafficpolicies.networking.nodemesh.io']);
  await kubectl(['create', 'namespace', 'shop']);
  // Whoever may write ConfigMaps in their namespace does not get to set the mesh's trust domain.
  await kubectl(['create', 'configmap', 'nodemesh', '-n', 'shop', '--from-literal=trustDomain=evil.example']);
  await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name: 'agent-a', namespace: 'nodemesh-system' }, spec: { nodeName: 'node-a', serviceAccountName: 'nodemesh-agent', automountServiceAccountToken: false, containers: [{ name: 'c', image: 'example.invalid/c:1' }] } }));
  const agentToken = (await kubectl(['create', 'token', 'nodemesh-agent', '-n', 'nodemesh-system', '--audience', 'nodemesh', '--bound-object-kind', 'Pod', '--bound-object-name', 'agent-a'])).trim();
  const kubeconfig = await serviceAccountKubeconfig('nodemesh-system', 'nodemesh-control-plane');
  const { dir } = await scratch(t, 'nodemesh-ca-secret');

  const start = async (caDir: string): Promise<ControlPlane> => {
    const cp = await ControlPlane.start({ source: { kind: 'kubernetes', kubeconfig }, agentServiceAccount: 'nodemesh-system/nodemesh-agent', ca: { dir: caDir, secret: 'nodemesh-system/nodemesh-ca' }, listen: { host: '127.0.0.1', port: 0 }, http: { host: '127.0.0.1', port: 0 } });
    t.after(() => cp.stop());
    return cp;
  };
  const cp1 = await start(join(dir, 'ca-1'));
  const metrics1 = async (): Promise<string> => (await fetch(`http://127.0.0.1:${cp1.httpPort()}/metrics`)).text();
  await waitFor(async () => (await fetch(`http://127.0.0.1:${cp1.httpPort()}/healthz/ready`)).status === 200, 15_000, 'ready: every resource readable with the RBAC of daemonset/');
  assert.equal(metricValue(await metrics1(), 'nodemesh_cp_ca_secret_syncs_total', { result: 'stored' }), 1);
  assert.equal(metricValue(await metrics1(), 'nodemesh_cp_ca_secret_syncs_total', { result: 'failed' }), 0);
  assert.doesNotMatch(await metrics1(), /nodemesh_cp_kube_errors_total\{[^}]*reason="unauthorized"/);

  const root = readFileSync(join(dir, 'ca-1', 'root-cert.pem'), 'utf8');
  const key = readFileSync(join(dir, 'ca-1', 'root-key.pem'), 'utf8');
  const secret = JSON.parse(await kubectl(['get', 'secret', 'nodemesh-ca', '-n', 'nodemesh-system', '-o', 'json'])) as { data: Record<string, string> };
  assert.equal(Buffer.from(secret.data['root-cert.pem'] ?? '', 'base64').toString(), root);
  assert.equal(Buffer.from(secret.data['root-key.pem'] ?? '', 'base64').toString(), key);
  assert.equal(await kubectl(['get', 'configmap', 'nodemesh-ca-root', '-n', 'nodemesh-system', '-o', 'jsonpath={.data.root-cert\\.pem}']), `${root.trim()}\n`);

  const agent = new TestAgent(`127.0.0.1:${cp1.grpcPort()}`, 'node-a', [], agentToken);
  t.after(() => agent.stop());
  await waitFor(() => agent.held.has('TrustBundle//mesh'), 15_000, "node-a's agent is served, its token reviewed with the control plane's RBAC");
  assert.deepEqual(agent.held.get('TrustBundle//mesh')?.trustBundle?.roots?.map((r) => r.trim()), [root.trim()]);
  assert.equal(agent.held.get('MeshSettings//nodemesh')?.mesh?.trustDomain, 'cluster.local');
  assert.equal(agent.held.get('MeshSettings//nodemesh')?.mesh?.enrollment, 'opt-in', "daemonset/'s mesh config");
  agent.stop();
  await cp1.stop();

  // Rescheduled with an empty CA folder: the same root and key, from the Secret.
  const cp2 = await start(join(dir, 'ca-2'));
  assert.equal(readFileSync(join(dir, 'ca-2', 'root-cert.pem'), 'utf8'), root);
  assert.equal(readFileSync(join(dir, 'ca-2', 'root-key.pem'), 'utf8'), key);
  const metrics2 = await (await fetch(`http://127.0.0.1:${cp2.httpPort()}/metrics`)).text();
  assert.equal(metricValue(metrics2, 'nodemesh_cp_ca_secret_syncs_total', { result: 'restored' }), 1);
  assert.equal(metricValue(metrics2, 'nodemesh_cp_ca_secret_syncs_total', { result: 'stored' }), 0);
});

test('real API server, TokenReview: tokens not in the cache are reviewed at a bounded rate; beyond it the caller is told to come back and the API server is not asked', async (t) => {
  await cluster(t);
  await kubectl(['create', 'namespace', 'nodemesh-system']);
  await kubectl(['create', 'serviceaccount', 'nodemesh-agent', '-n', 'nodemesh-system']);
  const tokens: Record<string, string> = {};
  for (const n of ['a', 'b', 'c']) {
    await kubectl(['apply', '-f', '-'], JSON.stringify({ apiVersion: 'v1', kind: 'Pod', metadata: { name: `agent-${n}`, namespace: 'nodemesh-system' }, spec: { nodeName: `node-${n}`, serviceAccountName: 'nodemesh-agent', automountServiceAccountToken: false, containers: [{ name: 'c', image: 'example.invalid/c:1' }] } }));
    tokens[n] = (await kubectl(['create', 'token', 'nodemesh-agent', '-n', 'nodemesh-system', '--audience', 'nodemesh', '--bound-object-kind', 'Pod', '--bound-object-name', `agent-${n}`])).trim();
  }
  const reviews = new TokenReviewAuthenticator(KubeApi.load({ kubeconfig: KUBECONFIG }), 'nodemesh-system/nodemesh-agent', { burst: 2, perSecond: 0.01 });
  assert.equal(await reviews.nodeOf(tokens['a'] ?? ''), 'node-a');
  assert.equal(await reviews.nodeOf(tokens['b'] ?? ''), 'node-b');
  const asked = await apiRequests('tokenreviews', 'POST');
  await assert.rejects(reviews.nodeOf(tokens['c'] ?? ''), ReviewRateLimited);
  assert.equal(await apiRequests('tokenreviews', 'POST'), asked, 'the API server was not asked');
  // A token reviewed before is still answered, from the cache.
  assert.equal(await reviews.nodeOf(tokens['a'] ?? ''), 'node-a');
  assert.equal(await apiRequests('tokenreviews', 'POST'), asked);
});
