/** The `nodemesh` command (design.md section 9). */
import { Command, Option } from 'commander';

import { join } from 'node:path';

import { NodeAgent, type AgentOptions, type EnrolledPodStatus } from '../agent/agent.js';
import { probeBpf, trimHeap } from '../datapath/native.js';
import { PIN_BASE, assertPinRoot, defaultPinRoot } from '../datapath/node-datapath.js';
import { parseHostPort } from '../shared/http.js';
import { LocalRuntimePodSource } from '../agent/pods/source.js';
import { nodeCgroup, parseNodeName, runtimeConfigFromEnv } from '../runtime/config.js';
import { DURATION_BOUNDS, durationOutOfBounds } from '../config/traffic-policy.js';
import { DEFAULT_ENROLL_TIMEOUT_MS, MAX_ENROLL_TIMEOUT_MS, agentRunDir } from '../runtime/enrollment.js';
import { NodemeshError } from '../shared/errors.js';
import { logger } from '../shared/log.js';
import { parseNamespacedName, UUID } from '../shared/names.js';
import { CONTROL_PLANE_STATE_DIR, PACKAGE_ROOT, packageVersion } from '../shared/paths.js';
import { isLoopback } from '../shared/address.js';
import { NM_PROXY_MARK } from '../datapath/abi.js';
import { checkKernel, checkRoot } from './preflight.js';
import { findCgroup2Mount } from '../runtime/cgroup.js';
import type { NodeSyncStatus } from '../control-plane/server.js';
import type { CertificateStatus } from '../identity/certificates.js';
import { formatError, parseOutputFormat, table } from './output.js';

const out = (text: string): void => void process.stdout.write(text);
const progress = (step: string): void => void process.stderr.write(`» ${step}\n`);

// Commands load what only they use when they run: the agent is a long-running process on every
// node, and each module it never needs (the pod runtime, crypto, the debug tools) is resident
// memory for nothing.
const podRuntime = async (): Promise<InstanceType<typeof import('../runtime/pods.js').LocalPodRuntime>> =>
  new (await import('../runtime/pods.js')).LocalPodRuntime(runtimeConfigFromEnv());

/** What every pod command needs: root, a supported kernel, cgroup v2. */
async function podPreflight(): Promise<void> {
  checkRoot();
  checkKernel();
  await findCgroup2Mount();
}

/** An invalid-argument error naming the option, for parsers that take an error factory. */
const invalid =
  (field: string) =>
  (message: string): NodemeshError =>
    new NodemeshError('NM_ERR_INVALID_ARGUMENT', message, { context: { field }, hint: `give --${field} as HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080` });

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

/** A whole number, 0 or more, of `unit` (milliseconds, bytes). */
function parseWholeNumber(value: string, field: string, unit: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--${field} "${value}" is not a whole number of ${unit}`, { context: { field }, hint: `give --${field} in ${unit}, e.g. --${field} 5000` });
  }
  return n;
}

function parseMilliseconds(value: string, field: string): number {
  return parseWholeNumber(value, field, 'milliseconds');
}

/** NAMESPACE/NAME of a Kubernetes object given on the command line. */
function namespacedNameOption(value: string, field: string): { namespace: string; name: string } {
  const ref = parseNamespacedName(value);
  if (!ref) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--${field} "${value}" is not NAMESPACE/NAME`, { context: { field }, hint: `give --${field} as NAMESPACE/NAME, e.g. nodemesh-system/nodemesh-agent` });
  return ref;
}

/** --cni-timeout: whole seconds from 1 to 300 (what nodemesh-cni accepts). */
function cniTimeoutSeconds(value: string): number {
  const ms = parseDurationOption(value, 'cni-timeout');
  if (ms < 1000 || ms > 300_000) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--cni-timeout ${value} must be from 1s to 300s`, { context: { field: 'cni-timeout' }, hint: 'give a duration such as 20s' });
  return Math.ceil(ms / 1000);
}

/** Milliseconds within the bounds the same setting has in a TrafficPolicy. */
function boundedMilliseconds(value: string, field: string, bound: { readonly min: number; readonly max: number }): number {
  const ms = parseMilliseconds(value, field);
  const why = durationOutOfBounds(ms, bound);
  if (why) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--${field} ${value}: ${why}`, { context: { field }, hint: `give --${field} from ${bound.min} to ${bound.max}` });
  return ms;
}

function parseCount(value: string, field: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--${field} "${value}" is not a whole number above 0`, { context: { field }, hint: `give --${field} as a count, e.g. --${field} 1000` });
  }
  return n;
}

function parseMark(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--mark-value "${value}" is not a 32-bit mark`, { context: { field: 'mark-value' }, hint: 'give a number such as 0x539' });
  return n;
}

/** "20000-24999": the first and the last port. */
function portRange(value: string): { from: number; to: number } {
  const m = /^(\d+)-(\d+)$/.exec(value);
  const from = Number(m?.[1]);
  const to = Number(m?.[2]);
  if (!m || from < 1 || to > 65535 || from > to) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `"${value}" is not a port range FROM-TO`, { context: { field: 'port-range' }, hint: 'give two ports, e.g. 20000-20999' });
  return { from, to };
}

/** "30s", "2m", "1h", "500ms": how long, in milliseconds. */
function parseDurationOption(value: string, field: string): number {
  const m = /^(\d+)(ms|s|m|h)$/.exec(value);
  if (!m) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--${field} "${value}" is not a duration like 30s, 2m or 1h`, { context: { field }, hint: `give --${field} as a number and a unit (ms, s, m, h), e.g. --${field} 30s` });
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 'ms' | 's' | 'm' | 'h'];
}

function parseRate(value: string, max: number): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0 || n > max) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--rate "${value}" must be more than 0 and at most ${max} requests per second`, { context: { field: 'rate' }, hint: 'give --rate a number in that range, e.g. --rate 10' });
  }
  return n;
}

/** Why a fetch failed: undici says only "fetch failed", its cause has the errno (ECONNREFUSED...). */
function fetchFailure(e: unknown): string {
  const cause = (e as { cause?: { code?: unknown; message?: unknown } }).cause;
  if (typeof cause?.code === 'string') return cause.code;
  return typeof cause?.message === 'string' ? cause.message : (e as Error).message;
}

function parsePort(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 65535) {
    throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `"${value}" is not a TCP port (1-65535)`, { context: { field: 'port' }, hint: 'give a port number from 1 to 65535' });
  }
  return n;
}

/**
 * After a server command stopped everything it owns: exits, naming what is still open (a leak to
 * fix). Without it, a handle left half-closed at the end of a busy run (seen after the HBONE
 * benchmark) keeps node's own teardown spinning, and the process never exits on SIGTERM.
 */
async function exitWhenStopped(what: string): Promise<void> {
  // Handles being closed are still listed until their close callbacks ran: give them a moment.
  const open = (): string[] => process.getActiveResourcesInfo().filter((r) => r !== 'TTYWrap' && r !== 'PipeWrap' && r !== 'Timeout');
  for (let i = 0; i < 10 && open().length > 0; i++) await new Promise((resolve) => setTimeout(resolve, 20));
  const left = open();
  if (left.length > 0) (await import('../shared/log.js')).logger('cli').warn({ left }, `${what} stopped with resources still open; exiting`);
  process.exit(process.exitCode ?? 0);
}

/**
 * A long-running command serves until SIGINT or SIGTERM; meanwhile its V8 heap is given back when
 * the process is idle (the memory reducer is off: bin/nodemesh.js, src/shared/heap-trim.ts).
 */
async function serveUntilSignal(): Promise<void> {
  const { HeapTrim } = await import('../shared/heap-trim.js');
  const heap = new HeapTrim({ trim: trimHeap }).start();
  await new Promise<void>((resolve) => {
    for (const s of ['SIGINT', 'SIGTERM'] as const) process.once(s, () => resolve());
  });
  heap.stop();
}

const program = new Command('nodemesh')
  .description('a service mesh without sidecars: one eBPF-captured proxy per node')
  .version(packageVersion())
  .showHelpAfterError();

const pod = program.command('pod').description('local pods: a netns, a veth on a bridge, a cgroup and a process');

pod
  .command('run')
  .description('start CMD as a pod; stays in the foreground and removes the pod when CMD exits')
  .requiredOption('--name <name>', 'pod name (DNS-1123 label)')
  .option('-n, --namespace <namespace>', 'pod namespace', 'default')
  .option('--service-account <sa>', 'service account (workload identity)', 'default')
  .option('--node <name>', "the node the pod runs on; that node's agent captures it (default: this machine's host name)")
  .option('-l, --label <key=value>', 'pod label, repeatable', collect, [])
  .option('-d, --detach', 'return once the pod is up; remove it later with `pod rm`', false)
  .option('--enroll-timeout <time>', 'when an agent runs on the node: how long it may take to capture the pod before CMD starts (e.g. 30s)', `${DEFAULT_ENROLL_TIMEOUT_MS / 1000}s`)
  .argument('<command...>', 'command and arguments, after --')
  .action(async (command: string[], opts: { name: string; namespace: string; serviceAccount: string; node?: string; label: string[]; detach: boolean; enrollTimeout: string }) => {
    const enrollTimeoutMs = parseDurationOption(opts.enrollTimeout, 'enroll-timeout');
    if (enrollTimeoutMs < 1 || enrollTimeoutMs > MAX_ENROLL_TIMEOUT_MS) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--enroll-timeout "${opts.enrollTimeout}" must be more than 0 and at most ${MAX_ENROLL_TIMEOUT_MS / 1000}s`, { context: { field: 'enroll-timeout' }, hint: 'give a duration such as 30s or 2m' });
    }
    await podPreflight();
    const { validatePodSpec } = await import('../runtime/pod-spec.js');
    const spec = validatePodSpec({ name: opts.name, namespace: opts.namespace, serviceAccount: opts.serviceAccount, labels: opts.label, command, ...(opts.node === undefined ? {} : { node: parseNodeName(opts.node) }) });
    const runtime = await podRuntime();
    const record = await runtime.create(spec, { detached: opts.detach });
    // With an agent on the node, CMD starts only once the agent has captured the pod.
    const { record: running, child } = await runtime.start(record, { enrollTimeoutMs, progress });
    if (opts.detach) {
      out(table(['NAMESPACE', 'NAME', 'NODE', 'IP', 'IPV6', 'PID'], [[running.namespace, running.name, running.node, running.ip4, running.ip6, String(running.pid)]]));
      return;
    }
    const forward = (signal: NodeJS.Signals): void => void child.kill(signal);
    for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(s, forward);
    const exitStatus = (c: number | null, sig: NodeJS.Signals | null): number => c ?? (sig ? 128 + signalNumber(sig) : 1);
    // A short command may have ended already while the pod was being started.
    const code =
      child.exitCode !== null || child.signalCode !== null
        ? exitStatus(child.exitCode, child.signalCode)
        : await new Promise<number>((resolve) => child.once('exit', (c, sig) => resolve(exitStatus(c, sig))));
    const still = await runtime.store.get(running.namespace, running.name);
    if (still && still.uid === running.uid) await runtime.remove(running, 2000);
    process.exitCode = code;
  });

pod
  .command('list')
  .description('list local pods')
  .addOption(new Option('-o, --output <format>', 'table or json').default('table'))
  .action(async (opts: { output: string }) => {
    const format = parseOutputFormat(opts.output);
    await podPreflight();
    const pods = await (await podRuntime()).list();
    if (format === 'json') {
      out(JSON.stringify(pods, null, 2) + '\n');
      return;
    }
    out(
      table(
        ['NAMESPACE', 'NAME', 'NODE', 'STATE', 'IP', 'IPV6', 'PID', 'SERVICE ACCOUNT', 'LABELS'],
        pods.map((p) => [p.namespace, p.name, p.node, p.state, p.ip4, p.ip6, String(p.pid ?? '-'), p.serviceAccount, Object.entries(p.labels).map(([k, v]) => `${k}=${v}`).join(',') || '-']),
      ),
    );
  });

pod
  .command('rm')
  .description("stop a pod's processes and remove everything it made")
  .argument('<name...>', 'pod names')
  .option('-n, --namespace <namespace>', 'pod namespace', 'default')
  .option('--grace <ms>', 'time between SIGTERM and SIGKILL', '5000')
  .action(async (names: string[], opts: { namespace: string; grace: string }) => {
    const grace = parseMilliseconds(opts.grace, 'grace');
    await podPreflight();
    const runtime = await podRuntime();
    for (const name of names) {
      const record = await runtime.get(opts.namespace, name);
      progress(`removing pod ${opts.namespace}/${name}`);
      await runtime.remove(record, grace);
    }
  });

program
  .command('up')
  .description('run the demo: the control plane on examples/mesh, a node agent, workload pods and traffic; a summary on Ctrl-C or after --duration')
  .option('--duration <time>', 'stop after this long (e.g. 30s, 2m); default: until Ctrl-C')
  .option('--rate <n>', 'requests per second to each Service address', '10')
  .action(async (opts: { duration?: string; rate: string }) => {
    const rate = parseRate(opts.rate, 200);
    const { up } = await import('./up.js');
    process.exitCode = await up({ durationMs: opts.duration === undefined ? undefined : parseDurationOption(opts.duration, 'duration'), rate }, progress, out);
  });

program
  .command('agent')
  .description('run the node agent: enroll the pods of this node and serve their traffic')
  .option('--control-plane <host:port>', "the control plane's gRPC port: 15012 (TLS, with --ca-root) or a loopback plaintext --listen (15010)")
  .option('--ca-root <file>', "the mesh's root certificate (the control plane's root-cert.pem): the control plane is dialled over TLS and checked against it")
  .option('--token-file <file>', "this node's token for the control plane (its --agent-tokens file binds it to the node)")
  .option('--config-dir <dir>', 'standalone mode, no control plane: Kubernetes YAML read from this folder and watched')
  .option('--node <name>', "the node this agent serves: only its pods are captured (default: this machine's host name)")
  .addOption(new Option('--source <source>', "where the node's pods come from: local (this machine's runtime, `nodemesh pod run`) or kubernetes (Pods bound to --node, found under the kubelet's cgroups)").choices(['local', 'kubernetes']).default('local'))
  .option('--kubeconfig <file>', 'with --source kubernetes: client config (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account)')
  .option('--cgroup-root <path>', "with --source kubernetes: the host's cgroup v2 mount as the agent sees it (kubepods.slice or kubepods under it); default: this machine's cgroup2 mount")
  .option('--proc <path>', "with --source kubernetes: the host's /proc, where pods' network namespaces are found", '/proc')
  .option('--daemonset <ns/name>', "with --source kubernetes: the agent's DaemonSet; stopping when it is deleted takes nodemesh off the node (as `nodemesh cleanup`), any other stop keeps pods captured for the next agent")
  .option('--cni-bin-dir <dir>', "with --source kubernetes: install nodemesh-cni into the node's CNI bin folder (and chain it in --cni-conf-dir) while the agent runs")
  .option('--cni-conf-dir <dir>', "with --cni-bin-dir: the node's CNI conf folder, whose first network config gets nodemesh-cni as its last plugin", '/etc/cni/net.d')
  .option('--cni-exclude-namespaces <list>', 'with --cni-bin-dir: namespaces whose pods start without waiting for the agent, comma-separated', 'kube-system')
  .option('--cni-timeout <time>', 'with --cni-bin-dir: how long a pod start waits for the agent before the runtime gets an error and retries', '20s')
  .option('--bpf-root <path>', `bpffs folder for pinned maps and links (default: ${PIN_BASE}/NODE)`)
  .option('--run-dir <dir>', "the agent's run folder (its enrollment socket); default: nodes/NODE in the runtime's state folder ($NODEMESH_STATE_DIR, /run/nodemesh)")
  .option('--metrics <host:port>', 'Prometheus /metrics', '0.0.0.0:15020')
  .option('--ready <host:port>', '/healthz/ready and /healthz/live', '0.0.0.0:15021')
  .option('--admin <host:port>', 'admin API (pods, config)', '127.0.0.1:15000')
  .addOption(new Option('--passthrough <mode>', 'destinations that are not mesh Services').choices(['allow', 'deny']).default('allow'))
  .option('--connect-timeout <ms>', 'upstream connect timeout', '5000')
  .option('--idle-timeout <ms>', 'close connections idle this long', '3600000')
  .option('--max-connections <n>', 'open proxied connections node-wide (default: what the open file limit allows, about a sixth of it)')
  .option('--max-connections-per-pod <n>', "open proxied connections of one pod (default: half the node's)")
  .option('--take-over', 'if an agent already serves this node, take the node over from it with no gap (a DaemonSet rolling with maxSurge) instead of refusing to start')
  .option('--drain-timeout <duration>', 'after handing the node over, how long this agent keeps relaying its connections once told to stop (ms)', '20000')
  .addOption(new Option('--relay <mode>', 'how bytes are copied: kernel (splice in the addon) or js (node streams)').choices(['kernel', 'js']).default('kernel'))
  .addOption(new Option('--hbone <engine>', 'what carries HBONE tunnels: native (TLS and HTTP/2 in the addon) or node (node:tls and node:http2)').choices(['native', 'node']).default('native'))
  .addOption(
    // Applied by bin/nodemesh.js before any module loads; here for --help and validation.
    new Option(
      '--jit <tiers>',
      "V8's compilers for the agent's JS: baseline (Sparkplug only; ~5 MiB less RSS, for L4-only nodes) or full (adds TurboFan; ~15% more HBONE requests/s, a third of the CPU per L7 request); auto (the default): full",
    )
      .choices(['auto', 'baseline', 'full'])
      .default('auto'),
  )
  .action(async (opts: { controlPlane?: string; caRoot?: string; tokenFile?: string; configDir?: string; node?: string; source: 'local' | 'kubernetes'; kubeconfig?: string; cgroupRoot?: string; proc: string; daemonset?: string; cniBinDir?: string; cniConfDir: string; cniExcludeNamespaces: string; cniTimeout: string; bpfRoot?: string; runDir?: string; metrics: string; ready: string; admin: string; passthrough: 'allow' | 'deny'; connectTimeout: string; idleTimeout: string; maxConnections?: string; maxConnectionsPerPod?: string; relay: 'kernel' | 'js'; hbone: 'native' | 'node'; jit: 'auto' | 'baseline' | 'full'; takeOver?: boolean; drainTimeout: string }) => {
    const runtimeConfig = runtimeConfigFromEnv();
    const node = parseNodeName(opts.node ?? runtimeConfig.node);
    // The agent's own pod (the DaemonSet sets it from metadata.uid): readiness for its exec probe.
    const instance = process.env['NODEMESH_POD_UID'] || undefined;
    if (instance !== undefined && !UUID.test(instance)) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `NODEMESH_POD_UID "${instance}" is not a pod UID`, { context: { field: 'NODEMESH_POD_UID' }, hint: "set it from the pod's metadata.uid (the DaemonSet does), or unset it" });
    }
    const pinRoot = opts.bpfRoot ?? defaultPinRoot(node);
    assertPinRoot(pinRoot);
    if ((opts.controlPlane === undefined) === (opts.configDir === undefined)) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', 'give either --control-plane HOST:PORT or --config-dir DIR (standalone), not both or neither', {
        context: { field: 'control-plane' },
        hint: 'nodemesh agent --config-dir examples/mesh (standalone), or nodemesh agent --control-plane 127.0.0.1:15010',
      });
    }
    if (opts.caRoot !== undefined && opts.controlPlane === undefined) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', '--ca-root is for --control-plane (standalone agents have no CA)', { context: { field: 'ca-root' }, hint: 'drop --ca-root, or give --control-plane HOST:15012' });
    }
    const controlPlane = opts.controlPlane === undefined ? undefined : parseHostPort(opts.controlPlane, 'control-plane', invalid('control-plane'));
    if (controlPlane && opts.caRoot === undefined && !isLoopback(controlPlane.host) && controlPlane.host !== 'localhost') {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--control-plane ${opts.controlPlane} without --ca-root: plaintext is for a control plane on loopback only`, {
        context: { field: 'ca-root' },
        hint: "give --ca-root with the control plane's root-cert.pem (its TLS port is 15012)",
      });
    }
    if (opts.source === 'local') {
      for (const [field, given] of [['kubeconfig', opts.kubeconfig], ['cgroup-root', opts.cgroupRoot], ['cni-bin-dir', opts.cniBinDir], ['daemonset', opts.daemonset]] as const) {
        if (given !== undefined) throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--${field} is for --source kubernetes`, { context: { field }, hint: `add --source kubernetes, or drop --${field}` });
      }
    }
    const caRoots = opts.caRoot === undefined ? undefined : await (await import('../agent/control-plane-client.js')).readCaRoot(opts.caRoot);
    // Kubernetes: the kubelet's pods, from the API and the node's kubepods cgroups; the local
    // runtime's records otherwise.
    const daemonset = opts.daemonset === undefined ? undefined : namespacedNameOption(opts.daemonset, 'daemonset');
    const kubeApi = opts.source === 'kubernetes' ? (await import('../kube/api.js')).KubeApi.load(opts.kubeconfig === undefined ? {} : { kubeconfig: opts.kubeconfig }) : undefined;
    const kubePods = kubeApi ? await import('../agent/pods/kubernetes.js') : undefined;
    const kube = kubeApi && kubePods ? new kubePods.KubernetesPodSource({ node, api: kubeApi, cgroupRoot: opts.cgroupRoot ?? (await findCgroup2Mount()), proc: opts.proc }) : undefined;
    const options: AgentOptions = {
      node,
      podsCgroup: kube ? kube.kubepods.path : nodeCgroup(await findCgroup2Mount(), runtimeConfig, node),
      runDir: opts.runDir ?? agentRunDir(runtimeConfig.stateDir, node),
      // Local pods: netns under /run/netns, addresses in the runtime's pod subnets. Kubelet's
      // pods: their runtime's netns paths (from the CNI call) and the cluster's addresses.
      podEdge: kube ? {} : { netnsDir: '/run/netns', cidr4: runtimeConfig.podCidr4, cidr6: runtimeConfig.podCidr6 },
      ...(opts.cniBinDir === undefined
        ? {}
        : {
            cni: {
              binDir: opts.cniBinDir,
              confDir: opts.cniConfDir,
              pluginBinary: join(PACKAGE_ROOT, 'build', 'cni', 'nodemesh-cni'),
              timeoutSeconds: cniTimeoutSeconds(opts.cniTimeout),
              excludeNamespaces: opts.cniExcludeNamespaces.split(',').map((n) => n.trim()).filter((n) => n !== ''),
            },
          }),
      config:
        opts.controlPlane !== undefined
          ? { kind: 'control-plane', address: controlPlane ?? parseHostPort(opts.controlPlane, 'control-plane', invalid('control-plane')), ...(opts.tokenFile === undefined ? {} : { tokenFile: opts.tokenFile }), ...(caRoots === undefined ? {} : { caRoots }) }
          : { kind: 'dir', dir: opts.configDir ?? '' },
      pinRoot,
      metrics: parseHostPort(opts.metrics, 'metrics', invalid('metrics')),
      ready: parseHostPort(opts.ready, 'ready', invalid('ready')),
      admin: parseHostPort(opts.admin, 'admin', invalid('admin')),
      passthrough: opts.passthrough,
      connectTimeoutMs: boundedMilliseconds(opts.connectTimeout, 'connect-timeout', DURATION_BOUNDS.connectTimeoutMs),
      idleTimeoutMs: boundedMilliseconds(opts.idleTimeout, 'idle-timeout', DURATION_BOUNDS.idleTimeoutMs),
      probeTimeoutMs: 2000,
      kernelRelay: opts.relay === 'kernel',
      hboneEngine: opts.hbone,
      ...(opts.maxConnections === undefined ? {} : { maxConnections: parseCount(opts.maxConnections, 'max-connections') }),
      ...(opts.maxConnectionsPerPod === undefined ? {} : { maxConnectionsPerPod: parseCount(opts.maxConnectionsPerPod, 'max-connections-per-pod') }),
      takeOver: opts.takeOver === true,
      ...(instance === undefined ? {} : { instance }),
      drainTimeoutMs: boundedMilliseconds(opts.drainTimeout, 'drain-timeout', { min: 0, max: 3_600_000 }),
    };
    const { preflight } = await import('./preflight.js');
    await preflight(probeBpf);
    const agent = await NodeAgent.start(options, kube ?? new LocalRuntimePodSource(runtimeConfig.stateDir, node, { ...options.podEdge, podsCgroup: options.podsCgroup }));
    await serveUntilSignal();
    // Handed over: the node is the new agent's, whatever happens to the DaemonSet.
    const uninstall = kubeApi && kubePods && daemonset && !agent.handedOver ? await kubePods.daemonSetGone(kubeApi, daemonset) : undefined;
    if (uninstall?.gone) {
      logger('agent').warn({ daemonset: opts.daemonset }, `${uninstall.why}: taking nodemesh off this node`);
      await agent.uninstall();
    } else await agent.stop();
    await exitWhenStopped('agent');
  });

program
  .command('status')
  .description('pods enrolled by the agent of this node, or with --control-plane every node and whether its config is in sync')
  .option('--admin <host:port>', "the agent's admin API", '127.0.0.1:15000')
  .option('--control-plane <host:port>', "the control plane's HTTP port (15014): one row per node")
  .addOption(new Option('-o, --output <format>', 'table or json').default('table'))
  .action(async (opts: { admin: string; controlPlane?: string; output: string }) => {
    const format = parseOutputFormat(opts.output);
    if (opts.controlPlane !== undefined) {
      const cp = parseHostPort(opts.controlPlane, 'control-plane', invalid('control-plane'));
      const url = `http://${cp.host.includes(':') ? `[${cp.host}]` : cp.host}:${cp.port}/debug/nodes`;
      let nodes: { version: number; nodes: NodeSyncStatus[] };
      try {
        nodes = (await (await fetch(url)).json()) as typeof nodes;
      } catch (e) {
        throw new NodemeshError('NM_ERR_CONTROL_PLANE_UNREACHABLE', `no control plane answers at ${url}: ${fetchFailure(e)}`, {
          context: { path: url },
          hint: 'start it with `nodemesh control-plane --config-dir DIR`, or give --control-plane the HOST:PORT of its --http',
        });
      }
      if (format === 'json') {
        out(JSON.stringify(nodes, null, 2) + '\n');
        return;
      }
      out(`config version ${nodes.version}\n`);
      out(
        table(
          ['NODE', 'CONNECTED', 'PODS', 'SENT', 'APPLIED', 'IN SYNC', 'LAST REJECTION'],
          nodes.nodes.map((n) => [n.node, n.connected ? 'yes' : 'no', String(n.pods), String(n.sentVersion), String(n.ackedVersion), n.inSync ? 'yes' : 'no', n.lastNack[0] ? `${n.lastNack[0].object}: ${n.lastNack[0].message}` : '-']),
        ),
      );
      const certificates = nodes.nodes.flatMap((n) => (n.certificates ?? []).map((c) => [n.node, c.identity, c.serial, c.notAfter]));
      if (certificates.length > 0) out('\ncertificates signed (the last one per node and identity)\n' + table(['NODE', 'IDENTITY', 'SERIAL', 'EXPIRES'], certificates));
      return;
    }
    const at = parseHostPort(opts.admin, 'admin', invalid('admin'));
    const url = `http://${at.host.includes(':') ? `[${at.host}]` : at.host}:${at.port}/pods`;
    let body: { node: string; configVersion: number; pods: EnrolledPodStatus[]; certificates?: CertificateStatus[] };
    try {
      body = (await (await fetch(url)).json()) as typeof body;
    } catch (e) {
      throw new NodemeshError('NM_ERR_AGENT_UNREACHABLE', `no agent answers at ${url}: ${fetchFailure(e)}`, {
        context: { path: url },
        hint: 'start it with `nodemesh agent --config-dir DIR`, or give --admin HOST:PORT',
      });
    }
    if (format === 'json') {
      out(JSON.stringify(body, null, 2) + '\n');
      return;
    }
    out(`node ${body.node}, config version ${body.configVersion}\n`);
    out(table(['NAMESPACE', 'POD', 'IP', 'IPV6', 'VERIFIED', 'CONNECTIONS'], body.pods.map((p) => [p.namespace, p.name, p.ip4, p.ip6, p.verified ? 'yes' : 'no', String(p.connections)])));
    const certificates = body.certificates ?? [];
    if (certificates.length > 0) {
      out(`\nidentities of node ${body.node}\n`);
      out(table(['IDENTITY', 'STATE', 'SERIAL', 'EXPIRES', 'RENEWS', 'LAST ERROR'], certificates.map((c) => [c.identity, c.state, c.serial ?? '-', c.notAfter ?? '-', c.renewAt ?? '-', c.lastError ?? '-'])));
    }
  });

program
  .command('control-plane')
  .description('serve the mesh config to every node agent (gRPC Discovery stream) from a folder of Kubernetes YAML or the Kubernetes API')
  .option('--config-dir <dir>', 'Kubernetes YAML read from this folder and watched (the default source)')
  .addOption(new Option('--source <source>', 'where config comes from: dir (--config-dir) or kubernetes (list+watch of the API)').choices(['dir', 'kubernetes']).default('dir'))
  .option('--kubeconfig <file>', 'with --source kubernetes: client config (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account)')
  .option('--listen-tls <host:port>', 'gRPC over TLS (Discovery, Certificates) for agents, with a serving certificate from the mesh CA', '0.0.0.0:15012')
  .option('--listen <host:port>', 'also gRPC in plaintext, on a loopback address only (development; e.g. 127.0.0.1:15010)')
  .option('--ca-dir <dir>', 'root-cert.pem and root-key.pem (0600): used if there (an operator\'s root or intermediate), created if not', CONTROL_PLANE_STATE_DIR)
  .option('--ca-secret <ns/name>', 'with --source kubernetes: the Secret that keeps the CA (created from --ca-dir on first start, written to it on every start and followed after), and beside it the ConfigMap nodemesh-ca-root of trusted roots for agents')
  .option('--cert-ttl <time>', 'lifetime of workload certificates (agents renew at half life), e.g. 24h, 1h, 30s', '24h')
  .option('--agent-tokens <file>', 'lines of "<node> <token>": agents must present one and may speak only for its node')
  .option('--agent-service-account <ns/name>', "with --source kubernetes: agents present their pod's projected token (audience nodemesh), checked with TokenReview")
  .option('--pod-cidrs <list>', 'pod addresses nodes may claim in their reports: CIDR blocks of any node and NODE=CIDR blocks of one, comma-separated (default: any address)')
  .option('--http <host:port>', '/metrics, /healthz/ready, /healthz/live, /debug/snapshot?node=, /debug/nodes', '127.0.0.1:15014')
  .action(async (opts: { configDir?: string; source: 'dir' | 'kubernetes'; kubeconfig?: string; listen?: string; listenTls: string; caDir: string; caSecret?: string; certTtl: string; http: string; agentTokens?: string; agentServiceAccount?: string; podCidrs?: string }) => {
    if (opts.source === 'dir' && opts.configDir === undefined) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', 'give --config-dir DIR, or --source kubernetes', { context: { field: 'config-dir' }, hint: 'nodemesh control-plane --config-dir examples/mesh' });
    }
    if (opts.source === 'kubernetes' && opts.configDir !== undefined) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', '--config-dir and --source kubernetes exclude each other', { context: { field: 'source' }, hint: 'give one of them' });
    }
    const source = opts.source === 'dir' ? { kind: 'dir' as const, dir: opts.configDir ?? '' } : { kind: 'kubernetes' as const, ...(opts.kubeconfig === undefined ? {} : { kubeconfig: opts.kubeconfig }) };
    const { ControlPlane } = await import('../control-plane/server.js');
    const { PodRanges } = await import('../control-plane/pod-ranges.js');
    const podRanges = opts.podCidrs === undefined ? undefined : PodRanges.parse(opts.podCidrs);
    const listen = opts.listen === undefined ? undefined : parseHostPort(opts.listen, 'listen', invalid('listen'));
    if (listen && !isLoopback(listen.host) && listen.host !== 'localhost') {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--listen ${opts.listen}: plaintext gRPC is for loopback only (certificates and config would cross the network in clear)`, {
        context: { field: 'listen' },
        hint: 'give --listen 127.0.0.1:15010, and let agents on other hosts use --listen-tls',
      });
    }
    const certTtlMs = parseDurationOption(opts.certTtl, 'cert-ttl');
    const { CERT_TTL_BOUNDS } = await import('../control-plane/ca/ca.js');
    if (certTtlMs < CERT_TTL_BOUNDS.min || certTtlMs > CERT_TTL_BOUNDS.max) {
      throw new NodemeshError('NM_ERR_INVALID_ARGUMENT', `--cert-ttl ${opts.certTtl} must be from ${CERT_TTL_BOUNDS.min / 1000}s to ${CERT_TTL_BOUNDS.max / 3_600_000}h`, { context: { field: 'cert-ttl' }, hint: 'give a duration such as 24h' });
    }
    const cp = await ControlPlane.start({ source, ...(listen ? { listen } : {}), listenTls: parseHostPort(opts.listenTls, 'listen-tls', invalid('listen-tls')), ca: { dir: opts.caDir, certTtlMs, ...(opts.caSecret === undefined ? {} : { secret: opts.caSecret }) }, http: parseHostPort(opts.http, 'http', invalid('http')), ...(opts.agentTokens === undefined ? {} : { agentTokens: opts.agentTokens }), ...(opts.agentServiceAccount === undefined ? {} : { agentServiceAccount: opts.agentServiceAccount }), ...(podRanges ? { podRanges } : {}) });
    await serveUntilSignal();
    await cp.stop();
    await exitWhenStopped('control-plane');
  });

program
  .command('cleanup')
  .description("take nodemesh off this node: every link and gate it attached, every pin, the in-pod routing and sysctls of live pods, the agent's run folder")
  .option('--node <name>', "the node to take nodemesh off (default: this machine's host name)")
  .option('--bpf-root <path>', `the agent's --bpf-root (default: ${PIN_BASE}/NODE)`)
  .option('--run-dir <dir>', "the agent's --run-dir; default: nodes/NODE in the runtime's state folder ($NODEMESH_STATE_DIR, /run/nodemesh)")
  .option('--force', 'go on while an agent runs: it keeps running with its sockets and listeners but loses capture (and may capture pods that start later); stop it too', false)
  .addOption(new Option('-o, --output <format>', 'table or json').default('table'))
  .addHelpText('after', "\nIt refuses while an agent answers on the run folder's enrollment socket (unless\n--force), prints what it removed, and is idempotent: a second run says \"nothing\nto remove\". Pods and the runtime's records of them stay.")
  .action(async (opts: { node?: string; bpfRoot?: string; runDir?: string; force: boolean; output: string }) => {
    const format = parseOutputFormat(opts.output);
    const node = parseNodeName(opts.node ?? runtimeConfigFromEnv().node);
    const { cleanupCommand } = await import('./cleanup.js');
    await cleanupCommand({ ...opts, node, bpfRoot: opts.bpfRoot ?? defaultPinRoot(node) }, format, out);
  });

program
  .command('check')
  .description('check that this machine can run nodemesh (root, kernel, cgroup v2, bpffs, bpf())')
  .action(async () => {
    const { preflight } = await import('./preflight.js');
    await preflight(probeBpf);
    out('ok: root, kernel >= 5.15, cgroup v2, bpffs, bpf()\n');
  });

const debug = program.command('debug', { hidden: true }).description('tools that run inside pods (demo, tests)');

debug
  .command('echo-server')
  .option('--port <port>', 'TCP port on every address', '8080')
  .option('--log <file>', 'append a JSON line per closed connection')
  .option('--reset-after <bytes>', 'instead of echoing: send this many bytes, then reset the connection')
  .option('--port-range <from-to>', 'also listen on every port of this range (IPv4)')
  .action(async (opts: { port: string; log?: string; resetAfter?: string; portRange?: string }) => {
    const { echoServer } = await import('./debug-tools.js');
    const r = opts.portRange === undefined ? undefined : portRange(opts.portRange);
    const range = r === undefined ? [] : Array.from({ length: r.to - r.from + 1 }, (_, i) => r.from + i);
    await echoServer(parsePort(opts.port), opts.log, opts.resetAfter === undefined ? undefined : parseWholeNumber(opts.resetAfter, 'reset-after', 'bytes'), range);
  });

debug
  .command('dial-ports')
  .description('dials every port of a range (16 bytes each, checked); prints how many came back (JSON)')
  .argument('<host>')
  .argument('<from-to>')
  .option('--parallel <n>', 'connections at once', '32')
  .action(async (host: string, range: string, opts: { parallel: string }) => {
    const { dialPorts } = await import('./debug-tools.js');
    const { from, to } = portRange(range);
    out(JSON.stringify(await dialPorts(host, from, to, parseCount(opts.parallel, 'parallel'))) + '\n');
  });

debug
  .command('dial')
  .argument('<host>')
  .argument('<port>')
  .option('--bytes <n>', 'bytes to send', '1024')
  .option('--mark', 'connect through the addon with the proxy SO_MARK', false)
  .option('--mark-value <mark>', 'connect through the addon with this SO_MARK (e.g. 0x539)')
  .option('--timeout <ms>', 'connect and idle timeout', '5000')
  .option('--hold <ms>', 'keep the connection open this long after sending', '0')
  .option('--marker <text>', 'send this text repeated instead of random bytes (for a packet capture to look for)')
  .action(async (host: string, port: string, opts: { bytes: string; mark: boolean; markValue?: string; timeout: string; hold: string; marker?: string }) => {
    const { dial } = await import('./debug-tools.js');
    const result = await dial(host, parsePort(port), Number(opts.bytes), { mark: opts.markValue !== undefined ? parseMark(opts.markValue) : opts.mark ? NM_PROXY_MARK : undefined, timeoutMs: parseMilliseconds(opts.timeout, 'timeout'), holdMs: parseMilliseconds(opts.hold, 'hold'), ...(opts.marker ? { marker: opts.marker } : {}) });
    out(JSON.stringify(result) + '\n');
    process.exitCode = result.ok ? 0 : 1;
  });

debug
  .command('flood')
  .description('opens many connections at once and holds them; prints how many stayed open (JSON)')
  .argument('<host>')
  .argument('<port>')
  .option('--connections <n>', 'how many', '1000')
  .option('--hold <ms>', 'how long to keep them open', '3000')
  .action(async (host: string, port: string, opts: { connections: string; hold: string }) => {
    const { flood } = await import('./debug-tools.js');
    out(JSON.stringify(await flood(host, parsePort(port), parseCount(opts.connections, 'connections'), parseMilliseconds(opts.hold, 'hold'))) + '\n');
  });

debug
  .command('dial-series')
  .description('new connections one after the other at a steady rate; prints latency percentiles (JSON)')
  .argument('<host>')
  .argument('<port>')
  .option('--count <n>', 'connections', '500')
  .option('--rate <n>', 'connections per second', '100')
  .action(async (host: string, port: string, opts: { count: string; rate: string }) => {
    const { dialSeries } = await import('./debug-tools.js');
    out(JSON.stringify(await dialSeries(host, parsePort(port), parseCount(opts.count, 'count'), parseRate(opts.rate, 1000))) + '\n');
  });

debug
  .command('load')
  .description('new connections at a steady rate to each target, bytes checked; prints a JSON summary')
  .argument('<targets...>', 'HOST:PORT of each target')
  .option('--rate <n>', 'requests per second per target', '10')
  .option('--duration <ms>', 'how long (or until SIGTERM)', '3600000')
  .action(async (targets: string[], opts: { rate: string; duration: string }) => {
    const { load } = await import('./debug-tools.js');
    const rate = parseRate(opts.rate, 1000);
    const parsed = targets.map((t) => parseHostPort(t, 'targets', invalid('targets')));
    out(JSON.stringify(await load(parsed, rate, parseMilliseconds(opts.duration, 'duration'))) + '\n');
  });

function signalNumber(signal: NodeJS.Signals): number {
  const table: Partial<Record<NodeJS.Signals, number>> = { SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 };
  return table[signal] ?? 0;
}


try {
  await program.parseAsync(process.argv);
} catch (e) {
  // An error that is not a NodemeshError is a bug: the user gets one line (formatError), the
  // stack goes to the log for the report (NODEMESH_LOG_LEVEL=debug).
  if (!(e instanceof NodemeshError)) (await import('../shared/log.js')).logger('cli').debug({ err: e }, 'unexpected error');
  process.stderr.write(formatError(e));
  process.exitCode = e instanceof NodemeshError && e.code === 'NM_ERR_INVALID_ARGUMENT' ? 2 : 1;
}
