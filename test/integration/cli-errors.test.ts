/**
 * Every failure a user can cause, through the real CLI: a missing or unreadable path, a port in
 * use, a bad flag value, nothing answering, a file that is not YAML, no kubeconfig, a bad token
 * file, not root. Each must end the process with a non-zero exit and the one form formatError
 * prints (`error NM_ERR_...: message`, context, `fix: ...`), never a stack trace. Long-running
 * commands (agent, control plane) must fail fast: every process runs under a timeout, so one that
 * hangs instead of failing fails its test.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';

import { formatError } from '../../src/cli/output.js';
import type { ErrorCode } from '../../src/shared/errors.js';
import { CLI_ENTRY } from '../../src/shared/paths.js';
import { freePort } from '../../src/shared/ports.js';
import { collect, createSandbox, type Sandbox } from '../support/sandbox.js';

/** Generous for a CLI that fails at its first step; an agent that served instead would never end. */
const TIMEOUT_MS = 20_000;
/** uid 65534 (nobody) with CAP_DAC_READ_SEARCH only: it reads the package wherever the clone lives (a 0700 folder too), and is not root. */
const NOT_ROOT = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=+dac_read_search', '--ambient-caps=+dac_read_search'];

interface Run {
  readonly args: ReadonlyArray<string>;
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** The CLI as a process, SIGTERM after TIMEOUT_MS (an agent that stops on it still exits 0: a hang fails either way). */
async function nodemesh(args: ReadonlyArray<string>, env: NodeJS.ProcessEnv, prefix: ReadonlyArray<string> = []): Promise<Run> {
  const argv = [...prefix, process.execPath, CLI_ENTRY, ...args];
  const child = spawn(argv[0] ?? '', argv.slice(1), { env, stdio: ['ignore', 'pipe', 'pipe'], timeout: TIMEOUT_MS, killSignal: 'SIGTERM' });
  const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
  const out = await collect(child);
  return { args, ...out, signal: await exited };
}

/**
 * The agent and the control plane log JSON lines on stderr (pino) and `nodemesh up` prints
 * progress lines ("» ..."): what the command says about its failure starts after them.
 */
function errorOutput(stderr: string): string {
  return stderr
    .split('\n')
    .filter((l) => !l.startsWith('» ') && !isLogLine(l))
    .join('\n');
}

function isLogLine(line: string): boolean {
  if (!line.startsWith('{')) return false;
  try {
    return typeof JSON.parse(line) === 'object';
  } catch {
    return false;
  }
}

function assertNoStack(r: Run): void {
  for (const [stream, text] of [['stdout', r.stdout], ['stderr', r.stderr]] as const) {
    for (const line of text.split('\n')) {
      assert.ok(!/^\s+at\s/.test(line) && !line.includes('node:internal'), `nodemesh ${r.args.join(' ')}: a stack frame on ${stream}: ${line}\n${text}`);
    }
  }
}

/** A user error in nodemesh's form: non-zero exit, `error CODE: message`, a fix line, no stack. */
function assertUserError(r: Run, code: ErrorCode, options: { message?: RegExp; fix?: RegExp | false; exit?: number } = {}): void {
  const what = `nodemesh ${r.args.join(' ')}\nexit ${r.code} signal ${r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  assert.equal(r.signal, null, `did not fail within ${TIMEOUT_MS} ms: ${what}`);
  assert.notEqual(r.code, 0, what);
  if (options.exit !== undefined) assert.equal(r.code, options.exit, what);
  const said = errorOutput(r.stderr);
  assert.ok(said.startsWith(`error ${code}: `), `expected "error ${code}: ..." first: ${what}`);
  if (options.message) assert.match(said.split('\n')[0] ?? '', options.message, what);
  if (options.fix !== false) assert.match(said, options.fix ?? /^ {2}fix: \S/m, `expected a fix: line: ${what}`);
  assertNoStack(r);
}

/** Commander's own usage errors (unknown option, missing argument): its one line and the help, no stack. */
function assertUsageError(r: Run, message: RegExp): void {
  const what = `nodemesh ${r.args.join(' ')}\nexit ${r.code}\nstderr: ${r.stderr}`;
  assert.equal(r.signal, null, what);
  assert.notEqual(r.code, 0, what);
  assert.match(r.stderr.split('\n')[0] ?? '', message, what);
  assertNoStack(r);
}

/** A TCP port on 127.0.0.1 held open by the test until it ends (never one of nodemesh's defaults). */
async function takenPort(t: TestContext): Promise<number> {
  const server: Server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return (server.address() as { port: number }).port;
}

/** A scratch folder for config, tokens and kubeconfigs, removed with the sandbox. */
async function scratchDir(sb: Sandbox): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), `nodemesh-test-${sb.id}-cli-`));
  sb.defer(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** The agent's flags that keep it inside the sandbox, on ports the kernel picks. */
function agentArgs(sb: Sandbox, overrides: Record<string, string> = {}): string[] {
  const flags: Record<string, string> = { '--bpf-root': join(sb.bpffsDir, 'agent'), '--node': `test-${sb.id}`, '--metrics': '127.0.0.1:0', '--ready': '127.0.0.1:0', '--admin': '127.0.0.1:0', ...overrides };
  return Object.entries(flags).flat();
}

/** A control plane of the sandbox: its CA in the sandbox's state folder, every port the kernel's choice. */
function controlPlaneArgs(sb: Sandbox, overrides: Record<string, string> = {}): string[] {
  return Object.entries({ '--listen': '127.0.0.1:0', '--listen-tls': '127.0.0.1:0', '--ca-dir': join(sb.config.stateDir, 'ca'), '--http': '127.0.0.1:0', ...overrides }).flat();
}

const YAML_THAT_IS_NOT = ': : not yaml: [\n';

test('agent: a missing --config-dir, one that is a file, and a file in it that cannot be read name the path', async (t) => {
  const sb = await createSandbox(t);
  const dir = await scratchDir(sb);
  const missing = join(dir, 'nonexistent');
  assertUserError(await nodemesh(['agent', '--config-dir', missing, ...agentArgs(sb)], sb.env), 'NM_ERR_CONFIG_DIR', { message: new RegExp(`the config folder ${missing} does not exist`) });
  const file = join(dir, 'a-file');
  await writeFile(file, 'x');
  assertUserError(await nodemesh(['agent', '--config-dir', file, ...agentArgs(sb)], sb.env), 'NM_ERR_CONFIG_DIR', { message: /is not a folder/ });
  // A folder named like a YAML file cannot be read as one.
  const config = join(dir, 'config');
  await mkdir(join(config, 'svc.yaml'), { recursive: true });
  assertUserError(await nodemesh(['agent', '--config-dir', config, ...agentArgs(sb)], sb.env), 'NM_ERR_CONFIG_DIR', { message: /svc\.yaml is a folder/ });
});

test('agent: a port in use on --metrics, --ready or --admin names the address', async (t) => {
  const sb = await createSandbox(t);
  const config = await scratchDir(sb);
  const port = await takenPort(t);
  for (const flag of ['--metrics', '--ready', '--admin']) {
    const r = await nodemesh(['agent', '--config-dir', config, ...agentArgs(sb, { [flag]: `127.0.0.1:${port}` })], sb.env);
    assertUserError(r, 'NM_ERR_PORT_IN_USE', { message: new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} \\(${flag}\\)`), fix: new RegExp(`fix: stop that process .*or give ${flag} another port`) });
  }
});

test('agent: bad flag values', async (t) => {
  const sb = await createSandbox(t);
  const config = await scratchDir(sb);
  const cases: Array<[string[], RegExp]> = [
    [['--config-dir', config, ...agentArgs(sb, { '--metrics': '127.0.0.1:x' })], /--metrics "127\.0\.0\.1:x" is not HOST:PORT/],
    // 192.0.2.1 (TEST-NET-1) is on no interface: bind() refuses it, nothing is sent.
    [['--config-dir', config, ...agentArgs(sb, { '--ready': '192.0.2.1:15999' })], /cannot listen on 192\.0\.2\.1:15999 \(--ready\): the address is not one of this machine's/],
    [['--config-dir', config, ...agentArgs(sb, { '--connect-timeout': 'soon' })], /--connect-timeout "soon" is not a whole number/],
    [['--config-dir', config, ...agentArgs(sb, { '--bpf-root': '/tmp' })], /--bpf-root \/tmp is not under \/sys\/fs\/bpf/],
    [agentArgs(sb), /give either --control-plane HOST:PORT or --config-dir DIR/],
    [['--config-dir', config, '--control-plane', '127.0.0.1:1', ...agentArgs(sb)], /give either --control-plane HOST:PORT or --config-dir DIR/],
    [['--control-plane', 'nowhere', ...agentArgs(sb)], /--control-plane "nowhere" is not HOST:PORT/],
    // Refused before anything is dialled: plaintext only to a control plane on loopback.
    [['--control-plane', '192.0.2.1:15012', ...agentArgs(sb)], /--control-plane 192\.0\.2\.1:15012 without --ca-root: plaintext is for a control plane on loopback only/],
    [['--config-dir', config, '--ca-root', join(config, 'root.pem'), ...agentArgs(sb)], /--ca-root is for --control-plane/],
  ];
  for (const [args, message] of cases) assertUserError(await nodemesh(['agent', ...args], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message, exit: 2 });
  assertUsageError(await nodemesh(['agent', '--passthrough', 'maybe'], sb.env), /^error: option '--passthrough <mode>' argument 'maybe' is invalid/);
  assertUsageError(await nodemesh(['agent', '--no-such-flag'], sb.env), /^error: unknown option '--no-such-flag'/);
});

test('agent: a missing or empty --token-file, or a --ca-root that is missing or holds no certificate, stops it at start', async (t) => {
  const sb = await createSandbox(t);
  const dir = await scratchDir(sb);
  // Nothing listens there; the agent must stop on the token before it would connect.
  const controlPlane = `127.0.0.1:${await freePort()}`;
  const missing = join(dir, 'no-token');
  assertUserError(await nodemesh(['agent', '--control-plane', controlPlane, '--token-file', missing, ...agentArgs(sb)], sb.env), 'NM_ERR_TOKEN_FILE', { message: new RegExp(`cannot read the control plane token file ${missing}`) });
  const empty = join(dir, 'empty-token');
  await writeFile(empty, '\n');
  assertUserError(await nodemesh(['agent', '--control-plane', controlPlane, '--token-file', empty, ...agentArgs(sb)], sb.env), 'NM_ERR_TOKEN_FILE', { message: /is empty/ });
  const noRoot = join(dir, 'no-root.pem');
  assertUserError(await nodemesh(['agent', '--control-plane', controlPlane, '--ca-root', noRoot, ...agentArgs(sb)], sb.env), 'NM_ERR_CA_ROOT', { message: new RegExp(`cannot read the mesh's root certificate ${noRoot}`) });
  assertUserError(await nodemesh(['agent', '--control-plane', controlPlane, '--ca-root', empty, ...agentArgs(sb)], sb.env), 'NM_ERR_CA_ROOT', { message: /holds no PEM certificate/ });
});

test('control-plane: missing or unreadable config, bad token files, bad flags', async (t) => {
  const sb = await createSandbox(t);
  const dir = await scratchDir(sb);
  const missing = join(dir, 'nonexistent');
  assertUserError(await nodemesh(['control-plane', '--config-dir', missing, ...controlPlaneArgs(sb)], sb.env), 'NM_ERR_CONFIG_DIR', { message: new RegExp(`the config folder ${missing} does not exist`) });
  const config = join(dir, 'config');
  await mkdir(join(config, 'broken.yml'), { recursive: true });
  assertUserError(await nodemesh(['control-plane', '--config-dir', config, ...controlPlaneArgs(sb)], sb.env), 'NM_ERR_CONFIG_DIR', { message: /broken\.yml is a folder/ });
  await rm(join(config, 'broken.yml'), { recursive: true });

  const tokens = join(dir, 'tokens');
  assertUserError(await nodemesh(['control-plane', '--config-dir', config, '--agent-tokens', tokens, ...controlPlaneArgs(sb)], sb.env), 'NM_ERR_AGENT_TOKENS', { message: /cannot read the agent token file/ });
  await writeFile(tokens, '# nodes\nnode-a short\n');
  assertUserError(await nodemesh(['control-plane', '--config-dir', config, '--agent-tokens', tokens, ...controlPlaneArgs(sb)], sb.env), 'NM_ERR_AGENT_TOKENS', { message: /line 2 of the agent token file/, fix: /fix: fix line 2/ });

  const cases: Array<[string[], RegExp]> = [
    [['--config-dir', config, ...controlPlaneArgs(sb, { '--listen': 'nope' })], /--listen "nope" is not HOST:PORT/],
    [controlPlaneArgs(sb), /give --config-dir DIR, or --source kubernetes/],
    [['--config-dir', config, '--source', 'kubernetes', ...controlPlaneArgs(sb)], /--config-dir and --source kubernetes exclude each other/],
    [['--config-dir', config, '--agent-service-account', 'nodemesh-system/nodemesh-agent', ...controlPlaneArgs(sb)], /--agent-service-account needs --source kubernetes/],
    [['--config-dir', config, ...controlPlaneArgs(sb, { '--listen': '0.0.0.0:15010' })], /--listen 0\.0\.0\.0:15010: plaintext gRPC is for loopback only/],
    [['--config-dir', config, ...controlPlaneArgs(sb, { '--cert-ttl': '1s' })], /--cert-ttl 1s must be from 10s to 2160h/],
    [['--config-dir', config, ...controlPlaneArgs(sb, { '--cert-ttl': 'forever' })], /--cert-ttl "forever" is not a duration/],
  ];
  for (const [args, message] of cases) assertUserError(await nodemesh(['control-plane', ...args], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message, exit: 2 });
  assertUsageError(await nodemesh(['control-plane', '--source', 'etcd'], sb.env), /^error: option '--source <source>' argument 'etcd' is invalid/);
});

test('control-plane: a port in use on --listen, --listen-tls or --http names the address', async (t) => {
  const sb = await createSandbox(t);
  const config = await scratchDir(sb);
  const port = await takenPort(t);
  for (const flag of ['--listen', '--listen-tls', '--http']) {
    const r = await nodemesh(['control-plane', '--config-dir', config, ...controlPlaneArgs(sb, { [flag]: `127.0.0.1:${port}` })], sb.env);
    assertUserError(r, 'NM_ERR_PORT_IN_USE', { message: new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port} \\(${flag}\\)`) });
    // gRPC prints its own bind failure unless the port is found taken before it binds.
    assert.doesNotMatch(r.stderr, /No address added/);
  }
});

test('control-plane --source kubernetes: no kubeconfig, a missing one, one that is not YAML', async (t) => {
  const sb = await createSandbox(t);
  const dir = await scratchDir(sb);
  // No KUBECONFIG, a HOME without .kube, not in a pod: nothing to load (client-node would fall back to localhost:8080).
  const env: NodeJS.ProcessEnv = { ...sb.env, HOME: dir };
  delete env['KUBECONFIG'];
  delete env['KUBERNETES_SERVICE_HOST'];
  assertUserError(await nodemesh(['control-plane', '--source', 'kubernetes', ...controlPlaneArgs(sb)], env), 'NM_ERR_KUBE_CONFIG', { message: /no Kubernetes client config/ });
  const missing = join(dir, 'no-kubeconfig');
  assertUserError(await nodemesh(['control-plane', '--source', 'kubernetes', '--kubeconfig', missing, ...controlPlaneArgs(sb)], env), 'NM_ERR_KUBE_CONFIG', { message: /cannot load the Kubernetes client config: ENOENT/ });
  assertUserError(await nodemesh(['control-plane', '--source', 'kubernetes', ...controlPlaneArgs(sb)], { ...env, KUBECONFIG: missing }), 'NM_ERR_KUBE_CONFIG', { message: /ENOENT/ });
  const notYaml = join(dir, 'kubeconfig');
  await writeFile(notYaml, YAML_THAT_IS_NOT);
  const r = await nodemesh(['control-plane', '--source', 'kubernetes', '--kubeconfig', notYaml, ...controlPlaneArgs(sb)], env);
  assertUserError(r, 'NM_ERR_KUBE_CONFIG', { message: /cannot load the Kubernetes client config/ });
  assert.equal(errorOutput(r.stderr).split('\n').filter((l) => l.startsWith('error ')).length, 1, 'one error line; the YAML excerpt is detail');
  await writeFile(notYaml, 'apiVersion: v1\nkind: Config\n');
  assertUserError(await nodemesh(['control-plane', '--source', 'kubernetes', '--kubeconfig', notYaml, ...controlPlaneArgs(sb)], env), 'NM_ERR_KUBE_CONFIG', { message: /no current cluster/ });
});

test('pod run: bad names, labels and commands, a pod that exists, a bad environment', async (t) => {
  const sb = await createSandbox(t);
  assertUserError(await nodemesh(['pod', 'run', '--name', 'Web_1', '--', 'true'], sb.env), 'NM_ERR_POD_INVALID', { message: /name: "Web_1" must be a DNS-1123 label/ });
  assertUserError(await nodemesh(['pod', 'run', '--name', 'web', '-n', 'Shop', '--', 'true'], sb.env), 'NM_ERR_POD_INVALID', { message: /namespace: "Shop"/ });
  assertUserError(await nodemesh(['pod', 'run', '--name', 'web', '-l', 'no-equals', '--', 'true'], sb.env), 'NM_ERR_POD_INVALID', { message: /label: "no-equals" is not key=value/ });
  assertUserError(await nodemesh(['pod', 'run', '--name', 'web', '--', '/nonexistent/cmd'], sb.env), 'NM_ERR_POD_COMMAND', { message: /command "\/nonexistent\/cmd" not found/ });
  assert.deepEqual(await sb.runtime.list(), [], 'a pod whose command is not found is removed again');
  await sb.idlePod('taken');
  assertUserError(await nodemesh(['pod', 'run', '--name', 'taken', '--', 'true'], sb.env), 'NM_ERR_POD_EXISTS', { message: /taken/ });
  assertUserError(await nodemesh(['pod', 'run', '--name', 'web', '--', 'true'], { ...sb.env, NODEMESH_POD_CIDR: '10.0.0.0/33' }), 'NM_ERR_INVALID_ARGUMENT', { message: /NODEMESH_POD_CIDR: "10\.0\.0\.0\/33" is not an IPv4 subnet/, exit: 2 });
  assertUserError(await nodemesh(['pod', 'run', '--name', 'web', '--', 'true'], sb.env, NOT_ROOT), 'NM_ERR_NOT_ROOT');
  assertUsageError(await nodemesh(['pod', 'run', '--name', 'web'], sb.env), /^error: missing required argument 'command'/);
  assertUsageError(await nodemesh(['pod', 'run', '--', 'true'], sb.env), /^error: required option '--name <name>' not specified/);
});

test('pod run, list, rm: a state folder that cannot be used, a corrupt record', async (t) => {
  const sb = await createSandbox(t);
  const dir = await scratchDir(sb);
  const file = join(dir, 'state-is-a-file');
  await writeFile(file, 'x');
  const env = { ...sb.env, NODEMESH_STATE_DIR: file };
  for (const args of [['pod', 'list'], ['pod', 'run', '--name', 'web', '--', 'true'], ['pod', 'rm', 'web']]) {
    assertUserError(await nodemesh(args, env), 'NM_ERR_STATE', { message: new RegExp(`the runtime state folder ${file}`) });
  }
  await mkdir(join(sb.config.stateDir, 'pods'), { recursive: true });
  const record = sb.runtime.store.recordPath('default', 'broken');
  await writeFile(record, '{ not json');
  assertUserError(await nodemesh(['pod', 'list'], sb.env), 'NM_ERR_STATE', { message: new RegExp(`pod record ${record} cannot be read`) });
  await rm(record);
});

test('pod list and pod rm: bad flags, a pod that does not exist, not root', async (t) => {
  const sb = await createSandbox(t);
  assertUserError(await nodemesh(['pod', 'list', '-o', 'yaml'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message: /-o yaml: expected "table" or "json"/, exit: 2 });
  assertUserError(await nodemesh(['pod', 'list'], sb.env, NOT_ROOT), 'NM_ERR_NOT_ROOT');
  assertUserError(await nodemesh(['pod', 'rm', 'nothere'], sb.env), 'NM_ERR_POD_NOT_FOUND', { message: /pod default\/nothere not found/ });
  assertUserError(await nodemesh(['pod', 'rm', 'nothere', '--grace', 'abc'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message: /--grace "abc"/, exit: 2 });
  assertUserError(await nodemesh(['pod', 'rm', 'nothere'], sb.env, NOT_ROOT), 'NM_ERR_NOT_ROOT');
  assertUsageError(await nodemesh(['pod', 'rm'], sb.env), /^error: missing required argument 'name'/);
});

test('status: nothing answers, bad flags', async (t) => {
  const sb = await createSandbox(t);
  // A free port: nothing listens there, so the connection is refused at once.
  const port = await freePort();
  assertUserError(await nodemesh(['status', '--admin', `127.0.0.1:${port}`], sb.env), 'NM_ERR_AGENT_UNREACHABLE', { message: new RegExp(`no agent answers at http://127\\.0\\.0\\.1:${port}/pods: ECONNREFUSED`) });
  assertUserError(await nodemesh(['status', '--control-plane', `127.0.0.1:${port}`], sb.env), 'NM_ERR_CONTROL_PLANE_UNREACHABLE', { message: /no control plane answers at .*: ECONNREFUSED/ });
  assertUserError(await nodemesh(['status', '-o', 'yaml'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { exit: 2 });
  assertUserError(await nodemesh(['status', '--admin', 'nope'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message: /--admin "nope" is not HOST:PORT/, exit: 2 });
});

test('up and check: bad flags, not root', async (t) => {
  const sb = await createSandbox(t);
  // Each fails before the demo would take its ports (15000-15021): nothing here binds one.
  assertUserError(await nodemesh(['up', '--rate', '0'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message: /--rate "0"/, exit: 2 });
  assertUserError(await nodemesh(['up', '--duration', 'forever'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message: /--duration "forever" is not a duration/, exit: 2 });
  assertUserError(await nodemesh(['up', '--duration', '1s'], sb.env, NOT_ROOT), 'NM_ERR_NOT_ROOT');
  assertUserError(await nodemesh(['check'], sb.env, NOT_ROOT), 'NM_ERR_NOT_ROOT');
  assertUserError(await nodemesh(['agent', '--config-dir', '/nonexistent'], sb.env, NOT_ROOT), 'NM_ERR_NOT_ROOT');
  assertUsageError(await nodemesh(['no-such-command'], sb.env), /^error: unknown command 'no-such-command'/);
});

test('debug tools: a port in use, bad ports and targets', async (t) => {
  const sb = await createSandbox(t);
  const port = await takenPort(t);
  assertUserError(await nodemesh(['debug', 'echo-server', '--port', String(port)], sb.env), 'NM_ERR_PORT_IN_USE', { message: new RegExp(`port ${port}`) });
  assertUserError(await nodemesh(['debug', 'echo-server', '--port', '70000'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { exit: 2 });
  assertUserError(await nodemesh(['debug', 'dial', '127.0.0.1', 'x'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { exit: 2 });
  assertUserError(await nodemesh(['debug', 'load', 'nope'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { message: /"nope" is not HOST:PORT/, exit: 2 });
  assertUserError(await nodemesh(['debug', 'load', `127.0.0.1:${port}`, '--rate', '0'], sb.env), 'NM_ERR_INVALID_ARGUMENT', { exit: 2 });
});

test('cleanup (when this build has it): not root', async (t) => {
  const sb = await createSandbox(t);
  const help = await nodemesh(['--help'], sb.env);
  if (!/^\s+cleanup\b/m.test(help.stdout)) {
    t.skip('no `nodemesh cleanup` in this build');
    return;
  }
  assertUserError(await nodemesh(['cleanup'], sb.env, NOT_ROOT), 'NM_ERR_NOT_ROOT');
  assertUsageError(await nodemesh(['cleanup', '--no-such-flag'], sb.env), /^error: unknown option '--no-such-flag'/);
});

test('an error that is not a NodemeshError (a bug) prints one line and how to report it, no stack', () => {
  const text = formatError(new TypeError("Cannot read properties of undefined (reading 'x')\nmore"));
  assert.match(text, /^error NM_ERR_INTERNAL: Cannot read properties of undefined \(reading 'x'\)\n {2}fix: this is a nodemesh bug: report it/);
  assert.equal(text.trimEnd().split('\n').length, 2);
  assert.doesNotMatch(text, /^\s+at\s/m);
});
