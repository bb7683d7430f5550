/**
 * The policy engine's decisions against Istio's documented semantics, one case a line: policies
 * are parsed from YAML-shaped objects through the same path as the config sources.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { parseObject } from '../../src/config/objects.js';
import type { AuthorizationPolicy, PeerAuthentication } from '../../src/config/security.js';
import { PolicyEngine, type ConnectionFacts, type RequestFacts } from '../../src/proxy/policy.js';
import type { DefaultMtlsMode } from '../../src/config/mesh.js';

function policy(kind: 'AuthorizationPolicy' | 'PeerAuthentication', name: string, spec: Record<string, unknown>, namespace = 'shop'): AuthorizationPolicy | PeerAuthentication {
  const r = parseObject('t.yaml', { apiVersion: 'security.nodemesh.io/v1', kind, metadata: { name, namespace }, spec });
  if (!('object' in r) || !r.object) throw new Error(`refused: ${JSON.stringify(r)}`);
  if ('authorizationPolicy' in r.object) return r.object.authorizationPolicy;
  if ('peerAuthentication' in r.object) return r.object.peerAuthentication;
  throw new Error('not a security policy');
}
const AP = (name: string, spec: Record<string, unknown>, namespace?: string): AuthorizationPolicy => policy('AuthorizationPolicy', name, spec, namespace) as AuthorizationPolicy;
const PA = (name: string, spec: Record<string, unknown>, namespace?: string): PeerAuthentication => policy('PeerAuthentication', name, spec, namespace) as PeerAuthentication;

const engine = (authorizationPolicies: AuthorizationPolicy[], peerAuthentications: PeerAuthentication[] = [], mtlsMode: DefaultMtlsMode = 'PERMISSIVE'): PolicyEngine => new PolicyEngine({ authorizationPolicies, peerAuthentications, mtlsMode });
const web = { namespace: 'shop', labels: { app: 'web' } };
const from = (sa: string | undefined, extra: Partial<ConnectionFacts> = {}): ConnectionFacts => ({
  sourceIp: '10.200.0.7',
  peer: sa === undefined ? undefined : { trustDomain: 'cluster.local', namespace: sa.split('/')[0] ?? '', serviceAccount: sa.split('/')[1] ?? '' },
  destination: web,
  destinationIp: '10.200.0.9',
  destinationPort: 8080,
  ...extra,
});
const allowed = (e: PolicyEngine, f: ConnectionFacts): boolean => e.authorize(f).allowed;

test('policy: no policy allows; DENY wins over ALLOW; with an ALLOW policy only what it matches', () => {
  assert.ok(allowed(engine([]), from('shop/a')));
  assert.ok(allowed(engine([]), from(undefined)));
  const deny = AP('deny-b', { action: 'DENY', rules: [{ from: [{ source: { principals: ['cluster.local/ns/shop/sa/b'] } }] }] });
  const allowB = AP('allow-b', { rules: [{ from: [{ source: { principals: ['cluster.local/ns/shop/sa/b'] } }] }] });
  assert.ok(allowed(engine([deny]), from('shop/a')));
  const v = engine([deny, allowB]).authorize(from('shop/b'));
  assert.deepEqual(v, { allowed: false, audited: [], kind: 'AuthorizationPolicy', policy: 'shop/deny-b', reason: 'denied_by_policy' });
  assert.deepEqual(engine([allowB]).authorize(from('shop/a')), { allowed: false, audited: [], kind: 'AuthorizationPolicy', policy: 'shop/allow-b', reason: 'not_allowed' });
  assert.ok(allowed(engine([allowB]), from('shop/b')));
  // Istio's allow-nothing (spec: {}) and deny-all (DENY with one empty rule).
  assert.equal(allowed(engine([AP('allow-nothing', {})]), from('shop/a')), false);
  assert.equal(allowed(engine([AP('deny-all', { action: 'DENY', rules: [{}] })]), from('shop/a')), false);
  assert.ok(allowed(engine([AP('deny-none', { action: 'DENY' })]), from('shop/a')), 'DENY without rules matches nothing');
  // AUDIT never decides; it is reported.
  const audit = AP('audit-all', { action: 'AUDIT', rules: [{}] });
  assert.deepEqual(engine([audit]).authorize(from('shop/a')), { allowed: true, audited: ['shop/audit-all'] });
});

test('policy: which policies apply: the workload\'s namespace and the root namespace, by selector', () => {
  const denyAll = { action: 'DENY', rules: [{}] };
  assert.equal(allowed(engine([AP('d', { ...denyAll, selector: { matchLabels: { app: 'web' } } })]), from('shop/a')), false);
  assert.ok(allowed(engine([AP('d', { ...denyAll, selector: { matchLabels: { app: 'db' } } })]), from('shop/a')), 'another workload\'s policy');
  assert.ok(allowed(engine([AP('d', denyAll, 'other')]), from('shop/a')), "another namespace's policy");
  assert.equal(allowed(engine([AP('d', denyAll, 'nodemesh-system')]), from('shop/a')), false, 'the root namespace: mesh-wide');
  assert.equal(allowed(engine([AP('d', { ...denyAll, selector: { matchLabels: { app: 'web' } } }, 'nodemesh-system')]), from('shop/a')), false, 'a root-namespace selector selects in every namespace');
});

test('policy: sources: principals and namespaces with wildcards, not-fields, service accounts, IP blocks; plaintext has no principal', () => {
  const allowIf = (source: Record<string, unknown>): PolicyEngine => engine([AP('p', { rules: [{ from: [{ source }] }] })]);
  assert.ok(allowed(allowIf({ principals: ['*'] }), from('shop/a')));
  assert.equal(allowed(allowIf({ principals: ['*'] }), from(undefined)), false, '"*" is any authenticated source');
  assert.ok(allowed(allowIf({ principals: ['cluster.local/ns/shop/*'] }), from('shop/a')));
  assert.equal(allowed(allowIf({ principals: ['cluster.local/ns/shop/*'] }), from('dev/a')), false);
  assert.ok(allowed(allowIf({ principals: ['*/sa/a'] }), from('dev/a')));
  assert.ok(allowed(allowIf({ namespaces: ['shop'] }), from('shop/x')));
  assert.equal(allowed(allowIf({ namespaces: ['shop'] }), from('dev/x')), false);
  assert.ok(allowed(allowIf({ notNamespaces: ['dev'] }), from('shop/x')));
  assert.equal(allowed(allowIf({ notNamespaces: ['dev'] }), from('dev/x')), false);
  assert.ok(allowed(allowIf({ serviceAccounts: ['shop/a'] }), from('shop/a')));
  assert.equal(allowed(allowIf({ serviceAccounts: ['shop/a'] }), from('shop/b')), false);
  assert.equal(allowed(allowIf({ notServiceAccounts: ['shop/a'] }), from('shop/a')), false);
  assert.ok(allowed(allowIf({ ipBlocks: ['10.200.0.0/24'] }), from(undefined)));
  assert.equal(allowed(allowIf({ ipBlocks: ['10.201.0.0/24'] }), from(undefined)), false);
  assert.equal(allowed(allowIf({ notIpBlocks: ['10.200.0.7'] }), from('shop/a')), false);
  assert.ok(allowed(allowIf({ ipBlocks: ['fd00:6e6d::/64'] }), from('shop/a', { sourceIp: 'fd00:6e6d::7' })));
  assert.ok(allowed(allowIf({ ipBlocks: ['10.200.0.0/16'] }), from('shop/a', { sourceIp: '::ffff:10.200.3.4' })), 'an IPv4-mapped address is its IPv4 one');
  // Istio's way to refuse plaintext: DENY notPrincipals "*".
  const denyPlain = engine([AP('d', { action: 'DENY', rules: [{ from: [{ source: { notPrincipals: ['*'] } }] }] })]);
  assert.equal(allowed(denyPlain, from(undefined)), false);
  assert.ok(allowed(denyPlain, from('shop/a')));
  // Fields of one source all apply; sources of a rule are alternatives.
  assert.equal(allowed(allowIf({ namespaces: ['shop'], ipBlocks: ['10.201.0.0/24'] }), from('shop/a')), false);
  assert.ok(allowed(engine([AP('p', { rules: [{ from: [{ source: { namespaces: ['dev'] } }, { source: { namespaces: ['shop'] } }] }] })]), from('shop/a')));
});

test('policy: ports and when conditions on the L4 attributes', () => {
  const allowTo = (rule: Record<string, unknown>): PolicyEngine => engine([AP('p', { rules: [rule] })]);
  assert.ok(allowed(allowTo({ to: [{ operation: { ports: ['8080'] } }] }), from('shop/a')));
  assert.equal(allowed(allowTo({ to: [{ operation: { ports: ['9090'] } }] }), from('shop/a')), false);
  assert.equal(allowed(allowTo({ to: [{ operation: { notPorts: ['8080'] } }] }), from('shop/a')), false);
  const when = (key: string, values: string[], notValues?: string[]): PolicyEngine => allowTo({ when: [{ key, values, ...(notValues ? { notValues } : {}) }] });
  assert.ok(allowed(when('source.ip', ['10.200.0.0/16']), from(undefined)));
  assert.equal(allowed(when('source.ip', ['10.201.0.0/16']), from(undefined)), false);
  assert.ok(allowed(when('destination.ip', ['10.200.0.9']), from('shop/a')));
  assert.ok(allowed(when('destination.port', ['8080']), from('shop/a')));
  assert.equal(allowed(when('destination.port', ['80']), from('shop/a')), false);
  assert.ok(allowed(when('source.namespace', ['sh*']), from('shop/a')));
  assert.equal(allowed(when('source.namespace', ['shop']), from(undefined)), false);
  assert.ok(allowed(when('source.principal', ['cluster.local/ns/shop/sa/a']), from('shop/a')));
  assert.equal(allowed(allowTo({ when: [{ key: 'source.namespace', notValues: ['shop'] }] }), from('shop/a')), false);
  // Conditions of a rule all apply.
  assert.equal(allowed(allowTo({ when: [{ key: 'destination.port', values: ['8080'] }, { key: 'source.namespace', values: ['dev'] }] }), from('shop/a')), false);
});

test('policy: PeerAuthentication: workload (port first) > namespace > root namespace > mesh default; UNSET inherits; STRICT refuses plaintext', () => {
  const strictNs = PA('ns-strict', { mtls: { mode: 'STRICT' } });
  const meshPermissive = PA('mesh', { mtls: { mode: 'PERMISSIVE' } }, 'nodemesh-system');
  const workload = PA('web', { selector: { matchLabels: { app: 'web' } }, mtls: { mode: 'UNSET' }, portLevelMtls: { '9090': { mode: 'DISABLE' } } });
  const e = engine([], [strictNs, meshPermissive, workload]);
  assert.deepEqual(e.mtlsMode(web, 8080), { mode: 'STRICT', policy: 'shop/ns-strict' }, 'UNSET on the workload: the namespace decides');
  assert.deepEqual(e.mtlsMode(web, 9090), { mode: 'DISABLE', policy: 'shop/web' });
  assert.deepEqual(e.mtlsMode({ namespace: 'dev', labels: {} }, 8080), { mode: 'PERMISSIVE', policy: 'nodemesh-system/mesh' });
  assert.deepEqual(engine([], [], 'STRICT').mtlsMode(web, 8080), { mode: 'STRICT', policy: 'mesh-default' });
  assert.deepEqual(e.authorize(from(undefined)), { allowed: false, audited: [], kind: 'PeerAuthentication', policy: 'shop/ns-strict', reason: 'mtls_required' });
  assert.ok(allowed(e, from('shop/a')));
  assert.ok(allowed(e, from(undefined, { destinationPort: 9090 })), 'DISABLE admits plaintext');
  assert.ok(engine([]).empty);
  assert.equal(e.empty, false);
});

/** A request's facts as the proxy gives them to the engine. */
const request = (method: string, path: string, host = 'web.shop.svc.cluster.local:8080', headers: Record<string, string> = {}): RequestFacts => ({ method, path, host, header: (name) => headers[name] });

test('policy: request attributes (methods, paths, hosts, request headers) decide per request, Istio\'s way', () => {
  const readOnly = AP('read-only', { rules: [{ from: [{ source: { namespaces: ['shop'] } }], to: [{ operation: { methods: ['GET', 'HEAD'], paths: ['/api/*', '/health'] } }] }] });
  const e = engine([readOnly]);
  const ok = (f: ConnectionFacts, r: RequestFacts): boolean => e.authorizeRequest(f, r).allowed;
  assert.ok(ok(from('shop/a'), request('GET', '/api/items')));
  assert.ok(ok(from('shop/a'), request('HEAD', '/health')));
  assert.equal(ok(from('shop/a'), request('POST', '/api/items')), false, 'a method not listed');
  assert.equal(ok(from('shop/a'), request('GET', '/healthz')), false, 'an exact path is exact');
  assert.equal(ok(from('shop/a'), request('get', '/api/items')), false, 'methods are case-sensitive');
  assert.equal(ok(from('dev/a'), request('GET', '/api/items')), false, 'the source still has to match');
  assert.deepEqual(e.authorizeRequest(from('shop/a'), request('DELETE', '/api/x')), { allowed: false, audited: [], kind: 'AuthorizationPolicy', policy: 'shop/read-only', reason: 'not_allowed' });
  // notPaths with a suffix pattern; hosts case-insensitive, a host pattern without a port matches on any port.
  const noCss = engine([AP('no-css', { action: 'DENY', rules: [{ to: [{ operation: { notHosts: ['WEB.shop.svc.cluster.local'], paths: ['*.css'] } }] }] })]);
  assert.ok(noCss.authorizeRequest(from('shop/a'), request('GET', '/site.css')).allowed, 'the host is the excluded one (any port)');
  assert.equal(noCss.authorizeRequest(from('shop/a'), request('GET', '/site.css', 'web')).allowed, false);
  assert.ok(noCss.authorizeRequest(from('shop/a'), request('GET', '/site.js', 'web')).allowed);
  // request.headers[...] conditions: Istio's string match on the value; a missing header matches no value.
  const admins = engine([AP('admins', { rules: [{ when: [{ key: 'request.headers[x-role]', values: ['admin*'] }] }] })]);
  assert.ok(admins.authorizeRequest(from('shop/a'), request('GET', '/', 'web', { 'x-role': 'admin-eu' })).allowed);
  assert.equal(admins.authorizeRequest(from('shop/a'), request('GET', '/', 'web', { 'x-role': 'user' })).allowed, false);
  assert.equal(admins.authorizeRequest(from('shop/a'), request('GET', '/')).allowed, false);
  assert.ok(engine([readOnly]).hasRequestRules(web));
  assert.equal(engine([AP('l4', { rules: [{ to: [{ operation: { ports: ['8080'] } }] }] })]).hasRequestRules(web), false);
  assert.equal(engine([readOnly]).hasRequestRules({ namespace: 'dev', labels: {} }), false, 'not a policy of that workload');
});

test('policy: with no request to read (a TCP port), request rules follow Istio: ALLOW matches nothing, DENY judges the rest', () => {
  const allowGet = engine([AP('allow-get', { rules: [{ to: [{ operation: { methods: ['GET'] } }] }] })]);
  assert.equal(allowed(allowGet, from('shop/a')), false, 'an ALLOW rule that needs a request allows nothing at L4');
  const denyPost = engine([AP('deny-post', { action: 'DENY', rules: [{ from: [{ source: { namespaces: ['dev'] } }], to: [{ operation: { methods: ['POST'] } }] }] })]);
  assert.equal(allowed(denyPost, from('dev/a')), false, 'a DENY rule denies on its other fields alone');
  assert.ok(allowed(denyPost, from('shop/a')));
  const denyHeader = engine([AP('deny-debug', { action: 'DENY', rules: [{ when: [{ key: 'request.headers[x-debug]', values: ['*'] }] }] })]);
  assert.equal(allowed(denyHeader, from('shop/a')), false, 'a header condition left out: the DENY rule matches every connection');
  // On an HTTP port the connection is admitted (mTLS mode only) and each request decides.
  assert.ok(denyPost.admitConnection(from('dev/a')).allowed);
  assert.ok(denyPost.authorizeRequest(from('dev/a'), request('GET', '/')).allowed);
  assert.equal(denyPost.authorizeRequest(from('dev/a'), request('POST', '/')).allowed, false);
  assert.equal(engine([], [PA('strict', { mtls: { mode: 'STRICT' } })]).admitConnection(from(undefined)).allowed, false, 'STRICT still refuses plaintext connections');
  // remote.ip is the connection's source (no proxy's X-Forwarded-For is trusted).
  const remote = engine([AP('remote', { rules: [{ when: [{ key: 'remote.ip', values: ['10.200.0.0/16'] }] }] })]);
  assert.ok(allowed(remote, from(undefined)));
  assert.equal(allowed(remote, from(undefined, { sourceIp: '10.9.0.1' })), false);
});

test('policy: one engine asked again and again about the same workload and port, then about that workload with new labels (a new object), answers for each as it is now', () => {
  const onlyWeb = AP('web-only-b', { selector: { matchLabels: { app: 'web' } }, rules: [{ from: [{ source: { principals: ['cluster.local/ns/shop/sa/b'] } }] }] });
  const strictWeb = PA('strict-web', { selector: { matchLabels: { app: 'web' } }, mtls: { mode: 'STRICT' } });
  const e = engine([onlyWeb], [strictWeb]);
  for (let i = 0; i < 3; i++) {
    assert.equal(allowed(e, from('shop/a')), false, `ask ${i}: the ALLOW policy selects web`);
    assert.equal(e.mtlsMode(web, 8080).mode, 'STRICT');
  }
  // The same pod relabelled: no longer selected by either policy.
  const relabelled = { namespace: 'shop', labels: { app: 'api' } };
  assert.ok(allowed(e, from('shop/a', { destination: relabelled })));
  assert.equal(e.mtlsMode(relabelled, 8080).mode, 'PERMISSIVE');
  assert.equal(e.hasRequestRules(relabelled), false);
  // And the first object still gets its own answer.
  assert.equal(allowed(e, from('shop/a')), false);
  assert.ok(allowed(e, from('shop/b')));
});

test('policy: the request gate for the destination\'s engine: open without policies; none with AUDIT, a DENY of any request, no ALLOW rule it can read, or a refused connection', () => {
  assert.deepEqual(engine([]).requestGate(from('shop/a')), { id: 0, deny: [], allow: undefined });
  assert.equal(engine([AP('audit', { action: 'AUDIT', rules: [{ to: [{ operation: { paths: ['/x'] } }] }] })]).requestGate(from('shop/a')), undefined, 'AUDIT counts each match');
  assert.equal(engine([AP('deny-all', { action: 'DENY', rules: [{}] })]).requestGate(from('shop/a')), undefined);
  assert.equal(engine([AP('deny-h', { action: 'DENY', rules: [{ when: [{ key: 'request.headers[x-a]', values: ['1'] }] }] })]).requestGate(from('shop/a')), undefined, 'a DENY on headers alone may match any request');
  assert.equal(engine([AP('allow-nothing', {})]).requestGate(from('shop/a')), undefined);
  assert.equal(engine([AP('allow-h', { rules: [{ when: [{ key: 'request.headers[x-a]', values: ['1'] }] }] })]).requestGate(from('shop/a')), undefined, 'an ALLOW on headers: JS reads each request');
  assert.equal(engine([AP('allow-b', { rules: [{ from: [{ source: { principals: ['cluster.local/ns/shop/sa/b'] } }] }] })]).requestGate(from('shop/a')), undefined, "another caller's rule");
  assert.equal(engine([], [PA('strict', { mtls: { mode: 'STRICT' } })]).requestGate(from(undefined)), undefined, 'plaintext into STRICT');
  // The caller's own rule: any request, on this connection.
  const g = engine([AP('allow-a', { rules: [{ from: [{ source: { principals: ['cluster.local/ns/shop/sa/a'] } }] }, { to: [{ operation: { ports: ['9090'], methods: ['GET'] } }] }] })]).requestGate(from('shop/a'));
  assert.deepEqual(g?.allow?.length, 1, 'the other port\'s operation left out');
  assert.deepEqual(g?.allow?.[0], { hosts: [], notHosts: [], methods: [], notMethods: [], paths: [], notPaths: [] });
  assert.deepEqual(g?.deny, []);
});
