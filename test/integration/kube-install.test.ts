/**
 * `kubectl apply -f daemonset/` against a real kube-apiserver with the built-in controllers
 * (scripts/kube-local.sh): every object is accepted, the CRDs become Established, each
 * ServiceAccount may do exactly what the RBAC intends (checked both ways: a table of allowed and
 * refused requests, and the full list of its permissions), a second apply and `apply -k` change
 * nothing, the controllers make the control plane's Pod and one agent Pod per Linux node however
 * it is tainted, and `kubectl delete -f daemonset/` removes it all. No scheduler and no kubelet
 * run here: the pods are made, not run.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';

import { parseAllDocuments } from 'yaml';

import { PACKAGE_ROOT } from '../../src/shared/paths.js';
import { cluster, KUBE_STATE, kubectl, kubectlPath, runStatus } from '../support/kube.js';
import { waitFor } from '../support/sandbox.js';

const DAEMONSET = join(PACKAGE_ROOT, 'daemonset');
const VERSION = (JSON.parse(readFileSync(join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const IMAGE = `ghcr.io/nodemesh/nodemesh:${VERSION}`;
const NS = 'nodemesh-system';

interface Manifest {
  kind: string;
  apiVersion: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  spec?: { template?: { spec?: { containers?: Array<{ image: string }>; initContainers?: Array<{ image: string }> } } };
}

function manifests(): Manifest[] {
  const out: Manifest[] = [];
  for (const f of readdirSync(DAEMONSET).filter((f) => /\.ya?ml$/.test(f)).sort()) {
    for (const doc of parseAllDocuments(readFileSync(join(DAEMONSET, f), 'utf8'))) {
      const m = doc.toJS() as Manifest | null;
      if (m) out.push(m);
    }
  }
  return out;
}

/** kubectl's "kind.group/name" for an object, as apply prints it. */
function printed(m: Manifest): string {
  const group = m.apiVersion.includes('/') ? m.apiVersion.split('/')[0] : '';
  return `${m.kind.toLowerCase()}${group ? `.${group}` : ''}/${m.metadata.name}`;
}

/** The apply's lines: object -> what happened to it (created, configured, unchanged). */
function applied(out: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of out.trim().split('\n')) {
    const [obj = '', ...rest] = line.trim().split(' ');
    m.set(obj, rest.join(' '));
  }
  return m;
}

const sa = (name: string): string => `system:serviceaccount:${NS}:${name}`;

/** [verb, resource (with /name), namespace or '-A' or '' for cluster scope, allowed]. */
type Row = readonly [string, string, string, boolean];

const AGENT: ReadonlyArray<Row> = [
  ['get', 'pods', '-A', true],
  ['list', 'pods', '-A', true],
  ['watch', 'pods', '-A', true],
  ['get', 'secrets', NS, false],
  ['get', 'secrets/nodemesh-ca', NS, false],
  ['list', 'secrets', '-A', false],
  ['get', 'configmaps/nodemesh', NS, false],
  ['list', 'configmaps', NS, false],
  ['create', 'pods', 'default', false],
  ['update', 'pods', 'default', false],
  ['patch', 'pods/status', 'default', false],
  ['delete', 'pods', 'default', false],
  ['list', 'services', '-A', false],
  ['list', 'nodes', '', false],
  ['create', 'tokenreviews.authentication.k8s.io', '', false],
  ['create', 'serviceaccounts/token', NS, false],
  ['list', 'trafficpolicies.networking.nodemesh.io', '-A', false],
  ['get', 'daemonsets.apps/nodemesh-agent', NS, true],
  ['update', 'daemonsets.apps/nodemesh-agent', NS, false],
  ['get', 'daemonsets.apps/other', NS, false],
  ['list', 'daemonsets.apps', NS, false],
];

const CONTROL_PLANE: ReadonlyArray<Row> = [
  ...['namespaces', 'services', 'pods', 'endpointslices.discovery.k8s.io', 'trafficpolicies.networking.nodemesh.io', 'authorizationpolicies.security.nodemesh.io', 'peerauthentications.security.nodemesh.io', 'httproutes.gateway.networking.k8s.io', 'grpcroutes.gateway.networking.k8s.io'].flatMap(
    (r): Row[] => [
      ['list', r, '-A', true],
      ['watch', r, '-A', true],
      ['create', r, 'default', false],
      ['update', r, 'default', false],
      ['delete', r, 'default', false],
    ],
  ),
  ['get', 'pods', 'default', false],
  ['create', 'tokenreviews.authentication.k8s.io', '', true],
  ['get', 'configmaps/nodemesh', NS, true],
  ['list', 'configmaps/nodemesh', NS, true],
  ['watch', 'configmaps/nodemesh', NS, true],
  ['update', 'configmaps/nodemesh', NS, false],
  ['list', 'configmaps', NS, false],
  ['get', 'configmaps/other', NS, false],
  ['get', 'configmaps/nodemesh', 'default', false],
  ['get', 'configmaps/nodemesh-ca-root', NS, true],
  ['update', 'configmaps/nodemesh-ca-root', NS, true],
  ['delete', 'configmaps/nodemesh-ca-root', NS, false],
  ['create', 'configmaps', NS, true],
  ['create', 'configmaps', 'default', false],
  ['get', 'secrets/nodemesh-ca', NS, true],
  ['update', 'secrets/nodemesh-ca', NS, true],
  ['delete', 'secrets/nodemesh-ca', NS, false],
  ['create', 'secrets', NS, true],
  ['get', 'secrets/other', NS, false],
  ['list', 'secrets', NS, false],
  ['watch', 'secrets', NS, false],
  ['get', 'secrets/nodemesh-ca', 'default', false],
  ['create', 'secrets', 'default', false],
  ['list', 'secrets', '-A', false],
  ['list', 'nodes', '', false],
  ['create', 'serviceaccounts/token', NS, false],
];

async function canI(as: string, [verb, resource, ns]: Row): Promise<boolean> {
  // The Gateway API's CRDs are not installed here (nothing reaches their release), and kubectl
  // resolves a resource through discovery before it asks: the API server is asked directly.
  if (resource.includes('.gateway.networking.k8s.io')) {
    const [plural = '', ...group] = resource.split('.');
    const review = { apiVersion: 'authorization.k8s.io/v1', kind: 'SubjectAccessReview', spec: { user: as, groups: ['system:serviceaccounts', `system:serviceaccounts:${NS}`, 'system:authenticated'], resourceAttributes: { verb, group: group.join('.'), resource: plural, ...(ns === '-A' || ns === '' ? {} : { namespace: ns }) } } };
    return (await kubectl(['create', '-f', '-', '-o', 'jsonpath={.status.allowed}'], JSON.stringify(review))).trim() === 'true';
  }
  const scope = ns === '' ? [] : ns === '-A' ? ['-A'] : ['-n', ns];
  const r = await runStatus(kubectlPath(), ['auth', 'can-i', verb, resource, ...scope, '--as', as]);
  if (r.code !== 0 && r.code !== 1) throw new Error(`kubectl auth can-i ${verb} ${resource} --as ${as}: exit ${r.code}: ${r.stderr.trim()}`);
  return r.code === 0;
}

/**
 * The rules `kubectl auth can-i --list` reports for a subject in a namespace, as
 * "resource [names] verbs" lines, without what every authenticated user may do (reviews of
 * itself, discovery, ClusterTrustBundles).
 */
async function granted(as: string, ns: string): Promise<string[]> {
  const out = await kubectl(['auth', 'can-i', '--list', '-n', ns, '--as', as]);
  const rows: string[] = [];
  for (const line of out.split('\n').slice(1)) {
    const cols = line.trim().split(/\s{2,}/);
    if (cols.length !== 4) continue;
    const [resource = '', urls, names = '', verbs = ''] = cols;
    if (resource === '' || urls !== '[]') continue;
    if (/^selfsubject|^clustertrustbundles\./.test(resource)) continue;
    rows.push(`${resource} ${names} ${verbs}`);
  }
  return rows.sort();
}

test('kubectl apply -f daemonset/ installs nodemesh on a real API server; RBAC is what it says; re-applying changes nothing; kubectl delete -f removes it all', async (t) => {
  const objects = manifests();
  // The image in one place: every container of the manifests, and the Kustomization, name the package's version.
  const images = objects.flatMap((m) => [...(m.spec?.template?.spec?.initContainers ?? []), ...(m.spec?.template?.spec?.containers ?? [])].map((c) => c.image));
  assert.ok(images.length >= 3);
  assert.deepEqual(new Set(images), new Set([IMAGE]));
  // One label finds them all (kubectl get crd,clusterrole,... -l app.kubernetes.io/part-of=nodemesh).
  assert.deepEqual(objects.filter((m) => m.metadata.labels?.['app.kubernetes.io/part-of'] !== 'nodemesh').map(printed), [], 'labelled app.kubernetes.io/part-of=nodemesh');
  assert.match(readFileSync(join(DAEMONSET, 'Kustomization'), 'utf8'), new RegExp(`newTag: ${VERSION.replace(/\./g, '\\.')}\\n`));

  await cluster(t);
  const first = applied(await kubectl(['apply', '-f', DAEMONSET]));
  assert.deepEqual([...first.keys()].sort(), objects.map(printed).sort(), 'every object of daemonset/ and nothing else');
  for (const [obj, what] of first) assert.equal(what, 'created', obj);
  const crds = objects.filter((m) => m.kind === 'CustomResourceDefinition').map((m) => `crd/${m.metadata.name}`);
  assert.equal(crds.length, 3);
  await kubectl(['wait', '--for=condition=Established', '--timeout=30s', ...crds]);

  // RBAC, one way: each request of the tables is allowed or refused as intended.
  const table = [...AGENT.map((r) => ['nodemesh-agent', r] as const), ...CONTROL_PLANE.map((r) => ['nodemesh-control-plane', r] as const)];
  const answers = await Promise.all(table.map(([who, row]) => canI(sa(who), row)));
  const wrong = table.filter((_, i) => answers[i] !== table[i]?.[1][3]).map(([who, [verb, res, ns, allowed]]) => `${who} ${allowed ? 'may not' : 'may'} ${verb} ${res} ${ns}`);
  assert.deepEqual(wrong, [], 'permissions differ from the table');
  // And the other way: nothing is granted beyond the rules the table checks.
  assert.deepEqual(await granted(sa('nodemesh-agent'), NS), ['daemonsets.apps [nodemesh-agent] [get]', 'pods [] [get list watch]']);
  assert.deepEqual(await granted(sa('nodemesh-control-plane'), NS), [
    'authorizationpolicies.security.nodemesh.io [] [list watch]',
    'configmaps [] [create]',
    'configmaps [nodemesh-ca-root] [get update]',
    'configmaps [nodemesh] [get list watch]',
    'endpointslices.discovery.k8s.io [] [list watch]',
    'grpcroutes.gateway.networking.k8s.io [] [list watch]',
    'httproutes.gateway.networking.k8s.io [] [list watch]',
    'namespaces [] [list watch]',
    'peerauthentications.security.nodemesh.io [] [list watch]',
    'pods [] [list watch]',
    'secrets [] [create]',
    'secrets [nodemesh-ca] [get update]',
    'services [] [list watch]',
    'tokenreviews.authentication.k8s.io [] [create]',
    'trafficpolicies.networking.nodemesh.io [] [list watch]',
  ]);
  // Outside its namespace the control plane keeps only its cluster-wide reads.
  assert.ok(!(await granted(sa('nodemesh-control-plane'), 'default')).some((r) => r.startsWith('secrets') || r.startsWith('configmaps')));

  // Applying again, with -f or -k, changes nothing.
  const again = applied(await kubectl(['apply', '-f', DAEMONSET]));
  for (const [obj, what] of again) assert.equal(what, 'unchanged', `apply -f again: ${obj}`);
  const kustomized = applied(await kubectl(['apply', '-k', DAEMONSET]));
  assert.deepEqual([...kustomized.keys()].sort(), [...first.keys()].sort(), 'apply -k holds the same objects');
  for (const [obj, what] of kustomized) assert.equal(what, 'unchanged', `apply -k: ${obj}`);

  // The controllers accept the templates: the Deployment's Pod, and an agent Pod for each Linux
  // node whatever its taints (none for a Windows node).
  await waitFor(async () => (await kubectl(['get', 'pods', '-n', NS, '-l', 'app.kubernetes.io/name=nodemesh-control-plane', '-o', 'name'])).trim() !== '', 30_000, "the control plane's Pod");
  const node = (name: string, os: string, taints: ReadonlyArray<{ key: string; effect: string }>): string =>
    JSON.stringify({ apiVersion: 'v1', kind: 'Node', metadata: { name, labels: { 'kubernetes.io/os': os, 'kubernetes.io/hostname': name } }, spec: { taints: taints.map((x) => ({ ...x, value: 'x' })) } });
  await kubectl(['apply', '-f', '-'], node('node-a', 'linux', []));
  await kubectl(['apply', '-f', '-'], node('node-b', 'linux', [{ key: 'dedicated', effect: 'NoSchedule' }, { key: 'example.com/drain', effect: 'NoExecute' }]));
  await kubectl(['apply', '-f', '-'], node('node-w', 'windows', []));
  const agentPods = async (): Promise<string[]> => {
    const list = JSON.parse(await kubectl(['get', 'pods', '-n', NS, '-l', 'app.kubernetes.io/name=nodemesh-agent', '-o', 'json'])) as {
      items: Array<{ spec: { affinity?: { nodeAffinity?: { requiredDuringSchedulingIgnoredDuringExecution?: { nodeSelectorTerms: Array<{ matchFields?: Array<{ values: string[] }> }> } } }; priority?: number; serviceAccountName: string } }>;
    };
    return list.items.map((p) => {
      assert.equal(p.spec.serviceAccountName, 'nodemesh-agent');
      assert.equal(p.spec.priority, 2000001000, 'system-node-critical');
      return p.spec.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms[0]?.matchFields?.[0]?.values[0] ?? '?';
    }).sort();
  };
  await waitFor(async () => (await agentPods()).length === 2, 30_000, 'an agent Pod for each Linux node');
  assert.deepEqual(await agentPods(), ['node-a', 'node-b']);

  // Uninstall: kubectl deletes every object of the folder; then each goes, the namespace with what
  // the controllers made in it. The API server takes its time with a CRD: its finalizer lists the
  // custom resources from a watch cache that starts again once the CRD is terminating, gets 429
  // "storage is (re)initializing" until it is ready, and retries with a doubling backoff; the
  // namespace controller, which lists them too, backs off the same way (6-7 s in all when the
  // machine is idle, over 60 s once in several full-suite runs). So the deletes are issued here and
  // their completion is waited for with a generous deadline; whatever is still there at the end is
  // reported with its conditions and the API server's and controller manager's log lines.
  const deleted = (await kubectl(['delete', '-f', DAEMONSET, '--wait=false'])).trim().split('\n');
  assert.equal(deleted.length, objects.length, deleted.join('\n'));
  const left = async (): Promise<string[]> => (await kubectl(['get', '-f', DAEMONSET, '--ignore-not-found', '-o', 'name'])).trim().split('\n').filter(Boolean);
  try {
    await waitFor(async () => (await left()).length === 0, 300_000, 'every object of daemonset/ to be gone', 1000);
  } catch (e) {
    // What is holding each up: a CRD's and the namespace's conditions, and the log lines of the
    // API server's CRD finalizer and watch caches and of the namespace controller.
    const conditions = await kubectl(['get', 'crd,namespace', '-l', 'app.kubernetes.io/part-of=nodemesh', '-o', 'jsonpath={range .items[*]}{.metadata.name}: {.status.conditions}{"\\n"}{end}']).catch((x: unknown) => String(x));
    const logs = ['kube-apiserver', 'kube-controller-manager'].map((name) => readFileSync(join(KUBE_STATE, `${name}.log`), 'utf8').split('\n').filter((l) => /crd_finalizer|cacher|namespace/i.test(l)).slice(-15).join('\n'));
    throw new Error(`${(e as Error).message}; left: ${(await left()).join(', ')}\n${conditions}\n${logs.join('\n')}`);
  }
  for (const m of objects) {
    const r = await runStatus(kubectlPath(), ['get', printed(m), ...(m.metadata.namespace ? ['-n', m.metadata.namespace] : []), '-o', 'name']);
    assert.notEqual(r.code, 0, `${printed(m)} is gone`);
    assert.match(r.stderr, /NotFound/);
  }
  for (const kind of ['clusterrole', 'clusterrolebinding']) assert.equal((await kubectl(['get', kind, '-l', 'app.kubernetes.io/part-of=nodemesh', '-o', 'name'])).trim(), '');
});
