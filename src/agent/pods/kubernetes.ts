/**
 * The kubelet's pods (design.md section 12): the Pods the API server has bound to this node
 * (a watch with `spec.nodeName=<node>`), each found on the node by its UID: its cgroup under
 * kubepods (the systemd and the cgroupfs drivers name it differently, and its parent differs by
 * QoS class), and its network namespace through a process in that cgroup's subtree (any
 * container of the pod: they share one, except CRI-O's conmon, which is the runtime's and lives
 * in the host's). hostNetwork pods are not the mesh's. Addresses come from the Pod's status; a
 * pod the CNI plugin hands over before its status has them is the enrollment socket's (the agent
 * merges those, see agent.ts `withAnnounced`).
 */
import { existsSync } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import { isIPv4, isIPv6 } from 'node:net';
import { join } from 'node:path';

import { KubeApiError, type KubeApi, type KubeObject } from '../../kube/api.js';
import type { CniPod, EnrollPod } from '../../runtime/enrollment.js';
import { Reflector, type ReflectorMetrics } from '../../kube/reflector.js';
import { NodemeshError } from '../../shared/errors.js';
import { Counter, type Registry } from '../../shared/prom.js';
import type { NodePod, PodListing, PodProblem, PodSource } from './source.js';
import { checkPodFields, PodFieldInvalid, type PodEdge } from './validate.js';

/** The kubelet's top pod cgroup, by cgroup driver (under the kubelet's --cgroup-root, / by default). */
export const KUBEPODS = { systemd: 'kubepods.slice', cgroupfs: 'kubepods' } as const;
export type CgroupDriver = keyof typeof KUBEPODS;

/** How often pods' cgroups and processes are looked at again without an API event (a container starting). */
const POLL_MS = 2000;

/**
 * Where the kubelet puts a pod's cgroup, relative to its kubepods cgroup: the QoS class's
 * folder (none for Guaranteed), then the pod's, named from its UID (the systemd driver escapes
 * "-" as "_" in slice names).
 */
export function podCgroupCandidates(driver: CgroupDriver, uid: string, qosClass: string | undefined): string[] {
  const classes = qosClass === 'Guaranteed' ? ['guaranteed'] : qosClass === 'Burstable' ? ['burstable'] : qosClass === 'BestEffort' ? ['besteffort'] : ['guaranteed', 'burstable', 'besteffort'];
  return classes.map((qos) => {
    if (driver === 'cgroupfs') return qos === 'guaranteed' ? `pod${uid}` : `${qos}/pod${uid}`;
    const escaped = uid.replace(/-/g, '_');
    return qos === 'guaranteed' ? `kubepods-pod${escaped}.slice` : `kubepods-${qos}.slice/kubepods-${qos}-pod${escaped}.slice`;
  });
}

/** The kubelet's pod cgroups on this node: the driver whose kubepods cgroup exists under the cgroup root. */
export function findKubepods(cgroupRoot: string): { driver: CgroupDriver; path: string } {
  for (const driver of ['systemd', 'cgroupfs'] as const) {
    const path = join(cgroupRoot, KUBEPODS[driver]);
    if (existsSync(path)) return { driver, path };
  }
  throw new NodemeshError('NM_ERR_NO_KUBEPODS', `no kubelet pod cgroups under ${cgroupRoot}: neither ${KUBEPODS.systemd} (systemd driver) nor ${KUBEPODS.cgroupfs} (cgroupfs driver)`, {
    context: { path: cgroupRoot },
    hint: "give --cgroup-root the host's cgroup v2 mount as the agent sees it (the DaemonSet mounts it at /host/sys/fs/cgroup); the kubelet must run with cgroup v2",
  });
}

/** What the agent reads of a Pod object. */
interface PodFields {
  readonly uid: string;
  readonly namespace: string;
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly resourceVersion: string;
  readonly nodeName: string | undefined;
  readonly hostNetwork: boolean;
  readonly serviceAccount: string;
  readonly phase: string | undefined;
  readonly qosClass: string | undefined;
  /** The first IPv4 and IPv6 address of its status ("" when it has none). */
  readonly ip4: string;
  readonly ip6: string;
}

function podFields(o: KubeObject): PodFields {
  const meta = (o.metadata ?? {}) as { uid?: string; name?: string; namespace?: string; labels?: Record<string, string>; resourceVersion?: string };
  const spec = (o['spec'] ?? {}) as { hostNetwork?: boolean; serviceAccountName?: string; nodeName?: string };
  const status = (o['status'] ?? {}) as { phase?: string; qosClass?: string; podIPs?: Array<{ ip?: string }>; podIP?: string };
  const ips = (status.podIPs ?? (status.podIP ? [{ ip: status.podIP }] : [])).map((a) => a.ip ?? '');
  return {
    uid: String(meta.uid ?? ''),
    namespace: String(meta.namespace ?? ''),
    name: String(meta.name ?? ''),
    labels: meta.labels ?? {},
    resourceVersion: meta.resourceVersion ?? '',
    nodeName: spec.nodeName,
    hostNetwork: spec.hostNetwork === true,
    serviceAccount: spec.serviceAccountName ?? 'default',
    phase: status.phase,
    qosClass: status.qosClass,
    ip4: ips.find((a) => isIPv4(a)) ?? '',
    ip6: ips.find((a) => isIPv6(a)) ?? '',
  };
}

export interface KubernetesPodSourceOptions {
  readonly node: string;
  readonly api: KubeApi;
  /** The host's cgroup v2 mount as the agent sees it. */
  readonly cgroupRoot: string;
  /** The host's /proc (its PID namespace): where pods' network namespaces are found. */
  readonly proc: string;
  /** For tests: the server's watch timeout. */
  readonly watchTimeoutSeconds?: number;
}

export class KubernetesPodSource implements PodSource {
  readonly kubepods: { readonly driver: CgroupDriver; readonly path: string };
  private readonly reflector: Reflector;
  private readonly metrics: ReflectorMetrics & { readonly skipped: Counter<'reason'> };
  private hostNetns: bigint | undefined;
  /** The NodePod made of each Pod, by uid, with the Pod's resourceVersion and the netns inode then (one object while nothing changed). */
  private readonly made = new Map<string, { resourceVersion: string; netnsIno: bigint; pod: NodePod }>();

  constructor(private readonly options: KubernetesPodSourceOptions) {
    this.kubepods = findKubepods(options.cgroupRoot);
    this.metrics = {
      events: new Counter({ name: 'nodemesh_agent_kube_watch_events_total', help: "Watch events of this node's Pods from the Kubernetes API, by type", labelNames: ['resource', 'type'], registers: [] }),
      lists: new Counter({ name: 'nodemesh_agent_kube_lists_total', help: "Full lists of this node's Pods, by reason (initial, expired: after 410 Gone, retry)", labelNames: ['resource', 'reason'], registers: [] }),
      errors: new Counter({ name: 'nodemesh_agent_kube_errors_total', help: "Failed lists and watches of this node's Pods, by reason (unauthorized, connection, server_error, ...); the last list keeps serving", labelNames: ['resource', 'reason'], registers: [] }),
      skipped: new Counter({ name: 'nodemesh_agent_kube_pods_skipped_total', help: 'Pods of this node that are not the mesh\'s, by reason (host_network, finished)', labelNames: ['reason'], registers: [] }),
    };
    const fieldSelector = encodeURIComponent(`spec.nodeName=${options.node}`);
    this.reflector = new Reflector(
      options.api,
      { resource: 'pods', path: `/api/v1/pods?fieldSelector=${fieldSelector}`, ...(options.watchTimeoutSeconds === undefined ? {} : { watchTimeoutSeconds: options.watchTimeoutSeconds }) },
      this.metrics,
      () => this.onChange?.(),
    );
    // Listing starts now: until the first list arrives the listing says it is incomplete, and the
    // agent removes nothing an earlier agent left enrolled.
    this.reflector.start();
  }

  private onChange: (() => void) | undefined;

  get edge(): PodEdge {
    return { podsCgroup: this.kubepods.path };
  }

  register(registry: Registry): void {
    registry.registerMetric(this.metrics.events);
    registry.registerMetric(this.metrics.lists);
    registry.registerMetric(this.metrics.errors);
    registry.registerMetric(this.metrics.skipped);
  }

  health(): { synced: boolean; degraded: ReadonlyArray<string> } {
    const synced = this.reflector.hasSynced();
    const failing = this.reflector.failing();
    return { synced, degraded: [...(synced ? [] : ["this node's Pods have not been listed from the Kubernetes API yet"]), ...(failing ? [`the Kubernetes API: ${failing}; the last list keeps serving`] : [])] };
  }

  async list(): Promise<PodListing> {
    const pods: NodePod[] = [];
    const problems: PodProblem[] = [];
    // The agent runs in the node's network namespace (hostNetwork): a process found there is not a pod's.
    this.hostNetns ??= await netnsInode('/proc/self/ns/net');
    const seen = new Set<string>();
    for (const o of this.reflector.list()) {
      const r = await this.podOf(o);
      if (r === undefined) continue;
      if ('reason' in r) problems.push(r);
      else {
        pods.push(r);
        seen.add(r.uid);
      }
    }
    for (const uid of this.made.keys()) if (!seen.has(uid)) this.made.delete(uid);
    return { pods, problems, complete: this.reflector.hasSynced() };
  }

  /** A Pod as the mesh's pod on this node, a problem naming why it cannot be one, or undefined (not the mesh's, or not started). */
  private async podOf(o: KubeObject): Promise<NodePod | PodProblem | undefined> {
    const f = podFields(o);
    const id = { uid: f.uid, namespace: f.namespace, name: f.name };
    if (f.nodeName !== this.options.node) return undefined;
    if (f.hostNetwork) return this.skip('host_network');
    if (f.phase === 'Succeeded' || f.phase === 'Failed') return this.skip('finished');
    // Not started yet (no sandbox, so no address): the CNI plugin's hand-over, or a later pass.
    if (f.ip4 === '' && f.ip6 === '') return undefined;
    // Polled every POLL_MS: an unchanged Pod whose cgroup is still there and whose netns path
    // still names the same namespace (its process lives, or its PID went to one in the same
    // netns) is the pod made before, without walking its cgroup subtree again.
    const made = this.made.get(f.uid);
    if (made?.resourceVersion === f.resourceVersion && existsSync(made.pod.cgroupPath) && (await netnsInode(made.pod.netnsPath).catch(() => undefined)) === made.netnsIno) return made.pod;
    const cgroupPath = this.podCgroup(f.uid, f.qosClass);
    if (cgroupPath === undefined) {
      return f.phase === 'Running' ? { ...id, reason: 'cgroup_missing', message: this.noCgroup(f) } : undefined;
    }
    const netns = await this.podNetns(cgroupPath);
    if ('message' in netns) return f.phase === 'Running' ? { ...id, reason: 'netns_missing', message: `pod ${f.namespace}/${f.name}: ${netns.message}` } : undefined;
    let pod: NodePod;
    try {
      pod = checkPodFields({ ...id, serviceAccount: f.serviceAccount, labels: f.labels, ip4: f.ip4, ip6: f.ip6, netnsPath: netns.path, cgroupPath }, this.edge);
    } catch (e) {
      if (!(e instanceof PodFieldInvalid)) throw e;
      return { ...id, reason: 'invalid_record', message: `Pod ${f.namespace}/${f.name}: ${e.message}` };
    }
    this.made.set(f.uid, { resourceVersion: f.resourceVersion, netnsIno: netns.ino, pod });
    return pod;
  }

  private noCgroup(f: PodFields): string {
    return `no cgroup for pod ${f.namespace}/${f.name} (uid ${f.uid}) under ${this.kubepods.path} (${this.kubepods.driver} driver)`;
  }

  /**
   * A pod the CNI plugin hands over on ADD: its sandbox's netns and addresses are the runtime's
   * (the Pod's status has none yet, and no process runs in its cgroup yet); its identity, labels
   * and cgroup are the Pod object's and the kubelet's. The kubelet saw the Pod before this watch
   * may have: it is waited for, until the deadline.
   */
  async fromCni(req: CniPod, deadline: number, signal: AbortSignal): Promise<EnrollPod> {
    const fail = (message: string, field: string): NodemeshError =>
      new NodemeshError('NM_ERR_ENROLL_FAILED', message, { context: { pod: req.name, namespace: req.namespace, field }, hint: 'see the agent log' });
    let o: KubeObject | undefined;
    for (;;) {
      o = this.reflector.list().find((x) => x.metadata?.namespace === req.namespace && x.metadata?.name === req.name && (req.uid === undefined || req.uid === '' || x.metadata?.uid === req.uid));
      if (o) break;
      if (signal.aborted || Date.now() >= deadline) {
        throw new NodemeshError('NM_ERR_ENROLL_TIMEOUT', `Pod ${req.namespace}/${req.name}${req.uid ? ` (uid ${req.uid})` : ''} bound to node ${this.options.node} is not known from the Kubernetes API${this.reflector.failing() ? ` (${this.reflector.failing() ?? ''})` : ''}`, {
          context: { pod: req.name, namespace: req.namespace },
          hint: 'check that the agent can list Pods (its RBAC, the API server) and that the Pod is bound to this node',
        });
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    const f = podFields(o);
    if (f.nodeName !== this.options.node) throw fail(`Pod ${req.namespace}/${req.name} is bound to node ${f.nodeName ?? '(none)'}, not ${this.options.node}`, 'spec.nodeName');
    if (f.hostNetwork) throw fail(`Pod ${req.namespace}/${req.name} uses the host's network: no CNI call is expected for it`, 'spec.hostNetwork');
    const cgroupPath = this.podCgroup(f.uid, f.qosClass);
    if (cgroupPath === undefined) throw fail(this.noCgroup(f), 'cgroupPath');
    try {
      return checkPodFields({ uid: f.uid, namespace: req.namespace, name: req.name, serviceAccount: f.serviceAccount, labels: f.labels, ip4: req.ip4, ip6: req.ip6, netnsPath: req.netnsPath, cgroupPath }, this.edge);
    } catch (e) {
      if (!(e instanceof PodFieldInvalid)) throw e;
      throw fail(`pod.${e.message}`, `pod.${e.field}`);
    }
  }

  private skip(reason: 'host_network' | 'finished'): undefined {
    this.metrics.skipped.inc({ reason });
    return undefined;
  }

  /** The pod's cgroup, where the kubelet made it; undefined when there is none. */
  podCgroup(uid: string, qosClass: string | undefined): string | undefined {
    for (const rel of podCgroupCandidates(this.kubepods.driver, uid, qosClass)) {
      const path = join(this.kubepods.path, rel);
      if (existsSync(path)) return path;
    }
    return undefined;
  }

  /**
   * The network namespace of a process of the pod (the lowest PID first: the sandbox starts
   * before the containers), as `<proc>/PID/ns/net`. The runtime's own processes that sit in the
   * pod's cgroup (CRI-O's conmon) are in the host's namespace: those are never taken.
   */
  private async podNetns(cgroupPath: string): Promise<{ path: string; ino: bigint } | { message: string }> {
    const pids = (await subtreePids(cgroupPath)).sort((a, b) => a - b);
    if (pids.length === 0) return { message: `no process in its cgroup ${cgroupPath} yet` };
    for (const pid of pids) {
      const path = join(this.options.proc, String(pid), 'ns', 'net');
      const ino = await netnsInode(path).catch(() => undefined);
      if (ino !== undefined && ino !== this.hostNetns) return { path, ino };
    }
    return { message: `every process in its cgroup ${cgroupPath} is in the host's network namespace (a hostNetwork pod, or only the runtime's processes so far)` };
  }

  watch(onChange: () => void): () => void {
    this.onChange = onChange;
    const timer = setInterval(onChange, POLL_MS);
    timer.unref();
    return () => {
      clearInterval(timer);
      this.reflector.stop();
      this.onChange = undefined;
    };
  }
}

async function netnsInode(path: string): Promise<bigint> {
  return (await stat(path, { bigint: true })).ino;
}

/** The PIDs in a cgroup and its descendants (containers are child cgroups of the pod's), skipping CRI-O's conmon scopes. */
async function subtreePids(path: string): Promise<number[]> {
  const pids: number[] = [];
  const walk = async (dir: string, depth: number): Promise<void> => {
    const text = await readFile(join(dir, 'cgroup.procs'), 'utf8').catch(() => '');
    for (const line of text.split('\n')) if (line !== '') pids.push(Number(line));
    if (depth >= 4) return;
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const e of entries) if (e.isDirectory() && !e.name.startsWith('crio-conmon-')) await walk(join(dir, e.name), depth + 1);
  };
  await walk(path, 0);
  return pids;
}

/**
 * Whether the agent's DaemonSet is going away, so that its stop is an uninstall: the DaemonSet is
 * gone (404) or being deleted, or the agent's credentials are (401: its ServiceAccount; 403: its
 * RBAC; `kubectl delete -f daemonset/` removes those before the DaemonSet). An API server that
 * does not answer says nothing: a plain stop, which keeps the node captured for the next agent.
 */
export async function daemonSetGone(api: KubeApi, ref: { namespace: string; name: string }): Promise<{ gone: boolean; why: string }> {
  try {
    const ds = await api.get(`/apis/apps/v1/namespaces/${ref.namespace}/daemonsets/${ref.name}`, AbortSignal.timeout(5000));
    if (!ds) return { gone: true, why: `DaemonSet ${ref.namespace}/${ref.name} is gone` };
    const deleting = (ds.metadata as { deletionTimestamp?: string } | undefined)?.deletionTimestamp;
    return deleting ? { gone: true, why: `DaemonSet ${ref.namespace}/${ref.name} is being deleted` } : { gone: false, why: `DaemonSet ${ref.namespace}/${ref.name} is there` };
  } catch (e) {
    if (e instanceof KubeApiError && (e.status === 401 || e.status === 403)) return { gone: true, why: `the agent's credentials are gone (HTTP ${e.status}): nodemesh is being uninstalled` };
    return { gone: false, why: `the API server did not answer: ${(e as Error).message}` };
  }
}
