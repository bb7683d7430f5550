/**
 * PeerAuthentication and AuthorizationPolicy enforced where the destination is served, on the
 * real kernel with real TLS: two nodes behind one control plane, pods with different service
 * accounts, a plaintext client (a pod outside the mesh dialling a pod address). Policies are
 * changed by writing the control plane's config folder, as an operator would, and each step waits
 * until both agents acknowledged the new config.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { metricValue, serviceYaml, startAgent, startControlPlane, type ControlPlaneProcess } from '../support/agent.js';
import { createSandbox, waitFor } from '../support/sandbox.js';

const SVC = '10.96.0.81';

/** Writes the policies file and waits until every node acknowledged the config that holds it. */
async function applyPolicies(cp: ControlPlaneProcess, yaml: string): Promise<void> {
  const before = (await cp.nodes()).version;
  await cp.writeConfig('policies.yaml', yaml);
  await waitFor(
    async () => {
      const { version, nodes } = await cp.nodes();
      return version > before && nodes.length === 2 && nodes.every((n) => n.inSync && n.ackedVersion === version);
    },
    10_000,
    'both nodes acknowledged the new policies',
  ).catch((e: Error) => {
    throw new Error(`${e.message}; control plane log: ${cp.log().slice(-3000)}`);
  });
}

const peerAuthentication = (name: string, namespace: string, spec: string): string => `apiVersion: security.nodemesh.io/v1
kind: PeerAuthentication
metadata: {name: ${name}, namespace: ${namespace}}
spec:
${spec}
---
`;
const authorizationPolicy = (name: string, spec: string): string => `apiVersion: security.nodemesh.io/v1
kind: AuthorizationPolicy
metadata: {name: ${name}, namespace: default}
spec:
${spec}
---
`;

/**
 * Node A: meshed clients (service accounts client and other), a pod outside the mesh (plain),
 * and a server (same-node path). Node B: a server behind the Service (cross-node, HBONE).
 */
async function mesh(t: Parameters<typeof createSandbox>[0], options: { trustDomain?: string } = {}) {
  const sb = await createSandbox(t);
  await sb.blackhole(SVC);
  const nodeB = `${sb.config.node}-b`;
  const meshConfig: Record<string, string> = options.trustDomain === undefined ? {} : { 'mesh.yaml': `apiVersion: v1\nkind: ConfigMap\nmetadata: {name: nodemesh, namespace: nodemesh-system}\ndata: {trustDomain: ${options.trustDomain}}\n` };
  const cp = await startControlPlane(sb, { 'svc.yaml': serviceYaml('server', [SVC], { app: 'server' }), ...meshConfig });
  const agentA = await startAgent(sb, { controlPlane: cp.tlsAddress, caRoot: cp.caRoot });
  const agentB = await startAgent(sb, { controlPlane: cp.tlsAddress, caRoot: cp.caRoot }, { node: nodeB });
  const serverB = await sb.echoPod('server-b', 8080, ['app=server', 'role=api'], { node: nodeB, serviceAccount: 'server' });
  const serverA = await sb.echoPod('server-a', 8080, ['app=local', 'role=api'], { serviceAccount: 'server' });
  const client = await sb.idlePod('client-a', [], { serviceAccount: 'client' });
  const other = await sb.idlePod('other-a', [], { serviceAccount: 'other' });
  const plain = await sb.idlePod('plain-a', ['nodemesh.io/capture=disabled']);
  await waitFor(async () => ((await agentA.config()).services.find((s) => s.service === 'default/server:80')?.endpoints.length ?? 0) === 1, 10_000, "B's server as an endpoint on A");
  await agentA.waitForPods((pods) => pods.filter((p) => p.verified).length === 3, 'three meshed pods verified on A');
  /** Whether a connection gets through, every byte echoed. */
  const reaches = async (from: typeof client, host: string, port = host === SVC ? 80 : 8080): Promise<boolean> => {
    const r = await sb.dialFrom(from, host, port, { bytes: 2048 });
    if (process.env['NM_DEBUG_TEST']) process.stderr.write(`DIAL ${from.name} ${host}:${port} ${JSON.stringify(r)}\n${agentA.log().slice(-3000)}\n----B\n${agentB.log().slice(-3000)}\n`);
    return r.intact;
  };
  return { sb, cp, agentA, agentB, serverA, serverB, client, other, plain, reaches, cross: SVC, local: serverA.record.ip4 };
}

test('security: PeerAuthentication STRICT refuses plaintext, PERMISSIVE admits it, port-level and workload modes override, DISABLE sends plaintext', async (t) => {
  // In a trust domain of its own: identities, tunnels and metric labels all follow the mesh config.
  const { cp, agentA, agentB, serverB, client, plain, reaches } = await mesh(t, { trustDomain: 'example.org' });
  const podB = serverB.record.ip4;
  const denials = async (labels: Record<string, string>): Promise<number> => metricValue(await agentB.metrics(), 'nodemesh_policy_denials_total', labels);

  // The mesh default (PERMISSIVE): plaintext gets through, reported without an identity.
  assert.ok(await reaches(plain, podB), 'plaintext admitted under PERMISSIVE');
  await waitFor(async () => metricValue(await agentB.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'destination', connection_security_policy: 'none', source_principal: 'unknown', destination_workload: 'server' }) === 1, 5000, 'the plaintext connection reported as such');

  // STRICT for the namespace: the plaintext client is refused, the meshed one still gets through.
  await applyPolicies(cp, peerAuthentication('strict', 'default', '  mtls: {mode: STRICT}'));
  assert.equal(await reaches(plain, podB), false, 'plaintext refused under STRICT');
  assert.equal(await denials({ kind: 'PeerAuthentication', policy: 'default/strict', reason: 'mtls_required', path: 'inbound' }), 1);
  assert.ok(await reaches(client, SVC), 'mTLS admitted under STRICT');
  assert.ok(await reaches(client, podB), 'mTLS to the pod address too');
  const principals = { source_principal: 'spiffe://example.org/ns/default/sa/client', destination_principal: 'spiffe://example.org/ns/default/sa/server' };
  await waitFor(async () => metricValue(await agentB.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'destination', connection_security_policy: 'mutual_tls', ...principals }) === 2, 5000, "B reports both mTLS connections in the mesh's trust domain");
  assert.equal(metricValue(await agentA.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'source', connection_security_policy: 'mutual_tls', ...principals }), 2);
  assert.ok(agentB.log().split('\n').some((l) => l.includes('connection denied by policy') && l.includes('"policy":"default/strict"') && l.includes('"source":"plaintext"')), 'the refusal is logged with its policy');

  // Mesh-wide STRICT in the root namespace, a workload PERMISSIVE on port 8080 only: plaintext
  // to 8080 is admitted again (the port-level mode wins over the workload's and the mesh's).
  await applyPolicies(
    cp,
    peerAuthentication('mesh-strict', 'nodemesh-system', '  mtls: {mode: STRICT}') +
      peerAuthentication('server-8080', 'default', '  selector: {matchLabels: {app: server}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {"8080": {mode: PERMISSIVE}}'),
  );
  assert.ok(await reaches(plain, podB), 'port-level PERMISSIVE admits plaintext on 8080');
  // The same workload policy without the port override: STRICT again, named as the deciding policy.
  await applyPolicies(cp, peerAuthentication('mesh-strict', 'nodemesh-system', '  mtls: {mode: STRICT}') + peerAuthentication('server-8080', 'default', '  selector: {matchLabels: {app: server}}\n  mtls: {mode: STRICT}'));
  assert.equal(await reaches(plain, podB), false);
  assert.equal(await denials({ kind: 'PeerAuthentication', policy: 'default/server-8080', reason: 'mtls_required', path: 'inbound' }), 1);
  // Only the mesh-wide policy: it decides.
  await applyPolicies(cp, peerAuthentication('mesh-strict', 'nodemesh-system', '  mtls: {mode: STRICT}'));
  assert.equal(await reaches(plain, podB), false);
  assert.equal(await denials({ kind: 'PeerAuthentication', policy: 'nodemesh-system/mesh-strict', reason: 'mtls_required', path: 'inbound' }), 1);

  // DISABLE on the workload: the client's node sends plaintext (no tunnel), the server's admits it.
  const hboneBefore = metricValue(await agentA.metrics(), 'nodemesh_proxied_connections_total', { path: 'hbone' });
  await applyPolicies(cp, peerAuthentication('server-off', 'default', '  selector: {matchLabels: {app: server}}\n  mtls: {mode: DISABLE}'));
  assert.ok(await reaches(client, SVC), 'DISABLE: connected in plaintext');
  assert.equal(metricValue(await agentA.metrics(), 'nodemesh_proxied_connections_total', { path: 'hbone' }), hboneBefore, 'no tunnel to a DISABLE workload');
  await waitFor(
    async () => metricValue(await agentB.metrics(), 'istio_tcp_connections_opened_total', { reporter: 'destination', connection_security_policy: 'none', source_principal: 'unknown', destination_workload: 'server' }) >= 3,
    5000,
    'the DISABLE connection reported in plaintext',
  );
});

test('security: AuthorizationPolicy DENY blocks exactly the named principal, ALLOW admits only the listed one, AUDIT marks; across nodes and on the same-node path', async (t) => {
  const { cp, agentA, agentB, client, other, plain, reaches, cross, local, serverB } = await mesh(t);
  const denials = async (agent: typeof agentA, labels: Record<string, string>): Promise<number> => metricValue(await agent.metrics(), 'nodemesh_policy_denials_total', labels);

  // Before any policy, everyone reaches both servers.
  for (const from of [client, other]) {
    assert.ok(await reaches(from, cross), 'cross-node, no policy');
    assert.ok(await reaches(from, local), 'same node, no policy');
  }

  // DENY the "other" service account on every role=api workload; AUDIT connections from "client".
  await applyPolicies(
    cp,
    authorizationPolicy('deny-other', '  selector: {matchLabels: {role: api}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: ["cluster.local/ns/default/sa/other"]}') +
      authorizationPolicy('audit-client', '  action: AUDIT\n  rules:\n  - from:\n    - source: {principals: ["cluster.local/ns/default/sa/client"]}'),
  );
  const received = (await serverB.connections()).length;
  assert.equal(await reaches(other, cross), false, 'DENY: other refused across nodes');
  assert.equal(await reaches(other, local), false, 'DENY: other refused on the same node');
  assert.ok(await reaches(client, cross), 'DENY: client still reaches across nodes');
  assert.ok(await reaches(client, local), 'DENY: client still reaches on the same node');
  assert.ok(await reaches(plain, serverB.record.ip4), 'DENY names a principal: a plaintext client is not it');
  assert.equal((await serverB.connections()).length, received + 2, "the refused connection never reached B's application");
  assert.equal(await denials(agentB, { kind: 'AuthorizationPolicy', policy: 'default/deny-other', reason: 'denied_by_policy', path: 'hbone' }), 1);
  assert.equal(await denials(agentA, { kind: 'AuthorizationPolicy', policy: 'default/deny-other', reason: 'denied_by_policy', path: 'same_node' }), 1);
  assert.equal(metricValue(await agentB.metrics(), 'nodemesh_policy_audits_total', { policy: 'default/audit-client' }), 1);
  assert.equal(metricValue(await agentA.metrics(), 'nodemesh_policy_audits_total', { policy: 'default/audit-client' }), 1);
  const line = agentB.log().split('\n').find((l) => l.includes('connection denied by policy'));
  assert.ok(line, 'the denial is logged');
  const entry = JSON.parse(line) as Record<string, unknown>;
  assert.equal(entry['source'], 'spiffe://cluster.local/ns/default/sa/other');
  assert.equal(entry['policy'], 'default/deny-other');
  assert.equal(entry['pod'], 'server-b');

  // ALLOW only "client" on port 8080: "other" and the plaintext pod are refused (no ALLOW
  // matches them), "client" gets through; same on both paths.
  await applyPolicies(cp, authorizationPolicy('allow-client', '  selector: {matchLabels: {role: api}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: ["cluster.local/ns/default/sa/client"]}\n    to:\n    - operation: {ports: ["8080"]}'));
  assert.ok(await reaches(client, cross), 'ALLOW: client across nodes');
  assert.ok(await reaches(client, local), 'ALLOW: client on the same node');
  assert.equal(await reaches(other, cross), false, 'ALLOW: other refused across nodes');
  assert.equal(await reaches(other, local), false, 'ALLOW: other refused on the same node');
  assert.equal(await reaches(plain, serverB.record.ip4), false, 'ALLOW: plaintext has no principal to match');
  assert.equal(await denials(agentB, { kind: 'AuthorizationPolicy', policy: 'default/allow-client', reason: 'not_allowed', path: 'hbone' }), 1);
  assert.equal(await denials(agentB, { kind: 'AuthorizationPolicy', policy: 'default/allow-client', reason: 'not_allowed', path: 'inbound' }), 1);
  assert.equal(await denials(agentA, { kind: 'AuthorizationPolicy', policy: 'default/allow-client', reason: 'not_allowed', path: 'same_node' }), 1);

  // A policy nodemesh cannot evaluate (a JWT's principals) is refused whole and named; the last
  // good policies keep serving.
  await cp.writeConfig('policies.yaml', authorizationPolicy('allow-client', '  selector: {matchLabels: {role: api}}\n  rules:\n  - from:\n    - source: {requestPrincipals: ["issuer/*"]}'));
  await waitFor(async () => metricValue(await cp.metrics(), 'nodemesh_cp_config_rejected_objects', { kind: 'AuthorizationPolicy' }) === 1, 10_000, 'the JWT policy rejected');
  assert.match(cp.log(), /spec\.rules\[0\]\.from\[0\]\.source\.requestPrincipals/);
  assert.equal(await reaches(other, cross), false, 'the last good ALLOW policy still applies');
  assert.ok(await reaches(client, cross));
  // Request attributes on a port that is not HTTP (Istio's TCP semantics): an ALLOW rule that
  // names a method matches no connection, so nobody gets in.
  await applyPolicies(cp, authorizationPolicy('allow-client', '  selector: {matchLabels: {role: api}}\n  rules:\n  - from:\n    - source: {principals: ["cluster.local/ns/default/sa/client"]}\n    to:\n    - operation: {methods: ["GET"]}'));
  assert.equal(await reaches(client, cross), false, 'an ALLOW rule with a method allows nothing on a TCP port');
  await applyPolicies(cp, '');
  assert.ok(await reaches(client, cross));
});
